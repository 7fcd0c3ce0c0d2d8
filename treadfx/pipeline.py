"""How a transformed model builds its routed program for one input signature: seven named stages.

::

    BuildRequest --trace--> Traced --find_chains--> Chains --analyse_layout--> LaidOut
        --plan_routes--> Planned --rewrite--> Rewritten --make_live--> Built --validate--> Built

Each stage is a function from one artefact to the next:

* :func:`trace` (:mod:`treadfx.tracing`): the forward as a shape-specialised
  ``torch.fx`` graph with the repeated blocks as single calls;
* :func:`find_chains` (:mod:`treadfx.chains`): runs of block calls, each
  consuming the previous one's output;
* :func:`analyse_layout` (:mod:`treadfx.layout`): the token layout of every
  value, and the chain that carries the image tokens;
* :func:`plan_routes`: the request's method plans its rewrite
  (``method.plan_graph``; TREAD: :func:`plan_tread_routes` with
  :mod:`treadfx.planning`, per route what is gathered, scattered or passed,
  and how kept tokens are selected and ordered);
* :func:`rewrite`: the method applies its plan to the graph
  (``method.rewrite_graph``; TREAD: :func:`insert_routes`, the route ops
  inserted by the TREAD pass of :mod:`treadfx.passes.tread`);
* :func:`make_live` (:mod:`treadfx.live`): the executable graph, with every
  module that does not call the routed blocks called live on the model;
* :func:`validate` (:mod:`treadfx.validate`): the routed graph fake-runs and
  returns the original output shapes.

:func:`build` runs them in order, logs each stage's name and time on the
``"treadfx"`` logger (level DEBUG), and marks an error with the stage it came
from: the exception keeps its class and message, gets a ``stage`` attribute
and a note (shown in its traceback) naming the stage.

Only ``plan_routes`` and ``rewrite`` depend on the method: they call the
hooks of the method the request carries (``BuildRequest.method``, the
transformed model's own), so a new graph method subclasses
:class:`treadfx.TreadMethod` and overrides ``plan_graph(laid) -> Planned``
and ``rewrite_graph(planned) -> Rewritten`` (usually calling TREAD's and
changing the result) without editing this module; the graph it leaves must
stay runnable by :class:`treadfx.transformed.RoutedProgram`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import chains as chain_finding
from . import live as live_model
from . import tracing
from . import windows
from .blocks import BlockCandidate, block_graph_hash, find_block_candidates
from .chains import Chain, image_input_index, pick_chain
from .config import TransformConfig
from .equivariance import make_order_probe
from .errors import NoBlocksFoundError, TransformError
from .fake_eval import autocast_cache_off, module_structure_key, rng_preserved
from .graph_walk import upstream
from .layout import LayoutAnalysis, tensor_input_nodes
from .ops import RouteSelect
from .passes.tread import TreadPass, route_selects
from .patch_map import TokenMap, derive_token_map
from .planning import RoutePlan, plan_route
from .routes import resolve_routes
from .tracing import TracedProgram
from .side_exits import apply_kept_exits, kept_output_positions
from .validate import check_routed_graph

__all__ = [
    "BuildRequest", "Traced", "Chains", "LaidOut", "Planned", "Rewritten", "Built", "STAGES", "build",
    "trace", "find_chains", "analyse_layout", "plan_routes", "rewrite", "make_live", "validate",
    "plan_tread_routes", "insert_routes", "forward_arg_names",
]

logger = logging.getLogger("treadfx")


# ------------------------------------------------------------------------------------------ artefacts


@dataclasses.dataclass
class BuildRequest:
    """What a build starts from: the model, its TREAD config, the forward to trace, one call's inputs, and the
    method whose ``plan_graph`` / ``rewrite_graph`` run the plan and rewrite stages (the model's
    :class:`~treadfx.TreadMethod`, or a subclass)."""

    model: nn.Module
    config: TransformConfig
    forward: Callable
    args: tuple
    kwargs: dict
    candidates: list[BlockCandidate] = dataclasses.field(default_factory=list)  # found here when empty
    forced: bool = False  # routing forced in eval (force_routing) when the build happens
    method: Any = None  # a treadfx.Method with plan_graph / rewrite_graph


@dataclasses.dataclass
class Traced:
    """After :func:`trace`: the traced program and the graph's code before any rewrite."""

    request: BuildRequest
    program: TracedProgram
    original_code: str


