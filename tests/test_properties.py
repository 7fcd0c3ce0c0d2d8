"""Property-based graph tests over random DiT configurations and random routes.

Each test draws a DiT (depth, width, heads, patch, grid, batch) and a set of
valid routes (single-block routes included, at least one route dropping
tokens), transforms it, and checks one invariant of the routed graph; the
per-route invariants are checked on every route that drops tokens.

Speed: tracing and planning a drawn model is most of a property's cost. Under a
derandomized profile (CI) every property below draws the same case stream
(``shared_cases``) and takes its transformed, prepared model from a cache
(``built``), so each drawn case is traced once per module instead of once per
property. The tests only read the cached models (a test that switches a model
to eval switches it back), so a property sees exactly what a fresh build gives.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, seed, settings, strategies as st

import treadfx
from treadfx.transformed import state_of

from helpers import GraphProbe, dit_configs, dit_inputs, random_dit, random_kept, reference_tread, route_nodes, routes_for


@st.composite
def cases(draw, max_depth: int = 6):
    """A DiT configuration, routes of which at least one drops tokens, and a seed."""
    cfg = draw(dit_configs(max_depth=max_depth))
    routes = draw(routes_for(cfg["depth"], num_tokens=cfg["grid"] ** 2))
    seed = draw(st.integers(0, 2**16))
    return cfg, routes, seed


def shared_cases(test):
    """Under a derandomized profile, give ``test`` the case stream every property of this module draws (one seed
    for all), so that the cached builds are shared; otherwise leave hypothesis' own randomness alone."""
    return seed(20261203)(test) if settings().derandomize else test


_BUILT: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _drop_built_cases():
    """The cache lives for this module only (its models are of no use to other modules)."""
    yield
    _BUILT.clear()


def _key(cfg, routes, seed):
    return tuple(sorted(cfg.items())), tuple(tuple(r) for r in routes), seed


def build(cfg, routes, seed):
    """(original, transformed, args) of a drawn case, built afresh."""
    batch = cfg["batch"]
    m = random_dit(**{k: v for k, v in cfg.items() if k != "batch"}, seed=seed)
    tm = treadfx.transform(m, routes=routes)
    args = dit_inputs(m, batch, seed=seed + 1)
    return m, tm, args


@contextlib.contextmanager
def built(case):
    """(original, transformed, args, routed program) of a drawn case, in training mode, traced and prepared once per
    module; both models are put back in training mode when the block ends."""
    cfg, routes, seed = case
    key = _key(cfg, routes, seed)
    if key not in _BUILT:
        m, tm, args = build(cfg, routes, seed)
        _BUILT[key] = (m, tm, args, routed_program(tm, args))
    m, tm, args, prog = _BUILT[key]
    try:
        yield m, tm, args, prog
    finally:
        m.train()
        tm.train()


def routed_program(tm, args):
    treadfx.prepare(tm, *args)
    return state_of(tm).current


def fixed_all(prog, batch: int, seed: int):
    """Fixed kept indices for every route of the program (None for a route that keeps every token)."""
    return [random_kept(batch, p.num_tokens, p.num_keep, seed + p.index) if p.num_keep < p.num_tokens else None
            for p in prog.plans]


def live_plans(prog):
    """The plans of the routes that drop tokens (``cases()`` draws at least one)."""
    live = [p for p in prog.plans if p.num_keep < p.num_tokens]
    assert live, "cases() draws at least one route that drops tokens"
    return live


def probe_routes(prog, args):
    """Run one routed forward and read every live route's values: [(plan, kept indices, stream at route-out,
    stream after route-in)]."""
    probe = GraphProbe(prog.gm)
    probe.run(*args)
    out = []
    for plan in live_plans(prog):
        nodes = route_nodes(prog.gm, plan.index)
        select = nodes["select"][0]
        out.append((plan, probe.values[select.name], probe.values[select.args[0].name],
                    probe.values[nodes["scatter"][0].name]))
    return out


def fixed_routes_of(prog, case):
    """Fixed kept indices for every route of a drawn case, and for each live route: (plan, its route nodes, its
    skipped-token mask)."""
    cfg, _, seed = case
    all_kept = fixed_all(prog, cfg["batch"], seed)
    per_route = []
    for plan in live_plans(prog):
        fixed = all_kept[plan.index]
        skipped = torch.ones(fixed.shape[0], plan.num_tokens, dtype=torch.bool).scatter(1, fixed, False)
        per_route.append((plan, route_nodes(prog.gm, plan.index), skipped))
    return all_kept, per_route


@shared_cases
@given(cases())
def test_output_shape_preserved(case):
    with built(case) as (m, tm, args, _):
        out = tm(*args)
        m.eval()
        assert out.shape == m(*args).shape


@shared_cases
@given(cases())
def test_eval_equals_original_exactly(case):
    with built(case) as (m, tm, args, _):
        tm(*args)  # trace and route once in training
        tm.eval()
        m.eval()
        assert torch.equal(tm(*args), m(*args))


@shared_cases
@given(cases())
def test_ratio_zero_is_identity(case):
    cfg, routes, seed = case
    routes = [(s, e, 0.0) for s, e, _ in routes]
    m, tm, args = build(cfg, routes, seed)
    assert torch.equal(tm(*args), m(*args))  # both in training mode, no dropout in the model
    assert all(r.kept is None for r in treadfx.last_routes(tm)) or treadfx.last_routes(tm) == []


