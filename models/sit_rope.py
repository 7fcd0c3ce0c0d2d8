"""SiT / LightningDiT-style diffusion transformer with 2D rotary position embedding (RoPE).

As in LightningDiT (Yao et al., "Reconstruction vs. Generation", 2025), which
builds on SiT (Ma et al., 2024): patch embedding, timestep + class embedding,
adaLN-Zero blocks with QK-norm (RMSNorm), SwiGLU feed-forward, RMSNorm block
norms, and *axial 2D RoPE* applied to q and k inside attention (EVA-02 /
LightningDiT ``VisionRotaryEmbeddingFast``: the first half of each head
rotates with the token's row, the second half with its column, frequency
pairs interleaved).

The RoPE ``cos``/``sin`` tables are computed in the top-level ``forward`` and
passed to every block, so a graph pass sees them as token-aligned side inputs:

* ``forward(x, t, y)``: tables ``[N, head_dim]`` from the patch grid (no batch
  dimension, like diffusers' Flux RoPE);
* ``forward(x, t, y, pos=pos)`` with per-sample position ids ``pos: [B, N, 2]``
  (row, column; e.g. crops at random offsets or packed aspect ratios): batched
  tables ``[B, N, head_dim]``.

Blocks accept both (``[N, d]`` broadcasts against q ``[B, H, N, d]``;
``[B, N, d]`` is unsqueezed on the head axis).

Per-token conditioning ("diffusion forcing" style): ``t`` may be ``[B]`` (one
noise level per sample) or ``[B, N]`` (one per token); in the second case the
conditioning ``c`` is ``[B, N, D]`` and every block modulates each token with
its own shift/scale/gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed

__all__ = [
    "SiTRoPE", "SiTRoPEBlock", "SiTRoPEConfig", "SIT_ROPE_SIZES", "sit_rope", "tiny_sit_rope",
    "rope_2d_tables", "apply_rope", "rotate_half", "grid_positions",
]


def grid_positions(grid: int, device=None) -> torch.Tensor:
    """Row-major (row, column) position ids of a ``grid x grid`` patch grid, ``[grid*grid, 2]`` float."""
    r = torch.arange(grid, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def rope_2d_tables(pos: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D RoPE: position ids ``[..., N, 2]`` -> ``(cos, sin)``, each ``[..., N, head_dim]``.

    The first ``head_dim / 2`` channels rotate with the row, the others with
    the column; each frequency covers an interleaved pair of channels.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32, device=pos.device) / quarter)
    pos = pos.float()
    ang = torch.cat([pos[..., 0:1] * freqs, pos[..., 1:2] * freqs], dim=-1)  # [..., N, head_dim / 2]
    ang = ang.repeat_interleave(2, dim=-1)  # [..., N, head_dim]
    return ang.cos(), ang.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation by 90 degrees of every interleaved pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [B, H, N, d]`` by tables ``[N, d]`` (shared by the batch) or ``[B, N, d]`` (per sample)."""
    if cos.ndim == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; shift/scale are ``[B, 1, D]`` (per sample) or ``[B, N, D]`` (per token)."""
    return x * (1 + scale) + shift


class RoPEAttention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm and 2D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = True):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (LightningDiT): ``w3(silu(w1 x) * w2 x)`` with a fused ``w12``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class SiTRoPEBlock(nn.Module):
    """adaLN-Zero block with RoPE attention and SwiGLU; ``forward(x, c, cos, sin)``.

    ``c`` is ``[B, D]`` (per-sample conditioning) or ``[B, N, D]`` (per-token);
    ``cos``/``sin`` are ``[N, head_dim]`` or ``[B, N, head_dim]``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = RoPEAttention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * mlp_ratio * hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if c.ndim == 2:
            c = c.unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear projection of each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim == 2:
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class SiTRoPEConfig:
    """The constructor arguments of ``SiTRoPE``."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    rope_theta: float = 10000.0
    qk_norm: bool = True
    abs_pos_embed: bool = False


class SiTRoPE(nn.Module):
    """SiT / LightningDiT with 2D RoPE; ``forward(x, t, y, pos=None)``.

    ``x: [B, C, H, W]``; ``t: [B]`` or per-token ``[B, N]`` (diffusion forcing);
    ``y: [B]`` class labels; ``pos: [B, N, 2]`` optional per-sample (row, col)
    position ids (default: the patch grid, giving tables without batch dim).
    Returns ``[B, out_channels, H, W]``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        abs_pos_embed: bool = False,
        zero_init: bool = True,
    ):
        super().__init__()
        self.config = SiTRoPEConfig(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                                    class_dropout_prob, num_classes, learn_sigma, rope_theta, qk_norm, abs_pos_embed)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid = self.x_embedder.grid_size
        self.register_buffer("grid_pos", grid_positions(self.grid), persistent=False)
        if abs_pos_embed:  # LightningDiT keeps a fixed sin-cos embedding besides RoPE
            pe = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, self.grid)).float().unsqueeze(0)
            self.pos_embed = nn.Parameter(pe, requires_grad=False)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList([SiTRoPEBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights(zero_init)

    def initialize_weights(self, zero_init: bool = True) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if zero_init:  # adaLN-Zero: every block starts as the identity
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.linear.weight, 0)
            nn.init.constant_(self.final_layer.linear.bias, 0)

    def rope(self, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables: ``[N, head_dim]`` from the grid, or ``[B, N, head_dim]`` from per-sample ``pos``."""
        return rope_2d_tables(self.grid_pos if pos is None else pos, self.head_dim, self.rope_theta)

    def embed_conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` for ``t: [B]``; ``[B, N, D]`` for per-token ``t: [B, N]``."""
        y = self.y_embedder(y, self.training)
        if t.ndim == 2:
            B, N = t.shape
            return self.t_embedder(t.reshape(B * N)).reshape(B, N, -1) + y.unsqueeze(1)
        return self.t_embedder(t) + y

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (grid from the configuration, not from N)."""
        c, p, h = self.out_channels, self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.embed_conditioning(t, y)
        cos, sin = self.rope(pos)
        for block in self.blocks:
            x = block(x, c, cos, sin)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


SIT_ROPE_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def sit_rope(size: str = "XL", patch: int = 2, **kwargs) -> SiTRoPE:
    """A SiT/LightningDiT with 2D RoPE of a paper size ('S', 'B', 'L', 'XL'); kwargs override anything."""
    if size not in SIT_ROPE_SIZES:
        raise ValueError(f"unknown SiT size {size!r}; choose one of {sorted(SIT_ROPE_SIZES)}")
    cfg = dict(SIT_ROPE_SIZES[size], patch_size=patch)
    cfg.update(kwargs)
    return SiTRoPE(**cfg)


def tiny_sit_rope(depth: int = 6, hidden_size: int = 32, num_heads: int = 2, grid: int = 4, patch_size: int = 2,
                  in_channels: int = 4, num_classes: int = 10, seed: int = 0, **kwargs) -> SiTRoPE:
    """A tiny SiT-RoPE for tests: random (not zero) adaLN and final layers, so every block matters; no label dropout."""
    torch.manual_seed(seed)
    m = SiTRoPE(input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                depth=depth, num_heads=num_heads, mlp_ratio=2.0, class_dropout_prob=0.0, num_classes=num_classes,
                zero_init=False, **kwargs)
    for blk in m.blocks:
        nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
        nn.init.normal_(blk.adaLN_modulation[-1].bias, std=0.05)
    return m
