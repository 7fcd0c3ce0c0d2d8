"""Planning one route: what crosses its boundaries, and what happens to each tensor.

For a route over chain blocks ``start..end`` the *region* is every node that
depends on block ``start`` and that block ``end`` depends on.  Every tensor
that enters the region is either

* gathered with the route's kept indices: the token stream, long skips that
  carry image tokens (U-ViT), and token-aligned side inputs (RoPE tables,
  per-token modulation or masks), or
* passed through unchanged: text streams, per-sample conditioning, anything a
  block can use with the full token count (cross-attention context);

and every tensor that leaves it is either scattered back into the stream saved
at route-out (it carries kept image tokens) or passed through (text streams).

Side inputs are decided by *probing*: the region is evaluated on fake tensors
with a token count that appears nowhere else; a tensor is gathered only if a
node fails without it and succeeds with it.  Nothing is guessed silently: a
region that cannot run on fewer tokens is an error naming the operation.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .chains import Chain
from .errors import StreamAnalysisError, UnroutableRegionError
from .fake_eval import FakeEvaluator, fake_like, no_user_hooks, quiet_fake_tensor_logs
from .graph_walk import depends_on, upstream
from .layout import (Layout, LayoutAnalysis, Segment, TokenInfo, block_joint_layouts, broadcast_leads, image_span,
                     layout_str, module_value, side_parts)
from .ops import gather_op, num_kept
from .routes import Route
from .side_exits import find_side_exits
from .tracing import TracedProgram

__all__ = ["ValueDecision", "RoutePlan", "RouteScope", "plan_route", "region_of", "find_stream", "initial_decisions",
           "end_relative_slices", "end_relative",
           "settle_side_inputs", "leaving_decisions", "choose_selection", "choose_order"]


@dataclasses.dataclass
class ValueDecision:
    """What the pass does with one tensor crossing a route boundary."""

    node: fx.Node
    action: str  # "gather" | "scatter" | "pass"
    role: str  # "token stream", "skip connection", "side input", "text stream", "conditioning", ...
    reason: str
    axis: int | None = None
    layout: Layout | None = None
    batched: bool = True
    parts: tuple | None = None  # treadfx.layout.SidePart per tensor: several token axes, or a module's tables
    label: str | None = None  # what inspect calls the tensor when its graph name says nothing (windows.py)
    layout_text: str | None = None  # inspect's layout text when Layout cannot say it (per-sample offsets)

    def describe(self, name: str) -> str:
        lay = f" {layout_str(self.layout)} on axis {self.axis}" if self.layout else ""
        return f"{self.action:7s} {name}: {self.role}{lay} ({self.reason})"


@dataclasses.dataclass
class RoutePlan:
    """Everything the TREAD pass needs to rewrite one route."""

    index: int
    route: Route
    start: int
    end: int
    chain: Chain
    region: list[fx.Node]
    stream: fx.Node
    stream_info: TokenInfo
    num_tokens: int
    selection: str  # "per_sample" | "shared"
    selection_reason: str
    order: str  # "random" | "sorted"
    order_reason: str
    entering: list[ValueDecision]
    leaving: list[ValueDecision]
    side_exits: list = dataclasses.field(default_factory=list)  # treadfx.side_exits.SideExit of this route
    grid: Any = None  # treadfx.structured.GridSpec of a structured route (blocks get the kept sub-grid's size)
    # constant token-axis slices inside the region rewritten to count from the end: (node, axis, layout, old, new)
    slices: list = dataclasses.field(default_factory=list)

    def slice_lines(self, name_of) -> list[tuple[str, str, int, str]]:
        """(name of the sliced tensor, layout, axis, reason) per slice of a token axis that :func:`end_relative_slices` rewrote."""
        def show(e: slice) -> str:
            return f"[{'' if e.start is None else e.start}:{'' if e.stop is None else e.stop}]"

        return [(name_of(n), layout_str(lay), axis, f"{show(a)} -> {show(b)}: its bound after the image tokens counts from "
                 "the end, so it drops the same trailing text tokens when fewer image tokens are left")
                for n, axis, lay, a, b in self.slices]

    @property
    def num_keep(self) -> int:
        return num_kept(self.num_tokens, self.route.ratio)

    @property
    def extra_tokens(self) -> list[Segment]:
        return [s for s in self.stream_info.layout if s.kind != "image"]


def region_of(gm: fx.GraphModule, first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """Nodes that depend on ``first`` and that ``last`` depends on (both included), in graph order."""
    forward: set[fx.Node] = {first}
    started = False
    for n in gm.graph.nodes:
        if n is first:
            started = True
            continue
        if started and any(i in forward for i in n.all_input_nodes):
            forward.add(n)
    backward = set(upstream([last]))
    return [n for n in gm.graph.nodes if n in forward and n in backward]


# elementwise arithmetic that joins a block's output with the stream outside the block (``h = h + block(h)``)
_ELEMENTWISE_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                      operator.imul, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}


def _token_count(stream: fx.Node, info: TokenInfo) -> int | None:
    val = stream.meta.get("val")
    return int(val.shape[info.axis]) if isinstance(val, torch.Tensor) else None


def extend_through_residuals(gm: fx.GraphModule, region: list[fx.Node], next_block: fx.Node | None,
                             n_tokens: int | None) -> list[fx.Node]:
    """The region plus the elementwise arithmetic after its last block that combines region values before the
    next chain block: the residual add of a forward that writes ``h = h + block(h)`` outside the blocks.

    Without it the block's output and the residual operand would leave the route separately, each with its skipped
    rows restored from the stream, and the skipped tokens would come back as ``h + h`` instead of ``h``. A node
    joins when at least one input is in the region and every other tensor input has no axis of the stream's full
    token count (per-sample gates and scalars broadcast; a full-length tensor would need a gather, so the node stays
    outside)."""
    rset = set(region)
    if not region:
        return region
    extra: list[fx.Node] = []
    started = False
    for n in gm.graph.nodes:
        if n is region[-1]:
            started = True
            continue
        if not started:
            continue
        if n is next_block:
            break
        elementwise = ((n.op == "call_function" and n.target in _ELEMENTWISE_FUNCS)
                       or (n.op == "call_method" and n.target in _ELEMENTWISE_METHODS))
        if not elementwise or not any(i in rset for i in n.all_input_nodes):
            continue
        outside_ok = True
        for i in n.all_input_nodes:
            if i in rset:
                continue
            val = i.meta.get("val")
            if isinstance(val, torch.Tensor) and (n_tokens is None or n_tokens in tuple(val.shape)):
                outside_ok = False
        if outside_ok:
            rset.add(n)
            extra.append(n)
    return region + extra if extra else region


def _probe_count(n_img: int, sizes: set[int]) -> int:
    """A kept-token count for probing: fewer than N, at least 1, and equal to no other size in play."""
    for k in range(max(1, n_img - 1), 0, -1):
        if k not in sizes and k != n_img:
            return k
    return max(1, n_img - 1)


def all_sizes(values: Sequence[Any]) -> set[int]:
    """Every dimension size of every tensor in ``values`` (nested structures included)."""
    out: set[int] = set()
    for v in values:
        for leaf in pytree.tree_leaves(v):
            if isinstance(leaf, torch.Tensor):
                out.update(int(s) for s in leaf.shape)
    return out


_all_sizes = all_sizes  # old private name


def _shrunk(value: torch.Tensor, info: TokenInfo, keep: int, per_sample_unbatched: bool, batch: int,
            mode) -> torch.Tensor:
    _, n = image_span(info.layout)
    shape = list(value.shape)
    shape[info.axis] = shape[info.axis] - n + keep
    if not info.batched and per_sample_unbatched:
        shape = [batch] + shape
    return fake_like(value, mode, tuple(shape))


class _Walk:
    """Evaluates the region with kept tokens for a given set of gather decisions."""

    def __init__(self, prog: TracedProgram, region: list[fx.Node], evaluator: FakeEvaluator):
        self.prog, self.region, self.ev = prog, region, evaluator
        self.override = None  # (node, args, kwargs) -> (args, kwargs): structured routes give blocks the sub-grid

    def run(self, gathered: dict[fx.Node, torch.Tensor], until: fx.Node | None = None
            ) -> tuple[dict[fx.Node, Any], fx.Node | None, Exception | None]:
        """(values of the region's nodes, the first node that failed or None, its error); with ``until``, the
        walk stops once that node ran."""
        # no_user_hooks once for the walk, not once per module evaluated: each entry reassigns nn.Module.__call__
        with quiet_fake_tensor_logs(), no_user_hooks():
            return self._run(gathered, until)

    def _run(self, gathered: dict[fx.Node, torch.Tensor], until: fx.Node | None = None
             ) -> tuple[dict[fx.Node, Any], fx.Node | None, Exception | None]:
        env: dict[fx.Node, Any] = {}

        def value(n: fx.Node) -> Any:
            if n in env:
                return env[n]
            if n in gathered:
                return gathered[n]
            return _node_value(self.prog.gm, n)

        for node in self.region:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            if self.override is not None:
                args, kwargs = self.override(node, args, kwargs)
            try:
                env[node] = self.ev.run_node(self.prog.gm, node, args, kwargs)
            except Exception as e:  # noqa: BLE001 - reported with the node
                return env, node, e
            if node is until:
                break
        return env, None, None


def _node_label(prog: TracedProgram, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"block `{prog.model_path(node)}`" if node.target.startswith(prog.model_root + ".") else f"`{node.target}`"
    tgt = getattr(node.target, "__name__", node.target)
    return f"operation `{tgt}` (node {node.name})"


@dataclasses.dataclass
class RouteScope:
    """What the planning steps of one route share: the program, its layout analysis, the route's span on the
    chain, a namer for messages, and the route's region (see :func:`region_of`)."""

    prog: TracedProgram
    analysis: LayoutAnalysis
    chain: Chain
    index: int
    route: Route
    start: int
    end: int
    name_of: Any
    region: list[fx.Node]
    stream_end: fx.Node | None = None  # the stream leaving the region when it is not the last block's output

    @property
    def rset(self) -> set[fx.Node]:
        return set(self.region)

    @property
    def chain_set(self) -> set[fx.Node]:
        return set(self.chain.nodes)


def plan_route(
    prog: TracedProgram,
    analysis: LayoutAnalysis,
    chain: Chain,
    index: int,
    route: Route,
    start: int,
    end: int,
    name_of,
    order_probe=None,
    side_exits: str | None = None,
) -> RoutePlan:
    """Decide, by graph analysis and fake probes, how route ``index`` rewrites ``prog``.

    The steps: the region between the route's blocks; the token stream entering
    block ``start``; a first decision per entering tensor from its layout; side
    inputs that the region needs gathered, found by fake probes; what happens to
    each tensor leaving the region (and which of them are side exits, see
    :mod:`treadfx.side_exits`; ``side_exits`` is transform's mode); then the
    selection and order of kept tokens.
    Raises StreamAnalysisError / UnroutableRegionError naming the fix.
    """
    r = RouteScope(prog, analysis, chain, index, route, start, end, name_of,
               region_of(prog.gm, chain.nodes[start], chain.nodes[end]))
    stream = find_stream(r)
    stream_info = analysis.token_info(stream)
    _, n_img = image_span(stream_info.layout)
    nxt = chain.nodes[end + 1] if end + 1 < len(chain.nodes) else None
    extended = extend_through_residuals(prog.gm, r.region, nxt, _token_count(stream, stream_info))
    if len(extended) > len(r.region):  # h = h + block(h) outside the blocks: the stream leaves at the last add
        r = dataclasses.replace(r, region=extended, stream_end=extended[-1])
    slices = end_relative_slices(r, n_img)
    from . import structured

    found, why = None, None  # structured selection (blocks that need the token grid), see treadfx.structured
    if route.selection == "structured":
        found = structured.settle_required(r, stream, n_img)
    else:
        try:
            entering, order_in = initial_decisions(r, stream, n_img)
            env = settle_side_inputs(r, entering, order_in, n_img)
        except UnroutableRegionError as err:
            found, why = structured.structured_fallback(err, r, stream, n_img)
    if found is not None:
        r, entering, order_in, env = found.scope, found.entering, found.order_in, found.env
    leaving = leaving_decisions(r, env, stream, stream_info, n_img)
    exits = find_side_exits(prog, analysis, chain.nodes, index, r.region, leaving, stream, name_of, side_exits)
    if found is not None:
        selection, sel_reason, order, order_reason = found.choice(why)
    else:
        selection, sel_reason = choose_selection(route, list(entering.values()), name_of, analysis)
        order, order_reason = choose_order(r, order_probe, list(entering.values()), stream)
    return RoutePlan(index, route, start, end, chain, r.region, stream, stream_info, n_img, selection, sel_reason,
                     order, order_reason, [entering[n] for n in order_in], leaving, exits,
                     found.grid if found is not None else None, slices)


def end_relative(e: slice, offset: int, length: int, total: int) -> slice:
    """``e`` (a slice of a token axis of ``total`` positions whose image tokens are ``offset .. offset+length``)
    rewritten so that it selects the same positions on the dense axis and, on an axis where only some image tokens
    are left (the same tokens before and after them), the same non-image tokens and every image token left of
    those it selected: a bound at or before the image tokens stays absolute, one at or after them counts from the
    end.  A bound strictly inside the image tokens is kept as written (it has no such meaning)."""

    def moved(b, is_stop: bool):
        if not isinstance(b, int) or isinstance(b, bool):
            return b
        a = min(max(b + total if b < 0 else b, 0), total)
        if a <= offset:
            return a
        if a >= offset + length:
            if a == total:
                return None if is_stop else b  # to the end (a start at the end selects nothing either way)
            return a - total
        return b

    return slice(moved(e.start, False), moved(e.stop, True), e.step)


def end_relative_slices(r: RouteScope, n_img: int) -> list[tuple[fx.Node, int, Layout, slice, slice]]:
    """Rewrite, in place, constant slices of token axes inside the region so they mean the same with fewer image
    tokens: a bound at or after the image segment counts from the end (``x[:, :26]`` of ``[image 16 | text 15]``
    becomes ``x[:, :-5]``, which drops the same 5 text tokens when only K image tokens are left), a bound at or
    before it stays absolute.  On the dense shapes the rewritten slice selects exactly what the original did, so
    the graph's dense meaning is unchanged.  A bound strictly inside the image tokens is left alone (the probe
    then reports the node).  Returns the rewritten nodes (HiDream's single-stream loop slices the joint stream
    back to image + text after every block), each as (node, token axis, the sliced layout, old slice, new slice)."""
    out = []
    for node in r.region:
        if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2
                and isinstance(node.args[0], fx.Node)):
            continue
        info = r.analysis.token_info(node.args[0])
        if not isinstance(info, TokenInfo) or not info.has_image():
            continue
        try:
            off, n = image_span(info.layout)
        except StreamAnalysisError:
            continue
        if n != n_img:
            continue
        idx = node.args[1]
        entries = idx if isinstance(idx, tuple) else (idx,)
        if not (len(entries) > info.axis and all(isinstance(e, slice) and e == slice(None)
                                                  for e in entries[: info.axis])):
            continue
        e = entries[info.axis]
        if not isinstance(e, slice) or e.step not in (None, 1):
            continue
        new = end_relative(e, off, n, info.length)
        if new == e:
            continue
        entries = entries[: info.axis] + (new,) + entries[info.axis + 1:]
        node.args = (node.args[0], entries if isinstance(idx, tuple) else entries[0])
        out.append((node, info.axis, info.layout, e, new))
    return out


