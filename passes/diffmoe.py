"""DiffMoE ("Dynamic Token Selection for Scalable Diffusion Transformers") as a treadfx pass.

``treadfx.diffmoe(model, ...)`` replaces the feed-forward network (FFN) of the
repeated blocks with a :class:`treadfx.moe.DiffMoELayer`.  The FFN of a block
is found through the block's graph, never by name:

1. *candidates*: children of the block (the first level of the module tree
   that has any) that are token-wise MLPs: two or more ``nn.Linear`` from
   ``D`` to ``H`` ... back to ``D``, and a numerical probe on ``[2, 3, D]``
   shows that the output is ``[2, 3, D]``, that changing one token changes
   only that token's output and that permuting tokens permutes outputs;
2. *graph*: the block is traced with its children as leaves (treadfx's
   specialising tracer on the block's real input signature when
   ``example_inputs`` are given; ``torch.fx`` symbolic tracing otherwise),
   and a candidate is kept only if its call takes a tensor derived from the
   block's token input (``[..., D]`` with the same ``D`` when shapes are
   known) and feeds the block output.  When the block cannot be traced
   without inputs (diffusers blocks branch on ``x.ndim``), the structural
   candidates alone decide.  Which rule decided is recorded per block
   (``DiffMoEPass.matches``; the converted model keeps them in
   ``model._treadfx_diffmoe_matches``).

3. *inline*: when no submodule is an FFN, the block's forward is traced with
   ``torch.fx`` (children as leaves, in training and in eval mode) and a
   ``Linear(D->H) -> activation -> Linear(H->D)`` subgraph is looked for
   (``nn.Linear`` or ``F.linear`` on block parameters; GELU of any
   ``approximate``, SiLU, ReLU, ...; also ``act(Linear_g(x)) * Linear_u(x)``
   and ``a * act(g)`` of one chunked Linear).  It is cut out into an
   ``InlineFFN`` module, the DiffMoE layer built from it is registered as
   ``<block>.ffn``, and the block runs its rewritten graph (the subgraph is
   one call of the layer; see :class:`GraphForward` and
   :func:`inline_ffn_subclass`).

Exactly one FFN per block, or :class:`~treadfx.FFNNotFoundError` naming the
block and a fix that fits (``ffn=``; move the FFN into a submodule when the
forward does not trace; FFNs fused with attention, as in Flux single-stream
blocks, are refused).
"""

from __future__ import annotations

import dataclasses
import inspect as _inspect
import operator as _operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from treadfx.blocks import find_block_candidates
from treadfx.config import DiffMoEConfig  # the public config class (treadfx.DiffMoEConfig)
from treadfx.errors import FFNNotFoundError, NoBlocksFoundError, TransformError
from treadfx.graph_walk import depends_on, feeds_output
from treadfx.moe import DiffMoELayer
from treadfx.tracing import trace
from treadfx.transformed import is_transformed, state_of

__all__ = ["DiffMoEPass", "DiffMoEConfig", "FFNMatch", "find_ffn", "tokenwise_mlp_dims", "diffmoe_block_indices", "GraphForward",
           "inline_ffn_subclass"]


@dataclasses.dataclass
class FFNMatch:
    """The feed-forward submodule found in one block."""

    block_index: int
    block_path: str
    name: str          # path inside the block, e.g. "mlp" or "ff"
    dim: int           # D
    hidden: int        # output features of the first Linear (H, or 2H for gated FFNs)
    how: str           # "ffn= override", "graph (traced on example inputs)", "graph (torch.fx)", "structure",
                       # "inline (torch.fx)": an FFN written in the block's forward, rewritten into a call of `name`
    inline: tuple | None = None  # for inline FFNs: (kind, Linear paths in the block) identifying the subgraph

    @property
    def path(self) -> str:
        return f"{self.block_path}.{self.name}"


# ----------------------------------------------------------------------------------- token-wise MLP


