"""A state-space (Mamba-style) diffusion backbone in pure PyTorch.

The mixer is Mamba's selective SSM (Gu & Dao, 2023): an input projection
into a gated branch ``z`` and a scanned branch, a causal depthwise
convolution, and a *selective* scan whose step size ``dt`` and input/output
matrices ``B``, ``C`` are computed from each token::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

The scan runs over the token sequence in order, so the block is causal and
ORDER DEPENDENT: permuting the input tokens does not permute the output.
Two implementations give the same result: ``scan="parallel"`` (default,
fast on CPU: the closed form ``y_t = sum_{s<=t} C_t . exp(sum_{s<r<=t} dt_r A)
dt_s B_s x_s`` with a masked segment-sum, as in Mamba-2's SSD "naive" form;
every exponent is <= 0, so it is stable) and ``scan="sequential"`` (the
recurrence, token by token).

The wrapper is DiT-like (as DiM / DiS, the state-space diffusion models of
the TREAD paper's Mamba experiments): patch embedding, fixed sin-cos position
embedding, timestep + class conditioning through adaLN-Zero, a ``ModuleList``
of SSM blocks (mixer + MLP), a final adaLN layer and unpatchify.
``forward(x, t, y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, modulate

__all__ = [
    "DiffusionSSM", "SSMBlock", "SelectiveSSM", "SSMConfig", "diffusion_ssm", "tiny_ssm",
    "selective_scan_parallel", "selective_scan_sequential",
]


def selective_scan_sequential(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The recurrence. ``x, dt: [b, L, d]``, ``A: [d, n]``, ``B, C: [b, L, n]``, ``D: [d]`` -> ``[b, L, d]``."""
    b, L, d = x.shape
    h = x.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t, :, None] * A)  # [b, d, n]
        h = dA * h + (dt[:, t, :, None] * x[:, t, :, None]) * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + x * D


def selective_scan_parallel(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Closed form of the same scan with a masked segment-sum (no loop over tokens)."""
    L = x.shape[1]
    dA = dt.unsqueeze(-1) * A  # [b, L, d, n], <= 0
    cum = dA.cumsum(dim=1)
    seg = cum.unsqueeze(2) - cum.unsqueeze(1)  # [b, t, s, d, n] = sum_{s < r <= t} dA_r
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, :, :, None, None], float("-inf")))
    u = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # [b, s, d, n] = dt_s x_s B_s
    h = torch.einsum("btsdn,bsdn->btdn", decay, u)  # state after token t
    return torch.einsum("btdn,btn->btd", h, C) + x * D


class SelectiveSSM(nn.Module):
    """Mamba mixer: in_proj -> causal depthwise conv -> SiLU -> selective scan, gated by SiLU(z) -> out_proj."""

    def __init__(self, d_model: int, d_state: int = 8, expand: int = 2, d_conv: int = 4, dt_rank: int | None = None,
                 scan: str = "parallel", dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if scan not in ("parallel", "sequential"):
            raise ValueError(f"scan must be 'parallel' or 'sequential', got {scan!r}")
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan = scan
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # Mamba's init: dt in [dt_min, dt_max] log-uniformly (through an inverse softplus bias), S4D-real A
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self.conv1d(u.transpose(1, 2))[..., :L].transpose(1, 2)  # causal: drop the right padding
        u = F.silu(u)
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log.float())
        scan = selective_scan_parallel if self.scan == "parallel" else selective_scan_sequential
        y = scan(u, dt, A, Bm, Cm, self.D)
        return self.out_proj(y * F.silu(z))


class SSMBlock(nn.Module):
    """adaLN-Zero block: ``x + g1 * SSM(mod(norm(x)))``, then ``x + g2 * MLP(mod(norm(x)))``; ``forward(x, c)``."""

    def __init__(self, hidden_size: int, d_state: int = 8, expand: int = 2, d_conv: int = 4, mlp_ratio: float = 4.0,
                 scan: str = "parallel"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = SelectiveSSM(hidden_size, d_state=d_state, expand=expand, d_conv=d_conv, scan=scan)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_m, scale_m, gate_m, shift_f, scale_f, gate_f = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_m.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_m, scale_m))
        x = x + gate_f.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_f, scale_f))
        return x


@dataclass(frozen=True)
class SSMConfig:
    """The constructor arguments of ``DiffusionSSM``."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    scan: str = "parallel"


class DiffusionSSM(nn.Module):
    """DiT-like diffusion backbone with selective-SSM blocks; ``forward(x, t, y)`` -> ``[B, out_channels, H, W]``.

    Tokens are scanned in row-major patch order.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        scan: str = "parallel",
        zero_init: bool = True,
    ):
        super().__init__()
        self.config = SSMConfig(input_size, patch_size, in_channels, hidden_size, depth, d_state, expand, d_conv,
                                mlp_ratio, class_dropout_prob, num_classes, learn_sigma, scan)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid = self.x_embedder.grid_size
        pe = get_2d_sincos_pos_embed(hidden_size, self.grid).astype(np.float32)
        self.pos_embed = nn.Parameter(torch.from_numpy(pe).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([
            SSMBlock(hidden_size, d_state, expand, d_conv, mlp_ratio, scan) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init(zero_init)

    def _init(self, zero_init: bool) -> None:
        for blk in self.blocks:
            for lin in (blk.mlp.fc1, blk.mlp.fc2, blk.adaLN_modulation[-1]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.constant_(lin.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if zero_init:
            for blk in self.blocks:
                nn.init.constant_(blk.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(blk.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.linear.weight, 0)
            nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p, h = self.out_channels, self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def diffusion_ssm(size: str = "S", patch: int = 2, **kwargs) -> DiffusionSSM:
    """A DiT-sized SSM backbone ('S': 12 x 384, 'B': 12 x 768, 'L': 24 x 1024); kwargs override anything."""
    sizes = {"S": dict(depth=12, hidden_size=384), "B": dict(depth=12, hidden_size=768),
             "L": dict(depth=24, hidden_size=1024)}
    if size not in sizes:
        raise ValueError(f"unknown SSM size {size!r}; choose one of {sorted(sizes)}")
    cfg = dict(sizes[size], patch_size=patch)
    cfg.update(kwargs)
    return DiffusionSSM(**cfg)


def tiny_ssm(depth: int = 6, hidden_size: int = 32, grid: int = 4, patch_size: int = 2, in_channels: int = 4,
             num_classes: int = 10, seed: int = 0, **kwargs) -> DiffusionSSM:
    """A tiny SSM backbone for tests: random (not zero) adaLN and final layers, no label dropout."""
    torch.manual_seed(seed)
    kwargs.setdefault("d_state", 4)
    m = DiffusionSSM(input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels,
                     hidden_size=hidden_size, depth=depth, mlp_ratio=2.0, class_dropout_prob=0.0,
                     num_classes=num_classes, zero_init=False, **kwargs)
    for blk in m.blocks:
        nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
        nn.init.normal_(blk.adaLN_modulation[-1].bias, std=0.05)
    return m
