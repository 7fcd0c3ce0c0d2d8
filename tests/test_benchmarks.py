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