def find_stream(r: RouteScope) -> fx.Node:
    """The batched tensor with image tokens that enters block ``start``; preferably one that an earlier chain
    block produced (the stream rather than, say, a skip from the patch embedding)."""
    first = r.chain.nodes[r.start]
    candidates = []
    for inp in _inputs_of(first):
        info = r.analysis.token_info(inp)
        if isinstance(info, TokenInfo) and info.has_image() and info.batched:
            candidates.append(inp)
    if not candidates:
        raise StreamAnalysisError(
            f"chain block {r.start} (`{r.chain.paths[r.start]}`) receives no batched tensor that carries image "
            "tokens; treadfx found nothing to route there. Fix: check that the model's first tensor argument is the "
            "image (or name it with stream='<argument>'), or start the route at another block."
        )
    prev = set(r.chain.nodes[: r.start])
    chain_set = r.chain_set
    preferred = [c for c in candidates if not prev or _direct_block_source(c, chain_set) in prev]
    return (preferred or candidates)[0]


def initial_decisions(r: RouteScope, stream: fx.Node, n_img: int) -> tuple[dict[fx.Node, ValueDecision], list[fx.Node]]:
    """A first decision for every tensor entering the region from its layout alone, and their order of first
    use."""
    rset, chain_set = r.rset, r.chain_set
    entering: dict[fx.Node, ValueDecision] = {}
    order_in: list[fx.Node] = []
    for node in r.region:
        for inp in _inputs_of(node):
            if inp not in rset and inp not in entering:
                order_in.append(inp)
                entering[inp] = _initial_decision(inp, stream, r.analysis, n_img, chain_set)
    return entering, order_in


