"""Smoke tests of the benchmarks: the entry points run, report every field, and compare equal work.

No timing assertions: only that the reported numbers are consistent with each
other and with ``treadfx.inspect``, and that the hand-written reference TREAD
and treadfx compute the same thing on the same kept indices.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import treadfx
from treadfx.models.dit import DiT

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.reference_tread import ReferenceTread  # noqa: E402
from benchmarks.step import VARIANT_FIELDS, parse_args  # noqa: E402
from benchmarks.workloads import make_workload  # noqa: E402


def _run(module: str, *flags: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def step_result() -> dict:
    return _run("benchmarks.step", "--model", "tiny", "--steps", "2", "--warmup", "1", "--compile", "none", "--json")


def test_step_reports_every_variant_and_field(step_result):
    res = step_result
    assert res["config"]["model"] == "tiny" and res["config"]["steps"] == 2 and res["config"]["warmup"] == 1
    assert [r["compile"] for r in res["runs"]] == ["none"]
    variants = res["runs"][0]["variants"]
    assert list(variants) == ["dense", "reference", "treadfx"]
    for name, v in variants.items():
        missing = [f for f in VARIANT_FIELDS if f not in v]
        assert not missing, f"{name} lacks {missing}"
        assert v["n"] == 2 and len(v["times_ms"]) == 2 and len(v["warmup_ms"]) == 1
        assert v["median_ms"] == pytest.approx(statistics.median(v["times_ms"]), rel=1e-12)
        assert v["p10_ms"] <= v["median_ms"] <= v["p90_ms"] and v["iqr_ms"] >= 0
        assert v["graph_breaks"] == 0 and v["recompiles"] == 0 and v["recompiles_after_warmup"] == 0
        assert isinstance(v["peak_memory_bytes"], int) and "RSS" in v["peak_memory_kind"]
        assert (v["transform_s"] is not None) == (name == "treadfx")
    assert variants["treadfx"]["transform_s"] > 0
    for key in ("torch", "device_name", "cpu_model", "date", "cpu_threads"):
        assert res["env"][key]


def test_flop_limit_is_inspects_ideal_speedup(step_result):
    res = step_result
    assert (res["config"]["start"], res["config"]["end"], res["config"]["ratio"]) == (2, 5, 0.5)
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, hidden_size=64, depth=8, num_heads=4, num_classes=10)
    b = res["config"]["batch"]
    x, t, y = torch.randn(b, 4, 16, 16), torch.rand(b) * 1000, torch.randint(0, 10, (b,))
    report = treadfx.inspect(treadfx.transform(model, start=2, end=5, ratio=0.5), x, t, y)
    assert res["dense_flops"] == report.dense_flops and res["routed_flops"] == report.routed_flops
    assert res["flop_limit"] == pytest.approx(report.ideal_speedup, rel=1e-12)
    assert res["num_keep"] == 32 and res["num_tokens"] == 64


def test_speedups_are_ratios_of_reported_medians(step_result):
    res = step_result
    run = res["runs"][0]
    v = run["variants"]
    dense = v["dense"]["median_ms"]
    for name, r in v.items():
        assert r["speedup_vs_dense"] == pytest.approx(dense / r["median_ms"], rel=1e-12)
        if name == "dense":
            assert r["fraction_of_flop_limit"] is None
        else:
            assert r["fraction_of_flop_limit"] == pytest.approx(r["speedup_vs_dense"] / res["flop_limit"], rel=1e-12)
    assert run["ratios"]["treadfx_vs_reference"] == pytest.approx(
        v["reference"]["median_ms"] / v["treadfx"]["median_ms"], rel=1e-12)


def test_reference_and_treadfx_do_the_same_work_on_the_same_kept_tokens():
    wl = make_workload("tiny", "cpu", batch=4)
    model = wl.build()
    with torch.no_grad():  # adaLN-Zero init makes every block the identity; make every block matter
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    start, end, ratio = 2, 5, 0.5
    ref = ReferenceTread(model, start, end, ratio).train()
    tm = treadfx.transform(model, start=start, end=end, ratio=ratio).train()
    n = 64
    k = ref.num_keep(n)
    kept = torch.rand(4, n, generator=torch.Generator().manual_seed(7)).argsort(dim=1)[:, :k]
    ref.kept = kept
    torch.manual_seed(3)  # label dropout draws from the global RNG in both
    out_ref = ref(*wl.args)
    with treadfx.fixed_routes(tm, [kept]):
        torch.manual_seed(3)
        out_tfx = tm(*wl.args)
    torch.testing.assert_close(out_tfx, out_ref, rtol=0, atol=0)
    # and routing changes the output (the comparison is not vacuous)
    model.eval()
    assert not torch.equal(model(*wl.args), out_ref)
    # without given indices both draw K kept tokens per sample
    ref.kept = None
    tm(*wl.args)
    (record,) = treadfx.last_routes(tm)
    assert tuple(record.kept.shape) == (4, k) == (4, ref.select(4, n, torch.device("cpu")).shape[1])


def test_route_ops_runs_and_reports_every_implementation():
    res = _run("benchmarks.route_ops", "--device", "cpu", "--batch", "2", "--tokens", "16", "--dim", "64",
               "--steps", "2", "--warmup", "1", "--json")
    assert set(res["implementations"]) == {"treadfx", "gather_scatter", "index", "masked", "shared"}
    blk = res["block_fwd_bwd"]["median_ms"]
    for s in res["implementations"].values():
        assert s["relative_to_block"] == pytest.approx(s["median_ms"] / blk, rel=1e-12)
    assert res["config"]["keep"] == 8
    assert res["contiguity"]["treadfx_gather_output_contiguous"] is True


def test_route_ops_are_correct():
    from benchmarks.route_ops import IMPLEMENTATIONS, route_fn

    x = torch.randn(3, 16, 8, requires_grad=True)
    for name in IMPLEMENTATIONS:  # identity route: every token comes back unchanged, gradient flows
        out = route_fn(name, 16, 8)(x)
        torch.testing.assert_close(out, x, rtol=0, atol=0)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("argv, flag", [
    (["--ratio", "1.5"], "--ratio"), (["--steps", "0"], "--steps"), (["--model", "dit-z"], "--model"),
    (["--start", "40"], "--start"), (["--start", "6", "--end", "3"], "--start"),
    (["--model", "flux", "--variants", "reference"], "--variants"), (["--compile", "fast"], "--compile"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv + ["--device", "cpu"])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--experts", "0"], "--experts must be >= 1, got 0"), (["--steps", "two"], "--steps must be an integer, got 'two'"),
    (["--capacity", "0"], "--capacity must be > 0, got 0.0"), (["--ratio", "1"], "--ratio must be in [0, 1), got 1.0"),
])
def test_diffmoe_benchmark_bad_flags_exit_2_with_the_message(argv, message, capsys):
    from benchmarks.diffmoe_step import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "0"], "--ratio must be in (0, 1), got 0.0"), (["--ratio", "1"], "--ratio must be in (0, 1), got 1.0"),
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
])
def test_route_ops_bad_flags_exit_2_with_the_message(argv, message, capsys):
    from benchmarks.route_ops import parse_args as route_ops_args

    with pytest.raises(SystemExit) as e:
        route_ops_args(argv + ["--device", "cpu"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_diffmoe_benchmark_reports_dense_diffmoe_and_diffmoe_tread():
    from benchmarks.diffmoe_step import MODELS

    res = _run("benchmarks.diffmoe_step", "--model", "tiny", "--steps", "2", "--warmup", "1", "--json")
    v = res["variants"]
    assert list(v) == ["dense", "diffmoe", "diffmoe+tread"]
    for r in v.values():
        assert r["time_ratio"] == pytest.approx(r["median_ms"] / v["dense"]["median_ms"], rel=1e-12)
        assert r["flops_ratio"] == pytest.approx(r["flops_per_step"] / v["dense"]["flops_per_step"], rel=1e-12)
    # capacity 1.0: the experts together take every pool token once, so the activated parameters are the dense
    # ones plus, per converted layer (every other block), the router (D*E, no bias) and the predictor (D->D->E)
    d, e, depth = MODELS["tiny"]["hidden_size"], res["experts"], MODELS["tiny"]["depth"]
    extra = (depth // 2) * (d * e + d * d + d + d * e + e)
    assert v["dense"]["activated_params"] == v["dense"]["total_params"]
    assert v["diffmoe"]["activated_params"] == v["dense"]["total_params"] + extra
    assert v["diffmoe"]["total_params"] > v["diffmoe"]["activated_params"]  # E expert copies exist
    # routing halves the tokens of most blocks: fewer FLOPs than DiffMoE alone and than dense
    assert v["diffmoe+tread"]["flops_per_step"] < v["dense"]["flops_per_step"] < v["diffmoe"]["flops_per_step"]


# --- the quick GPU check (benchmarks/gpu_quick.py, `bash benchmarks/run_gpu.sh --quick`), smoke-run on CPU ---

RUN_GPU = ROOT / "benchmarks" / "run_gpu.sh"


def _run_gpu_sh(*flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run(["bash", str(RUN_GPU), *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    proc = _run_gpu_sh("--quick", "--device", "cpu", "--tiny", "--backend", "none", "--models", "dit-xl2",
                       "--steps", "3", "--warmup", "1", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, out


def test_quick_run_writes_dit_xl2_json_in_the_full_runs_format(quick_run):
    stdout, out = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["dit-xl2.json", "quick.json", "quick.txt"]
    res = json.loads((out / "dit-xl2.json").read_text())
    c = res["config"]
    assert res["benchmark"] == "treadfx.step" and res["quick"] is True
    assert (c["model"], c["batch"], c["steps"], c["warmup"], c["order"]) == ("dit-xl2", 2, 3, 1, "interleaved")
    assert (c["start"], c["end"], c["ratio"]) == (2, c["depth"] - 4, 0.5) and c["official_fp32"] is True
    (run,) = res["runs"]
    assert run["compile"] == "none" == c["compile"]
    v = run["variants"]
    assert list(v) == ["dense", "treadfx", "reference", "reference_fp32"] and res["skipped"] == {}
    dense = v["dense"]["median_ms"]
    for name, r in v.items():
        missing = [f for f in VARIANT_FIELDS if f not in r]
        assert not missing, f"{name} lacks {missing}"
        assert r["name"] == name
        assert r["n"] == 3 and len(r["times_ms"]) == 3 and len(r["warmup_ms"]) == 1
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]), rel=1e-12)
        assert r["speedup_vs_dense"] == pytest.approx(dense / r["median_ms"], rel=1e-12)
        assert (r["transform_s"] is not None) == (name == "treadfx")
        assert r["recompiles_after_warmup"] == 0 and r["compiles_after_warmup"] == 0  # nothing is compiled
    assert run["ratios"]["treadfx_vs_reference"] == pytest.approx(
        v["reference"]["median_ms"] / v["treadfx"]["median_ms"], rel=1e-12)
    assert res["flop_limit"] == pytest.approx(res["dense_flops"] / res["routed_flops"], rel=1e-12)
    # every stage ran, was timed, and printed its elapsed time
    assert [s["status"] for s in res["stages"]] == ["done"] * 6
    for s in res["stages"]:
        assert f"done {s['name']} in {s['elapsed_s']:.1f} s" in stdout
    assert (out / "quick.txt").read_text() == stdout


def test_quick_run_targets_follow_from_the_reported_numbers(quick_run):
    stdout, out = quick_run
    res = json.loads((out / "dit-xl2.json").read_text())
    v = res["runs"][0]["variants"]
    t = res["targets"]
    assert t["speedup"]["value"] == v["treadfx"]["speedup_vs_dense"]
    assert t["speedup"]["pass"] == (v["treadfx"]["speedup_vs_dense"] >= 1.61)
    assert t["peak_memory"]["pass"] == (v["treadfx"]["peak_memory_bytes"] <= v["dense"]["peak_memory_bytes"])
    assert t["recompiles"]["pass"] is True
    verdict = {True: "PASS", False: "FAIL"}
    for key in ("speedup", "peak_memory", "recompiles"):
        assert f"TARGET dit-xl2 {key} ({t[key]['bar']}): {verdict[t[key]['pass']]}" in stdout
    summary = json.loads((out / "quick.json").read_text())
    assert summary["targets"] == {"dit-xl2": t} and summary["files"] == ["dit-xl2.json"]
    assert summary["stages"] == res["stages"]


def test_quick_run_skips_every_stage_that_would_overrun_the_budget(tmp_path):
    proc = _run_gpu_sh("--quick", "--device", "cpu", "--tiny", "--budget-s", "0.5", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("dit-b2", "dit-xl2"):
        assert f"SKIP {name} setup (build the model once, treadfx.inspect FLOPs): estimated" in proc.stdout
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert [s["status"] for s in res["stages"]] == ["skipped"]
        assert "past --budget-s 0.5" in res["stages"][0]["reason"]
        fp32 = ("reference_fp32",) if name == "dit-xl2" else ()
        assert set(res["skipped"]) == {"dense", "treadfx", "reference", *fp32}
        assert all(t["pass"] is None for t in res["targets"].values())
        assert f"TARGET {name} speedup (>= {1.34 if name == 'dit-b2' else 1.61}x): NOT MEASURED" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "0"], "--budget-s must be > 0, got 0.0"), (["--budget-s", "soon"], "--budget-s must be a number"),
    (["--steps", "0"], "--steps must be >= 1, got 0"), (["--warmup", "x"], "--warmup must be an integer, got 'x'"),
    (["--models", "dit-z"], "--models: unknown ['dit-z']"), (["--models", ","], "--models: unknown empty list"),
    (["--backend", "fast"], "--backend"), (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_quick_bad_flags_exit_2_naming_the_flag(argv, message, capsys):
    from benchmarks.gpu_quick import parse_args as quick_args

    with pytest.raises(SystemExit) as e:
        quick_args(argv + ["--device", "cpu"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_quick_device_cuda_without_cuda_exits_2(capsys):
    from benchmarks.gpu_quick import parse_args as quick_args

    with pytest.raises(SystemExit) as e:
        quick_args(["--device", "cuda"])
    assert e.value.code == 2
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err


def test_run_gpu_sh_rejects_flags_of_the_full_run_and_bad_quick_flags():
    proc = _run_gpu_sh("--steps", "3")
    assert proc.returncode == 2 and "unknown argument '--steps': the full run takes no arguments" in proc.stderr
    assert proc.stdout == ""  # refused before anything ran
    proc = _run_gpu_sh("--quick", "--device", "cpu", "--budget-s", "-1")
    assert proc.returncode == 2 and "--budget-s must be > 0, got -1.0" in proc.stderr


def test_round_robin_rotates_the_order_every_round():
    from benchmarks.gpu_quick import time_round_robin
    from benchmarks.step import Prepared
    from benchmarks.timing import DynamoCounts

    calls: list[str] = []
    prepared = [Prepared(n, (lambda n=n: calls.append(n)), [], None, None, [1.0], DynamoCounts(0, 0, 0, 0))
                for n in "abc"]
    out = time_round_robin(prepared, 4, torch.device("cpu"))
    assert calls == list("abc" "bca" "cab" "abc")
    assert all(len(out[n]["times"]) == 4 and out[n]["step_peak"] is None for n in "abc")


def test_budget_skips_runs_reserves_time_for_required_stages_and_survives_errors(capsys):
    import time

    from benchmarks.gpu_quick import Budget

    b = Budget(budget_s=100.0, grace_s=10.0, t0=time.time())
    ran = []
    assert b.stage("fits", 5.0, lambda: ran.append("fits") or 7) == 7
    assert b.stage("too long", 200.0, lambda: ran.append("too long")) is None
    assert b.stage("optional", 5.0, lambda: ran.append("optional"), reserve_s=99.0) is None
    def fails():
        raise ValueError("boom\nsecond line")

    assert b.stage("fails", 1.0, fails) is None  # recorded, and the run goes on
    assert b.stage("after", 1.0, lambda: ran.append("after") or 8) == 8
    assert ran == ["fits", "after"]
    assert [s["status"] for s in b.stages] == ["done", "skipped", "skipped", "error", "done"]
    assert b.stages[3]["reason"] == "ValueError: boom"
    out = capsys.readouterr().out
    assert "SKIP too long: estimated 200 s would end at 200 s, past --budget-s 100" in out
    assert "SKIP optional: estimated 5 s + 99 s kept for the stages that answer the targets" in out


def test_budget_hard_stop_aborts_a_stage_and_skips_the_rest():
    import threading
    import time

    from benchmarks.gpu_quick import Budget

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the hard stop uses SIGALRM, which only the main thread receives")
    b = Budget(budget_s=0.2, grace_s=0.2, t0=time.time())
    assert b.stage("runs over", 0.0, lambda: time.sleep(30)) is None
    assert b.stages[-1]["status"] == "aborted" and b.stages[-1]["elapsed_s"] < 5
    assert b.stage("later", 0.0, lambda: 1) is None
    assert b.stages[-1]["status"] == "skipped" and "hard stop" in b.stages[-1]["reason"]


def test_estimates_scale_measured_builds_and_steps():
    from benchmarks.gpu_quick import SAFETY, Estimates

    est = Estimates(tiny=False, steps=20)
    est.build_s["dit-b2"] = {"dense": 60.0, "treadfx": 40.0}
    est.step_s["dit-b2"] = {"dense": 0.10, "treadfx": 0.07}
    assert est.build("dit-b2") == pytest.approx(SAFETY * 60.0)  # same model: the slowest build
    assert est.build("dit-xl2") == pytest.approx(SAFETY * 50.0 * 28 / 12)  # other model: mean build x depth
    cost = (28 * 1152**2 * 128) / (12 * 768**2 * 256)
    assert est.timing("dit-xl2", ["dense", "treadfx"]) == pytest.approx(SAFETY * 20 * 2 * 0.10 * cost + 1.0)
    assert est.timing("dit-b2", ["dense", "treadfx", "reference"]) == pytest.approx(
        SAFETY * 20 * (0.10 + 0.07 + 0.10) + 1.0)


def test_dynamo_counts_see_recompiles_and_compilations(fresh_dynamo):
    from benchmarks.timing import DynamoCounts

    class Flagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.double = False

        def forward(self, x):
            return x * 2 if self.double else x + 1

    m = Flagged()
    f = torch.compile(m, backend="eager")
    c0 = DynamoCounts.now()
    f(torch.randn(3))
    c1 = DynamoCounts.now()
    f(torch.randn(3))  # same guards: no compilation
    c2 = DynamoCounts.now()
    m.double = True  # the guard on the attribute fails: a recompilation
    f(torch.randn(3))
    c3 = DynamoCounts.now()
    assert (c1 - c0).compiles == 1 and (c1 - c0).recompiles == 0
    assert (c2 - c1).compiles == 0 and (c2 - c1).recompiles == 0
    assert (c3 - c2).compiles == 1 and (c3 - c2).recompiles == 1
