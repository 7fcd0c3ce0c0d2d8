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
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from .errors import TransformError
from .fake_eval import FakeEvaluator

__all__ = ["fwd_bwd_flops"]

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
    try:
        with evaluator.mode, counter, evaluator.live_modules_by_metadata():
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

    def _count_flops(self, func_packet, out, args, kwargs):
        if self.records is not None and func_packet in self.flop_registry:
            self.records.append((func_packet, args, kwargs, out, torch.is_grad_enabled()))
        return super()._count_flops(func_packet, out, args, kwargs)

    def add_backward(self, flops: int) -> None:
        """Add ``flops`` to the total (as FlopCounterMode attributes every count to "Global")."""
        self.flop_counts["Global"][aten.mm] += flops

    def derived_backward(self, outs: list[torch.Tensor]) -> int | None:
        """The FLOPs autograd's backward of ``sum(outs)`` would count, or None if a counted op it would
        differentiate has no rule here."""
        reached: set = set()
        todo = [o.grad_fn for o in outs if o.grad_fn is not None]
        while todo:
            fn = todo.pop()
            if fn in reached:
                continue
            reached.add(fn)
            todo.extend(nxt for nxt, _ in fn.next_functions if nxt is not None and nxt not in reached)
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
