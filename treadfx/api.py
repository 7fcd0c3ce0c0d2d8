"""Public entry points: transform, prepare, force_routing, set_ratio, last_routes, fixed_routes."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .blocks import find_block_candidates
from .errors import InvalidRouteError, LiveModelError, NoBlocksFoundError, TransformError
from .routes import check_ratio, normalize_routes, resolve_routes
from .transformed import (
    RouteRecord,
    TransformConfig,
    TreadState,
    _program_for,
    is_transformed,
    state_of,
    tread_subclass,
    unwrap,
)

__all__ = [
    "transform", "prepare", "force_routing", "set_ratio", "last_routes", "fixed_routes", "clone_module_tree",
    "original_class", "keep_tokens", "routing_guidance",
]


def clone_module_tree(root: nn.Module) -> nn.Module:
    """A new module tree with the same classes, attributes, parameter and buffer *objects*.

    Guarantees: ``clone.state_dict()`` has the same keys and the very same
    tensors as ``root.state_dict()``; changing training flags, hooks or the
    module structure of the clone leaves ``root`` untouched; modules shared
    between two paths stay shared.
    """
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        hit = memo.get(id(m))
        if hit is not None:
            return hit
        new = object.__new__(type(m))
        memo[id(m)] = new
        d = dict(m.__dict__)
        d["_parameters"] = type(m._parameters)(m._parameters)
        d["_buffers"] = type(m._buffers)(m._buffers)
        if "_non_persistent_buffers_set" in d:
            d["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
        for k, v in list(d.items()):
            if "hooks" in k and isinstance(v, dict):
                d[k] = type(v)(v)
        d["_modules"] = type(m._modules)((k, clone(c) if c is not None else None) for k, c in m._modules.items())
        new.__dict__.update(d)
        return new

    return clone(root)


def _attach(module: nn.Module, config: TransformConfig) -> nn.Module:
    original = type(module)
    candidates = find_block_candidates(module)
    module.__class__ = tread_subclass(original)
    module.__dict__["_treadfx"] = TreadState(config, original, candidates)
    return module


def transform(
    model: nn.Module,
    start: int | None = None,
    end: int | None = None,
    ratio: float = 0.5,
    *,
    routes: Sequence[Any] | None = None,
    chain: str | int | None = None,
    stream: str | None = None,
    order: str = "auto",
    selection: str = "auto",
    fp32_after_route: bool = False,
    seed: int | None = None,
    aux_loss: bool = False,
    mae_weight: float = 0.0,
    leaf_modules: Sequence[str] = (),
    inplace: bool = False,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
) -> nn.Module:
    """Return ``model`` with TREAD token routing during training.

    Guarantees: in eval mode (unless :func:`force_routing` is active) the
    result computes exactly the original forward; parameters and buffers are
    the original objects and ``state_dict()`` keys are unchanged; ``model`` is
    not mutated unless ``inplace=True``; every invalid argument raises a
    :class:`~treadfx.TransformError` subclass before anything is changed.

    ``start``/``end`` (inclusive, negatives from the end, default 2 and -4)
    index the chain of repeated blocks; ``ratio`` is the fraction of image
    tokens skipped.  ``routes=[(start, end, ratio), ...]`` or
    :class:`~treadfx.Route` objects give several routes.  ``chain`` names the
    chain when a model has several, ``stream`` names the forward argument that
    carries the image tokens.  ``order``/``selection``/``seed`` set the
    selection of every route given as a tuple (see :class:`~treadfx.Route`).
    ``aux_loss=True`` derives the pixel->token mapping for
    :func:`~treadfx.route_loss` at trace time (and reports it in ``inspect``);
    ``mae_weight`` is that loss's default MAE weight.  Tracing happens on the
    first training call for each input signature, or now if
    ``example_inputs`` is given.
    """
    if not isinstance(model, nn.Module):
        raise TransformError(f"transform() needs a torch.nn.Module, got {type(model).__name__}. Fix: pass the model.")
    if is_transformed(unwrap(model)):
        raise TransformError(
            "this model is already transformed by treadfx. Fix: transform the original model, or change routing "
            "with treadfx.set_ratio / force_routing."
        )
    nested = next((name for name, sub in model.named_modules() if name and is_transformed(sub)), None)
    if nested is not None:
        raise LiveModelError(
            f"`{nested}` inside this {type(model).__name__} is already a treadfx-transformed model; transforming "
            "the outer module would route twice. Fix: transform only one of them (usually the backbone), or "
            f"pass the original module instead of `{nested}`."
        )
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or hasattr(model, "_orig_mod"):
        raise TransformError(
            f"transform() got a {type(model).__name__} wrapper. Fix: transform the bare model first, then wrap it "
            "(DDP / FSDP / torch.compile)."
        )
    check_ratio(ratio)
    if isinstance(mae_weight, bool) or not isinstance(mae_weight, (int, float)) or mae_weight < 0:
        raise TransformError(f"mae_weight={mae_weight!r} must be a number >= 0. Fix: 0 (off) or e.g. 0.1.")
    route_specs = normalize_routes(routes, start, end, ratio, order, selection, seed)
    for path in leaf_modules:
        try:
            model.get_submodule(path)
        except AttributeError as e:
            raise TransformError(f"leaf_modules names {path!r}, which is not a submodule of the model. Fix: {e}") from e
    candidates = find_block_candidates(model)
    if not candidates:
        raise NoBlocksFoundError(
            f"{type(model).__name__} has no repeated blocks: no ModuleList/Sequential holds two or more submodules "
            "of the same class. Fix: keep the transformer blocks in an nn.ModuleList (as DiT, diffusers and timm do)."
        )
    upper = _expected_chain_length(candidates, chain)
    for k, r in enumerate(route_specs):
        for name in ("start", "end"):
            v = getattr(r, name)
            if v >= upper or v < -upper:
                raise InvalidRouteError(
                    f"route {k} {name}={v} is out of range: the model has {upper} repeated blocks "
                    f"({candidates[0].path} ... {candidates[-1].path}), so valid indices are {-upper}..{upper - 1}. "
                    f"Fix: choose {name} inside the chain; negative indices count from the end."
                )
    resolve_routes(route_specs, upper)  # order, overlap and start <= end, before the model is touched
    config = TransformConfig(
        routes=route_specs, chain=chain, stream=stream, fp32_after_route=fp32_after_route,
        leaf_modules=tuple(leaf_modules), aux_loss=bool(aux_loss), mae_weight=float(mae_weight),
    )
    target = model if inplace else clone_module_tree(model)
    out = _attach(target, config)
    if example_inputs is not None:
        prepare(out, *example_inputs, **(example_kwargs or {}))
    return out


def _expected_chain_length(candidates: list, chain: str | int | None) -> int:
    """Blocks in the chain routes index, as far as the module tree tells (the trace confirms it later)."""
    if isinstance(chain, str):
        names = chain.split("+")
        picked = [c for c in candidates if c.container in names or c.path.rsplit(".", 1)[0] in names]
        if picked:
            return len(picked)
    return len(candidates)


def original_class(model: nn.Module) -> type:
    """The class the model had before ``transform``."""
    return state_of(model).original_class


def prepare(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Trace and rewrite now for these inputs (in the model's current mode); returns the model.

    Use it before compiling a module that *contains* the transformed model, or
    to pay the tracing cost (and see any error) before training starts.
    """
    m = unwrap(model)
    st = state_of(m)
    if st.active(m.training):
        prog = _program_for(m, st, tuple(args), dict(kwargs))
        st.current = prog
        st._sync(prog)
        st.prime(prog, tuple(args), dict(kwargs))
    return model


