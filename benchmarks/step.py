"""Training-step benchmark: dense vs hand-written TREAD vs treadfx, in one process and one run.

    python -m benchmarks.step --model dit-b2 --compile all            # GPU table (bf16 autocast)
    python -m benchmarks.step --model tiny --device cpu --steps 20     # CPU (float32)
    python -m benchmarks.step --model dit-xl2 --transform-only        # treadfx transform (trace + rewrite) time

A step is forward + rectified-flow loss + backward + AdamW step on one fixed
batch (bf16 autocast on CUDA, float32 on CPU).  Variants, each built from the
same initial weights and run one after another under the same
``--compile`` setting (``none``; ``model`` = ``torch.compile`` of the whole
module; ``blocks`` = regional ``block.compile()`` on every repeated block, as
the official TREAD code does; ``all`` = each of them):

* ``dense``      the original model;
* ``reference``  hand-written TREAD (``benchmarks.reference_tread``, the official algorithm; DiT presets only);
* ``treadfx``    ``treadfx.transform(model, start=start, end=end, ratio=ratio)``;
* with ``--official-fp32`` also ``reference_fp32`` and ``treadfx_fp32``: the first block after the route runs
  in float32 with autocast disabled, as in the official code (identical to the plain variants without autocast).

Per variant: median and spread (p10-p90, IQR) of ``--steps`` step times after
``--warmup`` steps; peak memory (CUDA ``max_memory_allocated``; CPU: sampled
peak-RSS delta); compile time (warm-up wall time minus warm-up x median);
graph breaks, recompiles and dynamo frame compilations (``timing.DynamoCounts``) in total and after
warm-up; treadfx transform time (``transform`` + ``prepare``); speedup vs dense
(dense median / variant median); fraction of the FLOP limit (speedup / limit,
where the limit is ``treadfx.inspect``'s dense / routed forward+backward FLOPs);
treadfx vs reference (reference median / treadfx median).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

import treadfx

from . import flags
from .reference_tread import ReferenceTread
from .timing import (
    DynamoCounts, PeakMemory, environment, free_memory, reset_dynamo, steady_cpu_allocator, summarize, time_calls,
)
from .workloads import DEPTHS, MODELS, Workload, default_route, make_workload

__all__ = ["COMPILE_MODES", "VARIANT_FIELDS", "flop_limit", "prepare_variant", "run_sequential", "run_interleaved",
           "run", "main"]

COMPILE_MODES = ("none", "model", "blocks")
BASE_VARIANTS = ("dense", "reference", "treadfx")
FP32_VARIANTS = ("reference_fp32", "treadfx_fp32")
# every variant entry in the JSON has these fields (None where a field does not apply)
VARIANT_FIELDS = (
    "name", "median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms", "iqr_ms", "mean_ms", "min_ms", "n",
    "peak_memory_bytes", "peak_memory_kind", "first_step_ms", "warmup_ms", "compile_s",
    "graph_breaks", "recompiles", "unique_graphs", "graph_breaks_after_warmup", "recompiles_after_warmup",
    "compiles", "compiles_after_warmup", "transform_s", "speedup_vs_dense", "fraction_of_flop_limit",
)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled, otherwise a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def flop_limit(wl: Workload, start: int, end: int, ratio: float) -> dict:
    """treadfx.inspect's forward+backward FLOPs of the dense and routed step, and their ratio (the FLOP limit)."""
    model = wl.build()
    report = treadfx.inspect(treadfx.transform(model, start=start, end=end, ratio=ratio), *wl.args, **wl.kwargs)
    route = report.routes[0]
    out = dict(dense_flops=report.dense_flops, routed_flops=report.routed_flops, flop_limit=report.ideal_speedup,
               num_tokens=route.num_tokens, num_keep=route.num_keep, start=route.start, end=route.end,
               start_module=route.start_module, end_module=route.end_module, selection=route.selection)
    del model, report
    free_memory(wl.device)
    return out


