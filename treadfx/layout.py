"""Token layouts: which positions of which tensors are image tokens.

A *layout* describes the token axis of a tensor as segments, e.g. a ViT stream
``[extra 1 | image 256]`` (class token first) or Flux's RoPE table
``[text 512 | image 4096]``.  Only image segments are ever routed; text and
extra tokens always stay.

Streams (``[B, L, D]`` tensors) get their layout by forward propagation over
the traced graph: an input is image or text by what it is derived from, a
``cat`` along the token axis concatenates layouts, a slice slices them, a block
output inherits the layout of the input it carries (found by shape, or, when
two inputs have the same shape, by the residual path inside the block), and
token-preserving operations pass layouts on.  Side inputs (RoPE tables,
per-token masks) are aligned by :func:`side_input_layout`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import torch.nn as nn

from .errors import StreamAnalysisError

__all__ = [
    "Segment", "Layout", "TokenInfo", "LayoutAnalysis", "image_span", "layout_str", "tensor_input_nodes",
    "side_input_layout", "STREAM_RULES", "SIDE_RULES", "CAT_OPS", "SPLIT_OPS", "DEFAULT", "CONTINUE", "rule_for",
    "op_key", "SidePart", "module_value", "module_tensors", "side_parts", "joint_layouts", "broadcast_leads",
]


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of ``length`` tokens of one kind (image, text or extra) along the token axis."""

    kind: str  # "image" | "text" | "extra"
    length: int


Layout = tuple[Segment, ...]


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """Where the token axis of a tensor is and what lies along it."""

    axis: int
    layout: Layout
    batched: bool

    @property
    def length(self) -> int:
        return sum(s.length for s in self.layout)

    def has_image(self) -> bool:
        return any(s.kind == "image" for s in self.layout)


def layout_str(layout: Layout) -> str:
    """The layout as printed by ``inspect``, e.g. ``[extra 1 | image 256]``."""
    return "[" + " | ".join(f"{s.kind} {s.length}" for s in layout) + "]"


def image_span(layout: Layout) -> tuple[int, int]:
    """(offset, length) of the single image segment; raises if there is not exactly one."""
    spans, off = [], 0
    for s in layout:
        if s.kind == "image":
            spans.append((off, s.length))
        off += s.length
    if len(spans) != 1:
        raise StreamAnalysisError(
            f"a tensor with token layout {layout_str(layout)} has {len(spans)} image segments; treadfx routes "
            "exactly one contiguous run of image tokens. Fix: end the route before the operation that interleaves them."
        )
    return spans[0]


def _merge(layout: Iterable[Segment]) -> Layout:
    out: list[Segment] = []
    for s in layout:
        if s.length == 0:
            continue
        if out and out[-1].kind == s.kind:
            out[-1] = Segment(s.kind, out[-1].length + s.length)
        else:
            out.append(s)
    return tuple(out)


def _slice_layout(layout: Layout, start: int, stop: int) -> Layout:
    out, off = [], 0
    for s in layout:
        a, b = max(start, off), min(stop, off + s.length)
        if b > a:
            out.append(Segment(s.kind, b - a))
        off += s.length
    return _merge(out)


def tensor_input_nodes(node: fx.Node) -> list[fx.Node]:
    """Node inputs in the order of ``tree_flatten((args, kwargs))`` (the order a traced block sees them)."""
    leaves = pytree.tree_leaves((tuple(node.args), dict(node.kwargs)))
    return [l for l in leaves if isinstance(l, fx.Node)]


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


# ---- per-op rule tables ---------------------------------------------------------------------------
#
# Op knowledge lives in tables keyed by the op: a ``call_function`` target (the callable itself), a
# ``call_method`` name (a str) or, for ``call_module``, a module class (looked up along the MRO).  Supporting
# a new op is one added entry.

OpKey = Any


def op_key(node: fx.Node) -> OpKey | None:
    """The key of ``node`` in a rule table: its callable, its method name, or None for other node kinds."""
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def rule_for(table: dict, node: fx.Node, gm: fx.GraphModule | None = None):
    """The rule of ``table`` for ``node``, or None.  ``call_module`` nodes are looked up by module class
    (nearest base class first), which needs ``gm``."""
    if node.op == "call_module":
        if gm is None:
            return None
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in table:
                return table[cls]
        return None
    key = op_key(node)
    try:
        return table.get(key) if key is not None else None
    except TypeError:  # an unhashable target
        return None


