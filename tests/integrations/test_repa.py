"""REPA (representation alignment, Yu et al. 2024) trained with TREAD through treadfx.

The model is a tiny SiT built like REPA's: patch embedding, timestep + class conditioning, SiT (adaLN-Zero DiT)
blocks, and projector MLPs applied to the output of block ``encoder_depth - 1``; ``forward`` returns the
velocity prediction and the list of projected features ``zs``, flattening the tokens into the batch for the
projector with the sizes read from the input, as REPA's code does.  The training step is REPA's: the linear
interpolant ``x_t = (1 - t) x + t eps`` with velocity target ``eps - x``, plus the alignment loss, the negative
cosine similarity between projected features and given target features (a frozen encoder's, here random),
averaged over tokens and samples.

With a route that covers block ``encoder_depth - 1`` (REPA's documented settings do), only the kept tokens'
features are computed by the routed blocks; treadfx returns every row and ``treadfx.route_mask`` says which are
fresh.  The one change to the training code: average the alignment loss over ``mask``.  The gradients of both
losses equal, to float64 rounding, those of a hand-written TREAD+REPA step on the same kept indices (features
from the routed block for kept tokens, nothing for skipped ones).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx
from treadfx.models.dit import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, get_2d_sincos_pos_embed

GRID, PATCH, CH, HIDDEN, DEPTH, ENC_DEPTH = 4, 2, 4, 32, 6, 4
START, END = 2, 4  # a route covering block ENC_DEPTH - 1 = 3, as SiT-B/2 with encoder_depth 4 under route 2..8


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (in t's dtype, so the model runs in float64 too) -> MLP."""

    def __init__(self, hidden: int, freq: int = 64):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        freqs = torch.exp(-torch.arange(half, dtype=t.dtype) * (9.210340371976184 / half))
        args = (t * 1000)[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def projector(hidden: int, proj: int, z: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, proj), nn.SiLU(), nn.Linear(proj, proj), nn.SiLU(), nn.Linear(proj, z))


