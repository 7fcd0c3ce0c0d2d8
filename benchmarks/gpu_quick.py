"""``python -m benchmarks.gpu_quick``: the GPU targets in one short run (``bash benchmarks/run_gpu.sh --quick``).

    bash benchmarks/run_gpu.sh --quick              # one H100/H200, cold compile caches, under 8 minutes
    python -m benchmarks.gpu_quick --device cpu --tiny --backend eager --steps 2 --warmup 1   # CPU smoke run

The workloads are DiT-B/2 at batch 256 and DiT-XL/2 at batch 128. Both use 256 px inputs (32x32x4 latents, 256
tokens), bf16 autocast, AdamW, ``torch.compile(model)`` only, and the route of blocks 2..depth-4 at ratio 0.5. The run
answers three targets:

* treadfx's step is >= 1.34x faster than dense on DiT-B/2 and >= 1.61x on DiT-XL/2;
* treadfx's peak ``torch.cuda.max_memory_allocated`` is <= dense's;
* after warm-up there are 0 recompiles (and no dynamo compilation at all).

For each model the variants are built and warmed up one after another: ``dense``, ``treadfx``
(``treadfx.transform``), ``reference`` (the hand-written ``benchmarks.reference_tread`` without the fp32 block), and
for DiT-XL/2 also ``reference_fp32`` (the official code's fp32 block after the route). All of them stay alive, and
then they are timed round-robin: one step each, in an order that rotates every round, ``--steps`` steps per variant.
Load drift therefore hits every variant alike. Peak memory is measured above what was allocated when a variant's
build started, over its build and warm-up (``peak_memory_bytes``, as in the full run), and over each timed step,
above what was allocated just before it (``peak_step_memory_bytes``).

Budget: the run is a list of stages (per model: setup, the build + compile + warm-up of each variant, then the timed
steps). Each stage prints its elapsed time. Before a stage starts, its duration is estimated from the stages measured
so far: the slowest build of the same model x1.1; for another model's first build, the mean measured build x1.1
scaled by depth; for timed steps, the warm-up step times. Without any measurement, a prior is used. A stage that
would end past ``--budget-s`` (counted from the start of ``run_gpu.sh``) is skipped with a printed ``SKIP`` line.
The reference variants are optional: they run only if the stages that answer the targets (dense and treadfx of
every model, and their timed steps) still fit after them. A hard stop at ``--budget-s`` + ``--grace-s`` aborts a
stage whose estimate was wrong; the run then writes what it has.

Output in ``--out-dir`` (``benchmarks/results-gpu``): ``dit-b2.json`` and ``dit-xl2.json`` in the format of the full
run (``python -m benchmarks.step``), with ``runs`` holding one ``compile="model"`` entry whose ``variants`` map each
name to its fields (``name``, ``median_ms``, ``speedup_vs_dense``, ``peak_memory_bytes``, ``recompiles_after_warmup``,
...), plus ``quick``, ``skipped``, ``targets`` and ``stages``; ``quick.json`` (targets, stages, environment) and
``quick.txt`` (the printed report).
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

from . import flags  # noqa: E402
from .step import Prepared, add_ratios, flop_limit, format_table, prepare_variant, summarize_variant  # noqa: E402
from .timing import DynamoCounts, environment, free_memory, reset_dynamo, steady_cpu_allocator, time_calls  # noqa: E402
from .workloads import DEPTHS, SHRUNK_DEPTHS, Workload, make_workload  # noqa: E402

__all__ = ["QUICK_MODELS", "SPEEDUP_BAR", "VARIANTS", "Budget", "Overrun", "targets", "parse_args", "main"]

QUICK_MODELS = ("dit-b2", "dit-xl2")
BATCH = {"dit-b2": 256, "dit-xl2": 128}
TINY_BATCH = {"dit-b2": 4, "dit-xl2": 2}
WIDTH = {"dit-b2": 768, "dit-xl2": 1152}
TOKENS = 256
SPEEDUP_BAR = {"dit-b2": 1.34, "dit-xl2": 1.61}
VARIANTS = {"dit-b2": ("dense", "treadfx", "reference"),
            "dit-xl2": ("dense", "treadfx", "reference", "reference_fp32")}
REQUIRED = ("dense", "treadfx")  # the variants the targets need; the others run only if the budget allows
RATIO = 0.5
SAFETY = 1.1
# estimates used before anything was measured (real sizes, and --tiny): seconds of build + compile + warm-up per
# block of depth, of a model's setup, and of one training step
PRIOR_BUILD_S_PER_BLOCK = {"real": 10.0, "tiny": 0.5}
PRIOR_SETUP_S = {"real": 20.0, "tiny": 3.0}
PRIOR_STEP_S = {"real": 0.5, "tiny": 0.1}
OPTIMIZER = "AdamW(lr=1e-4, weight_decay=0)"


def route_of(depth: int) -> tuple[int, int, float]:
    """The route every quick run uses: blocks 2..depth-4 (inclusive), ratio 0.5."""
    return 2, depth - 4, RATIO


class Overrun(BaseException):
    """Raised by the hard-stop timer inside a stage.

    It is a ``BaseException``, so ``except Exception`` handlers inside torch do not swallow it.
    """


class Budget:
    """Wall-clock budget of the run: admits, times and records stages, and stops hard at budget + grace.

    ``stage(name, estimate_s, fn, reserve_s)`` runs ``fn`` unless ``elapsed + estimate_s + reserve_s`` would pass
    ``budget_s``. A skipped stage gets a printed ``SKIP`` line and a record, and the call returns ``None``. A stage
    that runs past ``budget_s + grace_s`` is aborted (status ``aborted``), and every later stage is skipped.
    A stage that runs out of device memory or raises an error is recorded (``out of memory`` / ``error``, with
    the message; the traceback goes to stderr) and the run goes on.
    """

    def __init__(self, budget_s: float, grace_s: float, t0: float):
        self.budget_s, self.grace_s, self.t0 = budget_s, grace_s, t0
        self.stages: list[dict] = []
        self.stopped = False
        self._timer = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.t0

    def log(self, msg: str) -> None:
        """Print ``msg`` with the elapsed time."""
        print(f"[{self.elapsed():7.1f} s] {msg}", flush=True)

    def _skip(self, name: str, estimate_s: float, reason: str) -> None:
        self.log(f"SKIP {name}: {reason}")
        self.stages.append(dict(name=name, status="skipped", estimate_s=round(estimate_s, 1), elapsed_s=None,
                                reason=reason))

    def _alarm(self, *_: Any) -> None:
        raise Overrun()

    def stage(self, name: str, estimate_s: float, fn: Callable[[], Any], reserve_s: float = 0.0) -> Any:
        """Run ``fn`` as the stage ``name`` if it fits the budget (see the class docstring); its value or None."""
        if self.stopped:
            self._skip(name, estimate_s, f"the hard stop at {self.budget_s + self.grace_s:g} s was reached earlier")
            return None
        end = self.elapsed() + estimate_s + reserve_s
        if end > self.budget_s:
            kept = f" + {reserve_s:.0f} s kept for the stages that answer the targets" if reserve_s > 0 else ""
            self._skip(name, estimate_s, f"estimated {estimate_s:.0f} s{kept} would end at {end:.0f} s, "
                                         f"past --budget-s {self.budget_s:g}")
            return None
        self.log(f"start {name} (estimated {estimate_s:.0f} s)")
        rec = dict(name=name, status="running", estimate_s=round(estimate_s, 1), elapsed_s=None, reason="")
        self.stages.append(rec)
        t = time.time()
        if self._timer:
            signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, max(0.01, self.budget_s + self.grace_s - self.elapsed()))
        try:
            value = fn()
        except Overrun:
            if self._timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.stopped = True
            rec.update(status="aborted", elapsed_s=round(time.time() - t, 1),
                       reason=f"hard stop at --budget-s + --grace-s = {self.budget_s + self.grace_s:g} s")
            self.log(f"ABORT {name} after {rec['elapsed_s']:.1f} s: {rec['reason']}")
            return None
        except torch.cuda.OutOfMemoryError as e:
            if self._timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
            rec.update(status="out of memory", elapsed_s=round(time.time() - t, 1), reason=str(e).split("\n")[0])
            self.log(f"OUT OF MEMORY in {name} after {rec['elapsed_s']:.1f} s: {rec['reason']}")
            return None
        except Exception as e:  # one failing variant must not cost the others' answers
            if self._timer:
                signal.setitimer(signal.ITIMER_REAL, 0)
            traceback.print_exc()
            rec.update(status="error", elapsed_s=round(time.time() - t, 1),
                       reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            self.log(f"ERROR in {name} after {rec['elapsed_s']:.1f} s: {rec['reason']} (traceback on stderr)")
            return None
        if self._timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
        rec.update(status="done", elapsed_s=round(time.time() - t, 1))
        self.log(f"done {name} in {rec['elapsed_s']:.1f} s (estimated {estimate_s:.0f} s)")
        return value


class Estimates:
    """Stage-duration estimates from what has been measured so far (see the module docstring)."""

    def __init__(self, tiny: bool, steps: int):
        self.tiny, self.steps = tiny, steps
        self.prior = "tiny" if tiny else "real"
        self.build_s: dict[str, dict[str, float]] = {}
        self.step_s: dict[str, dict[str, float]] = {}
        self.setup_s: dict[str, float] = {}

    def _depth(self, model: str) -> int:
        return SHRUNK_DEPTHS[model] if self.tiny else DEPTHS[model]

    def _cost(self, model: str) -> float:
        """A proxy of a step's work: depth x width^2 x tokens x batch."""
        width, tokens, batch = (32, 16, TINY_BATCH[model]) if self.tiny else (WIDTH[model], TOKENS, BATCH[model])
        return self._depth(model) * width**2 * tokens * batch

    def setup(self, model: str) -> float:
        """Estimated seconds of a model's setup (build once, inspect FLOPs)."""
        if self.setup_s:
            other, s = next(iter(self.setup_s.items()))
            return SAFETY * s * max(1.0, self._cost(model) / self._cost(other))
        return PRIOR_SETUP_S[self.prior]

    def build(self, model: str) -> float:
        """Estimated seconds of one variant's build + compile + warm-up."""
        if self.build_s.get(model):
            return SAFETY * max(self.build_s[model].values())
        for other, builds in self.build_s.items():  # the mean: the first build there also paid one-time costs
            if builds:
                mean = sum(builds.values()) / len(builds)
                return SAFETY * mean * max(1.0, self._depth(model) / self._depth(other))
        return PRIOR_BUILD_S_PER_BLOCK[self.prior] * self._depth(model)

    def _step(self, model: str, variant: str) -> float:
        known = self.step_s.get(model, {})
        if variant in known:
            return known[variant]
        if known:
            return max(known.values())
        for other, steps in self.step_s.items():
            if steps:
                return max(steps.values()) * self._cost(model) / self._cost(other)
        return PRIOR_STEP_S[self.prior]

    def timing(self, model: str, variants: list[str] | tuple[str, ...]) -> float:
        """Estimated seconds of the timed round-robin steps of ``variants``."""
        return SAFETY * self.steps * sum(self._step(model, v) for v in variants) + 1.0

    def required_after(self, models: list[str], current: str, built: list[str], pending: list[str]) -> float:
        """Estimated seconds of every required stage after the current one.

        These are the required builds still ``pending`` of ``current``, its timed steps over ``built`` and those
        builds, and all required stages of the later ``models``.
        """
        total = len([v for v in pending if v in REQUIRED]) * self.build(current)
        total += self.timing(current, list(built) + [v for v in pending if v in REQUIRED])
        for m in models:
            total += self.setup(m) + len(REQUIRED) * self.build(m) + self.timing(m, REQUIRED)
        return total