def build_variant(wl: Workload, variant: str, route: tuple[int, int, float], compile_mode: str,
                  amp: bool, backend: str = "inductor") -> tuple[nn.Module, nn.Module, float | None]:
    """(callable module, module owning the parameters, transform seconds or None) for one variant.

    ``backend`` is the ``torch.compile`` backend of ``compile_mode="model"`` (``inductor``; ``eager`` for
    smoke runs that only exercise dynamo).
    """
    start, end, ratio = route
    fp32 = variant.endswith("_fp32")
    model = wl.build()
    transform_s = None
    if variant.startswith("reference"):
        net = ReferenceTread(model, start, end, ratio, fp32_after_route=fp32).train()
        inner = model
    elif variant.startswith("treadfx"):
        t0 = time.perf_counter()
        net = treadfx.transform(model, start=start, end=end, ratio=ratio, fp32_after_route=fp32)
        with autocast(wl.device, amp):
            treadfx.prepare(net, *wl.args, **wl.kwargs)
        if wl.device.type == "cuda":
            torch.cuda.synchronize(wl.device)
        transform_s = time.perf_counter() - t0
        inner = net
    else:
        net = inner = model
    if compile_mode == "model":
        call = torch.compile(net, backend=backend)
    elif compile_mode == "blocks":
        for block in wl.blocks(inner):
            block.compile()
        call = net
    else:
        call = net
    return call, net, transform_s


def make_step(wl: Workload, call: nn.Module, opt: torch.optim.Optimizer, amp: bool):
    """One training step: forward + loss under autocast, backward, AdamW step, zero grads."""

    def step() -> None:
        with autocast(wl.device, amp):
            loss = wl.loss(call)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@dataclasses.dataclass
class Prepared:
    """A built and warmed-up variant, ready to time."""

    name: str
    step: Callable[[], None]
    handles: list  # the objects to drop when done (compiled callable, module, optimizer)
    transform_s: float | None
    memory: PeakMemory
    warm: list[float]
    warm_counts: DynamoCounts  # dynamo counters accumulated while building and warming up


def prepare_variant(wl: Workload, variant: str, route: tuple[int, int, float], compile_mode: str, warmup: int,
                    amp: bool, backend: str = "inductor") -> Prepared:
    """Build one variant and run its warm-up steps, measuring peak memory, compile time and dynamo counters."""
    before = DynamoCounts.now()
    with PeakMemory(wl.device) as mem:  # model, gradients, optimizer state and activations
        call, net, transform_s = build_variant(wl, variant, route, compile_mode, amp, backend)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
        step = make_step(wl, call, opt, amp)
        warm = time_calls(step, warmup, wl.device)
    return Prepared(variant, step, [call, net, opt], transform_s, mem, warm, DynamoCounts.now() - before)


def summarize_variant(p: Prepared, times: list[float], late: DynamoCounts) -> dict:
    """The fields of VARIANT_FIELDS (ratios filled in later by :func:`add_ratios`)."""
    total = p.warm_counts + late
    res: dict[str, Any] = dict(name=p.name, **summarize(times))
    res.update(
        peak_memory_bytes=p.memory.peak, peak_memory_kind=p.memory.kind,
        first_step_ms=p.warm[0], warmup_ms=p.warm,
        compile_s=max(0.0, (sum(p.warm) - len(p.warm) * res["median_ms"]) / 1e3),
        graph_breaks=total.graph_breaks, recompiles=total.recompiles, unique_graphs=total.unique_graphs,
        graph_breaks_after_warmup=late.graph_breaks, recompiles_after_warmup=late.recompiles,
        compiles=total.compiles, compiles_after_warmup=late.compiles,
        transform_s=p.transform_s, speedup_vs_dense=None, fraction_of_flop_limit=None, times_ms=times,
    )
    return res


def _profile(p: Prepared, device: torch.device) -> dict:
    from .profiling import format_breakdown, profile_step

    prof = profile_step(p.step, device)
    return dict(profile={k: prof[k] for k in ("per_step_ms", "wall_ms", "profiled_wall_ms", "busy_ms", "time_kind",
                                              "table")},
                profile_summary=format_breakdown(prof))


def run_sequential(wl: Workload, names: list[str], route: tuple[int, int, float], compile_mode: str, steps: int,
                   warmup: int, amp: bool, profile: bool = False, log: bool = False) -> dict[str, dict]:
    """Each variant alone: build, warm up, time ``steps`` steps, free everything and reset dynamo."""
    out = {}
    for v in names:
        if log:
            print(f"[{compile_mode}] {v} ...", file=sys.stderr, flush=True)
        reset_dynamo()
        free_memory(wl.device)
        p = prepare_variant(wl, v, route, compile_mode, warmup, amp)
        c0 = DynamoCounts.now()
        times = time_calls(p.step, steps, wl.device)
        out[v] = summarize_variant(p, times, DynamoCounts.now() - c0)
        if profile and v.startswith("treadfx"):
            out[v].update(_profile(p, wl.device))
        del p
        reset_dynamo()
        free_memory(wl.device)
    return out


