"""LightningDiT (hustvl/LightningDiT) as treadfx sees it: its RoPE is a *module* passed to every block.

The tiny model below is written fresh in LightningDiT's structure (from its
paper and public model layout): a patch embedder, timestep and label
embedders, blocks with RMSNorm, adaLN modulation, SwiGLU feed-forward and
2D RoPE applied to queries and keys by a ``VisionRotaryEmbeddingFast``-style
module (``[N, d]`` cos/sin buffers, ``t * cos + rotate_half(t) * sin``) that
the forward passes to every block as an argument; the timestep embedder and
the final layer are ``torch.compile``d submodules.  The routed blocks must get
a copy of that module holding the kept rows of its tables.  Each test checks
the routed model against a hand-written TREAD forward on the kept indices
treadfx reports (``last_routes``), output and every parameter gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx

D, HEADS, DEPTH, SIZE, PATCH, CIN, CLASSES = 32, 2, 8, 8, 2, 4, 10
N = (SIZE // PATCH) ** 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Pairs (a, b) of the last dim -> (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class RotaryEmbedding2D(nn.Module):
    """2D RoPE over an h x w patch grid: row frequencies on the first half of a head, column on the second;
    ``[N, head_dim]`` cos/sin buffers, applied to ``[B, H, N, head_dim]`` queries and keys."""

    def __init__(self, half_dim: int, side: int):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, half_dim, 2).float() / half_dim))
        pos = torch.arange(side).float()
        f = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # [side, half_dim]
        grid = torch.cat([f[:, None, :].expand(side, side, half_dim), f[None, :, :].expand(side, side, half_dim)], -1)
        self.register_buffer("freqs_cos", grid.cos().reshape(side * side, -1))
        self.register_buffer("freqs_sin", grid.sin().reshape(side * side, -1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * hidden)
        self.w3 = nn.Linear(hidden, d)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = nn.RMSNorm(d // heads)
        self.k_norm = nn.RMSNorm(d // heads)
        self.proj = nn.Linear(d, d)

    def forward(self, x, rope=None):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LightningBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(d)
        self.attn = Attention(d, heads)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = SwiGLU(d, int(2 / 3 * 4 * d))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, feat_rope=None):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1), rope=feat_rope)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class TimestepEmbedder(nn.Module):
    def __init__(self, d: int, freq: int = 16):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        a = t[:, None].float() * f[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], dim=-1))


class FinalLayer(nn.Module):
    def __init__(self, d: int, out: int):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.linear = nn.Linear(d, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TinyLightningDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Conv2d(CIN, D, PATCH, PATCH)
        self.t_embedder = torch.compile(TimestepEmbedder(D), backend="eager")
        self.y_embedder = nn.Embedding(CLASSES + 1, D)
        self.feat_rope = RotaryEmbedding2D(D // HEADS // 2, SIZE // PATCH)
        self.blocks = nn.ModuleList([LightningBlock(D, HEADS) for _ in range(DEPTH)])
        self.final_layer = torch.compile(FinalLayer(D, PATCH * PATCH * CIN), backend="eager")

    def embed(self, x, t, y):
        return self.x_embedder(x).flatten(2).transpose(1, 2), self.t_embedder(t) + self.y_embedder(y)

    def unpatchify(self, x, B):
        s = SIZE // PATCH
        x = x.reshape(B, s, s, PATCH, PATCH, CIN).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, CIN, SIZE, SIZE)

    def forward(self, x, t, y):
        B = x.shape[0]
        x, c = self.embed(x, t, y)
        for block in self.blocks:
            x = block(x, c, feat_rope=self.feat_rope)
        return self.unpatchify(self.final_layer(x, c), B)


class KeptRope(nn.Module):
    """Hand-written RoPE on kept rows: ``cos``/``sin`` already indexed (``[K, d]`` or ``[B, 1, K, d]``)."""

    def __init__(self, cos, sin):
        super().__init__()
        self.cos, self.sin = cos, sin

    def forward(self, t):
        return t * self.cos + rotate_half(t) * self.sin


def reference(model: TinyLightningDiT, x, t, y, kept: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """TREAD by hand: after block start-1 keep the tokens ``kept`` ([B, K] or [K]), run blocks start..end on
    them with the RoPE rows of those tokens, put them back into the stream saved before block start."""
    B = x.shape[0]
    h, c = model.embed(x, t, y)
    rope = model.feat_rope
    per_sample = kept.ndim == 2
    rows = kept if per_sample else kept.unsqueeze(0).expand(B, -1)
    if per_sample:
        kept_rope = KeptRope(rope.freqs_cos[kept].unsqueeze(1), rope.freqs_sin[kept].unsqueeze(1))
    else:
        kept_rope = KeptRope(rope.freqs_cos[kept], rope.freqs_sin[kept])
    saved = None
    for i, block in enumerate(model.blocks):
        if i == start:
            saved = h
            h = torch.stack([h[b, rows[b]] for b in range(B)])
        h = block(h, c, feat_rope=kept_rope if start <= i <= end else rope)
        if i == end:
            full = saved.clone()
            for b in range(B):
                full[b, rows[b]] = h[b]
            h = full
    return model.unpatchify(model.final_layer(h, c), B)


def _inputs(seed: int = 0):
    """A batch of HEADS samples: a per-sample [B, K, d] table would broadcast against [B, H, K, d] queries
    without an error but pair sample b's rows with head b, so only correct per-sample tables pass."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(HEADS, CIN, SIZE, SIZE, generator=g), torch.rand(HEADS, generator=g),
            torch.randint(0, CLASSES, (HEADS,), generator=g))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


