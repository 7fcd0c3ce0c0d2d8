"""Values leaving a route sideways (side exits): ``route_mask``, ``route_rows``, ``side_exits="kept"``, the
``inspect`` listing and the once-per-model warning.

The test network returns, besides its output, a projection of the output of block ``tap`` (like REPA's
projector features).  Every expectation is computed by a hand-written TREAD forward on the same blocks with the
kept indices treadfx recorded (``last_routes``), sharing no code with treadfx.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import treadfx
from treadfx.models.dit import DiTBlock


class TapNet(nn.Module):
    """Patch tokens (optionally after a class token) -> DiT blocks -> (output, projection of block ``tap``'s output)."""

    def __init__(self, depth: int = 5, tap: int = 2, dim: int = 16, tokens: int = 9, cls: bool = False,
                 fixed_reshape: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tap, self.cls, self.fixed_reshape = tap, cls, fixed_reshape
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.cond = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, 2, 2.0) for _ in range(depth)])
        for b in self.blocks:
            nn.init.normal_(b.adaLN_modulation[-1].weight, std=0.1)
        self.proj = nn.Sequential(nn.Linear(dim, 12), nn.SiLU(), nn.Linear(12, 6))
        self.head = nn.Linear(dim, 4)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        if self.cls:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        h = self.tokens(x)
        B, T, D = h.shape
        c = self.cond(t[:, None])
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            if i == self.tap:
                # REPA writes the projector on flattened rows with the trace-time sizes
                feat = (self.proj(h.reshape(-1, D)).reshape(B, T, -1) if self.fixed_reshape else self.proj(h))
        return self.head(h), feat


def inputs(batch: int, tokens: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, 4, generator=g), torch.rand(batch, generator=g)


def reference(m: TapNet, x, t, start: int, end: int, kept: torch.Tensor):
    """Hand-written TREAD on ``m``'s modules: (output, fresh features [B, K, .] of the kept tokens, features of
    every token as full-mode treadfx returns them: kept rows fresh, skipped rows from the stream at route-out)."""
    h = m.tokens(x)
    c = m.cond(t[:, None])
    off = 1 if m.cls else 0
    kept = kept if kept.ndim == 2 else kept.unsqueeze(0).expand(x.shape[0], -1)
    pos = torch.cat([torch.arange(off).expand(kept.shape[0], off), kept + off], dim=1)  # class token always kept
    idx = pos[..., None].expand(-1, -1, h.shape[-1])
    fresh = None
    for i, blk in enumerate(m.blocks):
        if i == start:
            saved, h = h, h.gather(1, idx)
        h = blk(h, c)
        if i == m.tap:
            fresh = m.proj(h)
            tap_full = m.proj(saved.scatter(1, idx, h)) if start <= i <= end else fresh
        if i == end:
            h = saved.scatter(1, idx, h)
    return m.head(h), fresh, tap_full


def hand_mask(kept: torch.Tensor, batch: int, n: int, extra: int) -> torch.Tensor:
    kept = kept if kept.ndim == 2 else kept.unsqueeze(0).expand(batch, -1)
    mask = torch.zeros(batch, extra + n, dtype=torch.bool)
    mask[:, :extra] = True
    for b in range(batch):
        for i in kept[b].tolist():
            mask[b, extra + i] = True
    return mask


# ------------------------------------------------------------------------------------------ mask


def test_mask_is_true_exactly_at_the_recorded_kept_tokens_and_marks_the_stale_rows():
    m = TapNet()
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5, side_exits="full")
    x, t = inputs(3)
    out, feat = tm(x, t)
    (rec,) = treadfx.last_routes(tm)
    mask = treadfx.route_mask(tm, feat)
    assert mask.dtype == torch.bool and mask.shape == (3, 9)
    assert torch.equal(mask, hand_mask(rec.kept, 3, 9, 0))
    assert torch.equal(mask, ~rec.skipped_mask(3))
    ref_out, fresh, tap_full = reference(m, x, t, 1, 3, rec.kept)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(feat, tap_full)  # default: skipped rows hold proj(stream at route-out)
    kept_rows = feat[mask].view(3, -1, feat.shape[-1])  # the fresh rows, in token order
    ref_rows = torch.stack([fresh[b][rec.kept[b].argsort()] for b in range(3)])
    torch.testing.assert_close(kept_rows, ref_rows)
    # named by producer or output path: the same mask
    assert torch.equal(treadfx.route_mask(tm, producer="blocks.2"), mask)
    assert torch.equal(treadfx.route_mask(tm, producer="output[1]"), mask)
    assert torch.equal(treadfx.route_mask(tm), mask)  # the only side exit
    assert torch.equal(treadfx.route_rows(tm, feat), torch.arange(9).expand(3, 9))


