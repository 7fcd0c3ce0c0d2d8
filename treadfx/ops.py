"""Runtime route operations inserted into the graph by the TREAD pass.

* :class:`RouteSelect` (route-out): draws which image tokens a route keeps.
* :class:`RouteGather`: takes the kept tokens out of a tensor (the token
  stream, a skip, a RoPE table) along its token axis.
* :class:`RouteScatter` (route-in): puts processed kept tokens back, out of
  place, into the value the stream had at route-out, so skipped tokens
  re-enter bit-identical.

:class:`RouteSelect` reads ``self.training`` (or ``self.forced``) at run time
and returns None when its route is inactive; :class:`RouteGather` and
:class:`RouteScatter` return their input unchanged when the indices they get
are None.  So ``.train()/.eval()`` work on a traced graph without retracing.
The number of kept tokens is a static ``int`` attribute, never a tensor or
float argument, so ``torch.compile`` compiles one graph per distinct K and
never per ratio value.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from .errors import TokenCountError
from .layout import image_span
from .structured import cell_for_count, cells_by_count, marked_off_subgrid, subgrid_indices

__all__ = ["RouteSelect", "StructuredSelect", "RouteGridSize", "RouteGather", "RouteGatherParts", "gather_op", "RouteScatter", "AutocastDisabled", "num_kept", "hashed_keys", "stream_key"]

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors (multipliers < 2^31, so nothing overflows int64)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser on a Python int (a bijection of 64-bit words)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key that hashes a sequence of non-negative ints of any size.

    Each part is encoded as its 64-bit word count followed by its words, so
    distinct sequences have distinct encodings (``(4, 0)`` and ``(3, 1)`` are
    unrelated keys, unlike with ``seed + route``); the encoding is chained
    through SplitMix64.
    """
    h = _splitmix64(len(parts))
    for p in parts:
        p = int(p)
        if p < 0:
            raise ValueError(f"stream_key parts must be non-negative, got {p}")
        words = []
        while True:
            words.append(p & _M64)
            p >>= 64
            if not p:
                break
        for w in [len(words)] + words:
            h = _splitmix64(h ^ w)
    return h


def hashed_keys(seed: int, step: torch.Tensor | None, rows: int, cols: int, device, *, route: int = 0,
                rank: int = 0) -> torch.Tensor:
    """Pseudo-random int64 keys [rows, cols] in [0, 2^32), a pure function of (seed, route, rank, step, position).

    Counter-based, so it is reproducible across devices and runs and compiles
    without a ``torch.Generator``; ``step`` is a 0-dim int64 tensor that the
    caller advances once per forward (read modulo 2^32).  (seed, route, rank)
    are hashed together by :func:`stream_key`, so no two of them share a
    stream; the keys of one row are distinct.
    """
    key = stream_key(seed, route, rank)
    counter = step if step is not None else torch.zeros((), dtype=torch.int64, device=device)
    mix = _hash32(_hash32((counter.to(torch.int64) & _M32) ^ (key & _M32)) ^ (key >> 32))
    pos = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return _hash32(pos * 0x61C88647 + mix)


