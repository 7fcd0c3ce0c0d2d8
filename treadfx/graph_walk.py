"""Reachability walks over torch.fx graphs.

The graph analyses (chains, stream planning, the DiffMoE pass, output-to-input
mapping) all ask the same question: which nodes can be reached from here by
following inputs (upstream) or users (downstream)?  They differ only in where
the walk stops, so the walk itself lives here once.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch.fx as fx

__all__ = ["upstream", "downstream", "depends_on", "feeds_output"]

NodePredicate = Callable[[fx.Node], bool]


def _walk(starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
          expand: NodePredicate | None) -> Iterator[fx.Node]:
    stack = list(starts)
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        if expand is None or expand(n):
            stack.extend(step(n))


def upstream(starts: Iterable[fx.Node], expand: NodePredicate | None = None) -> Iterator[fx.Node]:
    """Yield every node reachable from ``starts`` through node inputs, each exactly once, depth-first
    (``starts`` themselves included). A node for which ``expand`` is false is yielded but its inputs
    are not followed. The order is deterministic for a given graph."""
    return _walk(starts, lambda n: n.all_input_nodes, expand)


def downstream(starts: Iterable[fx.Node], expand: NodePredicate | None = None) -> Iterator[fx.Node]:
    """Like :func:`upstream`, following node users instead of inputs."""
    return _walk(starts, lambda n: n.users, expand)


def depends_on(node: fx.Node, sources: set[fx.Node]) -> bool:
    """True if ``node`` is in ``sources`` or any of them reaches ``node`` through data inputs."""
    return any(n in sources for n in upstream([node]))


def feeds_output(node: fx.Node) -> bool:
    """True if the value of ``node`` reaches the graph's output node."""
    return any(n.op == "output" for n in downstream([node]))
