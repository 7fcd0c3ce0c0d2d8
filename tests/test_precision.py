"""Mixed precision (issue 6.5): autocast bf16, bf16 parameters, ``fp32_after_route``.

Every check compares against the original model or the hand-written TREAD
reference of ``tests/helpers.py`` run under the same precision settings.
"""

from __future__ import annotations

import pytest
import torch

import treadfx
from treadfx.models.dit import DiT, TimestepEmbedder

from helpers import dit_inputs, random_dit, random_kept, reference_tread

BF16 = torch.bfloat16
ROUTES = [(1, 3, 0.5)]  # 6 blocks: route blocks 1..3, block 4 is the first block after route-in


def autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.fixture
def setup():
    m = random_dit(depth=6, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 3)
    kept = random_kept(3, 16, 8, seed=3)
    return m, (x, t, y), kept


def test_autocast_eval_is_original_bit_for_bit(setup):
    """Under bf16 autocast, eval of the transformed model equals the original under the same autocast."""
    m, (x, t, y), _ = setup
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5).eval()
    m.eval()
    with autocast():
        got, want = tm(x, t, y), m(x, t, y)
    assert got.dtype == BF16
    assert torch.equal(got, want)


def test_autocast_training_equals_hand_reference(setup):
    """Routed training forward and gradients under autocast equal the hand-written TREAD reference under autocast."""
    m, (x, t, y), kept = setup
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5).train()
    m.train()
    with autocast(), treadfx.fixed_routes(tm, [kept]):
        got = tm(x, t, y)
    got.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in tm.named_parameters() if p.grad is not None}
    tm.zero_grad(set_to_none=True)
    with autocast():
        want = reference_tread(m, x, t, y, ROUTES, [kept])
    want.float().square().mean().backward()
    assert got.dtype == want.dtype == BF16
    assert torch.equal(got, want)
    ref = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys()
    for n in ref:
        assert torch.equal(grads[n], ref[n]), n


def test_autocast_and_fp32_signatures_are_separate_graphs(setup):
    """A model traced in fp32 and then called under autocast re-traces (autocast is part of the signature)."""
    m, (x, t, y), kept = setup
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5).train()
    with treadfx.fixed_routes(tm, [kept]):
        fp32 = tm(x, t, y)
        with autocast():
            bf16 = tm(x, t, y)
    assert fp32.dtype == torch.float32 and bf16.dtype == BF16
    assert torch.equal(fp32, reference_tread(m.train(), x, t, y, ROUTES, [kept]))


class _CastTimestepEmbedder(TimestepEmbedder):
    """The DiT timestep embedder, casting its float32 frequencies to the weight dtype (runs in pure bf16)."""

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


def bf16_dit():
    m = random_dit(depth=6, width_per_head=8, heads=2, patch=2, grid=4)
    m.t_embedder.__class__ = _CastTimestepEmbedder  # the reference DiT's sin-cos embedding is float32 only
    return m.to(BF16)


def test_bf16_parameters_eval_exact_and_training_matches_reference():
    """bf16 parameters: eval bit for bit, routed training forward equals the reference, gradients bf16 and finite."""
    m = bf16_dit()
    x, t, y = dit_inputs(m, 3)
    x = x.to(BF16)
    kept = random_kept(3, 16, 8, seed=4)
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5)
    assert all(p.dtype == BF16 for p in tm.parameters())
    assert torch.equal(tm.eval()(x, t, y), m.eval()(x, t, y))
    tm.train()
    m.train()
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(x, t, y)
    assert out.dtype == BF16
    assert torch.equal(out, reference_tread(m, x, t, y, ROUTES, [kept]))
    out.float().square().mean().backward()
    grads = [p.grad for p in tm.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == BF16 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_to_bf16_after_tracing_retraces():
    """``model.to(bfloat16)`` after an fp32 training step drops the fp32 graphs; the next step runs in bf16."""
    m = random_dit(depth=6, width_per_head=8, heads=2, patch=2, grid=4)
    m.t_embedder.__class__ = _CastTimestepEmbedder
    x, t, y = dit_inputs(m, 2)
    kept = random_kept(2, 16, 8, seed=5)
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5).train()
    with treadfx.fixed_routes(tm, [kept]):
        assert tm(x, t, y).dtype == torch.float32
        tm.to(BF16)  # parameters are shared: the original's parameters are bf16 now too
        out = tm(x.to(BF16), t, y)
    assert out.dtype == BF16
    assert torch.equal(out, reference_tread(m.train(), x.to(BF16), t, y, ROUTES, [kept]))