def warm_step_s(p: Prepared) -> float:
    """A step's time (s) from a variant's warm-up: the fastest warm-up step after the first (the first compiles)."""
    warm = p.warm[1:] or p.warm
    return min(warm) / 1e3


def time_round_robin(prepared: list[Prepared], steps: int, device: torch.device) -> dict[str, dict]:
    """Time ``steps`` steps of every prepared variant, one step each per round, in an order rotating every round.

    Per variant the result has ``times`` (ms), ``late`` (the :class:`DynamoCounts` changes over its own timed
    steps) and ``step_peak`` (CUDA: the highest ``max_memory_allocated`` of a timed step above what was allocated
    just before it; None on CPU).
    """
    cuda = device.type == "cuda"
    out = {p.name: dict(times=[], late=DynamoCounts(0, 0, 0, 0), step_peak=0 if cuda else None) for p in prepared}
    for i in range(steps):
        for j in range(len(prepared)):
            p = prepared[(i + j) % len(prepared)]
            rec = out[p.name]
            c0 = DynamoCounts.now()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            rec["times"] += time_calls(p.step, 1, device)
            if cuda:
                rec["step_peak"] = max(rec["step_peak"], int(torch.cuda.max_memory_allocated(device) - base))
            rec["late"] = rec["late"] + (DynamoCounts.now() - c0)
    return out


