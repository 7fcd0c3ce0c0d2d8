"""Structured (sub-grid) selection for blocks that need the token grid (Sana's Mix-FFN, issue 15).

* the sub-grid index construction, as a property: one token per cell, sorted, the sub-grid's shape;
* the route-out op: offsets drawn per sample, seeded draws reproducible, marked tokens kept;
* a tiny hand-built model whose blocks reshape tokens to the grid for a depthwise conv, routed with structured
  selection, equal to a hand-written reference with the same kept indices (output and gradients);
* diffusers Sana and Sana-Video (tiny random configs): a routed training step, eval bit-equal to the original,
  FLOPs lower as ``inspect`` predicts, Sana against a hand-written hook reference;
* refusals: ratios that are not one token per cell (naming the ratios that are), random selection forced on
  such blocks, structured selection on blocks that take no grid.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import treadfx
from treadfx.ops import StructuredSelect
from treadfx.structured import grid_cells, subgrid_indices, subgrid_shape


# ------------------------------------------------------------------ index construction

@st.composite
def grids_and_cells(draw):
    """A grid (optionally with leading frames) and a cell shape that tiles its last two axes, area >= 2."""
    frames = draw(st.sampled_from([(), (1,), (2,), (3,)]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    pairs = [(a, b) for a in range(1, h + 1) if h % a == 0 for b in range(1, w + 1) if w % b == 0 and a * b >= 2]
    assume(pairs)
    ch, cw = draw(st.sampled_from(pairs))
    return frames + (h, w), (1,) * len(frames) + (ch, cw), len(pairs)


@given(grids_and_cells())
def test_subgrid_indices_keep_one_token_per_cell_sorted_on_the_subgrid(case):
    sizes, cell, count = case
    assert cell in grid_cells(sizes) and len(grid_cells(sizes)) == count  # every tiling cell, nothing else
    rows = subgrid_indices(sizes, cell)
    area = cell[-2] * cell[-1]
    n = math.prod(sizes)
    sub = [s // c for s, c in zip(sizes, cell)]
    assert tuple(sub) == subgrid_shape(sizes, cell)
    assert tuple(rows.shape) == (area, n // area)
    offsets_seen = set()
    for row in rows.tolist():
        assert row == sorted(row) and len(set(row)) == len(row)  # sorted (raster order), no repeats
        coords = []
        for flat in row:  # row-major coordinates, computed by hand
            c = []
            for s in reversed(sizes):
                c.append(flat % s)
                flat //= s
            coords.append(tuple(reversed(c)))
        cells_hit = [tuple(x // k for x, k in zip(co, cell)) for co in coords]
        assert len(set(cells_hit)) == len(cells_hit) == n // area  # exactly one token from every cell
        inner = {tuple(x % k for x, k in zip(co, cell)) for co in coords}
        assert len(inner) == 1  # the same offset inside every cell
        offsets_seen |= inner
        # the kept tokens, in their order, are the sub-grid in raster order: coordinate d of the i-th kept token
        # is (i's d-th sub-grid coordinate) * cell[d] + offset[d]
        (off,) = inner
        for i, co in enumerate(coords):
            sc, rest = [], i
            for s in reversed(sub):
                sc.append(rest % s)
                rest //= s
            assert co == tuple(x * k + o for x, k, o in zip(reversed(sc), cell, off))
    assert len(offsets_seen) == area  # each row is another offset


@given(st.integers(1, 40), st.integers(1, 40))
def test_every_ratio_named_as_supported_keeps_one_token_per_cell(h, w):
    from treadfx.structured import check_structured_ratio, supported_ratios

    n = h * w
    named = supported_ratios((h, w))
    areas = {a * b for a in range(1, h + 1) if h % a == 0 for b in range(1, w + 1) if w % b == 0 and a * b >= 2}
    assert sorted(c[-2] * c[-1] for _, c in named) == sorted(areas)  # one ratio per cell area that tiles the grid
    for r, cell in named:
        area = cell[-2] * cell[-1]
        assert 0 < r < 1 and n - int(n * r) == n // area  # the official kept count is one token per cell
        assert abs(r - (1 - 1 / area)) < 0.01 + 1 / n
        got = check_structured_ratio(r, (h, w), 0)
        assert got[-2] * got[-1] == area


@given(st.sampled_from([(4, 4), (8, 6), (2, 4, 4)]), st.sampled_from([2, 4]), st.integers(0, 2**20))
def test_structured_select_draws_a_subgrid_per_sample_with_varying_offsets(grid, area, seed):
    n = math.prod(grid)
    sel = StructuredSelect(0, n, n // area, grid)
    torch.manual_seed(seed)
    idx = sel(torch.zeros(64, n, 1))
    options = subgrid_indices(grid, next(c for c in grid_cells(grid) if c[-2] * c[-1] == area))
    rows = [next(k for k in range(area) if torch.equal(r, options[k])) for r in idx]  # each row is an option
    assert len(set(rows)) > 1  # offsets vary between samples (all 64 equal: probability area^-63)
    seeded = StructuredSelect(0, n, n // area, grid, seed=seed)
    a = seeded(torch.zeros(8, n, 1), step=torch.tensor(3))
    b = seeded(torch.zeros(8, n, 1), step=torch.tensor(3))
    c = [seeded(torch.zeros(8, n, 1), step=torch.tensor(s)) for s in range(4, 12)]
    assert torch.equal(a, b)  # a pure function of (seed, step)
    assert any(not torch.equal(a, x) for x in c)  # and it changes with the step


def test_structured_select_keeps_marked_tokens_or_refuses():
    sel = StructuredSelect(0, 16, 8, (4, 4))  # 2x1 cells: even rows or odd rows
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[0, 1 * 4 + 2] = True  # row 1: odd rows
    keep[1, 2 * 4 + 0] = True  # row 2: even rows
    keep[2, 3 * 4 + 3] = True  # row 3: odd rows
    for _ in range(5):
        idx = sel(torch.zeros(3, 16, 1), keep)
        assert torch.equal(idx[0], torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]))
        assert torch.equal(idx[1], torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]))
        assert torch.equal(idx[2], idx[0])
    keep[0, 0] = True  # rows 0 and 1 of one sample: no offset keeps both
    with pytest.raises(treadfx.TokenCountError) as e:
        sel(torch.zeros(3, 16, 1), keep)
    msg = str(e.value)
    assert "no offset keeps all 2 tokens marked in sample 0 (1 would be routed)" in msg
    assert "(row, column) (0, 0) and (1, 2)" in msg or "(row, column) (1, 2) and (0, 0)" in msg
    assert "Fix: mark the tokens of a sample on one sub-grid of the 2x1 cells (all in even rows, or all in odd rows)" \
        in msg
    # 2x1 is the smallest cell: no ratio with smaller cells is advised, nor ending the route (not known to fit)
    assert "smaller cells" not in msg and "e.g. 0.5" not in msg and "end the route" not in msg
    assert "route nothing for such batches (treadfx.set_ratio(model, 0.0)" in msg


def test_structured_keep_refusal_with_larger_cells_names_the_existing_smaller_ones():
    sel = StructuredSelect(0, 64, 8, (8, 8))  # 4x2 cells (ratio 0.875)
    keep = torch.zeros(1, 64, dtype=torch.bool)
    keep[0, [0, 1]] = True  # columns 0 and 1: different offsets of a 4x2 cell
    with pytest.raises(treadfx.TokenCountError) as e:
        sel(torch.zeros(1, 64, 1), keep)
    msg = str(e.value)
    assert "one token per 4x2 cell of the 8x8 token grid" in msg
    assert "(all with the same row number mod 4 and the same column number mod 2)" in msg
    assert "a lower ratio with smaller cells, which keeps more tokens: 0.5 (2x1 cells), 0.75 (2x2 cells);" in msg
    assert "0.875" not in msg  # the ratio in use is not advised


@st.composite
def structured_marks(draw):
    """A grid, a cell that tiles it, and per-sample marks (some on one sub-grid, some not)."""
    grid, cell, _ = draw(grids_and_cells())
    n = math.prod(grid)
    marks = [draw(st.sets(st.integers(0, n - 1), max_size=4)) for _ in range(3)]
    return grid, cell, marks


@settings(max_examples=60, deadline=None)
@given(structured_marks())
def test_structured_select_keeps_marks_on_one_subgrid_and_refuses_the_others(case):
    """Hand-written rule: a sample's marks can all be kept iff they share (row mod ch, column mod cw) (and, for
    frames, nothing else matters); then every kept token has that offset and the marks are kept."""
    grid, cell, marks = case
    n, area = math.prod(grid), cell[-2] * cell[-1]
    assume(cell == next(c for c in grid_cells(grid) if c[-2] * c[-1] == area))  # the cell the op picks for K
    h, w = grid[-2], grid[-1]
    offset = lambda i: ((i // w) % h % cell[-2], i % w % cell[-1])  # noqa: E731
    keep = torch.zeros(3, n, dtype=torch.bool)
    for b, s in enumerate(marks):
        keep[b, sorted(s)] = True
    sel = StructuredSelect(0, n, n // area, grid)
    fits = [len({offset(i) for i in s}) <= 1 for s in marks]
    if all(fits):
        idx = sel(torch.zeros(3, n, 1), keep)
        for b, s in enumerate(marks):
            assert s <= set(idx[b].tolist())
            if s:
                assert {offset(int(i)) for i in idx[b]} == {offset(next(iter(s)))}
    else:
        with pytest.raises(treadfx.TokenCountError) as e:
            sel(torch.zeros(3, n, 1), keep)
        b = fits.index(False)
        assert f"so no offset keeps all {len(marks[b])} tokens marked in sample {b}" in str(e.value)
        assert f"one sub-grid of the {cell[-2]}x{cell[-1]} cells" in str(e.value)


# ------------------------------------------------------------------ a tiny model whose blocks need the grid

class GridBlock(nn.Module):
    """Attention over the tokens, then a Mix-FFN: tokens reshaped to the height x width grid, depthwise 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ada = nn.Linear(dim, 2 * dim)
        self.inp = nn.Linear(dim, 2 * dim)
        self.dw = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim)
        self.out = nn.Linear(2 * dim, dim)

    def forward(self, x, c, height: int, width: int):
        scale, shift = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.inp(self.norm2(x))
        h = h.unflatten(1, (height, width)).permute(0, 3, 1, 2)
        h = F.silu(self.dw(h)).flatten(2).transpose(1, 2)
        return x + self.out(h)


