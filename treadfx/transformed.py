"""The transformed model: a drop-in subclass of the user's model class.

``transform`` returns an object of a dynamically created subclass of the
model's own class (same name, ``TreadModule`` first in the MRO), with the same submodules, the
same parameter *objects* and the same ``state_dict`` keys, so ``isinstance``
checks, ``model.config``, optimizers, EMA, checkpoints and FSDP wrapping keep
working.  Its ``forward``

* in eval mode (routing not forced) is the original ``forward``, so inference
  is bit for bit the original model;
* in train mode looks up the traced-and-routed graph for the call's input
  signature (shapes, dtypes, devices, non-tensor arguments, training flag,
  grad and autocast state), tracing it on first use.

``torch.compile`` integration: the class defines the lazy-module protocol
(``_initialize_hook`` / ``_infer_parameters``), which ``torch.compile`` calls
eagerly before it traces ``forward`` (with real inputs at the top level, with
fake ones when the model is called inside a compiled parent), so tracing never
happens inside a compiled region and there are no graph breaks.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect as _inspect
import threading
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.lazy import LazyModuleMixin

from .blocks import BlockCandidate, block_graph_hash, find_block_candidates
from .chains import Chain, find_chains, image_input_index, pick_chain
from .errors import (
    CompileTimeTraceError,
    NoBlocksFoundError,
    StreamAnalysisError,
    TokenCountError,
    TransformError,
)
from .fake_eval import autocast_cache_off, dtype_state, module_structure_key, rng_preserved
from .live import LiveGuard, LiveProgram, check_inlined_hooks, make_live
from .graph_walk import upstream
from .layout import LayoutAnalysis, tensor_input_nodes
from .ops import RouteSelect, num_kept
from .planning import RoutePlan, plan_route
from .routes import Route, resolve_routes
from .tracing import TRACE_LOCK, TracedProgram, flatten_call, signature_of, trace
from .equivariance import make_order_probe

__all__ = ["TransformConfig", "TreadState", "RoutedProgram", "TreadModule", "is_transformed", "state_of"]


@dataclasses.dataclass
class TransformConfig:
    """The validated arguments of ``transform`` (routes and options), shared by every traced graph of the model."""

    routes: tuple[Route, ...]
    chain: str | int | None = None
    stream: str | None = None
    fp32_after_route: bool = False
    leaf_modules: tuple[str, ...] = ()
    aux_loss: bool = False
    mae_weight: float = 0.0


@dataclasses.dataclass
class RouteRecord:
    """Kept indices of one route in the last routed forward."""

    index: int
    kept: torch.Tensor  # [B, K] per-sample, or [K] shared
    num_tokens: int

    @property
    def shared(self) -> bool:
        return self.kept.ndim == 1

    def skipped_mask(self, batch: int | None = None) -> torch.Tensor:
        """Bool [B, N]: True where a token was skipped by this route."""
        kept = self.kept if not self.shared else self.kept.unsqueeze(0).expand(batch or 1, -1)
        mask = torch.ones(kept.shape[0], self.num_tokens, dtype=torch.bool, device=kept.device)
        return mask.scatter(1, kept, False)


class RoutedProgram:
    """A traced, route-rewritten graph for one input signature and mode.

    ``gm`` is the analysis graph (every module inlined, route ops inserted:
    what ``inspect`` and the loss helpers read); ``live`` is what runs: the same
    program with every module that does not call the routed blocks called live
    on the model (see :mod:`treadfx.live`), guarded by ``guard``.
    """

    def __init__(self, traced: TracedProgram, plans: list[RoutePlan], selects: list[RouteSelect],
                 chain: Chain, chains: list[Chain], analysis: LayoutAnalysis, trace_seconds: float,
                 original_gm_code: str):
        self.traced = traced
        self.gm = traced.gm
        self.plans = plans
        self.selects = selects
        self.chain = chain
        self.chains = chains
        self.analysis = analysis
        self.n_outputs = len(traced.out_tensor_positions)
        self.trace_seconds = trace_seconds
        self.original_code = original_gm_code
        self.shapes = tuple(
            (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else (None, float)
            for t in (traced.fake_inputs or [])
        )
        self.seeded = any(s.seed is not None for s in selects)
        self.token_map = None
        self.live: LiveProgram | None = None
        self.guard: LiveGuard | None = None

    def matches(self, args: tuple, kwargs: dict) -> bool:
        from .tracing import flatten_call

        leaves, _ = flatten_call(args, kwargs)
        inputs = [leaves[i] for i in self.traced.tensor_positions if i < len(leaves)]
        if len(inputs) != len(self.shapes):
            return False
        for t, (s, d) in zip(inputs, self.shapes):
            if s is None:
                if type(t) is not float:
                    return False
            elif not (isinstance(t, torch.Tensor) and tuple(t.shape) == s and t.dtype == d):
                return False
        return self.values_match(leaves)

    def values_match(self, leaves: list) -> bool:
        """The float inputs the graph specialised on have the values it was traced with."""
        return all(leaves[pos] == v for pos, v in self.traced.value_guards.items())

    def run(self, state: "TreadState", args: tuple, kwargs: dict):
        from .tracing import flatten_call

        leaves, _ = flatten_call(args, kwargs)
        inputs = [leaves[i] for i in self.traced.tensor_positions]
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        keep = state.keep_mask(self, tensors)
        step = state.step_counter(tensors) if self.seeded else None
        gm = self.live.gm if self.live is not None else self.gm
        outs = gm(*inputs, keep, step)
        if step is not None:
            step.add_(1)
        user, kept = outs[: self.n_outputs], outs[self.n_outputs:]
        state.record(self, list(kept))
        return self.traced.unflatten_outputs(user)


class TreadState:
    """Per-transformed-model state, kept out of the module tree (never in state_dict)."""

    def __init__(self, config: TransformConfig, original_class: type, candidates: list[BlockCandidate]):
        self.config = config
        self.original_class = original_class
        self.original_forward: Callable = original_class.forward
        self.candidates = candidates
        self.programs: "collections.OrderedDict[Any, list[RoutedProgram]]" = collections.OrderedDict()
        self.current: RoutedProgram | None = None
        self._last = threading.local()  # per thread: (program, kept indices) of the last routed forward
        self.warned: set = set()
        self.forced = False
        self.forced_ratio: float | None = None
        self.fixed: list | None = None
        self.keep: torch.Tensor | None = None
        self.steps: dict[str, torch.Tensor] = {}
        self.base_step = 0  # where new step counters start (set_routing_step, copies, unpickling)

    # ---------------------------------------------------------------- last routed forward (per thread)
    def record(self, prog: "RoutedProgram | None", kept: list) -> None:
        """Remember the kept indices of this thread's last forward (``last_routes``)."""
        self._last.value = (prog, kept)

    @property
    def last_program(self) -> "RoutedProgram | None":
        return getattr(self._last, "value", (None, []))[0]

    @property
    def last_kept(self) -> list:
        return getattr(self._last, "value", (None, []))[1]

    def keep_mask(self, prog: "RoutedProgram", tensors: list) -> torch.Tensor | None:
        """The active keep mask as [B, N] bool image-token mask, or None."""
        if self.keep is None:
            return None
        from .loss import program_token_map

        mask = program_token_map(prog).per_token(self.keep, reduce="any")
        if not torch.compiler.is_compiling():
            most = int(mask.sum(dim=1).max()) if mask.numel() else 0
            for plan, sel in zip(prog.plans, prog.selects):
                if sel.num_keep < plan.num_tokens and most > sel.num_keep:
                    raise TokenCountError(
                        f"the keep mask marks {most} tokens of one sample, but route {plan.index} keeps only "
                        f"{sel.num_keep} of {plan.num_tokens}; marked tokens would be routed. Fix: lower the route "
                        f"ratio to at most {1 - most / plan.num_tokens:.3f}, or mark fewer tokens."
                    )
        return mask

    def prime(self, prog: "RoutedProgram", args: tuple, kwargs: dict) -> None:
        """Create per-device state eagerly, so that a compiled forward never creates it."""
        if prog.seeded:
            from .tracing import flatten_call

            leaves, _ = flatten_call(args, kwargs)
            tensors = [l for l in leaves if isinstance(l, torch.Tensor)]
            with torch._subclasses.fake_tensor.unset_fake_temporarily():  # fake args come from torch.compile
                self.step_counter(tensors)

    def step_counter(self, tensors: list) -> torch.Tensor:
        """The forward counter of seeded routes, one 0-dim int64 tensor per device."""
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        key = str(device)
        step = self.steps.get(key)
        if step is None:
            step = torch.full((), self.base_step, dtype=torch.int64, device=device)
            self.steps[key] = step
        return step

    def routing_step(self) -> int:
        """Forwards counted by seeded selection so far (the largest per-device counter)."""
        return max([self.base_step] + [int(v) for v in self.steps.values()])

    def set_routing_step(self, step: int) -> None:
        """Continue seeded selection from forward number ``step`` (in place: compiled graphs keep their input)."""
        self.base_step = int(step)
        for v in self.steps.values():
            v.fill_(int(step))

    def __deepcopy__(self, memo):
        new = TreadState(self.config, self.original_class, [])
        new.base_step = self.routing_step()
        new.forced, new.forced_ratio = self.forced, self.forced_ratio
        memo[id(self)] = new
        return new

    # ---------------------------------------------------------------- routing state
    def ratio_of(self, route_index: int) -> float:
        if self.forced and self.forced_ratio is not None:
            return self.forced_ratio
        return self.config.routes[route_index].ratio

    def active(self, training: bool) -> bool:
        """Route in this call? In training with gradients enabled (validation and sampling under no_grad or
        inference_mode are the original model, as hand-written TREAD does), or when forced."""
        return self.forced or (training and torch.is_grad_enabled())

    def programs_iter(self):
        for progs in self.programs.values():
            yield from progs

    def sync_selects(self) -> None:
        """Push ratios / forced flags / fixed indices into every built program's route ops."""
        for prog in self.programs_iter():
            self._sync(prog)

    def _sync(self, prog: RoutedProgram) -> None:
        for plan, sel in zip(prog.plans, prog.selects):
            sel.num_keep = num_kept(plan.num_tokens, self.ratio_of(plan.index))
            sel.forced = self.forced
            fixed = self.fixed[plan.index] if self.fixed is not None and plan.index < len(self.fixed) else None
            if fixed is not None:
                _check_fixed(fixed, plan)
            sel.fixed = fixed


