"""The auxiliary loss over all routes (the earlier TREAD paper version's "adapted" loss).

With R routes and per-route masks m_r (1 where route r skipped a token)::

    L_route = 1/R * sum_r  mean over tokens kept by route r  of the per-token diffusion loss
    L_mae   = 1/R * sum_r  mean over tokens skipped by route r of the per-patch normalised
                           reconstruction error (MAE's norm_pix_loss)
    total   = L_route + lambda * L_mae

The per-token loss is the mean of the per-element loss map over each token's
pixels (or latent positions); the pixel->token mapping comes from the traced
graph (:mod:`treadfx.patch_map`).  When the last forward did not route (eval
mode, ratio 0, routes that skip nothing), or there was no forward yet, every
token counts as kept and ``total`` is the plain mean loss.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import TransformError
from .patch_map import TokenMap
from .transformed import RoutedProgram, state_of

__all__ = ["RouteLoss", "route_loss", "token_map"]


@dataclasses.dataclass
class RouteLoss:
    """The terms of the route loss; ``total`` is what to backpropagate."""

    total: torch.Tensor
    route: torch.Tensor
    mae: torch.Tensor | None
    per_route: list[torch.Tensor]
    routed: bool


def token_map(model) -> TokenMap:
    """The pixel->token mapping of the last routed forward's graph (derived once, then cached)."""
    st = state_of(model)
    prog = st.last_program or st.current
    if prog is None:
        raise TransformError(
            "treadfx has not traced this model yet, so it does not know how pixels map to tokens. Fix: run one "
            "training forward first (or treadfx.prepare(model, *example_inputs))."
        )
    return prog.token_map()


def _norm_pix_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token MAE error: target patches normalised by their own mean/std (eps 1e-6), squared error, mean."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    t = (target - mean) / (var + 1.0e-6) ** 0.5
    return ((pred - t) ** 2).mean(dim=-1)


def _skipped_masks(prog: RoutedProgram, last_kept, batch: int) -> list[torch.Tensor]:
    """[B, N] bool masks, True where a route with ``aux_loss`` skipped a token in the last forward."""
    masks = []
    for plan, kept in zip(prog.plans, last_kept):
        if kept is None or not getattr(plan.route, "aux_loss", True):
            continue
        rows = kept if kept.ndim == 2 else kept.unsqueeze(0).expand(batch, -1)
        mask = torch.ones(rows.shape[0], plan.num_tokens, dtype=torch.bool, device=rows.device)
        masks.append(mask.scatter(1, rows, False))
    return masks


def route_loss(model, loss_map: torch.Tensor, *, pred: torch.Tensor | None = None,
               target: torch.Tensor | None = None, mae_weight: float | None = None) -> RouteLoss:
    """The route-aware loss of the last forward of ``model``.

    ``loss_map`` is the per-element diffusion loss, ``[B, C, H, W]`` in the
    image input's space or ``[B, N]`` / ``[B, N, *]`` per image token.
    ``pred``/``target`` (same layouts) feed the MAE-style term, weighted by
    ``mae_weight`` (default: the model's ``mae_weight`` from ``transform``, else
    0).  Guarantees: ``total`` is differentiable wherever ``loss_map`` is; with
    no routed tokens it equals ``loss_map.mean()`` (up to float rounding of the
    per-token means).
    """
    st = state_of(model)
    weight = st.config.mae_weight if mae_weight is None else float(mae_weight)
    prog = st.last_program
    if prog is None:  # no forward yet: nothing was routed, every token counts
        mean = loss_map.float().mean()
        return RouteLoss(mean, mean, torch.zeros((), device=mean.device) if weight else None, [], False)
    masks = _skipped_masks(prog, st.last_kept, loss_map.shape[0])
    tmap = prog.token_map()
    per_token = tmap.per_token(loss_map)
    if not masks:
        mean = per_token.mean()
        return RouteLoss(mean, mean, torch.zeros((), device=mean.device) if weight else None, [], False)
    per_route = []
    for m in masks:
        kept = (~m).to(per_token.dtype)
        per_route.append((per_token * kept).sum() / kept.sum().clamp_min(1))
    l_route = torch.stack(per_route).mean()
    l_mae = None
    if weight:
        if pred is None or target is None:
            raise TransformError(
                f"mae_weight={weight} needs the prediction and the reconstruction target. Fix: call "
                "treadfx.route_loss(model, loss_map, pred=model_output, target=clean_input) or set mae_weight=0."
            )
        err = _norm_pix_error(tmap.patchify(pred).float(), tmap.patchify(target).float())
        terms = []
        for m in masks:
            sk = m.to(err.dtype)
            terms.append((err * sk).sum() / sk.sum().clamp_min(1))
        l_mae = torch.stack(terms).mean()
    total = l_route + weight * l_mae if l_mae is not None else l_route
    return RouteLoss(total, l_route, l_mae, per_route, True)