def _verdict(ok: bool | None) -> str:
    return "NOT MEASURED" if ok is None else ("PASS" if ok else "FAIL")


def targets(model: str, variants: dict[str, dict], skipped: dict[str, str]) -> dict:
    """The three targets for one model's timed variants: speedup, peak memory and recompiles after warm-up.

    Each target has ``bar``, ``value``, ``pass`` (True / False, or None when it was not measured) and ``detail``.
    """
    d, t = variants.get("dense"), variants.get("treadfx")
    missing = [v for v in ("dense", "treadfx") if v not in variants]
    why = "; ".join(f"{v}: {skipped.get(v, 'not timed')}" for v in missing)
    out: dict[str, dict] = {}
    bar = SPEEDUP_BAR[model]
    if d and t:
        s = t["speedup_vs_dense"]
        out["speedup"] = dict(bar=f">= {bar}x", value=s, **{"pass": s >= bar},
                              detail=f"treadfx {t['median_ms']:.1f} ms vs dense {d['median_ms']:.1f} ms (median): "
                                     f"{s:.3f}x")
        peaks = [("build + warm-up", "peak_memory_bytes")]
        if t.get("peak_step_memory_bytes") is not None and d.get("peak_step_memory_bytes") is not None:
            peaks.append(("timed step", "peak_step_memory_bytes"))
        ratios = {k: t[k] / d[k] for _, k in peaks if d[k]}
        ok = all(t[k] <= d[k] for _, k in peaks)
        detail = ", ".join(f"{label} {t[k] / 2**20:,.0f} vs {d[k] / 2**20:,.0f} MiB" for label, k in peaks)
        out["peak_memory"] = dict(bar="treadfx <= dense", value=ratios, **{"pass": ok},
                                  detail=f"treadfx vs dense, {d['peak_memory_kind']}: {detail}")
    else:
        out["speedup"] = dict(bar=f">= {bar}x", value=None, **{"pass": None}, detail=why)
        out["peak_memory"] = dict(bar="treadfx <= dense", value=None, **{"pass": None}, detail=why)
    if t:
        late = dict(recompiles=t["recompiles_after_warmup"], compiles=t["compiles_after_warmup"],
                    graph_breaks=t["graph_breaks_after_warmup"])
        others = ", ".join(f"{n} {v['recompiles_after_warmup']}/{v['compiles_after_warmup']}"
                           for n, v in variants.items() if n != "treadfx")
        out["recompiles"] = dict(
            bar="0 after warm-up", value=late, **{"pass": late["recompiles"] == 0 and late["compiles"] == 0},
            detail=f"treadfx after warm-up: {late['recompiles']} recompiles, {late['compiles']} frame compilations, "
                   f"{late['graph_breaks']} graph breaks" + (f" (recompiles/compilations: {others})" if others else ""))
    else:
        out["recompiles"] = dict(bar="0 after warm-up", value=None, **{"pass": None},
                                 detail=f"treadfx: {skipped.get('treadfx', 'not timed')}")
    return out


