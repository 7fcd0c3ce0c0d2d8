"""Counting forward+backward FLOPs on fake tensors (no computation, any model size, any device).

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions, attention), so gathers, scatters and elementwise ops count zero
in routed and dense runs alike.

The backward count is derived from the forward without running the backward
pass (which costs more than the forward on fake tensors): autograd's backward
of a counted op is known exactly -- a matmul (``mm``/``addmm``/``bmm``/
``baddbmm``) costs one matmul of the forward's size per matrix operand that
requires grad, a convolution one ``convolution_backward`` with that operand
mask, an attention kernel one attention backward -- and it runs only for
counted ops whose output reaches the outputs through autograd's graph.  A
counted op outside those rules falls back to ``torch.autograd.grad`` (which
never writes a ``.grad`` of a real parameter), so the count always equals
FlopCounterMode's over a real forward+backward.

A submodule whose sizes depend on the data (a mixture of experts' boolean-mask
dispatch, see :meth:`FakeEvaluator.is_data_dependent`) is counted on its own
with unbacked sizes (:func:`data_dependent_flops`): exactly when the count
cannot depend on the data (identical experts that together take every
dispatched token), else it is left out and
:func:`treadfx.fake_eval.data_dependent_summary` names it and says why.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from .errors import TransformError
from .fake_eval import FakeEvaluator

__all__ = ["fwd_bwd_flops", "data_dependent_flops"]

aten = torch.ops.aten


def fwd_bwd_flops(evaluator: FakeEvaluator, fn: Callable[..., Any], args: tuple, kwargs: dict,
                  params: list[torch.Tensor], backward: bool = True) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` plus, if ``backward``, the gradient of its float outputs'
    sum with respect to the float inputs that require grad and ``params``."""
    a, k = evaluator.fakeify((args, kwargs))
    real_params = [p for p in params if p.requires_grad]  # autograd leaves stay the real parameters
    counter = _RecordingCounter(backward)
    with evaluator.mode:
        # FlopCounterMode's module tracker cannot hook leaf tensors under autograd.grad: use views
        # (and detach: fake values from a trace carry the history of the whole model before them)
        a, k = pytree.tree_map(
            lambda x: x.detach().requires_grad_(True).view_as(x) if isinstance(x, torch.Tensor) and x.requires_grad
            else x, (a, k))
    inside = _DataDependentCounts(evaluator, counter, backward)
    try:
        with evaluator.mode, counter, evaluator.live_modules_by_metadata(inside):
            out = fn(*a, **k)
            if backward:
                outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
                wrt = [x for x in pytree.tree_leaves((a, k)) if isinstance(x, torch.Tensor) and x.requires_grad]
                wrt += real_params
                if outs and wrt:
                    derived = counter.derived_backward(outs)
                    if derived is None:  # a counted op without a known backward: run autograd's
                        total = sum(o.float().sum() for o in outs)
                        torch.autograd.grad(total, wrt, allow_unused=True)
                    else:
                        counter.add_backward(derived)
                    counter.add_backward(counter.opaque_backward(outs))
    except TransformError:
        raise
    except Exception as e:  # a torch error on fake tensors is a treadfx error with advice, never a raw one
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise TransformError(
            f"counting FLOPs of `{name}` on fake tensors failed: {type(e).__name__}: {e}. Training is not affected "
            "(the count never runs the model). Fix: if the model uses tensor data in Python (asserts, .tolist()) in "
            "a submodule, name it with transform(..., leaf_modules=[...]); otherwise report this model to treadfx."
        ) from e
    return int(counter.get_total_flops())


_MATMULS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}  # the matrix operands
_ATTENTION = {aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
              aten._scaled_dot_product_cudnn_attention}


