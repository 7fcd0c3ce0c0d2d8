"""Image tokens at per-sample offsets in a joint sequence assembled slice by slice.

Some models build the sequence their main blocks run on by writing each
sample's pieces into a fresh buffer (Lumina2)::

    joint = h.new_zeros(B, L, D)
    for i, (c, s) in enumerate(zip(caption_lengths, seq_lengths)):
        joint[i, :c] = caption[i, :c]
        joint[i, c:s] = image[i]          # the N image tokens of sample i at offset c_i

Sample ``i`` has its ``N`` image tokens in the *window* ``[c_i, c_i + N)``;
the caption before it and the padding after it differ in length per sample,
but every sample has exactly ``N`` image tokens, so a route that keeps ``K``
of them keeps ``L - N + K`` positions in every sample: the caption, the kept
image tokens and the padding, in that order.

:func:`find_windows` recognises such buffers in a traced graph (each sample's
image write must be a whole sample of an image-only stream, not overwritten
later); :func:`window_plans` gives each route whose stream is such a joint
sequence a kept count over the ``N`` image tokens (``last_routes`` and
``fixed_routes`` speak image-token indices ``[B, K]``); :func:`rewire` maps the
drawn image indices to joint positions with :class:`WindowIndex` (offsets read
at run time: graph values where the offsets are graph values, so one traced
graph serves every caption length) for every gather and scatter of the route.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import UnroutableRegionError
from .layout import LayoutAnalysis, Segment, TokenInfo, image_span

__all__ = ["Window", "WindowIndex", "find_windows", "window_of", "window_plans", "rewire", "window_overwritten"]


@dataclasses.dataclass
class Window:
    """A joint buffer whose sample ``i`` holds the ``num_image`` tokens of ``source[i]`` at ``starts[i]``."""

    buffer: fx.Node
    source: fx.Node
    starts: list  # per sample: an int, or an fx.Node giving the int at run time
    num_image: int
    length: int  # L: the buffer's token count
    later: list = dataclasses.field(default_factory=list)  # (sample, start, stop) of writes after its image write

    def describe(self) -> str:
        """E.g. "image tokens of `x` written at per-sample offsets [5, 7] (this call's; read at every call) of the
        23-token joint sequence built in forward (graph node `joint`)"."""
        late = any(isinstance(s, fx.Node) for s in self.starts)
        offsets = ", ".join(str(_concrete_start(s)) for s in self.starts)
        return (f"image tokens of `{self.source.name}` written at per-sample offsets [{offsets}]"
                + (" (this call's; read at every call)" if late else "")
                + f" of the {self.length}-token joint sequence built in forward (graph node `{self.buffer.name}`)")


def _concrete(v: Any) -> int | None:
    if v is None or isinstance(v, int):
        return v
    if isinstance(v, fx.Node):
        val = v.meta.get("val")
        return int(val) if isinstance(val, int) else None
    return None


def _parse_key(key: Any) -> tuple[int, Any, Any] | None:
    """(sample, start, stop) of ``buf[i, a:b]`` / ``buf[i, a:b, ...]``; None for other keys."""
    if not isinstance(key, tuple) or len(key) < 2:
        return None
    i, sl = key[0], key[1]
    if not isinstance(i, int) or isinstance(i, bool) or not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    if any(not (k is Ellipsis or (isinstance(k, slice) and k == slice(None))) for k in key[2:]):
        return None
    return i, sl.start, sl.stop


def _sample_of(value: Any, analysis: LayoutAnalysis) -> tuple[fx.Node, int] | None:
    """(stream, i) when ``value`` is ``stream[i]`` for an image-only token stream ``stream``."""
    if not (isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.getitem):
        return None
    src, idx = value.args[0], value.args[1]
    if isinstance(idx, tuple) and len(idx) >= 1 and all(isinstance(k, slice) and k == slice(None) for k in idx[1:]):
        idx = idx[0]
    if not isinstance(src, fx.Node) or not isinstance(idx, int) or isinstance(idx, bool):
        return None
    info = analysis.token_info(src)
    if not (isinstance(info, TokenInfo) and info.axis == 1 and info.batched
            and all(s.kind == "image" for s in info.layout)):
        return None
    return src, idx