def _check_fixed(kept: torch.Tensor, plan: RoutePlan) -> None:
    per_sample = plan.selection == "per_sample"
    n = plan.num_tokens
    ok = isinstance(kept, torch.Tensor) and not kept.is_floating_point() and kept.ndim == (2 if per_sample else 1)
    if ok:
        k = kept.shape[-1]
        ok = 1 <= k <= n and (kept.numel() == 0 or (int(kept.min()) >= 0 and int(kept.max()) < n))
    if not ok:
        shape = list(kept.shape) if isinstance(kept, torch.Tensor) else type(kept).__name__
        form = "[B, K] (per-sample selection)" if per_sample else "[K] (shared selection: one subset for the batch)"
        raise TokenCountError(
            f"fixed kept indices for route {plan.index} have shape {shape}: a route must keep between 1 and {n} of "
            f"the {n} image tokens, as {form}. Fix: pass K >= 1 indices per sample."
            if per_sample else
            f"fixed kept indices for route {plan.index} have shape {shape}: a route must keep between 1 and {n} of "
            f"the {n} image tokens, as {form}. Fix: pass K >= 1 integer indices below {n}."
        )


def is_transformed(model: nn.Module) -> bool:
    """True for a model returned by ``treadfx.transform``."""
    return isinstance(model, TreadModule)