def _command(args: argparse.Namespace) -> str:
    return " ".join(["bash benchmarks/run_gpu.sh --quick"] + [a for a in args.argv if a != "--quick"])


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_model(name: str, later: list[str], args: argparse.Namespace, budget: Budget, est: Estimates,
              env: dict) -> dict:
    """Set up, build, warm up and time the variants of one model within the budget; returns its result dict."""
    device = torch.device(args.device)
    amp = device.type == "cuda"
    batch = TINY_BATCH[name] if args.tiny else BATCH[name]
    wl = make_workload(name, device, batch, shrink=args.tiny)
    route = route_of(wl.depth)
    names = list(VARIANTS[name])
    mode = "none" if args.backend == "none" else "model"
    result: dict[str, Any] = dict(
        benchmark="treadfx.step", quick=True, command=_command(args),
        env=env,
        config=dict(model=wl.name, description=wl.description, batch=wl.batch_size, device=str(device),
                    precision="bf16 autocast" if amp else "float32", start=route[0], end=route[1], ratio=route[2],
                    depth=wl.depth, steps=args.steps, warmup=args.warmup, official_fp32="reference_fp32" in names,
                    order="interleaved", optimizer=OPTIMIZER, compile=mode, backend=args.backend,
                    tiny=args.tiny, budget_s=args.budget_s, variants=names),
        skipped={},
    )
    first_stage = len(budget.stages)
    held: dict[str, Any] = {}

    def setup() -> tuple[Workload, dict]:
        held["master"] = wl.build()  # every variant starts from a copy of these weights (build once: XL/2 is slow)
        quick = dataclasses.replace(wl, build=lambda: copy.deepcopy(held["master"]))
        return quick, flop_limit(quick, *route)

    t = time.time()
    got = budget.stage(f"{name} setup (build the model once, treadfx.inspect FLOPs)", est.setup(name), setup)
    if got is None:
        last = budget.stages[-1]
        for v in names:
            result["skipped"][v] = f"the model's setup stage did not run ({last['status']}: {last['reason']})"
        result["runs"] = [dict(compile=mode, variants={}, ratios={})]
        result["stages"] = budget.stages[first_stage:]
        result["targets"] = targets(name, {}, result["skipped"])
        return result
    est.setup_s[name] = time.time() - t
    quick_wl, limits = got
    result.update(limits)
    prepared: list[Prepared] = []
    for i, v in enumerate(names):
        required = v in REQUIRED
        pending = names[i + 1:]
        reserve = 0.0 if required else est.required_after(later, name, [p.name for p in prepared] + [v], pending)
        what = "build + warm-up" if mode == "none" else "build + torch.compile(model) + warm-up"
        t = time.time()
        p = budget.stage(f"{name} {v} ({what}, {args.warmup} steps)", est.build(name),
                         lambda v=v: prepare_variant(quick_wl, v, route, mode, args.warmup, amp, args.backend),
                         reserve_s=reserve)
        if p is None:
            result["skipped"][v] = budget.stages[-1]["status"] + ": " + budget.stages[-1]["reason"]
            free_memory(device)
            continue
        est.build_s.setdefault(name, {})[v] = time.time() - t
        est.step_s.setdefault(name, {})[v] = warm_step_s(p)
        prepared.append(p)
    held.clear()  # drop the master weights before timing
    free_memory(device)

    timed: dict[str, dict] = {}
    if prepared:
        live = [p.name for p in prepared]
        estimate = est.timing(name, live)
        if budget.elapsed() + estimate > budget.budget_s and len(live) > len([v for v in live if v in REQUIRED]):
            # time the variants the targets need rather than none
            dropped = [v for v in live if v not in REQUIRED]
            extra = estimate - est.timing(name, [v for v in live if v in REQUIRED])
            reason = f"its timed steps (estimated {extra:.0f} s) would pass --budget-s {budget.budget_s:g}"
            for v in dropped:
                budget.log(f"SKIP {name} {v} timed steps: {reason}")
                result["skipped"][v] = "skipped: " + reason
            prepared = [p for p in prepared if p.name in REQUIRED]
            live = [p.name for p in prepared]
            estimate = est.timing(name, live)
        raw = budget.stage(f"{name} timed steps ({args.steps} per variant, interleaved: {', '.join(live)})", estimate,
                           lambda: time_round_robin(prepared, args.steps, device))
        if raw is None:
            for v in live:
                result["skipped"][v] = "timed steps " + budget.stages[-1]["status"] + ": " + budget.stages[-1]["reason"]
        else:
            for p in prepared:
                r = raw[p.name]
                timed[p.name] = summarize_variant(p, r["times"], r["late"])
                timed[p.name]["peak_step_memory_bytes"] = r["step_peak"]
    prepared.clear()
    reset_dynamo()  # the next model compiles the same code objects at other shapes: start it clean
    free_memory(device)
    ratios = add_ratios(timed, limits["flop_limit"]) if "dense" in timed else {}
    result["runs"] = [dict(compile=mode, variants=timed, ratios=ratios)]
    result["stages"] = budget.stages[first_stage:]
    result["targets"] = targets(name, timed, result["skipped"])
    return result