def run_interleaved(wl: Workload, names: list[str], route: tuple[int, int, float], compile_mode: str, steps: int,
                    warmup: int, amp: bool, profile: bool = False, log: bool = False) -> dict[str, dict]:
    """Build and warm up every variant (one after another), then time them round-robin, one step each.

    Drift in machine load (a shared CPU) then hits every variant alike; the
    order rotates every round.  Memory and compile numbers are taken while each
    variant is built and warmed up; dynamo counters after warm-up are the
    changes around each variant's own timed steps.  Dynamo is not reset between
    variants, so with ``--compile blocks`` a later variant may reuse block graphs
    compiled for an earlier one (same block code and shapes): its compile time
    and graph count then read low; use ``sequential`` order for those.
    """
    reset_dynamo()
    free_memory(wl.device)
    prepared = []
    for v in names:
        if log:
            print(f"[{compile_mode}] {v} ...", file=sys.stderr, flush=True)
        prepared.append(prepare_variant(wl, v, route, compile_mode, warmup, amp))
    times: dict[str, list[float]] = {p.name: [] for p in prepared}
    late = {p.name: DynamoCounts(0, 0, 0, 0) for p in prepared}
    for i in range(steps):
        for j in range(len(prepared)):
            p = prepared[(i + j) % len(prepared)]
            c0 = DynamoCounts.now()
            times[p.name] += time_calls(p.step, 1, wl.device)
            late[p.name] = late[p.name] + (DynamoCounts.now() - c0)
    out = {p.name: summarize_variant(p, times[p.name], late[p.name]) for p in prepared}
    if profile:
        for p in prepared:
            if p.name.startswith("treadfx"):
                out[p.name].update(_profile(p, wl.device))
    del prepared, p
    reset_dynamo()
    free_memory(wl.device)
    return out


def add_ratios(variants: dict[str, dict], limit: float) -> dict:
    """Speedups vs dense (dense median / variant median), fraction of the FLOP limit, treadfx vs reference."""
    dense = variants["dense"]["median_ms"]
    for name, r in variants.items():
        r["speedup_vs_dense"] = dense / r["median_ms"]
        r["fraction_of_flop_limit"] = r["speedup_vs_dense"] / limit if name != "dense" else None
    ratios = {}
    for a, b in (("treadfx", "reference"), ("treadfx_fp32", "reference_fp32")):
        if a in variants and b in variants:
            ratios[f"{a}_vs_{b}"] = variants[b]["median_ms"] / variants[a]["median_ms"]
    return ratios


def variants_for(args: argparse.Namespace, wl: Workload) -> list[str]:
    """The variants to run, in order (dense first: every ratio is relative to it)."""
    names = list(args.variants) if args.variants else list(BASE_VARIANTS) + (list(FP32_VARIANTS)
                                                                             if args.official_fp32 else [])
    if not wl.is_dit:
        names = [v for v in names if not v.startswith("reference")]
    return ["dense"] + [v for v in names if v != "dense"]


def resolve_route(args: argparse.Namespace, depth: int) -> tuple[int, int, float]:
    """(start, end, ratio) with non-negative indices; defaults from :func:`workloads.default_route`."""
    d_start, d_end = default_route(depth)
    start = d_start if args.start is None else args.start
    end = d_end if args.end is None else args.end
    return start % depth if start < 0 else start, end % depth if end < 0 else end, args.ratio


def prime(wl: Workload, amp: bool) -> None:
    """One untimed eager dense step, so one-time process costs (thread pools, kernel and allocator set-up,
    lazy imports) are not charged to whichever variant runs first."""
    model = wl.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    make_step(wl, model, opt, amp)()
    del model, opt
    free_memory(wl.device)


