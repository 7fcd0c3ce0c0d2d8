"""Test helpers: small random DiTs, a hand-written TREAD reference, and a graph probe.

The reference follows the TREAD algorithm (route-out: keep a random subset of
the image tokens before block ``start``; route-in: write the processed kept
tokens back into the stream saved at route-out after block ``end``) directly
on the original DiT modules; it shares no code with treadfx.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from hypothesis import strategies as st

from treadfx.models.dit import DiT


def random_dit(depth: int, width_per_head: int, heads: int, patch: int, grid: int, channels: int = 4,
               num_classes: int = 7, learn_sigma: bool = True, seed: int = 0) -> DiT:
    """A DiT whose adaLN and final layers are random (not zero) so that every block matters."""
    torch.manual_seed(seed)
    m = DiT(input_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=width_per_head * heads,
            depth=depth, num_heads=heads, mlp_ratio=2.0, class_dropout_prob=0.0, num_classes=num_classes,
            learn_sigma=learn_sigma, zero_init=False)
    for blk in m.blocks:  # adaLN-Zero would make every block the identity at init
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
    return m


def dit_inputs(m: DiT, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = m.x_embedder.img_size
    x = torch.randn(batch, m.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    y = torch.randint(0, m.y_embedder.num_classes, (batch,), generator=g)
    return x, t, y


def tiny_dit(depth: int = 5, seed: int = 0, dropout: float = 0.0) -> DiT:
    """The small DiT several test files share: 8x8 latents, 2x2 patches (16 tokens), width 32, 2 heads, 10 classes,
    random (not zero) adaLN and final layers."""
    torch.manual_seed(seed)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, num_classes=10,
               class_dropout_prob=dropout, zero_init=False)


def tiny_dit_inputs(batch: int = 3, seed: int = 3, t_scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    """``(x, t, y)`` for :func:`tiny_dit` from one seeded generator, drawn in that order; ``t`` in ``[0, t_scale)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.rand(batch, generator=g) * t_scale if t_scale != 1.0 else torch.rand(batch, generator=g)
    return x, t, torch.randint(0, 10, (batch,), generator=g)


