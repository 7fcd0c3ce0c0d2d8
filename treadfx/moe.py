"""DiffMoE runtime: the expert-choice mixture-of-experts layer, its loss and its compute statistics.

:class:`DiffMoELayer` replaces a block's feed-forward network (see
``treadfx.diffmoe``).  Its state (parameters and buffers, i.e. its
``state_dict`` keys below the FFN's path) is::

    experts.<e>.<FFN keys>      E copies of the original FFN (slightly perturbed)
    gate.weight                 [E, D] router W_g (no bias)
    predictor.0.weight/.bias    [D, D] capacity predictor, layer 1
    predictor.2.weight/.bias    [E, D] capacity predictor, layer 2
    shared_expert.<FFN keys>    only with shared_expert=True: the original FFN
    thresholds                  [E] float32 buffer: EMA (from 0, no bias correction) of the k-th largest
                                sigmoid(predictor logit) per expert, as in the official DiffMoE code
    threshold_steps             [] int64 buffer: number of training batches folded into ``thresholds``
                                (also the step of the capacity schedule)

The layer works on a *pool*: every token of the call (``x`` is ``[..., D]``;
all leading dims are flattened, so the pool of a ``[B, N, D]`` call is the
``S = B * N`` tokens of the whole batch; inside a TREAD route ``S = B * K``).
The algorithm is the official one (KwaiVGI/DiffMoE ``SparseMoEBlock``); where
treadfx differs, the difference is an option (see ``docs/diffmoe.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DiffMoELayer", "expert_capacity", "scheduled_capacity", "static_capacity_tokens", "diffmoe_layers",
    "diffmoe_loss", "diffmoe_stats", "DiffMoEStats", "LayerStats", "ffn_flops_per_token", "grouped_linear",
    "grouped_mm_available", "static_capacity_check", "StaticCapacityCheck", "StaticLayerCheck",
    "DEFAULT_STATIC_CAPACITY", "statistics_kept",
]

EXPERT_IMPLS = ("grouped", "bmm", "loop")
#: the static-capacity factor :func:`static_capacity_check` (and ``treadfx.inspect``) assumes for layers without one
DEFAULT_STATIC_CAPACITY = 2.0
INITS = ("official", "treadfx")


def expert_capacity(pool: int, num_experts: int, capacity: float, clamp: bool = True) -> int:
    """Tokens each expert takes from a pool of ``pool`` tokens in training: ``int(S / E * capacity)`` as in the
    official code, clamped to ``1..S`` (``clamp=True``: a tiny pool still reaches every expert) or to ``0..S``
    (``clamp=False``: the official count; the official code fails for ``k > S``, treadfx takes every token)."""
    k = int(pool / num_experts * capacity)
    return max(1 if clamp else 0, min(pool, k))


def scheduled_capacity(step: int, num_experts: int, capacity: float, schedule: tuple[int, int] | None) -> float:
    """Training capacity at training step ``step`` (0-based) under the official capacity schedule.

    ``schedule = (dense_steps, ramp_steps)``: capacity ``E`` (every token to
    every expert) while ``step <= dense_steps``, then a linear interpolation
    ``capacity + (E - capacity) * (II - step) / (II - I)`` with ``I =
    dense_steps``, ``II = dense_steps + ramp_steps`` while ``step <= II``,
    then ``capacity``.  ``None``: always ``capacity``.
    """
    if schedule is None:
        return capacity
    first = schedule[0]
    second = schedule[0] + schedule[1]
    if step <= first:
        return float(num_experts)
    if step <= second:
        return capacity + (num_experts - capacity) * (second - step) / (second - first)
    return capacity


def static_capacity_tokens(pool: int, num_experts: int, capacity: float, factor: float) -> int:
    """Per-expert token slots of the static-capacity inference mode: ``ceil(S / E * capacity * factor)``
    clamped to ``1..S``.  Calibrated thresholds pass about ``S / E * capacity`` tokens per expert (they are
    the EMA of the k-th largest predictor score with that ``k``), so ``factor`` is the headroom over it."""
    return max(1, min(pool, math.ceil(pool / num_experts * capacity * factor)))


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


# ---------------------------------------------------------------------------------------- grouped experts


def _register_grouped_mm_flops() -> None:
    """Teach ``FlopCounterMode`` the FLOPs of ``aten._grouped_mm`` (2 per multiply-add), once per process."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        if len(a_shape) == 2 and len(b_shape) == 2:  # [K, T] x [T, N] -> [G, K, N]: weight gradient
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        return 2 * math.prod(out_shape) * a_shape[-1]