def state_of(model: nn.Module) -> TreadState:
    """The TreadState of a transformed model (unwrapping torch.compile / DDP / FSDP wrappers)."""
    m = unwrap(model)
    if not isinstance(m, TreadModule):
        raise TransformError(
            f"{type(model).__name__} is not a treadfx-transformed model. Fix: call treadfx.transform(model, ...) first."
        )
    return m.__dict__["_treadfx"]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformed module inside torch.compile / DDP / FSDP / accelerate wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, TreadModule):
            return model
        for attr in ("_orig_mod", "module", "_fsdp_wrapped_module"):
            inner = getattr(model, attr, None) if attr in model.__dict__ or attr in getattr(model, "_modules", {}) else None
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model
    return model


class TreadModule(LazyModuleMixin):
    """Mixin placed first in the MRO of a transformed model's class.

    It speaks torch's lazy-module protocol (``LazyModuleMixin``): dynamo calls
    ``_infer_parameters`` eagerly, outside the compiled region, before it
    traces a call of this module, both for ``torch.compile(model)`` (real
    inputs) and when the model is called inside another compiled module
    (fake inputs).  That is where treadfx traces a new input signature.  The
    model never has uninitialized parameters and saves its state like a plain
    ``nn.Module``.
    """

    cls_to_become = None
    _initialize_hook = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)  # not LazyModuleMixin's variant

    def initialize_parameters(self, *args, **kwargs) -> None:  # nothing is lazy
        return None

    def _infer_parameters(self, module, args, kwargs=None):
        st: TreadState = self.__dict__["_treadfx"]
        if st.active(self.training):
            st.current = _program_for(self, st, tuple(args), dict(kwargs or {}))
            st._sync(st.current)
            st.prime(st.current, tuple(args), dict(kwargs or {}))

    def forward(self, *args, **kwargs):
        st: TreadState = self.__dict__["_treadfx"]
        if not st.active(self.training):
            st.record(None, [])  # route_loss of a non-routed forward is the plain mean
            return st.original_forward(self, *args, **kwargs)
        if torch.compiler.is_compiling():
            prog = st.current
            if prog is None or not prog.matches(args, kwargs) or (prog.guard is not None and prog.guard.check()):
                raise CompileTimeTraceError(
                    "treadfx: torch.compile reached the transformed model with inputs it has not been prepared for. "
                    "Fix: compile the transformed model itself (torch.compile(model)), or call "
                    "treadfx.prepare(model, *example_inputs) before compiling a module that contains it."
                )
            return prog.run(st, args, kwargs)
        prog = _program_for(self, st, args, kwargs)
        st.current = prog
        st._sync(prog)
        return prog.run(st, args, kwargs)

    def compile(self, *args, **kwargs) -> None:
        """In-place ``torch.compile`` (like ``nn.Module.compile``) that prepares each new signature eagerly first."""
        compiled = torch.compile(self._call_impl, *args, **kwargs)

        def call(*a, **k):
            if not torch.compiler.is_compiling():
                self._infer_parameters(self, a, k)
            return compiled(*a, **k)

        self._compiled_call_impl = call

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        st: TreadState | None = self.__dict__.get("_treadfx")
        if st is not None:  # dtypes/devices changed: traced graphs may have specialised on them
            st.programs.clear()
            st.current = None
        return result

    def __reduce_ex__(self, protocol):
        st: TreadState = self.__dict__["_treadfx"]
        plain = object.__new__(st.original_class)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_treadfx"})
        return (_rebuild, (plain, st.config, st.routing_step()))

    def extra_repr(self) -> str:
        st: TreadState = self.__dict__["_treadfx"]
        base = super().extra_repr()  # type: ignore[misc]
        routes = ", ".join(f"{r.start}..{r.end}@{r.ratio:g}" for r in st.config.routes)
        return (base + ", " if base else "") + f"treadfx routes=[{routes}]"


