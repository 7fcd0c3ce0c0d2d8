"""willisma/SiT, tiny: the SiT network and its transport (Ma et al., "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers").

The network is DiT's (adaLN-Zero blocks, patchify, learned-sigma head), called with continuous ``t`` in
[0, 1]; with ``learn_sigma`` the forward returns only the first half of the output channels. The transport
used for training is the linear interpolant ``x_t = t x_1 + (1 - t) x_0`` between noise ``x_0`` and data
``x_1`` with velocity prediction: loss ``|v(x_t, t) - (x_1 - x_0)|^2`` averaged per sample; sampling
integrates the ODE ``dx/dt = v`` from noise at ``t = 0`` to data at ``t = 1``.
"""

from __future__ import annotations

import torch

from treadfx.models.dit import DiT


class SiT(DiT):
    """SiT's forward: DiT's, without the variance half of the output."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, t, y)
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)
        return out


def tiny_sit(depth: int = 6, seed: int = 0) -> SiT:
    """A 16-token SiT (8x8 latents, patch 2) with label dropout and random adaLN layers."""
    torch.manual_seed(seed)
    m = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, mlp_ratio=2.0,
            class_dropout_prob=0.1, num_classes=10, learn_sigma=True, zero_init=False)
    with torch.no_grad():
        for blk in m.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.05)
    return m


def transport_loss(model, x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear-interpolant velocity loss of one batch (draws ``t`` then the noise, then calls ``model``)."""
    t = torch.rand(x1.shape[0])
    x0 = torch.randn_like(x1)
    tt = t.view(-1, 1, 1, 1)
    xt = tt * x1 + (1 - tt) * x0
    ut = x1 - x0
    return ((model(xt, t, y) - ut) ** 2).mean(dim=(1, 2, 3)).mean()


@torch.no_grad()
def euler_sample(model, z: torch.Tensor, y: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Fixed-step Euler integration of the probability-flow ODE from noise ``z`` (t = 0) to data (t = 1)."""
    x = z
    ts = torch.linspace(0, 1, steps + 1)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * model(x, a.expand(x.shape[0]), y)
    return x
