"""Route specifications and their validation.

A :class:`Route` is ``(start, end, ratio)``: before chain block ``start`` a
fraction ``ratio`` of the image tokens is taken out of the stream, blocks
``start..end`` (inclusive) see only the kept tokens, and after block ``end``
the skipped tokens are put back unchanged.  Indices are 0-based along one
chain; negative indices count from its end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

from .chains import resolve_index
from .errors import InvalidRatioError, InvalidRouteError

__all__ = ["Route", "normalize_routes", "check_ratio", "resolve_routes", "ORDERS", "SELECTIONS"]

ORDERS = ("auto", "random", "sorted")
SELECTIONS = ("auto", "per_sample", "shared", "structured")


def check_ratio(ratio: Any, what: str = "ratio") -> float:
    """The ratio as a float in [0, 1), or InvalidRatioError naming the fix."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise InvalidRatioError(
            f"{what} must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__}). "
            "Fix: pass the fraction of tokens to skip, e.g. ratio=0.5."
        )
    r = float(ratio)
    if math.isnan(r) or not 0.0 <= r < 1.0:
        raise InvalidRatioError(
            f"{what}={ratio!r} is outside [0, 1): it is the fraction of tokens skipped, and at least one token must "
            "stay. Fix: use a value such as 0.5 (the paper default); 0 disables routing."
        )
    return r


@dataclasses.dataclass(frozen=True)
class Route:
    """One route: skip ``ratio`` of the image tokens through chain blocks ``start..end`` (inclusive).

    ``order``: "random" keeps tokens in random order (official TREAD), "sorted"
    keeps their original relative order (required by order-dependent blocks),
    "auto" picks "sorted" when a routed block is found to be order dependent
    or when its permutation-equivariance cannot be shown (the probe fails).
    ``selection``: "per_sample" draws a subset per sample (official), "shared"
    one subset for the whole batch, "auto" uses shared only when a side input
    without batch dimension (a RoPE table) must be gathered, and "structured"
    when the routed blocks reshape their tokens to the token grid (a depthwise
    conv, as in Sana) so that a random subset cannot run there.
    "structured" keeps a regular sub-grid (one token per 2x1, 2x2, ... cell at
    an offset drawn per sample) and gives the routed blocks the sub-grid's
    height and width; it honours only ratios 1 - 1/cell area (1/2, 3/4, ...),
    see :mod:`treadfx.structured`.  It is structured, not uniform, selection.
    ``seed``: None draws with torch's global RNG (reproducible with
    ``torch.manual_seed``); an int uses a counter-based hash of (seed, route index,
    distributed rank, forward count, position), reproducible across devices and
    compile-friendly; no two (seed, route, rank) share a stream.
    ``aux_loss``: whether this route counts in :func:`treadfx.route_loss`.
    """

    start: int
    end: int
    ratio: float = 0.5
    order: str = "auto"
    selection: str = "auto"
    seed: int | None = None
    aux_loss: bool = True

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidRouteError(
                    f"route {name} must be an int block index, got {v!r}. Fix: e.g. Route(start=2, end=-4, ratio=0.5)."
                )
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        if self.order not in ORDERS:
            raise InvalidRouteError(f"route order={self.order!r} is not one of {ORDERS}. Fix: use order='auto'.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidRouteError(f"route seed={self.seed!r} must be a non-negative int or None. Fix: e.g. seed=0.")
        if self.selection not in SELECTIONS:
            raise InvalidRouteError(
                f"route selection={self.selection!r} is not one of {SELECTIONS}. Fix: use selection='auto'."
            )
        if (self.start >= 0) == (self.end >= 0) and self.start > self.end:
            raise InvalidRouteError(
                f"route start={self.start} comes after end={self.end}. Fix: start must be <= end (end is inclusive)."
            )


def normalize_routes(
    routes: Sequence[Any] | None,
    start: int | None,
    end: int | None,
    ratio: float,
    order: str = "auto",
    selection: str = "auto",
    seed: int | None = None,
) -> tuple[Route, ...]:
    """Routes from either ``routes=[...]`` or ``start/end/ratio``; validates everything knowable without a trace."""
    if routes is not None and (start is not None or end is not None):
        raise InvalidRouteError("pass either routes=[...] or start/end, not both. Fix: drop start/end or routes.")
    if routes is None:
        if (start is None) != (end is None):
            raise InvalidRouteError(
                f"start={start!r} and end={end!r}: give both or neither. Fix: e.g. start=2, end=-4 "
                "(neither means the paper default, 2 .. depth-4)."
            )
        if start is None:
            start, end = 2, -4
        return (Route(start, end, ratio, order, selection, seed),)
    if isinstance(routes, (Route, tuple)) and not (
        isinstance(routes, tuple) and routes and isinstance(routes[0], (Route, tuple, list, dict))
    ):
        routes = [routes]
    out = []
    for i, r in enumerate(routes):
        if isinstance(r, Route):
            out.append(r)
        elif isinstance(r, dict):
            out.append(Route(**{"order": order, "selection": selection, "seed": seed, **r}))
        elif isinstance(r, (tuple, list)) and len(r) in (2, 3):
            s, e, *rest = r
            out.append(Route(s, e, rest[0] if rest else ratio, order, selection, seed))
        else:
            raise InvalidRouteError(
                f"routes[{i}]={r!r} is not a route. Fix: use (start, end, ratio) tuples or treadfx.Route objects."
            )
    if not out:
        raise InvalidRouteError("routes=[] has no route. Fix: pass at least one (start, end, ratio).")
    return tuple(out)


def resolve_routes(routes: Iterable[Route], chain_length: int) -> list[tuple[int, int]]:
    """Absolute (start, end) per route for a chain of this length; checks range, order and overlap."""

    resolved = []
    for i, r in enumerate(routes):
        s = resolve_index(r.start, chain_length, "start")
        e = resolve_index(r.end, chain_length, "end")
        if s > e:
            raise InvalidRouteError(
                f"route {i}: start={r.start} resolves to block {s}, after end={r.end} (block {e}) in a chain of "
                f"{chain_length} blocks. Fix: start must be <= end (end is inclusive)."
            )
        resolved.append((s, e))
    for i in range(1, len(resolved)):
        (ps, pe), (s, e) = resolved[i - 1], resolved[i]
        if s <= pe:
            kind = "overlaps" if s >= ps else "comes before"
            raise InvalidRouteError(
                f"route {i} (blocks {s}..{e}) {kind} route {i - 1} (blocks {ps}..{pe}). Fix: give routes in "
                "increasing order with no shared block; a route starts after the previous one ends."
            )
    return resolved