def tokenwise_mlp_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(D, H)`` if ``module`` is a token-wise MLP ``Linear(D, H) ... Linear(., D)``, else None.

    Guarantees: for a module on a real device the answer is backed by a
    numerical probe in eval mode (shape kept, each output token depends on its
    own input token only, the same function at every position); the module's
    training flags are restored and nothing else is changed.  Meta-device
    modules are judged by structure only.
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or linears[0].in_features != linears[-1].out_features:
        return None
    D, H = linears[0].in_features, linears[0].out_features
    w = linears[0].weight
    if w.device.type == "meta":
        return D, H
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, D, generator=g).to(w.device, w.dtype)
        x2 = x.clone()
        x2[1, 2] = torch.randn(D, generator=g).to(w.device, w.dtype)
        perm = torch.randperm(6, generator=g).to(w.device)
        with torch.no_grad():
            y = module(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return None
            y2 = module(x2)
            yp = module(x.reshape(6, D)[perm].reshape(2, 3, D))
        tol = (1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2) * (1 + float(y.abs().max()))
        diff = (y2 - y).abs().amax(-1)
        changed = diff > tol
        if not bool(changed[1, 2]) or int(changed.sum()) != 1:
            return None
        if float((yp.reshape(6, D) - y.reshape(6, D)[perm]).abs().max()) > tol:
            return None
        return D, H
    except Exception:
        return None
    finally:
        for m, f in flags:
            m.training = f


def _candidates(block: nn.Module) -> dict[str, tuple[int, int]]:
    """Token-wise MLP children of ``block``; if no child is one, the first deeper level that has any."""
    level = [(n, c) for n, c in block.named_children()]
    while level:
        found = {}
        for name, child in level:
            dims = tokenwise_mlp_dims(child)
            if dims is not None:
                found[name] = dims
        if found:
            return found
        level = [(f"{n}.{cn}", cc) for n, c in level for cn, cc in c.named_children()]
    return {}


# ----------------------------------------------------------------------------------- block graphs


class _ChildLeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[nn.Module]):
        super().__init__()
        self._leaf_ids = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaf_ids or super().is_leaf_module(m, qualname)


def _leaf_names(block: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    return [block.get_submodule(n) for n in names]


def _graph_filter_fx(block: nn.Module, cands: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]] | None:
    """Candidates whose call takes the block's first input (the tokens) and feeds its output; None if untraceable."""
    try:
        tracer = _ChildLeafTracer(_leaf_names(block, list(cands)) + list(block.children()))
        graph = tracer.trace(block)
    except Exception:
        return None
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if not phs:
        return None
    tokens = {phs[0]}
    keep = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in cands and node.args and isinstance(node.args[0], fx.Node):
            if depends_on(node.args[0], tokens) and feeds_output(node):
                keep[node.target] = cands[node.target]
    return keep


def _graph_filter_traced(block: nn.Module, cands: dict[str, tuple[int, int]], args: tuple, kwargs: dict
                         ) -> dict[str, tuple[int, int]] | None:
    """Like :func:`_graph_filter_fx`, on the block traced with its real (fake) input signature: the call's
    input is ``[..., D]``, derived from a ``[..., D]`` block input, and its output has the input's shape."""
    try:
        prog = trace(block, type(block).forward, args, kwargs,
                     leaves=_leaf_names(block, list(cands)) + list(block.children()))
    except Exception:
        return None
    keep = {}
    phs = [n for n in prog.gm.graph.nodes if n.op == "placeholder"]
    for node in prog.gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target).removeprefix(prog.model_root + ".")
        if name not in cands or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        D = cands[name][0]
        inp, out = node.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor)):
            continue
        if inp.ndim < 2 or inp.shape[-1] != D or out.shape != inp.shape:
            continue
        token_inputs = {p for p in phs if isinstance(p.meta.get("val"), torch.Tensor)
                        and p.meta["val"].ndim >= 2 and p.meta["val"].shape[-1] == D}
        if depends_on(node.args[0], token_inputs) and feeds_output(node):
            keep[name] = cands[name]
    return keep


def _block_inputs(model: nn.Module, blocks: Sequence[nn.Module], args: tuple, kwargs: dict) -> dict[int, tuple]:
    """Fake ``(args, kwargs)`` of every call of each block, from one trace of the model with blocks as leaves."""
    forward = state_of(model).original_forward if is_transformed(model) else type(model).forward
    prog = trace(model, forward, tuple(args), dict(kwargs), leaves=list(blocks))
    by_id = {id(b): b for b in blocks}
    out: dict[int, tuple] = {}
    for node in prog.gm.graph.nodes:
        if node.op == "call_module":
            mod = prog.gm.get_submodule(node.target)
            if id(mod) in by_id and id(mod) not in out:
                a, k = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
                out[id(mod)] = (tuple(a), dict(k))
    return out