class _RecordingCounter(FlopCounterMode):
    """FlopCounterMode counting the total only, which also records each counted op (when ``record``) so that
    :meth:`derived_backward` can derive the backward count without running the backward."""

    def __init__(self, record: bool):
        super().__init__(display=False)
        self.mod_tracker = _TotalOnly()  # only the total is read; the per-module tracker's gradient hooks fail
        # under autograd.grad when a module gets a leaf tensor (a parameter) as an argument (Sana's norm_out)
        self.records: list[tuple[Any, tuple, dict, Any, bool]] | None = [] if record else None
        # (an output of a data-dependent submodule counted symbolically, that submodule's backward FLOPs)
        self.opaque: list[tuple[torch.Tensor, int]] = []

    def _count_flops(self, func_packet, out, args, kwargs):
        if self.records is not None and func_packet in self.flop_registry:
            self.records.append((func_packet, args, kwargs, out, torch.is_grad_enabled()))
        return super()._count_flops(func_packet, out, args, kwargs)

    def add_backward(self, flops: int) -> None:
        """Add ``flops`` to the total (as FlopCounterMode attributes every count to "Global")."""
        self.flop_counts["Global"][aten.mm] += flops

    def opaque_backward(self, outs: list[torch.Tensor]) -> int:
        """The backward FLOPs of the data-dependent submodules (counted on their own, see :class:`_DataDependentCounts`)
        whose outputs autograd's backward of ``sum(outs)`` reaches."""
        if not self.opaque:
            return 0
        reached = _reached(outs)
        return sum(flops for out, flops in self.opaque if out.grad_fn in reached)

    def derived_backward(self, outs: list[torch.Tensor]) -> Any:
        """The FLOPs autograd's backward of ``sum(outs)`` would count, or None if a counted op it would
        differentiate has no rule here (an int; a symbolic integer when sizes are unbacked symbols)."""
        reached = _reached(outs)
        total = 0
        for packet, args, kwargs, out, grad_mode in self.records or []:
            first = next((o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)), None)
            needs = [isinstance(x, torch.Tensor) and x.requires_grad for x in args]
            if first is not None and first.grad_fn is None and grad_mode and any(needs):
                return None  # differentiated by a node of its own (a decomposed op's part): no rule here
            if first is None or first.grad_fn not in reached:
                continue  # not differentiated: no backward op runs for it
            if packet in _MATMULS and not kwargs:
                forward = self.flop_registry[packet](*args, out_val=out)
                total += forward * sum(needs[i] for i in _MATMULS[packet])  # one matmul per operand's grad
            elif packet is aten.convolution and len(args) == 9 and not kwargs:
                x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args
                mask = [needs[0], needs[1], bias is not None and needs[2]]
                if any(mask):
                    total += self.flop_registry[aten.convolution_backward](
                        out, x, w, None if bias is None else list(bias.shape), stride, padding, dilation, transposed,
                        output_padding, groups, mask, out_val=(x, w, None))
            elif packet in _ATTENTION and not kwargs:
                if any(needs[:3]):
                    total += sdpa_backward_flop_count(first.shape, args[0].shape, args[1].shape, args[2].shape)
            else:
                return None
        return total