_STEPS: dict[str, tuple] = {}


def _step(selection: str) -> tuple:
    """(selection, base, routed, inputs, output, kept, grads) of one routed training step with the default
    route (blocks 2..-4, i.e. 2..4 here, ratio 0.5); built once per selection for this module's tests."""
    if selection not in _STEPS:
        torch.manual_seed(0)
        base = TinyLightningDiT()
        routed = treadfx.transform(base, selection=selection)
        x, t, y = _inputs()
        routed.train()
        out = routed(x, t, y)
        (kept_rec,) = treadfx.last_routes(routed)
        out.square().mean().backward()
        grads = _grads(routed)
        routed.zero_grad(set_to_none=True)
        _STEPS[selection] = (selection, base, routed, (x, t, y), out.detach(), kept_rec.kept, grads)
    return _STEPS[selection]


@pytest.fixture(params=["auto", "per_sample"])
def routed_step(request):
    return _step(request.param)


def test_routed_step_equals_hand_written_tread(routed_step):
    selection, base, routed, (x, t, y), out, kept, got = routed_step
    # a table without batch dim makes the default selection shared, as for RoPE tensors
    assert kept.shape == ((N // 2,) if selection == "auto" else (HEADS, N // 2))
    if selection == "per_sample":
        assert not torch.equal(kept[0].sort().values, kept[1].sort().values)
    # the same weights, unrouted, driven by hand on the same kept tokens
    ref = reference(base, x, t, y, kept, 2, DEPTH - 4)
    ref.square().mean().backward()
    want = _grads(base)
    base.zero_grad(set_to_none=True)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) == len(list(base.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_is_the_original_bit_for_bit(routed_step):
    _, base, routed, _, _, _, _ = routed_step
    x, t, y = _inputs(5)
    with torch.no_grad():
        want = base(x, t, y)
        routed.eval()
        try:
            got = routed(x, t, y)
        finally:
            routed.train()
    assert torch.equal(got, want)


def test_rope_module_is_reported_as_a_gathered_module_side_input():
    import re

    _, _, routed, inputs, _, _, _ = _step("auto")
    text = str(treadfx.inspect(routed, *inputs))
    assert "module side input" in text and "(m.feat_rope)" in text
    assert "selection: shared" in text
    assert "order:     random" in text  # the copy's rows follow the tokens, so the blocks stay equivariant
    routed_g, predicted_g = re.search(r"routed ([0-9.]+) G \(predicted ([0-9.]+) G\)", text).groups()
    assert routed_g == predicted_g
