"""Micro-benchmark of the route ops: select + gather + scatter, forward and backward, against one block.

    python -m benchmarks.route_ops                                   # CPU default: B4 N256 D384
    python -m benchmarks.route_ops --device cuda                     # GPU default: B16 N1024 D1152 (DiT-XL width)

Each implementation draws kept indices for ``K = N - int(N * ratio)`` tokens
per sample, gathers them from a ``[B, N, D]`` stream (that requires grad),
scatters them back out of place into the stream, and back-propagates a fixed
gradient.  Nothing runs in between, so the time is the pure routing overhead:

* ``treadfx``        treadfx's ``RouteSelect`` / ``RouteGather`` / ``RouteScatter`` modules;
* ``gather_scatter`` hand-written ``argsort(rand)`` + ``torch.gather`` + ``Tensor.scatter``;
* ``index``          per-sample ``torch.randperm`` + advanced indexing ``x[b, idx]`` + ``index_put`` on a clone;
* ``masked``         a boolean keep mask + ``x[mask]`` + ``masked_scatter`` (data-dependent shapes);
* ``shared``         one subset for the whole batch: ``index_select`` + ``index_copy``.

Every time is also given relative to one DiT block's forward+backward at N
tokens.  The contiguity check times a block on the K gathered tokens as
treadfx produces them, on a non-contiguous view with the same values, and on
that view after ``.contiguous()`` (copy included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable

import torch

from treadfx.models.dit import DiTBlock
from treadfx.ops import RouteGather, RouteScatter, RouteSelect, num_kept

from . import flags
from .timing import environment, steady_cpu_allocator, summarize, time_calls

__all__ = ["IMPLEMENTATIONS", "route_fn", "run", "main"]

IMPLEMENTATIONS = ("treadfx", "gather_scatter", "index", "masked", "shared")


def _expand(idx: torch.Tensor, d: int) -> torch.Tensor:
    return idx.unsqueeze(-1).expand(-1, -1, d)


def route_fn(name: str, n: int, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [B, N, D] -> routed-back x``: select K of N tokens, gather them, scatter them back (out of place)."""
    if name == "treadfx":
        select = RouteSelect(0, n, k, sorted_order=False, shared=False).train()
        gather = RouteGather(1, 0, n, n, batched=True, per_sample=True)
        scatter = RouteScatter(1, 0, 0, n, per_sample=True)

        def f(x):
            idx = select(x)
            return scatter(gather(x, idx), x, idx)
    elif name == "gather_scatter":
        def f(x):
            idx = _expand(torch.rand(x.shape[0], n, device=x.device).argsort(dim=1)[:, :k], x.shape[-1])
            return x.scatter(1, idx, torch.gather(x, 1, idx))
    elif name == "index":
        def f(x):
            idx = torch.stack([torch.randperm(n, device=x.device)[:k] for _ in range(x.shape[0])])
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            kept = x[rows, idx]
            out = x.clone()
            out[rows, idx] = kept
            return out
    elif name == "masked":
        def f(x):
            top = torch.rand(x.shape[0], n, device=x.device).topk(k, dim=1).indices
            mask = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device).scatter(1, top, True)
            kept = x[mask].view(x.shape[0], k, x.shape[-1])  # host sync on CUDA (nonzero)
            return x.masked_scatter(mask.unsqueeze(-1), kept)
    elif name == "shared":
        def f(x):
            idx = torch.rand(n, device=x.device).argsort()[:k]
            return x.index_copy(1, idx, x.index_select(1, idx))
    else:
        raise ValueError(f"unknown implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    return f


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = None
        fn(x).backward(grad)

    return call


def _block_fwd_bwd(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, amp: bool,
                   prep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Callable[[], None]:
    grad = torch.randn(x.shape, device=x.device, dtype=x.dtype)

    def call() -> None:
        x.grad = None
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            out = block(prep(x), c)
        out.backward(grad)

    return call


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t`` [B, K, D], stored [B, D, K] (so the token axis is strided)."""
    b, k, d = t.shape
    out = torch.empty(b, d, k, device=t.device, dtype=t.dtype).transpose(1, 2)
    out.copy_(t)
    return out


def run(args: argparse.Namespace) -> dict:
    """Time every implementation and the block references; returns the result dict (the --json output)."""
    device = torch.device(args.device)
    if device.type == "cpu":
        steady_cpu_allocator()
    amp = device.type == "cuda"
    b, n, d = args.batch, args.tokens, args.dim
    k = num_kept(n, args.ratio)
    heads = max(1, d // 64)
    torch.manual_seed(0)
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    grad = torch.randn(b, n, d, device=device)

    def timed(call: Callable[[], None]) -> dict:
        time_calls(call, args.warmup, device)
        return summarize(time_calls(call, args.steps, device))

    block = DiTBlock(d, heads).to(device)
    c = torch.randn(b, d, device=device)
    block_n = timed(_block_fwd_bwd(block, x, c, amp))
    idx = RouteSelect(0, n, k, sorted_order=False, shared=False).train()(x)
    gathered = RouteGather(1, 0, n, n, batched=True, per_sample=True)(x.detach(), idx)
    g_contig = gathered.clone().requires_grad_(True)
    g_strided = _non_contiguous(gathered).requires_grad_(True)
    block_k = timed(_block_fwd_bwd(block, g_contig, c, amp))
    block_k_nc = timed(_block_fwd_bwd(block, g_strided, c, amp))
    block_k_nc_fixed = timed(_block_fwd_bwd(block, g_strided, c, amp, prep=lambda t: t.contiguous()))

    impls = {}
    for name in args.impls:
        s = timed(_fwd_bwd(route_fn(name, n, k), x, grad))
        s["relative_to_block"] = s["median_ms"] / block_n["median_ms"]
        impls[name] = s
    return dict(
        benchmark="treadfx.route_ops", command=" ".join(["python -m benchmarks.route_ops"] + list(args.argv)),
        env=environment(device),
        config=dict(batch=b, tokens=n, dim=d, heads=heads, ratio=args.ratio, keep=k, device=str(device),
                    block_precision="bf16 autocast" if amp else "float32", steps=args.steps, warmup=args.warmup),
        block_fwd_bwd=block_n,
        implementations=impls,
        contiguity=dict(
            treadfx_gather_output_contiguous=bool(gathered.is_contiguous()),
            block_on_gathered_ms=block_k["median_ms"],
            block_on_non_contiguous_ms=block_k_nc["median_ms"],
            block_on_non_contiguous_then_contiguous_ms=block_k_nc_fixed["median_ms"],
            non_contiguous_slowdown=block_k_nc["median_ms"] / block_k["median_ms"],
        ),
    )


def format_table(res: dict) -> str:
    """The human-readable report."""
    c, e, blk = res["config"], res["env"], res["block_fwd_bwd"]
    lines = [
        f"route ops: B{c['batch']} N{c['tokens']} D{c['dim']}, keep {c['keep']} (ratio {c['ratio']:g}), "
        f"{e['device_name']} ({c['device']}), torch {e['torch']}, {e['date']}",
        f"  one DiT block fwd+bwd at N tokens ({c['heads']} heads, {c['block_precision']}): "
        f"{blk['median_ms']:.3f} ms (p10-p90 {blk['p10_ms']:.3f}-{blk['p90_ms']:.3f})",
        f"  {'implementation':<16}{'median':>11}{'p10-p90':>22}{'of a block':>12}",
    ]
    for name, s in res["implementations"].items():
        lines.append(f"  {name:<16}{s['median_ms']:>9.3f}ms{s['p10_ms']:>11.3f}-{s['p90_ms']:<8.3f}ms"
                     f"{100 * s['relative_to_block']:>11.1f}%")
    ct = res["contiguity"]
    lines.append(
        f"  contiguity: treadfx gather output contiguous = {ct['treadfx_gather_output_contiguous']}; block fwd+bwd "
        f"at K tokens: gathered {ct['block_on_gathered_ms']:.3f} ms, non-contiguous view "
        f"{ct['block_on_non_contiguous_ms']:.3f} ms ({ct['non_contiguous_slowdown']:.2f}x), view + .contiguous() "
        f"{ct['block_on_non_contiguous_then_contiguous_ms']:.3f} ms"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors exit with status 2 and name the flag)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.route_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cuda if available, else cpu")
    p.add_argument("--batch", type=flags.positive_int("--batch"), default=None, help="B (cuda 16, cpu 4)")
    p.add_argument("--tokens", type=flags.positive_int("--tokens"), default=None, help="N (cuda 1024, cpu 256)")
    p.add_argument("--dim", type=flags.positive_int("--dim"), default=None, help="D (cuda 1152, cpu 384)")
    p.add_argument("--ratio", type=flags.ratio(allow_zero=False), default=0.5, help="fraction of tokens skipped (0.5)")
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated implementations")
    p.add_argument("--steps", type=flags.positive_int("--steps"), default=50, help="timed calls (50)")
    p.add_argument("--warmup", type=flags.positive_int("--warmup"), default=5, help="warm-up calls (5)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    flags.resolve_device(p, args)
    gpu = args.device == "cuda"
    args.batch = args.batch or (16 if gpu else 4)
    args.tokens = args.tokens or (1024 if gpu else 256)
    args.dim = args.dim or (1152 if gpu else 384)
    if args.tokens - int(args.tokens * args.ratio) < 1:
        p.error(f"--ratio {args.ratio} keeps no token of --tokens {args.tokens}")
    args.impls = flags.name_list(p, "--impls", args.impls, list(IMPLEMENTATIONS))
    return args


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m benchmarks.route_ops``; prints the table (or JSON) and returns the result."""
    args = parse_args(argv)
    res = run(args)
    flags.write_json(res, args.out)
    print(json.dumps(res, indent=2, default=str) if args.json else format_table(res))
    return res


if __name__ == "__main__":
    main()
