"""Structured (sub-grid) selection for blocks that need the token grid.

Some blocks reshape their tokens to the ``H x W`` (or ``F x H x W``) grid they
come from, e.g. Sana's Mix-FFN runs a depthwise 3x3 convolution on it, and
take the grid size as plain int arguments (``block(x, ..., height, width)``).
A random subset of the tokens has no grid, so such blocks cannot run on it.

Structured selection keeps a *regular sub-grid*: the grid is tiled with cells
of a fixed shape (``2x1``, ``2x2``, ...; one frame deep on video grids), and
every sample keeps the token at the same offset inside every cell, the offset
drawn per sample (the ``structured_with_random_offset`` masks of SPRINT,
arXiv 2510.21986).  The kept indices are sorted in raster order, so the kept
tokens of a sample form an ``(H / ch) x (W / cw)`` grid, and the routed blocks
get that sub-grid's size in place of ``height`` / ``width``.

This is **structured, not uniform** selection: two tokens of one cell are
never kept together, and neighbours in the sub-grid are ``ch`` / ``cw`` tokens
apart in the image.  A cell of area ``a`` keeps ``N / a`` tokens, so the
ratios it can honour are ``1 - 1/a`` (1/2, 3/4, ...) for cell shapes that tile
the grid; others are refused with :class:`~treadfx.InvalidRatioError`.

Grid axes are the block's int arguments in call order, flattened row-major
(the last one varies fastest), as Sana and Sana-Video pass them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction
from typing import Any, Sequence

import torch

from .errors import InvalidRatioError, UnroutableRegionError

__all__ = ["GridSpec", "StructuredSettlement", "grid_cells", "cells_by_count", "cell_for_area", "cell_for_count", "subgrid_shape",
           "subgrid_indices", "supported_ratios", "check_structured_ratio", "find_grids", "grid_free_blocks", "even_grid",
           "subgrid_rule", "marked_off_subgrid", "settle_structured",
           "settle_required", "structured_fallback", "rewrite_grid_args"]


# ------------------------------------------------------------------------------------------ index construction

def grid_cells(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every cell shape that tiles the grid ``sizes`` with area >= 2, on its last two (spatial) axes only
    (leading axes, such as frames, get cell size 1); sorted by area, then most square, then taller first."""
    if len(sizes) < 2:
        return ()
    h, w = sizes[-2], sizes[-1]
    lead = (1,) * (len(sizes) - 2)
    cells = [lead + (ch, cw) for ch in range(1, h + 1) if h % ch == 0 for cw in range(1, w + 1)
             if w % cw == 0 and ch * cw >= 2]
    return tuple(sorted(cells, key=lambda c: (c[-2] * c[-1], abs(c[-2] - c[-1]), -c[-2])))


def cell_for_area(sizes: tuple[int, ...], area: int) -> tuple[int, ...] | None:
    """The cell of this area that tiles the grid, most square first (2x2 before 4x1), or None."""
    return next((c for c in grid_cells(tuple(sizes)) if c[-2] * c[-1] == area), None)


