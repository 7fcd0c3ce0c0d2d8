"""The TREAD pass: rewrite a traced graph with route-out / route-in nodes.

For each planned route (see :mod:`treadfx.planning`) the pass inserts, before
block ``start``, a :class:`~treadfx.ops.RouteSelect` node that draws the kept
indices and one :class:`~treadfx.ops.RouteGather` per tensor entering the
route that carries image tokens; after each tensor that leaves the route with
kept tokens it inserts a :class:`~treadfx.ops.RouteScatter` that restores the
skipped tokens from the stream saved at route-out.  The kept indices of every
route are appended to the graph outputs so the caller can record them.

Use it through the ``torch.fx`` pass protocol: ``TreadPass(plans)(gm)`` runs
``requires``, ``call`` and ``ensures`` and returns a ``PassResult``; the route
ops it added are read back from the graph module (:func:`route_selects`).

Metadata of inserted nodes: every node gets ``meta["val"]``, its fake value
with routing active at the kept count the route was built with (a select's
``[B, K]`` / ``[K]`` int64 indices, a gather's K-token tensor; a scatter
stands for the value it restores, so it gets that node's value) and
``meta["treadfx_scope"]`` of the block where its route begins (select,
gathers) or ends (scatters), so :mod:`treadfx.live` treats route ops as code
of the modules that call the blocks.  The two optional inputs
``treadfx_keep`` (bool ``[B, N]``) and ``treadfx_step`` (int64 ``[]``) get
the fake value they have when given.  Other nodes keep their traced (dense)
values.

Pre-condition (``requires``): every node a plan names is in the graph, and
the stream and every tensor the pass gathers or scatters has ``meta["val"]``.
Post-condition (``ensures``): the graph lints, every route's gathers and
scatters read that route's own indices, and every inserted node has
``meta["val"]``.
"""

from __future__ import annotations

import inspect as pyinspect
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from treadfx.errors import UnroutableRegionError
from treadfx.layout import image_span
from treadfx.ops import (AutocastDisabled, RouteGather, RouteGatherParts, RouteScatter, RouteSelect, StructuredSelect,
                         gather_op)
from treadfx.planning import RoutePlan
from treadfx.structured import rewrite_grid_args

__all__ = ["TreadPass", "route_selects", "select_name"]

_INPUTS = ("treadfx_keep", "treadfx_step")


def select_name(route_index: int) -> str:
    """The submodule name of route ``route_index``'s RouteSelect in a rewritten graph module."""
    return f"treadfx_route{route_index}_select"


def route_selects(gm: fx.GraphModule, plans: Sequence[RoutePlan]) -> list[RouteSelect]:
    """The RouteSelect op of each plan's route in ``gm`` (rewritten by :class:`TreadPass`), in plan order."""
    return [gm.get_submodule(select_name(p.index)) for p in plans]