def _rebuild(plain: nn.Module, config: TransformConfig, step: int = 0) -> nn.Module:
    from .api import _attach

    out = _attach(plain, config)
    out.__dict__["_treadfx"].base_step = step
    return out


_SUBCLASSES: dict[type, type] = {}
_HASHES: dict[Any, str] = {}  # module structure -> WL hash (same structure, same code path, same graph)


def tread_subclass(cls: type) -> type:
    """The (cached) dynamic subclass ``Tread<cls>`` with TreadModule first in the MRO."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        # the subclass keeps the original class's name and module, so that libraries that save the class name
        # (diffusers' config.json and model_index.json, transformers' auto classes) reload the original class
        sub = type(cls.__name__, (TreadModule, cls), {"__module__": cls.__module__,
                                                      "__qualname__": getattr(cls, "__qualname__", cls.__name__)})
        _SUBCLASSES[cls] = sub
    return sub


# ------------------------------------------------------------------------------------------ building


def _mode_key(model: nn.Module, st: TreadState, args: tuple, kwargs: dict) -> tuple:
    """Everything a traced graph is specialised on: input signature, mode, grad mode, autocast of every device."""
    return (signature_of(args, kwargs), model.training, torch.is_grad_enabled(), dtype_state())


#: at most this many traced graphs per model (least recently used first out), and per signature for float values
MAX_PROGRAMS = 16
MAX_VALUE_VARIANTS = 4
_RETRACE_WARN_AFTER = 3


def _program_for(model: nn.Module, st: TreadState, args: tuple, kwargs: dict) -> RoutedProgram:
    """The routed program for this call: cached, guarded, retraced when the model or a guarded value changed."""
    key = _mode_key(model, st, args, kwargs)
    progs = st.programs.get(key)
    reason = None
    if progs is not None:
        st.programs.move_to_end(key)
        leaves, _ = flatten_call(args, kwargs)
        for i, prog in enumerate(progs):
            if not prog.values_match(leaves):
                continue
            reason = prog.guard.check() if prog.guard is not None else None
            if reason is None:
                return prog
            progs.pop(i)
            _note_retrace(st, key, reason)
            break
    prog = build_program(model, st, args, kwargs)
    progs = st.programs.setdefault(key, [])
    progs.append(prog)
    if len(progs) > MAX_VALUE_VARIANTS:
        progs.pop(0)
        names = dict(zip(prog.traced.tensor_positions, prog.traced.input_names))
        args_named = ", ".join(f"`{names.get(p, p)}`" for p in prog.traced.value_guards)
        _warn_once(st, ("values", key[0]),
                   f"treadfx: the forward branches on the value of float argument(s) {args_named}, which keep "
                   f"changing, so each new value needs its own traced graph (only {MAX_VALUE_VARIANTS} are kept). "
                   "Fix: pass the value as a tensor, or keep it fixed during training.")
    if len(st.programs) > MAX_PROGRAMS:
        st.programs.popitem(last=False)
        _warn_once(st, "signatures", f"treadfx: more than {MAX_PROGRAMS} different call signatures; "
                   + _changing_constants(model, st, key[0]) + " Each one is traced separately and only the "
                   f"{MAX_PROGRAMS} most recent graphs are kept. Fix: pass values that change between calls as "
                   "tensors, and keep shapes fixed (bucket them).")
    return prog


def _note_retrace(st: TreadState, key: Any, reason: str) -> None:
    counts = st.__dict__.setdefault("retraces", {})
    counts[reason] = counts.get(reason, 0) + 1
    if counts[reason] >= _RETRACE_WARN_AFTER:
        _warn_once(st, ("retrace", reason),
                   f"treadfx: retraced {counts[reason]} times because {reason} between calls. If the forward itself "
                   "changes this attribute, treadfx's graph cannot replay that side effect. Fix: keep such state "
                   "outside the module whose forward calls the blocks, or in a tensor buffer.")


def _warn_once(st: TreadState, key: Any, message: str) -> None:
    if key not in st.warned:
        st.warned.add(key)
        warnings.warn(message, stacklevel=4)


def _changing_constants(model: nn.Module, st: TreadState, sig: Any) -> str:
    """Name the non-tensor arguments whose values differ between the cached signatures."""
    from .tracing import _leaf_names, _readable

    others = [k[0] for k in st.programs if k[0].spec == sig.spec and k[0] is not sig]
    differing = sorted({i for o in others for i, (a, b) in enumerate(zip(o.leaves, sig.leaves))
                        if a != b and a[0] == "C"})
    if not differing:
        return "input shapes keep changing."
    names = [_readable(n, _forward_arg_names(st.original_forward)) for n in _leaf_names(sig.spec, len(sig.leaves))]
    return "the value of argument(s) " + ", ".join(f"`{names[i]}`" for i in differing) + " keeps changing."


def _forward_arg_names(fn: Callable) -> list[str]:
    try:
        params = list(_inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _block_carry_fn(prog: TracedProgram):
    """Maps a block call's outputs to the inputs they carry (same shape; residual path when ambiguous)."""
    cache: dict[Any, dict[int, int]] = {}

    def carry(node) -> dict[int, Any]:
        value = node.meta.get("val")
        outs = list(value) if isinstance(value, (tuple, list)) else [value]
        ins = []
        for n in tensor_input_nodes(node):
            if n not in ins:
                ins.append(n)
        result: dict[int, Any] = {}
        ambiguous: list[int] = []
        for j, o in enumerate(outs):
            if not isinstance(o, torch.Tensor) or o.ndim < 2:
                continue
            matches = [i for i in ins if isinstance(i.meta.get("val"), torch.Tensor) and
                       tuple(i.meta["val"].shape) == tuple(o.shape)]
            if len(matches) == 1:
                result[j] = matches[0]
            elif len(matches) > 1:
                ambiguous.append(j)
        if ambiguous:
            module = prog.gm.get_submodule(node.target)
            key = (module_structure_key(module), tuple(
                (tuple(i.meta["val"].shape), str(i.meta["val"].dtype)) for i in ins
                if isinstance(i.meta.get("val"), torch.Tensor)))
            if key not in cache:
                cache[key] = _residual_sources(module, node)
            flat = tensor_input_nodes(node)
            for j in ambiguous:
                src = cache[key].get(j)
                if src is not None and src < len(flat):
                    result[j] = flat[src]
        return result

    return carry


