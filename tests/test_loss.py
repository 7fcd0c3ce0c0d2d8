"""The auxiliary route loss: hand-computed cases, properties over shapes and routes, the pixel->token map."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import treadfx
from treadfx.models.dit import DiT


def tiny_dit(channels: int = 1, size: int = 4, patch: int = 2, depth: int = 4) -> DiT:
    torch.manual_seed(0)
    return DiT(input_size=size, patch_size=patch, in_channels=channels, hidden_size=16, depth=depth, num_heads=2,
               num_classes=3, class_dropout_prob=0.0, learn_sigma=False, zero_init=False)


def call(tm, batch: int, channels: int = 1, size: int = 4):
    x = torch.randn(batch, channels, size, size)
    return tm(x, torch.rand(batch), torch.zeros(batch, dtype=torch.long)), x


def test_hand_computed_route_loss_from_a_pixel_loss_map():
    tm = treadfx.transform(tiny_dit(), routes=[(0, 1, 0.5), (2, 2, 0.25)])  # 4 tokens: keep 2, keep 3
    with treadfx.fixed_routes(tm, [torch.tensor([[1, 3]]), torch.tensor([[0, 1, 2]])]):
        call(tm, 1)
    loss_map = torch.arange(16.0).reshape(1, 1, 4, 4)
    # tokens are 2x2 patches in row-major order: means 2.5 (0,1,4,5), 4.5, 10.5, 12.5
    expected = ((4.5 + 12.5) / 2 + (2.5 + 4.5 + 10.5) / 3) / 2
    out = treadfx.route_loss(tm, loss_map)
    assert out.routed and math.isclose(out.total.item(), expected, rel_tol=1e-6)
    assert math.isclose(out.per_route[0].item(), 8.5, rel_tol=1e-6)
    assert math.isclose(out.per_route[1].item(), 17.5 / 3, rel_tol=1e-6)
    token_space = torch.tensor([[2.5, 4.5, 10.5, 12.5]])
    assert math.isclose(treadfx.route_loss(tm, token_space).total.item(), expected, rel_tol=1e-6)


def test_hand_computed_mae_term():
    tm = treadfx.transform(tiny_dit(channels=2, size=2, patch=1), routes=[(0, 1, 0.5)], mae_weight=0.1)
    with treadfx.fixed_routes(tm, [torch.tensor([[0, 3]])]):  # skips tokens 1 and 2
        call(tm, 1, channels=2, size=2)
    # token n = pixel n (patch 1); channels (a, b). MAE normalisation of (a, b): mean (a+b)/2, unbiased var (a-b)^2/2
    target = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[2.0, 1.0], [2.0, 7.0]]]])  # token 1: (1, 1); token 2: (2, 2)
    pred = torch.zeros_like(target)
    pred[0, :, 1, 0] = torch.tensor([0.5, -0.5])  # token 2
    # token 1: (1,1) -> var 0 -> normalised (0, 0); error vs pred (0, 0) = 0
    # token 2: (2,2) -> normalised (0, 0); error vs (0.5, -0.5) = mean(0.25, 0.25) = 0.25
    loss_map = torch.ones(1, 2, 2, 2)
    out = treadfx.route_loss(tm, loss_map, pred=pred, target=target)
    assert math.isclose(out.mae.item(), (0.0 + 0.25) / 2, rel_tol=1e-5)
    assert math.isclose(out.total.item(), 1.0 + 0.1 * 0.125, rel_tol=1e-5)


def test_mae_weight_needs_prediction_and_target():
    tm = treadfx.transform(tiny_dit(), routes=[(0, 1, 0.5)])
    call(tm, 2)
    with pytest.raises(treadfx.TransformError, match=re.escape(
            "mae_weight=0.1 needs the prediction and the reconstruction target.")):
        treadfx.route_loss(tm, torch.ones(2, 1, 4, 4), mae_weight=0.1)


def test_no_routing_reduces_to_the_plain_mean():
    tm = treadfx.transform(tiny_dit(), routes=[(0, 1, 0.5)])
    loss_map = torch.rand(3, 1, 4, 4)
    call(tm, 3)
    assert treadfx.route_loss(tm, loss_map).routed
    tm.eval()
    call(tm, 3)
    out = treadfx.route_loss(tm, loss_map)
    assert not out.routed and torch.allclose(out.total, loss_map.mean())
    tm.train()
    treadfx.set_ratio(tm, 0.0)
    call(tm, 3)
    out = treadfx.route_loss(tm, loss_map)
    assert not out.routed and torch.allclose(out.total, loss_map.mean())


def test_route_loss_before_any_forward_is_the_plain_mean():
    tm = treadfx.transform(tiny_dit(), routes=[(0, 1, 0.5)], mae_weight=0.1)
    loss_map = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = treadfx.route_loss(tm, loss_map)
    assert not out.routed and out.total.item() == 7.5 and out.per_route == []
    assert out.mae is not None and out.mae.item() == 0.0  # as after a forward that routed nothing
    assert treadfx.route_loss(tm, loss_map, mae_weight=0.0).mae is None


@st.composite
def loss_cases(draw):
    patch = draw(st.sampled_from([1, 2]))
    grid = draw(st.integers(2, 4))
    channels = draw(st.integers(1, 3))
    depth = draw(st.integers(2, 5))
    n = grid * grid
    cuts = sorted(draw(st.lists(st.integers(0, depth - 1), min_size=2, max_size=2 * min(2, depth // 2 or 1),
                                unique=True)))
    cuts = cuts[: len(cuts) // 2 * 2]
    routes = [(cuts[i], cuts[i + 1], draw(st.sampled_from([0.25, 0.5, 0.75]))) for i in range(0, len(cuts), 2)]
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 1000))
    return patch, grid, channels, depth, n, routes, batch, seed


@given(loss_cases())
def test_route_loss_matches_the_formula(case):
    patch, grid, channels, depth, n, routes, batch, seed = case
    torch.manual_seed(seed)
    m = DiT(input_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=16, depth=depth,
            num_heads=2, num_classes=3, class_dropout_prob=0.0, learn_sigma=False, zero_init=False)
    tm = treadfx.transform(m, routes=routes)
    x = torch.randn(batch, channels, grid * patch, grid * patch)
    tm(x, torch.rand(batch), torch.zeros(batch, dtype=torch.long))
    records = treadfx.last_routes(tm)
    loss_map = torch.rand(batch, channels, grid * patch, grid * patch)
    out = treadfx.route_loss(tm, loss_map)
    # independent: per-token means by explicit loops over patches
    per_token = torch.empty(batch, n)
    for b in range(batch):
        for i in range(grid):
            for j in range(grid):
                per_token[b, i * grid + j] = loss_map[b, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].mean()
    terms = []
    for rec in records:
        if rec.kept is None:
            continue
        kept_vals = [per_token[b, k].item() for b in range(batch) for k in rec.kept[b].tolist()]
        terms.append(sum(kept_vals) / len(kept_vals))
    expected = sum(terms) / len(terms) if terms else loss_map.mean().item()
    assert math.isclose(out.total.item(), expected, rel_tol=1e-5, abs_tol=1e-6)


@functools.cache
def keep_mask_model(ratio: float):
    """The transformed model of the keep-mask property, one per ratio: examples only read it (their batch sizes
    are traced once each), and ``keep_tokens`` restores its state on exit."""
    return treadfx.transform(tiny_dit(size=8), routes=[(0, 1, ratio), (2, 3, ratio)])  # 16 tokens, keeps 12 or 8


@given(st.integers(1, 3), st.sampled_from([0.25, 0.5]), st.data())
def test_keep_mask_in_pixel_space_is_never_routed(batch, ratio, data):
    tm = keep_mask_model(ratio)
    # at most 6 marked pixels per sample, so at most 6 marked tokens: every route can keep them all
    pixels = data.draw(st.lists(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=6),
                                min_size=batch, max_size=batch))
    mask = torch.zeros(batch, 8, 8, dtype=torch.bool)
    marked = torch.zeros(batch, 16, dtype=torch.bool)
    for b, points in enumerate(pixels):
        for i, j in points:
            mask[b, i, j] = True
            marked[b, (i // 2) * 4 + j // 2] = True  # token n is the n-th 2x2 patch in row-major order
    with treadfx.keep_tokens(tm, mask):
        for _ in range(4):
            call(tm, batch, size=8)
            for rec in treadfx.last_routes(tm):
                skipped = rec.skipped_mask(batch)
                assert not (skipped & marked).any()


def test_keep_mask_with_more_tokens_than_a_route_keeps():
    tm = treadfx.transform(tiny_dit(), routes=[(0, 1, 0.75)])  # keeps 1 of 4
    with pytest.raises(treadfx.TokenCountError, match=re.escape(
            "the keep mask marks 2 tokens of one sample, but route 0 keeps only 1 of 4; marked tokens would be "
            "routed. Fix: lower the route ratio to at most 0.500, or mark fewer tokens.")):
        with treadfx.keep_tokens(tm, torch.tensor([[True, False, True, False]])):
            call(tm, 1)


def test_models_without_a_patch_convolution_take_token_space_losses():
    class Unfolded(nn.Module):
        """Patchifies with unfold + Linear (no convolution): pixels -> tokens is not derivable."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)])
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            tokens = nn.functional.unfold(x, 2, stride=2).transpose(1, 2)
            h = self.embed(tokens)
            for b in self.blocks:
                h = h + b(h)
            return self.head(h)

    tm = treadfx.transform(Unfolded(), start=0, end=1)
    tm(torch.randn(2, 1, 4, 4))
    assert treadfx.token_map(tm).kind == "unknown"
    with pytest.raises(treadfx.TransformError, match=re.escape(
            "got a tensor of shape [2, 1, 4, 4], but treadfx cannot map pixels to tokens for this model: unknown "
            "(no patch-embedding convolution is applied to the image input); pass token-space [B, N] tensors. "
            "Fix: pass a token-space tensor of shape [B, 4].")):
        treadfx.route_loss(tm, torch.ones(2, 1, 4, 4))
    assert treadfx.route_loss(tm, torch.ones(2, 4)).total.item() == 1.0


def test_token_map_is_derived_from_the_patch_embedding():
    tm = treadfx.transform(tiny_dit(channels=3, size=8, patch=4), routes=[(0, 1, 0.5)], aux_loss=True)
    call(tm, 1, channels=3, size=8)
    tmap = treadfx.token_map(tm)
    assert (tmap.kind, tmap.patch, tmap.grid) == ("patch", (4, 4), (2, 2))
    assert torch.equal(tmap.order, torch.arange(4))
    x = torch.arange(3 * 64.0).reshape(1, 3, 8, 8)
    patches = tmap.patchify(x)
    assert patches.shape == (1, 4, 48)
    assert torch.equal(patches[0, 1], x[0, :, 0:4, 4:8].reshape(-1))  # token 1 = top-right patch, channel-major