def _reached(outs: list[torch.Tensor]) -> set:
    """The autograd nodes a backward of ``sum(outs)`` runs through."""
    reached: set = set()
    todo = [o.grad_fn for o in outs if o.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn in reached:
            continue
        reached.add(fn)
        todo.extend(nxt for nxt, _ in fn.next_functions if nxt is not None and nxt not in reached)
    return reached


class _TotalOnly:
    """A stand-in for FlopCounterMode's module tracker that attributes every FLOP to "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def module_params(module: nn.Module) -> list[torch.Tensor]:
    """The trainable parameters of ``module`` (those a backward pass computes gradients for)."""
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------- data-dependent submodules, counted symbolically
#
# A submodule whose sizes depend on tensor values (a mixture of experts' ``y[idx == i] = expert_i(x[idx == i])``) is
# evaluated on fake tensors whose data-dependent sizes are unbacked symbols u_i (see FakeEvaluator._symbolic_call).
# FlopCounterMode's formulas then give its FLOPs as an expression in those symbols.  The expression is made a number
# only where that is exact for every value of the data: each u_i is the number of entries ``t == c_i`` of one
# integer tensor t whose values all lie in [lo, hi) (top-k or argmax indices over a dimension of size hi), the
# constants c_i cover [lo, hi) and the expression is linear in the u_i of t with one coefficient a.  Then
# sum_i a * u_i = a * t.numel() whatever t holds.  Otherwise the submodule is left out, and why is noted.

#: ops whose output (the indices output of a pair) holds indices into one dimension: (op, position of the indices)
_INDEX_OUTPUTS = {aten.topk: 1, aten.sort: 1, aten.argmax: None, aten.argmin: None, aten.max: 1, aten.min: 1}
#: ops whose output holds exactly the values of their first argument, rearranged (the same multiset)
_SAME_VALUES = {aten.view, aten._unsafe_view, aten.reshape, aten.clone, aten.alias, aten.permute, aten.transpose,
                aten.t, aten.squeeze, aten.unsqueeze, aten.detach, aten.lift_fresh}


def _index_range(func, args: tuple, kwargs: dict) -> int | None:
    """``hi`` when the index output of ``func(*args, **kwargs)`` holds indices in [0, hi), else None."""
    x = args[0]
    if not isinstance(x, torch.Tensor):
        return None
    packet = func.overloadpacket
    if packet in (aten.argmax, aten.argmin):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
    elif packet in (aten.max, aten.min):
        if func._overloadname != "dim":
            return None
        dim = args[1]
    elif packet is aten.topk:
        dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    else:  # sort
        if func._overloadname != "default":
            return None
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
    size = x.numel() if dim is None else (x.shape[dim] if x.ndim else 1)
    return size if type(size) is int else None


def _unbacked_symbol(d: Any) -> Any:
    """The unbacked symbol a size is, or None (a concrete size, or an expression of symbols)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol and free_unbacked_symbols(d):
        return d.node.expr
    return None


class _SizeOrigins(TorchDispatchMode):
    """Records during a symbolic evaluation which unbacked sizes are counts of ``t == c`` over index tensors.

    ``groups[g]`` is ``(numel, lo, hi)`` of an index tensor (and every rearrangement of it, which holds the same
    values); ``counts[u]`` is ``(g, c)`` when the size ``u`` is the number of entries ``== c`` of group ``g`` (the
    rows a boolean mask ``t == c`` selects, or the length of its ``nonzero``)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[tuple[int, int, int]] = []
        self.counts: dict[Any, tuple[int, int]] = {}
        self._values: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor, group)
        self._masks: dict[int, tuple[torch.Tensor, int, int]] = {}  # id -> (mask, group, c)

    def _group(self, t: Any) -> int | None:
        hit = self._values.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else None

    def _mask(self, t: Any) -> tuple[int, int] | None:
        hit = self._masks.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1:] if hit is not None and hit[0] is t and t.dtype == torch.bool else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        src = args[0] if args else None
        if packet in _INDEX_OUTPUTS:
            pos = _INDEX_OUTPUTS[packet]
            idx = out if pos is None else (out[pos] if isinstance(out, (tuple, list)) else None)
            hi = _index_range(func, args, kwargs)
            if isinstance(idx, torch.Tensor) and hi is not None and type(idx.numel()) is int and idx.numel():
                self.groups.append((idx.numel(), 0, hi))
                self._values[id(idx)] = (idx, len(self.groups) - 1)
        elif packet in _SAME_VALUES and self._group(src) is not None:
            if (isinstance(out, torch.Tensor) and out.dtype == src.dtype  # not a bit reinterpretation (view.dtype)
                    and type(out.numel()) is int and out.numel() == src.numel()):
                self._values[id(out)] = (out, self._group(src))
        elif func is aten.eq.Scalar and self._group(src) is not None and type(args[1]) is int:
            self._masks[id(out)] = (out, self._group(src), args[1])
        elif packet is aten.index and isinstance(out, torch.Tensor) and len(args) > 1:
            given = [(i, ix) for i, ix in enumerate(args[1]) if ix is not None]
            if len(given) == 1 and self._mask(given[0][1]) is not None:
                pos, mask = given[0]
                if tuple(src.shape[pos:pos + mask.ndim]) == tuple(mask.shape):  # the mask selects, never broadcast
                    self._count(out.shape[pos], mask)
        elif packet is aten.nonzero and self._mask(src) is not None and isinstance(out, torch.Tensor):
            self._count(out.shape[0], src)
        return out

    def _count(self, size: Any, mask: torch.Tensor) -> None:
        sym = _unbacked_symbol(size)
        if sym is not None and sym not in self.counts:
            self.counts[sym] = self._mask(mask)


def _exact(value: Any, origins: _SizeOrigins, shape_env: Any, what: str) -> int | str:
    """``value`` (an int, or a symbolic int in unbacked sizes) as the int it is for every value of the data, or why
    it is not one (see the comment above :data:`_INDEX_OUTPUTS`); ``what`` names the count ("forward")."""
    if type(value) is int:
        return value
    import sympy

    expr = sympy.expand(shape_env.replace(value.node.expr))
    counts = {shape_env.replace(s): origin for s, origin in origins.counts.items()}
    canon: dict[tuple[int, int], Any] = {}
    subs = {}
    for s in sorted(expr.free_symbols, key=str):
        origin = counts.get(s)
        if origin is None:
            return (f"a size computed from the data (`{s}`) is not the number of entries `t == c` of top-k or argmax "
                    "indices t")
        subs[s] = canon.setdefault(origin, s)
    expr = sympy.expand(expr.xreplace(subs))
    total = expr.xreplace({s: 0 for s in expr.free_symbols})
    by_group: dict[int, dict[int, Any]] = {}
    for (g, c), s in canon.items():
        coeff = sympy.diff(expr, s)
        if coeff.free_symbols:
            return ("the count is not linear in the numbers of tokens each expert gets (for example attention among "
                    "one expert's tokens), so it depends on how the data splits them")
        by_group.setdefault(g, {})[c] = coeff
    for g, by_c in by_group.items():
        numel, lo, hi = origins.groups[g]
        if set(by_c) != set(range(lo, hi)):
            return (f"tokens are dispatched by `t == c` for c in {sorted(by_c)} only, but the indices t take values "
                    f"in [{lo}, {hi}), so how many tokens are counted depends on the data")
        if len(set(by_c.values())) != 1:
            per = ", ".join(f"`== {c}`: {int(by_c[c])}" for c in sorted(by_c))
            return (f"the {what} FLOPs per token differ between the experts ({per}), so the total depends on which "
                    "expert each token picks")
        total += next(iter(by_c.values())) * numel
    if total.free_symbols:  # pragma: no cover - every symbol was substituted above
        return f"the count {total} stays symbolic"
    return int(total)


#: process-wide: (class, structure, input metadata, parameters' requires_grad, backward, grad mode, dtype state) ->
#: (forward FLOPs, backward FLOPs, per tensor input: whether the backward reaches it) or why they are not exact
_SYMBOLIC: dict[tuple, tuple[int, int, tuple[bool, ...]] | str] = {}


def data_dependent_flops(module: nn.Module, args: tuple, kwargs: dict,
                         backward: bool = True) -> tuple[int, int, tuple[bool, ...]] | str:
    """FLOPs inside a submodule whose sizes depend on tensor data, exact for every value of the data, or why not.

    The module runs on fake tensors with unbacked sizes (no data, no user hook): ``(forward, backward, reached)``,
    where backward is the count of the gradient of its float outputs' sum with respect to its parameters and float
    inputs that require grad (0 unless ``backward`` and grad mode), and ``reached[i]`` says whether that gradient
    flows to the i-th tensor input; or a sentence saying why the count cannot be exact."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from .fake_eval import dtype_state, fake_like, forward_of, meta_key, module_structure_key, no_user_hooks, \
        quiet_fake_tensor_logs

    backward = backward and torch.is_grad_enabled()
    key = (type(module), module_structure_key(module), meta_key((tuple(args), dict(kwargs))),
           tuple(p.requires_grad for p in module.parameters()), backward, torch.is_grad_enabled(), dtype_state())
    hit = _SYMBOLIC.get(key)
    if hit is not None:
        return hit
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)

    def sym(x):
        if not isinstance(x, torch.Tensor):
            return x
        out = fake_like(x, mode)
        if not (x.requires_grad and out.is_floating_point()):
            return out.detach()
        with mode:
            return out.view_as(out)  # a node of its own, which a backward can be seen to reach

    a, k = pytree.tree_map(sym, (args, kwargs))
    inputs = [x for x in pytree.tree_leaves((a, k)) if isinstance(x, torch.Tensor)]
    counter = _RecordingCounter(backward)
    origins = _SizeOrigins()
    try:
        with quiet_fake_tensor_logs(), mode, counter, origins, no_user_hooks():
            out = forward_of(module)(*a, **k)
            fwd, bwd, reached = counter.get_total_flops(), 0, set()
            outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [x for x in inputs if x.requires_grad] + module_params(module)
            if backward and outs and wrt:
                reached = _reached(outs)
                derived = counter.derived_backward(outs)
                if derived is None:  # a counted op without a known backward: run autograd's
                    torch.autograd.grad(sum(o.float().sum() for o in outs), wrt, allow_unused=True)
                    bwd = counter.get_total_flops() - fwd
                else:
                    bwd = derived
        result: Any = (_exact(fwd, origins, mode.shape_env, "forward"),
                          _exact(bwd, origins, mode.shape_env, "backward"))
    except Exception as e:  # noqa: BLE001 - any failure leaves the submodule out, with the reason
        result = f"counting its FLOPs with symbolic sizes failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if not isinstance(result, str):
        why = next((r for r in result if isinstance(r, str)), None)
        result = why if why is not None else (
            result[0], result[1], tuple(x.grad_fn is not None and x.grad_fn in reached for x in inputs))
    if len(_SYMBOLIC) >= 4096:
        _SYMBOLIC.clear()
    _SYMBOLIC[key] = result
    return result