@contextlib.contextmanager
def force_routing(model: nn.Module, ratio: float | None = None) -> Iterator[nn.Module]:
    """Route also in eval mode (TREAD guidance), optionally with another ratio, inside the block.

    Each distinct kept-token count compiles to its own graph under
    ``torch.compile``; leaving the block restores the previous behaviour.
    """
    st = state_of(model)
    if ratio is not None:
        ratio = check_ratio(ratio, "force_routing ratio")
    prev = (st.forced, st.forced_ratio)
    st.forced, st.forced_ratio = True, ratio
    st.sync_selects()
    try:
        yield model
    finally:
        st.forced, st.forced_ratio = prev
        st.sync_selects()


def set_ratio(model: nn.Module, ratio: float, route: int | None = None) -> None:
    """Change the selection ratio of every route (or of route ``route``) without retracing.

    Changing the ratio changes only the kept-token count K, an int attribute
    of the route ops: ``torch.compile`` compiles one graph per distinct K.
    """
    st = state_of(model)
    ratio = check_ratio(ratio)
    routes = list(st.config.routes)
    if route is not None and not 0 <= route < len(routes):
        raise InvalidRouteError(f"route={route} but the model has {len(routes)} routes. Fix: use 0..{len(routes) - 1}.")
    for k in range(len(routes)):
        if route is None or k == route:
            routes[k] = dataclasses.replace(routes[k], ratio=ratio)
    st.config = dataclasses.replace(st.config, routes=tuple(routes))
    st.sync_selects()