@dataclasses.dataclass
class Chains:
    """After :func:`find_chains`: every chain of block calls in the graph (at least one)."""

    traced: Traced
    chains: list[Chain]


@dataclasses.dataclass
class LaidOut:
    """After :func:`analyse_layout`: token layouts of the graph's values and the chain the routes index."""

    chains: Chains
    analysis: LayoutAnalysis
    chain: Chain


@dataclasses.dataclass
class Planned:
    """After :func:`plan_routes`: one plan per route (and the pixel->token map when ``aux_loss``)."""

    laid: LaidOut
    plans: list[RoutePlan]
    token_map: TokenMap | None = None


@dataclasses.dataclass
class Rewritten:
    """After :func:`rewrite`: the analysis graph with route ops, and each route's RouteSelect."""

    planned: Planned
    selects: list[RouteSelect]


@dataclasses.dataclass
class Built:
    """After :func:`make_live` (and :func:`validate`): everything the runtime needs for this signature."""

    traced: TracedProgram
    original_code: str
    chains: list[Chain]
    chain: Chain
    analysis: LayoutAnalysis
    plans: list[RoutePlan]
    selects: list[RouteSelect]
    token_map: TokenMap | None
    live: live_model.LiveProgram
    guard: live_model.LiveGuard
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ stages

_HASHES: dict[Any, str] = {}  # module structure -> WL hash (same structure, same code path, same graph)


def trace(req: BuildRequest) -> Traced:
    """Trace ``req.forward`` on the call's inputs with the repeated blocks (and ``leaf_modules``) as leaves.

    Also labels each block candidate with its Weisfeiler-Lehman hash (the
    block kind ``inspect`` reports; it does not decide what is a block).
    """
    if not req.candidates:
        req.candidates = find_block_candidates(req.model)
    leaves = [c.module for c in req.candidates] + [req.model.get_submodule(p) for p in req.config.leaf_modules]
    prog = tracing.trace(req.model, req.forward, req.args, req.kwargs, leaves=leaves,
                         arg_names=forward_arg_names(req.forward))
    for c in req.candidates:
        if c.wl_hash is None:
            key = module_structure_key(c.module)
            if key not in _HASHES:
                _HASHES[key] = block_graph_hash(c.module)
            c.wl_hash = _HASHES[key]
    return Traced(req, prog, prog.gm.code)


def find_chains(traced: Traced) -> Chains:
    """The chains of block calls; NoBlocksFoundError when the forward calls none of the repeated blocks."""
    req, prog = traced.request, traced.program
    found = chain_finding.find_chains(prog.gm, req.candidates, prog.model_root)
    if not found:
        raise NoBlocksFoundError(
            f"{type(req.model).__name__}.forward never calls its repeated blocks "
            f"({', '.join(c.path for c in req.candidates[:4])}...). Fix: check the forward, or name the blocks with "
            "leaf_modules=[...]."
        )
    return Chains(traced, found)


def analyse_layout(chains: Chains) -> LaidOut:
    """Token layouts from the image input (``stream=`` or the first tensor input), and the chain to route."""
    prog, cfg = chains.traced.program, chains.traced.request.config
    image_index = image_input_index(prog, cfg)
    analysis = LayoutAnalysis(prog.gm, image_index, [n for c in chains.chains for n in c.nodes],
                              block_carry_fn(prog))
    return LaidOut(chains, analysis, pick_chain(chains.chains, analysis, cfg))


def plan_routes(laid: LaidOut) -> Planned:
    """The request's method plans its rewrite of the traced graph: ``method.plan_graph(laid)``."""
    return _method(laid.chains.traced.request).plan_graph(laid)


def rewrite(planned: Planned) -> Rewritten:
    """The request's method rewrites the traced graph by its plan: ``method.rewrite_graph(planned)``."""
    return _method(planned.laid.chains.traced.request).rewrite_graph(planned)


