"""Unit tests of the planning stage (treadfx.planning, treadfx.equivariance) on tiny traced graphs.

Each model is small enough that the expected decisions are written by hand:
which tensor is the stream, which ones are gathered (the stream, a RoPE-like
table found by the fake probe) or passed, what is scattered back, and the
selection and order of kept tokens with their reasons.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from treadfx.chains import Chain
from treadfx.equivariance import OrderFinding, make_order_probe
from treadfx.layout import LayoutAnalysis, Segment
from treadfx.planning import (
    RouteScope, ValueDecision, choose_selection, find_stream, initial_decisions, plan_route, region_of,
)
from treadfx.routes import Route
from treadfx.tracing import trace


class RopeBlock(nn.Module):
    """Attention-free stand-in: mixes features per token, multiplied by a per-token table (like RoPE)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h, c, table):
        return h + self.lin(h * table) * c.unsqueeze(1)


class ScanBlock(RopeBlock):
    """Order dependent: a running sum over tokens."""

    def forward(self, h, c, table):
        return h + self.lin(h * table).cumsum(1) * c.unsqueeze(1)


class FakeOnlyBlock(RopeBlock):
    """Runs on fake tensors (tracing, planning) but raises on real ones, so the order probe cannot run it."""

    def forward(self, h, c, table):
        if not isinstance(h, FakeTensor):
            raise RuntimeError("this block only runs under fake tensors")
        return super().forward(h, c, table)


class NoisyBlock(RopeBlock):
    """Draws from torch's global RNG (and discards it)."""

    def forward(self, h, c, table):
        return super().forward(h, c, table) + 0.0 * torch.rand_like(h)


class Net(nn.Module):
    def __init__(self, block=RopeBlock, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.table = nn.Parameter(torch.randn(6, 8))
        self.blocks = nn.ModuleList([block(8) for _ in range(depth)])

    def forward(self, x, c):
        h = self.embed(x)
        table = self.table * 1.0
        for b in self.blocks:
            h = b(h, c, table)
        return h


ARGS = (torch.randn(2, 6, 4), torch.randn(2, 8))


def setup(block=RopeBlock):
    torch.manual_seed(0)
    m = Net(block)
    prog = trace(m, Net.forward, ARGS, {}, leaves=list(m.blocks))
    nodes = {n.name: n for n in prog.gm.graph.nodes}
    blocks = [n for n in prog.gm.graph.nodes if n.op == "call_module" and ".blocks." in n.target]
    chain = Chain(blocks, [f"blocks.{i}" for i in range(len(blocks))], [block.__name__] * len(blocks),
                  [None] * len(blocks))
    analysis = LayoutAnalysis(prog.gm, 0, blocks, lambda n: {0: n.args[0]})
    return m, prog, nodes, chain, analysis


def name_of(node) -> str:
    return f"`{node.name}`"


def test_region_is_the_blocks_between_route_in_and_route_out():
    _, prog, _, chain, _ = setup()
    assert region_of(prog.gm, chain.nodes[1], chain.nodes[2]) == chain.nodes[1:3]
    assert region_of(prog.gm, chain.nodes[0], chain.nodes[0]) == chain.nodes[:1]


def test_stream_and_initial_decisions():
    _, prog, nodes, chain, analysis = setup()
    plan = plan_route(prog, analysis, chain, 0, Route(1, 2, 0.5), 1, 2, name_of)
    assert plan.stream is chain.nodes[0]
    assert plan.stream_info.layout == (Segment("image", 6),)
    assert plan.num_tokens == 6 and plan.num_keep == 3
    # before probing, the table is a constant that is passed through
    r = RouteScope(prog, analysis, chain, 0, Route(1, 2, 0.5), 1, 2, name_of, plan.region)
    assert find_stream(r) is chain.nodes[0]
    entering, order_in = initial_decisions(r, chain.nodes[0], 6)
    assert order_in == [chain.nodes[0], nodes["args_1"], nodes["mul"]]
    assert [(d.action, d.role) for d in (entering[n] for n in order_in)] == [
        ("gather", "token stream"), ("pass", "conditioning"), ("pass", "constant")]


def test_probe_gathers_the_per_token_table_and_scatters_the_stream():
    _, prog, nodes, chain, analysis = setup()
    plan = plan_route(prog, analysis, chain, 0, Route(1, 2, 0.5), 1, 2, name_of)
    got = [(d.node, d.action, d.role, d.axis, d.layout, d.batched) for d in plan.entering]
    assert got == [
        (chain.nodes[0], "gather", "token stream", 1, (Segment("image", 6),), True),
        (nodes["args_1"], "pass", "conditioning", None, None, True),
        (nodes["mul"], "gather", "side input", 0, (Segment("image", 6),), False),
    ]
    assert plan.entering[2].reason == ("block `blocks.1` fails with the full token count and runs with the kept "
                                       "ones (per-token table without batch dim)")
    assert [(d.node, d.action, d.role) for d in plan.leaving] == [(chain.nodes[2], "scatter", "token stream")]
    assert plan.selection == "shared"
    assert plan.selection_reason.startswith("`mul` has no batch dimension, so one subset serves the whole batch")
    assert (plan.order, plan.order_reason) == ("random", "default")


def test_choose_selection():
    table = ValueDecision(None, "gather", "side input", "", 0, (Segment("image", 6),), False)
    stream = ValueDecision(None, "gather", "token stream", "", 1, (Segment("image", 6),), True)
    assert choose_selection(Route(0, 1), [stream], name_of) == (
        "per_sample", "each sample draws its own subset (official TREAD)")
    assert choose_selection(Route(0, 1, selection="shared"), [stream], name_of) == ("shared", "requested")
    assert choose_selection(Route(0, 1, selection="per_sample"), [stream, table], name_of) == (
        "per_sample", "requested; tables without batch dim are expanded per sample")


@pytest.mark.parametrize("finding, order, reason", [
    (OrderFinding(), "random", "routed blocks are permutation-equivariant over tokens"),
    (OrderFinding(dependent="blocks.2"), "sorted",
     "blocks.2 is order dependent (not permutation-equivariant over tokens)"),
    (OrderFinding(unproven="probing `blocks.1` failed: RuntimeError: x"), "sorted",
     "permutation-equivariance could not be shown (probing `blocks.1` failed: RuntimeError: x); sorted order is "
     "the safe choice (pass order='random' to override)"),
])
def test_choose_order_from_a_probe_finding(finding, order, reason):
    _, prog, _, chain, analysis = setup()
    plan = plan_route(prog, analysis, chain, 0, Route(1, 2, 0.5), 1, 2, name_of,
                      order_probe=lambda *a: finding)
    assert (plan.order, plan.order_reason) == (order, reason)
    requested = plan_route(prog, analysis, chain, 0, Route(1, 2, 0.5, order="random"), 1, 2, name_of,
                           order_probe=lambda *a: finding)
    assert (requested.order, requested.order_reason) == ("random", "requested")


@pytest.mark.parametrize("block, order, reason", [
    (RopeBlock, "random", "routed blocks are permutation-equivariant over tokens"),
    (ScanBlock, "sorted", "blocks.1 is order dependent (not permutation-equivariant over tokens)"),
    (FakeOnlyBlock, "sorted",
     "permutation-equivariance could not be shown (probing `blocks.1` failed: RuntimeError: this block only runs "
     "under fake tensors); sorted order is the safe choice (pass order='random' to override)"),
])
def test_order_probe_on_real_blocks(block, order, reason):
    _, prog, _, chain, analysis = setup(block)
    plan = plan_route(prog, analysis, chain, 0, Route(1, 2, 0.5), 1, 2, name_of,
                      order_probe=make_order_probe(prog, analysis))
    assert (plan.order, plan.order_reason) == (order, reason)


def test_order_probe_calls_no_forward_hooks_and_leaves_the_global_rng_alone():
    m, prog, _, chain, analysis = setup(NoisyBlock)
    calls = []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args: calls.append(mod))
        b.register_forward_hook(lambda mod, args, out: calls.append(mod))

    def plan(probe):
        torch.manual_seed(123)
        calls.clear()
        p = plan_route(prog, analysis, chain, 0, Route(1, 2, 0.5), 1, 2, name_of, order_probe=probe)
        return p, len(calls), torch.get_rng_state()

    _, hooks_without, rng_without = plan(None)
    probed, hooks_with, rng_with = plan(make_order_probe(prog, analysis))
    assert probed.order == "random"  # the probe did run the blocks
    assert hooks_with == hooks_without  # the probe itself adds no hook calls
    assert torch.equal(rng_with, rng_without)  # nor draws from the global RNG