class RepaSiT(nn.Module):
    """SiT with REPA projectors on the output of block ``encoder_depth - 1``; ``forward(x, t, y) -> (v, zs)``."""

    def __init__(self, encoder_depth: int = ENC_DEPTH, z_dims: tuple = (16,), num_classes: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(GRID * PATCH, PATCH, CH, HIDDEN)
        self.t_embedder = TimestepEmbedder(HIDDEN)
        self.y_embedder = LabelEmbedder(num_classes, HIDDEN, 0.0)
        pos = torch.from_numpy(get_2d_sincos_pos_embed(HIDDEN, GRID)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos)
        self.blocks = nn.ModuleList([DiTBlock(HIDDEN, 2, 2.0) for _ in range(DEPTH)])
        self.projectors = nn.ModuleList([projector(HIDDEN, 24, z) for z in z_dims])
        self.final_layer = FinalLayer(HIDDEN, PATCH, CH)
        for m in self.modules():  # random (not zero) adaLN so that every block matters
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.15)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, PATCH, PATCH, CH)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], CH, h * PATCH, w * PATCH)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        x = self.x_embedder(x) + self.pos_embed
        N, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [proj(x.reshape(-1, D)).reshape(N, T, -1) for proj in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


def batch(b: int = 3, seed: int = 5, z_dims: tuple = (16,)):
    """(x, noise, t, y, target features per projector), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CH, GRID * PATCH, GRID * PATCH, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (b,), generator=g)
    targets = [torch.randn(b, GRID * GRID, z, generator=g, dtype=torch.float64) for z in z_dims]
    return x, eps, t, y, targets


def interpolant(x, eps, t):
    """SiT's linear path: x_t = (1 - t) x + t eps, velocity target eps - x."""
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x + tt * eps, eps - x


def neg_cos(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token negative cosine similarity [B, T] (REPA's alignment term)."""
    return -(F.normalize(z, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)


def reference_step(m: RepaSiT, x_t, t, y, targets, kept: torch.Tensor):
    """Hand-written TREAD+REPA on ``m``'s modules with these kept indices [B, K]: (velocity, alignment loss).

    Route-out before block START keeps ``kept``; the projector sees the routed block's output for the kept tokens
    only, and the alignment loss averages over those tokens (skipped tokens contribute nothing)."""
    h = m.x_embedder(x_t) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, False)
    idx = kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])
    align = None
    for i, block in enumerate(m.blocks):
        if i == START:
            saved, h = h, h.gather(1, idx)
        h = block(h, c)
        if (i + 1) == m.encoder_depth:
            terms = []
            for proj, target in zip(m.projectors, targets):
                tk = target.gather(1, kept.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
                terms.append(neg_cos(proj(h), tk).mean())
            align = sum(terms) / len(terms)
        if i == END:
            h = saved.scatter(1, idx, h)
    return m.unpatchify(m.final_layer(h, c)), align


def params(m):
    return [p for p in m.parameters() if p.requires_grad]


def grads(loss, m):
    return torch.autograd.grad(loss, params(m), allow_unused=True, retain_graph=True)


def assert_same_grads(got, want, what: str):
    for k, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None or torch.count_nonzero(a if a is not None else b) == 0, (what, k)
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{what}: parameter {k}")


def test_repa_alignment_loss_with_route_mask_has_the_gradient_of_hand_written_tread_repa():
    m = RepaSiT().double()  # one target encoder, one projector (REPA's default)
    tm = treadfx.transform(m, start=START, end=END, ratio=0.5)
    x, eps, t, y, targets = batch()
    x_t, v_target = interpolant(x, eps, t)
    with pytest.warns(treadfx.SideExitWarning, match=r"output\[1\]\[0\].*`blocks\.3`.*treadfx\.route_mask"):
        v, zs = tm(x_t, t, y)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (3, 8)

    # the one change to REPA's loss: average over the fresh tokens
    align_terms = []
    for z, target in zip(zs, targets):
        mask = treadfx.route_mask(tm, z)
        align_terms.append((neg_cos(z, target) * mask).sum() / mask.sum())
    align = sum(align_terms) / len(align_terms)
    denoise = F.mse_loss(v, v_target)

    v_ref, align_ref = reference_step(m, x_t, t, y, targets, rec.kept)
    denoise_ref = F.mse_loss(v_ref, v_target)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(align, align_ref, rtol=1e-12, atol=1e-12)
    assert_same_grads(grads(align, m), grads(align_ref, m), "alignment loss")
    assert_same_grads(grads(denoise, m), grads(denoise_ref, m), "denoising loss")
    # REPA's full objective
    lam = 0.5
    assert_same_grads(grads(denoise + lam * align, m), grads(denoise_ref + lam * align_ref, m), "REPA objective")


def test_without_the_mask_the_alignment_gradient_differs_and_the_stale_rows_are_the_route_out_features():
    """What the mask fixes: REPA's unmasked mean trains block 0..1 through stale rows (proj of the route-out
    stream) and weighs the routed blocks by K/N."""
    m = RepaSiT().double()
    tm = treadfx.transform(m, start=START, end=END, ratio=0.5, side_exits="full")
    x, eps, t, y, targets = batch(b=2, seed=7)
    x_t, _ = interpolant(x, eps, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", treadfx.SideExitWarning)  # side_exits given: no warning
        _, zs = tm(x_t, t, y)
    mask = treadfx.route_mask(tm, zs[0])
    h = m.x_embedder(x_t) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, False)
    for block in m.blocks[:START]:
        h = block(h, c)
    stale = m.projectors[0](h)
    torch.testing.assert_close(zs[0][~mask], stale[~mask], rtol=1e-12, atol=1e-12)
    plain = neg_cos(zs[0], targets[0]).mean()
    (rec,) = treadfx.last_routes(tm)
    _, ref = reference_step(m, x_t, t, y, targets[:1], rec.kept)
    g_plain, g_ref = grads(plain, m), grads(ref, m)
    first = next(k for k, p in enumerate(params(m)) if p is m.blocks[0].attn.qkv.weight)
    assert not torch.allclose(g_plain[first], g_ref[first])


def test_repa_with_kept_rows_only_is_refused_because_of_its_fixed_size_reshape():
    tm = treadfx.transform(RepaSiT(), start=START, end=END, ratio=0.5, side_exits="kept")
    x, eps, t, y, _ = batch()
    with pytest.raises(treadfx.SideExitError, match=r"output\[1\]\[0\].*\[3, 8, 16\] was expected.*reshape.*side_exits='full'.*route_mask"):
        tm(x.float(), t.float(), y)


def test_repa_step_flops_drop_as_inspect_predicts():
    """The REPA step (velocity loss + masked alignment loss) saves what ``treadfx.inspect`` predicts: the routed
    blocks' work on the skipped tokens; the projector runs on every row in both steps."""
    from integrations.models_common import assert_flop_saving_as_predicted, step_flops

    m = RepaSiT()
    tm = treadfx.transform(m, start=START, end=END, ratio=0.5, side_exits="full")
    data = batch()
    x, eps, t, y = data[0].float(), data[1].float(), data[2].float(), data[3]
    targets = [tg.float() for tg in data[4]]
    x_t, v_target = interpolant(x, eps, t)

    def loss(model, masked: bool):
        v, zs = model(x_t, t, y)
        terms = []
        for z, target in zip(zs, targets):
            mask = treadfx.route_mask(model, z) if masked else torch.ones(z.shape[:2], dtype=torch.bool)
            terms.append((neg_cos(z, target) * mask).sum() / mask.sum())
        return F.mse_loss(v, v_target) + 0.5 * sum(terms) / len(terms)

    report = treadfx.inspect(tm, x_t, t, y)
    routed = step_flops(lambda: loss(tm, True), tm)
    dense = step_flops(lambda: loss(m, False), m)
    assert_flop_saving_as_predicted(report, dense, routed)