#: Ops that concatenate tensors (``torch.cat(tensors, dim)``); shared by the stream and side-input rules.
CAT_OPS: tuple[OpKey, ...] = (torch.cat, torch.concat, torch.concatenate, "cat", "concat")
#: Ops that split one tensor into a tuple along ``dim`` (``torch.split(x, sizes, dim)``).
SPLIT_OPS: tuple[OpKey, ...] = (torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split",
                                "split_with_sizes")


def _cat_operands(node: fx.Node) -> tuple[Any, Any]:
    """(pieces, dim) of a cat node as written in the graph."""
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return pieces, dim


#: Rule result meaning "no special knowledge here: use the default (inherit from the inputs)".
DEFAULT = object()


class LayoutAnalysis:
    """Provenance, batch-ness and token layouts of every value in a traced graph.

    After construction, ``info[node]`` is the :class:`TokenInfo` of a tensor
    value (a list of them for a tuple value, None where there is no token
    axis) and ``batched[node]`` whether the value has the batch dimension of
    the image input (a list for a tuple value).  Layout knowledge of
    individual ops comes from :data:`STREAM_RULES`.
    """

    def __init__(self, gm: fx.GraphModule, image_input: int, chain_nodes: Sequence[fx.Node], block_carry):
        self.gm = gm
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if not 0 <= image_input < len(self.placeholders):
            raise StreamAnalysisError(f"image input index {image_input} out of range")
        self.image_ph = self.placeholders[image_input]
        img = _val(self.image_ph)
        self.batch = int(img.shape[0]) if _is_tensor(img) and img.ndim > 0 else None
        self.text_phs = {
            p for p in self.placeholders
            if p is not self.image_ph and _is_tensor(_val(p)) and _val(p).ndim >= 3 and self.batch is not None
            and _val(p).shape[0] == self.batch
        }
        self.chain_set = set(chain_nodes)
        self.block_carry = block_carry  # callable(node) -> {output index: input node}
        self.provenance: dict[fx.Node, frozenset[fx.Node]] = {}
        self.batched: dict[fx.Node, Any] = {}
        self.info: dict[fx.Node, Any] = {}  # TokenInfo | list[TokenInfo|None] | None
        self.fresh: set[fx.Node] = set()  # nodes whose token axis is new (a reshape of values without one)
        self._run()

    # -- helpers -------------------------------------------------------------------------------------
    def is_batched_value(self, node: fx.Node, value: Any) -> bool:
        """True if ``value`` (of ``node``) has the image input's batch size as dim 0 and comes from a batched
        value: a placeholder, or a node with a batched input (for a tuple input, the element it reads)."""
        if not _is_tensor(value) or value.ndim == 0 or self.batch is None or value.shape[0] != self.batch:
            return False
        if node.op == "placeholder":
            return True
        return any(self._input_batched(node, i) for i in node.all_input_nodes)

    def _input_batched(self, node: fx.Node, inp: fx.Node) -> bool:
        flag = self.batched.get(inp)
        if not isinstance(flag, list):
            return bool(flag)
        if (node.op == "call_function" and node.target is operator.getitem and node.args[0] is inp
                and isinstance(node.args[1], int) and -len(flag) <= node.args[1] < len(flag)):
            return flag[node.args[1]]  # a tuple element is batched by its own flag, not its siblings'
        return any(flag)

    def _fresh_kind(self, node: fx.Node) -> str:
        prov = self.provenance.get(node, frozenset())
        if self.image_ph in prov:
            return "image"
        if prov & self.text_phs:
            return "text"
        return "extra"

    def carries_tokens(self, node: fx.Node) -> bool:
        """True if the token axis of ``node`` holds tokens of a sequence: followed upstream through values whose
        token axis has the same length, it reaches the image or a text input, or a block of the chain.  False when
        the axis was made here from values without one (a per-sample vector reshaped to ``[B, k, D]``: a
        modulation table whose ``k`` chunks are not tokens).  A ``cat`` along the axis is followed into its parts;
        an axis first seen on a slice of an unbatched input (``llama_layers[i]`` of ``[L, B, T, D]``) is one
        that input already had, so it holds tokens."""
        info = self.token_info(node)
        if not isinstance(info, TokenInfo):
            return False
        seen, todo = {node}, [(node, info.length)]
        while todo:
            n, length = todo.pop()
            if n is self.image_ph or n in self.text_phs or n in self.chain_set:
                return True
            if n in self.fresh and any(
                    _is_tensor(_val(i)) and _val(i).ndim >= 3 and length in tuple(_val(i).shape)[1:]
                    for i in n.all_input_nodes if i.op == "placeholder"):
                return True
            joins = op_key(n) in CAT_OPS
            for i in n.all_input_nodes:
                inf = self.info.get(i)
                infos = inf if isinstance(inf, list) else [inf]
                for x in infos:
                    if i not in seen and isinstance(x, TokenInfo) and (
                            x.length == length or (joins and x.length < length)):
                        seen.add(i)
                        todo.append((i, x.length))
        return False

    def token_info(self, node: fx.Node, index: int | None = None) -> TokenInfo | None:
        """The TokenInfo of ``node`` (element ``index`` of a tuple value), or None."""
        info = self.info.get(node)
        if isinstance(info, list):
            return info[index] if index is not None and index < len(info) else None
        return info

    def _seq(self, node: fx.Node, value: Any) -> bool:
        return _is_tensor(value) and value.ndim >= 3 and self.is_batched_value(node, value)

    def _fresh(self, node: fx.Node, value: torch.Tensor) -> TokenInfo:
        """A new token axis (axis 1) whose kind is where the value comes from."""
        self.fresh.add(node)
        return TokenInfo(1, (Segment(self._fresh_kind(node), value.shape[1]),), True)

    # -- propagation ------------------------------------------------------------------------------------
    def _run(self) -> None:
        for node in self.gm.graph.nodes:
            prov: frozenset = frozenset([node]) if node.op == "placeholder" else frozenset()
            for i in node.all_input_nodes:
                prov = prov | self.provenance.get(i, frozenset())
            self.provenance[node] = prov
            value = _val(node)
            if isinstance(value, (tuple, list)):
                self.batched[node] = [self.is_batched_value(node, v) for v in value]
            else:
                self.batched[node] = self.is_batched_value(node, value)
            try:
                self.info[node] = self._infer(node, value)
                if node.op == "call_function" and node.target is operator.setitem:
                    self._write(node)
            except StreamAnalysisError:
                raise
            except Exception:  # analysis must never break tracing of odd ops
                self.info[node] = None

    def _write(self, node: fx.Node) -> None:
        """``t[idx] = v`` (an in-place write, a node without users): nodes after it that read ``t`` see what was
        written.  Its provenance and batch-ness join ``t``'s; and when ``t`` had no token axis and ``v`` is written
        into one contiguous slice ``[s:e]`` of one axis of ``t`` (every other index a full slice), that axis
        becomes ``t``'s token axis with layout ``[extra s | <v's kind> e-s | extra rest]``: a latent written into
        a fixed-length, zero-padded token buffer (HiDream's non-square patchify) keeps its padding as extra
        tokens, which are never routed."""
        target, idx, val = (list(node.args) + [None, None, None])[:3]
        if not isinstance(target, fx.Node):
            return
        src = self.provenance.get(val, frozenset()) if isinstance(val, fx.Node) else frozenset()
        if not src:
            return
        self.provenance[target] = self.provenance.get(target, frozenset()) | src
        t, v = _val(target), _val(val)
        if not (_is_tensor(t) and _is_tensor(v)) or self.info.get(target) is not None:
            return
        batched = self.batch is not None and t.ndim > 0 and t.shape[0] == self.batch and bool(self.batched.get(val))
        if batched:
            self.batched[target] = True
        entries = idx if isinstance(idx, tuple) else (idx,)
        if Ellipsis in entries or len(entries) > t.ndim or not all(isinstance(e, slice) for e in entries):
            return
        cut = [(ax, e) for ax, e in enumerate(entries) if e != slice(None)]
        if len(cut) != 1 or cut[0][1].step not in (None, 1) or not batched:
            return
        axis, e = cut[0]
        start, stop, _ = e.indices(int(t.shape[axis]))
        if axis == 0 or v.ndim != t.ndim or int(v.shape[axis]) != stop - start:
            return
        kind = self._fresh_kind(val)
        lay = _merge((Segment("extra", start), Segment(kind, stop - start),
                      Segment("extra", int(t.shape[axis]) - stop)))
        self.info[target] = TokenInfo(axis, lay, True)

    def _infer(self, node: fx.Node, value: Any):
        if node.op == "placeholder":
            return self._infer_placeholder(node, value)
        if node.op == "output":
            return None
        if node in self.chain_set:
            return self._infer_block(node, value)
        rule = rule_for(STREAM_RULES, node)
        if rule is not None:
            res = rule(self, node, value)
            if res is not DEFAULT:
                return res
        return self._default(node, value)

    def _infer_placeholder(self, node: fx.Node, value: Any) -> TokenInfo | None:
        if node is self.image_ph and self._seq(node, value):
            return TokenInfo(1, (Segment("image", value.shape[1]),), True)
        if node in self.text_phs:
            return TokenInfo(1, (Segment("text", value.shape[1]),), True)
        return None

    def _default(self, node: fx.Node, value: Any):
        """No rule: each tensor output inherits the layout of an input it is token-aligned with."""
        if isinstance(value, (tuple, list)):
            return [self._inherit(node, v) if _is_tensor(v) else None for v in value]
        if _is_tensor(value):
            return self._inherit(node, value)
        return None

    def _inherit(self, node: fx.Node, value: torch.Tensor) -> TokenInfo | None:
        cands: list[TokenInfo] = []
        same_shape: list[TokenInfo] = []
        for i in node.all_input_nodes:
            info = self.info.get(i)
            infos = info if isinstance(info, list) else [info]
            vals = _val(i) if isinstance(info, list) else [_val(i)]
            for inf, v in zip(infos, vals):
                if inf is None or not _is_tensor(v):
                    continue
                if value.ndim > inf.axis and value.shape[inf.axis] == inf.length and (
                    value.ndim >= 2 and self.batch is not None and value.shape[0] == self.batch
                ):
                    cands.append(inf)
                    if tuple(v.shape) == tuple(value.shape):
                        same_shape.append(inf)
        pool = same_shape or cands
        if pool:
            first = pool[0]
            return TokenInfo(first.axis, first.layout, True)
        if self._seq(node, value):
            return self._fresh(node, value)
        return None

    def _infer_block(self, node: fx.Node, value: Any):
        carry = self.block_carry(node)  # {output index: input node}
        outs = list(value) if isinstance(value, (tuple, list)) else [value]
        infos = [self._block_output(node, carry.get(j), v) for j, v in enumerate(outs)]
        return infos if isinstance(value, (tuple, list)) else infos[0]

    def _block_output(self, node: fx.Node, src: fx.Node | None, v: Any) -> TokenInfo | None:
        inf = self.info.get(src) if src is not None else None
        if inf is None and _is_tensor(v):
            # unresolved carry (e.g. U-ViT: x and skip of one shape meet in a feature-dim cat):
            # fine if every input of the output's shape has the same layout
            same = {self.info.get(i) for i in node.all_input_nodes
                    if _is_tensor(_val(i)) and tuple(_val(i).shape) == tuple(v.shape)}
            if len(same) == 1:
                inf = next(iter(same))
        if isinstance(inf, TokenInfo) and _is_tensor(v) and v.ndim > inf.axis and v.shape[inf.axis] == inf.length:
            return inf
        if _is_tensor(v) and self._seq(node, v):
            return self._fresh(node, v)
        return None


