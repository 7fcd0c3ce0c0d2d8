"""DiffMoE static-capacity inference: what ``treadfx.inspect`` reports about it (slots, FLOPs, difference from the
dynamic mode, checked against hand-written references) and that it compiles with ``fullgraph=True`` without
recompiles across batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch.utils.flop_counter import FlopCounterMode

import treadfx
from treadfx.moe import DEFAULT_STATIC_CAPACITY, diffmoe_layers, static_capacity_check

from helpers import dit_inputs, random_dit


def calibrated_dit(depth: int = 4, static_capacity: float | None = None, steps: int = 12):
    """A tiny DiT (D=16, H=32) with DiffMoE layers whose thresholds were calibrated by a few training forwards."""
    m = random_dit(depth=depth, width_per_head=8, heads=2, patch=2, grid=4, seed=0)
    d = treadfx.diffmoe(m, num_experts=4, seed=0, noise_std=0.2, static_capacity=static_capacity)
    x, t, y = dit_inputs(d, 2)
    g = torch.Generator().manual_seed(3)
    d.train()
    for _ in range(steps):
        d(x + 0.3 * torch.randn(x.shape, generator=g), t, y)
    return d, (x, t, y)


def reference_layer(lay, h: torch.Tensor, slots: int | None) -> tuple[torch.Tensor, list[int]]:
    """The official inference per expert, written out: k_e tokens pass the threshold, expert e takes the k_e (or,
    with ``slots``, min(k_e, slots)) tokens of highest router probability, its output times that probability."""
    probs = F.softmax(h @ lay.gate.weight.t(), dim=-1)
    sig = torch.sigmoid(lay.predictor(h))
    out = torch.zeros(h.shape[0], h.shape[1])
    ks = []
    for e in range(lay.num_experts):
        k = int((sig[:, e] > lay.thresholds[e]).sum())
        ks.append(k)
        g, ix = probs[:, e].topk(k if slots is None else min(k, slots))
        out[ix] += g[:, None] * lay.experts[e](h[ix])
    return out, ks


@pytest.mark.parametrize("factor", [0.5, 4.0])
def test_inspect_reports_static_capacity_slots_flops_and_difference(factor):
    d, (x, t, y) = calibrated_dit(static_capacity=factor)
    tm = treadfx.transform(d, start=1, end=2, ratio=0.5)
    r = treadfx.inspect(tm, x, t, y)
    assert tm.training
    assert all(lay.static_capacity == factor for _, lay in diffmoe_layers(tm))
    check = r.diffmoe_inference

    # layer inputs of a dense eval forward, captured independently of the report
    inputs = {}

    def keep_input(path):
        def hook(mod, args):
            inputs.setdefault(path, args[0].reshape(-1, 16))
        return hook

    hooks = [lay.register_forward_pre_hook(keep_input(p)) for p, lay in diffmoe_layers(tm)]
    tm.eval()
    with torch.no_grad():
        for _, lay in diffmoe_layers(tm):
            lay.static_capacity = None
        dyn_out = tm(x, t, y)
        for _, lay in diffmoe_layers(tm):
            lay.static_capacity = factor
        static_out = tm(x, t, y)
    for h in hooks:
        h.remove()

    S, E, D, H = 2 * 16, 4, 16, 32
    C = min(S, math.ceil(S / E * 1.0 * factor))
    assert [l.path for l in check.layers] == ["blocks.1.mlp", "blocks.3.mlp"]
    for l in check.layers:
        lay = tm.get_submodule(l.path)
        h = inputs[l.path]
        with torch.no_grad():
            ref_dyn, ks = reference_layer(lay, h, None)
            ref_static, _ = reference_layer(lay, h, C)
        assert (l.pool_tokens, l.slots, l.factor, l.tokens_per_expert) == (S, C, factor, ks)
        assert l.dropped == sum(max(k - C, 0) for k in ks)
        overhead = S * 2 * D * E + S * (2 * D * D + 2 * D * E)  # router + predictor
        assert l.dynamic_flops == sum(ks) * 4 * D * H + overhead
        assert l.static_flops == E * C * 4 * D * H + overhead
        assert l.masked_flops == E * S * 4 * D * H + overhead
        # the static layer's compute, counted by torch on its real forward, is what the report says
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            lay(h)
        assert fc.get_total_flops() == l.static_flops
        assert l.max_abs_diff == pytest.approx(float((ref_static - ref_dyn).abs().max()), abs=1e-5)
    assert check.max_abs_diff == pytest.approx(float((static_out - dyn_out).abs().max()), abs=1e-6)
    if factor == 4.0:  # C = S: nothing dropped, the static mode computes what the dynamic mode computes
        assert sum(l.dropped for l in check.layers) == 0 and check.max_abs_diff < 1e-5
    else:
        assert sum(l.dropped for l in check.layers) > 0 and check.max_abs_diff > 1e-4
    assert check.static_flops == sum(l.static_flops for l in check.layers) and not check.default_factor
    text = str(r)
    assert "DiffMoE inference" in text and f"{C} slots/expert (factor {factor:g})" in text
    assert r.to_dict()["diffmoe_inference"]["layers"][0]["slots"] == C


def test_check_assumes_the_default_factor_for_layers_without_one_and_is_absent_without_diffmoe():
    d, (x, t, y) = calibrated_dit(depth=2, steps=4)
    d(x, t, y)  # a training forward whose predictor loss the check must leave in place
    loss = treadfx.diffmoe_loss(d)
    check = static_capacity_check(d, (x, t, y))
    assert treadfx.diffmoe_loss(d) is loss and loss.item() > 0
    assert check.default_factor and check.layers[0].factor == DEFAULT_STATIC_CAPACITY
    assert check.layers[0].slots == math.ceil(32 / 4 * DEFAULT_STATIC_CAPACITY)
    assert d.blocks[1].mlp.static_capacity is None and d.training
    assert static_capacity_check(d, (x, t, y), factor=1.0).layers[0].slots == 8
    assert static_capacity_check(d, (x.to("meta"), t.to("meta"), y.to("meta"))) is None
    plain = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    assert treadfx.inspect(treadfx.transform(plain, start=1, end=2), x, t, y).diffmoe_inference is None


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_capacity_model_compiles_fullgraph_once_across_batches(dynamic):
    """One compiled frame (0 recompiles) over batches of new data, and with ``dynamic=True`` over batch sizes too;
    each compiled output equals the eager static-capacity model's."""
    d, _ = calibrated_dit(depth=2, static_capacity=1.5, steps=4)
    d.eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    cm = torch.compile(d, backend=counter, fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for batch in ([2, 2, 2] if not dynamic else [2, 3, 5]):
            x, t, y = dit_inputs(d, batch, seed=batch)
            x = torch.randn(x.shape, generator=g)
            torch.testing.assert_close(cm(x, t, y), d(x, t, y), rtol=1e-6, atol=1e-6)
            assert d.blocks[1].mlp._last["mode"] == "eval (static)"
    assert counter.frame_count == 1
    torch._dynamo.reset()