def _fp32_reference(m, x, t, y, kept):
    """Hand TREAD forward under autocast with the first block after route-in in fp32, autocast off."""
    h = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, m.training)
    idx = kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])
    for i, block in enumerate(m.blocks):
        if i == 1:
            saved, h = h, torch.gather(h, 1, idx)
        if i == 4:
            with torch.autocast("cpu", enabled=False):
                h = block(h.float(), c.float())
        else:
            h = block(h, c)
        if i == 3:
            h = saved.scatter(1, idx, h)
    return m.unpatchify(m.final_layer(h, c))


def test_fp32_after_route_runs_first_block_after_route_in_in_fp32(setup):
    """``fp32_after_route=True``: under autocast the block after route-in computes in fp32 and matches a reference."""
    m, (x, t, y), kept = setup
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5, fp32_after_route=True).train()
    m.train()
    # DiT's residual stream is fp32 under autocast anyway; the matmuls show the compute dtype
    seen: dict[int, torch.dtype] = {}
    for i, blk in enumerate(tm.blocks):
        blk.attn.qkv.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, out.dtype))
    with autocast(), treadfx.fixed_routes(tm, [kept]):
        got = tm(x, t, y)
    assert seen == {0: BF16, 1: BF16, 2: BF16, 3: BF16, 4: torch.float32, 5: BF16}
    with autocast():
        want = _fp32_reference(m, x, t, y, kept)
    assert torch.equal(got, want)


def test_fp32_after_route_is_a_no_op_without_autocast_and_in_eval(setup):
    """Without autocast, or in eval, ``fp32_after_route=True`` changes nothing (bit for bit)."""
    m, (x, t, y), kept = setup
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5, fp32_after_route=True).train()
    with treadfx.fixed_routes(tm, [kept]):
        got = tm(x, t, y)
    assert torch.equal(got, reference_tread(m.train(), x, t, y, ROUTES, [kept]))
    tm.eval()
    m.eval()
    with autocast():
        assert torch.equal(tm(x, t, y), m(x, t, y))


def test_a_model_traced_in_fp32_does_not_leak_dtypes_into_a_later_trace_under_cpu_autocast():
    """Shape inference is memoised process-wide per module structure; CPU autocast must be part of that key.

    Regression: after a model of the same structure was traced without autocast (here a trace that then
    failed on overlapping routes), tracing a second one under CPU autocast reused float32 output dtypes of
    the first while other modules computed in bfloat16, and planning failed ("output 0 has shape [...]
    torch.bfloat16 instead of [...] torch.float32").
    """
    def model():
        torch.manual_seed(0)
        return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10,
                   class_dropout_prob=0.0, zero_init=False)

    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,))
    with pytest.raises(treadfx.InvalidRouteError):  # an fp32 trace fills the memo, then fails
        treadfx.transform(model(), routes=[(0, 2, 0.5), (2, 4, 0.5)])(x, t, y)
    second = model()
    tm = treadfx.transform(second, start=1, end=2, fp32_after_route=True)
    with autocast():
        dense = second(x, t, y)
        tm(x, t, y)  # traced and planned under autocast
        routed = tm(x, t, y)
    assert routed.dtype == dense.dtype == BF16 and routed.shape == dense.shape
    tm.eval()
    with autocast():
        assert torch.equal(tm(x, t, y), second.eval()(x, t, y))