def _residual_sources(module: nn.Module, node) -> dict[int, int]:
    """For each output of a block: the single input reached by a same-shape (residual) path inside it."""
    import torch.fx as fx

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        inner = trace(module, type(module).forward, tuple(args), dict(kwargs), leaves=[])
    except TransformError:
        return {}
    phs = [n for n in inner.gm.graph.nodes if n.op == "placeholder"]
    ph_index = {p: k for k, p in enumerate(phs)}
    output = next(n for n in inner.gm.graph.nodes if n.op == "output")
    result = {}
    for j, out_node in enumerate(output.args[0]):
        if not isinstance(out_node, fx.Node):
            continue
        shape = tuple(out_node.meta["val"].shape)

        def same_shape(n: fx.Node, shape=shape) -> bool:
            v = n.meta.get("val")
            return isinstance(v, torch.Tensor) and tuple(v.shape) == shape

        reached = {ph_index[n] for n in upstream([out_node], expand=same_shape) if n in ph_index and same_shape(n)}
        if len(reached) == 1:
            pos = inner.out_tensor_positions[j] if j < len(inner.out_tensor_positions) else j
            result[pos] = next(iter(reached))
    return result


def build_program(model: nn.Module, st: TreadState, args: tuple, kwargs: dict) -> RoutedProgram:
    """Trace, analyse, plan and rewrite for this call; raises TransformError subclasses with fixes.

    Safe inside ``torch.autocast``: the analysis leaves nothing in autocast's cast cache.
    """
    with TRACE_LOCK, autocast_cache_off(), rng_preserved((args, kwargs)):
        return _build_program(model, st, args, kwargs)


