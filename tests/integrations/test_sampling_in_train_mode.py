"""Validation and sampling while the model is in train mode are not routed.

Training scripts sample without calling ``model.eval()`` (REPA samples mid-training; diffusers' validation
pipelines run the transformer while ``training`` is True, under ``torch.no_grad()``). The rule, as in
hand-edited TREAD trainers: route only in train mode *with gradients enabled*, unless
``treadfx.force_routing`` asks for routing (TREAD guidance), which routes under ``no_grad`` as well.
"""

from __future__ import annotations

import pytest
import torch

import treadfx

from helpers import dit_inputs, random_dit, reference_tread

CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _model():
    m = random_dit(depth=5, width_per_head=8, heads=2, patch=2, grid=4)  # 16 tokens, no label dropout
    return m, treadfx.transform(m, start=1, end=3, ratio=0.5)


@pytest.mark.parametrize("after_a_routed_step", [False, True])
@pytest.mark.parametrize("ctx", list(CONTEXTS))
def test_train_mode_without_gradients_is_the_original_model(ctx, after_a_routed_step):
    m, tm = _model()
    x, t, y = dit_inputs(m, 3)
    tm.train()
    if after_a_routed_step:
        tm(x, t, y).square().mean().backward()
        assert treadfx.last_routes(tm)[0].kept.shape == (3, 8)
    with CONTEXTS[ctx]():
        state = torch.get_rng_state()
        out = tm(x, t, y)
        assert torch.equal(torch.get_rng_state(), state)  # no router draw either
    assert tm.training
    assert treadfx.last_routes(tm) == []
    m.eval()
    with torch.no_grad():
        assert torch.equal(out, m(x, t, y))  # bit for bit the original (eval) forward
    # a training step afterwards routes again
    tm(x, t, y).square().mean().backward()
    assert treadfx.last_routes(tm)[0].kept.shape == (3, 8)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("ctx", list(CONTEXTS))
def test_force_routing_routes_without_gradients(ctx, mode):
    m, tm = _model()
    x, t, y = dit_inputs(m, 2)
    getattr(tm, mode)()
    with CONTEXTS[ctx](), treadfx.force_routing(tm, ratio=0.25):
        out = tm(x, t, y)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (2, 12)  # 16 tokens, ratio 0.25: 12 kept
    getattr(m, mode)()
    with torch.no_grad():
        ref = reference_tread(m, x, t, y, [(1, 3, 0.25)], [rec.kept])
        dense = m(x, t, y)
    assert torch.equal(out, ref)
    assert not torch.allclose(out, dense, atol=1e-4)  # it really routed
    with CONTEXTS[ctx]():  # leaving force_routing: the original model again
        assert torch.equal(tm(x, t, y), dense)
    assert treadfx.last_routes(tm) == []


def test_enable_grad_inside_no_grad_routes():
    """What decides is whether gradients are enabled at the call, not an outer context."""
    m, tm = _model()
    x, t, y = dit_inputs(m, 2)
    with torch.no_grad(), torch.enable_grad():
        tm(x, t, y)
    assert treadfx.last_routes(tm)[0].kept.shape == (2, 8)
    with torch.no_grad():
        tm(x, t, y)
    assert treadfx.last_routes(tm) == []
