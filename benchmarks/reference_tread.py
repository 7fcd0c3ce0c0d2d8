"""A hand-written TREAD forward of the reference DiT, following the official CompVis/tread algorithm.

Written here from the published algorithm, sharing no code with treadfx:
before block ``start`` the token stream is saved; each sample keeps
``K = N - int(N * ratio)`` tokens chosen by ``argsort(rand(B, N))`` (the first
K of a random permutation); the kept tokens are gathered and go through blocks
``start..end`` (inclusive); after block ``end`` they are scattered out of place
into the saved stream.  With ``fp32_after_route=True`` the first block after the
route runs with autocast disabled on float32 inputs, as the official code does.

In eval mode (and when ``ratio`` keeps every token) it is the plain DiT forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ReferenceTread"]


class ReferenceTread(nn.Module):
    """Wraps a ``treadfx.models.dit.DiT``; ``forward(x, t, y)`` routes tokens in training.

    ``kept`` (``[B, K]`` int64) replaces the random selection, so tests can run
    the reference and treadfx on the same kept indices.
    """

    def __init__(self, dit: nn.Module, start: int, end: int, ratio: float = 0.5, fp32_after_route: bool = False):
        super().__init__()
        depth = len(dit.blocks)
        start, end = start % depth if start < 0 else start, end % depth if end < 0 else end
        if not 0 <= start <= end < depth:
            raise ValueError(f"route {start}..{end} is not inside the {depth} blocks of the DiT")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio={ratio} must be in [0, 1)")
        self.dit = dit
        self.start, self.end, self.ratio = start, end, ratio
        self.fp32_after_route = fp32_after_route
        self.kept: torch.Tensor | None = None

    def num_keep(self, n: int) -> int:
        """K = N - int(N * ratio) kept tokens of N."""
        return n - int(n * self.ratio)

    def select(self, batch: int, n: int, device: torch.device) -> torch.Tensor:
        """Kept token indices [B, K]: the first K of a per-sample random permutation, or the given ``kept``."""
        if self.kept is not None:
            return self.kept
        return torch.rand(batch, n, device=device).argsort(dim=1)[:, : self.num_keep(n)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.dit
        h = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y, self.training)
        batch, n, dim = h.shape
        routed = self.training and self.num_keep(n) < n
        saved = index = None
        for i, block in enumerate(m.blocks):
            if routed and i == self.start:
                kept = self.select(batch, n, h.device)
                index = kept.unsqueeze(-1).expand(-1, -1, dim)
                saved = h
                h = torch.gather(h, 1, index)
            if routed and self.fp32_after_route and i == self.end + 1 and torch.is_autocast_enabled(h.device.type):
                with torch.autocast(device_type=h.device.type, enabled=False):
                    h = block(h.float(), c.float())
            else:
                h = block(h, c)
            if routed and i == self.end:
                h = saved.scatter(1, index, h.to(saved.dtype))
        return m.unpatchify(m.final_layer(h, c))
