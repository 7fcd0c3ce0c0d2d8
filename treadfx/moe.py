"""DiffMoE runtime: the expert-choice mixture-of-experts layer, its loss and its compute statistics.

:class:`DiffMoELayer` replaces a block's feed-forward network (see
``treadfx.diffmoe``).  Its state (parameters and buffers, i.e. its
``state_dict`` keys below the FFN's path) is::

    experts.<e>.<FFN keys>      E copies of the original FFN (slightly perturbed)
    gate.weight                 [E, D] router W_g (no bias)
    predictor.0.weight/.bias    [D, D] capacity predictor, layer 1
    predictor.2.weight/.bias    [E, D] capacity predictor, layer 2
    shared_expert.<FFN keys>    only with shared_expert=True: the original FFN
    thresholds                  [E] float32 buffer: EMA of the k-th largest predictor logit per expert
    threshold_steps             [] int64 buffer: number of training batches folded into ``thresholds``

The layer works on a *pool*: every token of the call (``x`` is ``[..., D]``;
all leading dims are flattened, so the pool of a ``[B, N, D]`` call is the
``S = B * N`` tokens of the whole batch; inside a TREAD route ``S = B * K``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DiffMoELayer", "expert_capacity", "diffmoe_layers", "diffmoe_loss", "diffmoe_stats", "DiffMoEStats",
    "LayerStats", "ffn_flops_per_token",
]


def expert_capacity(pool: int, num_experts: int, capacity: float) -> int:
    """Tokens each expert takes from a pool of ``pool`` tokens in training: ``int(S / E * capacity)``,
    clamped to ``1..S`` (so a tiny pool still reaches every expert and ``capacity > E`` cannot overflow)."""
    return max(1, min(pool, int(pool / num_experts * capacity)))


def _is_fake(x: torch.Tensor) -> bool:
    """True for tensors of shape inference (treadfx tracing, FlopCounter on fakes), never under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) or x.device.type == "meta"