def find_windows(gm: fx.GraphModule, analysis: LayoutAnalysis) -> dict[fx.Node, Window]:
    """Every buffer of ``gm`` assembled by per-sample writes with one whole image sample per batch row.

    Guarantees: a returned window's sample ``i`` has exactly one write of ``source[i]`` (all ``N`` tokens, in
    order) at ``starts[i]`` and no later write overlapping it (checked on the traced values; the writes'
    bounds come from the same values at run time)."""
    batch = analysis.batch
    out: dict[fx.Node, Window] = {}
    if batch is None:
        return out
    for buf in gm.graph.nodes:
        val = buf.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.ndim >= 3 and val.shape[0] == batch):
            continue
        writes = [u for u in buf.users if u.op == "call_function" and u.target is operator.setitem
                  and u.args and u.args[0] is buf]
        if not writes:
            continue
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        writes.sort(key=lambda u: order[u])
        found: dict[int, tuple[int, Any, fx.Node]] = {}  # sample -> (write position, start, source)
        ok = True
        spans: list[tuple[int, int, int, int]] = []  # (write position, sample, start, stop) on traced values
        bounds: list[tuple[Any, Any]] = []  # the same writes' bounds as written (ints or graph nodes)
        length = int(val.shape[1])
        for k, w in enumerate(writes):
            parsed = _parse_key(w.args[1])
            if parsed is None:
                ok = False
                break
            i, a, b = parsed
            ca, cb = _concrete(a), _concrete(b)
            ca = 0 if a is None else ca
            cb = length if b is None else cb
            if ca is None or cb is None or not 0 <= i < batch:
                ok = False
                break
            spans.append((k, i, ca, cb))
            bounds.append((0 if a is None else a, length if b is None else b))
            sample = _sample_of(w.args[2], analysis)
            if sample is not None and sample[1] == i:
                src, _ = sample
                n = int(src.meta["val"].shape[1])
                if cb - ca != n or i in found:
                    ok = False
                    break
                found[i] = (k, 0 if a is None else a, src)
        if not ok or len(found) != batch or len({id(s) for _, _, s in found.values()}) != 1:
            continue
        src = next(iter(found.values()))[2]
        n = int(src.meta["val"].shape[1])
        overwritten = any(k > found[i][0] and a < _concrete_start(found[i][1]) + n and b > _concrete_start(found[i][1])
                          for k, i, a, b in spans)
        if overwritten or n >= length:
            continue
        later = [(i, *bounds[k]) for k, i, _, _ in spans if k > found[i][0]]
        out[buf] = Window(buf, src, [found[i][1] for i in range(batch)], n, length, later)
    return out


def _concrete_start(s: Any) -> int:
    return s if isinstance(s, int) else int(_concrete(s) or 0)