class TreadPass(PassBase):
    """Insert TREAD routes into a graph module, one route per :class:`RoutePlan`."""

    def __init__(self, plans: Sequence[RoutePlan], fp32_after_route: bool = False, forced: bool = False,
                 training: bool = True):
        super().__init__()
        self.plans = list(plans)
        self.fp32_after_route = fp32_after_route
        self.forced = forced
        self.training = training

    def requires(self, graph_module: fx.GraphModule) -> None:
        nodes = set(graph_module.graph.nodes)
        for plan in self.plans:
            missing = [n.name for n in [plan.stream, *plan.region] if n not in nodes]
            if missing:
                raise ValueError(f"TreadPass: plan {plan.index} names nodes not in this graph: {missing[:5]}")
            touched = [plan.stream] + [d.node for d in plan.entering + plan.leaving if d.action != "pass"]
            unvalued = [n.name for n in touched if not isinstance(n.meta.get("val"), (torch.Tensor, torch.nn.Module))]
            if unvalued:
                raise ValueError(f"TreadPass: plan {plan.index} routes nodes without a fake value "
                                 f"(meta['val']): {unvalued[:5]}")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            # optional inputs of every route: tokens that must stay, and the forward counter for seeded routes
            keep_ph = graph.placeholder(_INPUTS[0], default_value=None)
            step_ph = graph.placeholder(_INPUTS[1], default_value=None)
        if self.plans:
            ref = self.plans[0].stream.meta["val"]
            with _fake_mode_of([ref]):
                keep_ph.meta["val"] = torch.empty(ref.shape[0], self.plans[0].num_tokens, dtype=torch.bool,
                                                  device=ref.device)
                step_ph.meta["val"] = torch.empty((), dtype=torch.int64, device=ref.device)
        idx_nodes: dict[int, fx.Node] = {}
        for plan in reversed(self.plans):
            idx_nodes[plan.index] = self._rewrite(graph_module, plan, keep_ph, step_ph)
        output = next(n for n in graph.nodes if n.op == "output")
        outs = output.args[0]
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        output.args = (outs + tuple(idx_nodes[p.index] for p in self.plans),)
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)  # at least the two optional inputs were added

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()
        for node in graph_module.graph.nodes:
            if node.op == "placeholder" and node.target in _INPUTS and self.plans and "val" not in node.meta:
                raise AssertionError(f"TreadPass: input {node.name} has no meta['val']")
            if node.op != "call_module" or not str(node.target).startswith("treadfx_route"):
                continue
            if "val" not in node.meta:
                raise AssertionError(f"TreadPass: {node.name} has no meta['val']")
            mod = graph_module.get_submodule(node.target)
            if isinstance(mod, (RouteGather, RouteGatherParts, RouteScatter)):
                route = node.meta["treadfx"][1]
                idx = node.args[-1]
                if not (isinstance(idx, fx.Node) and idx.op == "call_module" and idx.target == select_name(route)):
                    raise AssertionError(f"TreadPass: {node.name} of route {route} does not read that route's "
                                         f"indices ({select_name(route)}), but {idx}")

    # ------------------------------------------------------------------------------------------------
    def _rewrite(self, gm: fx.GraphModule, plan: RoutePlan, keep_ph: fx.Node, step_ph: fx.Node) -> fx.Node:
        refuse_token_counts(gm, plan)
        graph = gm.graph
        rset = set(plan.region)
        first = plan.chain.nodes[plan.start]
        last = plan.chain.nodes[plan.end]
        i = plan.index
        per_sample = plan.selection == "per_sample"
        if getattr(plan, "grid", None) is not None:  # structured: a sub-grid per sample (treadfx.structured)
            select = StructuredSelect(i, plan.num_tokens, plan.num_keep, plan.grid.sizes, seed=plan.route.seed)
        else:
            select = RouteSelect(i, plan.num_tokens, plan.num_keep, plan.order == "sorted", not per_sample,
                                 seed=plan.route.seed, shared_reason=None if per_sample else plan.selection_reason)
        select.train(self.training)
        select.forced = self.forced
        gm.add_submodule(select_name(i), select)
        with graph.inserting_before(first):
            idx = graph.call_module(select_name(i), (plan.stream, keep_ph, step_ph))
        _copy_scope(idx, first)
        with _fake_mode_of([plan.stream.meta["val"]]):
            forced = select.forced
            select.forced = True  # the value with the route active, whatever the mode at build time
            try:
                idx.meta["val"] = select(plan.stream.meta["val"])
            finally:
                select.forced = forced
        if getattr(plan, "grid", None) is not None:  # the routed blocks get the kept sub-grid's height/width
            for n in rewrite_grid_args(gm, plan, idx):
                _copy_scope(n, first)

        order = {n: k for k, n in enumerate(graph.nodes)}
        for j, d in enumerate(d for d in plan.entering if d.action == "gather"):
            users = [u for u in d.node.users if u in rset]
            if not users:
                continue
            first_user = min(users, key=lambda u: order[u])
            op = gather_op(d, per_sample)  # RouteGather, or RouteGatherParts for masks and module tables
            name = f"treadfx_route{i}_gather{j}"
            gm.add_submodule(name, op)
            with graph.inserting_before(first_user):
                g = graph.call_module(name, (d.node, idx))
            g.meta["treadfx"] = ("gather", i, d.role)
            _copy_scope(g, first)
            with _fake_mode_of([d.node.meta["val"]]):
                g.meta["val"] = op(d.node.meta["val"], idx.meta["val"])
            for u in users:
                u.replace_input_with(d.node, g)

        s_off, _ = image_span(plan.stream_info.layout)
        for j, d in enumerate(d for d in plan.leaving if d.action == "scatter"):
            off, n = image_span(d.layout)
            op = RouteScatter(d.axis, off, s_off, n, per_sample)
            name = f"treadfx_route{i}_scatter{j}"
            gm.add_submodule(name, op)
            outside = [u for u in d.node.users if u not in rset]
            with graph.inserting_after(d.node):
                s = graph.call_module(name, (d.node, plan.stream, idx))
            s.meta["treadfx"] = ("scatter", i, d.role)
            s.meta["val"] = d.node.meta["val"]  # the scatter restores the value it replaces for the nodes after it
            _copy_scope(s, last)
            for u in outside:
                u.replace_input_with(d.node, s)

        if self.fp32_after_route and plan.end + 1 < len(plan.chain.nodes):
            nxt = plan.chain.nodes[plan.end + 1]
            name = f"treadfx_route{i}_fp32_block"
            gm.add_submodule(name, AutocastDisabled(gm.get_submodule(nxt.target)))
            nxt.target = name
        return idx


