"""``treadfx.inspect``: what the pass saw and decided, and what it saves.

The report lists the chains of repeated blocks (with indices, module paths and
block kinds), the token stream and its layout, and for every route exactly
which tensors are gathered, scattered or passed through and why.  It counts
forward+backward FLOPs of the dense model and of the routed graph on fake
tensors, predicts the routed count from per-node counts at N and K tokens, and
derives the ideal speedup.

The report has a common part (chains, stream, FLOPs) and one part per method
applied to the model: :func:`build_report` asks each method for its section
(:meth:`treadfx.Method.report_section`, given an :class:`Inspection`).  TREAD
fills ``routes``, ``token_map`` and ``side_exits`` (:func:`tread_section`),
DiffMoE ``diffmoe`` and ``diffmoe_inference`` (:func:`diffmoe_section`); the
entries of any other method are kept in ``Report.sections``, printed as
``name: str(value)`` and serialised with the value's ``to_dict()`` when it has
one.  :func:`treadfx.inspect` (in :mod:`treadfx.api`) transforms a plain model
first and calls :func:`build_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TransformError
from .fake_eval import DATA_DEPENDENT_ERRORS, autocast_cache_off, data_dependent_summary, meta_key, module_structure_key
from .flops import fwd_bwd_flops, module_params
from .layout import layout_str
from .moe import diffmoe_layers, diffmoe_stats, static_capacity_check
from .tracing import autowrap_guard
from .transformed import RoutedProgram, TreadState, program_for, state_of

__all__ = ["Report", "RouteReport", "Inspection", "build_report", "tread_section", "diffmoe_section"]


@dataclasses.dataclass
class TensorDecision:
    """What a route does with one tensor (gather, scatter, pass or keep), its role, and why."""

    action: str
    name: str
    role: str
    layout: str | None
    axis: int | None
    reason: str
    axes: tuple[int, ...] | None = None  # every token axis gathered, when there are several ([1, 1, N, N] masks)


@dataclasses.dataclass
class RouteReport:
    """One route as planned: its blocks, ratio, kept count, selection, order and tensor decisions."""

    index: int
    start: int
    end: int
    start_module: str
    end_module: str
    ratio: float
    num_tokens: int
    num_keep: int
    selection: str
    selection_reason: str
    order: str
    order_reason: str
    stream_layout: str
    tensors: list[TensorDecision]
    seed: int | None = None


@dataclasses.dataclass
class ChainReport:
    """One chain of repeated blocks found in the graph, with its blocks' paths and classes."""

    index: int
    name: str
    length: int
    selected: bool
    blocks: list[dict]  # {"index", "path", "class", "kind"}
    note: str = ""  # why the chain is (not) the routed one, e.g. "not routed: its blocks receive no image tokens"