def _known_layouts(gm: fx.GraphModule, analysis: LayoutAnalysis) -> list[Layout]:
    """Every distinct layout with image tokens in the graph, in graph order."""
    known: list[Layout] = []
    for n in gm.graph.nodes:
        inf = analysis.info.get(n)
        for i in (inf if isinstance(inf, list) else [inf]):
            if isinstance(i, TokenInfo) and i.has_image() and i.layout not in known:
                known.append(i.layout)
    return known


class Prober:
    """Fake-runs the region with the tensors currently marked "gather" shrunk to ``probe_k`` image tokens."""

    def __init__(self, r: RouteScope, entering: dict[fx.Node, ValueDecision], order_in: list[fx.Node], n_img: int):
        self.r, self.entering = r, entering
        sizes = _all_sizes([n.meta.get("val") for n in order_in] + [n.meta.get("val") for n in r.region])
        self.probe_k = _probe_count(n_img, sizes)
        self.per_sample_unbatched = r.route.selection in ("per_sample", "structured")
        self.batch = r.analysis.batch or 1
        self.walk = _Walk(r.prog, r.region, r.prog.evaluator)

    def run(self, until: fx.Node | None = None):
        """(env, failed node or None, error) of one fake run (up to and including ``until`` if given)."""
        gathered = {}
        for n, d in self.entering.items():
            if d.action == "gather" and d.parts is not None:
                gathered[n] = _shrunk_parts(_node_value(self.r.prog.gm, n), d, self.probe_k, self.per_sample_unbatched,
                                            self.batch, self.r.prog.evaluator.mode)
            elif d.action == "gather":
                info = TokenInfo(d.axis, d.layout, d.batched)
                gathered[n] = _shrunk(n.meta["val"], info, self.probe_k, self.per_sample_unbatched, self.batch,
                                      self.r.prog.evaluator.mode)
        return self.walk.run(gathered, until) if until is not None else self.walk.run(gathered)