def cold_compile_caches() -> None:
    """Turn off inductor's FX-graph and AOT-autograd caches, so every variant pays its own compile time."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(inductor_config, "fx_graph_remote_cache"):
        inductor_config.fx_graph_remote_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; returns the result as a dict (the --json output)."""
    device = torch.device(args.device)
    amp = device.type == "cuda" and not args.fp32
    wl = make_workload(args.model, device, args.batch)
    route = resolve_route(args, wl.depth)
    result: dict[str, Any] = dict(
        benchmark="treadfx.step", command=" ".join(["python -m benchmarks.step"] + list(args.argv)),
        env=environment(device),
        config=dict(model=wl.name, description=wl.description, batch=wl.batch_size, device=str(device),
                    precision="bf16 autocast" if amp else "float32", start=route[0], end=route[1], ratio=route[2],
                    depth=wl.depth, steps=args.steps, warmup=args.warmup, official_fp32=args.official_fp32,
                    order=args.order,
                    optimizer="AdamW(lr=1e-4, weight_decay=0)"),
    )
    if args.transform_only:
        times = []
        for _ in range(args.repeats):
            model = wl.build()
            t0 = time.perf_counter()
            tm = treadfx.transform(model, start=route[0], end=route[1], ratio=route[2])
            with autocast(device, amp):
                treadfx.prepare(tm, *wl.args, **wl.kwargs)
            times.append(time.perf_counter() - t0)
            del model, tm
        result["transform_s"] = times[0]
        result["transform_s_repeats"] = times
        result.update(flop_limit(wl, *route))
        return result
    names = variants_for(args, wl)
    modes = list(COMPILE_MODES) if args.compile == "all" else [args.compile]
    if not args.warm_cache:
        cold_compile_caches()
    if device.type == "cpu" and not args.system_malloc:
        result["config"]["steady_cpu_allocator"] = steady_cpu_allocator()
    prime(wl, amp)
    runs = []
    for mode in modes:
        runner = run_interleaved if args.order == "interleaved" else run_sequential
        variants = runner(wl, names, route, mode, args.steps, args.warmup, amp, profile=args.profile,
                          log=not args.json)
        runs.append(dict(compile=mode, variants=variants))
    limits = flop_limit(wl, *route)
    result.update(limits)
    if not wl.is_dit:
        result["skipped"] = {"reference": "the hand-written reference TREAD is written for the reference DiT only"}
    for r in runs:
        r["ratios"] = add_ratios(r["variants"], limits["flop_limit"])
    result["runs"] = runs
    return result


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def format_table(res: dict) -> str:
    """The human-readable report."""
    c, e = res["config"], res["env"]
    lines = [
        f"treadfx step benchmark: {c['description']}",
        f"  batch {c['batch']}, {e['device_name']} ({c['device']}), {c['precision']}, torch {e['torch']}, "
        f"{e['cpu_threads']} CPU threads, {e['date']}",
        f"  route blocks {c['start']}..{c['end']} of {c['depth']} ({res['start_module']} .. {res['end_module']}), "
        f"ratio {c['ratio']:g}: keep {res['num_keep']} of {res['num_tokens']} tokens, {res['selection']} selection",
        f"  FLOPs fwd+bwd (treadfx.inspect): dense {res['dense_flops'] / 1e9:.2f} G, routed "
        f"{res['routed_flops'] / 1e9:.2f} G -> FLOP limit {res['flop_limit']:.3f}x",
        f"  AdamW step; {c['steps']} timed steps ({c['order']}) after {c['warmup']} warm-up steps; peak memory: "
        f"{res['runs'][0]['variants']['dense']['peak_memory_kind']}",
    ]
    if res.get("skipped"):
        lines.append(f"  skipped: {res['skipped']}")
    head = (f"  {'variant':<15}{'median':>10}{'p10-p90':>18}{'IQR':>9}{'vs dense':>10}{'of limit':>10}"
            f"{'peak mem':>13}{'compile':>9}{'breaks':>8}{'recomp.':>9}{'transform':>11}")
    for r in res["runs"]:
        lines.append(f"\ncompile={r['compile']}   (breaks/recomp.: total, after warm-up)")
        lines.append(head)
        for name, v in r["variants"].items():
            frac = "" if v["fraction_of_flop_limit"] is None else f"{100 * v['fraction_of_flop_limit']:.0f}%"
            tr = "" if v["transform_s"] is None else f"{v['transform_s']:.2f} s"
            lines.append(
                f"  {name:<15}{v['median_ms']:>8.1f}ms{v['p10_ms']:>8.1f}-{v['p90_ms']:<7.1f}ms{v['iqr_ms']:>7.1f}ms"
                f"{v['speedup_vs_dense']:>9.3f}x{frac:>10}{_mb(v['peak_memory_bytes']):>13}{v['compile_s']:>8.1f}s"
                f"{v['graph_breaks']:>4},{v['graph_breaks_after_warmup']:<3}{v['recompiles']:>5},"
                f"{v['recompiles_after_warmup']:<3}{tr:>11}"
            )
        for k, ratio in r["ratios"].items():
            lines.append(f"  {k.replace('_vs_', ' vs ')}: {ratio:.3f}x")
        for name, v in r["variants"].items():
            if "profile_summary" in v:
                lines.append(f"  profile of a {name} step (compile={r['compile']}):\n{v['profile_summary']}")
                lines.append(v["profile"]["table"])
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m benchmarks.step``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="workload preset (tiny)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cuda if available, else cpu")
    p.add_argument("--batch", type=flags.positive_int("--batch"), default=None,
                   help="batch size (per preset: dit-b2 256, dit-xl2 128 on cuda; small on cpu)")
    p.add_argument("--compile", choices=list(COMPILE_MODES) + ["all"], default="none",
                   help="none | model (torch.compile of the module) | blocks (block.compile() per block) | all")
    p.add_argument("--steps", type=flags.positive_int("--steps"), default=20, help="timed steps per variant (20)")
    p.add_argument("--warmup", type=flags.positive_int("--warmup"), default=3, help="warm-up steps per variant (3)")
    p.add_argument("--order", choices=["sequential", "interleaved"], default="sequential",
                   help="sequential: each variant alone, freed before the next (default); interleaved: all built, "
                        "then timed round-robin one step each (robust to load drift on a shared CPU)")
    p.add_argument("--start", type=int, default=None, help="first routed block (min(2, depth//4))")
    p.add_argument("--end", type=int, default=None, help="last routed block, inclusive (depth - min(4, depth//4+1))")
    p.add_argument("--ratio", type=flags.ratio(), default=0.5, help="fraction of image tokens that skip the route (0.5)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of dense,reference,treadfx,reference_fp32,treadfx_fp32")
    p.add_argument("--official-fp32", action="store_true",
                   help="also run reference_fp32 / treadfx_fp32: first block after the route in float32, autocast off")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on cuda")
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of a treadfx step")
    p.add_argument("--transform-only", action="store_true",
                   help="only time treadfx.transform + prepare (and the FLOP limit), no training steps")
    p.add_argument("--repeats", type=flags.positive_int("--repeats"), default=3, help="transform repeats (--transform-only)")
    p.add_argument("--system-malloc", action="store_true",
                   help="cpu: leave glibc malloc as is (default: no mmap / no trim between steps, see timing.py)")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep inductor's compile caches on (default off: each variant compiles cold)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors exit with status 2 and name the flag)."""
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    flags.resolve_device(p, args)
    if args.variants is not None:
        names = flags.name_list(p, "--variants", args.variants, BASE_VARIANTS + FP32_VARIANTS)
        if args.model in ("flux", "sd3") and any(v.startswith("reference") for v in names):
            p.error(f"--variants: the reference TREAD exists for the DiT presets only, not --model {args.model}")
        args.variants = names
    depth = DEPTHS[args.model]
    for flag in ("start", "end"):
        v = getattr(args, flag)
        if v is not None and not -depth <= v < depth:
            p.error(f"--{flag} {v} is outside the {depth} blocks of --model {args.model} (use {-depth}..{depth - 1})")
    s, e, _ = resolve_route(args, depth)
    if s > e:
        p.error(f"--start {s} is after --end {e}: the route must span at least one block")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m benchmarks.step``; prints the table (or JSON) and returns the result."""
    args = parse_args(argv)
    res = run(args)
    flags.write_json(res, args.out)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    elif args.transform_only:
        c = res["config"]
        print(f"treadfx transform + prepare of {c['description']} (batch {c['batch']}, {res['env']['device_name']}, "
              f"torch {res['env']['torch']}): first {res['transform_s']:.2f} s, repeats "
              + ", ".join(f"{t:.2f}" for t in res["transform_s_repeats"]) + " s"
              f"; FLOP limit {res['flop_limit']:.3f}x")
    else:
        print(format_table(res))
    return res


if __name__ == "__main__":
    main()