def _copy_scope(node: fx.Node, block: fx.Node) -> None:
    """The module-call scope (and stack trace, when recorded) of the block the route op is attributed to."""
    for key in ("treadfx_scope", "stack_trace"):
        if key in block.meta:
            node.meta[key] = block.meta[key]


def _fake_mode_of(values: list[Any]):
    """The fake mode of these traced values (their graph's), or a fresh one when they are not fake.

    Read from the values themselves: ``detect_fake_mode`` would prefer an enclosing ``torch.compile`` trace's
    mode, which is not the mode the analysis graph's values were made in."""
    for v in pytree.tree_leaves(values):
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def refuse_token_counts(gm: fx.GraphModule, plan: RoutePlan) -> None:
    """Raise UnroutableRegionError when a routed block takes a Python int that counts some of its image tokens
    (0 < value < N) under random selection (structured selection passes grid shapes): such a count (HunyuanVideo-I2V's
    ``first_frame_num_tokens``, the first frame's tokens modulated differently) would mark other tokens in the kept
    sequence than in the full one, so the routed blocks would compute something else, silently."""
    if getattr(plan, "grid", None) is not None:  # structured: the blocks' ints are the token grid's shape (Sana's
        return                                    # height/width, rewritten to the sub-grid's; Sana-Video's frames)
    n = plan.num_tokens
    for block in plan.chain.nodes[plan.start: plan.end + 1]:
        try:
            params = list(pyinspect.signature(gm.get_submodule(block.target).forward).parameters.values())
        except (AttributeError, TypeError, ValueError):
            params = None
        items = [("arg", k, v) for k, v in enumerate(block.args)] + [("kwarg", k, v) for k, v in block.kwargs.items()]
        for kind, key, value in items:
            if type(value) is not int or not 0 < value < n:
                continue
            name = _parameter_for(params, kind, key)
            if name is None:  # it lands in *args / **kwargs: the block does not name it (diffusers' HunyuanVideo
                continue      # text-to-video blocks take and ignore the I2V blocks' first-frame count)
            raise UnroutableRegionError(
                f"route {plan.index} (chain blocks {plan.start}..{plan.end}): block "
                f"`{str(block.target).removeprefix('m.')}` takes `{name}`={value}, a count of tokens below the {n} "
                "image tokens it sees (e.g. a prefix of the sequence treated differently, like HunyuanVideo-I2V's "
                "first-frame tokens with "
                "image_condition_type='token_replace'). On the kept tokens that count would select other tokens than "
                "in the full sequence, so the routed blocks would compute something else. Fix: end the route before "
                f"the blocks that take `{name}`, or train a configuration whose blocks take no such count "
                "(HunyuanVideo-I2V: image_condition_type='latent_concat').")


def _parameter_for(params: list | None, kind: str, key: Any) -> str | None:
    """The name of the forward parameter an argument binds to; None when it lands in ``*args``/``**kwargs``."""
    if params is None:
        return str(key) if kind == "kwarg" else f"argument {key}"
    variadic = (pyinspect.Parameter.VAR_POSITIONAL, pyinspect.Parameter.VAR_KEYWORD)
    if kind == "kwarg":
        named = [p for p in params if p.name == key and p.kind not in variadic]
        return key if named else None
    positional = [p for p in params if p.kind in (pyinspect.Parameter.POSITIONAL_ONLY,
                                                  pyinspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return positional[key].name if key < len(positional) else None