_register_grouped_mm_flops()
_GMM_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) on ``device`` in ``dtype`` in this torch build;
    probed once per (device type, dtype) with a tiny problem, False under torch.compile before a probe."""
    key = (device.type, dtype)
    if key in _GMM_OK:
        return _GMM_OK[key]
    if torch.compiler.is_compiling() or not hasattr(torch, "_grouped_mm") or device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily(), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            a = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
            _GroupedMM.apply(a, b.transpose(1, 2), offs).sum().backward()
        ok = True
    except Exception:
        ok = False
    _GMM_OK[key] = ok
    return ok


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offs: torch.Tensor | None,
                   rows: torch.Tensor | None) -> torch.Tensor:
    """``E`` Linear layers in one call. ``weight`` is ``[E, out, in]`` (``bias`` ``[E, out]`` or None).

    ``offs is None``: ``x`` is ``[E, k, in]`` and the result ``[E, k, out]``
    (``baddbmm``, bit-equal in fp32 to ``F.linear`` per expert).  Otherwise
    ``x`` is ``[T, in]``, the rows of expert ``e`` end at ``offs[e]``
    (int32), ``rows`` ``[T]`` names each row's expert, and the result is
    ``torch._grouped_mm`` plus the row's bias.  Under autocast the operands
    are cast to the autocast dtype, as ``F.linear`` does.
    """
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if offs is None:
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    y = _GroupedMM.apply(x, weight.transpose(1, 2), offs)
    return y if bias is None else y + bias[rows]


class _GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm(x [T, in], w [E, in, out], offs)`` with a backward that accepts any gradient layout
    (the built-in one rejects expanded gradients such as that of ``y.sum()``)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, gy):
        x, w, offs = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch._grouped_mm(gy, w.transpose(-1, -2), offs=offs) if ctx.needs_input_grad[0] else None
        gw = torch._grouped_mm(x.t(), gy, offs=offs) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class _NotGroupable(Exception):
    pass


def _grouped_program(ffn: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """The FFN's graph with each ``nn.Linear`` call replaced by :func:`grouped_linear` over stacked weights.

    Returns the program ``(x, offs, rows, w0, b0, w1, b1, ...) -> y`` and the
    Linear paths in placeholder order.  Raises ``_NotGroupable`` when the FFN
    does not trace with ``torch.fx``, takes more than the token input, or
    holds parameters outside ``nn.Linear`` layers.
    """
    try:
        gm = fx.symbolic_trace(ffn)
    except Exception as e:  # diffusers activations branch on the device type: not symbolically traceable
        raise _NotGroupable(f"the FFN does not trace with torch.fx ({type(e).__name__})") from None
    linears: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            raise _NotGroupable(f"the FFN reads a parameter directly (`{node.target}`)")
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Linear):
                if node.target in linears or len(node.args) != 1 or node.kwargs:
                    raise _NotGroupable(f"Linear `{node.target}` is called more than once or with extra arguments")
                linears.append(str(node.target))
            elif any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                raise _NotGroupable(f"`{node.target}` ({type(mod).__name__}) holds parameters outside a Linear")
    if len([n for n in gm.graph.nodes if n.op == "placeholder"]) != 1:
        raise _NotGroupable("the FFN takes more than the token input")
    if not linears:
        raise _NotGroupable("the FFN has no Linear layer")
    graph = fx.Graph()
    x, offs, rows = graph.placeholder("x"), graph.placeholder("offs"), graph.placeholder("rows")
    wb = {t: (graph.placeholder(f"w{i}"), graph.placeholder(f"b{i}")) for i, t in enumerate(linears)}
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
        elif node.op == "call_module" and node.target in wb:
            w, b = wb[node.target]
            env[node] = graph.call_function(grouped_linear, (env[node.args[0]], w, b, offs, rows))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph), linears


# ---------------------------------------------------------------------------------------- the layer


class DiffMoELayer(nn.Module):
    """DiffMoE feed-forward layer: batch-level global token pool, expert choice, capacity predictor.

    The algorithm of the official DiffMoE ``SparseMoEBlock``:

    * training: router probabilities ``softmax(x W_g)`` per token; expert
      ``e`` takes the ``k = int(S / E * capacity)`` pool tokens with the
      highest probability for it (``topk``); its output, times that
      probability, is added back (plus the shared expert, if any).  The
      capacity predictor (``D -> D -> E`` MLP on detached features) learns
      the selection mask with BCE-with-logits, and ``thresholds[e]`` follows
      ``t <- decay * t + (1 - decay) * q_e`` from 0, where ``q_e`` is the
      k-th largest ``sigmoid(predictor logit)`` for expert ``e`` (mean over
      ranks under ``torch.distributed``);
    * eval: expert ``e`` takes ``k_e = #{tokens: sigmoid(logit) > thresholds[e]}``
      tokens, the ``k_e`` with the highest *router* probability.  Before any
      training the thresholds are 0, so every token goes to every expert.
      Eagerly each expert computes only its tokens; under ``torch.compile``
      (or on fake tensors) every expert runs on every token and is masked,
      same result, static shapes.  With ``static_capacity=f`` each expert
      has a fixed number of slots ``static_capacity_tokens(S, E, capacity, f)``
      (padded, masked; tokens beyond it are dropped), which compiles with
      ``fullgraph=True``.

    treadfx's own options (see ``docs/diffmoe.md``): ``fp32_router`` (softmax
    in fp32, official: input dtype), ``clamp_k`` (training ``k`` clamped to
    ``1..S``), ``topk_before_calibration`` (eval before any training batch
    takes the training top-k instead of every token), ``init`` ("official":
    router ``N(0, 0.006)``, predictor Xavier-uniform with zero bias;
    "treadfx": router ``N(0, 0.02)``, predictor PyTorch default), experts
    copied from the dense FFN plus relative noise ``noise_std``, the original
    FFN as the shared expert.  ``capacity_schedule=(dense_steps, ramp_steps)``
    is the official schedule (:func:`scheduled_capacity`).
    ``experts_impl``: "grouped" runs the experts as one grouped computation
    (``torch._grouped_mm`` where this torch build and device have it, else
    ``bmm`` over the ``[E, k, D]`` layout), "bmm" always the latter, "loop"
    one expert after another; FFNs that are not a plain Linear/activation
    graph (``grouped_reason`` says why) always loop.
    """

    def __init__(self, ffn: nn.Module, dim: int, num_experts: int = 8, capacity: float = 1.0,
                 shared_expert: bool = False, predictor_loss_weight: float = 1.0, threshold_decay: float = 0.95,
                 noise_std: float = 0.01, generator: torch.Generator | None = None, *,
                 fp32_router: bool = True, clamp_k: bool = True, topk_before_calibration: bool = False,
                 init: str = "official", capacity_schedule: tuple[int, int] | None = None,
                 experts_impl: str = "grouped", static_capacity: float | None = None):
        super().__init__()
        import copy

        if experts_impl not in EXPERT_IMPLS:
            raise ValueError(f"experts_impl={experts_impl!r} must be one of {EXPERT_IMPLS}")
        if init not in INITS:
            raise ValueError(f"init={init!r} must be one of {INITS}")
        self.dim = int(dim)
        self.num_experts = int(num_experts)
        self.capacity = float(capacity)
        self.predictor_loss_weight = float(predictor_loss_weight)
        self.threshold_decay = float(threshold_decay)
        self.noise_std = float(noise_std)
        self.fp32_router = bool(fp32_router)
        self.clamp_k = bool(clamp_k)
        self.topk_before_calibration = bool(topk_before_calibration)
        self.capacity_schedule = None if capacity_schedule is None else tuple(int(s) for s in capacity_schedule)
        self.experts_impl = experts_impl
        self.static_capacity = None if static_capacity is None else float(static_capacity)
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
                std = 0.006 if init == "official" else 0.02
                g = torch.randn(self.gate.weight.shape, generator=generator, dtype=torch.float32) * std
                self.gate.weight.copy_(g.to(self.gate.weight.device, self.gate.weight.dtype))
                if init == "official":  # the official DiT initialises every Linear Xavier-uniform, zero bias
                    for lin in (self.predictor[0], self.predictor[2]):
                        w = torch.empty(lin.weight.shape, dtype=torch.float32)
                        nn.init.xavier_uniform_(w, generator=generator)
                        lin.weight.copy_(w.to(lin.weight.device, lin.weight.dtype))
                        lin.bias.zero_()
        self.shared_expert = ffn if shared_expert else None
        self.register_buffer("thresholds", torch.zeros(self.num_experts, dtype=torch.float32, device=p.device))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64, device=p.device))
        self.ffn_flops_per_token = ffn_flops_per_token(ffn, self.dim)
        self.expert_params = sum(q.numel() for q in ffn.parameters())
        self._last: dict[str, Any] = {}
        # eager dynamic eval gives each expert a different token count; BLAS may round a product with few
        # rows differently from the grouped kernel, so by default that path loops (bit-equal to the official)
        self.grouped_ragged = False
        self.__dict__["_grouped"] = None
        self.grouped_reason = "experts_impl='loop'"
        if experts_impl != "loop":
            try:
                prog, linears = _grouped_program(ffn)
                self._check_grouped(ffn, prog, linears)
                self.__dict__["_grouped"] = (prog, linears)
                self.grouped_reason = ""
            except _NotGroupable as e:
                self.grouped_reason = str(e)

    @staticmethod
    def _check_grouped(ffn: nn.Module, prog: fx.GraphModule, linears: list[str]) -> None:
        """Probe: the grouped program on two stacked copies of ``ffn`` equals ``ffn`` on each group."""
        w = ffn.get_submodule(linears[0]).weight
        if w.device.type == "meta":
            return
        flags = [(m, m.training) for m in ffn.modules()]
        try:
            ffn.eval()
            with torch.no_grad():
                x = torch.randn(2, 3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
                args = []
                for t in linears:
                    lin = ffn.get_submodule(t)
                    args += [torch.stack([lin.weight] * 2),
                             None if lin.bias is None else torch.stack([lin.bias] * 2)]
                got = prog(x, None, None, *args)
                ref = torch.stack([ffn(x[0]), ffn(x[1])])
        except Exception as e:
            raise _NotGroupable(f"the grouped FFN graph failed on a probe ({type(e).__name__})") from None
        finally:
            for m, f in flags:
                m.training = f
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape or not torch.allclose(got, ref, 1e-4, 1e-5):
            raise _NotGroupable("the grouped FFN graph differs from the FFN on a probe")

    # ------------------------------------------------------------------ pieces
    def selection_mask(self, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert choice on a pool as the official training step: ``topk(probs.T, k, sorted=False)``.
        Returns (indices [E, k], gate values [E, k], mask [S, E] of 0/1 in ``probs``' dtype)."""
        vals, idx = torch.topk(probs.permute(1, 0), k=k, dim=-1, sorted=False)
        mask = torch.zeros(probs.shape[1], probs.shape[0], dtype=probs.dtype, device=probs.device)
        mask = mask.scatter(1, idx, 1.0).permute(1, 0)
        return idx, vals, mask

    def train_k(self, pool: int) -> int:
        """Training ``k`` for a pool of ``pool`` tokens at the current step (capacity schedule included)."""
        cap = self.capacity
        if self.capacity_schedule is not None:
            steps = self.threshold_steps
            step = 0 if _is_fake(steps) else int(steps)
            cap = scheduled_capacity(step, self.num_experts, self.capacity, self.capacity_schedule)
        return expert_capacity(pool, self.num_experts, cap, self.clamp_k)

    def _train_k_tensor(self, pool: int) -> torch.Tensor:
        """``train_k`` as a 0-dim int64 tensor from the step buffer (no host sync; the same float64 arithmetic)."""
        E, cap = self.num_experts, self.capacity
        first, second = self.capacity_schedule[0], sum(self.capacity_schedule)
        step = self.threshold_steps.to(torch.float64)
        if second > first:
            ramp = cap + (E - cap) * (second - step) / (second - first)
        else:
            ramp = torch.full_like(step, cap)
        c = torch.where(step <= first, torch.full_like(step, float(E)), torch.where(step <= second, ramp, cap))
        k = torch.floor(pool / E * c).to(torch.int64)
        return k.clamp(1 if self.clamp_k else 0, pool)

    @torch.no_grad()
    def update_thresholds(self, logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
        """Fold one training batch into ``thresholds`` as the official code does: ``q_e`` = k-th largest
        ``sigmoid(logits[:, e])``; ``t <- t * d + (1 - d) * q`` with ``d`` a float32 tensor; then the mean over
        ranks.  ``k`` may be a 0-dim tensor (capacity schedule under compile).  Returns ``q``."""
        sig = torch.sigmoid(logits.detach()).permute(1, 0)  # [E, S]
        if isinstance(k, torch.Tensor):
            srt = sig.sort(dim=-1, descending=True).values
            q = srt.gather(1, (k - 1).clamp(min=0).reshape(1, 1).expand(sig.shape[0], 1)).squeeze(1)
            keep = k > 0
        else:
            if k < 1:  # no token taken: no quantile (the official code fails here)
                self.threshold_steps.add_(1)
                return torch.zeros_like(self.thresholds)
            q = torch.topk(sig, k=k, dim=-1, sorted=True).values[:, -1]
            keep = None
        d = torch.tensor(self.threshold_decay, dtype=torch.float32, device=self.thresholds.device)
        new = self.thresholds * d + (1 - d) * q
        if keep is not None:
            new = torch.where(keep, new, self.thresholds)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(new)
            new = new / torch.distributed.get_world_size()
        self.thresholds.copy_(new)
        self.threshold_steps.add_(1)
        return q

    def _stacked(self) -> list:
        out = []
        for t in self.__dict__["_grouped"][1]:
            lins = [e.get_submodule(t) for e in self.experts]
            out.append(torch.stack([l.weight for l in lins]))
            out.append(None if lins[0].bias is None else torch.stack([l.bias for l in lins]))
        return out

    def _use_grouped(self, args: tuple, kwargs: dict) -> bool:
        return self.experts_impl != "loop" and self.__dict__.get("_grouped") is not None and not args and not kwargs

    def _use_gmm(self, x: torch.Tensor) -> bool:
        if self.experts_impl != "grouped" or torch.compiler.is_compiling() or _is_fake(x):
            return False  # the meta kernel of _grouped_mm accepts bf16 only (CUDA's rule): bmm when tracing
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return grouped_mm_available(x.device, dt)

    def experts_equal_k(self, xg: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> torch.Tensor:
        """Every expert on its ``k`` rows: ``[E, k, D] -> [E, k, D_out]`` (grouped, or the loop reference)."""
        kwargs = kwargs or {}
        if not self._use_grouped(args, kwargs):
            return torch.stack([expert(xg[i], *args, **kwargs) for i, expert in enumerate(self.experts)])
        prog = self.__dict__["_grouped"][0]
        E, k, D = xg.shape
        if k == 0:
            return torch.stack([expert(xg[i]) for i, expert in enumerate(self.experts)])
        if self._use_gmm(xg):
            offs = (torch.arange(1, E + 1, device=xg.device, dtype=torch.int32) * k)
            rows = torch.arange(E, device=xg.device).repeat_interleave(k)
            return prog(xg.reshape(E * k, D), offs, rows, *self._stacked()).reshape(E, k, -1)
        return prog(xg, None, None, *self._stacked())

    def _experts_ragged(self, h: torch.Tensor, idx: list[torch.Tensor], gates: list[torch.Tensor],
                        args: tuple, kwargs: dict) -> torch.Tensor:
        """Eager eval: expert ``e`` on rows ``idx[e]``; ``out[idx[e]] += gates[e] * y_e`` in expert order."""
        counts = [int(ix.numel()) for ix in idx]
        if not self._use_grouped(args, kwargs) or not self.grouped_ragged:
            out = None
            for expert, ix, g in zip(self.experts, idx, gates):
                y = expert(h[ix, :], *args, **kwargs)
                if out is None:
                    out = torch.zeros(h.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)
                if ix.numel():
                    out = out.index_add(0, ix, g.to(y.dtype).unsqueeze(-1) * y)
            return out
        prog = self.__dict__["_grouped"][0]
        flat, g = torch.cat(idx), torch.cat(gates)
        if self._use_gmm(h):
            offs = torch.tensor(counts, device=h.device).cumsum(0).to(torch.int32)
            rows = torch.arange(len(counts), device=h.device).repeat_interleave(
                torch.tensor(counts, device=h.device))
            y = prog(h[flat, :], offs, rows, *self._stacked())
        else:  # capacity-padded [E, kmax, D]
            kmax = max(max(counts), 1)
            pad = torch.stack([F.pad(ix, (0, kmax - ix.numel())) for ix in idx])
            valid = torch.arange(kmax, device=h.device).unsqueeze(0) < torch.tensor(counts, device=h.device)[:, None]
            y = prog(h[pad], None, None, *self._stacked())[valid]
        out = torch.zeros(h.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)
        return out.index_add(0, flat, g.to(y.dtype).unsqueeze(-1) * y)

    def _combine(self, S: int, index: torch.Tensor, gating: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_e`` of ``gating[e] * y[e]`` scattered to rows ``index[e]``, accumulated in expert order."""
        gated = gating.to(y.dtype).unsqueeze(-1) * y  # [E, k, D_out]
        out = torch.zeros(S, y.shape[-1], dtype=y.dtype, device=y.device)
        return out.index_add(0, index.reshape(-1), gated.reshape(-1, y.shape[-1]))

    def _router(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.gate(h)
        return F.softmax(logits.float() if self.fp32_router else logits, dim=-1)  # [S, E]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        S, E = h.shape[0], self.num_experts
        fake = _is_fake(h)
        probs = self._router(h)
        scores = probs.permute(1, 0)  # [E, S]
        if self.training:
            out, pred, mask, k = self._forward_train(h, scores, args, kwargs)
            loss = F.binary_cross_entropy_with_logits(pred, mask.to(pred.dtype).contiguous()) * self.predictor_loss_weight
            if not fake:
                self.update_thresholds(pred, k)
                self._last = {"loss": loss, "counts": mask.sum(0), "pool": S, "mode": "train"}
        else:
            pred = self.predictor(h.detach())
            sig = torch.sigmoid(pred)
            counts = (sig > self.thresholds.to(sig.dtype)).sum(0)  # [E]: k_e, the official count
            if self.topk_before_calibration:
                counts = torch.where(self.threshold_steps == 0,
                                     torch.full_like(counts, expert_capacity(S, E, self.capacity, self.clamp_k)),
                                     counts)
            compiling = torch.compiler.is_compiling()
            extra: dict[str, Any] = {}
            if self.static_capacity is not None:
                C = static_capacity_tokens(S, E, self.capacity, self.static_capacity)
                gating, index = torch.topk(scores, k=C, dim=-1, sorted=True)  # [E, C], best first
                valid = torch.arange(C, device=h.device).unsqueeze(0) < counts.unsqueeze(1)
                out = self._combine(S, index, gating * valid.to(gating.dtype), self.experts_equal_k(h[index], args, kwargs))
                mode = "eval (static)"
                extra = {"slots": C, "dropped": (counts - C).clamp(min=0)}
                counts = counts.clamp(max=C)
            elif fake or compiling:  # masked: every expert on every token, static shapes
                order = scores.argsort(dim=-1, descending=True, stable=True)
                rank = torch.empty_like(order).scatter(
                    1, order, torch.arange(S, device=h.device).unsqueeze(0).expand(E, S))
                w = scores * (rank < counts.unsqueeze(1)).to(scores.dtype)
                ys = self.experts_equal_k(h.unsqueeze(0).expand(E, S, h.shape[1]), args, kwargs)
                out = None
                for e in range(E):
                    c = w[e].to(ys.dtype).unsqueeze(-1) * ys[e]
                    out = c if out is None else out + c
                mode = "eval (masked)"
            else:  # dynamic: expert e takes its top-k_e tokens by router score, as the official forward_eval
                idx, gates = [], []
                for e, c in enumerate(counts.tolist()):
                    g, ix = torch.topk(scores[e], k=c, dim=-1, sorted=False)
                    idx.append(ix)
                    gates.append(g)
                out = self._experts_ragged(h, idx, gates, args, kwargs)
                mode = "eval"
            if not fake:
                self._last = {"loss": None, "counts": counts, "pool": S, "mode": mode, **extra}
        if self.shared_expert is not None:
            out = out + self.shared_expert(h, *args, **kwargs)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _forward_train(self, h, scores, args, kwargs):
        S, E = h.shape[0], self.num_experts
        pred = self.predictor(h.detach())
        if self.capacity_schedule is not None and torch.compiler.is_compiling():
            # the scheduled k is a tensor: every expert takes all S tokens in router order, masked after rank k
            k = self._train_k_tensor(S)
            vals, index = scores.sort(dim=-1, descending=True, stable=True)
            valid = (torch.arange(S, device=h.device) < k).to(vals.dtype)
            gating = vals * valid
            mask_es = torch.zeros(E, S, dtype=h.dtype, device=h.device).scatter(
                1, index, valid.to(h.dtype).unsqueeze(0).expand(E, S))
        else:
            k = self.train_k(S)
            gating, index = torch.topk(scores, k=k, dim=-1, sorted=False)  # [E, k]
            mask_es = torch.zeros(E, S, dtype=h.dtype, device=h.device).scatter(1, index, 1.0)
        y = self.experts_equal_k(h[index], args, kwargs)  # [E, k, D]
        out = self._combine(S, index, gating, y)
        return out, pred, mask_es.permute(1, 0), k

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_last"] = {}  # the last forward's loss carries autograd history: never copied or pickled
        state["_grouped"] = None  # the grouped program is rebuilt from the experts (GraphModules do not pickle)
        state["_rebuild_grouped"] = self.__dict__.get("_grouped") is not None
        return state

    def __setstate__(self, state):
        rebuild = state.pop("_rebuild_grouped", False)
        super().__setstate__(state)
        if rebuild:
            self.__dict__["_grouped"] = _grouped_program(self.experts[0])

    def extra_repr(self) -> str:
        impl = self.experts_impl if self.__dict__.get("_grouped") is not None else "loop"
        s = (f"dim={self.dim}, num_experts={self.num_experts}, capacity={self.capacity:g}, "
             f"shared_expert={self.shared_expert is not None}, experts_impl={impl}")
        if self.capacity_schedule is not None:
            s += f", capacity_schedule={self.capacity_schedule}"
        if self.static_capacity is not None:
            s += f", static_capacity={self.static_capacity:g}"
        return s

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


@contextlib.contextmanager
def statistics_kept(module: nn.Module) -> Iterator[None]:
    """Calls inside leave the last-forward statistics of every DiffMoE layer in ``module`` (what
    :func:`diffmoe_loss` and :func:`diffmoe_stats` read) as they were before, also when they raise."""
    saved = [(m, m._last) for m in module.modules() if isinstance(m, DiffMoELayer)]
    try:
        yield
    finally:
        for m, last in saved:
            m._last = last


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
    mode: str                      # "train", "eval", "eval (masked)" or "eval (static)"
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
        k = m.train_k(pool)
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

    Eval counts are ``k_e``, the tokens whose predictor score passed the
    threshold (each expert takes that many tokens by router score), so they
    are the compute actually spent eagerly (under ``torch.compile`` the masked
    eval computes every expert on every token; the counts still give the
    compute a dynamic kernel would spend; the static-capacity mode counts the
    tokens it kept, at most its slots per expert).  Layers not called yet report 0.
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


# ---------------------------------------------------------------------------------------- static vs dynamic inference


@dataclasses.dataclass
class StaticLayerCheck:
    """One call of a DiffMoE layer at inference, dynamic vs static capacity, on the same input.

    FLOPs are forward FLOPs (2 per multiply-add, matmuls only) of the experts,
    the shared expert, the router and the capacity predictor.
    """

    path: str
    pool_tokens: int               # S
    factor: float                  # static_capacity factor used
    slots: int                     # C = static_capacity_tokens(S, E, capacity, factor) per expert
    tokens_per_expert: list[int]   # k_e of the dynamic mode (tokens whose predictor score passed the threshold)
    dropped: int                   # sum_e max(k_e - C, 0): tokens the static mode drops
    dynamic_flops: int             # sum_e k_e experts' tokens (an eager dynamic forward; host sync per layer)
    static_flops: int              # E * C expert slots, padding included (static shapes, fullgraph compile)
    masked_flops: int              # E * S: every expert on every token (torch.compile without static_capacity)
    max_abs_diff: float            # max |static - dynamic| of this layer's output on the same input


@dataclasses.dataclass
class StaticCapacityCheck:
    """Static-capacity inference measured against the dynamic mode on given inputs (see :func:`static_capacity_check`)."""

    layers: list[StaticLayerCheck]
    max_abs_diff: float | None     # max |static - dynamic| over the floating-point tensors of the model output
    dynamic_flops: int
    static_flops: int
    masked_flops: int
    default_factor: bool           # True when some layer had no static_capacity and DEFAULT_STATIC_CAPACITY was used

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        diff = "n/a" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        dyn = self.dynamic_flops or 1
        lines = [f"DiffMoE inference (eval, these inputs): FFN+router+predictor FLOPs dynamic "
                 f"{self.dynamic_flops / 1e6:.3f} M, static capacity {self.static_flops / 1e6:.3f} M "
                 f"({self.static_flops / dyn:.3f}x), masked compile {self.masked_flops / 1e6:.3f} M "
                 f"({self.masked_flops / dyn:.3f}x); output max |static - dynamic| {diff}"
                 + (f" (static_capacity={DEFAULT_STATIC_CAPACITY:g} assumed where unset)" if self.default_factor else "")]
        for l in self.layers:
            lines.append(f"  {l.path} pool {l.pool_tokens}: {l.slots} slots/expert (factor {l.factor:g}), "
                         f"dynamic tokens/expert {l.tokens_per_expert}, dropped {l.dropped}, "
                         f"FLOPs dynamic {l.dynamic_flops / 1e6:.3f} M / static {l.static_flops / 1e6:.3f} M, "
                         f"max |diff| {l.max_abs_diff:.3g}")
        return "\n".join(lines)


def _float_leaves(value: Any) -> list[torch.Tensor]:
    import torch.utils._pytree as pytree

    if hasattr(value, "to_tuple") and callable(value.to_tuple):  # diffusers / transformers output classes
        value = value.to_tuple()
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _inference_flops(m: DiffMoELayer, S: int, expert_tokens: int) -> int:
    D, E = m.dim, m.num_experts
    shared = S * m.ffn_flops_per_token if m.shared_expert is not None else 0
    return expert_tokens * m.ffn_flops_per_token + shared + S * 2 * D * E + S * (2 * D * D + 2 * D * E)


@contextlib.contextmanager
def _inference_state_restored(model: nn.Module, layers: list[tuple[str, DiffMoELayer]]) -> Iterator[None]:
    """Eval mode for the block; afterwards every module's training flag and each layer's ``static_capacity`` and
    record of its last forward are what they were before."""
    flags = [(mod, mod.training) for mod in model.modules()]
    saved = [(lay, lay.static_capacity, lay._last) for _, lay in layers]
    try:
        model.eval()
        yield
    finally:
        for lay, f, last in saved:
            lay.static_capacity = f
            lay._last = last
        for mod, fl in flags:
            mod.training = fl


@contextlib.contextmanager
def _dynamic_calls_recorded(layers: list[tuple[str, DiffMoELayer]], calls: list) -> Iterator[None]:
    """While active, every layer runs in the dynamic mode and each of its calls is appended to ``calls`` as
    ``(path, layer, x, args, kwargs, output, tokens per expert)``."""
    def hook(path):
        def record(mod, a, k, out):
            if mod.static_capacity is None and a and isinstance(a[0], torch.Tensor):
                calls.append((path, mod, a[0], tuple(a[1:]), dict(k), out, mod._last["counts"].clone()))
        return record

    handles = []
    try:
        for path, lay in layers:
            lay.static_capacity = None
            handles.append(lay.register_forward_hook(hook(path), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _layer_check(path: str, lay: DiffMoELayer, factor: float, x: torch.Tensor, a: tuple, k: dict,
                 out: torch.Tensor, counts: torch.Tensor) -> StaticLayerCheck:
    """One layer call re-run in the static mode (``lay.static_capacity`` already set) on the exact input the
    dynamic mode saw, compared with the dynamic output."""
    y = lay(x, *a, **k)
    S = x.numel() // x.shape[-1]
    C = int(lay._last["slots"])
    ke = [int(c) for c in counts.tolist()]
    return StaticLayerCheck(
        path=path, pool_tokens=S, factor=factor, slots=C, tokens_per_expert=ke,
        dropped=sum(max(c - C, 0) for c in ke),
        dynamic_flops=_inference_flops(lay, S, sum(ke)),
        static_flops=_inference_flops(lay, S, lay.num_experts * C),
        masked_flops=_inference_flops(lay, S, lay.num_experts * S),
        max_abs_diff=float((y.float() - out.float()).abs().max()) if y.numel() else 0.0)


def static_capacity_check(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *,
                          factor: float | None = None, forward: Any = None) -> StaticCapacityCheck | None:
    """Run ``model`` at inference (eval, no grad) on ``args``/``kwargs`` in the dynamic mode and in the
    static-capacity mode and compare them.

    Each DiffMoE layer uses ``factor`` if given, else its own ``static_capacity``, else
    :data:`DEFAULT_STATIC_CAPACITY`.  Per layer call: the slots ``C``, the dynamic ``k_e``, the tokens the
    static mode drops, inference FLOPs of both modes (and of the masked compiled mode), and the max abs
    difference of the layer's output when the static mode runs on the exact input the dynamic mode saw; for
    the model, the max abs difference of its floating-point outputs.  ``forward`` (default ``model``) is
    called as ``forward(*args, **kwargs)``.  Guarantees: training flags, ``static_capacity`` options and
    each layer's record of its last forward (so :func:`diffmoe_loss`) are restored; parameters, buffers and
    gradients are unchanged (no gradient is computed).  None when the model has no DiffMoE layer or an
    input is a meta or fake tensor.
    """
    import torch.utils._pytree as pytree

    kwargs = dict(kwargs or {})
    layers = diffmoe_layers(model)
    if not layers or any(isinstance(t, torch.Tensor) and _is_fake(t) for t in pytree.tree_leaves((args, kwargs))):
        return None
    run = forward if forward is not None else model
    factors = {id(lay): float(factor if factor is not None else (
        lay.static_capacity if lay.static_capacity is not None else DEFAULT_STATIC_CAPACITY)) for _, lay in layers}
    calls: list = []
    checks: list[StaticLayerCheck] = []
    with _inference_state_restored(model, layers), torch.no_grad(), torch.random.fork_rng(devices=[]):
        with _dynamic_calls_recorded(layers, calls):
            dynamic = run(*args, **kwargs)
        for _, lay in layers:
            lay.static_capacity = factors[id(lay)]
        static = run(*args, **kwargs)
        seen: dict[str, int] = {}
        for path, lay, *call in calls:
            n = seen[path] = seen.get(path, 0) + 1
            checks.append(_layer_check(path if n == 1 else f"{path} (call {n})", lay, factors[id(lay)], *call))
    dl, sl = _float_leaves(dynamic), _float_leaves(static)
    diff = None
    if dl and len(dl) == len(sl):
        diff = max(float((a.float() - b.float()).abs().max()) if a.numel() else 0.0 for a, b in zip(dl, sl))
    return StaticCapacityCheck(
        layers=checks, max_abs_diff=diff,
        dynamic_flops=sum(c.dynamic_flops for c in checks), static_flops=sum(c.static_flops for c in checks),
        masked_flops=sum(c.masked_flops for c in checks),
        default_factor=factor is None and any(lay.static_capacity is None for _, lay in layers))