# ---- stream rules: (analysis, node, value) -> TokenInfo | list | None, or DEFAULT to inherit -----------

def _getitem_rule(a: LayoutAnalysis, node: fx.Node, value: Any):
    """``t[i]`` of a tuple takes element i's layout; ``x[:, a:b]`` slices the layout along the token axis."""
    if not isinstance(node.args[0], fx.Node):
        return DEFAULT
    src = node.args[0]
    src_info = a.info.get(src)
    idx = node.args[1]
    if isinstance(src_info, list) and isinstance(idx, int):
        return src_info[idx] if idx < len(src_info) else None
    if isinstance(src_info, TokenInfo) and _is_tensor(value):
        sliced = _slice_by_index(src_info, _val(src), idx, value)
        if sliced is not None:
            return sliced
    return DEFAULT


def _cat_rule(a: LayoutAnalysis, node: fx.Node, value: Any):
    """A cat along the token axis concatenates the pieces' layouts (a piece without one is a fresh segment)."""
    if not _is_tensor(value):
        return DEFAULT
    pieces, dim = _cat_operands(node)
    if not isinstance(pieces, (list, tuple)) or not isinstance(dim, int):
        return DEFAULT
    dim = dim % value.ndim
    piece_infos = []
    for p in pieces:
        inf = a.info.get(p) if isinstance(p, fx.Node) else None
        piece_infos.append(inf if isinstance(inf, TokenInfo) else None)
    if not any(inf is not None and inf.axis == dim for inf in piece_infos):
        if not (dim == 1 and a._seq(node, value)):
            return DEFAULT
    segs: list[Segment] = []
    for p, inf in zip(pieces, piece_infos):
        pv = _val(p)
        if not _is_tensor(pv):
            return DEFAULT
        if inf is not None and inf.axis == dim:
            segs.extend(inf.layout)
        else:
            kind = a._fresh_kind(p) if isinstance(p, fx.Node) else "extra"
            segs.append(Segment(kind, int(pv.shape[dim])))
    return TokenInfo(dim, _merge(segs), a.is_batched_value(node, value))