_Prober = Prober  # old private name


def settle_side_inputs(r: RouteScope, entering: dict[fx.Node, ValueDecision], order_in: list[fx.Node],
                       n_img: int, prober: "_Prober | None" = None) -> dict[fx.Node, Any]:
    """Gather side inputs until the region runs on the kept tokens; returns its fake values then (``prober``: a
    prepared one, e.g. with a structured route's kept count and block arguments).

    Each failing node is fixed by gathering the smallest subset of its token-aligned inputs that moves the
    failure past it; a node no subset fixes makes the region unroutable (UnroutableRegionError).
    """
    prober = prober or _Prober(r, entering, order_in, n_img)
    # only layouts whose image part is this route's image tokens: an image-derived axis of another size (a
    # video's frame count 1, channels) would make a [1, N, 1, d] RoPE table read on its leading axis
    known = [lay for lay in _known_layouts(r.prog.gm, r.analysis)
             if sum(s.length for s in lay if s.kind == "image") == n_img]
    for _attempt in range(len(order_in) + 2):
        env, failed, err = prober.run()
        if failed is None:
            return env
        if not _gather_side_inputs(r, prober, failed, n_img, known):
            _diagnose().raise_unroutable(r, entering, env, failed, err, prober, n_img)  # names the input
    raise UnroutableRegionError(  # pragma: no cover - each pass fixes one node, so the loop is bounded
        f"route {r.index}: could not find a consistent set of tensors to gather")


