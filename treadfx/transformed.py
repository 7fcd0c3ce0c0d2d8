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
happens inside a compiled region and there are no graph breaks.  A program
specialised on tensor data (:mod:`treadfx.data_guards`: Lumina2's padded caption
length) is the exception: its variants are dispatched from a frame dynamo skips
(one graph break), each variant compiled as its own graph, a new one traced
eagerly there.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.lazy import LazyModuleMixin

from .blocks import BlockCandidate, find_block_candidates
from .config import TransformConfig
from .errors import CompileTimeTraceError, TokenCountError, TransformError
from .fake_eval import dtype_state
from .live import LiveGuard, LiveProgram
from .ops import num_kept
from .patch_map import TokenMap, derive_token_map
from .pipeline import BuildRequest, Built, build, forward_arg_names
from .planning import RoutePlan
from .side_exits import record_outputs, warn_side_exits
from .data_guards import run_guarded, run_guarded_compiled
from .tracing import argument_leaf_names, readable_argument, flatten_call, signature_of

__all__ = [
    "TransformConfig", "TreadState", "RoutedProgram", "RouteRecord", "TreadModule", "is_transformed", "state_of",
    "unwrap", "attach", "program_for", "prepare_now", "tread_subclass", "clone_module_tree",
]


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
    """A traced, route-rewritten graph for one input signature and mode, as :func:`treadfx.pipeline.build` made it.

    ``gm`` is the analysis graph (every module inlined, route ops inserted:
    what ``inspect`` and the loss helpers read); ``live`` is what runs: the same
    program with every module that does not call the routed blocks called live
    on the model (see :mod:`treadfx.live`), guarded by ``guard``.
    """

    def __init__(self, built: Built):
        self.traced = built.traced
        self.gm = built.traced.gm
        self.plans = built.plans
        self.selects = built.selects
        self.chain = built.chain
        self.chains = built.chains
        self.analysis = built.analysis
        self.n_outputs = len(built.traced.out_tensor_positions)
        self.trace_seconds = built.seconds
        self.original_code = built.original_code
        self.shapes = tuple(
            (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else (None, float)
            for t in (built.traced.fake_inputs or [])
        )
        self.seeded = any(s.seed is not None for s in built.selects)
        self._token_map: TokenMap | None = built.token_map
        self.live: LiveProgram = built.live
        self.guard: LiveGuard = built.guard

    def token_map(self) -> TokenMap:
        """The pixel->token map of this program, derived once from its patch embedding (never raises)."""
        if self._token_map is None:
            plan = self.plans[0]
            self._token_map = derive_token_map(self.gm, self.analysis, plan.stream, plan.stream_info)
        return self._token_map

    def matches(self, args: tuple, kwargs: dict) -> bool:
        """The call has this program's input shapes, dtypes and guarded float values."""
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
        """Run the live graph on this call and record the kept indices (the graph's extra outputs)."""
        leaves, _ = flatten_call(args, kwargs)
        inputs = [leaves[i] for i in self.traced.tensor_positions]
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        keep = state.keep_mask(self)
        step = state.step_counter(tensors) if self.seeded else None
        outs = self.live.gm(*inputs, keep, step)
        if step is not None:
            step.add_(1)
        user, extra = outs[: self.n_outputs], outs[self.n_outputs:]
        state.method.runtime_outputs(state, self, list(extra))
        state.record_outputs(user)
        return self.traced.unflatten_outputs(user)


class TreadState:
    """Per-transformed-model state, kept out of the module tree (never in state_dict)."""

    def __init__(self, config: TransformConfig, original_class: type, candidates: list[BlockCandidate],
                 method: Any):
        self.config = config
        self.method = method  # the treadfx.Method that attached this state: its plan_graph / rewrite_graph build
        # the routed graphs, its runtime_outputs consumes their extra outputs
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

    def record_outputs(self, user: Any) -> None:
        """Weak references to the tensors this thread's last routed forward returned (``route_mask`` finds a side
        exit by the returned tensor; none are kept under torch.compile)."""
        self._last.outputs = record_outputs(user)

    @property
    def last_outputs(self) -> tuple:
        return getattr(self._last, "outputs", ())

    def keep_mask(self, prog: "RoutedProgram") -> torch.Tensor | None:
        """The active keep mask as [B, N] bool image-token mask, or None."""
        if self.keep is None:
            return None
        mask = prog.token_map().per_token(self.keep, reduce="any")
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
        """Create per-device state (and the token map a keep mask needs) eagerly, so that a compiled forward never
        creates it."""
        if self.keep is not None:
            prog.token_map()
        if prog.seeded:
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
        new = TreadState(self.config, self.original_class, [], self.method)
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
        """Push ratios / forced flags / fixed indices into every built program's route ops.

        Fixed indices are checked against each program; they are refused only when they fit none of them (a model
        with cached graphs for 16 and 64 tokens takes 64-token indices; the 16-token graph then draws, and an eager
        call of that signature inside ``fixed_routes`` raises ``TokenCountError``)."""
        progs = list(self.programs_iter())
        errors = []
        for prog in progs:
            try:
                self.sync(prog)
            except TokenCountError as e:
                errors.append(e)
                self.sync(prog, check=False)
        if progs and len(errors) == len(progs):
            raise errors[0]

    def sync(self, prog: RoutedProgram, check: bool = True) -> None:
        """Push the ratio, forced flag and fixed indices of each route into this program's route ops; with
        ``check``, fixed indices that do not fit this program raise ``TokenCountError``, else they are dropped
        for it."""
        for plan, sel in zip(prog.plans, prog.selects):
            sel.num_keep = num_kept(plan.num_tokens, self.ratio_of(plan.index))
            sel.forced = self.forced
            fixed = self.fixed[plan.index] if self.fixed is not None and plan.index < len(self.fixed) else None
            if fixed is not None:
                try:
                    _check_fixed(fixed, plan)
                except TokenCountError:
                    if check:
                        raise
                    fixed = None
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


def clone_module_tree(root: nn.Module) -> nn.Module:
    """A new module tree with the same classes, attributes, parameter and buffer *objects*.

    Guarantees: ``clone.state_dict()`` has the same keys and the very same
    tensors as ``root.state_dict()``; changing training flags, hooks or the
    module structure of the clone leaves ``root`` untouched; modules shared
    between two paths stay shared.
    """
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        hit = memo.get(id(m))
        if hit is not None:
            return hit
        new = object.__new__(type(m))
        memo[id(m)] = new
        d = dict(m.__dict__)
        d["_parameters"] = type(m._parameters)(m._parameters)
        d["_buffers"] = type(m._buffers)(m._buffers)
        if "_non_persistent_buffers_set" in d:
            d["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
        for k, v in list(d.items()):
            if "hooks" in k and isinstance(v, dict):
                d[k] = type(v)(v)
        d["_modules"] = type(m._modules)((k, clone(c) if c is not None else None) for k, c in m._modules.items())
        new.__dict__.update(d)
        return new

    return clone(root)


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
        prepare_now(self, tuple(args), dict(kwargs or {}))

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
            if getattr(prog.traced, "data_guards", None):  # variants by tensor data: dispatch outside the graph
                return run_guarded_compiled(self, st, args, kwargs)
            return prog.run(st, args, kwargs)
        prog = program_for(self, st, args, kwargs)
        st.current = prog
        warn_side_exits(st, prog, type(self).__name__)
        if not getattr(prog.traced, "data_guards", None):
            st.sync(prog)
            return prog.run(st, args, kwargs)
        # variants by tensor data: fixed indices may fit another variant of this signature (Lumina2's padded length),
        # so they are checked against the variant that ran
        st.sync(prog, check=False)
        out = run_guarded(self, st, prog, args, kwargs)  # retraces when a value it specialised on changed
        st.sync(st.current)  # TokenCountError when the variant that ran does not take the fixed indices
        return out

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
        return (_rebuild, (plain, st.config, st.routing_step(), st.method))

    def extra_repr(self) -> str:
        st: TreadState = self.__dict__["_treadfx"]
        base = super().extra_repr()  # type: ignore[misc]
        routes = ", ".join(f"{r.start}..{r.end}@{r.ratio:g}" for r in st.config.routes)
        return (base + ", " if base else "") + f"treadfx routes=[{routes}]"


def _rebuild(plain: nn.Module, config: TransformConfig, step: int, method: Any) -> nn.Module:
    out = attach(plain, config, method=method)
    out.__dict__["_treadfx"].base_step = step
    return out


def attach(module: nn.Module, config: TransformConfig, candidates: list[BlockCandidate] | None = None, *,
           method: Any) -> nn.Module:
    """Make ``module`` (in place) a transformed model with this resolved config; returns it.

    Its class becomes :func:`tread_subclass` of its own class and its state a
    fresh :class:`TreadState` (``method`` consumes the routed graphs' extra
    outputs); parameters, buffers and submodules are untouched.
    """
    original = type(module)
    if candidates is None:
        candidates = find_block_candidates(module)
    module.__class__ = tread_subclass(original)
    module.__dict__["_treadfx"] = TreadState(config, original, candidates, method)
    return module


_SUBCLASSES: dict[type, type] = {}


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


# ------------------------------------------------------------------------------------------ program cache


def _mode_key(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Everything a traced graph is specialised on: input signature, mode, grad mode, autocast of every device."""
    return (signature_of(args, kwargs), model.training, torch.is_grad_enabled(), dtype_state())


#: at most this many traced graphs per model (least recently used first out), and per signature for float values
MAX_PROGRAMS = 16
MAX_VALUE_VARIANTS = 4
#: at most this many variants per signature of a graph specialised on tensor data (Lumina2's padded caption length:
#: one variant per value met, each traced once; a call that fits a kept variant goes straight to it)
MAX_DATA_VARIANTS = 64
_RETRACE_WARN_AFTER = 3


def program_for(model: nn.Module, st: TreadState, args: tuple, kwargs: dict) -> RoutedProgram:
    """The routed program for this call: cached, guarded, built (:func:`treadfx.pipeline.build`) when new or
    when the model or a guarded value changed."""
    key = _mode_key(model, args, kwargs)
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
            _note_retrace(st, reason)
            break
    req = BuildRequest(model, st.config, st.original_forward, args, kwargs, st.candidates, st.forced, st.method)
    prog = RoutedProgram(build(req))
    st.candidates = req.candidates  # found by the first build of a copy
    progs = st.programs.setdefault(key, [])
    progs.append(prog)
    if len(progs) > MAX_VALUE_VARIANTS and not prog.traced.data_guards:  # data variants: see data_guards
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
                   + _changing_constants(st, key[0]) + " Each one is traced separately and only the "
                   f"{MAX_PROGRAMS} most recent graphs are kept. Fix: pass values that change between calls as "
                   "tensors, and keep shapes fixed (bucket them).")
    return prog


def prepare_now(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Build (or find) the routed program for this call in the model's current mode and make it current, with
    its route ops synced and per-device state created; nothing happens when the model would not route."""
    st = state_of(model)
    if st.active(model.training):
        prog = program_for(model, st, args, kwargs)
        st.current = prog
        warn_side_exits(st, prog, type(model).__name__)
        st.sync(prog)
        st.prime(prog, args, kwargs)


def _note_retrace(st: TreadState, reason: str) -> None:
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


def _changing_constants(st: TreadState, sig: Any) -> str:
    """Name the non-tensor arguments whose values differ between the cached signatures."""
    others = [k[0] for k in st.programs if k[0].spec == sig.spec and k[0] is not sig]
    differing = sorted({i for o in others for i, (a, b) in enumerate(zip(o.leaves, sig.leaves))
                        if a != b and a[0] == "C"})
    if not differing:
        return "input shapes keep changing."
    arg_names = forward_arg_names(st.original_forward)
    names = [readable_argument(n, arg_names) for n in argument_leaf_names(sig.spec, len(sig.leaves))]
    return "the value of argument(s) " + ", ".join(f"`{names[i]}`" for i in differing) + " keeps changing."