def _method(req: BuildRequest):
    if req.method is None:
        raise TransformError("BuildRequest.method is None: the plan and rewrite stages come from the model's method. "
                             "Fix: BuildRequest(..., method=treadfx.TreadMethod(config)) (a transformed model passes "
                             "its own).")
    return req.method


def make_live(rewritten: Rewritten) -> Built:
    """The executable graph (modules that do not call the routed blocks run live) and the guard over the code
    that stays inlined; LiveModelError for hooks on inlined modules."""
    planned = rewritten.planned
    laid = planned.laid
    traced = laid.chains.traced
    prog, model = traced.program, traced.request.model
    live = live_model.make_live(prog.gm, prog, model, list(laid.chain.nodes))
    inner_paths = [p[len(prog.model_root) + 1:] for p in live.inlined]
    guarded = [("", model)] + [(p, model.get_submodule(p)) for p in inner_paths]
    live_model.check_inlined_hooks(guarded)
    return Built(prog, traced.original_code, laid.chains.chains, laid.chain, laid.analysis, planned.plans,
                 rewritten.selects, planned.token_map, live, live_model.LiveGuard(guarded, model))


def validate(built: Built) -> Built:
    """The routed graph fake-runs with routes active and returns the original output shapes and dtypes."""
    check_routed_graph(built.traced, built.selects, len(built.traced.out_tensor_positions),
                       kept_output_positions(built.plans))
    return built


#: the stages in the order :func:`build` runs them
STAGES: tuple[Callable[[Any], Any], ...] = (trace, find_chains, analyse_layout, plan_routes, rewrite, make_live,
                                             validate)


def build(req: BuildRequest, stages: tuple[Callable[[Any], Any], ...] = STAGES) -> Built:
    """Run the stages on ``req``; the model, its RNG state and autocast's cast cache are left as they were.

    Raises the stage's own :class:`~treadfx.TransformError` subclass (message
    unchanged) with ``error.stage`` set to the stage's name and a note naming
    it; logs ``stage <name>: <seconds>`` per stage on the ``treadfx`` logger.
    """
    t0 = time.perf_counter()
    value: Any = req
    with tracing.TRACE_LOCK, autocast_cache_off(), rng_preserved((req.args, req.kwargs)):
        for stage in stages:
            name = stage.__name__
            t = time.perf_counter()
            try:
                value = stage(value)
            except Exception as e:
                if getattr(e, "stage", None) is None:
                    try:
                        e.stage = name  # type: ignore[attr-defined]
                    except AttributeError:  # pragma: no cover - exceptions with __slots__
                        pass
                    e.add_note(f"treadfx: raised in build stage `{name}` (treadfx.pipeline.{name})")
                logger.debug("stage %s failed after %.3f s: %s", name, time.perf_counter() - t, type(e).__name__)
                raise
            logger.debug("stage %s: %.3f s", name, time.perf_counter() - t)
    value.seconds = time.perf_counter() - t0
    return value


# ------------------------------------------------------------------------------------------ TREAD's hooks


def plan_tread_routes(laid: LaidOut) -> Planned:
    """TREAD's plan (:meth:`treadfx.TreadMethod.plan_graph`): a :class:`~treadfx.planning.RoutePlan` per
    configured route (with the order probe), plus the token map when ``aux_loss`` asks for it at trace time."""
    prog, cfg = laid.chains.traced.program, laid.chains.traced.request.config
    spans = resolve_routes(cfg.routes, len(laid.chain))
    probe = make_order_probe(prog, laid.analysis)
    plans = [plan_route(prog, laid.analysis, laid.chain, i, route, s, e, _namer(prog), order_probe=probe,
                        side_exits=cfg.side_exits)
             for i, (route, (s, e)) in enumerate(zip(cfg.routes, spans))]
    windows.window_plans(prog.gm, laid.analysis, plans)  # image tokens at per-sample offsets (Lumina2)
    tmap = None
    if cfg.aux_loss and plans:
        tmap = derive_token_map(prog.gm, laid.analysis, plans[0].stream, plans[0].stream_info)
    return Planned(laid, plans, tmap)