def ffn_flops_per_token(ffn: nn.Module, dim: int) -> int:
    """Forward FLOPs of ``ffn`` per token, counted by ``FlopCounterMode`` on fake tensors (matmuls only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    p = next(ffn.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, counter, torch.no_grad():
        x = torch.empty(1, 4, dim, dtype=dtype, device=device)
        ffn(x)
    del mode
    return int(counter.get_total_flops()) // 4


class DiffMoELayer(nn.Module):
    """DiffMoE feed-forward layer: batch-level global token pool, expert choice, capacity predictor.

    Training: router probabilities ``softmax(x W_g)`` per token; expert ``e``
    takes the ``k = expert_capacity(S, E, capacity)`` pool tokens with the
    highest probability for it; its output, times that probability, is
    scatter-added back (plus the shared expert, if any).  The capacity
    predictor (``D -> D -> E`` MLP on detached features) learns the selection
    mask with BCE-with-logits; ``thresholds`` follow the EMA of its k-th
    largest logit per expert (mean over ranks under ``torch.distributed``).

    Eval: expert ``e`` takes the tokens whose predictor logit is
    ``>= thresholds[e]`` (dynamic compute); eagerly only those tokens are
    computed; under ``torch.compile`` (or on fake tensors) every expert runs
    on every token and is masked, same result, static shapes.  Before the
    first training batch (``threshold_steps == 0``) eval uses the training
    selection (top-k per expert).
    """

    def __init__(self, ffn: nn.Module, dim: int, num_experts: int = 8, capacity: float = 1.0,
                 shared_expert: bool = False, predictor_loss_weight: float = 1.0, threshold_decay: float = 0.95,
                 noise_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        import copy

        self.dim = int(dim)
        self.num_experts = int(num_experts)
        self.capacity = float(capacity)
        self.predictor_loss_weight = float(predictor_loss_weight)
        self.threshold_decay = float(threshold_decay)
        self.noise_std = float(noise_std)
        p = next(ffn.parameters())
        factory = dict(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
        self.experts = nn.ModuleList()
        for _ in range(self.num_experts):
            expert = copy.deepcopy(ffn)
            if self.noise_std > 0:
                with torch.no_grad():
                    for w in expert.parameters():
                        if w.is_floating_point() and w.numel() > 1 and w.device.type != "meta":
                            scale = float(w.float().std())
                            if scale > 0:
                                noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)
                                w.add_((noise * (self.noise_std * scale)).to(w.device, w.dtype))
            self.experts.append(expert)
        self.gate = nn.Linear(self.dim, self.num_experts, bias=False, **factory)
        self.predictor = nn.Sequential(
            nn.Linear(self.dim, self.dim, **factory), nn.SiLU(), nn.Linear(self.dim, self.num_experts, **factory))
        with torch.no_grad():
            if self.gate.weight.device.type != "meta":
                g = torch.randn(self.gate.weight.shape, generator=generator, dtype=torch.float32) * 0.02
                self.gate.weight.copy_(g.to(self.gate.weight.device, self.gate.weight.dtype))
        self.shared_expert = ffn if shared_expert else None
        self.register_buffer("thresholds", torch.zeros(self.num_experts, dtype=torch.float32, device=p.device))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64, device=p.device))
        self.ffn_flops_per_token = ffn_flops_per_token(ffn, self.dim)
        self.expert_params = sum(q.numel() for q in ffn.parameters())
        self._last: dict[str, Any] = {}

    # ------------------------------------------------------------------ pieces
    def selection_mask(self, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert choice on a pool: (indices [E, k], gate values [E, k], mask [S, E] float of 0/1)."""
        vals, idx = probs.t().topk(k, dim=1)
        mask = torch.zeros(probs.shape[1], probs.shape[0], dtype=probs.dtype, device=probs.device)
        mask = mask.scatter(1, idx, 1.0).t()
        return idx, vals, mask

    @torch.no_grad()
    def update_thresholds(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Fold one training batch into ``thresholds``: EMA (``threshold_decay``) of the k-th largest
        ``scores[:, e]`` (predictor logits ``[S, E]``); the first batch sets it; mean over ranks."""
        kth = scores.detach().float().t().topk(k, dim=1).values[:, -1]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            kth = kth.clone()
            torch.distributed.all_reduce(kth)
            kth = kth / torch.distributed.get_world_size()
        d = self.threshold_decay
        new = torch.where(self.threshold_steps == 0, kth, d * self.thresholds + (1 - d) * kth)
        self.thresholds.copy_(new)
        self.threshold_steps.add_(1)
        return kth

    def _experts(self, x: torch.Tensor, args: tuple, kwargs: dict, idx: list, weights: list) -> torch.Tensor:
        ys, flat = [], []
        for expert, ix, w in zip(self.experts, idx, weights):
            if ix is None:
                continue
            y = expert(x.index_select(0, ix), *args, **kwargs)
            ys.append(y * w.unsqueeze(-1).to(y.dtype))
            flat.append(ix)
        if not ys:
            out = x.new_zeros(x.shape[0], self.dim)
        else:
            y = torch.cat(ys) if len(ys) > 1 else ys[0]
            out = y.new_zeros(x.shape[0], y.shape[-1]).index_add(0, torch.cat(flat) if len(flat) > 1 else flat[0], y)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        S, E = h.shape[0], self.num_experts
        fake = _is_fake(h)
        probs = F.softmax(self.gate(h).float(), dim=-1)  # [S, E]
        k = expert_capacity(S, E, self.capacity)
        if self.training:
            idx, vals, mask = self.selection_mask(probs, k)
            out = self._experts(h, args, kwargs, list(idx.unbind(0)), list(vals.unbind(0)))
            scores = self.predictor(h.detach()).float()
            loss = F.binary_cross_entropy_with_logits(scores, mask) * self.predictor_loss_weight
            if not fake:
                self.update_thresholds(scores, k)
                self._last = {"loss": loss, "counts": mask.sum(0), "pool": S, "mode": "train"}
        else:
            scores = self.predictor(h).float()
            sel = scores >= self.thresholds.to(scores.dtype)
            static = fake or torch.compiler.is_compiling()
            if static:  # masked: full compute, static shapes
                _, _, topk_mask = self.selection_mask(probs, k)
                sel = torch.where(self.threshold_steps == 0, topk_mask > 0, sel)
                w = probs * sel.to(probs.dtype)
                out = None
                for e, expert in enumerate(self.experts):
                    y = expert(h, *args, **kwargs)
                    y = y * w[:, e].unsqueeze(-1).to(y.dtype)
                    out = y if out is None else out + y
            else:  # dynamic: each expert computes only its tokens
                if int(self.threshold_steps) == 0:
                    _, _, topk_mask = self.selection_mask(probs, k)
                    sel = topk_mask > 0
                idx, wts = [], []
                for e in range(E):
                    ix = sel[:, e].nonzero().squeeze(1)
                    idx.append(ix if ix.numel() else None)
                    wts.append(probs.index_select(0, ix)[:, e])
                out = self._experts(h, args, kwargs, idx, wts)
            if not fake:
                self._last = {"loss": None, "counts": sel.sum(0), "pool": S,
                              "mode": "eval (masked)" if static else "eval"}
        if self.shared_expert is not None:
            out = out + self.shared_expert(h, *args, **kwargs)
        return out.reshape(*shape[:-1], out.shape[-1])

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_last"] = {}  # the last forward's loss carries autograd history: never copied or pickled
        return state

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, capacity={self.capacity:g}, "
                f"shared_expert={self.shared_expert is not None}")

    # ------------------------------------------------------------------ accounting
    def router_params(self) -> int:
        """Parameters of the router ``W_g`` (``E * D``)."""
        return self.gate.weight.numel()

    def predictor_params(self) -> int:
        """Parameters of the capacity predictor (``D*D + D + D*E + E``)."""
        return sum(p.numel() for p in self.predictor.parameters())


# ---------------------------------------------------------------------------------------- model-level API


def diffmoe_layers(model: nn.Module) -> list[tuple[str, DiffMoELayer]]:
    """Every DiffMoE layer of ``model`` (through torch.compile / DDP wrappers) with its path, in module order."""
    inner = model
    for attr in ("_orig_mod", "module"):
        sub = inner._modules.get(attr) if isinstance(inner, nn.Module) else None
        if isinstance(sub, nn.Module) and not any(True for _ in inner.parameters(recurse=False)):
            inner = sub
    return [(n, m) for n, m in inner.named_modules() if isinstance(m, DiffMoELayer)]


def diffmoe_loss(model: nn.Module) -> torch.Tensor:
    """Capacity-predictor loss of the last training forward: the sum over DiffMoE layers of
    ``predictor_loss_weight * BCE-with-logits(predictor logits, selection mask)``.

    A zero tensor when the model has no DiffMoE layer or the last forward was
    not a training forward.  Add it to the diffusion loss before ``backward``;
    the predictor sees detached features, so it never changes the backbone.
    """
    losses = [m._last["loss"] for _, m in diffmoe_layers(model) if m._last.get("loss") is not None]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    total = losses[0]
    for l in losses[1:]:
        total = total + l
    return total


@dataclasses.dataclass
class LayerStats:
    """Compute of one DiffMoE layer in the last forward (forward FLOPs, matmuls only)."""

    path: str
    mode: str                      # "train", "eval" or "eval (masked)"
    pool_tokens: int               # S
    tokens_per_expert: list[int]
    dense_ffn_flops: int           # S * FLOPs of one FFN call per token
    activated_ffn_flops: int       # sum_e tokens_e * FFN FLOPs per token (+ S * that for the shared expert)
    router_flops: int              # S * 2 * D * E
    predictor_flops: int           # S * (2 * D * D + 2 * D * E)
    dense_ffn_params: int          # parameters of one FFN
    activated_params: int          # per token: (sum_e tokens_e / S) * FFN params (+ shared) + router + predictor
    total_params: int

    @property
    def experts_per_token(self) -> float:
        return sum(self.tokens_per_expert) / self.pool_tokens if self.pool_tokens else 0.0


@dataclasses.dataclass
class DiffMoEStats:
    """Compute of the last forward of every DiffMoE layer, and model totals."""

    layers: list[LayerStats]
    dense_ffn_flops: int
    activated_ffn_flops: int
    overhead_flops: int            # router + predictor
    dense_params: int              # the model before diffmoe: other parameters + one FFN per layer
    activated_params: int          # other parameters + per-token activated parameters of every layer
    total_params: int

    @property
    def ffn_flops_ratio(self) -> float:
        """Activated / dense FFN FLOPs of the last forward."""
        return self.activated_ffn_flops / self.dense_ffn_flops if self.dense_ffn_flops else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ffn_flops_ratio"] = self.ffn_flops_ratio
        return d

    def __str__(self) -> str:
        lines = [f"DiffMoE: {len(self.layers)} layers, FFN FLOPs activated/dense "
                 f"{self.activated_ffn_flops / 1e6:.3f} M / {self.dense_ffn_flops / 1e6:.3f} M "
                 f"({self.ffn_flops_ratio:.3f}x), router+predictor {self.overhead_flops / 1e6:.3f} M; params "
                 f"activated {self.activated_params:,} / total {self.total_params:,} (dense {self.dense_params:,})"]
        for l in self.layers:
            lines.append(f"  {l.path} [{l.mode}] pool {l.pool_tokens}: tokens/expert {l.tokens_per_expert} "
                         f"({l.experts_per_token:.2f} experts/token)")
        return "\n".join(lines)


def _layer_stats(path: str, m: DiffMoELayer, pool: int | None = None) -> LayerStats:
    last = m._last
    if pool is not None:  # a training step with this pool: every expert takes exactly k tokens
        k = expert_capacity(pool, m.num_experts, m.capacity)
        last = {"pool": pool, "mode": "train (planned)"}
        counts = [k] * m.num_experts
    else:
        counts = [int(c) for c in last["counts"].tolist()] if "counts" in last else [0] * m.num_experts
    S = int(last.get("pool", 0))
    D, E, fpt = m.dim, m.num_experts, m.ffn_flops_per_token
    shared = m.shared_expert is not None
    activated = sum(counts) * fpt + (S * fpt if shared else 0)
    per_token = sum(counts) / S if S else 0.0
    act_params = round(per_token * m.expert_params) + (m.expert_params if shared else 0)
    act_params += m.router_params() + m.predictor_params()
    return LayerStats(
        path=path, mode=str(last.get("mode", "none")), pool_tokens=S, tokens_per_expert=counts,
        dense_ffn_flops=S * fpt, activated_ffn_flops=activated, router_flops=S * 2 * D * E,
        predictor_flops=S * (2 * D * D + 2 * D * E), dense_ffn_params=m.expert_params,
        activated_params=act_params, total_params=sum(p.numel() for p in m.parameters()),
    )


def diffmoe_stats(model: nn.Module, pools: dict[str, int] | None = None) -> DiffMoEStats:
    """Activated compute of the last forward: per layer the tokens each expert processed, activated vs
    dense FFN FLOPs (``FlopCounterMode`` convention: 2 per multiply-add) and activated parameters.

    Eval counts are the tokens whose predictor logit passed the threshold, so
    they are the compute actually spent eagerly (under ``torch.compile`` the
    masked eval computes every expert on every token; the counts still give
    the compute a dynamic kernel would spend).  Layers not called yet report 0.
    ``pools`` (layer path -> pool size S) gives instead the planned compute of
    a training step with those pools (each expert takes exactly ``k`` tokens),
    as ``treadfx.inspect`` reports it.
    """
    layers = [_layer_stats(p, m, None if pools is None else pools.get(p, 0)) for p, m in diffmoe_layers(model)]
    moe_params = sum(l.total_params for l in layers)
    total = sum(p.numel() for p in model.parameters())
    other = total - moe_params
    return DiffMoEStats(
        layers=layers,
        dense_ffn_flops=sum(l.dense_ffn_flops for l in layers),
        activated_ffn_flops=sum(l.activated_ffn_flops for l in layers),
        overhead_flops=sum(l.router_flops + l.predictor_flops for l in layers),
        dense_params=other + sum(l.dense_ffn_params for l in layers),
        activated_params=other + sum(l.activated_params for l in layers),
        total_params=total,
    )