def routing_step(model: nn.Module) -> int:
    """The forward count that seeded selection (``seed=``) has reached; save it with a checkpoint.

    Seeded routes are a pure function of (seed, route, rank, this count), so
    ``set_routing_step(model, routing_step(saved))`` on resume continues the
    exact sequence of routes instead of replaying the first ones.
    """
    return state_of(model).routing_step()


def set_routing_step(model: nn.Module, step: int) -> None:
    """Make the next seeded forward draw the routes of forward number ``step`` (works on a compiled model)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TransformError(f"set_routing_step(step={step!r}): step must be an int >= 0. Fix: pass the value "
                             "treadfx.routing_step(model) returned when the checkpoint was saved.")
    state_of(model).set_routing_step(step)


def last_routes(model: nn.Module) -> list[RouteRecord]:
    """Kept indices of each route in the last routed forward (empty before the first)."""
    st = state_of(model)
    prog = st.last_program
    if prog is None:
        return []
    out = []
    for plan, kept in zip(prog.plans, st.last_kept):
        if kept is not None:
            out.append(RouteRecord(plan.index, kept, plan.num_tokens))
    return out


@contextlib.contextmanager
def fixed_routes(model: nn.Module, kept: Sequence[torch.Tensor | None]) -> Iterator[nn.Module]:
    """Use these kept indices (one per route, [B, K] or [K]) instead of drawing them, inside the block.

    Meant for tests, for replaying a selection, and for checking distributed
    runs against a single process.
    """
    st = state_of(model)
    prev = st.fixed
    st.fixed = list(kept)
    st.sync_selects()
    try:
        yield model
    finally:
        st.fixed = prev
        st.sync_selects()


@contextlib.contextmanager
def keep_tokens(model: nn.Module, mask: torch.Tensor | None) -> Iterator[nn.Module]:
    """Inside the block, tokens marked in ``mask`` are kept first by every route.

    ``mask`` is bool ``[B, N]`` per image token, or ``[B, H, W]`` / ``[B, C, H, W]``
    in the image input's space (a token is marked if any of its pixels is).
    A marked token is never routed as long as a sample marks at most K tokens
    (eagerly checked: :class:`~treadfx.TokenCountError` otherwise).  Use it for
    masked-loss training (segmentation, inpainting regions).
    """
    st = state_of(model)
    prev = st.keep
    st.keep = mask
    try:
        yield model
    finally:
        st.keep = prev


def routing_guidance(model: nn.Module, *args: Any, scale: float, rate: float = 0.5, base_rate: float = 0.0,
                     **kwargs: Any) -> Any:
    """TREAD guidance: ``v(rate) + scale * (v(base_rate) - v(rate))`` (CompVis/tread ``rf.py``).

    ``v(g)`` is the model's forward with routing forced at selection rate
    ``g`` (``base_rate=0`` is the plain forward).  Works on the transformed
    model or its ``torch.compile`` wrapper; compiles at most one graph per
    rate, so a sampling loop does not recompile per step.  Structured outputs
    (tuples, dataclasses) are combined leaf by leaf.
    """
    import torch.utils._pytree as pytree

    check_ratio(rate, "routing_guidance rate")
    check_ratio(base_rate, "routing_guidance base_rate")
    with force_routing(model, ratio=rate):
        weak = model(*args, **kwargs)
    if base_rate == 0 and not unwrap(model).training:
        strong = model(*args, **kwargs)  # eval: the original forward, no extra graph
    else:
        with force_routing(model, ratio=base_rate):
            strong = model(*args, **kwargs)
    return pytree.tree_map(
        lambda w, s: w + scale * (s - w) if isinstance(w, torch.Tensor) and w.is_floating_point() else w,
        weak, strong,
    )