@settings(max_examples=8, deadline=None)
@given(data=st.data(), batch=st.sampled_from([1, 3]), cls=st.booleans(), span=st.sampled_from([(1, 3), (2, 2)]),
       selection=st.sampled_from(["per_sample", "shared"]))
def test_mask_property_over_ratios_batches_spans_and_class_tokens(data, batch, cls, span, selection):
    n = 9
    drop = data.draw(st.integers(1, n - 1), label="dropped tokens")
    ratio = (drop + 0.5) / n  # int(n * ratio) == drop
    tm, m = _model(cls, span, selection)
    treadfx.set_ratio(tm, ratio)
    x, t = inputs(batch, seed=data.draw(st.integers(0, 5), label="input seed"))
    out, feat = tm(x, t)
    (rec,) = treadfx.last_routes(tm)
    extra = 1 if cls else 0
    mask = treadfx.route_mask(tm, feat)
    assert torch.equal(mask, hand_mask(rec.kept, batch, n, extra))
    assert (mask.sum(1) == extra + n - drop).all()
    ref_out, fresh, tap_full = reference(m, x, t, *span, rec.kept)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(feat, tap_full)
    # skipped rows are exactly proj(stream at route-out): stale, not computed by the routed blocks
    stale = m.proj(_stream_at(m, x, t, span[0]))
    torch.testing.assert_close(feat[~mask], stale[~mask])


_MODELS: dict = {}


def _model(cls: bool, span: tuple, selection: str):
    key = (cls, span, selection)
    if key not in _MODELS:
        m = TapNet(cls=cls)
        tm = treadfx.transform(m, routes=[treadfx.Route(span[0], span[1], 0.5, selection=selection)],
                               side_exits="full")
        _MODELS[key] = (tm, m)
    return _MODELS[key]


def _stream_at(m: TapNet, x, t, start: int) -> torch.Tensor:
    """The original model's stream entering block ``start``."""
    h, c = m.tokens(x), m.cond(t[:, None])
    for blk in m.blocks[:start]:
        h = blk(h, c)
    return h


def test_unrouted_calls_give_an_all_true_mask():
    tm = treadfx.transform(TapNet(), start=1, end=3, ratio=0.5, side_exits="full")
    x, t = inputs(2)
    tm.eval()
    _, feat = tm(x, t)
    assert torch.equal(treadfx.route_mask(tm, feat), torch.ones(2, 9, dtype=torch.bool))
    tm.train()
    with torch.no_grad():  # train mode without gradients does not route either
        _, feat = tm(x, t)
    assert torch.equal(treadfx.route_mask(tm, feat), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(treadfx.SideExitError, match="pass the value"):
        treadfx.route_mask(tm)


def test_route_mask_errors_name_the_side_exits_and_the_fix():
    tm = treadfx.transform(TapNet(), start=1, end=3, ratio=0.5, side_exits="full")
    x, t = inputs(2)
    _, feat = tm(x, t)
    with pytest.raises(treadfx.SideExitError, match=r"exactly as the model returned it.*producer="):
        treadfx.route_mask(tm, feat.clone())
    with pytest.raises(treadfx.SideExitError, match=r"no side exit is produced by 'blocks.4'.*`blocks.2`"):
        treadfx.route_mask(tm, producer="blocks.4")
    with pytest.raises(treadfx.TransformError, match=r"side_exits='sometimes'.*'full'.*'kept'"):
        treadfx.transform(TapNet(), start=1, end=3, ratio=0.5, side_exits="sometimes")


# ------------------------------------------------------------------------------------------ kept rows


def test_kept_mode_returns_only_the_kept_rows_in_route_order():
    m = TapNet(cls=True)
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5, side_exits="kept")
    x, t = inputs(2)
    out, feat = tm(x, t)
    (rec,) = treadfx.last_routes(tm)
    k = rec.kept.shape[1]
    assert feat.shape == (2, 1 + k, 6)
    ref_out, fresh, _ = reference(m, x, t, 1, 3, rec.kept)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(feat, fresh)  # class token first, then the kept tokens in kept order
    rows = treadfx.route_rows(tm, feat)
    assert torch.equal(rows, torch.cat([torch.zeros(2, 1, dtype=torch.long), rec.kept + 1], dim=1))
    assert torch.equal(treadfx.route_mask(tm, feat), torch.ones(2, 1 + k, dtype=torch.bool))
    tm.eval()
    _, feat_eval = tm(x, t)
    assert feat_eval.shape == (2, 10, 6)  # eval: the original model


