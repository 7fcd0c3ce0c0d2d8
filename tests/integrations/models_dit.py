"""facebookresearch/DiT, tiny: the DiT of Peebles & Xie (``treadfx.models.dit``: adaLN-Zero blocks, patchify,
learned-sigma output, label dropout for classifier-free guidance) and its DDPM training loss.

The loss follows the DiT paper / improved DDPM (Nichol & Dhariwal): linear beta schedule over ``T`` steps,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; the output's first ``C`` channels predict ``eps`` (MSE), the
other ``C`` interpolate the log-variance between ``beta_t`` and the posterior variance, trained by the KL term of
the variational bound with the mean detached ("hybrid" loss). Simplification: the KL term is used at every
``t`` (the paper uses the discretised decoder likelihood at ``t = 0``).
"""

from __future__ import annotations

import torch

from treadfx.models.dit import DiT


def tiny_dit(depth: int = 6, class_dropout_prob: float = 0.1, seed: int = 0) -> DiT:
    """A 16-token DiT (8x8 latents, patch 2) with the official default label dropout, learned sigma, and random
    adaLN / final layers (adaLN-Zero makes every block the identity at init)."""
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, mlp_ratio=2.0,
            class_dropout_prob=class_dropout_prob, num_classes=10, learn_sigma=True, zero_init=False)
    with torch.no_grad():
        for blk in m.blocks:
            blk.adaLN_modulation[-1].weight.normal_(std=0.05)
    return m


class DDPM:
    """The Gaussian diffusion quantities the training loss needs (float64 tables, as the DiT code keeps)."""

    def __init__(self, steps: int = 1000):
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)  # scaled linear schedule at T = 1000
        self.steps = steps
        self.betas = betas
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.sqrt_abar, self.sqrt_1m_abar = abar.sqrt(), (1 - abar).sqrt()
        self.sqrt_recip_abar, self.sqrt_recipm1_abar = (1 / abar).sqrt(), (1 / abar - 1).sqrt()
        post_var = betas * (1 - abar_prev) / (1 - abar)
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at t = 0
        self.post_c0 = betas * abar_prev.sqrt() / (1 - abar)
        self.post_ct = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table[t].float().view(-1, *([1] * (like.ndim - 1)))

    def training_loss(self, model, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DiT's training loss of one batch (draws ``t`` then the noise from the global RNG, then calls model)."""
        t = torch.randint(0, self.steps, (x0.shape[0],))
        noise = torch.randn_like(x0)
        xt = self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_1m_abar, t, x0) * noise
        out = model(xt, t, y)
        eps, v = out.split(x0.shape[1], dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # the variational-bound term trains the variance only: the predicted mean is detached
        x0_pred = self._at(self.sqrt_recip_abar, t, x0) * xt - self._at(self.sqrt_recipm1_abar, t, x0) * eps.detach()
        mean_pred = self._at(self.post_c0, t, x0) * x0_pred + self._at(self.post_ct, t, x0) * xt
        mean_true = self._at(self.post_c0, t, x0) * x0 + self._at(self.post_ct, t, x0) * xt
        lo, hi = self._at(self.post_log_var, t, x0), self._at(self.betas.log(), t, x0)
        frac = (v + 1) / 2
        log_var = frac * hi + (1 - frac) * lo
        kl = 0.5 * (-1.0 + log_var - lo + torch.exp(lo - log_var) + (mean_true - mean_pred) ** 2 * torch.exp(-log_var))
        vb = kl.mean(dim=(1, 2, 3)) / torch.log(torch.tensor(2.0))  # in bits (DiT's plain MSE loss type: unscaled)
        return (mse + vb).mean()
