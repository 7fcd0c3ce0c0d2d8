"""Public configuration classes, one per method, each validated in one place.

:class:`TreadConfig` holds the arguments of :func:`treadfx.transform` and
:class:`DiffMoEConfig` those of :func:`treadfx.diffmoe`; both functions are
keyword-only sugar for ``treadfx.apply(model, Config(...))``.  A config is
checked twice, in this module only: ``validate()`` checks what is knowable
without a model (ratios, route specs, option values) and ``resolve(model)``
(TREAD) checks it against the model (leaf module paths, route indices inside
the chain).  Every violation is a :class:`~treadfx.TransformError` subclass
naming the fix, raised before any module is changed.

:class:`TransformConfig` is the resolved form a transformed model keeps
(routes as :class:`~treadfx.Route` objects).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.nn as nn

from .blocks import BlockCandidate, find_block_candidates, no_blocks_message
from .errors import (AmbiguousChainError, InvalidMoEConfigError, InvalidRouteError, NoBlocksFoundError,
                     TransformError)
from .routes import Route, check_ratio, normalize_routes, resolve_routes
from .side_exits import check_side_exits_mode

__all__ = ["TreadConfig", "DiffMoEConfig", "TransformConfig"]


@dataclasses.dataclass
class TransformConfig:
    """The resolved arguments of ``transform`` (routes and options), shared by every traced graph of the model."""

    routes: tuple[Route, ...]
    chain: str | int | None = None
    stream: str | None = None
    fp32_after_route: bool = False
    leaf_modules: tuple[str, ...] = ()
    aux_loss: bool = False
    mae_weight: float = 0.0
    side_exits: str | None = None  # None: "full", with a SideExitWarning once per side exit reaching an output


@dataclasses.dataclass(frozen=True)
class TreadConfig:
    """TREAD token routing: which blocks each route spans, the fraction of image tokens it skips, and options.

    ``start``/``end`` (inclusive, negatives from the end, default 2 and -4)
    index the chain of repeated blocks; ``ratio`` is the fraction of image
    tokens skipped.  ``routes=[(start, end, ratio), ...]`` or
    :class:`~treadfx.Route` objects give several routes.  ``chain`` names the
    chain when a model has several (its name, the container paths of its
    blocks joined by ``+``, or its index in ``inspect``'s list); the name of
    one part of a merged chain (``single_transformer_blocks`` of
    ``transformer_blocks+single_transformer_blocks``) routes only that part,
    and start/end then count within it.  ``stream`` names the forward argument
    that carries the image tokens.  ``order``/``selection``/``seed`` set the
    selection of every route given as a tuple (see :class:`~treadfx.Route`).
    ``aux_loss=True`` derives the pixel->token map for
    :func:`~treadfx.route_loss` at trace time; ``mae_weight`` is that loss's
    default MAE weight.  ``leaf_modules`` names extra modules kept as single
    calls in the traced graph.  ``side_exits`` says how a model output computed
    inside a route (not by the stream) is returned: "full" (every token row;
    skipped rows are stale, mask them with :func:`~treadfx.route_mask`) or
    "kept" (kept rows only); None is "full" with a
    :class:`~treadfx.SideExitWarning` on the first training call.
    """

    start: int | None = None
    end: int | None = None
    ratio: float = 0.5
    routes: Sequence[Any] | None = None
    chain: str | int | None = None
    stream: str | None = None
    order: str = "auto"
    selection: str = "auto"
    fp32_after_route: bool = False
    seed: int | None = None
    aux_loss: bool = False
    mae_weight: float = 0.0
    leaf_modules: Sequence[str] = ()
    side_exits: str | None = None

    def validate(self) -> tuple[Route, ...]:
        """The routes this config describes; raises InvalidRatioError / InvalidRouteError / TransformError with the
        fix for anything that is wrong without looking at a model."""
        check_ratio(self.ratio)
        check_side_exits_mode(self.side_exits)
        w = self.mae_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise TransformError(f"mae_weight={w!r} must be a number >= 0. Fix: 0 (off) or e.g. 0.1.")
        return normalize_routes(self.routes, self.start, self.end, self.ratio, self.order, self.selection, self.seed)

    def resolve(self, model: nn.Module) -> tuple[TransformConfig, list[BlockCandidate]]:
        """Validate against ``model`` and return the resolved config with the model's block candidates.

        Raises (before anything is changed) for leaf module paths that are not
        submodules, a model without repeated blocks, and route indices outside
        the chain, overlapping or out of order.
        """
        routes = self.validate()
        for path in self.leaf_modules:
            try:
                model.get_submodule(path)
            except AttributeError as e:
                raise TransformError(
                    f"leaf_modules names {path!r}, which is not a submodule of the model. Fix: {e}") from e
        candidates = find_block_candidates(model)
        if not candidates:
            raise NoBlocksFoundError(no_blocks_message(model))
        _check_routes_against_tree(routes, candidates, self.chain)
        resolved = TransformConfig(
            routes=routes, chain=self.chain, stream=self.stream, fp32_after_route=bool(self.fp32_after_route),
            leaf_modules=tuple(self.leaf_modules), aux_loss=bool(self.aux_loss), mae_weight=float(self.mae_weight),
            side_exits=self.side_exits,
        )
        return resolved, candidates


def _heads(candidates: list[BlockCandidate]) -> dict[str, list[BlockCandidate]]:
    """The candidates by chain part name (the path of their container, as a chain's name spells it), in order."""
    out: dict[str, list[BlockCandidate]] = {}
    for c in candidates:
        out.setdefault(c.path.rsplit(".", 1)[0] if "." in c.path else c.path, []).append(c)
    return out


def _check_routes_against_tree(routes: tuple[Route, ...], candidates: list[BlockCandidate],
                               chain: str | int | None) -> None:
    """Reject, before any trace, a ``chain=`` name that names no container of blocks and the routes that are out
    of range or reversed for every chain the first call can route; nothing that could be valid is rejected.

    The routed chain is known exactly from the module tree when ``chain=`` names containers (their blocks) or when
    every block is in one container; otherwise it is at most all the repeated blocks (a side chain such as a text
    refiner is not routed, so it may be shorter), and the exact range is checked at the first call.
    """
    heads = _heads(candidates)
    if chain is not None and (isinstance(chain, bool) or not isinstance(chain, (str, int))):
        raise AmbiguousChainError(
            f"chain={chain!r} ({type(chain).__name__}) must be a chain's name (str) or its index (int) as "
            "`treadfx.inspect` lists the chains. Fix: pass a name such as "
            f"{next(iter(heads))!r} (the path of the container of the blocks), or None to let treadfx pick the chain "
            "that carries the image tokens.")
    if isinstance(chain, str):
        unknown = [p for p in chain.split("+") if p not in heads]
        if unknown:
            ends = [h for h in heads if any(h.endswith("." + u) for u in unknown)]
            raise AmbiguousChainError(
                f"chain={chain!r} names no chain: {', '.join(repr(u) for u in unknown)} holds no repeated blocks. "
                "A chain's name is the path of the container of its blocks, or the paths of consecutive containers "
                "joined by '+' when one chain runs through them (`treadfx.inspect` prints the chains). The model's "
                "repeated blocks are in: "
                + ", ".join(f"{h!r} ({len(cs)} block{'s' if len(cs) != 1 else ''})" for h, cs in heads.items())
                + ". Fix: pass one of those names"
                + (f" (the full path: {', '.join(repr(h) for h in ends)})." if ends else "."))
        picked = [c for p in chain.split("+") for c in heads[p]]
        exact, what = True, f"chain={chain!r} names {len(picked)} blocks ({picked[0].path} ... {picked[-1].path})"
    else:
        picked = candidates
        exact = len(heads) == 1
        what = (f"the model has {len(picked)} repeated blocks ({picked[0].path} ... {picked[-1].path})" if exact else
                f"the model has {len(picked)} repeated blocks in all ("
                + ", ".join(f"{h} x{len(cs)}" for h, cs in heads.items()) + "), the most any chain can hold")
    upper = len(picked)
    later = ("" if exact else " The routed chain, and so the exact range, is known at the first call: a chain that "
             "does not carry the image tokens (a text refiner, a conditioning encoder) is neither routed nor "
             "counted, so it may hold fewer blocks (`treadfx.inspect` prints the routed chain).")
    for k, r in enumerate(routes):
        for name in ("start", "end"):
            v = getattr(r, name)
            if v >= upper or v < -upper:
                valid = f"so valid indices are {-upper}..{upper - 1}" if exact else \
                    f"so no index outside {-upper}..{upper - 1} is valid"
                raise InvalidRouteError(
                    f"route {k} {name}={v} is out of range: {what}, {valid}.{later} Fix: choose {name} inside the "
                    "chain; negative indices count from the end."
                )
    if exact:
        resolve_routes(routes, upper)  # order, overlap and start <= end
        return
    first: InvalidRouteError | None = None
    for length in range(upper, 0, -1):  # refuse only an order that is wrong for every possible chain length
        try:
            resolve_routes(routes, length)
            return
        except InvalidRouteError as e:
            first = first or e
    raise InvalidRouteError(f"{first} The same holds for every shorter chain: no chain of this model holds more "
                            f"than {upper} blocks.") from None


@dataclasses.dataclass(frozen=True)
class DiffMoEConfig:
    """DiffMoE: the feed-forward network of repeated blocks replaced by experts fed from a batch-level token pool.

    ``num_experts`` experts per converted block, ``capacity`` experts per
    token on average, ``interleave`` converts blocks 1, 3, 5, ... (else all),
    ``shared_expert`` adds an always-on expert, ``predictor_loss_weight`` /
    ``threshold_decay`` set the capacity predictor and its thresholds'
    EMA, ``noise_std`` the relative noise on expert copies (``seed`` fixes
    it), ``ffn`` names the FFN inside each block instead of finding it.  The
    remaining fields are passed to every :class:`~treadfx.moe.DiffMoELayer`
    (see ``docs/diffmoe.md``).
    """

    num_experts: int = 8
    capacity: float = 1.0
    interleave: bool = True
    shared_expert: bool = False
    predictor_loss_weight: float = 1.0
    threshold_decay: float = 0.95
    noise_std: float = 0.01
    seed: int | None = None
    ffn: str | None = None
    capacity_schedule: tuple[int, int] | None = None
    experts_impl: str = "grouped"
    static_capacity: float | None = None
    fp32_router: bool = True
    clamp_k: bool = True
    topk_before_calibration: bool = False
    init: str = "official"

    @property
    def layer_options(self) -> dict:
        """The options passed to every DiffMoE layer."""
        return dict(capacity_schedule=self.capacity_schedule, experts_impl=self.experts_impl,
                    static_capacity=self.static_capacity, fp32_router=bool(self.fp32_router),
                    clamp_k=bool(self.clamp_k), topk_before_calibration=bool(self.topk_before_calibration),
                    init=self.init)

    def validate(self) -> None:
        """Raise :class:`~treadfx.InvalidMoEConfigError` (exact message with the fix) for a bad value."""
        n = self.num_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidMoEConfigError(f"num_experts={n!r} must be an int >= 1. Fix: e.g. num_experts=8.")
        _check_number("capacity", self.capacity, lambda v: v > 0,
                      "must be a number > 0 (experts per token on average; 1.0 keeps the dense FFN compute)",
                      "e.g. capacity=1.0")
        _check_number("predictor_loss_weight", self.predictor_loss_weight, lambda v: v >= 0,
                      "must be a number >= 0", "e.g. predictor_loss_weight=1.0")
        _check_number("threshold_decay", self.threshold_decay, lambda v: 0 <= v < 1,
                      "must be a number in [0, 1) (EMA decay of the capacity thresholds)", "e.g. threshold_decay=0.95")
        _check_number("noise_std", self.noise_std, lambda v: v >= 0,
                      "must be a number >= 0 (relative noise on expert weights)",
                      "e.g. noise_std=0.01, or 0 for exact copies")
        sched = self.capacity_schedule
        if sched is not None and not (isinstance(sched, (tuple, list)) and len(sched) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sched)):
            raise InvalidMoEConfigError(
                f"capacity_schedule={sched!r} must be (dense_steps, ramp_steps), two ints >= 0. "
                "Fix: e.g. capacity_schedule=(10000, 20000), or None for the configured capacity from the start.")
        if self.experts_impl not in ("grouped", "bmm", "loop"):
            raise InvalidMoEConfigError(f"experts_impl={self.experts_impl!r} must be 'grouped', 'bmm' or 'loop'. "
                                        "Fix: e.g. experts_impl='grouped'.")
        if self.static_capacity is not None:
            _check_number("static_capacity", self.static_capacity, lambda v: v > 0,
                          "must be a number > 0 (slots per expert relative to S / E * capacity)",
                          "e.g. static_capacity=2.0, or None for the dynamic inference")
        if self.init not in ("official", "treadfx"):
            raise InvalidMoEConfigError(f"init={self.init!r} must be 'official' or 'treadfx'. "
                                        "Fix: e.g. init='official'.")
        if self.ffn is not None and not isinstance(self.ffn, str):
            raise InvalidMoEConfigError(f"ffn={self.ffn!r} must be a str path inside each block. Fix: e.g. ffn='mlp'.")


def _check_number(name: str, value: Any, ok, rule: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise InvalidMoEConfigError(f"{name}={value!r} {rule}. Fix: {fix}.")
    return float(value)
