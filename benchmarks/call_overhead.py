"""treadfx's eager per-call overhead: routed forward vs the hand-written reference, side by side in one run.

    python -m benchmarks.call_overhead                 # tiny DiT, batch 2, 1 thread, 300 calls per variant
    python -m benchmarks.call_overhead --calls 1000 --threads 2

The overhead of the live routed model (signature and guard lookup, the live
graph's dispatch, recording the kept indices) is what treadfx adds on top of
the arithmetic a hand-written TREAD forward does.  It is measured on a model
small enough that the arithmetic is cheap, so the overhead is visible:

* ``reference``  the hand-written TREAD forward (``benchmarks.reference_tread``), training mode;
* ``treadfx``    ``treadfx.transform(model, start=start, end=end, ratio=ratio)``, training mode, same weights;
* ``original``   the untransformed model in eval mode;
* ``eval``       the transformed model in eval mode (the original forward behind treadfx's dispatch).

Forward passes with gradients enabled (routing needs them) and no backward.
Variants are interleaved call by call, so load that changes during the run
hits all alike; each variant's median is reported, and the overheads are the
differences of medians: ``treadfx - reference`` and ``eval - original``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import treadfx
from benchmarks import flags
from benchmarks.reference_tread import ReferenceTread
from benchmarks.timing import environment
from treadfx.models.dit import DiT


def measure(calls: int, batch: int, warmup: int = 20) -> dict:
    """Median forward time (ms) per variant, interleaved; overheads in ms as differences of medians."""
    cfg = dict(input_size=16, patch_size=2, hidden_size=64, depth=8, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    dense = DiT(**cfg, class_dropout_prob=0.1)
    torch.manual_seed(0)
    routed = treadfx.transform(DiT(**cfg, class_dropout_prob=0.1), start=2, end=5, ratio=0.5)
    reference = ReferenceTread(dense, start=2, end=5, ratio=0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    y = torch.randint(0, 10, (batch,), generator=g)

    def run(model: torch.nn.Module, train: bool):
        def call() -> None:
            model.train(train)
            model(x, t, y)
        return call

    variants = {"reference": run(reference, True), "treadfx": run(routed, True),
                "original": run(dense, False), "eval": run(routed, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + calls):
        for name, call in variants.items():
            t0 = time.perf_counter()
            call()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_ms": med,
            "overhead_train_ms": med["treadfx"] - med["reference"],
            "overhead_eval_ms": med["eval"] - med["original"],
            "calls": calls, "batch": batch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=flags.positive_int("--calls"), default=300, help="timed calls per variant (300)")
    p.add_argument("--batch", type=flags.positive_int("--batch"), default=2, help="batch size (2)")
    p.add_argument("--threads", type=flags.positive_int("--threads"), default=1, help="torch threads (1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure(args.calls, args.batch)
    res["environment"] = environment("cpu")
    res["threads"] = args.threads
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"tiny DiT (depth 8, width 64, 64 tokens), batch {args.batch}, {args.threads} thread(s), "
          f"{args.calls} interleaved forward calls per variant (grad enabled, no backward)")
    for k, v in res["median_ms"].items():
        print(f"  {k:10s} {v:8.3f} ms")
    print(f"treadfx overhead in training: {res['overhead_train_ms']:+.3f} ms per call (treadfx - reference)")
    print(f"treadfx overhead in eval:     {res['overhead_eval_ms']:+.3f} ms per call (eval - original)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