def _gather_side_inputs(r: RouteScope, prober: _Prober, failed: fx.Node, n_img: int, known: list[Layout]) -> bool:
    """Try to get past ``failed`` by gathering some of its inputs; True (decisions updated) if it worked."""
    entering = prober.entering
    side = []
    # a block that joins image and text tokens inside (joint attention) gives its masks that joint layout
    known = known + [lay for lay in block_joint_layouts(r.prog.gm, r.analysis, failed, n_img,
                                                         lambda n: _node_value(r.prog.gm, n)) if lay not in known]
    for inp in _inputs_of(failed):
        d = entering.get(inp)
        if d is None or d.action != "pass":
            continue  # (a "text" input can be position ids that feed a per-token table: the probe decides)
        for cand in _side_decisions(r, inp, failed, n_img, known):
            side.append((inp, cand))
    if not side:
        return False
    saved = {inp: entering[inp] for inp, _ in side}
    pos = r.region.index(failed)

    def works(subset) -> bool:
        entering.update(saved)
        for inp, cand in subset:
            entering[inp] = dataclasses.replace(cand)
        _, f2, _ = prober.run(until=failed)  # only whether the walk gets past ``failed``
        return f2 is None or r.region.index(f2) > pos

    subset = first_working_subset(side, works)
    if subset is not None:
        entering.update(saved)
        for inp, cand in subset:
            entering[inp] = dataclasses.replace(cand)
        kind = {True: "per-token input", False: "per-token table without batch dim"}
        for inp, cand in subset:
            what = ("a module argument holding per-token tables: the blocks get a copy with the kept rows"
                    if isinstance(_node_value(r.prog.gm, inp), torch.nn.Module) else kind[cand.batched])
            entering[inp].reason = (f"{_node_label(r.prog, failed)} fails with the full token count "
                                    f"and runs with the kept ones ({what})")
        return True
    entering.update(saved)
    return False


def _diagnose():
    from . import diagnose  # why a block cannot run on the kept tokens (it imports this module)

    return diagnose


