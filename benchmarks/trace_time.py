"""How long treadfx takes to trace and build each model of today's diffusers zoo, and the reference DiT-XL/2.

    python -m benchmarks.trace_time                          # every model, 3 builds each, CPU, 1 thread
    python -m benchmarks.trace_time --models wan,flux2 --repeats 5
    python -m benchmarks.trace_time --profile qwen_image     # + a cProfile of one build of that model

The zoo models are the tiny random configurations ``tests/test_zoo.py`` trains
(its ``ZOO`` table, with its transform options: the largest tiny configs the
tests use, 4 blocks, 16 to 64 image tokens, batch 2; a model that stops routing
gets a row with its error), and the reference DiT-XL/2 (``treadfx.models.dit``, 28 blocks of width 1152, 256
tokens at 256 px, route 2..-4).  For each model, after one dense evaluation
call (diffusers fills its lru-cached RoPE helpers there):

* ``transform``: the time of ``treadfx.transform(model, ...)`` (lazy: nothing is traced yet);
* ``1st call``: the first training call of the first transform in this process (trace + build + the
  routed forward itself); ``build``: the build stages' part of it, wall and process CPU time;
* ``rebuild``: the build of a fresh transform of the same model in the same process (over
  ``--repeats - 1`` fresh transforms: the least wall time, and the least CPU time), and each build
  stage's CPU time in that rebuild; stages are delimited by the ``treadfx`` logger's DEBUG lines
  ``stage <name>: <seconds>``.

A row is flagged when a build (cold or rebuilt) takes 2 s of CPU time or
more.  With one torch thread a build's CPU time is close to the wall time it
takes on an idle core; wall times on a shared machine are inflated by the
load (the header prints the load average before and after): compare the two.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import json
import logging
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import flags
from .timing import environment

__all__ = ["Case", "cases", "measure", "run", "format_table", "main"]

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 2.0  # the build time the zoo must stay under on CPU (issue 15)


class Case:
    """A model to build: ``build()`` -> module, ``inputs()`` -> (args, kwargs), the transform options."""

    def __init__(self, name: str, build: Callable, inputs: Callable, options: dict, dense_call: bool = True):
        self.name, self.build, self.inputs, self.options, self.dense_call = name, build, inputs, options, dense_call


def _test_zoo():
    """``tests/test_zoo.py`` as a module (its directory joins ``sys.path`` for its ``backbone_refs`` import)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("test_zoo")


def _dit_xl():
    from treadfx.models.dit import dit

    torch.manual_seed(0)
    return dit("XL", 2)


def _dit_xl_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, generator=g) * 999, torch.tensor([1, 2])), {}


def cases() -> dict[str, Case]:
    """Every model this benchmark knows, by name: the zoo of ``tests/test_zoo.py`` and DiT-XL/2."""
    route = dict(start=1, end=-2, ratio=0.5)
    zoo = _test_zoo()
    out = {name: Case(name, z.build, z.inputs, {**route, **z.options}) for name, z in zoo.ZOO.items()}
    out["dit_xl_2"] = Case("dit_xl_2", _dit_xl, _dit_xl_inputs, dict(start=2, end=-4, ratio=0.5), dense_call=False)
    return out


class _Stages(logging.Handler):
    """Collects the ``stage <name>: <seconds>`` DEBUG records of the ``treadfx`` logger, with the process CPU
    time at each (a stage's CPU time is the difference to the record before it, or to ``cpu_start``)."""

    def __init__(self, cpu_start: float):
        super().__init__(logging.DEBUG)
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.last_cpu = cpu_start

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "stage %s: %.3f s":
            now = time.process_time()
            name, seconds = record.args
            self.wall[name] = self.wall.get(name, 0.0) + seconds
            self.cpu[name] = self.cpu.get(name, 0.0) + now - self.last_cpu
            self.last_cpu = now


@contextlib.contextmanager
def _stage_log(cpu_start: float):
    logger = logging.getLogger("treadfx")
    handler, level = _Stages(cpu_start), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _first_call(case: Case, model, args, kwargs) -> dict:
    import treadfx

    t0 = time.perf_counter()
    tm = treadfx.transform(model, **case.options)
    t_transform = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    with _stage_log(c0) as stages:
        tm(*args, **kwargs)
    return dict(transform_s=t_transform, call_s=time.perf_counter() - t0, build_s=sum(stages.wall.values()),
                build_cpu_s=sum(stages.cpu.values()), stages=dict(stages.cpu))


def measure(case: Case, repeats: int) -> dict:
    """Build ``case``'s model, then ``repeats`` fresh transforms, each with its first training call."""
    import treadfx

    t0 = time.perf_counter()
    model = case.build()
    args, kwargs = case.inputs()
    row: dict = dict(model=case.name, make_s=time.perf_counter() - t0,
                     params=sum(p.numel() for p in model.parameters()))
    if case.dense_call:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    model.train()
    try:
        runs = [_first_call(case, model, args, kwargs) for _ in range(repeats)]
        report = treadfx.inspect(treadfx.transform(model, **case.options), *args, **kwargs)
    except treadfx.TransformError as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    route = report.routes[0]
    chain = next(c for c in report.chains if c.selected)
    cold = runs[0]
    row.update(chain=chain.name, blocks=chain.length, tokens=route.num_tokens, kept=route.num_keep,
               transform_s=min(r["transform_s"] for r in runs), cold_call_s=cold["call_s"],
               cold_build_s=cold["build_s"], cold_build_cpu_s=cold["build_cpu_s"], cold_stages=cold["stages"])
    if len(runs) > 1:
        best = min(runs[1:], key=lambda r: r["build_cpu_s"])
        row.update(rebuild_s=min(r["build_s"] for r in runs[1:]), rebuild_cpu_s=best["build_cpu_s"],
                   stages=best["stages"], rebuilds=[(r["build_s"], r["build_cpu_s"]) for r in runs[1:]])
    row["over_limit"] = max(row["cold_build_cpu_s"], row.get("rebuild_cpu_s", 0.0)) >= LIMIT_S
    return row