class GridNet(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 5, patch: int = 2, channels: int = 3):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cond = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([GridBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, channels * patch * patch)

    def tokens(self, img, t):
        x = self.embed(img)
        return x.flatten(2).transpose(1, 2), self.cond(t[:, None]), x.shape[-2], x.shape[-1]

    def untokens(self, x, hh, ww):
        p = self.patch
        x = self.head(x).unflatten(1, (hh, ww)).unflatten(-1, (-1, p, p))
        return x.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)

    def forward(self, img, t):
        x, c, hh, ww = self.tokens(img, t)
        for blk in self.blocks:
            x = blk(x, c, hh, ww)
        return self.untokens(x, hh, ww)


def grid_of_kept(kept: torch.Tensor, width: int) -> tuple[int, int]:
    """The (rows, columns) of the sub-grid that kept indices [K] of a row-major grid of this width form."""
    rows = sorted({int(i) // width for i in kept})
    cols = sorted({int(i) % width for i in kept})
    assert len(rows) * len(cols) == kept.numel()
    return len(rows), len(cols)


def reference_grid_net(m: GridNet, img, t, start: int, end: int, kept: torch.Tensor):
    """TREAD by hand with a sub-grid: blocks start..end run on the kept tokens with the sub-grid's size."""
    x, c, hh, ww = m.tokens(img, t)
    b = torch.arange(x.shape[0])[:, None]
    for i, blk in enumerate(m.blocks):
        if i == start:
            saved = x
            sub = {grid_of_kept(k, ww) for k in kept}
            assert len(sub) == 1
            sh, sw = sub.pop()
            x = x[b, kept]
        x = blk(x, c, sh, sw) if start <= i <= end else blk(x, c, hh, ww)
        if i == end:
            full = saved.clone()
            full[b, kept] = x
            x = full
    return m.untokens(x, hh, ww)


def grid_net_inputs(batch: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, generator=g)


@pytest.mark.parametrize("ratio,selection", [(0.5, "structured"), (0.75, "auto")])
def test_grid_net_matches_hand_written_reference(ratio, selection):
    torch.manual_seed(0)
    m = GridNet()
    tm = treadfx.transform(m, start=1, end=3, ratio=ratio, selection=selection)
    img, t = grid_net_inputs()
    out = tm(img, t)
    (rec,) = treadfx.last_routes(tm)
    kept = rec.kept
    assert kept.shape == (3, 64 - int(64 * ratio))
    ref = reference_grid_net(m, img, t, 1, 3, kept)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    w = torch.randn_like(out)
    params = list(m.parameters())
    g_routed = torch.autograd.grad((out * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g_routed, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tm.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(tm(img, t), m(img, t))


def test_grid_net_set_ratio_changes_the_cell_without_retracing():
    tm = treadfx.transform(GridNet(), start=1, end=3, ratio=0.5)
    img, t = grid_net_inputs()
    tm(img, t)
    programs = len(tm.__dict__["_treadfx"].programs)
    treadfx.set_ratio(tm, 0.75)
    out = tm(img, t)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (3, 16) and {grid_of_kept(k, 8) for k in rec.kept} == {(4, 4)}
    assert len(tm.__dict__["_treadfx"].programs) == programs
    torch.testing.assert_close(out, reference_grid_net(tm, img, t, 1, 3, rec.kept), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ refusals

def test_unsupported_ratio_is_refused_naming_the_supported_ones():
    tm = treadfx.transform(GridNet(), start=1, end=3, ratio=0.6)
    with pytest.raises(treadfx.InvalidRatioError) as e:
        tm(*grid_net_inputs())
    msg = str(e.value)
    assert "cannot keep 26 of 64 tokens" in msg and "8x8 token grid" in msg
    assert "0.5 (1/2: 2x1 cells)" in msg and "0.75 (3/4: 2x2 cells)" in msg and "0.875 (7/8" in msg
    # every block of the chain takes the grid and the grid's sides are even: the grid's ratios are the only fix
    assert msg.endswith("Fix: use one of these ratios.")
    tm = treadfx.transform(GridNet(), start=1, end=3, ratio=0.5)
    tm(*grid_net_inputs())
    treadfx.set_ratio(tm, 0.3)  # changed after tracing: refused by the next routed forward
    with pytest.raises(treadfx.InvalidRatioError, match=r"cannot keep 45 of 64 tokens.*0\.5 \(1/2") as e:
        tm(*grid_net_inputs())
    assert str(e.value).endswith("Fix: use one of these ratios.")


def test_odd_token_grid_refusal_advises_a_grid_with_even_sides_and_its_ratios():
    tm = treadfx.transform(GridNet(), start=1, end=3, ratio=0.5)
    with pytest.raises(treadfx.InvalidRatioError) as e:
        tm(*grid_net_inputs(size=14))  # 7x7 tokens: no 2x1 cell tiles it
    msg = str(e.value)
    assert "cannot keep 25 of 49 tokens" in msg and "0.86 (6/7: 7x1 cells)" in msg
    assert ("Fix: use one of these ratios; or train at a resolution whose token grid has even sides (e.g. 8x8 tokens "
            "instead of 7x7), where structured selection honours 0.5, 0.75, 0.875") in msg
    assert "random selection" not in msg and "end the route" not in msg


class PlainBlock(nn.Module):
    """A block that never sees the token grid (random selection can route it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x, c):
        return x + self.lin(self.norm(x) + c.unsqueeze(1))


class PlainThenGrid(GridNet):
    """Three blocks without the grid, then three that need it (one merged chain of six)."""

    def __init__(self):
        super().__init__(depth=3)
        self.plain = nn.ModuleList([PlainBlock(16) for _ in range(3)])

    def forward(self, img, t):
        x, c, hh, ww = self.tokens(img, t)
        for blk in self.plain:
            x = blk(x, c)
        for blk in self.blocks:
            x = blk(x, c, hh, ww)
        return self.untokens(x, hh, ww)


def test_ratio_refusal_advises_random_selection_only_on_blocks_that_take_no_grid():
    advice = ("or route only chain blocks that do not take the token grid, with random selection: `plain.0` (0), "
              "`plain.1` (1), `plain.2` (2) (name: chain index).")
    tm = treadfx.transform(PlainThenGrid(), start=3, end=4, ratio=0.6)
    with pytest.raises(treadfx.InvalidRatioError) as e:
        tm(*grid_net_inputs())
    assert str(e.value).endswith("Fix: use one of these ratios; " + advice)
    tm = treadfx.transform(PlainThenGrid(), start=3, end=4, ratio=0.5)
    tm(*grid_net_inputs())
    treadfx.set_ratio(tm, 0.6)  # refused at run time by the route-out op: the same advice
    with pytest.raises(treadfx.InvalidRatioError) as e:
        tm(*grid_net_inputs())
    assert str(e.value).endswith("Fix: use one of these ratios; " + advice)
    tm = treadfx.transform(PlainThenGrid(), start=0, end=1, ratio=0.6)  # and that route does work
    tm(*grid_net_inputs())
    assert treadfx.last_routes(tm)[0].kept.shape == (3, 26)


def test_random_selection_on_grid_blocks_is_refused_with_advice():
    tm = treadfx.transform(GridNet(), start=1, end=3, ratio=0.5, selection="per_sample")
    with pytest.raises(treadfx.UnroutableRegionError) as e:
        tm(*grid_net_inputs())
    msg = str(e.value)
    assert "block `blocks.1`" in msg and "8x8 token grid (block arguments `height`, `width`)" in msg
    assert "use selection='structured' (or 'auto')" in msg
    assert msg.count("Fix:") == 1 and "end the route before this operation" not in msg  # only the advice that fits


def test_structured_selection_needs_blocks_that_take_the_grid():
    from treadfx.models.dit import DiT

    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=10,
            class_dropout_prob=0.0)
    tm = treadfx.transform(m, start=1, end=2, selection="structured")
    with pytest.raises(treadfx.UnroutableRegionError, match=r"selection='structured' needs routed blocks that take "
                       r"the token grid as int arguments.*Fix: use selection='auto'"):
        tm(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,)))


def test_route_accepts_structured_selection():
    r = treadfx.Route(1, 3, 0.75, selection="structured")
    assert r.selection == "structured"
    with pytest.raises(treadfx.InvalidRouteError, match="structured"):
        treadfx.Route(1, 3, 0.5, selection="grid")


# ------------------------------------------------------------------ diffusers Sana / Sana-Video

def _fwd_bwd_flops(fn, params) -> int:
    with FlopCounterMode(display=False) as counter:
        out = fn()
        out.float().sum().backward()
    for p in params:
        p.grad = None
    return counter.get_total_flops()


@functools.cache
def sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                               num_layers=4, num_cross_attention_heads=2, cross_attention_head_dim=8,
                               cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=1)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.rand(2, generator=g) * 999)
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)  # selection "auto" picks structured here
    return m, tm, args, treadfx.inspect(tm, *args)


def sana_by_hooks(m, start: int, end: int, kept: torch.Tensor, width: int):
    """Route the original Sana by hand in block hooks: gather before block ``start``, every routed block gets the
    sub-grid's height and width (positional arguments 5 and 6), scatter after block ``end``."""
    blocks = m.transformer_blocks
    saved = {}
    b = torch.arange(kept.shape[0])[:, None]
    sh, sw = {grid_of_kept(k, width) for k in kept}.pop()

    def out_hook(mod, args):
        saved["x"] = args[0]
        return (args[0][b, kept],) + args[1:]

    def grid_hook(mod, args):
        return args[:5] + (sh, sw) + args[7:]

    def in_hook(mod, args, output):
        full = saved["x"].clone()
        full[b, kept] = output
        return full

    handles = [blocks[start].register_forward_pre_hook(out_hook)]
    handles += [blk.register_forward_pre_hook(grid_hook) for blk in blocks[start:end + 1]]
    handles.append(blocks[end].register_forward_hook(in_hook))
    return handles


def test_sana_routes_structured_and_matches_hook_reference():
    m, tm, args, report = sana()
    (route,) = report.routes
    assert route.num_keep == 32 and "structured, not uniform: one token per 2x1 cell" in route.selection_reason
    assert "random selection cannot run here" in route.selection_reason
    tm.train()
    out = tm(*args).sample
    (rec,) = treadfx.last_routes(tm)
    handles = sana_by_hooks(m, 1, 2, rec.kept, 8)
    try:
        ref = m(*args).sample
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_sana_refusals_give_only_advice_that_fits():
    """Every Sana block needs the grid: a refused ratio is fixed by the grid's ratios only (8x8: even sides), and a
    keep mask off one sub-grid by marks on one sub-grid (2x1 cells are the smallest: no smaller-cell ratio)."""
    m, tm, args, report = sana()
    tm.train()
    treadfx.set_ratio(tm, 0.3)
    try:
        with pytest.raises(treadfx.InvalidRatioError) as e:
            tm(*args)
    finally:
        treadfx.set_ratio(tm, 0.5)
    assert "cannot keep 45 of 64 tokens" in str(e.value) and str(e.value).endswith("Fix: use one of these ratios.")
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[:, [0, 9]] = True  # (0, 0) and (1, 1): rows of both parities
    with pytest.raises(treadfx.TokenCountError) as e, treadfx.keep_tokens(tm, keep):
        tm(*args)
    msg = str(e.value)
    assert "one sub-grid of the 2x1 cells (all in even rows, or all in odd rows)" in msg
    assert "smaller cells" not in msg and "end the route" not in msg
    keep[:, 9] = False
    keep[:, 16 + 5] = True  # (0, 0) and (2, 5): both in even rows, kept
    with treadfx.keep_tokens(tm, keep):
        tm(*args)
    kept = treadfx.last_routes(tm)[0].kept
    assert all({0, 21} <= set(k.tolist()) for k in kept)


def test_sana_training_step_eval_and_flops():
    m, tm, args, report = sana()
    tm.train()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    try:
        opt = torch.optim.SGD(tm.parameters(), lr=1e-2)
        out = tm(*args).sample
        loss = ((out - torch.randn_like(out)) ** 2).mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in tm.parameters() if p.grad is not None)
        assert m.transformer_blocks[1].ff.conv_depth.weight.grad is not None  # the routed conv learns
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())
        tm.eval()
        m.eval()
        with torch.no_grad():
            assert torch.equal(tm(*args).sample, m(*args).sample)  # eval is the original model, bit for bit
        tm.train()
        m.train()
        with torch.no_grad():
            dense = m(*args).sample
        routed = tm(*args).sample
        assert not torch.allclose(routed.detach(), dense, atol=1e-4)  # training really routes
    finally:
        with torch.no_grad():
            for k, v in m.state_dict().items():
                v.copy_(before[k])
        tm.train()
    assert report.routed_flops == report.predicted_routed_flops < report.dense_flops
    params = list(m.parameters())
    dense = _fwd_bwd_flops(lambda: m(*args).sample, params)
    routed = _fwd_bwd_flops(lambda: tm(*args).sample, params)
    assert dense == report.dense_flops
    assert dense - routed == report.dense_flops - report.predicted_routed_flops > 0


def test_sana_video_routes_a_subgrid_of_every_frame():
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(0)
    m = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                    num_layers=4, num_cross_attention_heads=2, cross_attention_head_dim=12,
                                    cross_attention_dim=24, caption_channels=8, sample_size=8,
                                    patch_size=(1, 2, 2), rope_max_seq_len=32)
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g),
            torch.rand(2, generator=g) * 999)
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.75)
    report = treadfx.inspect(tm, *args)
    (route,) = report.routes
    assert "2x2 cell of the 3x4x4 token grid (block arguments `frames`, `height`, `width`)" in route.selection_reason
    assert report.routed_flops == report.predicted_routed_flops < report.dense_flops
    out = tm(*args).sample
    out.float().square().mean().backward()
    (rec,) = treadfx.last_routes(tm)
    for k in rec.kept:  # the same 2x2 sub-grid in each of the 3 frames of 4x4 tokens
        per_frame = [sorted(int(i) % 16 for i in k if int(i) // 16 == f) for f in range(3)]
        assert per_frame[0] == per_frame[1] == per_frame[2] and grid_of_kept(torch.tensor(per_frame[0]), 4) == (2, 2)
    tm.eval()
    with torch.no_grad():
        assert torch.equal(tm(*args).sample, m(*args).sample)


@pytest.mark.usefixtures("fresh_dynamo")
def test_grid_net_compiles_fullgraph_and_matches_eager():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = GridNet()
    tm = treadfx.transform(m, start=1, end=3, ratio=0.75)
    img, t = grid_net_inputs()
    tm(img, t)
    kept = treadfx.last_routes(tm)[0].kept
    cm = torch.compile(tm, fullgraph=True, backend="eager")
    with treadfx.fixed_routes(tm, [kept]):
        out = cm(img, t)
    torch.testing.assert_close(out, reference_grid_net(m, img, t, 1, 3, kept), rtol=0, atol=1e-6)
    out = cm(img, t)  # indices drawn inside the compiled graph
    drawn = treadfx.last_routes(tm)[0].kept
    assert {grid_of_kept(k, 8) for k in drawn} == {(4, 4)}
    torch.testing.assert_close(out, reference_grid_net(m, img, t, 1, 3, drawn), rtol=0, atol=1e-6)
    assert dict(counters["graph_break"]) == {}