def window_of(node: fx.Node, windows: dict[fx.Node, Window], analysis: LayoutAnalysis,
              memo: dict | None = None) -> Window | None:
    """The window of the joint buffer that ``node`` carries token for token (through blocks and ops that keep
    its token axis), or None."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    memo[node] = None
    found = windows.get(node)
    val = node.meta.get("val")
    if found is None and isinstance(val, torch.Tensor) and val.ndim >= 2:
        srcs: list[fx.Node] = []
        if node in analysis.chain_set:
            carry = analysis.block_carry(node) or {}
            if carry.get(0) is not None:
                srcs = [carry[0]]
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0] in analysis.chain_set and isinstance(node.args[1], int):
            carry = analysis.block_carry(node.args[0]) or {}
            if carry.get(node.args[1]) is not None:
                srcs = [carry[node.args[1]]]
        else:
            srcs = [i for i in node.all_input_nodes if isinstance(i.meta.get("val"), torch.Tensor)
                    and tuple(i.meta["val"].shape) == tuple(val.shape)]
        ws = {id(w): w for w in (window_of(s, windows, analysis, memo) for s in srcs) if w is not None}
        if len(ws) == 1 and int(val.shape[1]) == next(iter(ws.values())).length:
            found = next(iter(ws.values()))
    memo[node] = found
    return found


def window_plans(gm: fx.GraphModule, analysis: LayoutAnalysis, plans: Sequence[Any]) -> None:
    """Give each plan whose stream is a joint sequence with per-sample image windows (in place): ``window``,
    ``num_tokens`` = the image token count ``N`` (the route draws ``K`` of ``N``), and reasons that say so.

    Raises UnroutableRegionError when such a route cannot keep per-sample positions (shared or structured
    selection) or gathers a tensor whose token axis is neither the joint sequence nor the image tokens."""
    windows = find_windows(gm, analysis)
    for plan in plans:
        plan.window = None
        if not windows:
            continue
        w = window_of(plan.stream, windows, analysis)
        if w is None:
            continue
        _, n_stream = image_span(plan.stream_info.layout)
        if n_stream != w.length or len(plan.stream_info.layout) != 1:
            continue  # the stream's layout already separates the image tokens: nothing to do
        if plan.selection != "per_sample" or getattr(plan, "grid", None) is not None:
            raise UnroutableRegionError(
                f"route {plan.index}: the image tokens of the stream sit at a different offset in each sample "
                f"({w.describe()}), so the kept positions differ per sample, but the route selects "
                f"{'a structured sub-grid' if getattr(plan, 'grid', None) is not None else 'one subset shared by the batch'}"
                f" ({plan.selection_reason}). Fix: route with selection='random' and give every gathered side input a "
                "batch dimension, or start the route after the joint sequence is built by concatenation.")
        for d in list(plan.entering) + list(plan.leaving):
            if d.action not in ("gather", "scatter"):
                continue
            totals = [sum(s.length for s in lay) for _, lay in (
                [(d.axis, d.layout)] if getattr(d, "parts", None) is None else
                [ax for p in d.parts for ax in p.axes])]
            if any(t not in (w.length, w.num_image) for t in totals):
                raise UnroutableRegionError(
                    f"route {plan.index}: {d.role} `{d.node.name}` has a token axis of {totals} tokens, neither the "
                    f"joint sequence ({w.length}) nor its image tokens ({w.num_image}); {w.describe()}. Fix: end "
                    "the route before the operation that builds it.")
            if any(t == w.length for t in totals):
                d.reason += ("; joint positions: every caption and padding position, and the kept image tokens at "
                             "each sample's offset")
                _label_joint(d, w)
        plan.window = w
        plan.num_tokens = w.num_image
        # what the route draws from: the N image tokens of each sample (keep_tokens, route_loss and the pixel ->
        # token map speak these), wherever the sample has them
        plan.stream_info = TokenInfo(plan.stream_info.axis, (Segment("image", w.num_image),), plan.stream_info.batched)
        plan.selection_reason += (f"; {w.describe()}: each sample keeps its caption and padding and K of the "
                                  f"{w.num_image} image tokens")


def _label_joint(d: Any, w: Window) -> None:
    """What ``inspect`` prints for a decision on the joint sequence: ``layout_text`` (the caption | image | padding
    split with per-sample offsets, not the stream's "image L") and, for a tensor the forward builds itself (not a
    module output or an input), ``label`` naming what it is (a bool one is the joint attention mask)."""
    if getattr(d, "parts", None) is None:
        d.layout_text = (f"[caption | image {w.num_image} | padding] joint sequence of {w.length} tokens, image "
                         "tokens at per-sample offsets")
    node = d.node
    if node.op in ("call_function", "call_method") and node.target is not operator.getitem:
        val = node.meta.get("val")
        what = ("joint attention mask" if isinstance(val, torch.Tensor) and val.dtype == torch.bool
                else "joint per-token tensor")
        d.label = f"{what} built in forward (graph node `{node.name}`)"


class WindowIndex(nn.Module):
    """Joint positions kept by a route: every position outside each sample's image window, and the kept image
    tokens ``idx`` ``[B, K]`` (0..N-1) shifted to the sample's window start; ``[B, L - N + K]``, in order
    (caption, kept image tokens in the order of ``idx``, padding).  None when ``idx`` is None."""

    def __init__(self, num_image: int, length: int):
        super().__init__()
        self.num_image, self.length = num_image, length

    def extra_repr(self) -> str:
        return f"N={self.num_image} image tokens at per-sample offsets in L={self.length}"

    def forward(self, idx: torch.Tensor | None, *starts: Any) -> torch.Tensor | None:
        if idx is None:
            return None
        if idx.ndim != 2:
            raise UnroutableRegionError(
                f"per-sample image offsets need per-sample kept indices [B, K]; got shape {list(idx.shape)}. "
                "Fix: pass [B, K] indices to fixed_routes.")
        b, k = idx.shape
        # no int() or as_tensor on the offsets: under torch.compile they may be symbolic ints, which those would pin
        # to this call's values (one graph per caption length); scalar_tensor keeps them symbolic
        c = torch.stack([torch.scalar_tensor(s, dtype=idx.dtype, device=idx.device) for s in starts]).view(b, 1)
        j = torch.arange(self.length - self.num_image + k, dtype=idx.dtype, device=idx.device).view(1, -1)
        img = c + idx.gather(1, (j - c).clamp(0, k - 1).expand(b, -1))
        return torch.where(j < c, j.expand(b, -1), torch.where(j < c + k, img, j + (self.num_image - k)))


def rewire(gm: fx.GraphModule, plans: Sequence[Any]) -> None:
    """After the TREAD pass: every gather and scatter of a windowed route reads joint positions
    (:class:`WindowIndex` of the route's drawn image indices) on its joint-sequence axes; the graph's outputs
    still report the drawn image indices (``last_routes``)."""
    from .passes.tread import select_name  # noqa: PLC0415 - the pass names its route ops

    graph = gm.graph
    for plan in plans:
        w = getattr(plan, "window", None)
        if w is None:
            continue
        sel = next(n for n in graph.nodes if n.op == "call_module" and n.target == select_name(plan.index))
        name = f"treadfx_route{plan.index}_window"
        op = WindowIndex(w.num_image, w.length)
        gm.add_submodule(name, op)
        with graph.inserting_after(sel):
            jidx = graph.call_module(name, (sel, *w.starts))
        jidx.meta["treadfx"] = ("window", plan.index, "joint positions")
        for key in ("treadfx_scope", "stack_trace"):
            if key in sel.meta:
                jidx.meta[key] = sel.meta[key]
        if any(isinstance(v, fx.Node) for _, a, b in w.later for v in (a, b)):
            # writes after a sample's image write were clear of its window on the traced call; their bounds are read
            # at run time, so check again at every call (a clash retraces, and the new trace sees it)
            from .data_guards import data_guard  # noqa: PLC0415

            with graph.inserting_before(sel):
                clash = graph.call_function(window_overwritten, (list(w.starts), w.num_image, [list(t) for t in w.later]))
                clash.meta["val"] = False
                guard = graph.call_function(data_guard, (clash, "bool", False, f"the image window of `{w.buffer.name}`"))
                guard.meta["val"] = None
                guard.meta["treadfx_data_guard"] = f"the image window of `{w.buffer.name}`"
            for key in ("treadfx_scope",):
                if key in sel.meta:
                    clash.meta[key] = guard.meta[key] = sel.meta[key]
        idx_val = sel.meta.get("val")
        if isinstance(idx_val, torch.Tensor):
            with _mode_of(idx_val):
                jidx.meta["val"] = op(idx_val, *[_concrete_start(s) for s in w.starts])
        for user in list(sel.users):
            if user is jidx or user.op != "call_module" or not str(user.target).startswith(f"treadfx_route{plan.index}_"):
                continue
            mod = gm.get_submodule(str(user.target))
            if _joint_axes(mod, w):
                user.replace_input_with(sel, jidx)
                if "val" in user.meta and user.meta.get("treadfx", ("",))[0] == "gather":
                    with _mode_of(user.meta["val"]):
                        src = user.args[0]
                        user.meta["val"] = mod(src.meta["val"], jidx.meta["val"])
    graph.lint()
    gm.recompile()


def window_overwritten(starts: Sequence[int], num_image: int, later: Sequence[Sequence[int]]) -> bool:
    """Whether a write ``(sample, start, stop)`` made after the image writes overlaps that sample's window."""
    return any(a < starts[i] + num_image and b > starts[i] for i, a, b in later)  # no int(): see WindowIndex


def _joint_axes(mod: nn.Module, w: Window) -> bool:
    """The route op works on the joint sequence (not on an image-only tensor)."""
    from .ops import RouteGather, RouteGatherParts, RouteScatter

    if isinstance(mod, RouteGather):
        return mod.total == w.length
    if isinstance(mod, RouteScatter):
        return mod.length == w.length
    if isinstance(mod, RouteGatherParts):
        return any(total == w.length for _, axes, *_ in mod.parts for *_, total in axes)
    return False


def _mode_of(value: torch.Tensor):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if isinstance(value, FakeTensor):
        return value.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)
