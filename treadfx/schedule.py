"""Selection-ratio schedules, with an off-switch near the end of training.

Trainers report that routing costs a little final quality unless it is turned
off for the last part of training; others ramp the ratio.  A
:class:`RatioSchedule` sets the ratio of a transformed model once per step.
Ratios are rounded to multiples of ``quantum`` so that only a few distinct
kept-token counts K occur: ``torch.compile`` compiles one graph per distinct
K, never per ratio value.
"""

from __future__ import annotations

import math
from typing import Callable

from .api import set_ratio
from .errors import InvalidRouteError, TransformError
from .routes import check_ratio
from .transformed import state_of

__all__ = ["RatioSchedule"]

_KINDS = ("constant", "linear", "cosine")


class RatioSchedule:
    """Ratio as a function of the training step; call :meth:`step` once per optimizer step.

    ``kind``: "constant", "linear" or "cosine" from ``start`` to ``end`` over
    ``total_steps``, or a callable ``f(step) -> ratio``.  ``off_after``: the
    fraction of ``total_steps`` after which routing is off (ratio 0).
    ``quantum``: ratios are rounded to multiples of it (0 disables rounding).
    ``route``: the index of the one route it drives, or None for every route
    (then ``start`` defaults to route 0's ratio).
    ``state_dict``/``load_state_dict`` keep the step across checkpoints.
    """

    def __init__(self, model, total_steps: int, kind: str | Callable[[int], float] = "constant",
                 start: float | None = None, end: float | None = None, off_after: float | None = None,
                 quantum: float = 0.05, route: int | None = None):
        st = state_of(model)
        if not isinstance(total_steps, int) or total_steps < 1:
            raise TransformError(f"total_steps={total_steps!r} must be a positive int. Fix: pass the training length.")
        if not callable(kind) and kind not in _KINDS:
            raise TransformError(f"kind={kind!r} is not one of {_KINDS} or a callable. Fix: e.g. kind='linear'.")
        if off_after is not None and not 0.0 <= off_after <= 1.0:
            raise TransformError(f"off_after={off_after!r} must be a fraction in [0, 1]. Fix: e.g. off_after=0.9.")
        if quantum < 0 or quantum >= 1:
            raise TransformError(f"quantum={quantum!r} must be in [0, 1). Fix: e.g. 0.05, or 0 for exact ratios.")
        routes = st.config.routes
        if route is not None and (isinstance(route, bool) or not isinstance(route, int)
                                  or not 0 <= route < len(routes)):
            raise InvalidRouteError(
                f"route={route!r} but the model has {len(routes)} route(s). Fix: pass route=None (every route) or an "
                f"index in 0..{len(routes) - 1}."
            )
        current = routes[route or 0].ratio
        self.model, self.total_steps, self.kind = model, total_steps, kind
        self.start = check_ratio(current if start is None else start, "schedule start")
        self.end = check_ratio(self.start if end is None else end, "schedule end")
        self.off_after, self.quantum, self.route = off_after, quantum, route
        self.current_step = 0
        self.last_ratio: float | None = None

    def ratio_at(self, step: int) -> float:
        """The (rounded) ratio this schedule gives at ``step``."""
        if self.off_after is not None and step >= self.off_after * self.total_steps:
            return 0.0
        if callable(self.kind):
            r = check_ratio(float(self.kind(step)), "schedule value")
        else:
            frac = min(max(step / max(1, self.total_steps - 1), 0.0), 1.0)
            if self.kind == "constant":
                r = self.start
            elif self.kind == "linear":
                r = self.start + (self.end - self.start) * frac
            else:
                r = self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * frac))
        if self.quantum:
            r = round(r / self.quantum) * self.quantum
        return min(max(r, 0.0), 0.999)

    def step(self) -> float:
        """Apply the ratio of the current step to the model, advance the step; returns the ratio."""
        r = self.ratio_at(self.current_step)
        if r != self.last_ratio:
            set_ratio(self.model, r, route=self.route)
            self.last_ratio = r
        self.current_step += 1
        return r

    def state_dict(self) -> dict:
        return {"current_step": self.current_step}

    def load_state_dict(self, state: dict) -> None:
        self.current_step = int(state["current_step"])
        self.last_ratio = None