def insert_routes(planned: Planned) -> Rewritten:
    """TREAD's rewrite (:meth:`treadfx.TreadMethod.rewrite_graph`): the TREAD pass through its protocol
    (``requires``, ``call``, ``ensures``) on the traced graph, then the kept side exits; the route ops come back
    from the rewritten graph module."""
    req = planned.laid.chains.traced.request
    gm = planned.laid.chains.traced.program.gm
    result = TreadPass(planned.plans, fp32_after_route=req.config.fp32_after_route, forced=req.forced,
                       training=req.model.training)(gm)
    windows.rewire(result.graph_module, planned.plans)
    selects = route_selects(result.graph_module, planned.plans)
    apply_kept_exits(result.graph_module, planned.plans, planned.laid.chains.traced.program, selects)
    return Rewritten(planned, selects)


# ------------------------------------------------------------------------------------------ helpers


def forward_arg_names(fn: Callable) -> list[str]:
    """Names of the positional parameters of a forward (after ``self``); [] when it has no signature."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _namer(prog: TracedProgram) -> Callable[[fx.Node], str]:
    """How plans name a value: an input, a module call's output, an element of one, or a node."""

    def name_of(node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"input `{node.meta.get('input_name', node.name)}`"
        if node.op == "call_module":
            return f"output of `{prog.model_path(node)}`"
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
            src = node.args[0]
            return f"{name_of(src)}[{node.args[1]}]" if isinstance(src, fx.Node) else node.name
        return f"`{node.name}`"

    return name_of


def block_carry_fn(prog: TracedProgram):
    """Maps a block call's outputs to the inputs they carry (same shape; residual path when ambiguous)."""
    cache: dict[Any, dict[int, int]] = {}

    def carry(node) -> dict[int, Any]:
        value = node.meta.get("val")
        outs = list(value) if isinstance(value, (tuple, list)) else [value]
        ins = []
        for n in tensor_input_nodes(node):
            if n not in ins:
                ins.append(n)
        result: dict[int, Any] = {}
        ambiguous: list[int] = []
        for j, o in enumerate(outs):
            if not isinstance(o, torch.Tensor) or o.ndim < 2:
                continue
            matches = [i for i in ins if isinstance(i.meta.get("val"), torch.Tensor) and
                       tuple(i.meta["val"].shape) == tuple(o.shape)]
            if len(matches) == 1:
                result[j] = matches[0]
            elif len(matches) > 1:
                ambiguous.append(j)
        if ambiguous:
            module = prog.gm.get_submodule(node.target)
            key = (module_structure_key(module), tuple(
                (tuple(i.meta["val"].shape), str(i.meta["val"].dtype)) for i in ins
                if isinstance(i.meta.get("val"), torch.Tensor)))
            if key not in cache:
                cache[key] = _residual_sources(module, node)
            flat = tensor_input_nodes(node)
            for j in ambiguous:
                src = cache[key].get(j)
                if src is not None and src < len(flat):
                    result[j] = flat[src]
        return result

    return carry


def _residual_sources(module: nn.Module, node: fx.Node) -> dict[int, int]:
    """For each output of a block: the single input reached by a same-shape (residual) path inside it."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        inner = tracing.trace(module, type(module).forward, tuple(args), dict(kwargs), leaves=[])
    except TransformError:
        return {}
    phs = [n for n in inner.gm.graph.nodes if n.op == "placeholder"]
    ph_index = {p: k for k, p in enumerate(phs)}
    output = next(n for n in inner.gm.graph.nodes if n.op == "output")
    result = {}
    for j, out_node in enumerate(output.args[0]):
        if not isinstance(out_node, fx.Node):
            continue
        shape = tuple(out_node.meta["val"].shape)

        def same_shape(n: fx.Node, shape=shape) -> bool:
            v = n.meta.get("val")
            return isinstance(v, torch.Tensor) and tuple(v.shape) == shape

        reached = {ph_index[n] for n in upstream([out_node], expand=same_shape) if n in ph_index and same_shape(n)}
        if len(reached) == 1:
            pos = inner.out_tensor_positions[j] if j < len(inner.out_tensor_positions) else j
            result[pos] = next(iter(reached))
    return result
