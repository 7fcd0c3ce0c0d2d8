"""Property-based graph tests over random DiT configurations and random routes.

Each test draws a DiT (depth, width, heads, patch, grid, batch) and a set of
valid routes (single-block routes included, at least one route dropping
tokens), transforms it, and checks one invariant of the routed graph.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

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


def build(cfg, routes, seed):
    batch = cfg["batch"]
    m = random_dit(**{k: v for k, v in cfg.items() if k != "batch"}, seed=seed)
    tm = treadfx.transform(m, routes=routes)
    args = dit_inputs(m, batch, seed=seed + 1)
    return m, tm, args


def routed_program(tm, args):
    treadfx.prepare(tm, *args)
    return state_of(tm).current


def fixed_all(prog, batch: int, seed: int):
    """Fixed kept indices for every route of the program (None for a route that keeps every token)."""
    return [random_kept(batch, p.num_tokens, p.num_keep, seed + p.index) if p.num_keep < p.num_tokens else None
            for p in prog.plans]


def live_route(case, data):
    """Build a drawn case and prepare its routed program: (original, transformed, args, program, the plan of a
    route that drops tokens, drawn from ``data``)."""
    cfg, routes, seed = case
    m, tm, args = build(cfg, routes, seed)
    prog = routed_program(tm, args)
    live = [p for p in prog.plans if p.num_keep < p.num_tokens]
    assert live, "cases() draws at least one route that drops tokens"
    return m, tm, args, prog, data.draw(st.sampled_from(live))


def probe_route(case, data):
    """Run one routed forward of a drawn case and read one live route's values: (model, args, plan,
    kept indices, stream at route-out, stream after route-in)."""
    m, _, args, prog, plan = live_route(case, data)
    nodes = route_nodes(prog.gm, plan.index)
    probe = GraphProbe(prog.gm)
    probe.run(*args)
    select = nodes["select"][0]
    return (m, args, plan, probe.values[select.name], probe.values[select.args[0].name],
            probe.values[nodes["scatter"][0].name])


def with_fixed_route(case, data):
    """Fixed kept indices for every live route of a drawn case: (transformed model, args, program, probed plan, its
    route nodes, the kept indices of all routes, the probed route's skipped-token mask)."""
    _, tm, args, prog, plan = live_route(case, data)
    cfg, _, seed = case
    all_kept = fixed_all(prog, cfg["batch"], seed)
    fixed = all_kept[plan.index]
    skipped = torch.ones(fixed.shape[0], plan.num_tokens, dtype=torch.bool).scatter(1, fixed, False)
    return tm, args, prog, plan, route_nodes(prog.gm, plan.index), all_kept, skipped


@given(cases())
def test_output_shape_preserved(case):
    cfg, routes, seed = case
    m, tm, args = build(cfg, routes, seed)
    out = tm(*args)
    m.eval()
    assert out.shape == m(*args).shape


@given(cases())
def test_eval_equals_original_exactly(case):
    cfg, routes, seed = case
    m, tm, args = build(cfg, routes, seed)
    tm(*args)  # trace and route once in training
    tm.eval()
    m.eval()
    assert torch.equal(tm(*args), m(*args))


@given(cases())
def test_ratio_zero_is_identity(case):
    cfg, routes, seed = case
    routes = [(s, e, 0.0) for s, e, _ in routes]
    m, tm, args = build(cfg, routes, seed)
    assert torch.equal(tm(*args), m(*args))  # both in training mode, no dropout in the model
    assert all(r.kept is None for r in treadfx.last_routes(tm)) or treadfx.last_routes(tm) == []


@given(cases())
def test_matches_hand_written_tread_exactly(case):
    cfg, routes, seed = case
    m, tm, args = build(cfg, routes, seed)
    prog = routed_program(tm, args)
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


@given(cases(), st.data())
def test_skipped_tokens_leave_bit_identical(case, data):
    probed = probe_route(case, data)
    _, _, _, kept, stream, restored = probed
    skipped = torch.ones(stream.shape[:2], dtype=torch.bool).scatter(1, kept, False)
    assert torch.equal(restored[skipped], stream[skipped])


@given(cases(), st.data())
def test_kept_tokens_equal_blocks_applied_to_kept_subset(case, data):
    probed = probe_route(case, data)
    m, args, plan, kept, stream, restored = probed
    _, t, y = args
    c = m.t_embedder(t) + m.y_embedder(y, True)
    h = torch.gather(stream, 1, kept.unsqueeze(-1).expand(-1, -1, stream.shape[-1]))
    for i in range(plan.start, plan.end + 1):
        h = m.blocks[i](h, c)
    assert torch.equal(torch.gather(restored, 1, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])), h)


@given(cases(), st.data())
def test_kept_tokens_do_not_depend_on_skipped_tokens(case, data):
    fixed_case = with_fixed_route(case, data)
    tm, args, prog, plan, nodes, all_kept, skipped = fixed_case
    select = nodes["select"][0]
    with treadfx.fixed_routes(tm, all_kept):
        base = GraphProbe(prog.gm)
        base.run(*args)

        def perturb(v):
            v = v.clone()
            v[skipped] = v[skipped] * 3.0 + 1.0
            return v

        other = GraphProbe(prog.gm, {select.args[0].name: perturb})
        other.run(*args)
    scat = nodes["scatter"][0].name
    a, b = base.values[scat], other.values[scat]
    assert torch.equal(a[~skipped], b[~skipped])
    assert torch.equal(b[skipped], other.values[select.args[0].name][skipped])


@given(cases(), st.data())
def test_skipped_tokens_get_no_gradient_through_routed_blocks(case, data):
    fixed_case = with_fixed_route(case, data)
    tm, args, prog, plan, nodes, all_kept, skipped = fixed_case
    select = nodes["select"][0]
    leaf = {}

    def make_leaf(v):
        leaf["x"] = v.detach().requires_grad_(True)
        return leaf["x"]

    with treadfx.fixed_routes(tm, all_kept):
        probe = GraphProbe(prog.gm, {select.args[0].name: make_leaf})
        probe.run(*args)
    restored = probe.values[nodes["scatter"][0].name]
    w = torch.randn_like(restored)
    (g_kept,) = torch.autograd.grad((restored * w * (~skipped).unsqueeze(-1)).sum(), leaf["x"], retain_graph=True)
    assert torch.count_nonzero(g_kept[skipped]) == 0  # nothing flows from kept outputs to skipped inputs
    (g_skip,) = torch.autograd.grad((restored * w * skipped.unsqueeze(-1)).sum(), leaf["x"])
    assert torch.equal(g_skip[skipped], w[skipped])  # skipped tokens: identity path only
    assert torch.count_nonzero(g_skip[~skipped]) == 0


@given(cases())
def test_routed_graph_lints_and_every_route_op_reads_its_indices(case):
    cfg, routes, seed = case
    m, tm, args = build(cfg, routes, seed)
    prog = routed_program(tm, args)
    prog.gm.graph.lint()
    for plan in prog.plans:
        nodes = route_nodes(prog.gm, plan.index)
        assert len(nodes["select"]) == 1
        for n in nodes["gather"] + nodes["scatter"]:
            assert n.args[-1] is nodes["select"][0]
        # the gather precedes block `start` and the scatter follows block `end`
        order = {n: i for i, n in enumerate(prog.gm.graph.nodes)}
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