def tiny_lumina2(layers: int = 5, kv_heads: int = 1, cap_feat_dim: int = 16,
                 axes_lens: tuple[int, int, int] = (64, 32, 32)):
    """The small diffusers ``Lumina2Transformer2DModel`` several test files share (seeded with 0): 8x8 latents with
    4 channels, 2x2 patches (16 image tokens), width 32, 2 heads, one refiner layer per stream, rotary axes
    (4, 6, 6); ``layers`` main blocks, ``kv_heads`` key/value heads, caption features of ``cap_feat_dim``, rotary
    tables of ``axes_lens`` rows (any length above the positions used gives the same rows)."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=layers, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=kv_heads, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=axes_lens,
        cap_feat_dim=cap_feat_dim)


def tiny_lumina2_inputs(lengths: Sequence[int], g: torch.Generator, width: int = 8, cap_feat_dim: int = 16):
    """``(x, t, captions, mask)`` for :func:`tiny_lumina2`, one sample per caption length, drawn from ``g`` in that
    order: latents [B, 4, 8, 8], ``t`` in ``[0, 1)``, captions [B, width, cap_feat_dim], and a mask that keeps
    the first ``lengths[i]`` of ``width`` caption tokens of sample ``i``."""
    b = len(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(list(lengths))[:, None]
    return (torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g),
            torch.randn(b, width, cap_feat_dim, generator=g), mask)


class TracesSince:
    """``[0]``: forward traces treadfx started since this object was made (every new input signature or traced
    variant starts with one)."""

    def __init__(self):
        from treadfx import tracing

        self._tracing = tracing
        self.start = tracing.traces_run()

    def __getitem__(self, i: int) -> int:
        assert i == 0
        return self._tracing.traces_run() - self.start


@st.composite
def dit_configs(draw, max_depth: int = 6):
    heads = draw(st.integers(1, 3))
    return dict(
        depth=draw(st.integers(2, max_depth)),
        width_per_head=draw(st.sampled_from([4, 8])),
        heads=heads,
        patch=draw(st.sampled_from([1, 2, 4])),
        grid=draw(st.integers(2, 5)),
        batch=draw(st.integers(1, 3)),
    )


def dropping_ratios(num_tokens: int):
    """Ratios that drop at least one and at most ``num_tokens - 1`` of ``num_tokens`` tokens."""
    common = [r for r in (0.25, 0.5, 0.75, 0.9) if 1 <= int(num_tokens * r) < num_tokens]
    # (d + 0.5) / N drops exactly d tokens: floor(N * ratio) = d
    exact = st.integers(1, num_tokens - 1).map(lambda d: (d + 0.5) / num_tokens)
    return st.sampled_from(common) | exact if common else exact


@st.composite
def routes_for(draw, depth: int, max_routes: int = 3, num_tokens: int | None = None):
    """1..max_routes non-overlapping increasing (start, end, ratio) routes on a chain of `depth` blocks.

    A route may cover a single block (start == end).  With ``num_tokens``, at
    least one route drops at least one of that many tokens.
    """
    n = draw(st.integers(1, max(1, min(max_routes, depth))))
    spans, pos = [], 0
    while len(spans) < n and pos < depth:
        start = draw(st.integers(pos, depth - 1))
        end = draw(st.integers(start, depth - 1))
        spans.append((start, end))
        pos = end + 1
    ratios = [draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]) | st.floats(0.0, 0.95)) for _ in spans]
    if num_tokens is not None:
        ratios[draw(st.integers(0, len(spans) - 1))] = draw(dropping_ratios(num_tokens))
    return [(s, e, r) for (s, e), r in zip(spans, ratios)]


def random_kept(batch: int, n: int, keep: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, generator=g).argsort(dim=1)[:, :keep]


def reference_tread(model: DiT, x, t, y, routes: Sequence[tuple[int, int, float]], kept: Sequence[torch.Tensor]):
    """Hand-written TREAD forward of the reference DiT (official algorithm), with given kept indices."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    saved = None
    for i, block in enumerate(model.blocks):
        for r, (s, _e, _ratio) in enumerate(routes):
            if i == s and kept[r] is not None:
                saved = h
                idx = kept[r].unsqueeze(-1).expand(-1, -1, h.shape[-1])
                h = torch.gather(h, 1, idx)
        h = block(h, c)
        for r, (_s, e, _ratio) in enumerate(routes):
            if i == e and kept[r] is not None:
                idx = kept[r].unsqueeze(-1).expand(-1, -1, h.shape[-1])
                h = saved.scatter(1, idx, h)
    h = model.final_layer(h, c)
    return model.unpatchify(h)


class GraphProbe(fx.Interpreter):
    """Runs a routed graph, records every node's value, and lets a test replace node values."""

    def __init__(self, gm: fx.GraphModule, overrides: dict[str, Any] | None = None):
        super().__init__(gm)
        self.overrides = overrides or {}
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = self.overrides[n.name](super().run_node(n)) if n.name in self.overrides else super().run_node(n)
        self.values[n.name] = out
        return out


def route_nodes(gm: fx.GraphModule, route: int) -> dict[str, list[fx.Node]]:
    """The select / gather / scatter nodes of one route."""
    out: dict[str, list[fx.Node]] = {"select": [], "gather": [], "scatter": []}
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(f"treadfx_route{route}_"):
            kind = str(n.target).split("_")[-1].rstrip("0123456789")
            out.setdefault(kind, []).append(n)
    return out


class ConditionedBlock(torch.nn.Module):
    """A residual linear block scaled per sample by ``c`` [B, D]: ``h + lin(h) * c[:, None]`` (stage unit tests)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, h, c):
        return h + self.lin(h) * c.unsqueeze(1)