def report(res: dict) -> str:
    """The printed report of one model: the step table (when dense was timed) and its target lines."""
    lines = []
    variants = res.get("runs", [{}])[0].get("variants", {})
    if "dense" in variants:
        lines.append(format_table(res))
    elif variants:
        lines.append(f"{res['config']['model']}: timed {', '.join(variants)} without dense (no speedups)")
    for v, why in res["skipped"].items():
        lines.append(f"  {v}: {why}")
    for key, t in res["targets"].items():
        lines.append(f"TARGET {res['config']['model']} {key} ({t['bar']}): {_verdict(t['pass'])}: {t['detail']}")
    return "\n".join(lines)


class _Tee:
    """Write to the real stdout and to a file (the ``quick.txt`` report)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "w")

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: those of the real stream
        return getattr(self.stream, name)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.gpu_quick`` (also ``bash benchmarks/run_gpu.sh --quick ...``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_quick", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="accepted for run_gpu.sh's sake; this is always the quick run")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="cuda if available, else cpu")
    p.add_argument("--budget-s", type=flags.positive_float("--budget-s"), default=420.0,
                   help="skip any stage that would end later than this many seconds after the start (420)")
    p.add_argument("--grace-s", type=flags.positive_float("--grace-s"), default=40.0,
                   help="abort a running stage at --budget-s + this many seconds (40)")
    p.add_argument("--steps", type=flags.positive_int("--steps"), default=20, help="timed steps per variant (20)")
    p.add_argument("--warmup", type=flags.positive_int("--warmup"), default=3,
                   help="warm-up steps per variant; the first compiles (3)")
    p.add_argument("--models", default=",".join(QUICK_MODELS),
                   help=f"comma-separated subset of {','.join(QUICK_MODELS)} (both)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: DiTs of depth 6 / 7, width 32, 16 tokens, batch 4 / 2 (for CPU tests)")
    p.add_argument("--backend", choices=["inductor", "aot_eager", "eager", "none"], default="inductor",
                   help="torch.compile backend (inductor); eager traces with dynamo only, none does not compile "
                        "(both for CPU smoke runs)")
    p.add_argument("--warm-cache", action="store_true",
                   help="use the existing inductor / triton caches (default: fresh empty cache directories)")
    p.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "benchmarks/results-gpu"),
                   help="where the JSON and quick.txt go (benchmarks/results-gpu, or $OUT_DIR)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; a bad flag exits with status 2 and a message naming it."""
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    flags.resolve_device(p, args, "no GPU, or a CPU build of torch: use --device cpu --tiny for a smoke run")
    models = flags.name_list(p, "--models", args.models, QUICK_MODELS)
    args.models = [m for m in QUICK_MODELS if m in models]
    return args