def _profile(case: Case, rows: int = 30) -> str:
    """cProfile of one fresh build of ``case`` (after one unprofiled build), sorted by cumulative time."""
    model = case.build()
    args, kwargs = case.inputs()
    if case.dense_call:
        with torch.no_grad():
            model.eval()
            model(*args, **kwargs)
    model.train()
    _first_call(case, model, args, kwargs)
    import treadfx

    tm = treadfx.transform(model, **case.options)
    prof = cProfile.Profile()
    prof.enable()
    tm(*args, **kwargs)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(r"treadfx", rows)
    stats.sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict:
    """Measure the models named in ``args.models`` (all if empty); the result dict the table is printed from."""
    torch.set_num_threads(args.threads)
    logging.getLogger("treadfx").propagate = False  # the DEBUG stage lines go to the table only
    known = cases()
    names = args.models or list(known)
    env = environment("cpu")
    env["load_average_before"] = os.getloadavg()
    res = dict(environment=env, repeats=args.repeats, limit_s=LIMIT_S, rows=[])
    for name in names:
        row = measure(known[name], args.repeats)
        res["rows"].append(row)
        if args.verbose:
            print(format_row(row, _stage_names(res["rows"])), file=sys.stderr, flush=True)
    env["load_average_after"] = os.getloadavg()
    if args.profile:
        res["profile"] = {args.profile: _profile(known[args.profile])}
    return res


def _stage_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for s in r.get("stages") or r.get("cold_stages") or {}:
            if s not in names:
                names.append(s)
    return names


def format_row(r: dict, stages: list[str]) -> str:
    """One table line: the model, its sizes, the times, and each stage of its fastest rebuild."""
    if "error" in r:
        return f"{r['model']:<15} not routed: {r['error']}"
    rebuild, rebuild_cpu = r.get("rebuild_s"), r.get("rebuild_cpu_s")
    cells = [f"{r['model']:<15}", f"{r['tokens']:>4}->{r['kept']:<4}", f"{r['blocks']:>3}",
             f"{r['params'] / 1e6:>8.2f}", f"{r['transform_s'] * 1e3:>7.1f}", f"{r['cold_call_s']:>8.2f}",
             f"{r['cold_build_s']:>6.2f}", f"{r['cold_build_cpu_s']:>6.2f}",
             f"{rebuild:>7.2f}" if rebuild is not None else f"{'-':>7}",
             f"{rebuild_cpu:>6.2f}" if rebuild_cpu is not None else f"{'-':>6}"]
    st = r.get("stages") or r.get("cold_stages") or {}
    cells += [f"{st[s]:>{max(6, len(s))}.2f}" if s in st else f"{'-':>{max(6, len(s))}}" for s in stages]
    cells.append("  >= 2 s" if r["over_limit"] else "")
    return " ".join(cells)


def format_table(res: dict) -> str:
    """The printed table: one row per model, stage columns in pipeline order, then the environment."""
    env = res["environment"]
    stages = _stage_names(res["rows"])
    head = (f"{'model':<15} {'tokens':<10} {'blk':>3} {'params M':>8} {'xform ms':>7} {'1st call':>8} {'build':>6} "
            f"{'cpu':>6} {'rebuild':>7} {'cpu':>6} " + " ".join(f"{s:>{max(6, len(s))}}" for s in stages))
    lines = [f"treadfx trace + build time, CPU, {env['cpu_threads']} thread(s), {env['cpu_model']}, torch "
             f"{env['torch']}; load average before {tuple(round(x, 2) for x in env['load_average_before'])}, "
             f"after {tuple(round(x, 2) for x in env['load_average_after'])}",
             f"seconds; 1st call, build, rebuild: wall time; cpu: the process CPU time of the build before it "
             f"(close to an idle core's wall time); stages: CPU time of the rebuild with the least CPU time of "
             f"{res['repeats'] - 1} fresh transforms of the same model in this process; flagged: a build of "
             f"{res['limit_s']:.0f} s CPU or more", head,
             "-" * len(head)]
    lines += [format_row(r, stages) for r in res["rows"]]
    for name, text in res.get("profile", {}).items():
        lines += ["", f"cProfile of one rebuild of {name}:", text]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: --models, --repeats, --threads, --profile, --list, --json, --out, --verbose."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.trace_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    p.add_argument("--repeats", type=flags.positive_int("--repeats"), default=3,
                   help="fresh transforms per model (the first is the cold build); default 3")
    p.add_argument("--threads", type=flags.positive_int("--threads"), default=1, help="torch threads (default 1)")
    p.add_argument("--profile", default=None, metavar="MODEL", help="also print a cProfile of one rebuild of MODEL")
    p.add_argument("--list", action="store_true", help="print the model names and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--verbose", action="store_true", help="print each row to stderr as it is measured")
    args = p.parse_args(argv)
    known = list(cases())
    if args.models is not None:
        args.models = flags.name_list(p, "--models", args.models, known)
    if args.profile is not None:
        flags.name_list(p, "--profile", args.profile, known)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m benchmarks.trace_time``; prints the table (or JSON) and returns the result."""
    args = parse_args(argv)
    if args.list:
        print("\n".join(cases()))
        return {}
    res = run(args)
    flags.write_json(res, args.out)
    print(json.dumps(res, indent=2, default=str) if args.json else format_table(res))
    return res


if __name__ == "__main__":
    main()
