"""Counting forward+backward FLOPs on fake tensors (no computation, any model size, any device).

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions, attention), so gathers, scatters and elementwise ops count zero
in routed and dense runs alike.  The backward pass is taken with
``torch.autograd.grad`` so no ``.grad`` of a real parameter is ever written.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from .errors import TransformError
from .fake_eval import FakeEvaluator

__all__ = ["fwd_bwd_flops"]


def fwd_bwd_flops(evaluator: FakeEvaluator, fn: Callable[..., Any], args: tuple, kwargs: dict,
                  params: list[torch.Tensor], backward: bool = True) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` plus, if ``backward``, the gradient of its float outputs'
    sum with respect to the float inputs that require grad and ``params``."""
    a, k = evaluator.fakeify((args, kwargs))
    real_params = [p for p in params if p.requires_grad]  # autograd leaves stay the real parameters
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()  # only the total is read; the per-module tracker's gradient hooks fail
    # under autograd.grad when a module gets a leaf tensor (a parameter) as an argument (Sana's norm_out)
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
                    total = sum(o.float().sum() for o in outs)
                    torch.autograd.grad(total, wrt, allow_unused=True)
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