def find_ffn(block: nn.Module, block_path: str, block_index: int = 0, ffn: str | None = None,
             block_call: tuple | None = None) -> FFNMatch:
    """The feed-forward submodule of ``block`` (see the module docstring for the rule).

    Raises :class:`~treadfx.FFNNotFoundError` naming the block when there is
    none or more than one, or when ``ffn`` names no suitable submodule.
    """
    cls = type(block).__name__
    if ffn is not None:
        try:
            sub = block.get_submodule(ffn)
        except AttributeError:
            children = ", ".join(n for n, _ in block.named_children())
            raise FFNNotFoundError(
                f"ffn={ffn!r} is not a submodule of block `{block_path}` ({cls}), whose children are: {children}. "
                f"Fix: pass the path of the feed-forward module inside each block, e.g. ffn='mlp'."
            ) from None
        if isinstance(sub, nn.Linear):  # the first Linear of an FFN written inline in the block's forward
            try:
                inline = _inline_ffns(block, _trace_block(block))
            except Exception:
                inline = {}
            for key, plans in inline.items():
                if key[1][0] == ffn:
                    plan = next(iter(plans.values()))
                    return FFNMatch(block_index, block_path, _layer_name(block), plan.dim, plan.hidden,
                                    "ffn= override (inline)", key)
        linears = [m for m in sub.modules() if isinstance(m, nn.Linear)]
        if not linears or linears[0].in_features != linears[-1].out_features:
            raise FFNNotFoundError(
                f"ffn={ffn!r} in block `{block_path}` ({cls}) is a {type(sub).__name__} without a Linear D->...->D "
                "path, so it cannot be copied into experts of the same shape. Fix: name the feed-forward module "
                "(Linear D->H, activation, Linear H->D)."
            )
        return FFNMatch(block_index, block_path, ffn, linears[0].in_features, linears[0].out_features, "ffn= override")
    cands = _candidates(block)
    how = "structure"
    found = cands
    if cands:
        graph = None
        if block_call is not None:
            graph = _graph_filter_traced(block, cands, *block_call)
            how = "graph (traced on example inputs)"
        if graph is None:
            graph = _graph_filter_fx(block, cands)
            how = "graph (torch.fx)"
        if graph is None:
            how = "structure"
        else:
            found = graph
    if not found:
        return _find_inline(block, block_path, block_index)
    if len(found) > 1:
        names = ", ".join(f"`{n}`" for n in found)
        raise FFNNotFoundError(
            f"block `{block_path}` ({cls}) has several feed-forward candidates: {names}. "
            f"Fix: name one with treadfx.diffmoe(..., ffn='{next(iter(found))}')."
        )
    name, (D, H) = next(iter(found.items()))
    return FFNMatch(block_index, block_path, name, D, H, how)


# ----------------------------------------------------------------------------------- feed-forwards written inline

_ACT_MODULES = (nn.GELU, nn.SiLU, nn.ReLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish)
_ACT_FUNCTIONS = {F.gelu, F.silu, F.relu, F.mish, F.leaky_relu, F.elu, F.hardswish, torch.relu, torch.sigmoid,
                  torch.tanh, torch.sigmoid, torch._C._nn.gelu}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
_MUL = {_operator.mul, torch.mul}


@dataclasses.dataclass
class _InlinePlan:
    """One Linear -> activation -> Linear subgraph (or its gated form) in a block's traced graph."""

    kind: str                 # "linear-act-linear", "gated", "gated (chunk)"
    x: fx.Node                # the FFN's input
    nodes: list[fx.Node]      # the FFN's nodes in graph order, the output last
    linears: list[str]        # Linear paths in the block (a module path, or the weight's path for F.linear)
    dim: int
    hidden: int

    @property
    def key(self) -> tuple:
        return (self.kind, tuple(self.linears))


