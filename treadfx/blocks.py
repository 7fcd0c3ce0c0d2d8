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

__all__ = ["BlockCandidate", "find_block_candidates", "block_graph_hash", "fx_graph_to_networkx", "no_blocks_message"]

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


def _loops_calling(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Attributes among ``names`` that the model's forward calls as ``self.<name>(...)`` inside a ``for``/``while``
    loop, each with the loop's first line (from the source; empty when the source cannot be read)."""
    import ast
    import inspect
    import textwrap

    try:
        src = textwrap.dedent(inspect.getsource(type(model).forward))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return {}
    out: dict[str, str] = {}
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        for node in ast.walk(loop):
            f = node.func if isinstance(node, ast.Call) else None
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self"
                    and f.attr in names and f.attr not in out):
                out[f.attr] = src.splitlines()[loop.lineno - 1].strip()
    return out


def no_blocks_message(model: nn.Module) -> str:
    """Why ``find_block_candidates(model)`` found nothing, from what the module tree holds, with the fix that fits:
    one block applied in a loop (weight sharing), a container of plain layers (a leaf layer is no block), a
    container of blocks of different classes, same-class blocks held as separate attributes, a container with a
    single block, else what the model holds."""
    name = type(model).__name__
    head = f"{name} has no repeated blocks"
    composite = {p: type(m).__name__ for p, m in model.named_children()
                 if _is_composite(m) and not isinstance(m, _CONTAINERS)}
    loops = _loops_calling(model, set(composite))
    if loops:
        attr, line = next(iter(loops.items()))
        return (f"{head}: forward applies one block, `{attr}` ({composite[attr]}), in a loop (`{line}`): "
                "weight-shared repetition. treadfx routes along distinct block modules, each called once, so one "
                "module applied several times is not a chain. Fix: for distinct blocks, keep them in an "
                "nn.ModuleList; to keep the weights shared, hold one thin wrapper module per step, "
                f"`self.steps = nn.ModuleList([Step(self.{attr}) for _ in range(n)])` with "
                f"`Step.forward(self, h): return self.block(h)`, and loop over `self.steps`.")
    leafy, single, mixed = [], [], []
    for path, mod in model.named_modules():
        if not isinstance(mod, _CONTAINERS):
            continue
        kids = list(mod.children())
        inner = [k for k in kids if _is_composite(k)]
        leaf_counts: dict[str, int] = {}
        for k in kids:
            if not _is_composite(k):
                leaf_counts[type(k).__name__] = leaf_counts.get(type(k).__name__, 0) + 1
        repeated = {c: n for c, n in leaf_counts.items() if n >= 2}
        where = f"`{path}` ({type(mod).__name__})" if path else f"the model ({type(mod).__name__})"
        if repeated:
            leafy.append((where, repeated))
        if len(inner) == 1:
            single.append((where, type(inner[0]).__name__))
        elif len(inner) >= 2:
            mixed.append((where, sorted({type(k).__name__ for k in inner})))
    if leafy:
        where, counts = leafy[0]
        held = " and ".join(f"{n} `{c}` layers" for c, n in counts.items())
        return (f"{head}: {where} holds {held}, but a layer without submodules is not a block. treadfx routes "
                "tokens around blocks, modules that hold their own layers (a transformer block with its attention, "
                "MLP and norms); a list of plain layers is taken to be part of one (projections, embedders). Fix: "
                "wrap each layer and its residual in a small nn.Module (e.g. `class Block(nn.Module)` holding the "
                "layer, whose forward does what forward did per layer, such as `return h + "
                "torch.relu(self.layer(h))`) and keep those blocks in the container.")
    if mixed:
        where, classes = mixed[0]
        return (f"{head}: {where} holds blocks of {len(classes)} different classes "
                f"({', '.join(f'`{c}`' for c in classes)}), no two of the same class; treadfx takes two or more "
                "blocks of one class in one container to be the repeated blocks. Fix: build the blocks from one "
                "class (options in its __init__ rather than one class per block).")
    by_class: dict[type, list[str]] = {}
    for path, mod in model.named_modules():
        if path and _is_composite(mod) and not isinstance(mod, _CONTAINERS):
            by_class.setdefault(type(mod), []).append(path)
    spread = {cls: paths for cls, paths in by_class.items() if len(paths) >= 2}
    if spread:
        cls, paths = max(spread.items(), key=lambda kv: len(kv[1]))
        return (f"{head} in a container: {len(paths)} `{cls.__name__}` modules are held as separate attributes "
                f"({', '.join(f'`{p}`' for p in paths)}), and treadfx finds repeated blocks as two or more modules "
                "of one class in an nn.ModuleList / nn.Sequential / nn.ModuleDict. Fix: keep them in one "
                "(`self.blocks = nn.ModuleList([...])`) and loop over it in forward.")
    if single:
        where, cls = single[0]
        return (f"{head}: {where} holds a single block (`{cls}`), and a chain needs two or more blocks of one class "
                "in one container. Fix: route a model with two or more blocks (TREAD skips tokens past a run of "
                "blocks of a deeper model).")
    found = (f"its modules with submodules are {', '.join(f'`{p}` ({c})' for p, c in composite.items())}, no two "
             "of the same class" if composite else "it has no module with submodules")
    return (f"{head}: {found}. treadfx routes tokens around two or more blocks of one class held in an "
            "nn.ModuleList / nn.Sequential / nn.ModuleDict. If forward applies one block several times "
            "(weight-shared repetition), that is the problem: each step of a chain must be its own module. Fix: keep "
            "the transformer blocks in an nn.ModuleList (as DiT, diffusers and timm do); for shared weights, a "
            "ModuleList of thin wrapper modules that each call the shared block.")
