"""A plain ViT encoder (timm ``VisionTransformer`` style) used as a diffusion backbone.

timm layout: patch embedding, a class token and optional register tokens
(Darcet et al., "Vision Transformers Need Registers") concatenated on the
token axis before the patch tokens (``_pos_embed``: ``cat([cls, reg, x])``),
a learned position embedding (over prefix + patch tokens, or over the patch
tokens only with ``no_embed_class=True``),
pre-norm blocks with optional LayerScale, and a final norm.

For diffusion, conditioning enters *in context* (DiT paper's in-context
conditioning): the timestep and class embeddings are added to the class
token, so the blocks take only ``x``. The head drops the extra tokens,
projects every patch token to ``p*p*C`` values and unpatchifies.

``blocks`` is an ``nn.Sequential`` called as ``self.blocks(x)`` (timm's
default) or, with ``sequential=False``, an ``nn.ModuleList`` looped over.
Registers go after the class token (timm, DINOv2) or, with
``register_position="back"``, after the patch tokens.

``forward(x, t, y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .dit import Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder

__all__ = ["DiffusionViT", "ViTBlock", "ViTConfig", "diffusion_vit", "tiny_vit"]


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT / timm ``LayerScale``)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """timm ``Block``: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``; ``forward(x)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


@dataclass(frozen=True)
class ViTConfig:
    """The constructor arguments of ``DiffusionViT``."""

    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    register_position: str = "front"
    init_values: float | None = None
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    sequential: bool = True


class DiffusionViT(nn.Module):
    """ViT encoder with class / register tokens as a diffusion backbone; ``forward(x, t, y)``.

    Token layout in the blocks: ``[cls? | reg x R | patches]`` (or
    ``[cls? | patches | reg x R]`` with ``register_position="back"``).
    Conditioning is added to the class token; without a class token it is
    added to every patch token.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        register_position: str = "front",
        init_values: float | None = None,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        sequential: bool = True,
    ):
        super().__init__()
        if register_position not in ("front", "back"):
            raise ValueError(f"register_position must be 'front' or 'back', got {register_position!r}")
        self.config = ViTConfig(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, class_token,
                                reg_tokens, no_embed_class, register_position, init_values, num_classes,
                                class_dropout_prob, sequential)
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.no_embed_class = no_embed_class
        self.register_position = register_position
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.num_prefix_tokens = int(class_token) + (reg_tokens if register_position == "front" else 0)
        self.num_suffix_tokens = reg_tokens if register_position == "back" else 0
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = LabelEmbedder(num_classes, embed_dim, class_dropout_prob)
        blocks = [ViTBlock(embed_dim, num_heads, mlp_ratio, True, init_values) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks) if sequential else nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        self._init()

    def _init(self) -> None:
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """timm's ``_pos_embed``, with the conditioning added to the class token."""
        B = x.shape[0]
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(B, -1, -1) + cond.unsqueeze(1))
        else:
            x = x + cond.unsqueeze(1)
        if self.reg_token is not None and self.register_position == "front":
            to_cat.append(self.reg_token.expand(B, -1, -1))
        if self.no_embed_class:
            x = x + self.pos_embed
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + self.pos_embed
        if self.reg_token is not None and self.register_position == "back":
            x = torch.cat([x, self.reg_token.expand(B, -1, -1)], dim=1)
        return x

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p, h = self.in_chans, self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cond = self.t_embedder(t) + self.y_embedder(y, self.training)
        x = self._pos_embed(x, cond)
        if isinstance(self.blocks, nn.Sequential):
            x = self.blocks(x)
        else:
            for blk in self.blocks:
                x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x, t, y)
        n = x.shape[1] - self.num_prefix_tokens - self.num_suffix_tokens
        x = x[:, self.num_prefix_tokens: self.num_prefix_tokens + n]
        return self.unpatchify(self.head(x))


def diffusion_vit(size: str = "B", patch: int = 2, **kwargs) -> DiffusionViT:
    """A ViT of a standard size ('S', 'B', 'L'); kwargs override anything (e.g. ``reg_tokens=4``)."""
    sizes = {"S": dict(depth=12, embed_dim=384, num_heads=6), "B": dict(depth=12, embed_dim=768, num_heads=12),
             "L": dict(depth=24, embed_dim=1024, num_heads=16)}
    if size not in sizes:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(sizes)}")
    cfg = dict(sizes[size], patch_size=patch)
    cfg.update(kwargs)
    return DiffusionViT(**cfg)


def tiny_vit(depth: int = 6, embed_dim: int = 32, num_heads: int = 2, grid: int = 4, patch_size: int = 2,
             in_chans: int = 4, num_classes: int = 10, seed: int = 0, **kwargs) -> DiffusionViT:
    """A tiny ViT for tests: larger random weights and extra tokens, so every block and token matters."""
    torch.manual_seed(seed)
    kwargs.setdefault("reg_tokens", 3)
    m = DiffusionViT(img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                     depth=depth, num_heads=num_heads, mlp_ratio=2.0, num_classes=num_classes, class_dropout_prob=0.0,
                     **kwargs)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.2)
    for p in (m.cls_token, m.reg_token):
        if p is not None:
            nn.init.normal_(p, std=1.0)
    return m
