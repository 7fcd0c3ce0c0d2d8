"""torch.compile: no graph breaks, one graph per mode and per distinct kept-token count, every compile path.

Graph breaks and recompiles are decided by dynamo before any backend runs, so
the dynamo "eager" backend measures them exactly and fast on CPU; one test
uses "aot_eager" to also trace the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.utils import counters

import treadfx
from treadfx.models.dit import DiT

from helpers import tiny_dit, tiny_dit_inputs


def small_dit(seed: int = 0) -> DiT:
    return tiny_dit(depth=5, seed=seed, dropout=0.1)


def inputs(batch: int = 3):
    return tiny_dit_inputs(batch, seed=3)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def graphs() -> int:
    """Graphs dynamo compiled so far: first compilations and recompilations alike (with ``fullgraph=True`` one
    per compilation). torch 2.13 fills neither ``counters["recompiles"]`` nor, for a compiled module,
    ``counters["frames"]``; a count that does not grow over a span of calls means nothing recompiled in it."""
    return counters["stats"]["unique_graphs"]


def test_fullgraph_no_breaks_and_no_recompiles_across_train_eval_train():
    tm = treadfx.transform(small_dit(), start=1, end=3)
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    x, t, y = inputs()
    for mode in ["train", "eval", "train", "eval", "train", "train"]:
        getattr(tm, mode)()
        out = cm(x, t, y)
        if mode == "train":
            out.square().mean().backward()
    assert dict(counters["graph_break"]) == {}
    # one graph for training (routed), one for eval (the original forward), each compiled once: switching
    # modes again never recompiles
    assert graphs() == 2


def test_aot_eager_backward_matches_eager_with_fixed_routes():
    m = small_dit()
    m.y_embedder.dropout_prob = 0.0
    tm = treadfx.transform(m, start=1, end=3)
    x, t, y = inputs()
    kept = [torch.rand(3, 16).argsort(1)[:, :8]]
    with treadfx.fixed_routes(tm, kept):
        eager = tm(x, t, y)
        g_eager = torch.autograd.grad(eager.square().mean(), list(tm.blocks[2].parameters()))
        cm = torch.compile(tm, fullgraph=True, backend="aot_eager")
        comp = cm(x, t, y)
        g_comp = torch.autograd.grad(comp.square().mean(), list(tm.blocks[2].parameters()))
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert dict(counters["graph_break"]) == {}


def test_one_graph_per_distinct_kept_count_not_per_ratio():
    tm = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    x, t, y = inputs()
    cm(x, t, y)  # N = 16 tokens, K = 8
    base = graphs()
    for ratio, new in [(0.45, True), (0.5, False), (0.46, False), (0.25, True), (0.26, False)]:
        # 0.45 -> K=16-7=9, 0.46 -> K=9, 0.25 -> K=12, 0.26 -> K=12
        before = graphs()
        treadfx.set_ratio(tm, ratio)
        cm(x, t, y)
        assert (graphs() > before) == new, ratio
    assert graphs() == base + 2
    assert dict(counters["graph_break"]) == {}


def test_force_routing_compiles_once_per_guidance_rate():
    tm = treadfx.transform(small_dit(), start=1, end=3).eval()
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    x, t, y = inputs()
    cm(x, t, y)
    n0 = graphs()
    for _ in range(3):
        with treadfx.force_routing(tm, ratio=0.25):
            out = cm(x, t, y)
        assert out.shape == (3, 8, 8, 8)
        assert treadfx.last_routes(tm)[0].kept.shape == (3, 12)  # 16 tokens, ratio 0.25 -> keep 12
    assert graphs() == n0 + 1
    cm(x, t, y)  # back to plain eval: no new graph, and no routes recorded
    assert graphs() == n0 + 1
    assert treadfx.last_routes(tm) == []


def test_compiled_inside_a_parent_module_without_prepare():
    tm = treadfx.transform(small_dit(), start=1, end=3)

    class Loss(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, y):
            return self.net(x, t, y).square().mean()

    loss = torch.compile(Loss(tm), fullgraph=True, backend="eager")(*inputs())
    loss.backward()
    assert dict(counters["graph_break"]) == {}
    assert treadfx.last_routes(tm)[0].kept.shape == (3, 8)
    assert all(p.grad is not None for p in tm.blocks[2].parameters())


def test_in_place_module_compile():
    tm = treadfx.transform(small_dit(), start=1, end=3)
    tm.compile(fullgraph=True, backend="eager")
    out = tm(*inputs())
    assert out.shape == (3, 8, 8, 8)
    assert treadfx.last_routes(tm)[0].kept.shape == (3, 8)
    assert dict(counters["graph_break"]) == {}


def test_new_input_signature_compiles_a_new_graph_without_breaks():
    tm = treadfx.transform(small_dit(), start=1, end=3)
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    cm(*inputs(3))
    cm(*inputs(5))
    assert treadfx.last_routes(tm)[0].kept.shape == (5, 8)
    assert dict(counters["graph_break"]) == {}