def leaving_decisions(r: RouteScope, env: dict[fx.Node, Any], stream: fx.Node, stream_info: TokenInfo,
                      n_img: int) -> list[ValueDecision]:
    """A decision for every value computed in the region and used after it (tuples through their getitems)."""
    rset, last = r.rset, (r.stream_end if r.stream_end is not None else r.chain.nodes[r.end])
    leaving: list[ValueDecision] = []
    for node in r.region:
        outside = [u for u in node.users if u not in rset]
        if not outside:
            continue
        orig, new = node.meta.get("val"), env[node]
        if not isinstance(orig, (tuple, list)):
            leaving.append(_leaving_decision(node, orig, new, r.analysis.token_info(node), stream_info, n_img,
                                             stream.meta["val"], r.name_of, node is last))
            continue
        for u in outside:
            if not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)):
                raise UnroutableRegionError(
                    f"route {r.index}: {_node_label(r.prog, node)} returns a tuple that is used whole after the "
                    f"route (by {_node_label(r.prog, u)}); treadfx can only restore tensors. Fix: end the route "
                    "elsewhere."
                )
            i = u.args[1]
            leaving.append(_leaving_decision(u, orig[i], new[i], r.analysis.token_info(node, i), stream_info,
                                             n_img, stream.meta["val"], r.name_of, node is last))
    return leaving


def choose_selection(route: Route, entering: list[ValueDecision], name_of, analysis=None) -> tuple[str, str]:
    """("per_sample" | "shared", why): requested, or shared when a gathered table has no batch dimension (or,
    with ``analysis``, its batch axis is not axis 0: the reason says so)."""
    unbatched = [d for d in entering if d.action == "gather" and not d.batched]
    if route.selection == "shared":
        return "shared", "requested"
    if route.selection == "per_sample":
        return "per_sample", "requested" + ("; tables without batch dim are expanded per sample" if unbatched else "")
    moved = _diagnose().batch_axes_elsewhere(analysis, unbatched, name_of) if analysis is not None else None
    if moved:  # [N, B, D]: batched, but not on axis 0
        return "shared", moved
    if unbatched:
        names = ", ".join(name_of(d.node) for d in unbatched)
        return "shared", (f"{names} has no batch dimension, so one subset serves the whole batch "
                          "(override with selection='per_sample' if every block accepts batched tables)")
    return "per_sample", "each sample draws its own subset (official TREAD)"


def choose_order(r: RouteScope, order_probe, entering: list[ValueDecision], stream: fx.Node) -> tuple[str, str]:
    """("random" | "sorted", why): requested; else random only where the probe shows every routed block
    permutation-equivariant, and sorted (the safe choice) when a block is order dependent or the probe could not
    tell."""
    if r.route.order != "auto":
        return r.route.order, "requested"
    if order_probe is None:
        return "random", "default"
    found = order_probe(r.chain, r.start, r.end, entering, stream)
    if found.dependent:
        return "sorted", f"{found.dependent} is order dependent (not permutation-equivariant over tokens)"
    if found.unproven:
        return "sorted", (f"permutation-equivariance could not be shown ({found.unproven}); sorted order is the "
                          "safe choice (pass order='random' to override)")
    return "random", "routed blocks are permutation-equivariant over tokens"


def first_working_subset(side: list, works) -> tuple | None:
    """The first subset of ``side`` (``(input, reading)`` pairs, at most one reading per input) in the order of
    :func:`_subsets` (smallest first) for which ``works(subset)`` is True, or None.

    Each call of ``works`` is a fake run of the region, so with one reading per input and 2 to 6 inputs the
    search first tries the whole set and each set without one input: if the whole set works, the inputs without
    which it fails are needed by every working set (working sets are closed under adding token-aligned inputs),
    and when those needed inputs work on their own they are the smallest working set, the one the ordered search
    finds (n + 1 runs, or n + 2, instead of up to 2^n - 1).  Otherwise the ordered search runs as before.
    """
    inputs = [inp for inp, _ in side]
    tried: dict[tuple, bool] = {}
    works_once = works

    def works(subset: tuple) -> bool:  # noqa: F811 - each distinct subset is run once
        key = tuple(id(p[0]) for p in subset), tuple(id(p[1]) for p in subset)
        if key not in tried:
            tried[key] = bool(works_once(subset))
        return tried[key]

    if 2 <= len(side) <= 6 and len(set(inputs)) == len(inputs):
        whole = tuple(side)
        if works(whole):
            needed = tuple(p for i, p in enumerate(side) if not works(whole[:i] + whole[i + 1:]))
            if needed == whole or (needed and works(needed)):
                return needed
    for subset in _subsets(side):
        if len({inp for inp, _ in subset}) < len(subset):
            continue  # two readings of one input
        if works(tuple(subset)):
            return tuple(subset)
    return None


def _subsets(items: list, limit: int = 64):
    """Non-empty subsets, smallest first (so a coincidental size match is never gathered needlessly)."""
    from itertools import combinations

    count = 0
    for r in range(1, len(items) + 1):
        for combo in combinations(items, r):
            yield combo
            count += 1
            if count >= limit:
                return


