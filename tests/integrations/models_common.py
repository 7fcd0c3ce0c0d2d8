"""Checks shared by the integration tests: gradients of a training step, FLOPs of a step, comparisons.

Nothing here calls treadfx: the expected values come from the original modules (hand-written references) and
from torch's own FLOP counter.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every parameter that requires grad, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def step_grads(loss: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Gradient of ``loss`` with respect to every trainable parameter (None where unused); ``.grad`` untouched."""
    named = trainable(model)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


def assert_grads_match(got: dict, want: dict, rtol: float = 1e-5) -> None:
    """Same parameters learn (None where the reference has None), values equal up to float summation order.

    The saved stream's gradient is summed from the route-out and route-in in an order that depends on the
    autograd graph, so the tolerance is relative to the gradient's scale, floored at a small fraction of the
    largest gradient of the model (parameters whose exact gradient is 0 carry rounding noise only).
    """
    assert got.keys() == want.keys()
    floor = 1e-5 * max(float(g.abs().max()) for g in want.values() if g is not None)
    for name, w in want.items():
        g = got[name]
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=1e-5 * float(w.abs().max()) + floor, msg=name)


def step_flops(loss_fn: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """FLOPs (torch's FlopCounterMode, real tensors) of ``loss_fn()`` plus its gradient w.r.t. the parameters.

    Counted on a second call: a transformed model's first call with a new input signature traces, and the
    analysis runs block forwards of its own that are not part of a training step.
    """
    params = [p for _, p in trainable(model)]
    torch.autograd.grad(loss_fn(), params, allow_unused=True)
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn()
        torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())


def assert_flop_saving_as_predicted(report, dense_step: int, routed_step: int, rel: float = 0.01) -> None:
    """The measured saving of a whole training step (loss included) is what ``treadfx.inspect`` predicts for
    the model call, within ``rel``; the loss's own FLOPs are the same in both steps."""
    predicted = report.dense_flops - report.predicted_routed_flops
    assert predicted > 0
    assert abs((dense_step - routed_step) - predicted) <= rel * predicted, (dense_step - routed_step, predicted)
