"""Evaluating graph nodes and modules on fake tensors (shapes, dtypes, devices; no data).

:class:`FakeEvaluator` memoises module calls by *structure*: two modules with
the same classes, parameter shapes, training flags and plain attributes,
called with inputs of the same metadata, produce outputs of the same metadata,
so a depth-28 chain of identical blocks is evaluated once per token count.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes

__all__ = [
    "FakeEvaluator", "fake_like", "module_structure_key", "quiet_fake_tensor_logs", "forward_of", "no_user_hooks",
    "rng_preserved", "data_dependent_summary", "note_uncounted_flops", "DATA_DEPENDENT_ERRORS",
]


def _compiled_inner(m: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) wraps, else None."""
    if type(m).__name__ == "OptimizedModule" and type(m).__module__.startswith("torch._dynamo"):
        return m.__dict__["_modules"].get("_orig_mod")
    return None


def forward_of(m: nn.Module):
    """The plain ``forward`` of a module for analysis: no hooks, and through a ``torch.compile`` wrapper."""
    inner = _compiled_inner(m)
    while inner is not None:
        m, inner = inner, _compiled_inner(inner)
    return m.forward


_HOOKLESS = threading.local()


@contextlib.contextmanager
def _module_calls_through(make_call: Callable[[Callable], Callable]) -> Iterator[None]:
    """While active, ``nn.Module.__call__`` is ``make_call(previous)`` (which falls back to ``previous``); the
    previous one is put back on exit."""
    previous = nn.Module.__call__
    nn.Module.__call__ = make_call(previous)  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = previous  # type: ignore[method-assign]


@contextlib.contextmanager
def no_user_hooks() -> Iterator[None]:
    """While active, module calls *in this thread* run ``forward`` only: no user hooks, no compiled wrappers.

    Shape inference evaluates modules on fake tensors; user hooks (feature
    capture, logging, statistics) and compiled regions belong to real calls.
    Other threads are not affected: their module calls run as usual.
    """
    if getattr(_HOOKLESS, "depth", 0):
        _HOOKLESS.depth += 1
        try:
            yield
        finally:
            _HOOKLESS.depth -= 1
        return
    previous = nn.Module.__call__
    me = threading.get_ident()

    def call(self, *args, **kwargs):
        if threading.get_ident() == me and getattr(_HOOKLESS, "depth", 0):
            try:
                return forward_of(self)(*args, **kwargs)
            except _DATA_DEPENDENT:
                if getattr(_HOOKLESS, "culprit", None) is None:
                    _HOOKLESS.culprit = self  # the innermost module whose own code needs tensor data
                raise
        return previous(self, *args, **kwargs)

    _HOOKLESS.depth = 1
    nn.Module.__call__ = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        _HOOKLESS.depth = 0
        nn.Module.__call__ = previous  # type: ignore[method-assign]


@contextlib.contextmanager
def rng_preserved(tensors: Any = ()) -> Iterator[None]:
    """Global RNG states (CPU, and the CUDA devices of ``tensors``) are restored on exit: analysis draws nothing."""
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves(tensors)
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def quiet_fake_tensor_logs() -> Iterator[None]:
    """Silence torch's fake-tensor error logging while probing shapes that are expected to fail."""
    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch._subclasses.fake_impls")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)

_SIMPLE = (int, float, bool, str, type(None))

try:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    _DATA_DEPENDENT: tuple = (DataDependentOutputException, DynamicOutputShapeException)
except ImportError:  # pragma: no cover
    _DATA_DEPENDENT = ()

