"""treadfx.graph_walk against networkx reachability on random fx graphs."""

from __future__ import annotations

import operator

import networkx as nx
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st

from treadfx.graph_walk import depends_on, downstream, feeds_output, upstream


@st.composite
def random_graphs(draw):
    """A random DAG as an fx.Graph (node k reads a random subset of nodes < k) and the same DAG in networkx."""
    n = draw(st.integers(2, 14))
    g = fx.Graph()
    nodes = [g.placeholder("x0")]
    dag = nx.DiGraph()
    dag.add_node(0)
    for k in range(1, n):
        preds = draw(st.lists(st.integers(0, k - 1), max_size=3, unique=True))
        if not preds:
            node = g.placeholder(f"x{k}")
        else:
            node = g.call_function(operator.add, tuple(nodes[p] for p in preds))
        nodes.append(node)
        dag.add_node(k)
        dag.add_edges_from((p, k) for p in preds)
    outs = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3, unique=True))
    g.output(tuple(nodes[o] for o in outs))
    return g, nodes, dag, set(outs)


def _reach(dag: nx.DiGraph, start: int, stop: set[int], reverse: bool) -> set[int]:
    """Nodes reachable from ``start``, not walking past the nodes in ``stop`` (which are still reached)."""
    graph = dag.reverse() if reverse else dag
    found, frontier = {start}, [start]
    while frontier:
        k = frontier.pop()
        if k in stop and k != start:
            continue
        for j in graph.successors(k):
            if j not in found:
                found.add(j)
                frontier.append(j)
    return found


@given(random_graphs(), st.data())
def test_upstream_yields_each_ancestor_exactly_once(case, data):
    g, nodes, dag, _ = case
    k = data.draw(st.integers(0, len(nodes) - 1))
    walked = list(upstream([nodes[k]]))
    assert len(walked) == len(set(walked))
    assert {nodes.index(n) for n in walked} == nx.ancestors(dag, k) | {k}


@given(random_graphs(), st.data())
def test_walks_yield_but_do_not_pass_nodes_that_are_not_expanded(case, data):
    g, nodes, dag, _ = case
    k = data.draw(st.integers(0, len(nodes) - 1))
    stop = set(data.draw(st.lists(st.integers(0, len(nodes) - 1), max_size=4)))
    # the start node is always expanded here, so the reference treats it the same way
    index = {n: i for i, n in enumerate(nodes)}
    keep = lambda n: index.get(n) not in stop or n is nodes[k]  # noqa: E731
    up = {index[n] for n in upstream([nodes[k]], expand=keep)}
    assert up == _reach(dag, k, stop, reverse=True)
    down = {index[n] for n in downstream([nodes[k]], expand=keep) if n.op != "output"}
    assert down == _reach(dag, k, stop, reverse=False)


@given(random_graphs(), st.data())
def test_depends_on_and_feeds_output_agree_with_reachability(case, data):
    g, nodes, dag, outs = case
    k = data.draw(st.integers(0, len(nodes) - 1))
    sources = set(data.draw(st.lists(st.integers(0, len(nodes) - 1), max_size=3)))
    assert depends_on(nodes[k], {nodes[s] for s in sources}) == bool(sources & (nx.ancestors(dag, k) | {k}))
    assert feeds_output(nodes[k]) == bool(outs & (nx.descendants(dag, k) | {k}))
