"""CompVis/tread, tiny: the TREAD authors' DiT with their own router, and the EDM training loss it is trained
with (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models").

Written from the paper and the public structure of the official code: timm-style blocks (fused-qkv attention,
tanh-GELU MLP) with adaLN-Zero conditioning on ``t + y``, a label embedder that validates its labels
(``labels.max() <= 999``: data-dependent Python) and drops them with probability ``class_drop_prob`` (a
forward keyword), and, with ``enable_routing=True``, TREAD by hand: before block ``start`` the router draws
``argsort(rand(B, N))`` from the global RNG and keeps the first ``N - int(N * ratio)`` tokens of that
permutation, in that order; after block ``end`` the processed kept tokens go back into a copy of the stream
saved at route-out. Routing runs in training (or when forced), like the official forward.

Left out of the tiny copy: the official ``@torch.compile`` on the block forwards and the fp32 (autocast off)
block after each route, which is a CUDA-autocast detail.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from treadfx.models.dit import get_2d_sincos_pos_embed


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, size: int, patch: int, channels: int, dim: int):
        super().__init__()
        self.patch_size = (patch, patch)
        self.num_patches = (size // patch) ** 2
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq: int = 64):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """One extra row for the dropped ("null") label; drops labels with probability ``class_drop_prob``."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels, class_drop_prob=0.1):
        if labels.dim() == 2 and labels.size(1) == self.num_classes:  # one-hot labels are accepted
            labels = labels.argmax(dim=1)
        elif labels.dim() != 1:
            raise ValueError(f"labels must be [B] or [B, {self.num_classes}], got {tuple(labels.shape)}")
        assert labels.max() <= 999  # the official sanity check: data-dependent control flow
        if class_drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < class_drop_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + a1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, g1))
        return x + a2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, g2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Router:
    """The official TREAD router's behaviour: a random permutation per sample, its first tokens kept."""

    @staticmethod
    def draw(x: torch.Tensor, ratio: float) -> torch.Tensor:
        B, N, _ = x.shape
        keep = N - int(N * ratio)
        return torch.argsort(torch.rand(B, N, device=x.device), dim=1)[:, :keep]

    @staticmethod
    def start_route(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    @staticmethod
    def end_route(kept_x: torch.Tensor, ids_keep: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        out = saved.clone()
        out[torch.arange(saved.shape[0])[:, None], ids_keep] = kept_x
        return out


class TreadDiT(nn.Module):
    """``forward(x, t, y, class_drop_prob=0.0, force_routing=False)``; ``routes`` are dicts with
    ``start_layer_idx``, ``end_layer_idx``, ``selection_ratio`` as in the official configs."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2,
                 mlp_ratio=2.0, num_classes=10, enable_routing=False, routes=None):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.enable_routing, self.routes = enable_routing, list(routes or [])
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = int(self.x_embedder.num_patches ** 0.5)
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.router = Router()

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, class_drop_prob=0.0, force_routing=False):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, class_drop_prob)
        routing = (self.training and self.enable_routing and bool(self.routes)) or force_routing
        r = 0
        for i, block in enumerate(self.blocks):
            if routing and r < len(self.routes) and i == self.routes[r]["start_layer_idx"]:
                saved = x.clone()
                ids_keep = self.router.draw(x, self.routes[r]["selection_ratio"])
                x = self.router.start_route(x, ids_keep)
            x = block(x, c)
            if routing and r < len(self.routes) and i == self.routes[r]["end_layer_idx"]:
                x = self.router.end_route(x, ids_keep, saved)
                r += 1
        return self.unpatchify(self.final_layer(x, c))


def tiny_tread_dit(seed: int = 0, **kwargs) -> TreadDiT:
    """A 16-token model whose adaLN and output layers are random (zero-init would hide the blocks)."""
    torch.manual_seed(seed)
    m = TreadDiT(**kwargs)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(std=0.1)
    return m


class EDMPrecond(nn.Module):
    """EDM preconditioning: ``D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, y)``."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.model, self.sigma_data = model, sigma_data

    def forward(self, x, sigma, y, **model_kwargs):
        sigma = sigma.reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        f = self.model(c_in * x, (sigma.log() / 4).flatten(), y, **model_kwargs)
        return c_skip * x + c_out * f


def edm_loss(net: EDMPrecond, images, labels, p_mean=-1.2, p_std=1.2, **model_kwargs):
    """EDM's training loss: log-normal sigma, the lambda(sigma) weighting (draws sigma, then the noise)."""
    sigma = (torch.randn(images.shape[0], 1, 1, 1) * p_std + p_mean).exp()
    weight = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    noise = torch.randn_like(images) * sigma
    denoised = net(images + noise, sigma, labels, **model_kwargs)
    return (weight * (denoised - images) ** 2).mean()