#: torch's errors for an op whose result depends on tensor data (``.item()``, ``nonzero``) on fake tensors
DATA_DEPENDENT_ERRORS: tuple = _DATA_DEPENDENT


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def dtype_state() -> tuple:
    """Everything global that decides output dtypes: autocast on/off and its dtype per device type, default dtype.

    Part of the key of the process-wide output-metadata memo, so a module
    evaluated outside autocast is never reused for a call inside it (CPU
    autocast included: ``torch.is_autocast_enabled()`` alone only sees CUDA).
    """
    out: list = [torch.get_default_dtype()]
    for dev in _AUTOCAST_DEVICES:
        try:
            out.append((dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        except (RuntimeError, TypeError, AttributeError, ValueError):  # device type unknown to this build
            continue
    return tuple(out)


@contextlib.contextmanager
def autocast_cache_off() -> Iterator[None]:
    """Disable autocast's cast cache while fake tensors flow through the model.

    Under ``torch.autocast`` the cache keeps the low-precision copy of each
    parameter for the rest of the autocast region; a fake evaluation would
    otherwise leave fake copies there, and the next real forward in the same
    region would compute with them.
    """
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


@contextlib.contextmanager
def _unsharded(module: nn.Module, evaluator: "FakeEvaluator") -> Iterator[None]:
    """While shape inference runs ``module.forward`` without hooks, show its FSDP2-sharded (DTensor) parameters
    as fake full tensors, as FSDP's pre-forward hook would in a real call."""
    sharded = {n: evaluator.to_fake(p) for n, p in module.named_parameters() if _is_dtensor(p)}
    if not sharded:
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, sharded, strict=False):
        yield


#: nn.Module's own bookkeeping attributes (hooks, registries): not part of what a forward computes
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def module_structure_key(m: nn.Module) -> tuple:
    """Everything about a module tree that can change the metadata of its outputs (classes, training flags, parameter
    and buffer shapes, plain attributes: private ones too, such as diffusers' ``_force_inference_output``)."""
    parts = []
    for name, sub in m.named_modules():
        attrs = tuple(
            sorted(
                (k, v) for k, v in vars(sub).items()
                if k not in _MODULE_INTERNALS and (isinstance(v, _SIMPLE) or (
                    isinstance(v, tuple) and all(isinstance(e, _SIMPLE) for e in v)))
            )
        )
        params = tuple((k, tuple(p.shape), p.dtype, str(p.device)) for k, p in sub._parameters.items() if p is not None)
        bufs = tuple((k, tuple(b.shape), b.dtype, str(b.device)) for k, b in sub._buffers.items() if b is not None)
        parts.append((name, type(sub), sub.training, attrs, params, bufs))
    return tuple(parts)


def meta_key(tree: Any) -> tuple:
    """A hashable key of the shapes, dtypes and Python values in ``tree`` (the memo key of a fake evaluation)."""
    out = []
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            out.append(("T", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, str(leaf.device), leaf.requires_grad))
        elif isinstance(leaf, nn.Module):  # a module argument: its tables' shapes too (a routed copy has fewer rows)
            out.append(("M", module_structure_key(leaf), tuple(
                (name, k, tuple(t.shape), t.dtype) for name, sub in leaf.named_modules()
                for k, t in vars(sub).items() if isinstance(t, torch.Tensor))))

        else:
            try:
                hash(leaf)
                out.append(("C", type(leaf), leaf))
            except TypeError:
                out.append(("C", type(leaf), id(leaf)))
    return (pytree.tree_structure(tree), tuple(out))


def fake_like(t: torch.Tensor, mode: FakeTensorMode, shape: tuple | None = None) -> torch.Tensor:
    """A fresh fake tensor with t's metadata (optionally another shape)."""
    with mode:
        if shape is None:
            out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
        else:
            out = torch.empty(tuple(shape), dtype=t.dtype, device=t.device)
    if t.requires_grad and out.is_floating_point():
        out.requires_grad_(True)
    return out


class _DataDependentOutput(RuntimeError):
    """A symbolic fake evaluation ended with an output whose shape (or a Python value) depends on the data."""


class _Meta:
    """Metadata of a tensor (shape, stride, dtype, device, requires_grad), independent of any fake mode."""

    __slots__ = ("shape", "stride", "dtype", "device", "requires_grad")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride = tuple(t.shape), tuple(t.stride())
        self.dtype, self.device, self.requires_grad = t.dtype, t.device, t.requires_grad


#: process-wide, like the memo: (class, module_structure_key) of submodules whose own code needs tensor data for a
#: size (boolean-mask indexing, nonzero) and whose outputs were proved static by a symbolic evaluation
_DATA_DEPENDENT_MODULES: set[tuple[type, tuple]] = set()
#: process-wide: (class, module_structure_key) of modules whose outputs only a run on data could give (their code
#: reads tensor values even symbolically: ``.tolist()`` of a mask): a module the user names in ``leaf_modules``
#: lands here when the trace evaluates it. Analyses that run the forward on fakes call them by metadata, as they
#: call the live modules a trace detects itself.
_REAL_RUN_MODULES: set[tuple[type, tuple]] = set()
_OUTPUT_META: dict[tuple, Any] = {}  # process-wide: (module structure, input metadata) -> output metadata
_OUTPUT_META_LIMIT = 4096


class FakeEvaluator:
    """Runs modules, functions and graph nodes on fake tensors of one fake mode.

    Module calls are memoised process-wide by (structure, input metadata):
    the output *metadata* is stored and rebuilt as fresh fakes in this mode.
    """

    def __init__(self, mode: FakeTensorMode):
        self.mode = mode
        self._structure: dict[int, tuple] = {}
        self._fakes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.live_modules: list[nn.Module] = []  # modules that use tensor data: run live, never on fakes
        self._symbolic: FakeTensorMode | None = None

    @contextlib.contextmanager
    def live_modules_by_metadata(self, data_dependent_call: Callable | None = None) -> Iterator[None]:
        """While active, calls of ``live_modules`` and of data-dependent submodules (see
        :meth:`is_data_dependent`) in this thread return outputs built by :meth:`call_module`.

        Such modules use tensor data (an ``assert`` on labels, ``.tolist()``,
        expert dispatch by boolean masks), so running their code on plain fake
        tensors fails; analyses that run the whole forward on fakes (FLOP
        counts) get their outputs' metadata instead, and count no FLOPs inside
        them (their sizes depend on the data).  With ``data_dependent_call``,
        a data-dependent submodule's call returns ``data_dependent_call(module,
        args, kwargs)`` instead, under the caller's dispatch modes (the FLOP
        count counts such a module symbolically: :mod:`treadfx.flops`).
        """
        ids = {id(m) for m in self.live_modules}
        if not ids and not _DATA_DEPENDENT_MODULES and not _REAL_RUN_MODULES:
            yield
            return
        me = threading.get_ident()
        evaluator = self

        def make_call(previous):
            def call(module, *args, **kwargs):
                if threading.get_ident() == me and id(module) in ids:
                    return evaluator.call_module(module, args, kwargs)
                if (data_dependent_call is not None and threading.get_ident() == me
                        and evaluator.is_data_dependent(module) and not evaluator.needs_data(module)):
                    return data_dependent_call(module, args, kwargs)
                if threading.get_ident() == me and (evaluator.is_data_dependent(module)
                                                    or evaluator.needs_data(module)):
                    # outside the caller's dispatch modes (a FLOP counter): the symbolic evaluation's ops, whose
                    # sizes are unbacked symbols, and a run on random data are not the caller's to count
                    with _disable_current_modes():
                        return evaluator.call_module(module, args, kwargs)
                return previous(module, *args, **kwargs)
            return call

        with _module_calls_through(make_call):
            yield

    def to_fake(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            return t
        hit = self._fakes.get(id(t))
        if hit is None or hit[0] is not t:
            if _is_dtensor(t):  # a shard (FSDP2 between forwards): fake the full tensor its forward will see
                with self.mode:
                    full = torch.empty(tuple(t.shape), dtype=t.dtype, device=t.device)
                hit = (t, full.requires_grad_(t.requires_grad) if full.is_floating_point() else full)
            else:
                hit = (t, self.mode.from_tensor(t))
            self._fakes[id(t)] = hit
        return hit[1]

    def fakeify(self, tree: Any) -> Any:
        return pytree.tree_map(lambda x: self.to_fake(x) if isinstance(x, torch.Tensor) else x, tree)

    def _rebuild(self, tree: Any) -> Any:
        def build(m):
            if not isinstance(m, _Meta):
                return m
            with self.mode:
                out = torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=m.device)
            if m.requires_grad:
                out.requires_grad_(True)
            return out

        return pytree.tree_map(build, tree, is_leaf=lambda x: isinstance(x, _Meta))

    def call_module(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        sk = self._structure.get(id(module))
        if sk is None:
            sk = module_structure_key(module)
            self._structure[id(module)] = sk
        key = (sk, meta_key((tuple(args), dict(kwargs))), torch.is_grad_enabled(), dtype_state())
        hit = _OUTPUT_META.get(key)
        if hit is not None:
            return self._rebuild(hit)
        a, k = self.fakeify((args, kwargs))
        out = self._fake_call(module, a, k)
        if any(isinstance(x, nn.Module) for x in pytree.tree_leaves(out)):
            return out  # a module (a routed copy of a module argument) holds this mode's fakes: not memoised
        if len(_OUTPUT_META) >= _OUTPUT_META_LIMIT:
            _OUTPUT_META.clear()
        _OUTPUT_META[key] = pytree.tree_map(lambda x: _Meta(x) if isinstance(x, torch.Tensor) else x, out)
        return out

    def remember(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        """Make ``out`` (fake or real tensors, Python values) what :meth:`call_module` returns for these inputs'
        metadata: a module run live on a traced call's real data has the output structure of that data.  Such a
        module needs data (see :meth:`needs_data`): analyses on fakes call it by metadata, whoever meets it first."""
        _REAL_RUN_MODULES.add((type(module), self._structure_of(module)))
        key = (module_structure_key(module), meta_key(self.fakeify((tuple(args), dict(kwargs)))),
               torch.is_grad_enabled(), dtype_state())
        _OUTPUT_META[key] = pytree.tree_map(lambda x: _Meta(x) if isinstance(x, torch.Tensor) else x, out)

    def _fake_call(self, module: nn.Module, a: tuple, k: dict) -> Any:
        """``module``'s outputs on fake inputs.  A submodule whose own code needs tensor data for a size (a mixture
        of experts' ``x[idx == i]``) is found by the failing call, recorded as data-dependent (see
        :meth:`is_data_dependent`), and the call is repeated with that submodule evaluated symbolically on its own
        (:meth:`_symbolic_call`, memoised like any module call): the rest of the module stays on plain fakes."""
        for _attempt in range(8):
            whole = self.is_data_dependent(module)
            _HOOKLESS.culprit = None
            try:
                if whole:
                    return self._symbolic_call(module, a, k)
                with self.mode, _unsharded(module, self), no_user_hooks(), self._data_dependent_by_metadata():
                    # .forward, not __call__: the module's own hooks (FSDP, logging) and a regional
                    # compile wrapper belong to real calls, not to shape inference
                    return forward_of(module)(*a, **k)
            except _DATA_DEPENDENT:
                culprit = getattr(_HOOKLESS, "culprit", None) or module
                _HOOKLESS.culprit = None
                if whole or self.is_data_dependent(culprit):
                    break  # symbolic evaluation failed too
                _DATA_DEPENDENT_MODULES.add((type(culprit), self._structure_of(culprit)))
            except _DataDependentOutput:
                break
            except Exception:
                if not whole:
                    raise
                break  # a guard on a data-dependent value inside the symbolic evaluation
        _DATA_DEPENDENT_MODULES.discard((type(module), self._structure_of(module)))
        _REAL_RUN_MODULES.add((type(module), self._structure_of(module)))
        # sizes or Python values that really depend on the data: one run on random data (see _real_fallback)
        return self._real_fallback(module, a, k)

    def _structure_of(self, module: nn.Module) -> tuple:
        sk = self._structure.get(id(module))
        if sk is None:
            sk = module_structure_key(module)
            self._structure[id(module)] = sk
        return sk

    @contextlib.contextmanager
    def _data_dependent_by_metadata(self) -> Iterator[None]:
        """While active, data-dependent submodules called in this thread go through :meth:`call_module`."""
        if not _DATA_DEPENDENT_MODULES:
            yield
            return
        me = threading.get_ident()
        evaluator = self

        def make_call(previous):
            def call(module, *args, **kwargs):
                if threading.get_ident() == me and evaluator.is_data_dependent(module):
                    with _disable_current_modes():  # call_module enters the fake mode it needs itself
                        return evaluator.call_module(module, args, kwargs)
                return previous(module, *args, **kwargs)
            return call

        with _module_calls_through(make_call):
            yield

    def is_data_dependent(self, module: nn.Module) -> bool:
        """True if ``module`` has the class and structure of a submodule whose code was found to need tensor data
        on plain fake tensors (and whose output shapes :meth:`call_module` proved static symbolically)."""
        if not any(t is type(module) for t, _ in _DATA_DEPENDENT_MODULES):
            return False
        return (type(module), self._structure_of(module)) in _DATA_DEPENDENT_MODULES

    def needs_data(self, module: nn.Module) -> bool:
        """True if ``module`` has the class and structure of a module whose outputs only a run on data could give
        (neither plain nor symbolic fake evaluation could run its code): analyses on fakes call it by metadata."""
        if not any(t is type(module) for t, _ in _REAL_RUN_MODULES):
            return False
        return (type(module), self._structure_of(module)) in _REAL_RUN_MODULES

    def symbolic_mode(self) -> FakeTensorMode:
        """A second fake mode with a ShapeEnv: sizes that depend on tensor data (``x[mask]``, ``nonzero``) become
        unbacked symbols instead of errors; input shapes stay static."""
        if self._symbolic is None:
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            self._symbolic = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
        return self._symbolic

    def _symbolic_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Output metadata of a module whose code has data-dependent sizes, without running it on any data.

        The module runs on fake tensors of :meth:`symbolic_mode` with its inputs' metadata: a boolean-mask index or
        ``nonzero`` gives a tensor of an unbacked size ``u``, the ops after it compute with ``u`` symbolically, and
        an ``index_put`` back into a tensor of known size (a mixture of experts' ``y[mask] = expert(x[mask])``)
        ends with static shapes again.  The result is exact for every value of the data: it is accepted only when
        every output size and stride is a concrete integer (a shape that stays data-dependent, or a branch on a
        data-dependent value, raises; the caller then falls back).  Outputs are rebuilt as fakes of ``self.mode``.
        """
        mode = self.symbolic_mode()

        def to_sym(x):
            if not isinstance(x, torch.Tensor):
                return x
            out = fake_like(x, mode)
            return out.requires_grad_(x.requires_grad) if out.is_floating_point() else out

        a, k = pytree.tree_map(to_sym, (args, kwargs))
        with mode, no_user_hooks():
            out = forward_of(module)(*a, **k)

        def concrete(x):
            if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                raise _DataDependentOutput("a Python value computed from data-dependent sizes")
            if not isinstance(x, torch.Tensor):
                return x
            if not all(type(d) is int for d in tuple(x.shape) + tuple(x.stride())):
                raise _DataDependentOutput(f"an output of shape {tuple(x.shape)} depends on the data")
            with self.mode:
                f = torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device=x.device)
            return f.requires_grad_(True) if x.requires_grad and f.is_floating_point() else f

        return pytree.tree_map(concrete, out)

    def _real_fallback(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Output metadata of a module whose forward branches on data: run it once on random real inputs.

        The global RNG state is restored afterwards and no user hook runs, so the
        user's run draws exactly what it would draw without treadfx.
        """

        def real(x):
            if not isinstance(x, torch.Tensor):
                return x
            if x.is_floating_point():
                return torch.randn(tuple(x.shape), dtype=x.dtype, device=x.device)
            if x.dtype == torch.bool:
                return torch.ones(tuple(x.shape), dtype=x.dtype, device=x.device)
            return torch.zeros(tuple(x.shape), dtype=x.dtype, device=x.device)

        grad = any(p.requires_grad for p in module.parameters()) or any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in pytree.tree_leaves((args, kwargs)))
        with unset_fake_temporarily(), torch.no_grad(), rng_preserved((args, kwargs)), no_user_hooks():
            out = forward_of(module)(*pytree.tree_map(real, args), **pytree.tree_map(real, kwargs))

        def fake(x):
            if not isinstance(x, torch.Tensor):
                return x
            f = fake_like(x, self.mode)
            if grad and f.is_floating_point():
                f.requires_grad_(True)
            return f

        return pytree.tree_map(fake, out)

    def call(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        a, k = self.fakeify((args, kwargs))
        with self.mode:
            return fn(*a, **k)

    def run_node(self, gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Evaluate one node of ``gm`` on (fake) argument values."""
        if node.op == "call_module":
            return self.call_module(gm.get_submodule(node.target), args, kwargs)
        if node.op == "call_function":
            if getattr(node.target, "__treadfx_guard__", False):
                return None  # a guard on tensor data: there is no data here
            return self.call(node.target, args, kwargs)
        if node.op == "call_method":
            a, k = self.fakeify((args, kwargs))
            with self.mode:
                return getattr(a[0], node.target)(*a[1:], **k)
        if node.op == "get_attr":
            obj: Any = gm
            for atom in str(node.target).split("."):
                obj = getattr(obj, atom)
            return self.to_fake(obj) if isinstance(obj, torch.Tensor) else obj
        raise AssertionError(node.op)

    def propagate(self, gm: fx.GraphModule, inputs: list) -> dict[fx.Node, Any]:
        """Fake values of every node of ``gm`` for these placeholder values.  A node that fails raises to the
        caller (which reports it as a TransformError) without torch's fake-tensor error logs."""
        with quiet_fake_tensor_logs():
            return self._propagate(gm, inputs)

    def _propagate(self, gm: fx.GraphModule, inputs: list) -> dict[fx.Node, Any]:
        env: dict[fx.Node, Any] = {}
        it = iter(inputs)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(it, node.args[0] if node.args else None)  # optional inputs default to None
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            if node.op == "output":
                env[node] = args[0]
                continue
            try:
                env[node] = self.run_node(gm, node, args, kwargs)
            except _DATA_DEPENDENT:
                if not _specialised_on_data(node):
                    raise
                env[node] = node.meta.get("val")  # the graph is specialised on the traced call's value, guarded
        return env


def _specialised_on_data(node: fx.Node) -> bool:
    """The graph holds this node's value from the traced call and a data guard re-checks it at every call
    (``.item()``, ``.tolist()``, ``nonzero`` outside any live submodule; see :mod:`treadfx.data_guards`)."""
    return any(getattr(u.target, "__treadfx_guard__", False) for u in node.users)


#: process-wide: (class, module_structure_key) of data-dependent submodules whose FLOPs a count on fakes could not
#: make exact -> why (written by :mod:`treadfx.flops`, read by :func:`data_dependent_summary`)
_UNCOUNTED_FLOPS: dict[tuple[type, tuple], str] = {}


def note_uncounted_flops(module: nn.Module, why: str) -> None:
    """Record that FLOP counts leave out the insides of ``module`` (a data-dependent submodule), and ``why``."""
    _UNCOUNTED_FLOPS[(type(module), module_structure_key(module))] = why


#: layers whose forward FlopCounterMode counts (matmuls, convolutions, attention): a module run live that holds one
#: has FLOPs that a count on fake tensors cannot see
_COUNTED_LAYERS = (nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.modules.conv._ConvNd)

_LIVE_WHY = ("its code reads tensor values in Python (`.tolist()`, `.item()`, a branch on data), so it runs live on "
             "the data and a count on fake tensors cannot see inside it")


def data_dependent_summary(model: nn.Module, live: Any = ()) -> str:
    """"" or one line naming the submodules of ``model`` whose FLOPs the counts on fake tensors leave out, and why.

    Those are data-dependent submodules (sizes that depend on tensor values: a mixture of experts' boolean-mask
    dispatch) whose count cannot be exact for every value of the data (FLOP counts count the others symbolically,
    see :mod:`treadfx.flops`), and modules that run live on the data (``live``, or found to need data) holding
    layers FlopCounterMode counts (Linear, convolution, attention).  They are left out of the dense, routed and
    predicted counts alike, so ``inspect`` says so with this line."""
    live_ids = {id(m) for m in live}
    ev = FakeEvaluator(FakeTensorMode(allow_non_fake_inputs=True)) if _REAL_RUN_MODULES else None
    found: dict[tuple[str, str], list[str]] = {}
    listed: list[str] = []
    for path, sub in model.named_modules():
        if any(path.startswith(p + ".") for p in listed):
            continue  # inside a module already listed
        why = None
        if any(t is type(sub) for t, _ in _UNCOUNTED_FLOPS):
            why = _UNCOUNTED_FLOPS.get((type(sub), module_structure_key(sub)))
            why = None if why is None else f"sizes there depend on the data, and the count cannot be exact: {why}"
        if why is None and (id(sub) in live_ids or (ev is not None and ev.needs_data(sub))) and any(
                isinstance(x, _COUNTED_LAYERS) for x in sub.modules()):
            why = _LIVE_WHY
        if why is not None:
            found.setdefault((type(sub).__name__, why), []).append(path)
            listed.append(path)
    if not found:
        return ""
    parts = []
    for (cls, why), paths in found.items():
        shown = ", ".join(f"`{p}`" for p in paths[:2]) + (f", ... `{paths[-1]}`" if len(paths) > 2 else "")
        parts.append(f"inside {len(paths)} x {cls} ({shown}): {why}")
    return "; ".join(parts) + ". Dense, routed and predicted counts all leave them out alike"


def rng_state(tensors: Any = ()) -> tuple:
    """The global RNG states (CPU, and the CUDA devices of ``tensors``), for :func:`set_rng_state`."""
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves(tensors)
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    return (torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices])


def set_rng_state(state: tuple) -> None:
    """Restore what :func:`rng_state` saved."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda:
        torch.cuda.set_rng_state(s, d)