@shared_cases
@given(cases())
def test_matches_hand_written_tread_exactly(case):
    cfg, routes, seed = case
    with built(case) as (m, tm, args, prog):
        kept = fixed_all(prog, cfg["batch"], seed)
        with treadfx.fixed_routes(tm, kept):
            out = tm(*args)
        ref = reference_tread(m, *args, routes, kept)
        assert torch.equal(out, ref)
        params_t = [p for p in tm.parameters() if p.requires_grad]
        params_m = [p for p in m.parameters() if p.requires_grad]
        w = torch.randn_like(out)
        g_t = torch.autograd.grad((out * w).sum(), params_t, allow_unused=True)
        g_m = torch.autograd.grad((ref * w).sum(), params_m, allow_unused=True)
        for a, b in zip(g_t, g_m):
            assert (a is None and b is None) or torch.equal(a, b)


@shared_cases
@given(cases())
def test_skipped_tokens_leave_bit_identical(case):
    with built(case) as (_, _, args, prog):
        for plan, kept, stream, restored in probe_routes(prog, args):
            skipped = torch.ones(stream.shape[:2], dtype=torch.bool).scatter(1, kept, False)
            assert torch.equal(restored[skipped], stream[skipped]), plan.index


@shared_cases
@given(cases())
def test_kept_tokens_equal_blocks_applied_to_kept_subset(case):
    with built(case) as (m, _, args, prog):
        _, t, y = args
        c = m.t_embedder(t) + m.y_embedder(y, True)
        for plan, kept, stream, restored in probe_routes(prog, args):
            h = torch.gather(stream, 1, kept.unsqueeze(-1).expand(-1, -1, stream.shape[-1]))
            for i in range(plan.start, plan.end + 1):
                h = m.blocks[i](h, c)
            assert torch.equal(torch.gather(restored, 1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])), h), plan.index


@shared_cases
@given(cases())
def test_skipped_tokens_reach_kept_tokens_neither_forward_nor_backward(case):
    """Per live route, on the stream at route-out (fixed kept indices): perturbing the skipped tokens changes no kept
    token after route-in, and the skipped ones come back as perturbed; gradients from the kept outputs never reach
    a skipped input, and a skipped token's gradient is its own output's (the identity path) only."""
    with built(case) as (_, tm, args, prog):
        all_kept, per_route = fixed_routes_of(prog, case)
        for plan, nodes, skipped in per_route:
            stream, scat = nodes["select"][0].args[0].name, nodes["scatter"][0].name
            leaf = {}

            def make_leaf(v):
                leaf["x"] = v.detach().requires_grad_(True)
                return leaf["x"]

            def perturb(v):
                v = v.clone()
                v[skipped] = v[skipped] * 3.0 + 1.0
                return v

            with treadfx.fixed_routes(tm, all_kept):
                base = GraphProbe(prog.gm, {stream: make_leaf})  # the stream as a leaf: same values, gradients
                base.run(*args)
                other = GraphProbe(prog.gm, {stream: perturb})
                other.run(*args)
            # forward
            a, b = base.values[scat], other.values[scat]
            assert torch.equal(a[~skipped], b[~skipped]), plan.index
            assert torch.equal(b[skipped], other.values[stream][skipped]), plan.index
            # backward
            w = torch.randn_like(a)
            (g_kept,) = torch.autograd.grad((a * w * (~skipped).unsqueeze(-1)).sum(), leaf["x"], retain_graph=True)
            assert torch.count_nonzero(g_kept[skipped]) == 0, plan.index  # nothing from kept outputs to skipped
            (g_skip,) = torch.autograd.grad((a * w * skipped.unsqueeze(-1)).sum(), leaf["x"])
            assert torch.equal(g_skip[skipped], w[skipped]), plan.index  # skipped tokens: identity path only
            assert torch.count_nonzero(g_skip[~skipped]) == 0, plan.index


@shared_cases
@given(cases())
def test_routed_graph_lints_and_every_route_op_reads_its_indices(case):
    with built(case) as (_, _, _, prog):
        prog.gm.graph.lint()
        order = {n: i for i, n in enumerate(prog.gm.graph.nodes)}
        for plan in prog.plans:
            nodes = route_nodes(prog.gm, plan.index)
            assert len(nodes["select"]) == 1
            for n in nodes["gather"] + nodes["scatter"]:
                assert n.args[-1] is nodes["select"][0]
            # the gather precedes block `start` and the scatter follows block `end`
            assert order[nodes["gather"][0]] < order[plan.chain.nodes[plan.start]]
            assert order[nodes["scatter"][0]] > order[plan.chain.nodes[plan.end]]


@settings(max_examples=min(25, settings().max_examples))  # each case counts FLOPs of three full runs
@given(cases(max_depth=4))
def test_flops_drop_by_the_predicted_amount(case):
    from torch.utils.flop_counter import FlopCounterMode

    cfg, routes, seed = case
    m, tm, args = build(cfg, routes, seed)
    report = treadfx.inspect(tm, *args)
    assert report.routed_flops == report.predicted_routed_flops
    # independent expectation: real tensors, the original blocks at N and at K tokens
    x, t, y = args
    c = (m.t_embedder(t) + m.y_embedder(y, True)).detach()

    def block_flops(i, tokens):
        h0 = torch.randn(cfg["batch"], tokens, m.pos_embed.shape[-1], requires_grad=True)
        c0 = c.clone().requires_grad_(True)
        h, cc = h0 * 1, c0 * 1  # non-leaf inputs, as inside the model
        with FlopCounterMode(display=False) as fc:
            out = m.blocks[i](h, cc)
            torch.autograd.grad(out.sum(), [h, cc] + [p for p in m.blocks[i].parameters()])
        return fc.get_total_flops()

    saving = 0
    for r in report.routes:
        for i in range(r.start, r.end + 1):
            saving += block_flops(i, r.num_tokens) - block_flops(i, r.num_keep)
    assert report.dense_flops - report.routed_flops == saving
