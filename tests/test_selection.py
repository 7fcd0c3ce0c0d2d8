"""Selection options: seeds, token order, ratio schedules, and routing guidance."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given, strategies as st
from torch._dynamo.utils import counters

import treadfx
import treadfx.ops
from treadfx.models.dit import DiT
from treadfx.ops import RouteSelect, hashed_keys

from helpers import tiny_dit, tiny_dit_inputs


def small_dit(seed: int = 0) -> DiT:
    return tiny_dit(depth=5, seed=seed)


def inputs(batch: int = 3):
    return tiny_dit_inputs(batch, seed=11)


def kept_sequence(tm, steps: int, batch: int = 3):
    out = []
    for _ in range(steps):
        tm(*inputs(batch))
        out.append([r.kept.clone() for r in treadfx.last_routes(tm)])
    return out


def test_seeded_selection_is_reproducible_and_advances_per_forward():
    a = kept_sequence(treadfx.transform(small_dit(), routes=[(0, 1, 0.5), (3, 4, 0.25)], seed=3), 4)
    torch.manual_seed(12345)  # the global RNG plays no part
    b = kept_sequence(treadfx.transform(small_dit(), routes=[(0, 1, 0.5), (3, 4, 0.25)], seed=3), 4)
    c = kept_sequence(treadfx.transform(small_dit(), routes=[(0, 1, 0.5), (3, 4, 0.25)], seed=4), 4)
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    assert not torch.equal(a[0][0], a[1][0])  # each forward draws anew
    assert not torch.equal(a[0][0], c[0][0])  # another seed, another sequence
    assert not torch.equal(a[0][0][:, :4], a[0][1][:, :4])  # routes of one forward differ


@pytest.mark.usefixtures("fresh_dynamo")
def test_seeded_selection_compiles_once_and_matches_eager():
    eager = kept_sequence(treadfx.transform(small_dit(), start=1, end=3, seed=9), 3)
    tm = treadfx.transform(small_dit(), start=1, end=3, seed=9)
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    compiled = []
    for _ in range(3):
        cm(*inputs())
        compiled.append([r.kept.clone() for r in treadfx.last_routes(tm)])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(eager, compiled))
    assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}


@given(st.integers(0, 2**31), st.integers(0, 10**6), st.integers(1, 4), st.integers(2, 64))
def test_hashed_keys_are_a_pure_function_of_seed_step_and_position(seed, step, rows, cols):
    s = torch.tensor(step)
    k1 = hashed_keys(seed, s, rows, cols, "cpu")
    k2 = hashed_keys(seed, s, rows, cols, "cpu")
    assert torch.equal(k1, k2) and k1.dtype == torch.int64
    assert int(k1.min()) >= 0 and int(k1.max()) < 2**32
    assert k1.unique().numel() >= rows * cols - 1  # (almost) no ties: a usable permutation key


def test_hashed_keys_are_roughly_uniform():
    keys = torch.cat([hashed_keys(7, torch.tensor(s), 4, 256, "cpu").flatten() for s in range(50)]).double() / 2**32
    hist = torch.histc(keys, bins=10, min=0, max=1)
    expected = keys.numel() / 10
    assert float(((hist - expected) ** 2 / expected).sum()) < 40  # chi-square, 9 d.o.f.: p << 1e-4 if it fails


def seeded_draw(monkeypatch, seed: int, route: int, rank: int, step: int = 0) -> torch.Tensor:
    """The kept indices a seeded RouteSelect of route ``route`` draws on distributed rank ``rank``."""
    monkeypatch.setattr(treadfx.ops, "_rank", lambda: rank)
    sel = RouteSelect(route, num_tokens=64, num_keep=16, sorted_order=False, shared=False, seed=seed)
    sel.forced = True
    return sel(torch.zeros(2, 64, 1), step=torch.tensor(step))


def test_seed_route_and_rank_are_hashed_together_not_added(monkeypatch):
    # an additive mix (seed + route + (rank << 20)) made each of these pairs draw the same tokens
    assert not torch.equal(seeded_draw(monkeypatch, 4, 0, 0), seeded_draw(monkeypatch, 3, 1, 0))
    assert not torch.equal(seeded_draw(monkeypatch, 2**20, 0, 0), seeded_draw(monkeypatch, 0, 0, 1))
    assert not torch.equal(seeded_draw(monkeypatch, 0, 0, 0), seeded_draw(monkeypatch, 2**32, 0, 0))
    assert torch.equal(seeded_draw(monkeypatch, 5, 2, 3, step=7), seeded_draw(monkeypatch, 5, 2, 3, step=7))


_streams = st.tuples(st.integers(0, 2**40), st.integers(0, 8), st.integers(0, 3), st.integers(0, 1000))


@given(_streams, _streams)
def test_distinct_seed_route_rank_step_give_distinct_keys(a, b):
    assume(a != b)
    ka = hashed_keys(a[0], torch.tensor(a[3]), 1, 16, "cpu", route=a[1], rank=a[2])
    kb = hashed_keys(b[0], torch.tensor(b[3]), 1, 16, "cpu", route=b[1], rank=b[2])
    assert not torch.equal(ka, kb)


#: kept tokens of 16 for each ratio, by hand: 16 - floor(16 * ratio)
KEPT_OF_16 = {0.25: 12, 0.5: 8, 0.75: 4}


@given(st.integers(1, 4), st.sampled_from(sorted(KEPT_OF_16)))
def test_sorted_order_keeps_relative_order(batch, ratio):
    tm = treadfx.transform(small_dit(), start=1, end=3, ratio=ratio, order="sorted")
    tm(*inputs(batch))
    (rec,) = treadfx.last_routes(tm)
    assert torch.equal(rec.kept, rec.kept.sort(dim=1).values)
    assert rec.kept.shape == (batch, KEPT_OF_16[ratio])
    assert all(row.unique().numel() == row.numel() for row in rec.kept)


def test_ratio_schedule_values_off_switch_and_quantisation():
    tm = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)
    sched = treadfx.RatioSchedule(tm, total_steps=100, kind="linear", start=0.5, end=0.25, off_after=0.9, quantum=0.05)
    assert sched.ratio_at(0) == pytest.approx(0.5)
    assert sched.ratio_at(99 // 2) == pytest.approx(0.4)  # 0.5 - 0.25*0.4949 = 0.376 -> 0.4 after rounding
    assert sched.ratio_at(89) == pytest.approx(0.3)  # 0.5 - 0.25*89/99 = 0.275 -> 0.3
    assert sched.ratio_at(90) == 0.0  # off for the last 10 %
    cos = treadfx.RatioSchedule(tm, total_steps=11, kind="cosine", start=0.6, end=0.2, quantum=0)
    assert cos.ratio_at(0) == pytest.approx(0.6) and cos.ratio_at(10) == pytest.approx(0.2)
    assert cos.ratio_at(5) == pytest.approx(0.4)
    values = {sched.ratio_at(s) for s in range(100)}
    assert len(values) <= 7  # 0.5 .. 0.25 in steps of 0.05, plus 0


@pytest.mark.parametrize("route", [1, -1, True, "0"])
def test_ratio_schedule_rejects_a_route_the_model_does_not_have(route):
    tm = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)  # one route
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            f"route={route!r} but the model has 1 route(s). Fix: pass route=None (every route) or an index in 0..0.")):
        treadfx.RatioSchedule(tm, total_steps=10, route=route)


@pytest.mark.usefixtures("fresh_dynamo")
def test_ratio_schedule_drives_the_model_without_a_graph_per_value():
    tm = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    sched = treadfx.RatioSchedule(tm, total_steps=40, kind="linear", start=0.5, end=0.3, off_after=0.8, quantum=0.1)
    seen_k = set()
    for _ in range(40):
        r = sched.step()
        cm(*inputs())
        recs = treadfx.last_routes(tm)
        seen_k.add(recs[0].kept.shape[1] if recs else 16)
        assert math.isclose(tm._treadfx.config.routes[0].ratio, r)
    assert seen_k == {8, 10, 12, 16}  # ratios 0.5, 0.4, 0.3 and off
    assert counters["stats"]["unique_graphs"] == len(seen_k)
    state = sched.state_dict()
    again = treadfx.RatioSchedule(tm, total_steps=40, kind="linear", start=0.5, end=0.3, off_after=0.8, quantum=0.1)
    again.load_state_dict(state)
    assert again.current_step == 40 and again.step() == 0.0


def test_routing_guidance_combines_two_forced_forwards():
    tm = treadfx.transform(small_dit(), start=1, end=3).eval()
    x, t, y = inputs()
    kept = [torch.rand(3, 16).argsort(1)[:, :8]]
    with treadfx.fixed_routes(tm, kept):
        g = treadfx.routing_guidance(tm, x, t, y, scale=2.5, rate=0.5)
        with treadfx.force_routing(tm, 0.5):
            weak = tm(x, t, y)
    strong = tm(x, t, y)  # eval: the original model
    assert torch.allclose(g, weak + 2.5 * (strong - weak))
    with treadfx.fixed_routes(tm, kept):
        torch.testing.assert_close(treadfx.routing_guidance(tm, x, t, y, scale=1.0, rate=0.5), strong)
        assert torch.equal(treadfx.routing_guidance(tm, x, t, y, scale=0.0, rate=0.5), weak)


@pytest.mark.usefixtures("fresh_dynamo")
def test_routing_guidance_in_a_compiled_sampling_loop_compiles_once_per_rate():
    tm = treadfx.transform(small_dit(), start=1, end=3).eval()
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    x, _, y = inputs()
    with torch.no_grad():
        for step in range(6):
            t = torch.full((3,), 1.0 - step / 6)
            v = treadfx.routing_guidance(cm, x, t, y, scale=1.5, rate=0.5, base_rate=0.25)
            x = x - v[:, :4] / 6  # learn_sigma: the first 4 channels are the prediction
    assert counters["stats"]["unique_graphs"] == 2  # one per rate (0.5 and 0.25)
    assert dict(counters["graph_break"]) == {}


class _AnyLength(torch.nn.Module):
    """Token model that takes any token count: embed, four residual MLP blocks, head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(4, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16))
                                          for _ in range(4))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def test_fixed_routes_fit_one_of_several_cached_signatures():
    tm = treadfx.transform(_AnyLength(), start=1, end=2, ratio=0.5, selection="per_sample").train()
    short, long = torch.randn(2, 8, 4), torch.randn(2, 16, 4)
    tm(short), tm(long)  # both signatures traced and cached
    kept = torch.rand(2, 16).argsort(1)[:, :8]  # indices for the 16-token signature only
    with treadfx.fixed_routes(tm, [kept]):
        tm(long)
        assert torch.equal(treadfx.last_routes(tm)[0].kept, kept)
        with pytest.raises(treadfx.TokenCountError, match="between 1 and 8 of the 8 image tokens"):
            tm(short)
    with pytest.raises(treadfx.TokenCountError, match="between 1 and"):
        with treadfx.fixed_routes(tm, [torch.full((2, 8), 99)]):  # fits no cached signature
            pass