def _start_time() -> float:
    """When the run started: run_gpu.sh's ``TREADFX_QUICK_T0`` if it is recent, else this module's import."""
    try:
        t0 = float(os.environ.get("TREADFX_QUICK_T0", ""))
    except ValueError:
        return _T_IMPORT
    return t0 if 0.0 <= _T_IMPORT - t0 < 120.0 else _T_IMPORT


def main(argv: list[str] | None = None) -> dict:
    """Entry point: run the quick GPU check, print the report and target lines, write the JSON; returns the summary."""
    args = parse_args(argv)
    budget = Budget(args.budget_s, args.grace_s, _start_time())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    real_stdout = sys.stdout
    sys.stdout = _Tee(real_stdout, out_dir / "quick.txt")
    try:
        summary = _run(args, budget, out_dir)
    finally:
        sys.stdout.flush()
        sys.stdout.file.close()
        sys.stdout = real_stdout
    if budget.stopped:  # a stage was aborted mid-compile: do not wait for compile workers at exit
        sys.stdout.flush()
        os._exit(0)
    return summary


def _run(args: argparse.Namespace, budget: Budget, out_dir: Path) -> dict:
    device = torch.device(args.device)
    if not args.warm_cache:  # cold: fresh inductor and triton caches, filled by this run only
        cache = tempfile.mkdtemp(prefix="treadfx-quick-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    import treadfx

    env = environment(device)
    env.update(treadfx=getattr(treadfx, "__version__", None),
               nvidia_smi=_nvidia_smi() if device.type == "cuda" else None,
               inductor_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR"), cold_cache=not args.warm_cache)
    steady = steady_cpu_allocator() if device.type == "cpu" else None
    budget.log(f"quick GPU check: {', '.join(args.models)} on {env['device_name']} ({device}), torch {env['torch']}, "
               f"cuda {env['cuda']}, backend {args.backend}, budget {args.budget_s:g} s (+{args.grace_s:g} s hard "
               f"stop), caches {'warm' if args.warm_cache else 'cold (fresh directory)'}")
    est = Estimates(args.tiny, args.steps)
    results = {}
    for i, name in enumerate(args.models):
        res = run_model(name, args.models[i + 1:], args, budget, est, env)
        if steady is not None:
            res["config"]["steady_cpu_allocator"] = steady
        path = out_dir / f"{name}.json"
        with open(path, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(report(res), flush=True)
        budget.log(f"wrote {path}")
        results[name] = res
    summary = dict(benchmark="treadfx.gpu_quick", command=_command(args),
                   env=env, budget_s=args.budget_s, grace_s=args.grace_s, elapsed_s=round(budget.elapsed(), 1),
                   stages=budget.stages, targets={m: r["targets"] for m, r in results.items()},
                   files=[f"{m}.json" for m in results])
    with open(out_dir / "quick.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print("\nstage                                                                  estimate    elapsed  status")
    for s in budget.stages:
        el = "" if s["elapsed_s"] is None else f"{s['elapsed_s']:.1f} s"
        print(f"  {s['name'][:68]:<68}{s['estimate_s']:>8.0f} s{el:>11}  {s['status']}")
    print("\ntargets:")
    for m, r in results.items():
        for key, t in r["targets"].items():
            print(f"  {m:<8} {key:<12} {t['bar']:<18} {_verdict(t['pass']):<13} {t['detail']}")
    budget.log(f"quick GPU check finished; results in {out_dir}")
    return summary


if __name__ == "__main__":
    main()