@dataclasses.dataclass
class Report:
    """What ``treadfx.inspect`` found; ``str(report)`` prints it, ``report.to_dict()`` serialises it."""

    model: str
    inputs: list[str]
    chains: list[ChainReport]
    stream_input: str
    stream_shape: list[int]
    stream_layout: str
    dense_flops: int
    routed_flops: int
    predicted_routed_flops: int
    trace_seconds: float
    # TREAD's section (tread_section)
    routes: list[RouteReport] = dataclasses.field(default_factory=list)
    token_map: str = ""
    # DiffMoE's section (diffmoe_section)
    diffmoe: Any = None  # DiffMoEStats of a training step (models converted with treadfx.diffmoe), else None
    # StaticCapacityCheck: DiffMoE inference on these inputs, static-capacity vs dynamic mode, else None
    diffmoe_inference: Any = None
    side_exits: list = dataclasses.field(default_factory=list)  # SideExit.to_dict() + "line" of every side exit
    # the sections of other methods (Method.report_section entries that are not fields above), by name
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)
    graph_code: str = dataclasses.field(repr=False, default="")

    @property
    def side_exit_lines(self) -> list[str]:
        """One line per side exit: producer, token axis, what fills its skipped rows, where it goes."""
        return [d["line"] for d in self.side_exits]

    @property
    def ideal_speedup(self) -> float:
        return self.dense_flops / self.routed_flops if self.routed_flops else float("inf")

    def to_dict(self) -> dict:
        """Every field as JSON-ready values (sections through their ``to_dict()`` when they have one)."""
        d = dataclasses.asdict(dataclasses.replace(self, diffmoe=None, diffmoe_inference=None, sections={}))
        d.pop("graph_code", None)
        d["diffmoe"] = self.diffmoe.to_dict() if self.diffmoe is not None else None
        d["diffmoe_inference"] = self.diffmoe_inference.to_dict() if self.diffmoe_inference is not None else None
        d["sections"] = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in self.sections.items()}
        d["ideal_speedup"] = self.ideal_speedup
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"treadfx report for {self.model}", f"  inputs: {', '.join(self.inputs)}"]
        shared = {c.name for c in self.chains if sum(o.name == c.name for o in self.chains) > 1}
        for c in self.chains:
            mark = "*" if c.selected else " "
            name = c.name
            if name in shared and c.blocks:  # several chains cut from one container: name each by its blocks
                first, last = c.blocks[0]["path"], c.blocks[-1]["path"]
                name = first if first == last else f"{first}..{last.rsplit('.', 1)[-1]}"
            lines.append(f" {mark}chain {c.index} `{name}`: {c.length} blocks" + (f" -- {c.note}" if c.note else ""))
            runs: list[list[dict]] = []
            for b in c.blocks:
                if runs and runs[-1][-1]["kind"] == b["kind"] and runs[-1][-1]["class"] == b["class"]:
                    runs[-1].append(b)
                else:
                    runs.append([b])
            for run in runs:
                a, z = run[0], run[-1]
                lines.append(f"      [{a['index']:>3}..{z['index']:<3}] {a['path']} .. {z['path']}  "
                             f"{a['class']} (WL {a['kind'][:8]}) x{len(run)}")
        lines.append(f"  token stream: input `{self.stream_input}` -> {self.stream_shape} layout {self.stream_layout}")
        for r in self.routes:
            lines.append(
                f"  route {r.index}: blocks {r.start}..{r.end} ({r.start_module} .. {r.end_module}), ratio {r.ratio:g}: "
                f"keep {r.num_keep} of {r.num_tokens} image tokens"
            )
            lines.append(f"    selection: {r.selection} ({r.selection_reason})")
            lines.append(f"    order:     {r.order} ({r.order_reason})")
            lines.append("    random:    " + ("torch global RNG" if r.seed is None else f"counter-based hash, seed {r.seed}"))
            for t in r.tensors:
                ax = f"axes {', '.join(map(str, t.axes))}" if t.axes else f"axis {t.axis}"
                lay = f" {t.layout} {ax}" if t.layout else ""
                lines.append(f"    {t.action:<7} {t.name}: {t.role}{lay} -- {t.reason}")
        if self.side_exits:
            lines.append("  side exits (values computed inside a route and used after it, besides the stream going on):")
            lines.extend(f"    {line}" for line in self.side_exit_lines)
        lines.append(
            f"  FLOPs fwd+bwd: dense {self.dense_flops / 1e9:.3f} G, routed {self.routed_flops / 1e9:.3f} G "
            f"(predicted {self.predicted_routed_flops / 1e9:.3f} G) -> ideal speedup {self.ideal_speedup:.3f}x"
        )
        lines.append(f"  pixel -> token map (route_loss, keep_tokens): {self.token_map}")
        if self.diffmoe is not None:
            lines.append("  " + str(self.diffmoe).replace("\n", "\n  ") + "\n  (a training step: each expert takes k "
                         "tokens of the pool; FLOPs above include the experts, router and predictor)")
        if self.diffmoe_inference is not None:
            lines.append("  " + str(self.diffmoe_inference).replace("\n", "\n  "))
        for name, value in self.sections.items():
            lines.append(f"  {name}: " + str(value).replace("\n", "\n  "))
        lines.append(f"  trace + analysis + rewrite: {self.trace_seconds:.2f} s")
        return "\n".join(lines)


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _name(prog: RoutedProgram, node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"input `{node.meta.get('input_name', node.name)}`"
    if node.op == "call_module":
        return f"output of `{prog.traced.model_path(node)}`"
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" and isinstance(node.args[0], fx.Node):
        return f"{_name(prog, node.args[0])}[{node.args[1]}]"
    return f"`{node.name}` ({getattr(node.target, '__name__', node.target)})"


_NODE_FLOPS: dict[Any, int] = {}  # process-wide: (structure, input metadata) -> fwd+bwd FLOPs


def _dense_value(n: fx.Node) -> Any:
    """The value a node has without routing: a gather's is its input's (route ops record their routed value)."""
    return (n.args[0] if n.meta.get("treadfx", ("",))[0] == "gather" else n).meta.get("val")


def _predicted_savings(prog: RoutedProgram) -> int:
    """Σ over region nodes of (FLOPs at N tokens - FLOPs at K tokens), each counted on its own."""
    traced = prog.traced
    ev = traced.evaluator
    saved = [(s.forced, s.fixed) for s in prog.selects]
    try:
        for s in prog.selects:
            s.forced, s.fixed = True, None
        env = ev.propagate(traced.gm, list(traced.fake_inputs or []))
    finally:
        for s, (f, x) in zip(prog.selects, saved):
            s.forced, s.fixed = f, x
    total = 0
    cache = _NODE_FLOPS
    for plan in prog.plans:
        for node in plan.region:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            dense_args = fx.node.map_arg((node.args, node.kwargs), _dense_value)
            routed_args = fx.node.map_arg((node.args, node.kwargs), lambda n: env.get(n, n.meta.get("val")))
            if node.op == "call_module":
                mod = traced.gm.get_submodule(node.target)
                fn, params = mod, module_params(mod)
            elif node.op == "call_function":
                fn, params = node.target, []
            else:
                name = node.target
                fn, params = (lambda *a, _n=name, **k: getattr(a[0], _n)(*a[1:], **k)), []
            struct = module_structure_key(fn) if isinstance(fn, nn.Module) else (node.op, node.target)
            for sign, (a, k) in ((1, dense_args), (-1, routed_args)):
                key = (struct, meta_key((tuple(a), dict(k))))  # the metadata includes the device
                if key not in cache:
                    cache[key] = fwd_bwd_flops(ev, fn, tuple(a), dict(k), params)
                total += sign * cache[key]
    return total


def _diffmoe_training_stats(m: nn.Module, prog: RoutedProgram):
    """Planned DiffMoE compute of one training step: pool S = tokens entering each converted block (kept ones inside
    a route), or None when the model has no DiffMoE layers."""
    layers = diffmoe_layers(m)
    if not layers:
        return None
    pools: dict[str, int] = {}
    chain = prog.chain
    for path, layer in layers:
        for i, (node, bpath) in enumerate(zip(chain.nodes, chain.paths)):
            if not path.startswith(bpath + "."):
                continue
            inside = [plan for plan in prog.plans if plan.start <= i <= plan.end]
            # inside a route the block's inputs are gathered values: size them from the stream at route-out (the
            # kept tokens are subtracted below); outside a route the block's own inputs have their dense values (a
            # scatter's meta["val"] is the value it restores), and the stream is the fallback for a block whose
            # inputs have no [B, N, D] value of the layer's width
            streams = [plan.stream.meta.get("val") for plan in (inside or prog.plans)]
            vals = streams if inside else [a.meta.get("val") for a in node.all_input_nodes] + streams
            x = next((v for v in vals if isinstance(v, torch.Tensor) and v.ndim == 3 and v.shape[-1] == layer.dim),
                     None)
            if x is None:
                continue
            tokens = int(x.shape[1]) - sum(plan.num_tokens - plan.num_keep for plan in inside)
            pools[path] = int(x.shape[0]) * tokens
    return diffmoe_stats(m, pools)


@dataclasses.dataclass
class Inspection:
    """What :meth:`treadfx.Method.report_section` reads: the inspected model (transformed, unwrapped), its
    :class:`~treadfx.transformed.TreadState`, the routed program built for the inspect inputs, and those inputs."""

    model: nn.Module
    state: TreadState
    program: RoutedProgram
    args: tuple
    kwargs: dict


def _token_axes(d) -> tuple[int, ...] | None:
    """Every token axis a gathered tensor is gathered on, when there are several (a [1, 1, N, N] mask: (2, 3))."""
    axes = tuple(dict.fromkeys(a for p in (d.parts or ()) if not p.path for a, _ in p.axes))
    return axes if len(axes) > 1 else None


def tread_section(insp: Inspection) -> dict[str, Any]:
    """TREAD's report fields: ``routes`` (each route's blocks, kept count, selection, order and the decision on every
    tensor entering or leaving it), ``token_map`` and ``side_exits``."""
    prog, st = insp.program, insp.state
    routes = []
    for plan in prog.plans:
        tensors = []
        for d in plan.entering + plan.leaving:
            tensors.append(TensorDecision(d.action, d.label or _name(prog, d.node), d.role,
                                          d.layout_text or (layout_str(d.layout) if d.layout else None),
                                          d.axis, d.reason, _token_axes(d)))
        for seg in plan.extra_tokens:
            tensors.append(TensorDecision("keep", f"{seg.length} {seg.kind} token(s) of the stream", "extra tokens",
                                          None, None, "never routed: only image tokens are selected"))
        for name, lay, axis, why in plan.slice_lines(lambda n: _name(prog, n.args[0])):  # end-relative slices
            tensors.append(TensorDecision("slice", name, "token-axis slice", lay, axis, why))
        routes.append(RouteReport(
            plan.index, plan.start, plan.end, plan.chain.paths[plan.start], plan.chain.paths[plan.end],
            st.ratio_of(plan.index), plan.num_tokens, plan.num_keep, plan.selection, plan.selection_reason,
            plan.order, plan.order_reason, layout_str(plan.stream_info.layout), tensors, plan.route.seed,
        ))
    return {
        "routes": routes,
        "token_map": prog.token_map().describe() if prog.plans else "",
        "side_exits": [dict(e.to_dict(), line=e.describe()) for plan in prog.plans for e in plan.side_exits],
    }


def diffmoe_section(insp: Inspection) -> dict[str, Any]:
    """DiffMoE's report fields: ``diffmoe``, the planned statistics of a training step (pools sized by the routes),
    and ``diffmoe_inference``, static-capacity vs dynamic inference on the inspect inputs (the dense forward, eval,
    no grad; the model's state is restored); each None when it does not apply."""
    m, st = insp.model, insp.state
    return {
        "diffmoe": _diffmoe_training_stats(m, insp.program),
        "diffmoe_inference": static_capacity_check(m, tuple(insp.args), dict(insp.kwargs),
                                                   forward=lambda *a, **k: st.original_forward(m, *a, **k)),
    }


#: Report fields a method's section may fill (the built-in methods'); other entries go to Report.sections
SECTION_FIELDS = ("routes", "token_map", "side_exits", "diffmoe", "diffmoe_inference")


@contextlib.contextmanager
def _routes_set(prog: Any, active: bool) -> Iterator[None]:
    """Inside the block every route of ``prog`` is active (forced) or off (its select in eval mode, not forced), and
    draws its indices (no fixed ones); afterwards each select's mode, forced flag and fixed indices are restored."""
    saved = [(s.training, s.forced, s.fixed) for s in prog.selects]
    try:
        for s in prog.selects:
            s.training = s.training if active else False
            s.forced, s.fixed = active, None
        yield
    finally:
        for s, (t, f, x) in zip(prog.selects, saved):
            s.training, s.forced, s.fixed = t, f, x


def _graph_flops(ev: Any, prog: Any, params: Any, routes_active: bool) -> int:
    """FLOPs of ``prog``'s traced graph with every route active, or with every route off (the forward the graph
    was specialised on, as the original model computes it)."""
    with _routes_set(prog, routes_active):
        return fwd_bwd_flops(ev, prog.traced.gm, tuple(prog.traced.fake_inputs or []), {}, params)


def build_report(model: nn.Module, methods: list, args: tuple, kwargs: dict) -> Report:
    """The report of a transformed ``model`` (unwrapped) on these inputs: the common part, then each method's
    section (``method.report_section(Inspection(...))``) in the order of ``methods``.

    Entries that name a :class:`Report` field fill it; others go to ``Report.sections``.  The model's mode,
    parameters and gradients are left as they were.
    """
    m = model
    st = state_of(m)
    with _train_mode(m), autocast_cache_off():
        prog = program_for(m, st, tuple(args), dict(kwargs))
        traced = prog.traced
        ev = traced.evaluator
    # the dense count runs the original forward on fake tensors: no fake value it computes may stay in the
    # model's lru caches (diffusers' RoPE helpers) for later real calls. Not around program_for: the trace has
    # its own guard, and a nested one would miss a cache the inner guard cleared (cache_clear resets its counts)
    with _train_mode(m), autocast_cache_off(), autowrap_guard():
        try:
            dense = fwd_bwd_flops(ev, lambda *a, **k: st.original_forward(m, *a, **k), tuple(args), dict(kwargs),
                                  module_params(m))
        except TransformError as e:
            if not isinstance(e.__cause__, DATA_DEPENDENT_ERRORS):
                raise
            # the forward reads tensor data in Python (``.item()``): count the traced graph, which holds the values
            # it was specialised on, with every route off (the original computation)
            dense = _graph_flops(ev, prog, module_params(m), routes_active=False)
        routed = _graph_flops(ev, prog, module_params(m), routes_active=True)
        predicted = dense - _predicted_savings(prog)

    chains = []
    for ci, c in enumerate(prog.chains):
        blocks = [{"index": i, "path": p, "class": cls, "kind": h or ""}
                  for i, (p, cls, h) in enumerate(zip(c.paths, c.classes, c.hashes))]
        chains.append(ChainReport(ci, c.name, len(c), c is prog.chain, blocks, c.note))
    first = prog.plans[0] if prog.plans else None
    stream_val = first.stream.meta.get("val") if first else None
    image_ph = prog.analysis.image_ph
    insp = Inspection(m, st, prog, tuple(args), dict(kwargs))
    fields: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for method in methods:
        for key, value in method.report_section(insp).items():
            (fields if key in SECTION_FIELDS else sections)[key] = value
    not_counted = data_dependent_summary(m, ev.live_modules)
    if not_counted:  # submodules whose FLOPs cannot be counted exactly (experts of unequal cost, `.tolist()` dispatch)
        sections["FLOPs not counted"] = not_counted
    return Report(
        model=type(m).__name__.removeprefix("Tread"),
        inputs=[f"{n}{list(v.shape)}" for n, v in zip(traced.input_names, traced.fake_inputs or [])],
        chains=chains,
        stream_input=image_ph.meta.get("input_name", image_ph.name),
        stream_shape=list(stream_val.shape) if isinstance(stream_val, torch.Tensor) else [],
        stream_layout=layout_str(first.stream_info.layout) if first else "",
        dense_flops=dense,
        routed_flops=routed,
        predicted_routed_flops=predicted,
        trace_seconds=prog.trace_seconds,
        graph_code=traced.gm.code,
        sections=sections,
        **fields,
    )