def _build_program(model: nn.Module, st: TreadState, args: tuple, kwargs: dict) -> RoutedProgram:
    from treadfx.passes.tread import TreadPass

    t0 = time.perf_counter()
    cfg = st.config
    if not st.candidates:
        st.candidates = find_block_candidates(model)
    leaves = [c.module for c in st.candidates] + [model.get_submodule(p) for p in cfg.leaf_modules]
    prog = trace(model, st.original_forward, args, kwargs, leaves=leaves,
                 arg_names=_forward_arg_names(st.original_forward))
    original_code = prog.gm.code
    for c in st.candidates:
        if c.wl_hash is None:
            key = module_structure_key(c.module)
            if key not in _HASHES:
                _HASHES[key] = block_graph_hash(c.module)
            c.wl_hash = _HASHES[key]
    chains = find_chains(prog.gm, st.candidates, prog.model_root)
    if not chains:
        raise NoBlocksFoundError(
            f"{type(model).__name__}.forward never calls its repeated blocks "
            f"({', '.join(c.path for c in st.candidates[:4])}...). Fix: check the forward, or name the blocks with "
            "leaf_modules=[...]."
        )
    image_index = image_input_index(prog, cfg)
    analysis = LayoutAnalysis(prog.gm, image_index, [n for c in chains for n in c.nodes], _block_carry_fn(prog))
    chain = pick_chain(chains, analysis, cfg)
    spans = resolve_routes(cfg.routes, len(chain))

    def name_of(node) -> str:
        if node.op == "placeholder":
            return f"input `{node.meta.get('input_name', node.name)}`"
        if node.op == "call_module":
            return f"output of `{prog.model_path(node)}`"
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
            src = node.args[0]
            return f"{name_of(src)}[{node.args[1]}]" if isinstance(src, type(node)) else node.name
        return f"`{node.name}`"

    probe = make_order_probe(prog, analysis)
    plans = []
    for i, (route, (s, e)) in enumerate(zip(cfg.routes, spans)):
        plans.append(plan_route(prog, analysis, chain, i, route, s, e, name_of, order_probe=probe))
    tread_pass = TreadPass(plans, fp32_after_route=cfg.fp32_after_route, forced=st.forced, training=model.training)
    tread_pass.requires(prog.gm)
    tread_pass.call(prog.gm)
    tread_pass.ensures(prog.gm)
    routed = RoutedProgram(prog, plans, tread_pass.selects, chain, chains, analysis,
                           time.perf_counter() - t0, original_code)
    st._sync(routed)
    _validate(routed, st)
    if cfg.aux_loss:
        from .loss import program_token_map

        program_token_map(routed)
    routed.live = make_live(prog.gm, prog, model, list(chain.nodes))
    inner_paths = [p[len(prog.model_root) + 1:] for p in routed.live.inlined]
    guarded = [("", model)] + [(p, model.get_submodule(p)) for p in inner_paths]
    check_inlined_hooks(guarded)
    routed.guard = LiveGuard(guarded, model)
    routed.trace_seconds = time.perf_counter() - t0
    return routed