class _Joined(torch.autograd.Function):
    """Outputs (fresh fakes) joined to inputs in autograd's graph: a backward of what they reach reaches these inputs
    (with zero gradients; a data-dependent submodule's backward FLOPs are counted on their own)."""

    @staticmethod
    def forward(ctx, n_in, differentiable, *tensors):
        ctx.metas = [(tuple(t.shape), t.dtype, t.device) for t in tensors[:n_in]]
        ctx.n_out = len(tensors) - n_in
        outs = tuple(t.clone() for t in tensors[n_in:])
        ctx.mark_non_differentiable(*[o for o, d in zip(outs, differentiable) if not d])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        zeros = [torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.metas]
        return (None, None, *zeros, *([None] * ctx.n_out))


class _DataDependentCounts:
    """The call of a data-dependent submodule inside :func:`fwd_bwd_flops`: its outputs' metadata from
    :meth:`FakeEvaluator.call_module`, joined in autograd's graph to the inputs its backward reaches, and its FLOPs
    added to ``counter`` where :func:`data_dependent_flops` makes them exact (else noted as left out)."""

    def __init__(self, evaluator: FakeEvaluator, counter: _RecordingCounter, backward: bool):
        self.evaluator, self.counter, self.backward = evaluator, counter, backward

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        from torch.utils._python_dispatch import _disable_current_modes

        from .fake_eval import note_uncounted_flops

        with _disable_current_modes():  # neither the caller's counter nor its fake mode: both evaluations own theirs
            out = self.evaluator.call_module(module, args, kwargs)
            counted = data_dependent_flops(module, args, kwargs, self.backward)
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if isinstance(counted, str):
            note_uncounted_flops(module, counted)
            reached = tuple(x.requires_grad for x in inputs)  # not known: every input that requires grad
        else:
            fwd, bwd, reached = counted
            self.counter.add_backward(fwd)  # (adds to the total)
        flat, spec = pytree.tree_flatten(out)
        pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        differentiable = tuple(flat[i].requires_grad for i in pos)
        if not any(differentiable):
            return out
        leaves = [x for x, r in zip(inputs, reached) if r and x.requires_grad]
        anchor = torch.zeros((), requires_grad=True)  # outputs that need a gradient have a node even without inputs
        joined = _Joined.apply(1 + len(leaves), differentiable, anchor, *leaves, *[flat[i].detach() for i in pos])
        for i, t in zip(pos, joined):
            flat[i] = t
        if not isinstance(counted, str) and counted[1]:
            first = next(t for t, d in zip(joined, differentiable) if d)
            self.counter.opaque.append((first, counted[1]))
        return pytree.tree_unflatten(flat, spec)