def _shape(v: Any) -> tuple:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _inputs_of(node: fx.Node) -> list[fx.Node]:
    seen, out = set(), []
    for n in node.all_input_nodes:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _direct_block_source(node: fx.Node, chain_set: set[fx.Node]) -> fx.Node | None:
    """The chain block whose output this value is (through getitem / non-block ops), if any."""
    return next((n for n in upstream([node]) if n in chain_set), None)


def _initial_decision(inp: fx.Node, stream: fx.Node, analysis: LayoutAnalysis, n_img: int,
                      chain_set: set[fx.Node]) -> ValueDecision:
    val = inp.meta.get("val")
    info = analysis.token_info(inp)
    if inp is stream:
        return ValueDecision(inp, "gather", "token stream", "the image tokens this route thins out",
                             info.axis, info.layout, True)
    if isinstance(info, TokenInfo) and info.has_image():
        _, n = image_span(info.layout)
        if n == n_img:
            from_block = depends_on(inp, chain_set)
            role = "skip connection" if from_block else "per-token input"
            why = ("a block output from before the route, consumed inside it" if from_block
                   else "batched tensor aligned with the image tokens")
            return ValueDecision(inp, "gather", role, why, info.axis, info.layout, info.batched)
    if _text_mask(inp, val, analysis):
        return ValueDecision(inp, "pass", "text mask", f"a per-sample mask over the {val.shape[-1]} text tokens, "
                             "which are never routed: every block sees all of it")
    if isinstance(info, TokenInfo) and not info.has_image():
        if not analysis.carries_tokens(inp):
            k = info.length
            return ValueDecision(inp, "pass", "modulation", f"per-sample table of {k} chunk(s) of the conditioning "
                                 f"(shape {list(val.shape)}: axis {info.axis} is no token axis), passed whole")
        kinds = {s.kind for s in info.layout}
        role = "text stream" if "text" in kinds else "extra tokens"
        why = ("the text tokens, updated by the blocks" if depends_on(inp, chain_set) and role == "text stream"
               else "the text tokens the blocks attend to" if role == "text stream" else "tokens that are never routed")
        return ValueDecision(inp, "pass", role, f"{why}: holds no image tokens, so every block sees all of it",
                             info.axis, info.layout, info.batched)
    if isinstance(val, torch.Tensor) and analysis.is_batched_value(inp, val):
        return ValueDecision(inp, "pass", "conditioning", "per-sample tensor without a token axis")
    if isinstance(val, torch.Tensor):
        return ValueDecision(inp, "pass", "constant", "no batch dimension and usable with the kept tokens")
    return ValueDecision(inp, "pass", "value", "not a tensor")


def _text_mask(inp: fx.Node, val: Any, analysis: LayoutAnalysis) -> bool:
    """True if ``val`` is a per-sample mask (or mask bias) over text tokens: ``[B, T]``, ``[B, 1, T]``,
    ``[B, 1, 1, T]``, computed from a ``[B, T]`` input, where ``T`` is the token count of a text input."""
    if not (isinstance(val, torch.Tensor) and val.ndim >= 2 and analysis.is_batched_value(inp, val)
            and all(d == 1 for d in val.shape[1:-1])):
        return False
    t, b = int(val.shape[-1]), int(val.shape[0])
    if not any(int(p.meta["val"].shape[1]) == t for p in analysis.text_phs):
        return False
    return any(p.op == "placeholder" and p is not analysis.image_ph and isinstance(p.meta.get("val"), torch.Tensor)
               and tuple(p.meta["val"].shape) == (b, t) for p in analysis.provenance.get(inp, ()))


def _node_value(gm: fx.GraphModule, n: fx.Node) -> Any:
    """A node's traced value; for a ``get_attr`` of a module (a module passed to a block), the module."""
    v = n.meta.get("val")
    return module_value(gm, n) if v is None else v


def _shrunk_parts(value: Any, d: ValueDecision, keep: int, per_sample: bool, batch: int, mode) -> Any:
    """A side input with several token axes, or a module's token tables, as the route op gives it to the
    blocks with ``keep`` kept tokens (fake indices)."""
    with mode:
        idx = torch.zeros((batch, keep) if per_sample else (keep,), dtype=torch.int64)
    return gather_op(d, per_sample)(value, idx)


def _side_decisions(r: RouteScope, inp: fx.Node, consumer: fx.Node, n_img: int,
                    known: list[Layout]) -> list[ValueDecision]:
    """The readings of an input of ``consumer`` as a side input, most likely first: gathered on both axes of
    an ``[.., N, N]`` square, then on its first token axis only (a ``[N, d]`` table with ``d == N``)."""
    out: list[ValueDecision] = []
    for square in (True, False):
        d = _side_decision(r, inp, consumer, n_img, known, square)
        if d is not None and all(d.parts != o.parts or d.axis != o.axis for o in out):
            out.append(d)
    return out