def _split_rule(a: LayoutAnalysis, node: fx.Node, value: Any):
    """A split along the token axis cuts the layout into consecutive pieces."""
    if not isinstance(value, (tuple, list)) or not node.args or not isinstance(node.args[0], fx.Node):
        return DEFAULT
    src_info = a.info.get(node.args[0])
    if not isinstance(src_info, TokenInfo):
        return DEFAULT
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    src = _val(node.args[0])
    if not isinstance(dim, int) or dim % src.ndim != src_info.axis:
        return DEFAULT
    out, off = [], 0
    for v in value:
        n = int(v.shape[src_info.axis])
        out.append(TokenInfo(src_info.axis, _slice_layout(src_info.layout, off, off + n), src_info.batched))
        off += n
    return out


def _slice_by_index(info: TokenInfo, src: torch.Tensor, idx: Any, value: torch.Tensor) -> TokenInfo | None:
    """x[:, a:b, ...] along the token axis; other indexing keeps the axis only if shapes say so."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    # position of the token axis among the index entries (before any Ellipsis)
    if len(idx) > info.axis and all(isinstance(e, slice) and e == slice(None) for e in idx[: info.axis]):
        e = idx[info.axis]
        if isinstance(e, slice) and (e.step in (None, 1)):
            start, stop, _ = e.indices(info.length)
            rest = idx[info.axis + 1:]
            if all(r is Ellipsis or (isinstance(r, slice) and r == slice(None)) or isinstance(r, int) or r is None
                   for r in rest):
                if value.ndim > info.axis and value.shape[info.axis] == stop - start:
                    return TokenInfo(info.axis, _slice_layout(info.layout, start, stop), info.batched)
    if (value.ndim > info.axis and value.shape[info.axis] == info.length
            and value.shape[: info.axis] == src.shape[: info.axis]):
        return info
    return None


def _permute_rule(a: LayoutAnalysis, node: fx.Node, value: Any):
    """``x.permute(dims)`` moves the token axis to where ``dims`` puts it."""
    if not node.args or not isinstance(node.args[0], fx.Node) or not _is_tensor(value):
        return DEFAULT
    info = a.info.get(node.args[0])
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    dims = node.kwargs.get("dims", dims)
    if not isinstance(info, TokenInfo) or not all(isinstance(d, int) for d in dims) or len(dims) != value.ndim:
        return DEFAULT
    dims = [d % value.ndim for d in dims]
    if info.axis not in dims:
        return DEFAULT
    new = dims.index(info.axis)
    if new == 0:
        return None
    return TokenInfo(new, info.layout, info.batched)


#: How ops change the token layout of the stream.  Ops not listed inherit the layout of a token-aligned input.
STREAM_RULES: dict[OpKey, Callable[[LayoutAnalysis, fx.Node, Any], Any]] = {
    operator.getitem: _getitem_rule,
    "permute": _permute_rule,
    torch.permute: _permute_rule,
    **{op: _cat_rule for op in CAT_OPS},
    **{op: _split_rule for op in SPLIT_OPS},
}


# ---- side inputs ----------------------------------------------------------------------------------------

#: Rule result meaning "this op keeps the axis: keep walking back through its inputs".
CONTINUE = object()


def _side_cat_rule(n: fx.Node, v: torch.Tensor, axis: int, num_image: int):
    """A cat along the axis: the layout is its pieces, if exactly one of them has the image token count."""
    pieces, dim = _cat_operands(n)
    if not (isinstance(dim, int) and dim % v.ndim == axis and isinstance(pieces, (list, tuple))):
        return CONTINUE
    sizes = [int(_val(p).shape[axis]) for p in pieces if isinstance(p, fx.Node)]
    if len(sizes) == len(pieces) and sizes.count(num_image) == 1:
        return _merge(Segment("image" if s == num_image else "extra", s) for s in sizes)
    return None


#: Ops that decide a side input's layout on the walk back from it: (node, value, axis, image count) -> a layout,
#: None (no layout), or CONTINUE.  Ops not listed keep the axis if their inputs have it at the same size.
SIDE_RULES: dict[OpKey, Callable[[fx.Node, torch.Tensor, int, int], Any]] = {op: _side_cat_rule for op in CAT_OPS}


def side_input_layout(
    gm: fx.GraphModule,
    node: fx.Node,
    axis: int,
    num_image: int,
    known: Sequence[Layout],
) -> Layout | None:
    """Layout of a side input's ``axis`` (a RoPE table, a per-token mask).

    Rules, in order: the whole axis is image tokens if its size is the image
    token count; it equals a known stream layout of the same length; walking
    back through operations that keep the axis's size, the first op with a
    rule in :data:`SIDE_RULES` decides (a concatenation along that axis with
    exactly one piece of the image token count).  Returns None when no rule
    applies.
    """
    size = int(_val(node).shape[axis])
    if size == num_image:
        return (Segment("image", num_image),)
    for lay in known:
        if sum(s.length for s in lay) == size and any(s.kind == "image" for s in lay):
            return lay
    return _walk_back_to_rule(node, axis, size, num_image)


def _walk_back_to_rule(node: fx.Node, axis: int, size: int, num_image: int) -> Layout | None:
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        v = _val(n)
        if not _keeps_axis(v, axis, size):
            continue
        rule = rule_for(SIDE_RULES, n)
        if rule is not None:
            res = rule(n, v, axis, num_image)
            if res is not CONTINUE:
                return res
        # keep following the axis through inputs that still have it at the same position
        frontier.extend(i for i in n.all_input_nodes if _keeps_axis(_val(i), axis, size))
    return None


def _keeps_axis(v: Any, axis: int, size: int) -> bool:
    return _is_tensor(v) and v.ndim > axis and int(v.shape[axis]) == size


# ---- side inputs with several token axes, and modules that hold token tables ---------------------------


@dataclasses.dataclass(frozen=True)
class SidePart:
    """One tensor of a side input to gather: ``path`` is "" for the input itself, or the dotted name of a
    tensor held by a module-valued input (a buffer such as ``freqs_cos``, or a plain tensor attribute);
    ``axes`` are its token axes with their layouts (one for a RoPE table, two for an ``[N, N]`` mask);
    ``batched`` whether it has the batch dimension; ``lead`` how many singleton dims a per-sample copy of an
    unbatched table needs after the batch dim to broadcast like the original (``[N, d]`` used against
    ``[B, H, N, d]`` queries: 1, giving ``[B, 1, K, d]``); ``expand_dim0`` whether a size-1 dim 0 plays the
    batch dim (an ``[1, 1, N, N]`` mask) and is expanded instead of a new dim being prepended."""

    path: str
    axes: tuple[tuple[int, Layout], ...]
    batched: bool = False
    lead: int = 0
    expand_dim0: bool = False


def module_value(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    """The module a ``get_attr`` node names (a module passed to a block as an argument), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    try:
        for atom in str(node.target).split("."):
            obj = getattr(obj, atom)
    except AttributeError:
        return None
    return obj if isinstance(obj, nn.Module) else None


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a module holds that are not trained weights: buffers and plain tensor attributes of it and
    its submodules, by dotted path (parameters are left out: a weight is never a token table)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        pre = prefix + "." if prefix else ""
        for name, b in sub._buffers.items():
            if isinstance(b, torch.Tensor):
                out.setdefault(pre + name, b)
        for name, v in sub.__dict__.items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and not name.startswith("_"):
                out.setdefault(pre + name, v)
    return out


