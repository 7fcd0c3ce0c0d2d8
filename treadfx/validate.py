"""The last build stage's check: the routed graph runs on fake tensors and returns what the original returns.

The rewritten analysis graph is fake-run with every route active; each
output (scattered ones included: a scatter carries the fake value of the
node it restores) must have the original's shape and dtype, and each route
op must produce the fake value the pass recorded for it (``meta["val"]``).
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch
import torch.fx as fx

from .errors import StreamAnalysisError
from .fake_eval import no_user_hooks
from .ops import RouteSelect
from .tracing import TracedProgram

__all__ = ["check_routed_graph"]


def check_routed_graph(traced: TracedProgram, selects: Sequence[RouteSelect], n_outputs: int,
                       kept_rows: Collection[int] = ()) -> None:
    """Fake-run ``traced.gm`` with routes active; raise StreamAnalysisError (with the fix) when the first
    ``n_outputs`` outputs differ in shape or dtype from the traced ones, or the graph does not run.

    Guarantees: the route ops' modes (forced flag, kept count, fixed indices) are as they were afterwards.
    """
    saved = [(s.forced, s.num_keep, s.fixed) for s in selects]
    try:
        for sel in selects:
            sel.forced, sel.fixed = True, None
        with no_user_hooks():  # entered once for the run, not once per module evaluated (see no_user_hooks)
            env = traced.evaluator.propagate(traced.gm, list(traced.fake_inputs or []))
    except Exception as e:
        raise StreamAnalysisError(
            f"the routed graph does not run on fake tensors with the routes active: {type(e).__name__}: {e}. "
            "Fix: report this model to treadfx; meanwhile end the route earlier."
        ) from e
    finally:
        for sel, (f, k, fx_) in zip(selects, saved):
            sel.forced, sel.num_keep, sel.fixed = f, k, fx_
    output = next(n for n in traced.gm.graph.nodes if n.op == "output")
    outs = env[output][:n_outputs]
    originals = [n.meta.get("val") if isinstance(n, fx.Node) else n for n in output.args[0][:n_outputs]]
    for k, (a, b) in enumerate(zip(outs, originals)):
        if k in kept_rows:  # side_exits='kept' shortens these on purpose (checked by treadfx.side_exits)
            continue
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            raise StreamAnalysisError(
                f"with routing, output {k} has shape {list(a.shape)} {a.dtype} instead of {list(b.shape)} {b.dtype}. "
                "Fix: end the route before the tensor that changes shape."
            )
    for node in traced.gm.graph.nodes:
        if "treadfx" not in node.meta:
            continue
        got, want = env.get(node), node.meta.get("val")
        if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and got.shape != want.shape:
            raise StreamAnalysisError(
                f"route op `{node.name}` computes {list(got.shape)} with the routes active, but the pass recorded "
                f"{list(want.shape)}. Fix: report this model to treadfx; meanwhile end the route earlier."
            )
