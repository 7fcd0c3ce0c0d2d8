"""The live stage: turn the routed analysis graph into a graph that runs the user's modules *now*.

The analysis graph inlines every module the forward calls (so the layout and
planning stages can see inside patch embedders, RoPE helpers and the code
between blocks).  Executing it would freeze those modules as they were at
trace time.  :func:`make_live` instead keeps only the code on the path from the
root to the routed blocks and the route ops, and turns every other module call
back into one ``call_module`` node that looks the module up *by its attribute
path on the live model at every call*:

* a replaced module (``model.final_layer.linear = ...``, a LoRA layer injected
  by peft), a reassigned parameter or ``load_state_dict(assign=True)`` is the
  one that runs at the next call;
* the module's hooks (REPA feature capture, logging) fire once per real call
  with the real tensors, as without treadfx;
* a ``torch.compile``d submodule runs compiled;
* a call that the forward wrapped in ``torch.utils.checkpoint`` (directly or
  through diffusers' ``_gradient_checkpointing_func``) stays checkpointed, with
  the same options.

What stays inlined (the root's own forward, and modules whose forward calls
the routed blocks) is guarded by :class:`LiveGuard`: its Python attributes,
children, parameters and hooks are compared at every call, and a change makes
the caller retrace instead of serving a stale graph.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .errors import LiveModelError
from .outputs import flatten_output, leaf_accessors, pick
from .tracing import CallRecord, TracedProgram

__all__ = ["make_live", "LiveGuard", "CheckpointedCall", "inlined_calls"]


class CheckpointedCall(nn.Module):
    """Calls a module through ``torch.utils.checkpoint.checkpoint`` with the options the forward used."""

    def __init__(self, options: dict):
        super().__init__()
        self.options = dict(options)

    def forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        opts = self.options
        if opts.get("use_reentrant", False):
            return torch.utils.checkpoint.checkpoint(
                module, *args, use_reentrant=True, preserve_rng_state=opts.get("preserve_rng_state", True))
        extra = {k: opts[k] for k in ("context_fn", "determinism_check", "debug") if k in opts}
        return torch.utils.checkpoint.checkpoint(
            module, *args, use_reentrant=False, preserve_rng_state=opts.get("preserve_rng_state", True),
            **extra, **kwargs)

    def extra_repr(self) -> str:
        return f"use_reentrant={self.options.get('use_reentrant', False)}"


def inlined_calls(block_nodes: list[fx.Node]) -> set[int]:
    """Calls whose code must stay in the graph: those that (transitively) call a block of the chain."""
    out: set[int] = set()
    for n in block_nodes:
        out.update(n.meta.get("treadfx_scope", ()))
    return out


class _Collapser:
    def __init__(self, graph: fx.Graph, root: nn.Module, calls: list[CallRecord], val_map: dict):
        self.graph = graph
        self.root = root
        self.calls = calls
        self.val_map = val_map
        self._param_paths: dict[int, str] | None = None

    def node_of(self, proxy: fx.Proxy) -> fx.Node:
        """The node of this trace value in the graph being collapsed (not collapsible if it has none)."""
        node = self.val_map.get(proxy.node)
        if node is None:
            raise _NotCollapsible
        return node

    def constant_node(self, value: Any, before: fx.Node) -> Any:
        """A get_attr node for a tensor or module of the model (looked up live), or the constant itself."""
        if isinstance(value, (torch.Tensor, nn.Module)):
            path = self._path_of(value)
            if path is None:
                raise _NotCollapsible
            with self.graph.inserting_before(before):
                return self.graph.get_attr(path)
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(Ellipsis))):
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self.constant_node(v, before) for v in value) if not hasattr(value, "_fields") \
                else value
        raise _NotCollapsible

    def _path_of(self, value: Any) -> str | None:
        if self._param_paths is None:
            paths: dict[int, str] = {}
            for name, m in self.root.named_modules(remove_duplicate=False):
                paths.setdefault(id(m), name)
            for name, t in self.root.named_parameters(remove_duplicate=False):
                paths.setdefault(id(t), name)
            for name, t in self.root.named_buffers(remove_duplicate=False):
                paths.setdefault(id(t), name)
            self._param_paths = paths
        return self._param_paths.get(id(value))

    def collapse(self, call: CallRecord, inner: list[fx.Node]) -> bool:
        try:
            self._collapse(call, inner)
            return True
        except _NotCollapsible:
            return False

    def _collapse(self, call: CallRecord, inner: list[fx.Node]) -> None:
        inner_set = set(inner)
        first = inner[0] if inner else None
        leaves, spec = pytree.tree_flatten((tuple(call.args), dict(call.kwargs)))
        mapped = [self.node_of(leaf) if isinstance(leaf, fx.Proxy) else leaf for leaf in leaves]
        arg_nodes = {n for n in mapped if isinstance(n, fx.Node)}
        out_leaves, out_spec = flatten_output(call.result)
        if any(isinstance(leaf, torch.Tensor) for leaf in out_leaves):
            raise _NotCollapsible  # a constant tensor returned: keep the inlined code
        out_nodes = [self.node_of(leaf) if isinstance(leaf, fx.Proxy) else None for leaf in out_leaves]
        if first is None:  # the call recorded nothing (returns its input or constants): nothing to run live
            anchor = next((n for n in arg_nodes), None)
            if anchor is None:
                raise _NotCollapsible
            first = anchor.next
        # the call may only read its own arguments (and model attributes) from outside
        for n in inner:
            for i in n.all_input_nodes:
                if i not in inner_set and i not in arg_nodes and i.op != "get_attr":
                    raise _NotCollapsible
            for u in n.users:
                if u not in inner_set and n not in out_nodes:
                    raise _NotCollapsible
        # a tensor or module of the model given as an argument is looked up live
        mapped = [self.constant_node(v, first) if not isinstance(v, fx.Node) else v for v in mapped]
        args, kwargs = pytree.tree_unflatten(mapped, spec)
        scope = tuple(s for s in (first.meta.get("treadfx_scope", ()) if first.op != "output" else ())
                      if s != call.index)
        with self.graph.inserting_before(first):
            node = self.graph.call_module(call.path, tuple(args), dict(kwargs))
        node.meta["treadfx_scope"] = scope
        node.meta["treadfx_live"] = call.path
        if call.checkpoint is not None:
            node.meta["treadfx_checkpoint"] = call.checkpoint
        node.meta["val"] = pytree.tree_map(
            lambda x: x.node.meta.get("val") if isinstance(x, fx.Proxy) else x, call.result,
            is_leaf=lambda x: isinstance(x, fx.Proxy))
        paths = leaf_accessors(out_spec)
        replacement: dict[fx.Node, fx.Node] = {}
        cursor = node
        for n, path in zip(out_nodes, paths):
            if n is None or n not in inner_set or n in replacement:
                continue
            if not path:
                replacement[n] = node
                continue
            with self.graph.inserting_after(cursor):
                if all(kind == "item" for kind, _ in path) and len(path) == 1:
                    new = self.graph.call_function(operator.getitem, (node, path[0][1]))
                else:
                    new = self.graph.call_function(pick, (node, tuple(path)))
            new.meta = {k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")}
            new.meta["treadfx_scope"] = scope
            replacement[n] = new
            cursor = new
        for old, new in replacement.items():
            for u in list(old.users):
                if u not in inner_set:
                    u.replace_input_with(old, new)
        for n in reversed(inner):
            self.graph.erase_node(n)


class _NotCollapsible(Exception):
    pass


@dataclasses.dataclass
class LiveProgram:
    """The executable graph module and what it was built from."""

    gm: fx.GraphModule
    live_calls: list[str]  # module paths called live
    inlined: list[str]  # module paths whose code stays in the graph (guarded)
    checkpointed: list[str]


def make_live(analysis_gm: fx.GraphModule, prog: TracedProgram, model: nn.Module,
              block_nodes: list[fx.Node]) -> LiveProgram:
    """A graph module that runs the routed graph with every non-routing module called live on ``model``.

    Guarantees: the result computes what ``analysis_gm`` computes; every module
    call that does not (transitively) call a routed block is a single
    ``call_module`` node resolved on ``model`` at call time (hooks, replaced
    modules and compiled wrappers included); checkpointed calls stay
    checkpointed; ``analysis_gm`` is not modified.
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(analysis_gm.graph, val_map)
    graph.output(out)
    ancestors = inlined_calls(block_nodes)
    holder = nn.Module()  # the live model as ``m`` beside the route ops; the model itself is not touched
    for name, sub in analysis_gm.named_children():
        if name != prog.model_root:
            holder.add_module(name, sub)
    holder.add_module(prog.model_root, model)
    for n in analysis_gm.graph.nodes:  # constants the trace stored on the graph module (tensors, numpy arrays)
        if n.op == "get_attr" and "." not in n.target and not hasattr(holder, n.target):
            setattr(holder, n.target, getattr(analysis_gm, n.target))
    collapser = _Collapser(graph, holder, prog.calls, val_map)
    members: dict[int, list[fx.Node]] = {}
    top_of: dict[int, int] = {}
    for call in prog.calls:
        parent = call.parent
        if call.index in ancestors:
            continue
        if parent is None or parent in ancestors:
            top_of[call.index] = call.index
        elif parent in top_of:
            top_of[call.index] = top_of[parent]
    for n in graph.nodes:
        if n.op == "get_attr":
            continue  # model attributes are free to read anywhere
        for s in n.meta.get("treadfx_scope", ()):
            if s in top_of and top_of[s] == s:
                members.setdefault(s, []).append(n)
                break
    live, kept = [], []
    for call in prog.calls:
        if top_of.get(call.index) != call.index:
            continue
        if collapser.collapse(call, members.get(call.index, [])):
            live.append(call.path)
        else:
            kept.append(call)
    checkpointed = []
    for n in list(graph.nodes):
        opts = n.meta.get("treadfx_checkpoint")
        if n.op != "call_module" or opts is None:
            continue
        name = f"treadfx_checkpoint{len(checkpointed)}"
        holder.add_module(name, CheckpointedCall(opts))
        with graph.inserting_before(n):
            mod = graph.get_attr(n.target)
        n.args = (mod,) + tuple(n.args)
        checkpointed.append(str(n.target))
        n.target = name
    graph.eliminate_dead_code(is_impure_node=_impure)
    gm = fx.GraphModule(holder, graph, class_name=f"Live{type(model).__name__}")
    gm._modules[prog.model_root] = model  # every module path resolves on the live model
    gm.graph.lint()
    inlined = sorted({c.path for c in prog.calls if c.index in ancestors} | {c.path for c in kept})
    return LiveProgram(gm, live, inlined, checkpointed)