def _side_decision(r: RouteScope, inp: fx.Node, consumer: fx.Node, n_img: int,
                   known: list[Layout], square: bool = True) -> ValueDecision | None:
    """A "gather" decision for an input of ``consumer`` that lines up with the image tokens: a tensor on its
    token axis (both axes of an ``[.., N, N]`` mask), or a module argument whose buffers are token tables."""
    gm = r.prog.gm
    val = _node_value(gm, inp)
    if isinstance(val, torch.nn.Module):
        parts = side_parts(gm, inp, val, n_img, known, False, square)
        if parts is None:
            return None
        if r.route.selection in ("per_sample", "structured"):
            parts = _with_leads(r, consumer, val, parts)
        inp.meta.setdefault("val", val)
        first = parts[0].axes[0]
        return ValueDecision(inp, "gather", "module side input", "", first[0], first[1], False, parts)
    if not isinstance(val, torch.Tensor) or val.ndim == 0:
        return None
    batched = r.analysis.is_batched_value(inp, val)
    parts = side_parts(gm, inp, val, n_img, known, batched, square)
    if parts is None:
        return None
    (axis, layout), *more = parts[0].axes
    return ValueDecision(inp, "gather", "side input", "", axis, layout, batched,
                         parts if (more or parts[0].expand_dim0) else None)


def _with_leads(r: RouteScope, consumer: fx.Node, module: torch.nn.Module, parts: tuple) -> tuple:
    """Per-sample copies of a module's tables broadcast like the originals: see how the consumer uses them."""
    from .fake_eval import forward_of, no_user_hooks

    from .layout import module_tensors

    tensors = module_tensors(module)
    mine = {p.path: tensors[p.path] for p in parts}
    args, kwargs = fx.node.map_arg((consumer.args, consumer.kwargs), lambda n: _node_value(r.prog.gm, n))
    ev = r.prog.evaluator

    def call():
        target = r.prog.gm.get_submodule(consumer.target) if consumer.op == "call_module" else consumer.target
        a, k = ev.fakeify((args, kwargs))
        with ev.mode, no_user_hooks(), quiet_fake_tensor_logs():
            return forward_of(target)(*a, **k) if consumer.op == "call_module" else target(*a, **k)

    leads = broadcast_leads(call, mine)
    return tuple(dataclasses.replace(p, lead=leads.get(p.path, 0)) for p in parts)


def _leaving_decision(node: fx.Node, orig: Any, new: Any, info: TokenInfo | None, stream_info: TokenInfo,
                      n_img: int, stream_val: torch.Tensor, name_of, is_stream: bool = True) -> ValueDecision:
    if not isinstance(orig, torch.Tensor):
        return ValueDecision(node, "pass", "value", "not a tensor")
    if tuple(orig.shape) == tuple(new.shape):
        role = "text stream" if isinstance(info, TokenInfo) and not info.has_image() else "unchanged"
        return ValueDecision(node, "pass", role, "same shape with and without routing",
                             info.axis if info else None, info.layout if info else None)
    if not isinstance(info, TokenInfo) or not info.has_image():
        raise UnroutableRegionError(
            f"{name_of(node)} (shape {list(orig.shape)}) is produced inside the route with a different shape "
            f"({list(new.shape)}) and used after it, but treadfx cannot tell which of its positions are image tokens. "
            "Fix: end the route before it is produced."
        )
    _, n = image_span(info.layout)
    base = stream_val
    width_ok = (orig.ndim == base.ndim and info.axis == stream_info.axis and all(
        a == b for i, (a, b) in enumerate(zip(orig.shape, base.shape)) if i != info.axis))
    if not width_ok:
        raise UnroutableRegionError(
            f"{name_of(node)} (shape {list(orig.shape)}) carries image tokens out of the route, but its skipped tokens "
            f"cannot be restored from the token stream at route-out (shape {list(base.shape)}): the other dimensions "
            "differ. Fix: end the route before this tensor is produced, or after it is consumed."
        )
    if n != n_img:
        raise UnroutableRegionError(
            f"{name_of(node)} leaves the route with {n} image tokens where the stream had {n_img}. Fix: end the route "
            "before the token count changes."
        )
    role = "token stream" if is_stream else "skip connection"
    return ValueDecision(node, "scatter", role,
                         "carries kept image tokens; skipped ones are restored from the stream at route-out",
                         info.axis, info.layout, True)