def _validate(routed: RoutedProgram, st: TreadState) -> None:
    """Fake-run the routed graph with routes active; output metadata must equal the original's."""
    prog = routed.traced
    saved = [(s.forced, s.num_keep, s.fixed) for s in routed.selects]
    try:
        for sel in routed.selects:
            sel.forced, sel.fixed = True, None
        env = prog.evaluator.propagate(prog.gm, list(prog.fake_inputs or []))
    except Exception as e:
        raise StreamAnalysisError(
            f"the routed graph does not run on fake tensors with the routes active: {type(e).__name__}: {e}. "
            "Fix: report this model to treadfx; meanwhile end the route earlier."
        ) from e
    finally:
        for sel, (f, k, fx_) in zip(routed.selects, saved):
            sel.forced, sel.num_keep, sel.fixed = f, k, fx_
    output = next(n for n in prog.gm.graph.nodes if n.op == "output")
    outs = env[output][: routed.n_outputs]
    originals = [n.meta.get("val") for n in output.args[0][: routed.n_outputs]]
    for k, (a, b) in enumerate(zip(outs, originals)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            raise StreamAnalysisError(
                f"with routing, output {k} has shape {list(a.shape)} {a.dtype} instead of {list(b.shape)} {b.dtype}. "
                "Fix: end the route before the tensor that changes shape."
            )