def _token_axes(v: torch.Tensor, axes: Iterable[int], match: Callable[[int], Layout | None],
                square: bool = True) -> tuple:
    """The token axes of ``v`` among ``axes``: the last two when both match at the same size and ``square``
    (an ``[.., N, N]`` attention mask or bias, gathered on both token axes), else the first matching one."""
    found = [(a, match(a)) for a in axes]
    found = [(a, lay) for a, lay in found if lay is not None]
    if not found:
        return ()
    if (square and len(found) >= 2 and found[-1][0] == v.ndim - 1 and found[-2][0] == v.ndim - 2
            and v.shape[-1] == v.shape[-2] and found[-1][1] == found[-2][1]):
        return tuple(found[-2:])
    return (found[0],)


def side_parts(gm: fx.GraphModule, node: fx.Node, value: Any, num_image: int, known: Sequence[Layout],
               batched: bool, square: bool = True) -> tuple[SidePart, ...] | None:
    """What to gather of a side input: its token axes (a tensor), or its token tables (a module).

    A tensor gets one part (path ""), with both last axes when it is an ``[.., N, N]`` mask (unless
    ``square`` is False: then only the first token axis, for a ``[N, d]`` table whose ``d`` happens to be
    ``N``); a module one part per buffer or tensor attribute with an axis of the image token count or of a
    known stream layout (modules are never batched).  None when nothing lines up with the image tokens.
    """
    if isinstance(value, nn.Module):
        parts = []
        for path, t in module_tensors(value).items():
            if t.ndim == 0:
                continue

            def match(axis: int, t=t) -> Layout | None:
                size = int(t.shape[axis])
                if size == num_image:
                    return (Segment("image", num_image),)
                return next((lay for lay in known if sum(s.length for s in lay) == size
                             and any(s.kind == "image" for s in lay)), None)

            axes = _token_axes(t, range(t.ndim), match, square)
            if axes:
                parts.append(SidePart(path, axes, False))
        return tuple(parts) or None
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return None
    axes = _token_axes(value, range(1, value.ndim) if batched else range(value.ndim),
                       lambda a: side_input_layout(gm, node, a, num_image, known), square)
    if not axes:
        return None
    expand0 = not batched and value.ndim > 1 and value.shape[0] == 1 and axes[0][0] > 0
    return (SidePart("", axes, batched, 0, expand0),)


