"""The demo (``python -m treadfx demo``): data, objective, evaluation, sampler, a short end-to-end run, the CLI."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torch.nn.functional as F

import treadfx
from treadfx import demo
from treadfx.models.dit import DiT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_dit(seed: int = 0, zero_init: bool = True) -> DiT:
    """The ``--size tiny`` demo model, built here independently of ``demo.build_model``."""
    torch.manual_seed(seed)
    return DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=2, num_classes=10,
               class_dropout_prob=0.1, learn_sigma=False, zero_init=zero_init)


@pytest.fixture(scope="module")
def data():
    return demo.load_digits_dataset(16)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """``python -m treadfx demo --steps 3 --size tiny --batch 8 --json`` through ``main``."""
    png = tmp_path_factory.mktemp("demo") / "out.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = demo.main(["--steps", "3", "--size", "tiny", "--batch", "8", "--json", "--quiet", "--sample-steps", "4",
                        "--out", str(png)])
    assert rc == 0
    return json.loads(buf.getvalue()), png


# ---------------------------------------------------------------------------------------------------- data


def test_dataset_is_scaled_digits_with_a_fixed_disjoint_split(data):
    from sklearn.datasets import load_digits

    x_tr, y_tr, x_te, y_te = data
    assert x_tr.shape == (1500, 1, 16, 16) and x_te.shape == (297, 1, 16, 16)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) == set(range(10))
    for x in (x_tr, x_te):
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0 and x.max() > 0.9

    # at native resolution the split is a partition of sklearn's (image, label) pairs, scaled 0..16 -> -1..1
    r_tr, l_tr, r_te, l_te = demo.load_digits_dataset(8)
    d = load_digits()
    ref = torch.as_tensor(d.images, dtype=torch.float32) * (2.0 / 16.0) - 1.0
    key = lambda img, lab: (img.reshape(-1).numpy().round(5).tobytes(), int(lab))  # noqa: E731
    full = collections.Counter(key(i, l) for i, l in zip(ref, d.target))
    train = collections.Counter(key(i[0], l) for i, l in zip(r_tr, l_tr))
    test = collections.Counter(key(i[0], l) for i, l in zip(r_te, l_te))
    assert train + test == full and len(r_tr) + len(r_te) == 1797

    # 16x16 is the bilinear upsampling of the 8x8 images, same split order
    up = F.interpolate(torch.cat([r_tr, r_te]), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.cat([x_tr, x_te]), up, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([y_tr, y_te]), torch.cat([l_tr, l_te]))

    # deterministic; another split seed gives another split
    again = demo.load_digits_dataset(16)
    assert all(torch.equal(a, b) for a, b in zip(data, again))
    other = demo.load_digits_dataset(16, split_seed=1)
    assert not torch.equal(other[3], y_te)


def test_heldout_batch_is_fixed():
    x, y = torch.zeros(5, 1, 4, 4), torch.arange(5)
    a, b = demo.make_heldout(x, y), demo.make_heldout(x, y)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["noise"].shape == x.shape and ((a["t"] > 0) & (a["t"] < 1)).all()
    assert not torch.equal(a["noise"], demo.make_heldout(x, y, seed=7)["noise"])


# ---------------------------------------------------------------------------------------------------- objective


class Recorder(nn.Module):
    """Returns 2 * x_t + t / 1000 and remembers what it was called with."""

    def forward(self, xt, t, y):
        self.seen = (xt.clone(), t.clone(), y.clone())
        return 2 * xt + (t / 1000)[:, None, None, None]


def test_rectified_flow_loss_equals_a_hand_computation():
    x0 = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 0.0]]]])  # [2, 1, 1, 2]
    eps = torch.tensor([[[[0.0, 2.0]]], [[[-1.0, 1.0]]]])
    t = torch.tensor([0.25, 1.0])
    y = torch.tensor([3, 7])
    m = Recorder()
    loss = demo.rectified_flow_loss(m, x0, y, eps, t)
    # x_t = (1 - t) x0 + t eps, by hand
    xt = [[0.75 * 1.0 + 0.25 * 0.0, 0.75 * -1.0 + 0.25 * 2.0], [0.0 * 0.5 + 1.0 * -1.0, 0.0 * 0.0 + 1.0 * 1.0]]
    assert m.seen[0].reshape(2, 2).tolist() == xt
    assert m.seen[1].tolist() == [250.0, 1000.0] and m.seen[2].tolist() == [3, 7]
    # pred = 2 x_t + t, target v = eps - x0
    preds = [[2 * xt[0][0] + 0.25, 2 * xt[0][1] + 0.25], [2 * xt[1][0] + 1.0, 2 * xt[1][1] + 1.0]]
    v = [[0.0 - 1.0, 2.0 + 1.0], [-1.0 - 0.5, 1.0 - 0.0]]
    expected = sum((p - q) ** 2 for pr, vr in zip(preds, v) for p, q in zip(pr, vr)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_heldout_loss_is_the_original_model_in_eval_and_restores_the_mode(data):
    _, _, x_te, y_te = data
    ho = demo.make_heldout(x_te[:40], y_te[:40])
    m = tiny_dit(zero_init=False)  # nonzero adaLN gates: routing changes the output
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5, seed=0).train()
    a, b = demo.heldout_loss(m, ho), demo.heldout_loss(tm, ho)
    assert a == b  # eval is the original model, bit for bit
    assert tm.training and all(mod.training for mod in tm.modules())
    assert demo.heldout_loss(tm, ho, batch_size=7) == pytest.approx(a, rel=1e-5)
    # ... while in train mode the routed model computes something else: the evaluation really is eval mode
    torch.manual_seed(0)
    routed = demo.rectified_flow_loss(tm, ho["x0"], ho["y"], ho["noise"], ho["t"]).item()
    assert abs(routed - a) > 1e-4


# ---------------------------------------------------------------------------------------------------- sampler


class ConstVelocity(nn.Module):
    """v(x, t, y) = y (as a float), whatever x and t: Euler from noise ends at noise - y exactly."""

    def forward(self, x, t, y):
        return y.float()[:, None, None, None].expand_as(x)


def test_sampler_integrates_the_velocity_from_noise_to_data_with_cfg():
    noise = torch.randn(4, 1, 3, 3)
    labels = torch.tensor([0, 1, 2, 9])
    out = demo.sample(ConstVelocity(), labels, noise, steps=7, cfg_scale=1.0)
    torch.testing.assert_close(out, noise - labels.float()[:, None, None, None], rtol=0, atol=1e-5)
    # CFG: v = v(null) + s (v(label) - v(null)) with null label 10
    out = demo.sample(ConstVelocity(), labels, noise, steps=5, cfg_scale=3.0, null_label=10)
    v = 10 + 3.0 * (labels.float() - 10)
    torch.testing.assert_close(out, noise - v[:, None, None, None], rtol=0, atol=1e-4)


def test_sampler_on_a_dit_is_finite_deterministic_and_restores_the_mode():
    m = tiny_dit(zero_init=False).train()
    noise = torch.randn(6, 1, 16, 16)
    labels = torch.arange(6)
    a = demo.sample(m, labels, noise, steps=3, cfg_scale=2.0)
    b = demo.sample(m, labels, noise, steps=3, cfg_scale=2.0)
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    assert m.training


# ---------------------------------------------------------------------------------------------------- end to end


def test_short_run_reports_inspect_flops_and_equal_starts(short_run, data):
    res, png = short_run
    assert res["dense"]["steps"] == 3 and res["tread"]["steps"] == 3
    assert res["route"]["start"] == 1 and res["route"]["end"] == 2 and res["route"]["depth"] == 4
    assert res["route"]["num_tokens"] == 64 and res["route"]["num_keep"] == 32

    # FLOPs per step are what treadfx.inspect says for this model at this batch, computed here
    tm = treadfx.transform(tiny_dit(), start=1, end=-2, ratio=0.5)
    rep = treadfx.inspect(tm, torch.randn(8, 1, 16, 16), torch.rand(8) * 1000, torch.randint(0, 10, (8,)))
    assert res["flops"]["dense"] == rep.dense_flops and res["flops"]["routed"] == rep.routed_flops
    assert res["flops"]["routed"] < res["flops"]["dense"]

    # both runs start from the seed-0 weights: same held-out loss at step 0 as a model built here
    _, _, x_te, y_te = data
    expected = demo.heldout_loss(tiny_dit(), demo.make_heldout(x_te, y_te))
    assert res["dense"]["init_loss"] == res["tread"]["init_loss"] == expected
    assert res["dense"]["init_checksum"] == res["tread"]["init_checksum"]
    for run in (res["dense"], res["tread"]):
        assert run["curve"][0] == [0.0, 0, run["init_loss"]] and run["curve"][-1][1] == 3
        assert run["final_loss"] == run["curve"][-1][2] and run["final_loss"] < run["init_loss"]
        assert run["median_step_s"] > 0

    # same data order: adaLN-Zero blocks start as the identity, so the first routed step computes the dense loss
    assert res["dense"]["train_losses"][0] == pytest.approx(res["tread"]["train_losses"][0], abs=1e-6)
    # equal steps: both evaluated at the larger step count (here both ran 3)
    assert res["equal_steps"]["step"] == 3
    assert res["equal_steps"]["dense"] == res["dense"]["final_loss"]
    assert res["equal_steps"]["tread"] == res["tread"]["final_loss"]

    assert res["png"] == str(png)
    raw = png.read_bytes()
    assert raw[:8] == PNG_MAGIC and len(raw) > 1000


def test_time_budget_counts_training_only_and_table_shows_it(data):
    cfg = demo.DemoConfig(seconds=1.0, size="tiny", batch=8, out=None, progress=False, eval_points=3, threads=1)
    before = torch.get_num_threads()
    res = demo.run_demo(cfg)
    assert torch.get_num_threads() == before and res["threads"] == 1 and "1 torch thread" in res["device"]
    for run in (res["dense"], res["tread"]):
        assert run["steps"] >= 1
        # its clock is its own steps only, and it stopped because one more step (median of its last 5) would
        # have passed its 1 s budget
        assert len(run["step_times"]) == run["steps"] and run["clock_s"] == pytest.approx(sum(run["step_times"]))
        assert run["clock_s"] + _median(run["step_times"][-5:]) > 1.0
        clocks = [p[0] for p in run["curve"]]
        assert clocks == sorted(clocks) and clocks[-1] == run["clock_s"]
        assert len(run["curve"]) <= 3 + 3  # start, ~eval_points periodic, end
    assert res["equal_steps"]["step"] == max(res["dense"]["steps"], res["tread"]["steps"])
    assert res["png"] is None
    table = demo.format_table(res)
    assert "steps done" in table and f"{res['dense']['steps']}" in table
    assert f"{res['flops']['dense'] / 1e9:.2f} G" in table and f"equal steps ({res['equal_steps']['step']})" in table


# ---------------------------------------------------------------------------------------------------- schedule


def fake_runs(costs: dict[str, list[float]]):
    """Step functions that advance a fake clock by the next listed cost; the clock is ``now[0]``."""
    now = [0.0]
    taken = {n: 0 for n in costs}

    def stepper(name):
        def step():
            now[0] += costs[name][taken[name]]
            taken[name] += 1
        return step

    return now, {n: stepper(n) for n in costs}


def test_interleave_alternates_and_charges_each_run_only_its_own_step_time():
    now, fns = fake_runs({"dense": [3.0] * 10, "tread": [2.0] * 10})
    evals = []

    def after_step(name, step, clock):  # an expensive evaluation: on the fake clock, but charged to nobody
        evals.append((name, step, clock))
        now[0] += 100.0

    res = demo.interleave(fns, seconds=10.0, steps=None, clock=lambda: now[0], after_step=after_step)
    # by hand: the run whose own clock is behind goes next (ties: dense); a run stops before a step that would
    # pass 10 s (dense at 9 s: 9 + 3 > 10; TREAD at 10 s)
    assert res["order"] == ["dense", "tread", "tread", "dense", "tread", "dense", "tread", "tread"]
    assert res["step_times"] == {"dense": [3.0] * 3, "tread": [2.0] * 5}
    assert res["clock"] == {"dense": 9.0, "tread": 10.0}
    assert evals == [("dense", 1, 3.0), ("tread", 1, 2.0), ("tread", 2, 4.0), ("dense", 2, 6.0), ("tread", 3, 6.0),
                     ("dense", 3, 9.0), ("tread", 4, 8.0), ("tread", 5, 10.0)]


def test_interleave_with_equal_step_times_strictly_alternates_and_honours_a_step_cap():
    now, fns = fake_runs({"a": [1.0] * 10, "b": [1.0] * 10})
    res = demo.interleave(fns, seconds=None, steps=4, clock=lambda: now[0])
    assert res["order"] == ["a", "b"] * 4 and res["clock"] == {"a": 4.0, "b": 4.0}
    with pytest.raises(ValueError, match="time budget"):
        demo.interleave(fns, seconds=None, steps=None)


@settings(max_examples=60)
@given(st.lists(st.floats(0.1, 3.0), min_size=40, max_size=40), st.lists(st.floats(0.1, 3.0), min_size=40, max_size=40),
       st.floats(0.5, 20.0), st.floats(0.0, 50.0))
def test_interleave_schedule_properties(cost_a, cost_b, seconds, eval_cost):
    costs = {"a": cost_a, "b": cost_b}
    now, fns = fake_runs(costs)
    trace = []

    def after_step(name, step, clock):
        trace.append((name, clock))
        now[0] += eval_cost

    res = demo.interleave(fns, seconds=seconds, steps=None, clock=lambda: now[0], after_step=after_step)
    for n in costs:
        k = len(res["step_times"][n])
        # charged exactly its own step costs, in order (never the other run's steps or the evaluations)
        assert res["step_times"][n] == pytest.approx(costs[n][:k], abs=1e-9)
        assert res["clock"][n] == pytest.approx(sum(costs[n][:k]), abs=1e-9)
        # it stopped exactly when one more step (median of the last 5) would pass the budget
        assert k >= 1 and res["clock"][n] + _median(costs[n][max(0, k - 5):k]) > seconds
        prev = sum(costs[n][:k - 1])
        assert k == 1 or prev + _median(costs[n][max(0, k - 6):k - 1]) <= seconds
    # whoever stepped was not ahead of a run that still had steps to take
    clocks = {"a": 0.0, "b": 0.0}
    left = {n: len(res["step_times"][n]) for n in costs}
    for name, clock in trace:
        other = "b" if name == "a" else "a"
        if left[other] > 0:
            assert clocks[name] <= clocks[other] + 1e-9
        clocks[name], left[name] = clock, left[name] - 1


def _median(xs):
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def test_runs_see_the_same_batches_and_label_dropout_whatever_the_interleaving(data):
    cfg = demo.DemoConfig(steps=3, size="tiny", batch=8, out=None, progress=False).resolved()
    runs = [demo.Run(f"r{i}", tiny_dit(zero_init=False), data[:2], cfg) for i in range(2)]
    torch.manual_seed(99)
    runs[0].step()
    torch.rand(17)  # someone else draws from the global RNG between the steps
    runs[1].step()
    runs[1].step()
    outer = torch.get_rng_state()
    runs[0].step()
    assert torch.equal(torch.get_rng_state(), outer)  # a step leaves the caller's RNG as it was
    assert runs[0].train_losses == runs[1].train_losses
    assert all(torch.equal(a, b) for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()))


@pytest.mark.parametrize("cores, load, expected", [(1, 0.0, 1), (2, 0.0, 1), (2, 5.0, 1), (4, 0.0, 2), (16, 0.0, 8),
                                                   (16, 13.5, 2), (16, 40.0, 1), (64, 0.0, 8)])
def test_auto_threads_never_puts_two_threads_on_two_cores(cores, load, expected):
    assert demo.auto_threads(cores, load) == expected


def test_speed_label_says_faster_or_slower_with_a_ratio_above_one(short_run):
    assert demo.speed_label(0.2, 0.1) == "2.00x faster"
    assert demo.speed_label(0.1, 0.125) == "1.25x slower"
    res = json.loads(json.dumps(short_run[0]))
    res["dense"]["median_step_s"], res["tread"]["median_step_s"] = 0.1, 0.125
    assert "1.25x slower" in demo.format_table(res) and "faster" not in demo.format_table(res)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "treadfx", "demo", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--seconds", "--steps", "--batch", "--size", "--depth", "--hidden", "--ratio", "--start", "--end",
                 "--device", "--threads", "--seed", "--out", "--no-plot", "--json", "--quiet"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize("argv, needle", [
    (["--ratio", "1.5"], "--ratio"),
    (["--seconds", "0"], "--seconds"),
    (["--steps", "0"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--depth", "2"], "--depth"),
    (["--hidden", "100", "--heads", "3"], "--hidden"),
    (["--start", "9"], "--start"),
    (["--start", "5", "--end", "2"], "--start"),
    (["--device", "tpu"], "--device"),
    (["--size", "huge"], "--size"),
    (["--threads", "0"], "--threads"),
])
def test_bad_flags_exit_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv + ["--quiet", "--no-plot"])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
