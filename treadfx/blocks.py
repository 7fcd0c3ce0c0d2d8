"""Finding the repeated blocks of a model.

The module tree is the strongest signal: a ``ModuleList`` / ``Sequential`` /
``ModuleDict`` holding two or more composite children of the same class (the
same idea diffusers uses for regional compilation).  Each block is labelled
with a Weisfeiler-Lehman hash (networkx) of its own FX graph, its *kind*: a
container of same-class blocks whose forwards differ (U-ViT's skip blocks) is
reported as two kinds, and same-structure blocks of different classes as one.
The hash labels blocks for reports; it does not decide what is a block.
"""

from __future__ import annotations

import dataclasses
import warnings
import networkx as nx
import torch.fx as fx
import torch.nn as nn

__all__ = ["BlockCandidate", "find_block_candidates", "block_graph_hash", "fx_graph_to_networkx"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclasses.dataclass
class BlockCandidate:
    """A module that may be one block of a chain."""

    path: str  # attribute path from the model root, e.g. "blocks.3"
    module: nn.Module
    container: str | None  # path of the container, "" for singletons found by class
    wl_hash: str | None = None

    @property
    def class_name(self) -> str:
        return type(self.module).__name__


def _is_composite(m: nn.Module) -> bool:
    return any(True for _ in m.children())


def find_block_candidates(model: nn.Module) -> list[BlockCandidate]:
    """All modules that look like repeated blocks, in module-tree order.

    Guarantees: a candidate is never inside another candidate; every child of a
    container with >= 2 same-class composite children is a candidate; a module
    of such a class found elsewhere (a U-ViT mid block) is a candidate too.
    """
    found: list[BlockCandidate] = []
    block_classes: set[type] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, _CONTAINERS):
            by_class: dict[type, int] = {}
            for child in module.children():
                if _is_composite(child):
                    by_class[type(child)] = by_class.get(type(child), 0) + 1
            repeated = {cls for cls, n in by_class.items() if n >= 2}
            if repeated:
                block_classes.update(repeated)
                for name, child in module.named_children():
                    path = f"{prefix}{name}"
                    if type(child) in repeated:
                        found.append(BlockCandidate(path, child, prefix[:-1]))
                    else:
                        visit(child, path + ".")
                return
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    taken = {id(c.module) for c in found}
    # singletons of a block class (U-ViT mid block)
    for path, module in model.named_modules():
        if not path or id(module) in taken:
            continue
        if any(path.startswith(c.path + ".") for c in found):
            continue
        if type(module) in block_classes:
            found.append(BlockCandidate(path, module, ""))
            taken.add(id(module))
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    found.sort(key=lambda c: order.get(id(c.module), 0))
    return found


def _label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module:{type(gm.get_submodule(node.target)).__name__}"
    if node.op == "call_function":
        return f"fn:{getattr(node.target, '__name__', str(node.target))}"
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op == "get_attr":
        return "attr"
    return node.op


def fx_graph_to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The dataflow graph of ``gm`` with one labelled vertex per node (multi-edges collapsed)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, label=_label(node, gm))
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def block_graph_hash(block: nn.Module) -> str:
    """Weisfeiler-Lehman hash of the block's FX graph; equal for structurally equal blocks.

    Falls back to a hash of the module tree (class names and parameter ranks)
    when the block's forward cannot be traced symbolically on its own.
    """
    try:
        gm = fx.symbolic_trace(block)
        g = fx_graph_to_networkx(gm)
    except Exception:
        g = nx.DiGraph()
        for name, m in block.named_modules():
            g.add_node(name or "<root>", label=type(m).__name__ + str(sorted(p.ndim for p in m.parameters(False))))
            if name:
                parent = name.rsplit(".", 1)[0] if "." in name else "<root>"
                g.add_edge(parent, name)
    with warnings.catch_warnings():  # networkx 3.5 notes that directed hashes changed; ours are compared in-process
        warnings.simplefilter("ignore")
        return nx.weisfeiler_lehman_graph_hash(g, node_attr="label", iterations=3)