def _impure(node: fx.Node) -> bool:
    """Only the accessors this stage creates and unused attribute reads may be dropped (random ops never)."""
    if node.op == "get_attr":
        return False
    return not (node.op == "call_function" and node.target in (operator.getitem, pick))


# ----------------------------------------------------------------------------------------------- guards

_SIMPLE = (bool, int, float, str, type(None))
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_STRUCT = ("_modules", "_parameters", "_buffers")
_SKIP = frozenset(_STRUCT + _HOOK_DICTS + ("_treadfx", "_state_dict_hooks", "_state_dict_pre_hooks",
                                          "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                                          "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                          "_forward_pre_hooks_with_kwargs", "_non_persistent_buffers_set",
                                          "_is_full_backward_hook"))
#: attributes torch itself sets on a module it wraps, not the user's (``torch.compile(model)``)
_TORCH_MARKS = frozenset({"_is_torch_compile"})


def _size(d: dict) -> int:
    """The number of attributes of a module's ``__dict__``, without the marks torch sets on it."""
    return len(d) - sum(1 for k in _TORCH_MARKS if k in d)


class LiveGuard:
    """What the inlined code read from the user's modules, checked at every call (a few microseconds).

    Fails when an inlined module gets a new or changed Python attribute (a flag
    such as ``gradient_checkpointing``), a replaced child, parameter or buffer,
    or a hook.  A failing guard makes the caller retrace: the graph never
    serves values that are no longer the model's.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], root: nn.Module):
        self.entries = []
        for path, m in modules:
            d = m.__dict__
            # treadfx's own state on the model (``_treadfx``, ``_treadfx_methods``) is not the user's
            attrs = tuple((k, v) for k, v in d.items() if k not in _SKIP and k not in _TORCH_MARKS
                          and not k.startswith("_treadfx"))
            struct = tuple(tuple(d[s].values()) if s in d else () for s in _STRUCT)
            hooks = tuple(len(d.get(h) or ()) for h in _HOOK_DICTS)
            self.entries.append((path, m, d, _size(d), attrs, struct, hooks))
        self.root = root

    def check(self) -> str | None:
        """None when nothing changed, else a short description of the first change."""
        for path, m, d, size, attrs, struct, hooks in self.entries:
            if len(d) != size and _size(d) != size:
                return f"`{path or 'model'}` gained or lost an attribute"
            for k, v in attrs:
                cur = d.get(k, _MISSING)
                if _plain(v):  # compared by value (also what torch.compile can trace: no `is` on tuples)
                    if type(cur) is not type(v) or cur != v:
                        return f"`{path or 'model'}.{k}` changed"
                elif cur is not v:
                    return f"`{path or 'model'}.{k}` changed"
            for s, saved in zip(_STRUCT, struct):
                cur = d.get(s)
                if cur is None:
                    continue
                if len(cur) != len(saved) or any(a is not b for a, b in zip(cur.values(), saved)):
                    return f"a child, parameter or buffer of `{path or 'model'}` was replaced"
            if tuple(len(d.get(h) or ()) for h in _HOOK_DICTS) != hooks:
                return f"hooks of `{path or 'model'}` changed"
        return None


_MISSING = object()


def _plain(v: Any) -> bool:
    """A Python constant compared by value: a simple scalar or string, or a tuple of them."""
    return type(v) in _SIMPLE or (type(v) is tuple and all(type(e) in _SIMPLE for e in v))


def check_inlined_hooks(modules: list[tuple[str, nn.Module]]) -> None:
    """Hooks on a module whose forward the graph inlines could never fire: refuse them with advice."""
    for path, m in modules:
        if not path:
            continue  # the transformed model itself: its hooks run around the routed forward
        names = [h for h in _HOOK_DICTS if m.__dict__.get(h)]
        if names:
            raise LiveModelError(
                f"`{path}` has {', '.join(names)} registered, but its forward calls the routed blocks, so treadfx "
                "runs its code inside the routed graph and its hooks could not fire. Fix: register the hook on the "
                "blocks themselves, on a module they call, or on the transformed model."
            )