def test_kept_mode_refuses_a_fixed_size_reshape_and_a_value_blocks_also_read():
    tm = treadfx.transform(TapNet(fixed_reshape=True), start=1, end=3, ratio=0.5, side_exits="kept")
    with pytest.raises(treadfx.SideExitError, match=r"cannot run on the kept rows only.*reshape.*side_exits='full'"):
        tm(*inputs(2))

    class AlsoRead(TapNet):
        def forward(self, x, t):
            h, c = self.tokens(x), self.cond(t[:, None])
            for i, blk in enumerate(self.blocks):
                h = blk(h, c)
                if i == 1:
                    early = h
            return self.head(h + early), self.proj(early)

    tm = treadfx.transform(AlsoRead(), start=1, end=2, ratio=0.5, side_exits="kept")
    with pytest.raises(treadfx.SideExitError, match=r"cannot run on the kept rows only.*side_exits='full'.*route_mask"):
        tm(*inputs(2))  # `h + early` adds all rows to the kept rows


# ------------------------------------------------------------------------------------------ warning, inspect


def test_first_training_call_warns_once_naming_the_output_and_the_fix():
    tm = treadfx.transform(TapNet(), start=1, end=3, ratio=0.5)
    x, t = inputs(2)
    with pytest.warns(treadfx.SideExitWarning) as caught:
        tm(x, t)
    (w,) = [c for c in caught if issubclass(c.category, treadfx.SideExitWarning)]
    text = str(w.message)
    for needed in ("output[1]", "`blocks.2`", "route 0", "treadfx.route_mask", "side_exits='kept'"):
        assert needed in text, needed
    with warnings.catch_warnings():
        warnings.simplefilter("error", treadfx.SideExitWarning)
        tm(x, t)  # once per model
        tm(*inputs(3))  # a new signature is traced, but the same side exit does not warn again
        quiet = treadfx.transform(TapNet(), start=1, end=3, ratio=0.5, side_exits="full")
        quiet(x, t)  # side_exits given explicitly: the user handles it
        before = treadfx.transform(TapNet(), start=3, end=4, ratio=0.5)
        before(x, t)  # the tapped block is before the route: no side exit
        assert treadfx.inspect(before, x, t).side_exits == []


def test_internal_long_skips_are_side_exits_that_do_not_warn():
    from treadfx.models.uvit import tiny_uvit

    m = tiny_uvit(depth=6, num_classes=-1)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    x = torch.randn(2, 4, 8, 8)
    ts = torch.rand(2) * 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error", treadfx.SideExitWarning)
        tm(x, ts)
        report = treadfx.inspect(tm, x, ts)
    assert report.side_exits, "U-ViT's in-block skips taken inside the route leave it sideways"
    for e in report.side_exits:
        assert e["outputs"] == [] and e["consumers"], e
        assert "long skip" in e["line"]


def test_inspect_lists_each_side_exit_with_producer_axis_and_fill():
    tm = treadfx.transform(TapNet(cls=True), start=1, end=3, ratio=0.5, side_exits="full")
    x, t = inputs(2)
    report = treadfx.inspect(tm, x, t)
    (e,) = report.side_exits
    assert e["producer"] == "blocks.2" and e["axis"] == 1 and e["layout"] == "[extra 1 | image 9]"
    assert e["route"] == 0 and e["mode"] == "full" and e["consumers"] == []
    assert "stream at route-out" in e["fill"] and "`blocks.0`" in e["fill"]
    assert e["outputs"] == [{"position": 1, "path": "output[1]", "axis": 1}]
    text = str(report)
    assert "side exits" in text and e["line"] in text
    assert "side exit" in next(line for line in text.splitlines() if "scatter output of `blocks.2`" in line)
    kept = treadfx.transform(TapNet(cls=True), start=1, end=3, ratio=0.5, side_exits="kept")
    (k,) = treadfx.inspect(kept, x, t).side_exits
    assert k["mode"] == "kept" and "kept rows only" in k["fill"]
