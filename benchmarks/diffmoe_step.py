"""Dense vs DiffMoE vs DiffMoE+TREAD training steps of a DiT, in one run.

    python -m benchmarks.diffmoe_step --model tiny --steps 20 --json
    python -m benchmarks.diffmoe_step --model S --experts 8 --compare-loop --no-tread --threads 1

``--compare-loop`` adds "diffmoe (loop)" (experts one after another) next to
"diffmoe" (experts as one grouped computation) in the same interleaved run.

For each variant: median wall time of a full training step (forward, diffusion
loss + ``treadfx.diffmoe_loss``, backward, AdamW step; variants interleaved
step by step so drift hits all of them alike), forward+backward FLOPs of one
step counted by ``FlopCounterMode`` (activated: experts on the tokens they
took; TREAD: routed blocks on the kept tokens), activated and total parameters
(``treadfx.diffmoe_stats``), and the ratios to dense.  CPU tiny runs in
seconds; on CUDA the step runs under bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import treadfx
from treadfx.models.dit import DiT

from . import flags

MODELS = {
    "tiny": dict(input_size=16, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10),
    "S": dict(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6, num_classes=1000),
    "B": dict(input_size=32, patch_size=2, hidden_size=768, depth=12, num_heads=12, num_classes=1000),
}


def build(name: str, variant: str, args, device: torch.device) -> torch.nn.Module:
    """The tiny/S/B DiT of ``name`` as ``variant`` (dense, diffmoe or diffmoe+tread), seeded identically."""
    torch.manual_seed(0)
    m = DiT(**MODELS[name], class_dropout_prob=0.1)
    if variant != "dense":
        impl = "loop" if variant == "diffmoe (loop)" else "grouped"
        m = treadfx.diffmoe(m, num_experts=args.experts, capacity=args.capacity, interleave=not args.all_blocks,
                            inplace=True, seed=0, experts_impl=impl)
    if variant == "diffmoe+tread":
        m = treadfx.transform(m, start=args.start, end=args.end, ratio=args.ratio, inplace=True)
    return m.to(device).train()


def make_step(model, opt, batch, device, amp):
    """A closure running one training step (rectified-flow loss + ``diffmoe_loss``, backward, AdamW)."""
    x, t, y = batch

    def step():
        noise = torch.randn_like(x)
        tt = t / 1000
        xt = (1 - tt[:, None, None, None]) * x + tt[:, None, None, None] * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(xt, t, y)[:, : x.shape[1]]
            loss = (out.float() - (noise - x)).square().mean() + treadfx.diffmoe_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(args) -> dict:
    """Time all variants interleaved; return per-variant median step time, FLOPs and parameter counts with ratios to dense."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda"
    cfg = MODELS[args.model]
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 4, cfg["input_size"], cfg["input_size"], generator=g).to(device),
             (torch.rand(args.batch, generator=g) * 1000).to(device),
             torch.randint(0, cfg["num_classes"], (args.batch,), generator=g).to(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["dense", "diffmoe"] + ([] if args.no_tread else ["diffmoe+tread"])
    if args.compare_loop:  # experts one after another (the reference) vs grouped ("diffmoe"), interleaved
        variants.insert(1, "diffmoe (loop)")
    models, steps, results = {}, {}, {}
    for v in variants:
        models[v] = build(args.model, v, args, device)
        opt = torch.optim.AdamW(models[v].parameters(), lr=1e-4)
        steps[v] = make_step(models[v], opt, batch, device, amp)
        steps[v]()  # trace (TREAD), warm caches
        counter = FlopCounterMode(display=False)
        with counter:
            steps[v]()
        stats = treadfx.diffmoe_stats(models[v])
        total = sum(p.numel() for p in models[v].parameters())
        results[v] = dict(
            flops_per_step=int(counter.get_total_flops()),
            activated_params=stats.activated_params if stats.layers else total,
            total_params=total,
            ffn_flops_ratio_fwd=stats.ffn_flops_ratio if stats.layers else 1.0,
            times_ms=[],
        )
    for _ in range(args.warmup):
        for v in variants:
            steps[v]()
    for _ in range(args.steps):
        for v in variants:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[v]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[v]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    dense = results["dense"]
    for v in variants:
        r = results[v]
        r["median_ms"] = statistics.median(r.pop("times_ms"))
        r["time_ratio"] = r["median_ms"] / dense["median_ms"]
        r["flops_ratio"] = r["flops_per_step"] / dense["flops_per_step"]
        r["activated_params_ratio"] = r["activated_params"] / dense["activated_params"]
    return dict(model=args.model, device=str(device), amp_bf16=amp, batch=args.batch, steps=args.steps,
                experts=args.experts, capacity=args.capacity, tread=None if args.no_tread else
                dict(start=args.start, end=args.end, ratio=args.ratio), variants=results)


def main(argv=None) -> dict:
    """Command-line entry point: parse flags, run, print a table or one JSON object."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.diffmoe_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=flags.positive_int("--steps"), default=10)
    p.add_argument("--warmup", type=flags.positive_int("--warmup"), default=2)
    p.add_argument("--batch", type=flags.positive_int("--batch"), default=8)
    p.add_argument("--experts", type=flags.positive_int("--experts"), default=8)
    p.add_argument("--capacity", type=flags.positive_float("--capacity"), default=1.0)
    p.add_argument("--all-blocks", action="store_true", help="convert every block (default: every other block)")
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--end", type=int, default=-2)
    p.add_argument("--ratio", type=flags.ratio(), default=0.5)
    p.add_argument("--no-tread", action="store_true")
    p.add_argument("--compare-loop", action="store_true",
                   help="add 'diffmoe (loop)': the experts one after another, next to the grouped experts")
    p.add_argument("--threads", type=flags.positive_int("--threads"), default=None,
                   help="torch intra-op threads (1 for a stable CPU ratio)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model']} on {res['device']} (bf16 autocast: {res['amp_bf16']}), batch {res['batch']}, "
              f"threads {torch.get_num_threads()}, "
              f"{res['steps']} timed steps, E={res['experts']} capacity={res['capacity']}")
        for v, r in res["variants"].items():
            print(f"  {v:<16} {r['median_ms']:8.2f} ms/step ({r['time_ratio']:.2f}x)  "
                  f"{r['flops_per_step'] / 1e9:8.3f} GFLOP/step ({r['flops_ratio']:.2f}x)  "
                  f"activated params {r['activated_params']:,} ({r['activated_params_ratio']:.2f}x) of "
                  f"{r['total_params']:,}")
    return res


if __name__ == "__main__":
    main()