def _linear_info(block: nn.Module, node: fx.Node) -> tuple[str, int, int] | None:
    """(path, in_features, out_features) of a Linear call: an ``nn.Linear`` submodule or ``F.linear`` on block
    parameters; None for anything else."""
    if node.op == "call_module":
        mod = block.get_submodule(str(node.target))
        if isinstance(mod, nn.Linear) and len(node.args) == 1 and not node.kwargs:
            return str(node.target), mod.in_features, mod.out_features
        return None
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS and len(node.args) >= 2:
        w = node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (b is None or (
                isinstance(b, fx.Node) and b.op == "get_attr")):
            return None
        weight = _attr(block, str(w.target))
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            return None
        return str(w.target), int(weight.shape[1]), int(weight.shape[0])
    return None


def _attr(block: nn.Module, path: str) -> Any:
    parent, _, name = path.rpartition(".")
    return getattr(block.get_submodule(parent) if parent else block, name)


def _is_act(block: nn.Module, node: fx.Node) -> bool:
    """An elementwise activation of one tensor (other arguments constants: GELU's ``approximate``)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_module":
        return isinstance(block.get_submodule(str(node.target)), _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in _ACT_METHODS


def _is_dropout(block: nn.Module, node: fx.Node) -> bool:
    """An ``nn.Dropout`` module call, or ``F.dropout`` of one tensor with a constant ``p`` (its ``training`` flag,
    frozen by the trace, is dropped: the cut-out FFN gets an ``nn.Dropout(p)``, which follows the mode)."""
    if node.op == "call_module":
        return isinstance(block.get_submodule(str(node.target)), nn.Dropout) and len(node.args) == 1 \
            and not node.kwargs
    return node.op == "call_function" and node.target is F.dropout and len(node.all_input_nodes) == 1 \
        and isinstance(_dropout_p(node), (int, float))


def _dropout_p(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)


def _only_used_by(nodes: Sequence[fx.Node], inside: set) -> bool:
    return all(all(u in inside for u in n.users) for n in nodes)


def _match_at(block: nn.Module, out: fx.Node) -> _InlinePlan | None:
    """The inline FFN ending at the Linear call ``out``, if there is one."""
    last = _linear_info(block, out)
    if last is None or not isinstance(out.args[0], fx.Node):
        return None
    h = out.args[0]
    extra = []
    if _is_dropout(block, h):
        extra, h = [h], h.args[0]
    if _is_act(block, h):  # Linear -> activation -> Linear
        first = h.args[0]
        info = _linear_info(block, first)
        if info is None or not isinstance(first.args[0], fx.Node):
            return None
        nodes, kind, linears, hidden = [first, h] + extra + [out], "linear-act-linear", [info[0], last[0]], info[2]
        ok = info[2] == last[1]
    elif h.op == "call_function" and h.target in _MUL and len(h.args) == 2 and all(
            isinstance(a, fx.Node) for a in h.args):  # gated: act(Linear_g(x)) * Linear_u(x) -> Linear
        act, other = h.args if _is_act(block, h.args[0]) else (h.args[1], h.args[0])
        if not _is_act(block, act):
            return None
        gate_in = act.args[0]
        g_info, u_info = _linear_info(block, gate_in), _linear_info(block, other)
        if g_info is not None and u_info is not None and gate_in.args[0] is other.args[0]:
            first = gate_in
            nodes = sorted([gate_in, other, act, h] + extra + [out], key=_order(out.graph))
            kind, linears, hidden = "gated", [g_info[0], u_info[0], last[0]], g_info[2]
            info = g_info
            ok = g_info[2] == u_info[2] == last[1] and g_info[1] == u_info[1]
        else:  # one Linear whose output is chunked in two: act(a) * b
            chunk = _chunk_source(gate_in, other)
            info = _linear_info(block, chunk.args[0]) if chunk is not None and isinstance(chunk.args[0], fx.Node) \
                else None
            if info is None:
                return None
            first = chunk.args[0]
            nodes = sorted([first, chunk, gate_in, other, act, h] + extra + [out], key=_order(out.graph))
            kind, linears, hidden = "gated (chunk)", [info[0], last[0]], info[2]
            ok = info[2] == 2 * last[1]
    else:
        return None
    x = first.args[0]
    if not ok or not isinstance(x, fx.Node) or info[1] != last[2] or not _only_used_by(nodes[:-1], set(nodes)):
        return None
    return _InlinePlan(kind, x, nodes, linears, info[1], hidden)


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


def _chunk_source(a: fx.Node, b: fx.Node) -> fx.Node | None:
    """The ``chunk(2, dim=-1)`` node when ``a`` and ``b`` are its two halves."""
    if not all(n.op == "call_function" and n.target is _operator.getitem for n in (a, b)):
        return None
    src = a.args[0]
    if src is not b.args[0] or {a.args[1], b.args[1]} != {0, 1} or not isinstance(src, fx.Node):
        return None
    chunks = src.args[1] if len(src.args) > 1 else src.kwargs.get("chunks")
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    is_chunk = (src.op == "call_method" and src.target == "chunk") or (
        src.op == "call_function" and src.target is torch.chunk)
    return src if is_chunk and chunks == 2 and dim in (-1,) and len(src.users) == 2 else None


def _trace_block(block: nn.Module) -> dict[bool, fx.Graph]:
    """The block's forward traced by ``torch.fx`` with its children as leaves, in training and in eval mode
    (one graph when both are the same).  Raises what tracing raises."""
    flags = [(m, m.training) for m in block.modules()]
    graphs: dict[bool, fx.Graph] = {}
    try:
        for mode in (True, False):
            block.train(mode)
            graphs[mode] = _ChildLeafTracer(list(block.children())).trace(block)
    finally:
        for m, f in flags:
            m.training = f
    if graphs[True].python_code("self").src == graphs[False].python_code("self").src:
        return {True: graphs[True]}
    return graphs


def _inline_ffns(block: nn.Module, graphs: dict[bool, fx.Graph]) -> dict[tuple, dict[bool, _InlinePlan]]:
    """Inline FFNs (key -> plan per graph) found in every graph, taking the block's token input (its first input)
    and feeding its output."""
    found: dict[tuple, dict[bool, _InlinePlan]] = {}
    for mode, graph in graphs.items():
        phs = [n for n in graph.nodes if n.op == "placeholder"]
        for node in graph.nodes:
            plan = _match_at(block, node)
            if plan is None or not phs or not depends_on(plan.x, {phs[0]}) or not feeds_output(node):
                continue
            found.setdefault(plan.key, {})[mode] = plan
    def signature(plan: _InlinePlan) -> list:
        pos = {n: i for i, n in enumerate(plan.nodes)}
        return [("dropout", _dropout_p(n)) if n.op == "call_function" and n.target is F.dropout else
                (n.op, str(n.target), repr(fx.node.map_arg((n.args, n.kwargs), lambda a: pos.get(a, -1))))
                for n in plan.nodes]

    # the same FFN in every mode's graph (one module is cut out for both)
    return {k: v for k, v in found.items() if len(v) == len(graphs)
            and all(signature(p) == signature(next(iter(v.values()))) for p in v.values())}


def _fused_ffn(block: nn.Module, graphs: dict[bool, fx.Graph]) -> str | None:
    """Why the block's MLP is fused with attention (an activation fed by part of a Linear's output, or whose
    output is concatenated with another tensor into a Linear), or None."""
    graph = next(iter(graphs.values()))
    parts = {"split", "chunk", "narrow", "tensor_split", "unbind", "split_with_sizes"}

    def linear_behind(n: fx.Node) -> str | None:
        """The Linear whose output ``n`` is a part of (through indexing / split ops), or None."""
        went = False
        for _ in range(4):
            if went:
                info = _linear_info(block, n)
                if info is not None:
                    return info[0]
            name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
            if (n.target is _operator.getitem or name in parts) and n.args and isinstance(n.args[0], fx.Node):
                n, went = n.args[0], True
                continue
            return None
        return None

    for node in graph.nodes:
        if not _is_act(block, node):
            continue
        lin = linear_behind(node.args[0])
        if lin is not None:
            return (f"`{lin}` computes the MLP input together with other values (its output is split, and one part "
                    f"goes through the activation)")
        for user in node.users:
            if user.op == "call_function" and getattr(user.target, "__name__", "") in ("cat", "concat", "concatenate"):
                for lin_user in user.users:
                    info = _linear_info(block, lin_user)
                    if info is not None:
                        return (f"`{info[0]}` takes the MLP hidden state concatenated with another tensor (the "
                                f"attention output)")
    return None


def _sanitize(path: str) -> str:
    return path.replace(".", "_")


def _inline_ffn_module(block: nn.Module, plan: _InlinePlan) -> fx.GraphModule:
    """The inline FFN as its own module ``x -> y`` over the block's Linear (and activation) modules, not copies.

    Its submodules are named after their paths in the block (dots as underscores); an ``F.linear`` on block
    parameters becomes an ``nn.Linear`` holding those parameters, named after the weight (``w1.weight``)."""
    root: dict[str, Any] = {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {plan.x: graph.placeholder("x")}
    for node in plan.nodes:
        info = _linear_info(block, node) if node.op in ("call_module", "call_function") else None
        if info is not None and node.op == "call_function":
            w = _attr(block, info[0])
            b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            name = _sanitize(info[0].removesuffix(".weight").removesuffix("_weight") or info[0])
            lin = nn.Linear(info[1], info[2], bias=b_node is not None, device="meta")
            lin.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
            if b_node is not None:
                b = _attr(block, str(b_node.target))
                lin.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
            root[name] = lin
            env[node] = graph.call_module(name, (env[node.args[0]],))
        elif node.op == "call_function" and node.target is F.dropout:
            name = f"dropout{sum(1 for k in root if k.startswith('dropout'))}"
            root[name] = nn.Dropout(float(_dropout_p(node)))
            env[node] = graph.call_module(name, (env[node.args[0]],))
        elif node.op == "call_module":
            name = _sanitize(str(node.target))
            root[name] = block.get_submodule(str(node.target))
            env[node] = graph.call_module(name, fx.node.map_arg(node.args, lambda n: env[n]),
                                          fx.node.map_arg(node.kwargs, lambda n: env[n]))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[plan.nodes[-1]])
    return fx.GraphModule(root, graph, class_name="InlineFFN")


def _layer_name(block: nn.Module) -> str:
    name, i = "ffn", 1
    while hasattr(block, name):
        i += 1
        name = "ffn_moe" if i == 2 else f"ffn_moe{i - 1}"
    return name


def _graph_function(graph: fx.Graph):
    code = graph.python_code(root_module="self")
    globs = dict(code.globals)
    exec(compile(code.src, "<treadfx inline-FFN block forward>", "exec"), globs)
    return globs["forward"]


class GraphForward:
    """The forward of a block whose inline FFN became a DiffMoE layer: the block's ``torch.fx`` graph with that
    subgraph replaced by one call of the layer, called with the block as ``self`` (so the block's submodules,
    parameters and hooks stay the block's own).  When the forward traced differently in training and eval
    mode (``self.training`` branches), there is one graph per mode, chosen by ``block.training``.  It holds
    no reference to the block, so module-tree clones and deep copies share or copy it freely; ``code`` shows
    the generated forward."""

    def __init__(self, graphs: dict[bool, fx.Graph]):
        self.graphs = graphs
        self._compile()

    def _compile(self) -> None:
        self._fns = {mode: _graph_function(g) for mode, g in self.graphs.items()}
        self._single = next(iter(self._fns.values())) if len(self._fns) == 1 else None

    @property
    def code(self) -> str:
        return "\n".join(g.python_code("self").src for g in self.graphs.values())

    def __call__(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        fn = self._single if self._single is not None else self._fns[block.training]
        return fn(block, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"graphs": self.graphs}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compile()


_INLINE_SUBCLASSES: dict[type, type] = {}


def inline_ffn_subclass(cls: type) -> type:
    """The (cached) subclass of block class ``cls`` whose ``forward`` runs the instance's :class:`GraphForward`
    (``_treadfx_graph_forward``) when it has one, else ``cls.forward``.  It keeps ``cls``'s name, module and
    forward signature, so every block of the class (converted or dense) shares one type and chains of
    repeated blocks are found as before; instances deep-copy and pickle (rebuilt from ``cls``)."""
    sub = _INLINE_SUBCLASSES.get(cls)
    if sub is not None:
        return sub

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        graph_forward = self.__dict__.get("_treadfx_graph_forward")
        if graph_forward is None:
            return cls.forward(self, *args, **kwargs)
        return graph_forward(self, *args, **kwargs)

    try:
        forward.__signature__ = _inspect.signature(cls.forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass

    def __reduce_ex__(self, protocol):
        return _new_inline_block, (cls,), self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__

    sub = type(cls.__name__, (cls,), {"forward": forward, "__reduce_ex__": __reduce_ex__,
                                      "__module__": cls.__module__,
                                      "__qualname__": getattr(cls, "__qualname__", cls.__name__),
                                      "_treadfx_inline_base": cls})
    _INLINE_SUBCLASSES[cls] = sub
    return sub


def _new_inline_block(cls: type) -> nn.Module:
    """An empty instance of ``inline_ffn_subclass(cls)`` (unpickling and deep copies fill its state)."""
    return object.__new__(inline_ffn_subclass(cls))


def _convert_inline(block: nn.Module, key: tuple, make_layer) -> nn.Module:
    """Rewrite ``block``'s forward so that the inline FFN ``key`` is one call of ``make_layer(ffn_module)``,
    registered on the block; the FFN's Linear modules / parameters leave the block.  Returns the layer."""
    graphs = _trace_block(block)
    plans = _inline_ffns(block, graphs).get(key)
    if plans is None:
        raise FFNNotFoundError(f"the inline FFN {key} of `{type(block).__name__}` changed between analysis and "
                               "conversion. Fix: convert the model as analysed (do not modify it in between).")
    ffn = _inline_ffn_module(block, next(iter(plans.values())))
    layer = make_layer(ffn)
    name = _layer_name(block)
    for mode, plan in plans.items():
        graph = graphs[mode]
        with graph.inserting_before(plan.nodes[-1]):
            call = graph.call_module(name, (plan.x,))
        plan.nodes[-1].replace_all_uses_with(call)
        for node in reversed(plan.nodes):
            graph.erase_node(node)
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        graph.lint()
    block.add_module(name, layer)
    used = {str(n.target) for g in graphs.values() for n in g.nodes if n.op in ("call_module", "get_attr")}
    for n in plans[next(iter(plans))].nodes:
        targets = [str(n.target)] if n.op == "call_module" else []
        if n.op == "call_function" and n.target in _LINEAR_FUNCTIONS:
            targets = [str(a.target) for a in n.all_input_nodes if a.op == "get_attr"]
        for t in targets:
            if t not in used and not any(u.startswith(t + ".") for u in used):
                parent, _, attr = t.rpartition(".")
                delattr(block.get_submodule(parent) if parent else block, attr)
    block.__dict__["_treadfx_graph_forward"] = GraphForward(graphs)
    return layer



def _find_inline(block: nn.Module, block_path: str, block_index: int) -> FFNMatch:
    """The FFN written inline in the block's forward (no submodule is one), or FFNNotFoundError with advice that
    fits: none, several, fused with attention, or a forward ``torch.fx`` cannot trace."""
    cls = type(block).__name__
    try:
        graphs = _trace_block(block)
    except Exception as e:
        raise FFNNotFoundError(
            f"block `{block_path}` ({cls}) has no feed-forward submodule (no child is a token-wise MLP: Linear D->H, "
            f"activation, Linear H->D), and its forward does not trace with torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}), so an FFN written inline in it cannot be found. Fix: "
            f"move the feed-forward into a submodule (e.g. self.mlp = Mlp(...)), or name an existing one with "
            f"treadfx.diffmoe(..., ffn='<path inside the block>')."
        ) from None
    inline = _inline_ffns(block, graphs)
    if len(inline) == 1:
        key, plans = next(iter(inline.items()))
        plan = next(iter(plans.values()))
        return FFNMatch(block_index, block_path, _layer_name(block), plan.dim, plan.hidden, "inline (torch.fx)", key)
    if len(inline) > 1:
        names = "; ".join(" -> ".join(f"`{p}`" for p in key[1]) for key in inline)
        first = next(iter(inline))[1][0]
        raise FFNNotFoundError(
            f"block `{block_path}` ({cls}) has several feed-forwards written inline: {names}. "
            f"Fix: name one by its first Linear with treadfx.diffmoe(..., ffn='{first}')."
        )
    fused = _fused_ffn(block, graphs)
    if fused is not None:
        raise FFNNotFoundError(
            f"block `{block_path}` ({cls}) has its feed-forward fused with attention: {fused}. DiffMoE experts are "
            f"copies of a separate FFN (Linear D->H, activation, Linear H->D), and these Linears also compute "
            f"attention, so no expert can be cut out of them (Flux single-stream blocks are built this way). Fix: "
            f"convert a model whose blocks keep the MLP separate, or rewrite the block with separate attention and "
            f"MLP Linears first (a Linear on concatenated [attention, MLP] inputs equals the sum of two Linears "
            f"with its weight split by columns)."
        )
    raise FFNNotFoundError(
        f"block `{block_path}` ({cls}) has no feed-forward submodule: no child is a token-wise MLP "
        f"(Linear D->H, activation, Linear H->D) called on the block's [..., D] tokens, and its forward has no such "
        f"Linear -> activation -> Linear written inline. "
        f"Fix: name it with treadfx.diffmoe(..., ffn='<path inside the block>'), e.g. ffn='mlp'."
    )


# ----------------------------------------------------------------------------------- the pass


def diffmoe_block_indices(num_blocks: int, interleave: bool) -> list[int]:
    """Blocks that get a DiffMoE layer: all, or with ``interleave`` the odd ones (1, 3, 5, ...)."""
    return list(range(1, num_blocks, 2)) if interleave else list(range(num_blocks))


class DiffMoEPass:
    """Finds the FFN of each selected block (``analyse``) and swaps in DiffMoE layers (``apply``).

    ``matches`` lists, per converted block, the FFN found and which rule found it.
    """

    def __init__(self, config: DiffMoEConfig):
        if not isinstance(config, DiffMoEConfig):
            raise TransformError(f"DiffMoEPass takes a treadfx.DiffMoEConfig, got {type(config).__name__}. "
                                 "Fix: DiffMoEPass(treadfx.DiffMoEConfig(num_experts=..., ...)).")
        config.validate()
        self.config = config
        self.matches: list[FFNMatch] = []

    def analyse(self, model: nn.Module, example_inputs: tuple | None = None,
                example_kwargs: dict | None = None) -> list[FFNMatch]:
        """Find the FFN of every block to convert; raises before anything is changed."""
        candidates = find_block_candidates(model)
        if not candidates:
            raise NoBlocksFoundError(
                f"{type(model).__name__} has no repeated blocks: no ModuleList/Sequential holds two or more "
                "submodules of the same class, so treadfx.diffmoe has no FFNs to convert. Fix: keep the transformer "
                "blocks in an nn.ModuleList (as DiT, diffusers and timm do)."
            )
        calls: dict[int, tuple] = {}
        if example_inputs is not None:
            calls = _block_inputs(model, [c.module for c in candidates], tuple(example_inputs),
                                  dict(example_kwargs or {}))
        self.matches = []
        for i in diffmoe_block_indices(len(candidates), self.config.interleave):
            c = candidates[i]
            self.matches.append(find_ffn(c.module, c.path, i, self.config.ffn, calls.get(id(c.module))))
        return self.matches

    def apply(self, model: nn.Module) -> list[DiffMoELayer]:
        """Replace each analysed FFN of ``model`` (same module paths) by a DiffMoE layer built from it."""
        cfg = self.config
        gen = torch.Generator()
        gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ())))
        layers = []
        inline_classes: set[type] = set()
        for m in self.matches:
            if m.inline is not None:
                def make(ffn, m=m):
                    return DiffMoELayer(ffn, m.dim, cfg.num_experts, cfg.capacity, cfg.shared_expert,
                                        cfg.predictor_loss_weight, cfg.threshold_decay, cfg.noise_std, gen,
                                        **cfg.layer_options)
                block = model.get_submodule(m.block_path)
                inline_classes.add(type(block))
                layers.append(_convert_inline(block, m.inline, make))
                continue
            parent_path, _, attr = m.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            ffn = getattr(parent, attr)
            layer = DiffMoELayer(ffn, m.dim, cfg.num_experts, cfg.capacity, cfg.shared_expert,
                                 cfg.predictor_loss_weight, cfg.threshold_decay, cfg.noise_std, gen,
                                 **cfg.layer_options)
            setattr(parent, attr, layer)
            layers.append(layer)
        for mod in model.modules():  # every block of a rewritten class (dense ones too) gets the same type
            if type(mod) in inline_classes:
                mod.__class__ = inline_ffn_subclass(type(mod))
        return layers