class _OuterResidual(nn.Module):
    """Blocks without their own residual: the forward writes ``h = h + block(h)`` (or a gated ``h + g * block(h)``)."""

    def __init__(self, gated: bool):
        super().__init__()
        torch.manual_seed(0)
        self.gated = gated
        self.embed = nn.Linear(4, 16)
        self.cond = nn.Linear(1, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(5))
        self.head = nn.Linear(16, 4)

    def forward(self, x, t):
        h = self.embed(x)
        g = self.cond(t[:, None, None])  # per-sample gate [B, 1, D]
        for b in self.blocks:
            h = h + g * b(h) if self.gated else h + b(h)
        return self.head(h)


def _outer_residual_reference(m: _OuterResidual, x, t, kept, start, end):
    h = m.embed(x)
    g = m.cond(t[:, None, None])
    saved = idx = None
    for i, b in enumerate(m.blocks):
        if i == start:
            saved, idx = h, kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            h = torch.gather(h, 1, idx)
        h = h + g * b(h) if m.gated else h + b(h)
        if i == end:
            h = saved.scatter(1, idx, h)
    return m.head(h)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("span", [(1, 2), (1, 4), (0, 3)])
def test_residual_outside_the_blocks_leaves_skipped_tokens_unchanged(gated, span):
    """The residual add after the route's last block is part of the route: skipped tokens come back as they left
    (a plan that scattered the block output and the residual operand separately gave them ``h + h``)."""
    import warnings

    import treadfx

    start, end = span
    m = _OuterResidual(gated)
    tm = treadfx.transform(_OuterResidual(gated), start=start, end=end, ratio=0.5, selection="per_sample").train()
    x, t = torch.randn(3, 8, 4), torch.rand(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", treadfx.SideExitWarning)  # the stream going on is not a side exit
        out = tm(x, t)
    kept = treadfx.last_routes(tm)[0].kept
    ref = _outer_residual_reference(m, x, t, kept, start, end)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