def _rank() -> int:
    """This process's rank in the default process group, 0 when torch.distributed is not initialised."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def num_kept(num_tokens: int, ratio: float) -> int:
    """K = N - int(N * ratio): tokens a route keeps (the official rounding)."""
    return num_tokens - int(num_tokens * ratio)


def _index_for(idx: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Expand per-sample indices [B, K] to x's rank for torch.gather/scatter along ``axis``."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = idx.shape[0], idx.shape[1]
    target = list(x.shape)
    target[axis] = idx.shape[1]
    return idx.view(shape).expand(target)


class RouteSelect(nn.Module):
    """Route-out: returns the kept token indices of this forward, or None when inactive.

    Per-sample selection returns ``[B, K]`` (each sample its own subset, as in
    the official code); shared selection returns ``[K]`` (one subset for the
    batch, needed when a gathered side input has no batch dimension).
    ``sorted`` keeps the original relative order of kept tokens, which
    order-dependent blocks (scans) require.
    """

    def __init__(self, route_index: int, num_tokens: int, num_keep: int, sorted_order: bool, shared: bool,
                 seed: int | None = None, shared_reason: str | None = None):
        super().__init__()
        self.route_index = route_index
        self.num_tokens = num_tokens
        self.num_keep = num_keep
        self.sorted_order = sorted_order
        self.shared = shared
        self.seed = seed
        self.shared_reason = shared_reason  # why one subset serves the batch (inspect's selection reason), if known
        self.forced = False
        self.fixed: torch.Tensor | None = None  # indices to use instead of drawing (tests, replays)

    def _without_draw(self) -> tuple[bool, torch.Tensor | None]:
        """``(True, result)`` when this call draws nothing: None while the route is inactive (neither training nor
        forced), the fixed indices when set, None when it keeps every token; else ``(False, None)``."""
        if not (self.training or self.forced):
            return True, None
        if self.fixed is not None:
            return True, self.fixed
        if self.num_keep >= self.num_tokens:
            return True, None
        return False, None

    def _scores(self, rows: int, cols: int, ref: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
        """``[rows, cols]`` random sort keys: torch's global RNG, or with ``seed`` counter-based keys of (seed,
        step, route, rank); the distributed rank is read per call (the graph may be traced before
        init_process_group), so each rank and each route draws its own tokens."""
        if self.seed is None:
            return torch.rand(rows, cols, device=ref.device)
        return hashed_keys(self.seed, step, rows, cols, ref.device, route=self.route_index, rank=_rank())

    def extra_repr(self) -> str:
        mode = "shared" if self.shared else "per-sample"
        order = "sorted" if self.sorted_order else "random order"
        return f"route={self.route_index}, N={self.num_tokens}, K={self.num_keep}, {mode}, {order}"

    def _check_marked(self, keep: torch.Tensor, marked: torch.Tensor) -> None:
        """TokenCountError when the route keeps fewer tokens than are marked: in one sample (per-sample selection),
        or in the union of the marks over the batch (shared selection, ``marked`` is that union ``[1, N]``)."""
        counts = marked.sum(dim=1)
        most = int(counts.max()) if counts.numel() else 0
        if most <= self.num_keep:
            return
        n, k = self.num_tokens, self.num_keep
        lower = math.floor((n - most) / n * 1e4) / 1e4  # the largest ratio (4 decimals) whose K is >= most
        if not self.shared:
            b = int(counts.argmax())
            raise TokenCountError(
                f"the keep mask marks {most} tokens of sample {b}, but route {self.route_index} keeps only {k} of "
                f"{n}; {most - k} marked tokens would be routed. Fix: mark fewer tokens, or lower the route ratio to "
                f"at most {lower:g}."
            )
        per_sample = int(keep.sum(dim=1).max()) if keep.numel() else 0
        why = {None: "see treadfx.inspect for why", "requested": "selection='shared' was requested"}.get(
            self.shared_reason, self.shared_reason)
        raise TokenCountError(
            f"route {self.route_index} uses shared selection, one kept subset for the whole batch: {why}. A token "
            f"marked in any sample is therefore kept in every sample, and the union of the marks over the batch "
            f"counts: {most} tokens are marked in the batch (at most {per_sample} in one sample), but the route keeps only "
            f"{k} of {n}; {most - k} marked tokens would be routed. Fix: mark fewer tokens, lower the route ratio "
            f"to at most {lower:g}, or give the samples of a batch marks that agree (the same tokens marked in "
            "every sample count once)."
        )

    def forward(self, ref: torch.Tensor, keep: torch.Tensor | None = None,
                step: torch.Tensor | None = None) -> torch.Tensor | None:
        """Kept indices; ``keep`` [B, N] marks tokens that are kept first.

        A marked token is never routed: with per-sample selection each sample may mark up to K tokens, with shared
        selection (one subset for the batch) the union of the marks over the batch must be at most K; more raises
        TokenCountError.  The count is checked in eager calls only (under ``torch.compile`` it would need a host
        sync inside the graph), as :func:`treadfx.keep_tokens` documents.
        """
        done, result = self._without_draw()
        if done:
            return result
        rows = 1 if self.shared else ref.shape[0]
        noise = self._scores(rows, self.num_tokens, ref, step)
        if keep is not None:
            marked = keep.any(dim=0, keepdim=True) if self.shared else keep
            if not torch.compiler.is_compiling() and not isinstance(keep, FakeTensor):
                self._check_marked(keep, marked)
            noise = noise.masked_fill(marked, -1)
        idx = noise.argsort(dim=1)[:, : self.num_keep]
        if self.sorted_order:
            idx = idx.sort(dim=1).values
        return idx[0] if self.shared else idx


class StructuredSelect(RouteSelect):
    """Route-out with structured selection: keeps one token per cell of the token grid (see
    :mod:`treadfx.structured`), at an offset inside the cell drawn per sample.

    Returns ``[B, K]`` indices sorted in raster order, so each sample's kept
    tokens form the sub-grid ``grid // cell``; the cell follows from ``num_keep``
    (area ``N / K``, most square shape), so :func:`~treadfx.set_ratio` changes
    it without retracing.  A K that is not one token per cell raises
    InvalidRatioError naming the ratios the grid allows.  With ``keep`` the
    offset that keeps the most marked tokens is chosen; marked tokens that no
    offset keeps raise TokenCountError (checked eagerly).
    """

    def __init__(self, route_index: int, num_tokens: int, num_keep: int, grid: tuple[int, ...],
                 seed: int | None = None):
        super().__init__(route_index, num_tokens, num_keep, sorted_order=True, shared=False, seed=seed)
        self.grid = tuple(int(s) for s in grid)
        self.cells = cells_by_count(self.grid)  # {K: cell}: a plain dict, so torch.compile folds the lookup
        self.grid_free: tuple | None = None  # (index, path) of chain blocks outside the route taking no grid (advice)

    def extra_repr(self) -> str:
        grid = "x".join(map(str, self.grid))
        return f"route={self.route_index}, N={self.num_tokens}, K={self.num_keep}, structured on the {grid} grid"

    def forward(self, ref: torch.Tensor, keep: torch.Tensor | None = None,
                step: torch.Tensor | None = None) -> torch.Tensor | None:
        """Kept indices ``[B, K]`` of a sub-grid per sample (raster order), or None when inactive."""
        done, result = self._without_draw()
        if done:
            return result
        cell = self.cells.get(self.num_keep) or cell_for_count(
            self.grid, self.num_keep, what=f"route {self.route_index} (structured selection)",
            grid_free=getattr(self, "grid_free", None))
        options = subgrid_indices(self.grid, cell, ref.device)  # [area, K]: one row per offset in the cell
        area, rows = options.shape[0], ref.shape[0]
        score = self._scores(rows, area, ref, step)
        if self.seed is not None:  # integer keys: scaled to [0, 1) so the marked-token counts below dominate
            score = score.to(torch.float32) / 2.0**32
        if keep is not None:
            covered = keep[:, options].sum(dim=-1)  # [B, area]: marked tokens each offset keeps
            score = score + covered.to(score.dtype)
        idx = options.index_select(0, score.argmax(dim=1))
        if keep is not None and not torch.compiler.is_compiling() and not isinstance(keep, FakeTensor):
            kept_marks = keep.gather(1, idx)
            lost = keep.sum(dim=1) - kept_marks.sum(dim=1)
            if bool((lost > 0).any()):
                b = int((lost > 0).nonzero()[0, 0])
                on = torch.zeros_like(keep[b]).scatter(0, idx[b], True)
                kept_pos = int((keep[b] & on).nonzero()[0, 0])  # the best offset keeps at least one marked token
                lost_pos = int((keep[b] & ~on).nonzero()[0, 0])
                raise TokenCountError(marked_off_subgrid(self.grid, cell, b, int(keep[b].sum()), int(lost[b]),
                                                         kept_pos, lost_pos, self.route_index))
        return idx


class RouteGridSize(nn.Module):
    """The size of one token-grid axis that the routed blocks get: ``grid[axis]`` when the route is inactive
    (indices None), else the kept sub-grid's size on that axis, derived from the kept count K (the cell of area
    ``N / K``, see :func:`treadfx.structured.cell_for_count`).  A static int, so ``torch.compile`` specialises
    on it like on K."""

    def __init__(self, grid: tuple[int, ...], axis: int):
        super().__init__()
        self.grid = tuple(int(s) for s in grid)
        self.axis = axis
        self.cells = cells_by_count(self.grid)

    def extra_repr(self) -> str:
        return f"axis={self.axis} of the {'x'.join(map(str, self.grid))} grid"

    def forward(self, idx: torch.Tensor | None) -> int:
        if idx is None:
            return self.grid[self.axis]
        keep = int(idx.shape[-1])
        cell = self.cells.get(keep) or cell_for_count(self.grid, keep, what="kept indices of a structured route")
        return self.grid[self.axis] // cell[self.axis]


class RouteGather(nn.Module):
    """Keeps the selected image tokens of a tensor along its token axis.

    ``offset``/``length`` locate the image segment (tokens before and after it,
    such as a class token or text tokens, are always kept); ``batched`` says
    whether the tensor has a batch dimension; ``per_sample`` whether the
    indices do.
    """

    def __init__(self, axis: int, offset: int, length: int, total: int, batched: bool, per_sample: bool):
        super().__init__()
        self.axis, self.offset, self.length, self.total = axis, offset, length, total
        self.batched, self.per_sample = batched, per_sample

    def extra_repr(self) -> str:
        return f"axis={self.axis}, image=[{self.offset}:{self.offset + self.length}] of {self.total}"

    def _full(self, idx: torch.Tensor) -> torch.Tensor:
        if self.offset == 0 and self.length == self.total:
            return idx
        parts = []
        lead = idx.shape[:-1]
        if self.offset:
            parts.append(torch.arange(self.offset, device=idx.device).expand(*lead, self.offset))
        parts.append(idx + self.offset)
        tail = self.total - self.offset - self.length
        if tail:
            parts.append(torch.arange(self.offset + self.length, self.total, device=idx.device).expand(*lead, tail))
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return x
        full = self._full(idx)
        # index_select saves only the indices for backward (torch.gather would also keep x alive)
        if not self.per_sample:
            return x.index_select(self.axis, full)
        b, k = full.shape
        if not self.batched:  # per-sample subsets of a table without batch dim -> batched table
            if self.axis == 0:
                return x.index_select(0, full.reshape(-1)).view(b, k, *x.shape[1:])
            x = x.unsqueeze(0).expand(b, *x.shape)
            return torch.gather(x, self.axis + 1, _index_for(full, x, self.axis + 1))
        if self.axis == 1:
            n = x.shape[1]
            flat = (full + torch.arange(b, device=full.device).unsqueeze(1) * n).reshape(-1)
            return x.flatten(0, 1).index_select(0, flat).view(b, k, *x.shape[2:])
        return torch.gather(x, self.axis, _index_for(full, x, self.axis))


def _full_indices(idx: torch.Tensor, offset: int, length: int, total: int) -> torch.Tensor:
    """Indices into an axis of ``total`` positions: those before and after the image segment, and the kept
    image tokens ``idx`` (``[K]`` or ``[B, K]``) shifted to the segment."""
    if offset == 0 and length == total:
        return idx
    lead = idx.shape[:-1]
    parts = []
    if offset:
        parts.append(torch.arange(offset, device=idx.device).expand(*lead, offset))
    parts.append(idx + offset)
    if total - offset - length:
        parts.append(torch.arange(offset + length, total, device=idx.device).expand(*lead, total - offset - length))
    return torch.cat(parts, dim=-1)


class RouteGatherParts(nn.Module):
    """Keeps the selected image tokens of a side input with several token axes, or of a module's token tables.

    ``parts`` is a tuple of ``(path, axes, batched, lead, expand_dim0)`` with ``axes`` a tuple of
    ``(axis, offset, length, total)`` (see :class:`treadfx.layout.SidePart`).  A tensor input (one part, path
    ``""``) is gathered on every listed axis: an ``[B, 1, N, N]`` or ``[1, 1, N, N]`` mask becomes
    ``[B, 1, K, K]`` / ``[1, 1, K, K]``.  A module input is returned as a shallow copy whose listed tensors
    are replaced by their gathered rows; its code, parameters, other tensors and hooks are the original's,
    and the module itself is never modified.  With per-sample indices ``[B, K]``, an unbatched table gets a
    batch dim (or its size-1 dim 0 is expanded, ``expand_dim0``) and ``lead`` singleton dims after it, so
    ``[N, d]`` used against ``[B, H, N, d]`` queries becomes ``[B, 1, K, d]`` and each sample meets its own
    rows.  With indices None (route inactive) the input is returned as is.
    """

    def __init__(self, parts: tuple, per_sample: bool):
        super().__init__()
        self.parts = tuple((str(p), tuple(tuple(int(v) for v in a) for a in axes), bool(b), int(lead), bool(e0))
                           for p, axes, b, lead, e0 in parts)
        self.per_sample = per_sample

    def extra_repr(self) -> str:
        return ", ".join(f"{p or 'value'}: axes {[a[0] for a in axes]}" for p, axes, *_ in self.parts)

    def _gather(self, x: torch.Tensor, axes: tuple, batched: bool, lead: int, expand0: bool,
                idx: torch.Tensor) -> torch.Tensor:
        if not self.per_sample:
            for axis, off, n, total in axes:
                x = x.index_select(axis, _full_indices(idx, off, n, total))
            return x
        b = idx.shape[0]
        if not batched:
            if expand0:
                x = x.expand(b, *x.shape[1:])
            else:
                x = x.view(1, *([1] * lead), *x.shape).expand(b, *([1] * lead), *x.shape)
                axes = tuple((axis + 1 + lead, off, n, total) for axis, off, n, total in axes)
        for axis, off, n, total in axes:
            full = _full_indices(idx, off, n, total)
            x = torch.gather(x, axis, _index_for(full, x, axis))
        return x

    def forward(self, x, idx: torch.Tensor | None):
        if idx is None:
            return x
        if isinstance(x, torch.Tensor):
            (_, axes, batched, lead, e0), = self.parts
            return self._gather(x, axes, batched, lead, e0, idx)
        return self._module_copy(x, idx)

    def _module_copy(self, module: nn.Module, idx: torch.Tensor) -> nn.Module:
        copies: dict[str, nn.Module] = {}

        def copy_of(path: str) -> nn.Module:
            if path in copies:
                return copies[path]
            if path == "":
                new = copy.copy(module)
            else:
                parent, _, name = path.rpartition(".")
                owner = copy_of(parent)
                new = copy.copy(owner._modules[name])
                owner._modules = dict(owner._modules)
                owner._modules[name] = new
            new.__dict__ = dict(new.__dict__)  # (copy.copy already gave a new dict; this keeps it explicit)
            new._buffers = dict(new._buffers)
            copies[path] = new
            return new

        for path, axes, batched, lead, e0 in self.parts:
            owner_path, _, name = path.rpartition(".")
            owner = copy_of(owner_path)
            if name in owner._buffers:
                owner._buffers[name] = self._gather(owner._buffers[name], axes, batched, lead, e0, idx)
            else:
                owner.__dict__[name] = self._gather(owner.__dict__[name], axes, batched, lead, e0, idx)
        return copies[""]


def gather_op(decision, per_sample: bool) -> nn.Module:
    """The gather op for one "gather" decision of a route plan: :class:`RouteGather` for a tensor with one
    token axis, :class:`RouteGatherParts` for a tensor with several (masks) or a module holding token tables
    (``decision.parts``, a tuple of :class:`treadfx.layout.SidePart`)."""

    parts = getattr(decision, "parts", None)
    if parts is None:
        off, n = image_span(decision.layout)
        total = sum(s.length for s in decision.layout)
        return RouteGather(decision.axis, off, n, total, decision.batched, per_sample)
    spec = []
    for p in parts:
        axes = []
        for axis, layout in p.axes:
            off, n = image_span(layout)
            axes.append((axis, off, n, sum(s.length for s in layout)))
        spec.append((p.path, tuple(axes), p.batched, p.lead, p.expand_dim0))
    return RouteGatherParts(tuple(spec), per_sample)


class RouteScatter(nn.Module):
    """Route-in: writes processed kept tokens back into the stream saved at route-out (out of place).

    ``value`` has K image tokens at ``[v_offset, v_offset + K)`` on ``axis``;
    ``base`` is the stream at route-out with N image tokens at ``b_offset``.
    The result has the layout of ``value`` with the image segment widened to N:
    kept positions hold the processed tokens, skipped positions the route-out
    values, bit for bit.
    """

    def __init__(self, axis: int, v_offset: int, b_offset: int, length: int, per_sample: bool):
        super().__init__()
        self.axis, self.v_offset, self.b_offset, self.length = axis, v_offset, b_offset, length
        self.per_sample = per_sample

    def extra_repr(self) -> str:
        return f"axis={self.axis}, image@{self.v_offset} <- base image@{self.b_offset}, N={self.length}"

    def forward(self, value: torch.Tensor, base: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return value
        ax = self.axis
        keep = idx.shape[-1]
        whole_v = self.v_offset == 0 and value.shape[ax] == keep
        whole_b = self.b_offset == 0 and base.shape[ax] == self.length
        src = value if whole_v else value.narrow(ax, self.v_offset, keep)
        img = base if whole_b else base.narrow(ax, self.b_offset, self.length)
        if self.per_sample:
            img = img.scatter(ax, _index_for(idx, src, ax), src)
        else:
            img = img.index_copy(ax, idx, src)
        if whole_v:
            return img
        parts = []
        if self.v_offset:
            parts.append(value.narrow(ax, 0, self.v_offset))
        parts.append(img)
        tail = value.shape[ax] - self.v_offset - keep
        if tail:
            parts.append(value.narrow(ax, self.v_offset + keep, tail))
        return torch.cat(parts, dim=ax)


class AutocastDisabled(nn.Module):
    """Runs a block in float32 with autocast off (the official code's first block after route-in)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        device_type = "cpu"
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                device_type = a.device.type
                break
        if not torch.is_autocast_enabled(device_type):
            return self.block(*args, **kwargs)

        def up(a):
            return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

        with torch.autocast(device_type=device_type, enabled=False):
            return self.block(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
