"""U-ViT, as in Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models" (CVPR 2023).

Follows the official ``libs/uvit.py``: every input is a token. The time token
(and, for class-conditional models, the label token) is concatenated *before*
the patch tokens on the token axis, a learned position embedding covers all
of them, and the blocks form a U: ``in_blocks`` push their outputs on a skip
stack, a ``mid_block``, then ``out_blocks`` that each pop one long skip and fuse
it with ``skip_linear(cat([x, skip], -1))`` before attention. ``forward``
asserts the token count before dropping the extra tokens and unpatchifying
(grid recovered as ``int(L ** 0.5)`` like the official code), followed by an
optional 3x3 convolution.

``forward(x, timesteps, y=None)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import Mlp

__all__ = ["UViT", "UViTBlock", "UViTConfig", "UVIT_SIZES", "uvit", "tiny_uvit", "timestep_embedding", "unpatchify"]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embeddings ``[B] -> [B, dim]`` (the official code's, from guided diffusion)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def unpatchify(x: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """``[B, L, p*p*C] -> [B, C, h*p, w*p]`` with ``h = w = int(L ** 0.5)`` (einops ``B (h w) (p1 p2 C)``)."""
    patch_size = int((x.shape[2] // channels) ** 0.5)
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1] and patch_size ** 2 * channels == x.shape[2]
    x = x.reshape(x.shape[0], h, w, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(x.shape[0], channels, h * patch_size, w * patch_size)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (fused qkv, scaled dot-product)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, L, C))


class UViTBlock(nn.Module):
    """Pre-norm transformer block; with ``skip=True`` it first fuses a long skip: ``forward(x, skip=None)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    """Image to patch embedding (asserts divisibility like the official code)."""

    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        assert H % self.patch_size == 0 and W % self.patch_size == 0
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class UViTConfig:
    """The constructor arguments of ``UViT``."""

    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    num_classes: int = -1
    conv: bool = True
    skip: bool = True


class UViT(nn.Module):
    """U-ViT; ``forward(x, timesteps, y=None)`` -> ``[B, in_chans, H, W]``.

    Token layout in the blocks: ``[label? | time | patches]`` (``self.extras``
    = 1 or 2 leading extra tokens). Blocks: ``depth // 2`` in-blocks, one
    mid-block, ``depth // 2`` out-blocks with long skips.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        conv: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        self.config = UViTConfig(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                                 mlp_time_embed, num_classes, conv, skip)
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = (nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                         nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else nn.Identity())
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        self.in_blocks = nn.ModuleList([
            UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale)
        self.out_blocks = nn.ModuleList([
            UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, skip=skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1) if conv else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x)
        B, L, D = x.shape

        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim))
        time_token = time_token.unsqueeze(dim=1)
        x = torch.cat((time_token, x), dim=1)
        if y is not None:
            label_emb = self.label_emb(y)
            label_emb = label_emb.unsqueeze(dim=1)
            x = torch.cat((label_emb, x), dim=1)
        x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)

        x = self.mid_block(x)

        for blk in self.out_blocks:
            x = blk(x, skips.pop())

        x = self.norm(x)
        x = self.decoder_pred(x)
        assert x.size(1) == self.extras + L
        x = x[:, self.extras:, :]
        x = unpatchify(x, self.in_chans)
        x = self.final_layer(x)
        return x


UVIT_SIZES = {  # the paper's configurations (Table 1)
    "S": dict(depth=12, embed_dim=512, num_heads=8),
    "M": dict(depth=16, embed_dim=768, num_heads=12),
    "L": dict(depth=20, embed_dim=1024, num_heads=16),
    "H": dict(depth=28, embed_dim=1152, num_heads=16),
}


def uvit(size: str = "M", patch: int = 2, **kwargs) -> UViT:
    """A U-ViT of a paper size ('S', 'M', 'L', 'H'); kwargs override anything (e.g. ``num_classes=1000``)."""
    if size not in UVIT_SIZES:
        raise ValueError(f"unknown U-ViT size {size!r}; choose one of {sorted(UVIT_SIZES)}")
    cfg = dict(UVIT_SIZES[size], patch_size=patch)
    cfg.update(kwargs)
    return UViT(**cfg)


def tiny_uvit(depth: int = 6, embed_dim: int = 32, num_heads: int = 2, grid: int = 4, patch_size: int = 2,
              in_chans: int = 4, num_classes: int = 10, seed: int = 0, **kwargs) -> UViT:
    """A tiny U-ViT for tests (the official init already makes every block non-trivial; weights a bit larger)."""
    torch.manual_seed(seed)
    m = UViT(img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
             num_heads=num_heads, mlp_ratio=2.0, num_classes=num_classes, **kwargs)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.2)
    return m
