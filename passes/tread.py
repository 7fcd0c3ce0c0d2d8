"""The TREAD pass: rewrite a traced graph with route-out / route-in nodes.

For each planned route (see :mod:`treadfx.planning`) the pass inserts, before
block ``start``, a :class:`~treadfx.ops.RouteSelect` node that draws the kept
indices and one :class:`~treadfx.ops.RouteGather` per tensor entering the
route that carries image tokens; after each tensor that leaves the route with
kept tokens it inserts a :class:`~treadfx.ops.RouteScatter` that restores the
skipped tokens from the stream saved at route-out.  The kept indices of every
route are appended to the graph outputs so the caller can record them.

Pre-condition (``requires``): every node a plan names is in the graph.
Post-condition (``ensures``): the graph lints, and every route's gathers and
scatters read that route's indices.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from treadfx.layout import image_span
from treadfx.ops import AutocastDisabled, RouteGather, RouteScatter, RouteSelect
from treadfx.planning import RoutePlan

__all__ = ["TreadPass"]


class TreadPass(PassBase):
    """Insert TREAD routes into a graph module, one route per :class:`RoutePlan`."""

    def __init__(self, plans: Sequence[RoutePlan], fp32_after_route: bool = False, forced: bool = False,
                 training: bool = True):
        super().__init__()
        self.plans = list(plans)
        self.fp32_after_route = fp32_after_route
        self.forced = forced
        self.training = training
        self.selects: list[RouteSelect] = []
        self.touched: list[fx.Node] = []

    def requires(self, graph_module: fx.GraphModule) -> None:
        nodes = set(graph_module.graph.nodes)
        for plan in self.plans:
            missing = [n.name for n in [plan.stream, *plan.region] if n not in nodes]
            if missing:
                raise ValueError(f"TreadPass: plan {plan.index} names nodes not in this graph: {missing[:5]}")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            # optional inputs of every route: tokens that must stay, and the forward counter for seeded routes
            self.keep_ph = graph.placeholder("treadfx_keep", default_value=None)
            self.step_ph = graph.placeholder("treadfx_step", default_value=None)
        idx_nodes: dict[int, fx.Node] = {}
        selects: dict[int, RouteSelect] = {}
        for plan in reversed(self.plans):
            idx_nodes[plan.index], selects[plan.index] = self._rewrite(graph_module, plan)
        self.selects = [selects[p.index] for p in self.plans]
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        outs = output.args[0]
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        output.args = (outs + tuple(idx_nodes[p.index] for p in self.plans),)
        graph_module.graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and str(node.target).startswith("treadfx_route"):
                mod = graph_module.get_submodule(node.target)
                if isinstance(mod, (RouteGather, RouteScatter)):
                    idx = node.args[-1]
                    if not (isinstance(idx, fx.Node) and isinstance(graph_module.get_submodule(idx.target), RouteSelect)):
                        raise AssertionError(f"TreadPass: {node.name} does not read route indices")

    # ------------------------------------------------------------------------------------------------
    def _rewrite(self, gm: fx.GraphModule, plan: RoutePlan) -> tuple[fx.Node, RouteSelect]:
        graph = gm.graph
        rset = set(plan.region)
        first = plan.chain.nodes[plan.start]
        i = plan.index
        per_sample = plan.selection == "per_sample"
        select = RouteSelect(i, plan.num_tokens, plan.num_keep, plan.order == "sorted", not per_sample,
                             seed=plan.route.seed)
        select.train(self.training)
        select.forced = self.forced
        gm.add_submodule(f"treadfx_route{i}_select", select)
        with graph.inserting_before(first):
            idx = graph.call_module(f"treadfx_route{i}_select", (plan.stream, self.keep_ph, self.step_ph))
        self.touched.append(idx)

        order = {n: k for k, n in enumerate(graph.nodes)}
        for j, d in enumerate(d for d in plan.entering if d.action == "gather"):
            users = [u for u in d.node.users if u in rset]
            if not users:
                continue
            first_user = min(users, key=lambda u: order[u])
            off, n = image_span(d.layout)
            total = sum(s.length for s in d.layout)
            op = RouteGather(d.axis, off, n, total, d.batched, per_sample)
            name = f"treadfx_route{i}_gather{j}"
            gm.add_submodule(name, op)
            with graph.inserting_before(first_user):
                g = graph.call_module(name, (d.node, idx))
            g.meta["treadfx"] = ("gather", i, d.role)
            self.touched.append(g)
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
            self.touched.append(s)
            for u in outside:
                u.replace_input_with(d.node, s)

        if self.fp32_after_route and plan.end + 1 < len(plan.chain.nodes):
            nxt = plan.chain.nodes[plan.end + 1]
            name = f"treadfx_route{i}_fp32_block"
            gm.add_submodule(name, AutocastDisabled(gm.get_submodule(nxt.target)))
            nxt.target = name
        return idx, select