def subgrid_shape(sizes: Sequence[int], cell: Sequence[int]) -> tuple[int, ...]:
    """The shape of the grid of kept tokens: ``sizes[d] // cell[d]`` on every axis."""
    return tuple(s // c for s, c in zip(sizes, cell))


def supported_ratios(sizes: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
    """(ratio, cell) pairs structured selection honours on this grid, smallest ratio first.

    Each ratio is the shortest decimal whose official kept count ``N - int(N * ratio)`` is exactly one token per
    cell (so passing it keeps ``N / area`` tokens).
    """
    from .ops import num_kept

    n = math.prod(sizes)
    out, seen = [], set()
    for cell in grid_cells(tuple(sizes)):
        area = cell[-2] * cell[-1]
        if area in seen:
            continue
        seen.add(area)
        exact = 1 - 1 / area
        cands = [c for d in range(1, 12) for c in (round(exact, d), math.ceil(exact * 10**d) / 10**d)]
        works = [c for c in cands if c < 1 and num_kept(n, c) == n // area]
        # the exact value when it is a short decimal (0.5, 0.75, 0.875) and works, else the shortest decimal that
        # works (one always does: any r in [1 - 1/a, 1 - 1/a + 1/N) keeps N/a)
        short = any(round(exact, d) == exact for d in range(1, 5))
        r = exact if short and num_kept(n, exact) == n // area else (works[0] if works else exact)
        out.append((r, cell))
    return out


def _ratios_text(sizes: tuple[int, ...], limit: int = 6) -> str:
    parts = []
    for r, cell in supported_ratios(sizes)[:limit]:
        a = cell[-2] * cell[-1]
        parts.append(f"{r:g} ({Fraction(a - 1, a)}: {cell[-2]}x{cell[-1]} cells)")
    return ", ".join(parts) if parts else "none (the grid has no cell that tiles it)"


def _grid_text(sizes: Sequence[int]) -> str:
    return "x".join(str(s) for s in sizes)


def _parity(step: int, what: str) -> str:
    """``"all in even rows, or all in odd rows"`` for step 2, else ``"all with the same row number mod 3"``."""
    if step == 2:
        return f"all in even {what}s, or all in odd {what}s"
    return f"all with the same {what} number mod {step}"


def subgrid_rule(cell: Sequence[int]) -> str:
    """What it takes for tokens to lie on one sub-grid of this cell shape (to be kept together), in words: with
    ``2x1`` cells "all in even rows, or all in odd rows"; with ``2x2`` cells the same row parity and the same
    column parity."""
    ch, cw = cell[-2], cell[-1]
    if ch > 1 and cw > 1:
        if ch == cw == 2:
            return ("all in even rows or all in odd rows, and at the same time all in even columns or all in odd "
                    "columns")
        return f"all with the same row number mod {ch} and the same column number mod {cw}"
    return _parity(ch, "row") if ch > 1 else _parity(cw, "column")


def token_position(sizes: Sequence[int], flat: int) -> tuple[int, ...]:
    """The grid coordinates (row-major, last axis fastest) of token ``flat``."""
    out = []
    for s in reversed(list(sizes)):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def ratios_below(sizes: tuple[int, ...], area: int) -> list[tuple[float, tuple[int, ...]]]:
    """The (ratio, cell) pairs the grid honours whose cells are smaller than ``area`` (they keep more tokens)."""
    return [(r, c) for r, c in supported_ratios(tuple(sizes)) if c[-2] * c[-1] < area]


def marked_off_subgrid(sizes: tuple[int, ...], cell: tuple[int, ...], sample: int, marked: int, lost: int,
                       kept_pos: int, lost_pos: int, route_index: int) -> str:
    """The TokenCountError text for a sample whose marked tokens lie on several sub-grids of ``cell``: names two
    of them at different offsets and only the fixes that apply on this grid."""
    ch, cw = cell[-2], cell[-1]
    a, b = token_position(sizes, kept_pos), token_position(sizes, lost_pos)
    axes = {2: "(row, column)", 3: "(frame, row, column)"}.get(len(sizes), "grid coordinates")
    smaller = ratios_below(sizes, ch * cw)
    fixes = [f"mark the tokens of a sample on one sub-grid of the {ch}x{cw} cells ({subgrid_rule(cell)})"]
    if smaller:
        fixes.append("use a lower ratio with smaller cells, which keeps more tokens: "
                     + ", ".join(f"{r:g} ({c[-2]}x{c[-1]} cells)" for r, c in smaller))
    fixes.append("route nothing for such batches (treadfx.set_ratio(model, 0.0), then set the ratio back)")
    return (
        f"route {route_index} keeps one token per {ch}x{cw} cell of the {_grid_text(sizes)} token grid (structured "
        f"selection): a sample keeps the tokens at one offset inside their cells, i.e. {subgrid_rule(cell)}. Sample "
        f"{sample} marks tokens at different offsets, such as the tokens at {axes} {a} and {b}, so no offset keeps "
        f"all {marked} tokens marked in sample {sample} ({lost} would be routed). Fix: " + "; or ".join(fixes) + "."
    )


def cells_by_count(sizes: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """{kept token count: the cell that keeps it} for every cell shape that tiles the grid (most square first)."""
    n = math.prod(sizes)
    out: dict[int, tuple[int, ...]] = {}
    for c in grid_cells(tuple(sizes)):
        out.setdefault(n // (c[-2] * c[-1]), c)
    return out


def even_grid(sizes: Sequence[int]) -> tuple[int, ...]:
    """The grid with each odd spatial side (the last two axes) one token longer: the nearest grid whose sides are
    even, on which 2x1 and 2x2 cells (ratios 0.5 and 0.75) always tile."""
    sizes = tuple(sizes)
    return sizes[:-2] + tuple(s + s % 2 for s in sizes[-2:])


def _ratio_fixes(sizes: tuple[int, ...], grid_free: Sequence[tuple[int, str]] | None) -> list[str]:
    """The fixes for a refused structured ratio that apply here: the grid's own ratios; a token grid with even sides
    when one is odd (naming the ratios it honours); random selection on chain blocks that do not take the grid, only
    when there are such blocks (``grid_free``; None when unknown)."""
    fixes = ["use one of these ratios"]
    even = even_grid(sizes)
    if even != tuple(sizes):
        honoured = [r for r, _ in supported_ratios(even)]
        if honoured:
            fixes.append(f"train at a resolution whose token grid has even sides (e.g. {_grid_text(even)} tokens "
                         f"instead of {_grid_text(sizes)}), where structured selection honours "
                         + ", ".join(f"{r:g}" for r in honoured[:6]))
    if grid_free:
        names = ", ".join(f"`{n}` ({k})" for k, n in grid_free[:6]) + (", ..." if len(grid_free) > 6 else "")
        fixes.append("route only chain blocks that do not take the token grid, with random selection: "
                     f"{names} (name: chain index)")
    return fixes


def cell_for_count(sizes: tuple[int, ...], keep: int, what: str = "structured selection",
                   grid_free: Sequence[tuple[int, str]] | None = None) -> tuple[int, ...]:
    """The cell that keeps exactly ``keep`` tokens of the grid, or InvalidRatioError naming the ratios it can keep
    and only the fixes that apply (``grid_free``: the chain's blocks outside the route that take no token grid,
    None when unknown; ending the route before the grid blocks is advised only when there are some)."""
    n = math.prod(sizes)
    cell = cell_for_area(tuple(sizes), n // keep) if 0 < keep <= n and n % keep == 0 else None
    if cell is None:
        fixes = _ratio_fixes(tuple(sizes), grid_free)
        raise InvalidRatioError(
            f"{what} keeps one token per cell of the {_grid_text(sizes)} token grid, so it cannot keep {keep} of "
            f"{n} tokens. The ratios it can honour here are {_ratios_text(tuple(sizes))}. Fix: "
            + "; or ".join(fixes) + "."
        )
    return cell


def check_structured_ratio(ratio: float, sizes: tuple[int, ...], route_index: int,
                           grid_free: Sequence[tuple[int, str]] | None = None) -> tuple[int, ...] | None:
    """The cell for ``ratio`` on this grid (None for ratio 0: nothing is routed), or InvalidRatioError (see
    :func:`cell_for_count`)."""
    from .ops import num_kept

    n = math.prod(sizes)
    keep = num_kept(n, ratio)
    if keep >= n:
        return None
    return cell_for_count(sizes, keep, what=f"route {route_index} (ratio={ratio:g}, structured selection)",
                          grid_free=grid_free)


def grid_free_blocks(chain, start: int, end: int, sizes: Sequence[int]) -> tuple[tuple[int, str], ...]:
    """``(chain index, path)`` of the chain's blocks outside ``start..end`` that do not get the grid sizes among their
    int arguments (so they cannot reshape the tokens to the grid): where random selection could route instead.  A
    block that gets them is counted as needing the grid."""
    out = []
    for k, node in enumerate(chain.nodes):
        if start <= k <= end:
            continue
        ints = [_int_value(a) for a in list(node.args) + list(node.kwargs.values())]
        if not all(s in ints for s in sizes):
            out.append((k, chain.paths[k] if k < len(chain.paths) else str(node.target)))
    return tuple(out)


def subgrid_indices(sizes: Sequence[int], cell: Sequence[int], device=None) -> torch.Tensor:
    """Kept indices for every offset of ``cell``: int64 ``[area, K]``.

    Row ``o`` keeps, from every cell of the grid, the token at offset ``o`` (offsets in raster order inside the
    cell); each row is sorted, i.e. in raster order of the sub-grid, so the kept tokens form a
    :func:`subgrid_shape` grid.  Indices are into the row-major flattened grid.
    """
    sizes, cell = list(sizes), list(cell)
    sub = subgrid_shape(sizes, cell)
    strides = [math.prod(sizes[d + 1:]) for d in range(len(sizes))]
    base = torch.zeros((), dtype=torch.int64, device=device)
    off = torch.zeros((), dtype=torch.int64, device=device)
    for d in range(len(sizes)):
        base = base.unsqueeze(-1) + torch.arange(sub[d], device=device) * (cell[d] * strides[d])
        off = off.unsqueeze(-1) + torch.arange(cell[d], device=device) * strides[d]
    return off.reshape(-1, 1) + base.reshape(1, -1)


# ------------------------------------------------------------------------------------------ planning

@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The token grid of a structured route: its sizes (raster order, product = image tokens) and where each
    size is passed to the routed block calls (``("arg", i)`` or ``("kw", name)``)."""

    sizes: tuple[int, ...]
    positions: tuple[tuple[str, Any], ...]
    blocks: tuple[Any, ...]  # the routed block nodes that receive the sizes
    names: tuple[str, ...] = ()  # the block's parameter names at those positions, where known

    def describe(self) -> str:
        where = ", ".join(f"`{n}`" for n in self.names) if self.names else ", ".join(
            f"argument {p}" if k == "arg" else f"`{p}=`" for k, p in self.positions)
        return f"{_grid_text(self.sizes)} token grid (block arguments {where})"


def _int_value(a: Any) -> int | None:
    import torch.fx as fx

    if isinstance(a, fx.Node):
        a = a.meta.get("val")
    return a if isinstance(a, int) and not isinstance(a, bool) else None


def _arg_at(node, pos):
    kind, p = pos
    if kind == "arg":
        return node.args[p] if p < len(node.args) else None
    return node.kwargs.get(p)


def _param_names(gm, block, positions) -> tuple[str, ...]:
    """The names of the block's forward parameters at these argument positions, or () when unknown."""
    import inspect

    try:
        params = list(inspect.signature(type(gm.get_submodule(block.target)).forward).parameters)[1:]
    except (AttributeError, TypeError, ValueError):
        return ()
    names = [params[p] if k == "arg" and p < len(params) else p if k == "kw" else None for k, p in positions]
    return tuple(names) if all(isinstance(n, str) for n in names) else ()


def find_grids(blocks: Sequence[Any], n_img: int, gm=None) -> list[GridSpec]:
    """Candidate token grids of the routed block calls: int arguments (> 1) that every routed block gets with the
    same values, in call order, whose product is the image token count.  More axes first."""
    if not blocks:
        return []
    first = blocks[0]
    positions = [("arg", i) for i in range(len(first.args))] + [("kw", k) for k in first.kwargs]
    ints = []
    for pos in positions:
        v = _int_value(_arg_at(first, pos))
        if v is not None and v > 1 and all(_int_value(_arg_at(b, pos)) == v for b in blocks[1:]):
            ints.append((pos, v))
    out = []
    for k in (3, 2):
        for combo in itertools.combinations(ints, k):
            sizes = tuple(v for _, v in combo)
            if math.prod(sizes) == n_img:
                pos = tuple(p for p, _ in combo)
                names = _param_names(gm, first, pos) if gm is not None and first.op == "call_module" else ()
                out.append(GridSpec(sizes, pos, tuple(blocks), names))
    return out


def _override_for(grid: GridSpec, sub: tuple[int, ...]):
    """An argument rewriter for the probe: the routed blocks get the sub-grid's sizes."""
    blocks = set(grid.blocks)

    def override(node, args, kwargs):
        if node not in blocks:
            return args, kwargs
        args, kwargs = list(args), dict(kwargs)
        for (kind, p), s in zip(grid.positions, sub):
            if kind == "arg":
                args[p] = s
            else:
                kwargs[p] = s
        return tuple(args), kwargs

    return override


@dataclasses.dataclass
class StructuredSettlement:
    """What structured planning found for a route: the grid, the scope it was probed in (selection
    "structured"), the decisions per entering tensor, and the region's fake values on the kept sub-grid."""

    grid: GridSpec
    cell: tuple[int, ...] | None  # the route's cell (None at ratio 0)
    scope: Any  # planning.RouteScope
    entering: dict
    order_in: list
    env: dict

    def choice(self, why: str | None = None) -> tuple[str, str, str, str]:
        """(selection, its reason, order, its reason) as ``inspect`` reports them."""
        sizes = self.grid.sizes
        cell = self.cell or grid_cells(sizes)[0]
        reason = (f"structured, not uniform: one token per {cell[-2]}x{cell[-1]} cell of the "
                  f"{self.grid.describe()}, at an offset drawn per sample; the routed blocks get the "
                  f"{_grid_text(subgrid_shape(sizes, cell))} sub-grid")
        if why:
            reason = f"{reason}; chosen because {why}"
        return "per_sample", reason, "sorted", "structured selection keeps the sub-grid in raster order"


def settle_structured(r, stream, n_img: int, grids: list[GridSpec] | None = None,
                      check_ratio: bool = True) -> StructuredSettlement | None:
    """Probe the route's region with a kept sub-grid and the sub-grid's sizes given to the routed blocks, for
    each candidate grid (:func:`find_grids`); the first that runs wins, None when none does.

    Raises InvalidRatioError (naming the ratios the grid allows) when a grid works but the route's ratio is not
    one token per cell (unless ``check_ratio`` is False).
    """
    from . import planning as P

    scope = dataclasses.replace(r, route=dataclasses.replace(r.route, selection="structured"))
    if grids is None:
        grids = find_grids(list(r.chain.nodes[r.start:r.end + 1]), n_img, r.prog.gm)
    for grid in grids:
        if not grid_cells(grid.sizes):
            continue
        ratio_error = None
        try:
            cell = check_structured_ratio(r.route.ratio, grid.sizes, r.index,
                                          grid_free_blocks(r.chain, r.start, r.end, grid.sizes))
        except InvalidRatioError as e:  # raised below only if the sub-grid is what the blocks need
            cell, ratio_error = None, e
        sub = subgrid_shape(grid.sizes, _probe_cell(grid, cell, scope, n_img))
        try:
            entering, order_in = P.initial_decisions(scope, stream, n_img)
            prober = P.Prober(scope, entering, order_in, n_img)
            prober.probe_k = math.prod(sub)
            prober.walk.override = _override_for(grid, sub)
            env = P.settle_side_inputs(scope, entering, order_in, n_img, prober=prober)
        except P.UnroutableRegionError:
            continue
        if ratio_error is not None and check_ratio:
            raise ratio_error
        return StructuredSettlement(grid, cell, scope, entering, order_in, env)
    return None


def _probe_cell(grid: GridSpec, cell, r, n_img: int) -> tuple[int, ...]:
    """The cell to probe with: the route's own, else (ratio 0 or a refused ratio) the smallest whose kept count
    no other size in play has (so a coincidence cannot hide a failure)."""
    from . import planning as P

    if cell is not None:
        return cell
    cells = list(grid_cells(grid.sizes))
    sizes = P.all_sizes([n.meta.get("val") for n in r.region])
    return next((c for c in cells if n_img // (c[-2] * c[-1]) not in sizes), cells[0])


def settle_required(r, stream, n_img: int) -> StructuredSettlement:
    """:func:`settle_structured` for a route whose selection is "structured"; UnroutableRegionError naming the
    fix when the routed blocks take no token grid that makes the region run on a sub-grid."""

    found = settle_structured(r, stream, n_img)
    if found is None:
        raise UnroutableRegionError(
            f"route {r.index} (chain blocks {r.start}..{r.end}): selection='structured' needs routed blocks that "
            f"take the token grid as int arguments (such as `height`, `width`, whose product is the {n_img} image "
            "tokens) and run on a sub-grid of it; treadfx found no such arguments that make the blocks run on the "
            "kept tokens. Fix: use selection='auto' (random selection), or route blocks that take the grid size."
        )
    return found


def _without_fix(text: str) -> str:
    """``text`` up to its last "Fix: ..." sentence (whose generic advice the structured refusal replaces)."""
    cut = text.rfind(" Fix: ")
    return text[:cut] if cut >= 0 else text


def structured_fallback(err: Exception, r, stream, n_img: int) -> tuple[StructuredSettlement, str]:
    """After random selection failed on a route with ``err``: (settlement, why) when its selection is "auto"
    and the routed blocks need the token grid; for an explicit "per_sample" / "shared" an UnroutableRegionError
    advising selection='structured'; otherwise ``err`` is raised again."""

    grids = find_grids(list(r.chain.nodes[r.start:r.end + 1]), n_img, r.prog.gm)
    if not grids:
        raise err
    if r.route.selection != "auto":
        if settle_structured(r, stream, n_img, grids, check_ratio=False) is None:
            raise err
        raise UnroutableRegionError(
            f"{_without_fix(str(err))} The routed blocks take the {grids[0].describe()} and reshape the tokens to "
            f"it, so a random subset of them cannot run there. Fix: use selection='structured' (or 'auto'), which keeps a regular "
            f"sub-grid and passes its size to the blocks; ratios it honours: {_ratios_text(grids[0].sizes)}."
        ) from err
    found = settle_structured(r, stream, n_img, grids)
    if found is None:
        raise err
    return found, ("random selection cannot run here: the routed blocks take the "
                   f"{_grid_text(found.grid.sizes)} token grid and reshape the tokens to it")


# ------------------------------------------------------------------------------------------ rewriting

def rewrite_grid_args(gm, plan, idx) -> list:
    """Give the routed block calls of a structured plan the sub-grid's sizes: one
    :class:`~treadfx.ops.RouteGridSize` node per grid axis (reading the route's kept indices, so the size follows
    the ratio and is the full size when the route is inactive) replaces the block argument.  Returns the new
    nodes."""
    from .ops import RouteGridSize

    grid = plan.grid
    graph = gm.graph
    select = gm.get_submodule(idx.target) if idx.op == "call_module" else None
    if select is not None:  # what a refused ratio (set_ratio after the build) may advise
        select.grid_free = grid_free_blocks(plan.chain, plan.start, plan.end, grid.sizes)
    nodes = []
    with graph.inserting_before(plan.chain.nodes[plan.start]):
        for axis, size in enumerate(grid.sizes):
            name = f"treadfx_route{plan.index}_grid{axis}"
            gm.add_submodule(name, RouteGridSize(grid.sizes, axis))
            n = graph.call_module(name, (idx,))
            n.meta["val"] = size  # the dense value (what `inspect` counts without routing)
            nodes.append(n)
    for block in grid.blocks:
        args, kwargs = list(block.args), dict(block.kwargs)
        for (kind, p), n in zip(grid.positions, nodes):
            if kind == "arg":
                args[p] = n
            else:
                kwargs[p] = n
        block.args, block.kwargs = tuple(args), kwargs
    return nodes