def broadcast_leads(call: Callable[[], Any], tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Run ``call`` once and see how each of ``tensors`` is used: for each, the singleton dims a per-sample
    copy needs after its batch dim so that it broadcasts against the highest-rank tensor it meets in an op
    (``[N, d]`` times ``[B, H, N, d]``: 1).  Tensors never met with a higher-rank operand get 0; a failing call
    gives 0 for all."""
    from torch.overrides import TorchFunctionMode

    ids = {id(t): name for name, t in tensors.items()}
    rank: dict[str, int] = {}

    class _Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            leaves = [l for l in pytree.tree_leaves((args, kwargs or {})) if isinstance(l, torch.Tensor)]
            mine = [ids[id(l)] for l in leaves if id(l) in ids]
            if mine:
                top = max(l.ndim for l in leaves)
                for name in mine:
                    rank[name] = max(rank.get(name, 0), top)
            return func(*args, **(kwargs or {}))

    try:
        with _Seen():
            call()
    except Exception:  # noqa: BLE001 - no information; the probe decides whether the default works
        return {name: 0 for name in tensors}
    return {name: max(0, rank.get(name, 0) - t.ndim - 1) for name, t in tensors.items()}


def joint_layouts(inner: fx.GraphModule, image_ph: int, text_phs: Sequence[int], num_image: int) -> list[Layout]:
    """Token layouts that a block builds inside itself by concatenating the image stream with text tokens
    (joint attention: ``cat([img_q, txt_q], dim=2)``), from a trace of the block.  A joint mask passed to such
    a block (``[B, 1, 1, N_img + N_txt]``) has this layout on its last axis.  Each cat whose pieces come from
    the image input only or from text inputs only, with exactly one image piece of ``num_image`` tokens,
    gives one layout, in the order of the pieces."""
    phs = [n for n in inner.graph.nodes if n.op == "placeholder"]
    img = phs[image_ph] if 0 <= image_ph < len(phs) else None
    txt = {phs[i] for i in text_phs if 0 <= i < len(phs)}
    if img is None or not txt:
        return []
    prov: dict[fx.Node, frozenset] = {}
    for n in inner.graph.nodes:
        p = frozenset([n]) if n.op == "placeholder" else frozenset()
        for i in n.all_input_nodes:
            p = p | prov.get(i, frozenset())
        prov[n] = p
    out: list[Layout] = []
    for n in inner.graph.nodes:
        if rule_for(dict.fromkeys(CAT_OPS, True), n) is None:
            continue
        pieces, dim = _cat_operands(n)
        v = _val(n)
        if not (isinstance(pieces, (list, tuple)) and isinstance(dim, int) and _is_tensor(v)):
            continue
        segs = []
        for p in pieces:
            pv = _val(p)
            if not (isinstance(p, fx.Node) and _is_tensor(pv)):
                segs = []
                break
            src = prov.get(p, frozenset()) & ({img} | txt)
            size = int(pv.shape[dim % v.ndim])
            if src == {img}:
                segs.append(Segment("image", size))
            elif src and img not in src:
                segs.append(Segment("text", size))
            else:
                segs = []
                break
        lay = _merge(segs)
        if sum(1 for s in lay if s.kind == "image") == 1 and any(
                s.kind == "image" and s.length == num_image for s in lay) and len(lay) > 1 and lay not in out:
            out.append(lay)
    return out


def block_joint_layouts(gm: fx.GraphModule, analysis: "LayoutAnalysis", node: fx.Node, num_image: int,
                        value_of: Callable[[fx.Node], Any]) -> list[Layout]:
    """The joint image+text layouts block call ``node`` builds inside itself (see :func:`joint_layouts`),
    from a trace of its module on the call's traced values; [] when it is not a module call, receives no
    image and text streams, or cannot be traced.  Cached per node on ``analysis``."""
    cache = analysis.__dict__.setdefault("_joint_layouts", {})
    if node in cache:
        return cache[node]
    cache[node] = []
    if node.op != "call_module":
        return []
    leaves = [l for l in pytree.tree_leaves((tuple(node.args), dict(node.kwargs)))]
    image, text, pos = None, [], 0
    values = []
    for leaf in leaves:
        v = value_of(leaf) if isinstance(leaf, fx.Node) else leaf
        values.append(v)
        if not (isinstance(v, torch.Tensor) or type(v) is float):
            continue
        info = analysis.token_info(leaf) if isinstance(leaf, fx.Node) else None
        if isinstance(info, TokenInfo) and info.has_image() and image is None:
            image = pos
        elif isinstance(info, TokenInfo) and all(s.kind == "text" for s in info.layout):
            text.append(pos)
        pos += 1
    if image is None or not text:
        return []
    # a joint layout only matters for an input with an axis of image + text tokens (a joint mask): without one,
    # no retrace of the block
    text_lengths = [analysis.token_info(leaves[i]).length for i in _tensor_leaf_indices(values, text)]
    joint = {num_image + t for t in text_lengths} | {num_image + sum(text_lengths)}
    if not any(isinstance(v, torch.Tensor) and joint & set(int(d) for d in v.shape) for v in values):
        return []
    from .fake_eval import forward_of, meta_key, module_structure_key
    from .tracing import trace

    args, kwargs = pytree.tree_unflatten(values, pytree.tree_flatten((tuple(node.args), dict(node.kwargs)))[1])
    module = gm.get_submodule(str(node.target))
    key = (module_structure_key(module), meta_key((tuple(args), dict(kwargs))), image, tuple(text), num_image)
    hit = _JOINT_LAYOUTS.get(key)
    if hit is None:
        try:
            inner = trace(module, lambda m, *a, **k: forward_of(m)(*a, **k), tuple(args), dict(kwargs), leaves=[])
        except Exception:  # noqa: BLE001 - no layouts: the probe reports the input it could not align
            return []
        if len(_JOINT_LAYOUTS) >= 256:
            _JOINT_LAYOUTS.clear()
        hit = _JOINT_LAYOUTS[key] = joint_layouts(inner.gm, image, text, num_image)
    cache[node] = list(hit)
    return cache[node]


#: process-wide: (block structure, input metadata, image and text positions, image tokens) -> its joint layouts
_JOINT_LAYOUTS: dict[tuple, list] = {}


def _tensor_leaf_indices(values: list, positions: list[int]) -> list[int]:
    """Indices into ``values`` (all leaves) of the tensor positions ``positions`` (counted over tensors and
    floats, as :func:`block_joint_layouts` counts them)."""
    out, pos = [], 0
    for i, v in enumerate(values):
        if not (isinstance(v, torch.Tensor) or type(v) is float):
            continue
        if pos in positions:
            out.append(i)
        pos += 1
    return out


def token_sized_axes(value: Any, num_image: int, others: Sequence[int], batched: bool) -> list[tuple[str, int, int]]:
    """Where ``value`` (a tensor, or a module's tables) has an axis that looks like a token axis: its size is
    the image token count, or the image tokens plus one of ``others`` (text lengths, a few extra tokens).
    Returns ``(path, axis, size)`` per such axis (path "" for the tensor itself): the evidence an error
    shows when a block cannot run on the kept tokens because of this input."""
    sizes = {num_image} | {num_image + o for o in others if o > 0}
    items = module_tensors(value).items() if isinstance(value, nn.Module) else [("", value)]
    out = []
    for path, t in items:
        if not isinstance(t, torch.Tensor):
            continue
        for axis in range(1 if batched and not path else 0, t.ndim):
            if int(t.shape[axis]) in sizes:
                out.append((path, axis, int(t.shape[axis])))
    return out
