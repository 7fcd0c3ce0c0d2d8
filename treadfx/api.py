"""Public entry points: transform and diffmoe (sugar for treadfx.apply with a config), prepare, force_routing,
set_ratio, last_routes, fixed_routes, keep_tokens, routing_guidance and the routing-step helpers."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .config import DiffMoEConfig, TreadConfig
from .errors import InvalidMoEConfigError, InvalidRouteError, TransformError
from .method import apply, methods_of
from .report import Report, build_report
from .routes import check_ratio
from .transformed import RouteRecord, clone_module_tree, is_transformed, prepare_now, state_of, unwrap

__all__ = [
    "transform", "diffmoe", "apply", "prepare", "force_routing", "set_ratio", "last_routes", "fixed_routes", "clone_module_tree",
    "original_class", "keep_tokens", "routing_guidance", "inspect",
]


def transform(
    model: nn.Module,
    *,
    start: int | None = None,
    end: int | None = None,
    ratio: float = 0.5,
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
    side_exits: str | None = None,
    inplace: bool = False,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
) -> nn.Module:
    """Return ``model`` with TREAD token routing during training: ``apply(model, TreadConfig(...))``.

    Guarantees: in eval mode (unless :func:`force_routing` is active) the
    result computes exactly the original forward; parameters and buffers are
    the original objects and ``state_dict()`` keys are unchanged; ``model`` is
    not mutated unless ``inplace=True``; every invalid argument raises a
    :class:`~treadfx.TransformError` subclass before anything is changed.

    The routing arguments are the fields of :class:`~treadfx.TreadConfig`
    (``start``/``end``/``ratio`` or ``routes``, ``chain``, ``stream``,
    ``order``, ``selection``, ``seed``, ``fp32_after_route``, ``aux_loss``,
    ``mae_weight``, ``leaf_modules``, ``side_exits``).  Tracing happens on the first training
    call for each input signature, or now if ``example_inputs`` is given.
    """
    config = TreadConfig(start=start, end=end, ratio=ratio, routes=routes, chain=chain, stream=stream, order=order,
                         selection=selection, fp32_after_route=fp32_after_route, seed=seed, aux_loss=aux_loss,
                         mae_weight=mae_weight, leaf_modules=tuple(leaf_modules),
                         side_exits=side_exits)
    return apply(model, config, inplace=inplace, example_inputs=example_inputs, example_kwargs=example_kwargs)


def inspect(model: nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Analyse ``model`` on these example inputs and return a (printable) :class:`~treadfx.Report`.

    ``model`` may be a transformed model (its routes are reported) or a plain
    one (analysed with the paper default route, blocks 2..depth-4, ratio 0.5;
    :class:`~treadfx.InvalidRouteError` saying so when that route does not fit).
    Every method applied to the model adds its section
    (:meth:`treadfx.Method.report_section`).  The model's mode, parameters,
    gradients and DiffMoE statistics are left as they were.
    """
    m = unwrap(model)
    if is_transformed(m):
        return build_report(m, methods_of(m), args, kwargs)
    try:
        m = transform(m)
        return build_report(m, methods_of(m), args, kwargs)
    except InvalidRouteError as e:  # the default route does not fit a short chain: advice for the untransformed case
        facts = str(e).split(" Fix:")[0].rstrip(". ")
        raise InvalidRouteError(
            f"{facts}. treadfx.inspect on an untransformed model analyses transform()'s default route (start=2, "
            "end=-4, ratio=0.5), which does not fit this model. Fix: transform it with a route that fits and inspect "
            "the result, e.g. treadfx.inspect(treadfx.transform(model, start=1, end=-2), *inputs).") from e


def diffmoe(model: nn.Module, *, inplace: bool = False, example_inputs: tuple | None = None,
            example_kwargs: dict | None = None, **options: Any) -> nn.Module:
    """Return ``model`` with the FFN of its repeated blocks replaced by DiffMoE layers:
    ``apply(model, DiffMoEConfig(**options))``.

    Guarantees: every invalid argument, a model without repeated blocks, and
    a block whose FFN cannot be identified raise a
    :class:`~treadfx.TransformError` subclass before anything is changed;
    ``model`` is not mutated unless ``inplace=True`` (otherwise the result is
    a ``copy.deepcopy``); with ``interleave=True`` blocks 1, 3, 5, ... (0-based,
    module order) are converted and the others stay dense, else every block;
    each expert is a deep copy of the block's FFN with relative Gaussian noise
    ``noise_std * std(weight)`` added to each weight (``seed`` fixes it), so
    with ``num_experts=1``, ``capacity=1``, ``noise_std=0`` a training forward
    equals the dense model's.  Works on a ``treadfx.transform``-ed model too
    (its traced-program cache is cleared).  ``example_inputs`` lets the FFN
    finder trace each block on its real input signature.  The options are the
    fields of :class:`~treadfx.DiffMoEConfig` (see ``docs/diffmoe.md``).
    """
    fields = {f.name for f in dataclasses.fields(DiffMoEConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidMoEConfigError(f"diffmoe() got unknown option(s) {unknown}. Fix: use the fields of "
                                    f"treadfx.DiffMoEConfig: {', '.join(sorted(fields))}.")
    return apply(model, DiffMoEConfig(**options), inplace=inplace, example_inputs=example_inputs,
                 example_kwargs=example_kwargs)


def original_class(model: nn.Module) -> type:
    """The class the model had before ``transform``."""
    return state_of(model).original_class


def prepare(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Trace and rewrite now for these inputs (in the model's current mode); returns the model.

    Use it before compiling a module that *contains* the transformed model, or
    to pay the tracing cost (and see any error) before training starts.
    """
    prepare_now(unwrap(model), tuple(args), dict(kwargs))
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
    if mask is not None:  # derived eagerly: a compiled forward cannot derive it
        for prog in st.programs_iter():
            prog.token_map()
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
