"""Shape-specialising torch.fx tracing.

:func:`trace` turns ``forward(*args, **kwargs)`` of a module into a flat
``torch.fx.GraphModule`` whose inputs are the tensor leaves of the call and
whose outputs are the tensor leaves of the result.  Unlike
``torch.fx.symbolic_trace`` it *specialises* on the input signature:

* every proxy carries a fake-tensor value (``node.meta["val"]``), so shape
  arithmetic (``int(x.shape[1] ** 0.5)``), shape asserts, ``if x.ndim == 3``,
  ``len(...)`` and tuple unpacking evaluate to concrete Python values;
* modules listed as leaves (the repeated blocks) become one ``call_module``
  node each and keep running their own, unmodified code;
* factory and random functions called without tensor inputs
  (``torch.rand(B, device=...)`` for label dropout, ``torch.arange(n)``) are
  recorded as graph nodes instead of being frozen into constants, so the
  graph is random exactly where the forward is;
* Python use of tensor *data* (``assert labels.max() <= 999``, ``.tolist()``,
  ``if h.mean() > 0``, ``x[:n]`` with a tensor ``n``) is never silently
  specialised: a tensor built from Python numbers by deterministic functions is
  folded (HiDream's ``img_sizes``); inside a submodule that holds no leaf (no
  block) the submodule becomes a leaf that runs live, its outputs' metadata
  taken from one evaluation on the traced call's real inputs (Lumina2's RoPE
  embedder, a label embedder's assert), with a one-time note naming the
  ``leaf_modules`` entry; elsewhere the graph specialises on the value of the
  traced call and a guard node (:mod:`treadfx.data_guards`) re-checks it at
  every call.  Without real inputs (meta or fake tensors) the last case raises
  :class:`UntraceableForwardError` naming the line;
* user code is never run with proxies: modules are entered through their
  ``forward`` (their hooks belong to real calls), ``torch.compile``d modules
  through the module they wrap, and ``torch.utils.checkpoint`` is recorded as
  an attribute of the block calls it wraps instead of being executed;
* every module call is recorded (:class:`CallRecord`, ``node.meta["treadfx_scope"]``)
  so that :mod:`treadfx.live` can turn the calls that do not contain the
  routed blocks back into live calls of the user's modules;
* Python ``float`` arguments are graph inputs, not constants: the graph
  specialises on a float's value only where the forward branches on it, and
  records that (``TracedProgram.value_guards``);
* tracing is serialised by a process-wide lock and only affects the tracing
  thread: module calls in other threads run normally meanwhile.

Tracing never mutates the traced module: attributes its forward sets while
traced are put back (with a note).  Module outputs are inferred on fake
tensors; a module whose output shape depends on tensor data is run once on
random data with the global RNG state saved and restored and without hooks
(see :mod:`treadfx.fake_eval`).  Where data decides (the cases above) the
forward up to that point is run once on a copy of the call's real inputs,
without gradients, hooks or RNG side effects.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import linecache
import operator
import threading
import traceback
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode, is_tensor_method_or_property

from .errors import UntraceableForwardError
from .data_guards import LATE_INT, data_guard, data_value, structure_of
from .fake_eval import FakeEvaluator, fake_like, forward_of, no_user_hooks, quiet_fake_tensor_logs, rng_preserved
from .outputs import flatten_output, unflatten_output

__all__ = [
    "TracedProgram", "InputSignature", "CallRecord", "trace", "flatten_call", "signature_of", "make_fake_mode",
    "TRACE_LOCK", "traces_run", "reset_notes",
]

#: One trace at a time in the process: torch.fx patches ``nn.Module.__call__`` globally while it traces.
TRACE_LOCK = threading.RLock()

try:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    _DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)
except ImportError:  # pragma: no cover
    _DATA_DEPENDENT = ()

_THIS_FILE = __file__
_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """Hashable description of one call: tree structure, tensor metadata, constants."""

    spec: Any
    leaves: tuple

    def describe(self) -> str:
        parts = []
        for leaf in self.leaves:
            if leaf[0] == "T":
                parts.append(f"{str(leaf[2]).replace('torch.', '')}{list(leaf[1])}@{leaf[3]}")
            elif leaf[0] == "F":
                parts.append("float")
            else:
                parts.append(repr(leaf[2]))
        return "(" + ", ".join(parts) + ")"


def flatten_call(args: tuple, kwargs: dict) -> tuple[list, Any]:
    """Flatten ``(args, kwargs)`` into pytree leaves and a spec."""
    return pytree.tree_flatten((tuple(args), dict(kwargs)))


def is_float_input(leaf: Any) -> bool:
    """A Python float argument: traced as a graph input, not specialised (bools and ints stay constants)."""
    return type(leaf) is float


def _leaf_key(leaf: Any) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, str(leaf.device))
    if is_float_input(leaf):
        return ("F",)
    try:
        hash(leaf)
        return ("C", type(leaf), leaf)
    except TypeError:
        return ("C", type(leaf), ("id", id(leaf)))


def signature_of(args: tuple, kwargs: dict) -> InputSignature:
    """The signature a traced graph is specialised on (shapes, dtypes, devices, constants)."""
    leaves, spec = flatten_call(args, kwargs)
    return InputSignature(spec, tuple(_leaf_key(l) for l in leaves))


def make_fake_mode() -> FakeTensorMode:
    """A static-shape fake mode that accepts real parameters as inputs."""
    return FakeTensorMode(allow_non_fake_inputs=True)


# --------------------------------------------------------------------------- program


@dataclasses.dataclass
class TracedProgram:
    """A traced call: the graph module plus how to map a call onto it and back.

    ``gm`` takes the tensor leaves of the call (in flattening order) and returns
    a tuple of the tensor leaves of the result.  ``node.meta["val"]`` holds the
    fake value of every tensor-valued node.
    """

    gm: fx.GraphModule
    signature: InputSignature
    input_names: list[str]  # readable name of each placeholder, e.g. "x", "kwargs.encoder_hidden_states"
    tensor_positions: list[int]  # which call leaves are placeholders
    out_spec: Any
    out_template: list  # output leaves; None where a tensor comes from the graph
    out_tensor_positions: list[int]
    model_root: str  # attribute path of the traced model inside gm ("m")
    evaluator: FakeEvaluator | None = None
    fake_inputs: list | None = None  # fake value of each placeholder (a float for float inputs)
    calls: list["CallRecord"] = dataclasses.field(default_factory=list)
    value_guards: dict[int, Any] = dataclasses.field(default_factory=dict)  # call leaf -> float the graph needs
    data_guards: list[str] = dataclasses.field(default_factory=list)  # where the graph specialised on tensor data
    live_leaves: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (module path, why) run live

    def __call__(self, *args, **kwargs):
        leaves, _ = flatten_call(args, kwargs)
        outs = self.gm(*[leaves[i] for i in self.tensor_positions])
        return self.unflatten_outputs(outs)

    def unflatten_outputs(self, outs: Sequence[torch.Tensor]):
        """A new output object for every call, with these tensors in it."""
        result = list(self.out_template)
        for pos, value in zip(self.out_tensor_positions, outs):
            result[pos] = value
        return unflatten_output(result, self.out_spec)

    def tensor_inputs(self) -> list:
        """Fake values of the tensor placeholders (float inputs left out)."""
        return [v for v in (self.fake_inputs or []) if isinstance(v, torch.Tensor)]

    def model_path(self, node: fx.Node) -> str:
        """Path of a call_module target relative to the traced model."""
        prefix = self.model_root + "."
        t = str(node.target)
        return t[len(prefix):] if t.startswith(prefix) else t


@dataclasses.dataclass
class CallRecord:
    """One module call met while tracing (the blocks and torch.nn leaves excepted)."""

    index: int
    path: str  # qualified name inside the traced root, e.g. "m.x_embedder"
    module: nn.Module
    parent: int | None  # the enclosing call, None at the top level
    args: tuple
    kwargs: dict
    result: Any = None
    checkpoint: dict | None = None  # torch.utils.checkpoint options when the call was checkpointed


# --------------------------------------------------------------------------- tracer


def _plain_value(value: Any) -> bool:
    """A Python number, bool or (nested) list/tuple of them: a value generated code can hold as a constant."""
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return type(value) in (int, float, bool, complex)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(l, torch.Tensor) for l in pytree.tree_leaves(value))


def _user_location() -> str:
    """file:line and source of the innermost frame of user code (not torch, not treadfx)."""
    pkg_dir = _THIS_FILE.rsplit("/", 1)[0]
    for frame in reversed(traceback.extract_stack()[:-1]):
        fn = frame.filename
        if fn.startswith(_TORCH_DIR) or fn.startswith(pkg_dir) or "/contextlib.py" in fn:
            continue
        line = (frame.line or linecache.getline(fn, frame.lineno) or "").strip()
        return f"{fn}:{frame.lineno} in {frame.name}: `{line}`"
    return "<unknown location>"


class _MethodProxy:
    """``x.method`` on a proxy; calling it records a ``call_method`` node."""

    def __init__(self, owner: "ValueProxy", name: str):
        self.owner, self.name = owner, name

    def __call__(self, *args, **kwargs):
        return self.owner.tracer.create_proxy("call_method", self.name, (self.owner,) + args, kwargs)


class ValueProxy(fx.Proxy):
    """A proxy that knows the (fake) value it stands for and answers Python questions with it."""

    @property
    def value(self) -> Any:
        return self.node.meta["val"]

    def __getattr__(self, k: str):
        if k.startswith("__") and k.endswith("__"):
            raise AttributeError(k)
        attr = getattr(self.node.meta["val"], k)  # AttributeError propagates, so hasattr() works
        if callable(attr) and not isinstance(attr, torch.Tensor):
            return _MethodProxy(self, k)
        if _has_tensor(attr):
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        if k == "shape":
            self.tracer.fix_late_shape([self], "a read of `.shape`")
        return attr  # shape, dtype, device, ndim, requires_grad ...: specialised

    def __len__(self) -> int:
        self.tracer.fix_late_shape([self], "len()")
        return len(self.node.meta["val"])

    def __iter__(self):
        self.tracer.fix_late_shape([self], "iteration")
        return iter([self[i] for i in range(len(self.node.meta["val"]))])

    def __bool__(self) -> bool:
        return self.tracer.to_bool(self)

    def __int__(self) -> int:
        return int(self.tracer.data_dependent(self, "int()"))

    def __float__(self) -> float:
        return float(self.tracer.data_dependent(self, "float()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.data_dependent(self, "use as an index"))

    def __setitem__(self, key, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def keys(self):
        return self.node.meta["val"].keys()


class _Recorder(TorchFunctionMode):
    """Records torch calls that have no proxy inputs but produce tensors (factories, RNG)."""

    def __init__(self, tracer: "SpecializingTracer"):
        super().__init__()
        self.tracer = tracer
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(l, fx.Proxy) for l in leaves):
            return func(*args, **kwargs)  # Proxy.__torch_function__ records it
        if getattr(func, "__name__", "") in _NOT_RECORDED:
            return func(*args, **kwargs)
        try:
            value = self.tracer.evaluate_call(func, args, kwargs)
        except _DATA_DEPENDENT:
            value = None
            has_tensor = False
        else:
            has_tensor = _has_tensor(value)
        if not has_tensor:
            with self.pause():
                return func(*args, **kwargs)
        if is_tensor_method_or_property(func) and args and isinstance(args[0], torch.Tensor):
            name = func.__name__
            if name == "__get__":  # tensor-valued property of a constant tensor: x.T, x.mT ...
                name = getattr(func, "__self__", None).__name__ if hasattr(func, "__self__") else name
            return self.tracer.create_value_proxy("call_method", name, args, kwargs, value)
        return self.tracer.create_value_proxy("call_function", func, args, kwargs, value)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


# Calls whose result must stay a Python/real value during tracing.
_NOT_RECORDED = {"is_tensor", "is_floating_point", "is_complex", "numel", "dim", "size", "__len__", "__get__", "__set__"}


class _DataUse(UntraceableForwardError):
    """Internal: tensor data used in Python inside module call ``call_index``, which will run live as a leaf."""

    def __init__(self, call_index: int, where: str, what: str):
        super().__init__(f"the forward uses tensor data in {what} at {where}")
        self.call_index, self.where = call_index, where


class _NoRealValue(Exception):
    """Internal: a real value was needed but the traced call has no real inputs."""


class LateInt:
    """An int that a module run live computed from tensor data (Lumina2's caption lengths), read by the graph at
    run time instead of being frozen into it.

    Where the forward uses it as an index or slice bound of a tensor (``x[i, :n]``, ``buf[i, a:b] = v``), the
    graph reads the live value at every call; arithmetic and ``max``/``min`` of late ints give late ints (graph
    nodes); a comparison, ``bool``, a set of late ints, or any other use whose result Python keeps (a shape, a
    ``range``, a hash, a format) adds a guard on what it saw: the outcome of the comparison, the equality pattern
    of the set, or the exact value.  A guard that fails retraces (:mod:`treadfx.data_guards`), so the graph
    is right for every value, and one graph serves every value that only moves slice bounds.
    """

    __slots__ = ("value", "node", "tracer", "fixed", "base", "offset")

    # ``isinstance(x, int)`` holds as for the int it stands for, while C code that consumes ints (``range``,
    # list indices, torch's argument parser) still goes through ``__index__`` and so specialises it
    __class__ = property(lambda self: int)  # type: ignore[assignment]

    def __init__(self, value: int, node: fx.Node, tracer: "SpecializingTracer"):
        self.value, self.node, self.tracer, self.fixed = int(value), node, tracer, False
        self.base, self.offset = self, 0  # this value is base + offset (offset a plain int): c and c + n share c

    def specialise(self, why: str) -> int:
        """The value, with a guard that it stays the same (the graph now depends on it)."""
        if not self.fixed:
            self.fixed = True
            self.tracer._guard(self.node, "index", self.value, f"{why} at {_user_location()}")
        return self.value

    def __index__(self) -> int:
        return self.specialise("an int use")

    __int__ = __index__

    def __float__(self) -> float:
        return float(self.specialise("a float use"))

    def __hash__(self) -> int:
        if self.tracer.free_hash:
            return hash(self.value)
        return hash(self.specialise("a hash (dict key or set member)"))

    def __bool__(self) -> bool:
        return self.tracer.late_compare(operator.ne, self, 0)

    def __repr__(self) -> str:
        return repr(self.specialise("a repr"))

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(self.specialise("a format"), spec)

    def __neg__(self):
        return self.tracer.late_op(operator.neg, self)

    def __abs__(self):
        return self.tracer.late_op(operator.abs, self)


def _late_binary(op, reflected: bool = False):
    def method(self, other):
        if isinstance(other, float):  # leaves the ints: specialised
            v = self.specialise("arithmetic with a float")
            return op(other, v) if reflected else op(v, other)
        if isinstance(other, bool) or not isinstance(other, (int, LateInt)):
            return NotImplemented
        return self.tracer.late_op(op, other, self) if reflected else self.tracer.late_op(op, self, other)

    return method


def _late_compare(op):
    def method(self, other):
        if isinstance(other, float):
            return op(self.specialise("a comparison with a float"), other)
        if isinstance(other, bool) or not isinstance(other, (int, LateInt)):
            return NotImplemented
        return self.tracer.late_compare(op, self, other)

    return method


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("floordiv", operator.floordiv), ("mod", operator.mod)):
    setattr(LateInt, f"__{_name}__", _late_binary(_op))
    setattr(LateInt, f"__r{_name}__", _late_binary(_op, reflected=True))
for _name, _op in (("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt), ("le", operator.le),
                   ("gt", operator.gt), ("ge", operator.ge)):
    setattr(LateInt, f"__{_name}__", _late_compare(_op))


class _Bound:
    """A late int in an index of a tensor: the graph node that reads it (the late int's value for evaluation)."""

    __slots__ = ("late",)

    def __init__(self, late: LateInt):
        self.late = late

    @property
    def value(self) -> int:
        return self.late.value


def _plain(x: Any) -> Any:
    """``x`` with late ints replaced by their values (for evaluation)."""
    if isinstance(x, LateInt):
        return x.value
    if isinstance(x, slice):
        return slice(_plain(x.start), _plain(x.stop), _plain(x.step))
    if isinstance(x, (list, tuple)) and any(isinstance(e, (LateInt, slice, list, tuple)) for e in x):
        return type(x)(_plain(e) for e in x) if not hasattr(x, "_fields") else type(x)(*(_plain(e) for e in x))
    return x


def equality_pattern(values: Sequence[int]) -> tuple[int, ...]:
    """For each value, the position of the first equal one: what a set of them depends on."""
    # pairwise comparisons, no int() or hashing: under torch.compile the values may be symbolic ints, and a
    # comparison guards only on equality (one graph per pattern), where int() or a dict key would pin each value
    values = list(values)
    return tuple(next(j for j in range(k + 1) if j == k or values[j] == values[k]) for k in range(len(values)))


_INDEX_TARGETS = (operator.getitem, operator.setitem)
#: methods whose result shape is given by their int arguments (a view of a slice with late bounds has a fixed shape)
_STATIC_SHAPE_METHODS = frozenset({"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full"})


def _int_items(value: Any) -> bool:
    """An int, or a flat list/tuple of ints (not bools)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (list, tuple)) and not hasattr(value, "_fields") and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


_RANDOM = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
    "dropout3d", "rrelu", "poisson", "native_dropout",
}


def _mutates(user: fx.Node, node: fx.Node) -> bool:
    """``user`` writes into ``node`` in place (``x[i] = v``, ``x.add_(...)``)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_function" and user.target is operator.setitem:
        return True
    t = str(user.target)
    return user.op == "call_method" and t.endswith("_") and not t.endswith("__")


class _PinningEvaluator(FakeEvaluator):
    """A :class:`FakeEvaluator` that keeps the fakes of the parameters and buffers of every module it evaluates.

    The fake mode's memo of real -> fake tensors holds its fakes weakly: a
    parameter whose fake died with the last evaluation's outputs is converted
    again at the next one (the side-input probe evaluates the same block many
    times).  Held here, each is converted once per analysis, and only for the
    modules actually evaluated (the memo of module calls skips the others).
    """

    def _fake_call(self, module: nn.Module, a: tuple, k: dict) -> Any:
        for t in module.parameters():
            self.to_fake(t)
        for t in module.buffers():
            self.to_fake(t)
        return super()._fake_call(module, a, k)


class SpecializingTracer(fx.Tracer):
    """FX tracer that carries fake values beside proxies and specialises non-tensor values."""

    def __init__(self, leaves: Iterable[nn.Module], fake_mode: FakeTensorMode):
        super().__init__(param_shapes_constant=False)
        self.leaf_ids = {id(m) for m in leaves}
        self.fake_mode = fake_mode
        self.recorder = _Recorder(self)
        self.evaluator = _PinningEvaluator(fake_mode)
        self.plain_call: Callable | None = None  # the hook-less module call under fx's patches (see _trace)
        self.thread = threading.get_ident()
        self.calls: list[CallRecord] = []
        self.call_stack: list[int] = []
        self.checkpoints: list[dict] = []  # active torch.utils.checkpoint calls (options, scope depth)
        self.specialised: set[int] = set()  # float inputs whose value the graph depends on
        self.real_inputs: dict[int, Any] | None = None  # placeholder position -> real value (None: none known)
        self._real_env: dict[fx.Node, Any] = {}
        self.free_hash = 0  # > 0 while a set of late ints is built (its equality pattern is guarded instead)
        self.late_items: dict[fx.Node, set[int]] = {}  # live-leaf call -> output items read as late ints
        self.live_values: dict[fx.Node, Any] = {}  # live-leaf call -> its value on the traced call
        self._passthrough = 0  # > 0 while values are evaluated: fx's patched module calls and attributes act plainly

    def _foreign(self) -> bool:
        """True in a thread other than the tracing one (fx's patches are process-wide)."""
        return threading.get_ident() != self.thread

    # -- structure ---------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.leaf_ids:
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._passthrough or self._foreign():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._passthrough and not self._foreign() and self.plain_call is not None:
            return self.plain_call(m, *args, **kwargs)  # a value being evaluated: forward only, no hooks
        if self._passthrough or self._foreign():
            return forward(*args, **kwargs)  # another thread: the module's normal call
        ckpt = self.checkpoints[-1]["options"] if self.checkpoints and \
            self.checkpoints[-1]["depth"] == len(self.call_stack) else None
        if self.is_leaf_module(m, self.path_of_module(m)):
            out = super().call_module(m, forward, args, kwargs)
            if ckpt is not None and isinstance(out, fx.Proxy) and out.node.op == "call_module":
                out.node.meta["treadfx_checkpoint"] = ckpt  # the leaf's own call node
            return out
        rec = CallRecord(len(self.calls), self.path_of_module(m), m, self.call_stack[-1] if self.call_stack else None,
                         args, kwargs, checkpoint=ckpt)
        self.calls.append(rec)
        self.call_stack.append(rec.index)
        target = forward_of(m)
        mark = self._last_node()
        try:
            # the module's forward, not __call__: its hooks belong to real calls, never to a trace
            rec.result = super().call_module(m, lambda *a, **k: target(*a, **k), args, kwargs)
        except _DataUse as e:
            if e.call_index != rec.index:
                raise
            self._rollback(mark, rec.index)
            return self._live_leaf(m, rec.path, args, kwargs, ckpt, e)
        finally:
            self.call_stack.pop()
        return rec.result

    # -- data-dependent code outside the blocks -------------------------------------------------------------
    def _last_node(self) -> fx.Node:
        return self.graph._root.prev  # type: ignore[attr-defined]

    def _rollback(self, mark: fx.Node, call_index: int) -> None:
        """Forget everything recorded since ``mark`` (the nodes and calls of a module that becomes a leaf)."""
        doomed = []
        n = mark.next
        while n is not self.graph._root:  # type: ignore[attr-defined]
            doomed.append(n)
            n = n.next
        for n in reversed(doomed):
            for u in list(n.users):
                if u not in doomed:  # pragma: no cover - a later node cannot exist yet
                    raise AssertionError("rollback of a used node")
            self._real_env.pop(n, None)
            self.graph.erase_node(n)
        del self.calls[call_index:]

    def _leafable(self) -> int | None:
        """The innermost module call being traced, if it may run live as a leaf (it holds no block)."""
        if not self.call_stack:
            return None
        rec = self.calls[self.call_stack[-1]]
        if any(id(sub) in self.leaf_ids for sub in rec.module.modules()):
            return None
        return rec.index

    def _live_leaf(self, m: nn.Module, path: str, args: tuple, kwargs: dict, ckpt: dict | None,
                   use: "_DataUse") -> Any:
        """One ``call_module`` node for ``m``: it runs live; its outputs' metadata come from a real evaluation."""
        self.fix_late_shape(pytree.tree_leaves((args, kwargs)), f"a call of module `{path}`")
        real = self._real_args((args, kwargs))
        if real is not None:
            a, k = real
            with self._real_context():
                out = forward_of(m)(*a, **k)
            grad = any(p.requires_grad for p in m.parameters()) or any(
                isinstance(x, torch.Tensor) and x.requires_grad for x in pytree.tree_leaves(self._values((args, kwargs))))
            value = pytree.tree_map(lambda x: self._fake_of_real(x, grad) if isinstance(x, torch.Tensor) else x, out)
            # analyses that fake-run the graph (validation, FLOP counts) see this call's output structure, not
            # that of random data
            remember = getattr(self.evaluator, "remember", None)
            if remember is not None:
                remember(m, *self._values((args, kwargs)), value)
        else:  # no real inputs (shape-only analysis): fake evaluation, or random data where it needs data
            a, k = self._values((args, kwargs))
            value = self.evaluator.call_module(m, a, k)
            out = None
        proxy = fx.Tracer.create_proxy(self, "call_module", path, args, kwargs)
        proxy.node.meta["val"] = value
        proxy.node.meta["treadfx_live_leaf"] = use.where
        if ckpt is not None:
            proxy.node.meta["treadfx_checkpoint"] = ckpt
        if out is not None:
            self._real_env[proxy.node] = out
        where = f"the output of `{path.removeprefix('m.')}`"
        self._guard(proxy.node, "structure", structure_of(value), where)
        self.live_values[proxy.node] = value
        return proxy

    # -- late-bound ints (ints a live module computed from data) -------------------------------------------
    def late_op(self, op: Callable, *operands: Any) -> LateInt:
        """``op`` of late ints (and ints) as a graph node: a late int."""
        result = op(*[_plain(o) for o in operands])
        node = fx.Tracer.create_node(self, "call_function", op, tuple(self._late_arg(o) for o in operands), {})
        node.meta["val"] = result
        node.meta["treadfx_scope"] = tuple(self.call_stack)
        out = LateInt(result, node, self)
        if op in (operator.add, operator.sub) and len(operands) == 2:
            a, b = operands
            if isinstance(a, LateInt) and not isinstance(b, LateInt):
                out.base, out.offset = a.base, a.offset + (b if op is operator.add else -b)
            elif isinstance(b, LateInt) and not isinstance(a, LateInt) and op is operator.add:
                out.base, out.offset = b.base, b.offset + a
        return out

    def late_compare(self, op: Callable, a: Any, b: Any) -> bool:
        """The outcome of comparing late ints, guarded (a new outcome retraces)."""
        result = bool(op(_plain(a), _plain(b)))
        node = fx.Tracer.create_node(self, "call_function", op, (self._late_arg(a), self._late_arg(b)), {})
        node.meta["val"] = result
        node.meta["treadfx_scope"] = tuple(self.call_stack)
        self._guard(node, "bool", result, f"a comparison of ints computed from tensor data at {_user_location()}")
        return result

    def _late_arg(self, x: Any) -> Any:
        if isinstance(x, LateInt):
            return x.node
        if isinstance(x, (list, tuple)):
            return [self._late_arg(e) for e in x]
        return x

    def _late_key(self, key: Any, deps: list, size: int | None = None) -> Any:
        """An index with its late ints as graph nodes (read at run time); ``deps`` gets those in slices whose
        length depends on them.  ``x[c:c + n]`` has length n for every c: its shape does not depend on c as long
        as the slice stays inside the axis (``size``), which is guarded."""
        if isinstance(key, LateInt):
            return _Bound(key)  # an integer index: the result's shape does not depend on it
        if isinstance(key, slice):
            parts = [key.start, key.stop, key.step]
            a, b = key.start, key.stop
            fixed_length = (isinstance(a, LateInt) and isinstance(b, LateInt) and a.base is b.base
                            and key.step in (None, 1) and size is not None and 0 <= a.value <= b.value <= size)
            if fixed_length:
                self.late_compare(operator.ge, a, 0)
                self.late_compare(operator.le, b, size)
            else:
                deps.extend(p for p in parts if isinstance(p, LateInt))
            return slice(*[_Bound(p) if isinstance(p, LateInt) else p for p in parts])
        if isinstance(key, tuple):
            simple = all(isinstance(k, (int, slice, LateInt)) for k in key)
            return tuple(self._late_key(k, deps, self._axis_size(j) if simple else None) for j, k in enumerate(key))
        return key

    def _lateify(self, src: fx.Proxy, index: Any, value: Any, kind, target, args, kwargs) -> Any:
        """Items of a live module's output read as ints: late ints backed by graph nodes."""
        leaf = src.node
        node = fx.Tracer.create_proxy(self, kind, target, args, kwargs).node
        node.meta["val"] = value
        self.late_items.setdefault(leaf, set()).add(index)
        if isinstance(value, int):
            return LateInt(value, node, self)
        out = []
        for j, v in enumerate(value):
            el = fx.Tracer.create_node(self, "call_function", operator.getitem, (node, j), {})
            el.meta["val"] = v
            el.meta["treadfx_scope"] = tuple(self.call_stack)
            out.append(LateInt(v, el, self))
        return type(value)(out)

    def late_reduce(self, fn: Callable, items: list) -> LateInt:
        """``max``/``min`` of late ints: a late int (which item it is stays free)."""
        result = fn([_plain(i) for i in items])
        node = fx.Tracer.create_node(self, "call_function", fn, ([self._late_arg(i) for i in items],), {})
        node.meta["val"] = result
        node.meta["treadfx_scope"] = tuple(self.call_stack)
        return LateInt(result, node, self)

    def late_set(self, ctor: Callable, items: list) -> Any:
        """``set``/``frozenset`` of late ints: guarded on which items are equal; its members stay late ints."""
        pattern = equality_pattern([_plain(i) for i in items])
        node = fx.Tracer.create_node(self, "call_function", equality_pattern, ([self._late_arg(i) for i in items],),
                                     {})
        node.meta["val"] = pattern
        node.meta["treadfx_scope"] = tuple(self.call_stack)
        self._guard(node, "value", pattern, f"a set of ints computed from tensor data at {_user_location()}")
        reps = [items[k] for k, p in enumerate(pattern) if p == k]
        self.free_hash += 1
        try:
            return ctor(reps)
        finally:
            self.free_hash -= 1

    def fix_late_shape(self, proxies: Iterable[Any], why: str) -> None:
        """Python reads the shape of these values: the late ints their shapes depend on are specialised."""
        for p in proxies:
            if isinstance(p, fx.Proxy):
                for li in p.node.meta.get("treadfx_late_deps", ()):
                    li.specialise(why)

    def finish_late(self) -> None:
        """After the trace: a live module's output guard accepts any value of the items read as late ints."""
        for leaf, items in self.late_items.items():
            value = self.live_values.get(leaf)
            if not isinstance(value, (tuple, list)):
                continue
            marked = list(value)
            for i in items:
                v = marked[i]
                marked[i] = LATE_INT if isinstance(v, int) else type(v)(LATE_INT for _ in v)
            for u in list(leaf.users):
                if u.op == "call_function" and u.target is data_guard and u.args[1] == "structure":
                    u.args = (u.args[0], "structure", structure_of(type(value)(marked)), u.args[3])

    def _guard(self, node: fx.Node, kind: str, expected: Any, where: str) -> None:
        guard = self.create_node("call_function", data_guard, (node, kind, expected, where), {})
        guard.meta["val"] = None
        guard.meta["treadfx_data_guard"] = where

    def _fake_of_real(self, t: torch.Tensor, grad: bool) -> torch.Tensor:
        with self.recorder.pause():
            f = fake_like(t, self.fake_mode)
            if grad and f.is_floating_point() and not f.requires_grad:
                f.requires_grad_(True)
        return f

    @contextlib.contextmanager
    def _real_context(self):
        """Run user code on real tensors in the middle of a trace: no fx patches, no hooks, no grad, RNG kept."""
        with self._plain_calls(), self.recorder.pause(), unset_fake_temporarily(), no_user_hooks(), \
                torch.no_grad(), rng_preserved(list((self.real_inputs or {}).values())):
            yield

    # constant folding: values built from Python numbers by deterministic functions
    def _is_constant(self, node: fx.Node, memo: dict | None = None) -> bool:
        memo = {} if memo is None else memo
        stack = [node]
        order = []
        while stack:
            n = stack.pop()
            if n in memo:
                continue
            memo[n] = None  # visiting
            order.append(n)
            if n.op in ("placeholder", "get_attr", "call_module", "output"):
                memo[n] = False
                continue
            name = getattr(n.target, "__name__", str(n.target))
            if name in _RANDOM or (n.op == "call_function" and n.target is data_guard):
                memo[n] = False
                continue
            stack.extend(n.all_input_nodes)
        for n in reversed(order):
            if memo[n] is False:
                continue
            ok = all(memo.get(i) is not False for i in n.all_input_nodes)
            memo[n] = ok
        result = memo[node] is not False
        if not result:
            return False
        # mutated later by something that is not constant?
        for n in order:
            for u in n.users:
                if _mutates(u, n) and any(i is not n and not self._is_constant(i, memo) for i in u.all_input_nodes):
                    return False
        return True

    def _constant_value(self, node: fx.Node) -> Any:
        """The real value of a constant node (its ancestors and the in-place updates of them, in graph order)."""
        need = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in need:
                continue
            need.add(n)
            stack.extend(n.all_input_nodes)
            stack.extend(u for u in n.users if _mutates(u, n))
        env: dict[fx.Node, Any] = {}
        self._run_real([n for n in self.graph.nodes if n in need], env)
        return env[node]

    def _real_value(self, node: fx.Node) -> Any:
        """The value of ``node`` on the real inputs of the traced call (the graph so far, run once, in order)."""
        if node not in self._real_env:
            upto = []
            for n in self.graph.nodes:
                upto.append(n)
                if n is node:
                    break
            self._run_real(upto, self._real_env)
        return self._real_env[node]

    def _real_args(self, tree: Any) -> Any:
        """``tree`` with every proxy replaced by its real value, or None without real inputs."""
        proxies = [x for x in pytree.tree_leaves(tree) if isinstance(x, fx.Proxy)]
        consts = all(self._is_constant(p.node) for p in proxies)
        if self.real_inputs is None and not consts:
            return None

        def conv(x):
            if isinstance(x, (LateInt, _Bound)):
                return x.value
            if isinstance(x, fx.Proxy):
                return self._constant_value(x.node) if consts else self._real_value(x.node)
            if isinstance(x, slice):
                return slice(conv(x.start), conv(x.stop), conv(x.step))
            return x

        return pytree.tree_map(conv, tree)

    def _run_real(self, nodes: list, env: dict) -> None:
        with self._real_context():
            for n in nodes:
                if n in env or n.op == "output":
                    continue
                if n.op == "placeholder":
                    pos = n.meta.get("position")
                    if self.real_inputs is None or pos not in self.real_inputs:
                        raise _NoRealValue
                    env[n] = self.real_inputs[pos]
                    continue
                if n.op == "get_attr":
                    obj: Any = self.root
                    for atom in str(n.target).split("."):
                        obj = getattr(obj, atom)
                    env[n] = obj
                    continue
                a, k = fx.node.map_arg((n.args, n.kwargs), lambda x: env[x])
                if n.op == "call_function":
                    env[n] = None if n.target is data_guard else n.target(*a, **k)
                elif n.op == "call_method":
                    env[n] = getattr(a[0], n.target)(*a[1:], **k)
                else:
                    env[n] = forward_of(self.root.get_submodule(n.target))(*a, **k)

    def resolve_data_use(self, node: fx.Node, kind: str, what: str, location: str) -> Any:
        """Python value of tensor ``node`` used as ``kind`` (bool/int/float/index): folded, leafed or guarded."""
        conv = {"bool": bool, "int": int, "float": float, "index": operator.index}[kind]
        if self._is_constant(node):
            return conv(self._constant_value(node))
        call = self._leafable()
        if call is not None:
            raise _DataUse(call, location, what)
        if self.real_inputs is not None:
            value = conv(self._real_value(node))
            self._guard(node, kind, value, location)
            return value
        value = node.meta["val"]
        raise UntraceableForwardError(
            f"the forward uses the *data* of tensor `{node.name}` (shape {list(value.shape)}) in {what} "
            f"at {location}. treadfx specialises the graph on shapes, and this analysis has no real input values to "
            "specialise on. Fix: call the model (or treadfx.prepare / inspect) with real tensors, express it with "
            "tensor ops (torch.where, masking), or move it inside a submodule that does not call the blocks "
            "(treadfx runs such modules live)."
        )

    def resolve_failed_op(self, kind: str, target: Any, args: tuple, kwargs: dict, error: Exception,
                          name=None, type_expr=None, proxy_factory_fn=None) -> Any:
        """An op whose fake evaluation needs tensor data (``.tolist()``, ``x[:n]``, ``x[mask]``)."""
        location = _user_location()
        # 1. constant scalar tensors used as numbers: fold them into the op
        folded = [False]

        def fold(x):
            if isinstance(x, fx.Proxy):
                v = x.node.meta.get("val")
                if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() \
                        and self._is_constant(x.node):
                    folded[0] = True
                    return self._constant_value(x.node).item()
            if isinstance(x, slice):
                return slice(fold(x.start), fold(x.stop), fold(x.step))
            return x

        fargs, fkwargs = pytree.tree_map(fold, (args, kwargs))
        if folded[0]:
            try:
                value = self._evaluate(kind, target, fargs, fkwargs)
            except _DATA_DEPENDENT:
                pass
            else:
                return self._finish(kind, target, fargs, fkwargs, value, name, type_expr, proxy_factory_fn)
        proxies = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, fx.Proxy)]
        if not all(self._is_constant(p.node) for p in proxies):
            call = self._leafable()
            if call is not None:
                raise _DataUse(call, location, f"`{getattr(target, '__name__', target)}`")
        try:
            real = self._real_args((args, kwargs))
        except _NoRealValue:
            real = None
        if real is None:
            raise UntraceableForwardError(
                f"the forward computes a value that depends on tensor data at {location} "
                f"({type(error).__name__}), and this analysis has no real input values to specialise on. "
                "Fix: call the model (or treadfx.prepare / inspect) with real tensors, move this computation inside "
                "a submodule that does not call the blocks (treadfx runs such modules live), or pass the value as a "
                "Python number."
            ) from error
        a, k = real
        with self._real_context():
            if kind == "call_function":
                out = target(*a, **k)
            elif kind == "call_method":
                out = getattr(a[0], target)(*a[1:], **k)
            else:  # pragma: no cover - modules are evaluated by the evaluator
                raise error
        consts = all(self._is_constant(p.node) for p in proxies)
        if not _has_tensor(out):
            if consts:
                return out
            if kind == "call_method" and isinstance(target, str) and _plain_value(out):
                # ``t.item()`` / ``t.tolist()``: the recorded value stands in for it on fake data (FLOP counts)
                proxy = fx.Tracer.create_proxy(self, "call_function", data_value, (target, out) + tuple(args), kwargs,
                                               name, type_expr, proxy_factory_fn)
            else:
                proxy = fx.Tracer.create_proxy(self, kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            proxy.node.meta["val"] = out
            self._real_env[proxy.node] = out
            self._guard(proxy.node, "value", out, location)
            return out
        grad = any(isinstance(x, torch.Tensor) and x.requires_grad for x in pytree.tree_leaves(self._values((args, kwargs))))
        value = pytree.tree_map(lambda x: self._fake_of_real(x, grad) if isinstance(x, torch.Tensor) else x, out)
        proxy = fx.Tracer.create_proxy(self, kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["val"] = value
        self._real_env[proxy.node] = out
        if not consts:
            self._guard(proxy.node, "structure", structure_of(value), location)
        return proxy

    def _finish(self, kind, target, args, kwargs, value, name, type_expr, proxy_factory_fn):
        if not _has_tensor(value):
            self.note_specialised(pytree.tree_leaves((args, kwargs)))
            return value
        proxy = fx.Tracer.create_proxy(self, kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["val"] = value
        return proxy

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["treadfx_scope"] = tuple(self.call_stack)
        return node

    @contextlib.contextmanager
    def checkpoint_interception(self):
        """Record ``torch.utils.checkpoint`` around block calls instead of running its machinery on proxies.

        Both ways in (``use_reentrant=True`` through ``CheckpointFunction.apply``
        and the non-reentrant generator) are module globals of
        ``torch.utils.checkpoint``, looked up at call time, so this also
        catches ``functools.partial(checkpoint, ...)`` (diffusers'
        ``_gradient_checkpointing_func``).  Other threads get the original.
        """
        import torch.utils.checkpoint as ckpt_mod

        tracer = self
        orig_fn = ckpt_mod.CheckpointFunction
        orig_gen = ckpt_mod._checkpoint_without_reentrant_generator

        class _TracedCheckpointFunction:
            @staticmethod
            def apply(function, preserve, *args):
                if tracer._foreign():
                    return orig_fn.apply(function, preserve, *args)
                tracer.checkpoints.append(dict(depth=len(tracer.call_stack), options=dict(
                    use_reentrant=True, preserve_rng_state=bool(preserve))))
                try:
                    return function(*args)
                finally:
                    tracer.checkpoints.pop()

        def _traced_generator(fn, preserve_rng_state=True, context_fn=None, determinism_check="default",
                              debug=False, *args, **kwargs):
            if tracer._foreign():
                yield from orig_gen(fn, preserve_rng_state, context_fn, determinism_check, debug, *args, **kwargs)
                return
            # (torch >= 2.4 passes early_stop next; the remaining arguments are the function's, unused here)
            options = dict(use_reentrant=False, preserve_rng_state=bool(preserve_rng_state),
                           determinism_check=determinism_check, debug=debug)
            if context_fn is not None and context_fn is not ckpt_mod.noop_context_fn:
                options["context_fn"] = context_fn
            tracer.checkpoints.append(dict(depth=len(tracer.call_stack), options=options))
            try:
                yield
            finally:
                tracer.checkpoints.pop()

        ckpt_mod.CheckpointFunction = _TracedCheckpointFunction
        ckpt_mod._checkpoint_without_reentrant_generator = _traced_generator
        try:
            yield
        finally:
            ckpt_mod.CheckpointFunction = orig_fn
            ckpt_mod._checkpoint_without_reentrant_generator = orig_gen

    def proxy(self, node: fx.Node) -> ValueProxy:
        return ValueProxy(node, self)

    # -- values --------------------------------------------------------------
    def to_fake(self, t: torch.Tensor) -> torch.Tensor:
        return self.evaluator.to_fake(t)

    def _values(self, tree: Any) -> Any:
        def conv(x):
            if isinstance(x, (LateInt, _Bound)):
                return x.value
            if isinstance(x, fx.Proxy):
                return x.node.meta["val"]
            if isinstance(x, slice):
                return slice(conv(x.start), conv(x.stop), conv(x.step))
            if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                return self.to_fake(x)
            return x

        return pytree.tree_map(conv, tree)

    @contextlib.contextmanager
    def _plain_calls(self):
        """While active, code run in this thread sees plain module calls and attributes.

        FX's patches (``nn.Module.__call__``/``__getattr__``, ``Tensor.__getitem__``, autowrapped functions)
        stay installed: its module wrappers defer to :meth:`call_module` and :meth:`getattr`, which act plainly
        here, and its function wrappers act plainly on values that hold no proxy (evaluation sees only fake or
        real tensors).  Reverting and reapplying the patches instead costs milliseconds per evaluation: assigning
        a dunder of ``nn.Module`` updates the slot of each of its (often thousands of) subclasses.
        """
        self._passthrough += 1
        try:
            yield
        finally:
            self._passthrough -= 1

    @contextlib.contextmanager
    def _evaluating(self):
        with self._plain_calls(), self.recorder.pause(), self.fake_mode:
            yield

    def evaluate_call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        a, k = self._values((args, kwargs))
        with self._evaluating():
            return func(*a, **k)

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "get_attr":
            obj: Any = self.root
            with self._plain_calls():
                for atom in str(target).split("."):
                    obj = getattr(obj, atom)
            return self.to_fake(obj) if isinstance(obj, torch.Tensor) else obj
        a, k = self._values((args, kwargs))
        with self._evaluating():
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.evaluator.call_module(self.root.get_submodule(target), a, k)
        raise AssertionError(kind)

    def create_value_proxy(self, kind, target, args, kwargs, value):
        proxy = super().create_proxy(kind, target, args, kwargs)
        proxy.node.meta["val"] = value
        return proxy

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind in ("placeholder", "output"):
            return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        late_deps: list = []
        if (kind == "call_function" and target in _INDEX_TARGETS and len(args) >= 2 and isinstance(args[0], fx.Proxy)
                and isinstance(args[0].node.meta.get("val"), torch.Tensor)):
            # x[i, :n] / buf[i, a:b] = v with late ints: the graph reads them at run time
            shape = tuple(args[0].node.meta["val"].shape)
            self._axis_size = lambda j, shape=shape: int(shape[j]) if j < len(shape) else None
            args = (args[0], self._late_key(args[1], late_deps, shape[0] if shape else None)) + tuple(args[2:])
        if kind == "call_module":
            self.fix_late_shape(pytree.tree_leaves((args, kwargs)), f"a call of module `{target}`")
        try:
            value = self._evaluate(kind, target, args, kwargs)
        except _DATA_DEPENDENT as e:
            return self.resolve_failed_op(kind, target, args, kwargs, e, name, type_expr, proxy_factory_fn)
        except UntraceableForwardError:
            raise
        except Exception as e:
            where = f"module `{target}`" if kind == "call_module" else f"`{getattr(target, '__name__', target)}`"
            raise UntraceableForwardError(
                f"evaluating {where} on fake tensors failed at {_user_location()}: {type(e).__name__}: {e}. "
                "Fix: make sure the model runs eagerly on these inputs; if it does, the operation has no fake-tensor "
                "support: mark its module as a leaf with transform(..., leaf_modules=[...])."
            ) from e
        if kind == "call_function" and target is operator.setitem:
            # an in-place write (``ids[..., 1] = rows``): a node even though it returns None
            node = self.create_node(kind, target, self.create_arg(args), self.create_arg(kwargs), name, type_expr)
            node.meta["val"] = None
            return None
        if not _has_tensor(value):
            if (kind == "call_function" and target is operator.getitem and isinstance(args[0], fx.Proxy)
                    and args[0].node in self.live_values and isinstance(args[1], int) and _int_items(value)):
                return self._lateify(args[0], args[1], value, kind, target, args, kwargs)
            self.note_specialised(pytree.tree_leaves((args, kwargs)))
            self.fix_late_shape(pytree.tree_leaves((args, kwargs)), f"a Python value of `{getattr(target, '__name__', target)}`")
            return value  # specialised to a Python value; no node
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta["val"] = value
        deps = list(late_deps)
        if not (kind == "call_method" and target in _STATIC_SHAPE_METHODS and all(
                isinstance(a, int) for a in pytree.tree_leaves((args[1:], kwargs)) if not isinstance(a, torch.dtype))):
            for a in pytree.tree_leaves((args, kwargs)):
                if isinstance(a, fx.Proxy):
                    deps.extend(d for d in a.node.meta.get("treadfx_late_deps", ()) if d not in deps)
        if deps:
            proxy.node.meta["treadfx_late_deps"] = deps
        return proxy

    def note_specialised(self, leaves: Iterable[Any]) -> None:
        """A Python value was computed from these: float inputs among them become value guards."""
        for leaf in leaves:
            if isinstance(leaf, fx.Proxy) and leaf.node.op == "placeholder" and "float_input" in leaf.node.meta:
                self.specialised.add(leaf.node.meta["float_input"])

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.data_dependent(obj, "a Python condition (if/while/and/or/assert)")

    def data_dependent(self, obj: fx.Proxy, what: str):
        value = obj.node.meta["val"]
        self.note_specialised([obj])
        if isinstance(value, torch.Tensor):
            kind = {"int()": "int", "float()": "float", "use as an index": "index"}.get(what, "bool")
            try:
                return self.resolve_data_use(obj.node, kind, what, _user_location())
            except _NoRealValue:
                raise UntraceableForwardError(
                    f"the forward uses the *data* of tensor `{obj.node.name}` (shape {list(value.shape)}) in {what} "
                    f"at {_user_location()}, and this analysis has no real input values to specialise on. Fix: call "
                    "the model with real tensors, express it with tensor ops (torch.where, masking), or move it "
                    "inside a submodule that does not call the blocks (treadfx runs such modules live)."
                ) from None
        return bool(value) if what.startswith("a Python") else value

    def iter(self, obj: fx.Proxy):
        return iter(obj)

    def keys(self, obj: fx.Proxy):
        return obj.node.meta["val"].keys()

    def create_arg(self, a: Any):
        if isinstance(a, _Bound):
            return a.late.node  # read at run time
        if isinstance(a, LateInt):
            return a.specialise("an argument of a graph operation")
        if type(a).__module__ == "numpy" and hasattr(a, "item") and getattr(a, "ndim", 1) == 0:
            return a.item()  # a numpy scalar the forward computed: the equal Python number in the code
        if type(a).__module__ == "numpy" and type(a).__name__ == "ndarray":
            # a numpy array (``torch.tensor(self.table)``): the same object, read by the code through an attribute
            name = self.get_fresh_qualname("_treadfx_array")
            setattr(self.root, name, a)
            return self.create_node("get_attr", name, (), {})
        if isinstance(a, FakeTensor):
            raise UntraceableForwardError(
                f"a fake tensor escaped into the graph at {_user_location()}; this is a treadfx bug, please report it"
            )
        return super().create_arg(a)


# --------------------------------------------------------------------------- entry point


class _Root(nn.Module):
    """Holds the traced model as ``m`` so that tracer constants never land on the user's module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, *args):  # pragma: no cover - replaced during tracing
        raise NotImplementedError


def _fake_inputs(leaves: list, fake_mode: FakeTensorMode) -> list:
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if isinstance(leaf, FakeTensor) or leaf.device.type == "meta":
                # a fake from another mode (torch.compile) or a meta tensor: rebuild from metadata
                with fake_mode:
                    t = torch.empty_strided(tuple(leaf.shape), tuple(leaf.stride()), dtype=leaf.dtype,
                                            device=leaf.device if leaf.device.type != "meta" else "cpu")
                out.append(t)
            else:
                out.append(fake_mode.from_tensor(leaf))
        else:
            out.append(leaf)
    return out


def argument_leaf_names(spec: Any, n: int) -> list[str]:
    """Readable path of every leaf of ``(args, kwargs)``: ``args.0``, ``kwargs.encoder_hidden_states.1``."""
    names = [f"leaf{i}" for i in range(n)]
    try:
        dummy = pytree.tree_unflatten(list(range(n)), spec)
        paths, _ = pytree.tree_flatten_with_path(dummy)
        names = []
        for path, _leaf in paths:
            atoms = []
            for p in path:
                key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
                atoms.append(str(key))
            atoms[0] = "args" if atoms[0] == "0" else "kwargs"
            names.append(".".join(atoms))
    except Exception:  # pragma: no cover - cosmetic only
        pass
    return names


def trace(
    model: nn.Module,
    forward: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    leaves: Iterable[nn.Module],
    arg_names: Sequence[str] | None = None,
) -> TracedProgram:
    """Trace ``forward(model, *args, **kwargs)`` specialised to these inputs.

    Guarantees: the returned program computes what ``forward`` computes for any
    inputs with the same signature (and, for float inputs the graph branches
    on, the same values: ``value_guards``; for tensor data it specialised on,
    guard nodes that raise :class:`~treadfx.data_guards.ValueGuardFailure`
    otherwise: ``data_guards``); ``leaves`` appear as single ``call_module``
    nodes, and so do submodules that use tensor data (``live_leaves``); the
    model is not mutated, no user hook runs and the global RNG state is
    unchanged; the model's code runs on real values only where data decides,
    on a copy of the real inputs and without gradients. ``args`` may hold real,
    meta or fake tensors.
    """
    global _TRACES
    with TRACE_LOCK, rng_preserved((args, kwargs)), _attribute_writes_undone(model), quiet_fake_tensor_logs():
        _TRACES += 1
        return _trace(model, forward, args, kwargs, leaves, arg_names)


_TRACES = 0


def traces_run() -> int:
    """How many forward traces (:func:`trace` calls) this process has started so far; a count that does not grow
    over a span of calls means nothing was traced (or retraced) in it."""
    return _TRACES


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _holds_trace_value(value: Any, depth: int = 0) -> bool:
    """A proxy, a fake tensor or a late-bound int somewhere in this (nested) container."""
    if isinstance(value, (fx.Proxy, FakeTensor, LateInt)):
        return True
    if depth > 4:
        return False
    if isinstance(value, dict):
        return any(_holds_trace_value(v, depth + 1) or _holds_trace_value(k, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_trace_value(v, depth + 1) for v in value)
    return False


@contextlib.contextmanager
def _attribute_writes_undone(model: nn.Module):
    """Attributes the forward sets on its modules while being traced (``self.cache = x``) are put back.

    Their values would be proxies or fake tensors; the user's modules must
    never hold them.  A forward that writes its modules is told once that the
    routed graph does not replay the write.
    """
    import warnings

    saved = [(path, m, dict(m.__dict__)) for path, m in model.named_modules()]
    # plain dict/list attributes (a module's own caches, e.g. ``self.rope_cache = {}``) keep their identity;
    # their contents are put back if the trace left trace values in them
    containers = [(path, m, k, v, copy.copy(v)) for path, m, d in saved for k, v in d.items()
                  if k not in _MODULE_INTERNALS and type(v) in (dict, list, collections.OrderedDict)]
    try:
        yield
    finally:
        for path, m, k, v, before_items in containers:
            if _holds_trace_value(v):
                if isinstance(v, dict):
                    v.clear()
                    v.update(before_items)
                else:
                    v[:] = before_items
                key = (type(model).__qualname__, path, k, "cache")
                if key not in _NOTED:
                    _NOTED.add(key)
                    warnings.warn(
                        f"treadfx: the forward stores values in `{(path + '.') if path else ''}{k}` (a cache of the "
                        "model); entries added while treadfx traced it were removed, and the routed graph does not "
                        "refill it. Fix: keep such caches outside the module whose forward calls the blocks, or in "
                        "a submodule that does not call them (treadfx runs those live).", stacklevel=5)
        for path, m, before in saved:
            d = m.__dict__
            changed = [k for k in list(d) if k not in before or d[k] is not before[k]]
            changed += [k for k in before if k not in d]
            for k in changed:
                if k in before:
                    d[k] = before[k]
                else:
                    del d[k]
            for k in changed:
                key = (type(model).__qualname__, path, k)
                if key not in _NOTED:
                    _NOTED.add(key)
                    warnings.warn(
                        f"treadfx: the forward sets `{(path + '.') if path else ''}{k}` on the model; the routed graph "
                        "runs the computation but not this assignment, so in routed training calls the attribute "
                        "keeps its previous value. Fix: return the value from the forward, or set it in a submodule "
                        "that does not call the blocks (treadfx runs those live).", stacklevel=5)


def _trace(model, forward, args, kwargs, leaves, arg_names) -> TracedProgram:
    fake_mode = make_fake_mode()
    call_leaves, spec = flatten_call(args, kwargs)
    signature = InputSignature(spec, tuple(_leaf_key(l) for l in call_leaves))
    fake_leaves = _fake_inputs(call_leaves, fake_mode)
    input_positions = [i for i, l in enumerate(call_leaves) if isinstance(l, torch.Tensor) or is_float_input(l)]
    names = argument_leaf_names(spec, len(call_leaves))
    if arg_names is not None:
        names = [readable_argument(n, arg_names) for n in names]

    tracer = SpecializingTracer(leaves, fake_mode)
    if all(not (isinstance(l, torch.Tensor) and (isinstance(l, FakeTensor) or l.device.type == "meta"))
           for l in call_leaves):
        # the traced call's real values: data-dependent code outside the blocks is specialised on them
        tracer.real_inputs = {p: (l.detach().clone() if isinstance(l, torch.Tensor) else l)
                              for p, l in enumerate(call_leaves) if p in input_positions}
    root = _Root(model)
    out_info: dict[str, Any] = {}

    def traced(root_self, *placeholders):
        flat = list(fake_leaves)
        proxies = list(placeholders)
        for pos in input_positions:
            flat[pos] = proxies.pop(0)
        call_args, call_kwargs = pytree.tree_unflatten(flat, spec)
        result = forward(root_self.m, *call_args, **call_kwargs)
        out_leaves, out_spec = flatten_output(result)
        template, tensor_outs, positions = [], [], []
        tracer.fix_late_shape(out_leaves, "an output of the forward")
        for i, leaf in enumerate(out_leaves):
            if isinstance(leaf, fx.Proxy) and isinstance(leaf.node.meta.get("val"), torch.Tensor):
                template.append(None)
                tensor_outs.append(leaf)
                positions.append(i)
            elif isinstance(leaf, fx.Proxy):  # a float input returned as is
                tracer.note_specialised([leaf])
                template.append(leaf.node.meta.get("val"))
            elif isinstance(leaf, torch.Tensor):
                raise UntraceableForwardError(
                    f"output leaf {i} of the forward is a tensor that does not depend on the inputs; "
                    "treadfx cannot return it from a traced graph. Fix: return it from a buffer or parameter."
                )
            else:
                template.append(leaf)
        out_info.update(spec=out_spec, template=template, positions=positions)
        return tuple(tensor_outs)

    def create_args_for_root(root_fn, is_module, concrete_args=None):
        placeholders = []
        for pos in input_positions:
            p = fx.Tracer.create_proxy(tracer, "placeholder", _sanitize(names[pos]), (), {})
            p.node.meta["val"] = fake_leaves[pos]
            p.node.meta["input_name"] = names[pos]
            p.node.meta["position"] = pos
            if is_float_input(call_leaves[pos]):
                p.node.meta["float_input"] = pos
            placeholders.append(p)
        return traced, [root] + placeholders

    tracer.create_args_for_root = create_args_for_root  # type: ignore[method-assign]
    # module calls made while values are evaluated run their forward only (no user hooks): no_user_hooks is
    # entered once here, under fx's patches, instead of once per evaluated module (each entry reassigns
    # nn.Module.__call__, which updates a slot in every subclass of nn.Module)
    with no_user_hooks(), tracer.recorder, tracer.checkpoint_interception(), autowrap_guard(), \
            _late_builtins(tracer, forward, model):
        tracer.plain_call = nn.Module.__call__
        graph = tracer.trace(root)
    tracer.finish_late()
    gm = fx.GraphModule(tracer.root, graph, class_name=f"Traced{type(model).__name__}")
    live = [(str(n.target).removeprefix("m."), n.meta["treadfx_live_leaf"]) for n in graph.nodes
            if "treadfx_live_leaf" in n.meta]
    if tracer.real_inputs is not None:  # a real call (not an internal shape-only analysis): tell the user
        _note_live_leaves(model, live)
    tracer.evaluator.live_modules = [tracer.root.get_submodule(str(n.target)) for n in graph.nodes
                                     if "treadfx_live_leaf" in n.meta]
    if tracer.real_inputs is not None:
        _note_specialised(model, [n.meta["treadfx_data_guard"] for n in graph.nodes
                                  if "treadfx_data_guard" in n.meta  # a live leaf's own guard is noted above
                                  and "treadfx_live_leaf" not in n.args[0].meta])
    return TracedProgram(
        gm=gm,
        signature=signature,
        input_names=[names[p] for p in input_positions],
        tensor_positions=input_positions,
        out_spec=out_info["spec"],
        out_template=out_info["template"],
        out_tensor_positions=out_info["positions"],
        model_root="m",
        evaluator=tracer.evaluator,
        fake_inputs=[fake_leaves[p] for p in input_positions],
        calls=tracer.calls,
        value_guards={pos: call_leaves[pos] for pos in sorted(tracer.specialised)},
        data_guards=[n.meta["treadfx_data_guard"] for n in graph.nodes if "treadfx_data_guard" in n.meta],
        live_leaves=live,
    )


_NOTED: set = set()  # (model class, module path or source line) of the notes given


def reset_notes() -> None:
    """Forget which one-time notes (live leaves, specialised values) were given: each is given again once."""
    _NOTED.clear()


def _note_live_leaves(model: nn.Module, live: list[tuple[str, str]]) -> None:
    """Say once per model class and module which submodules now run live because they use tensor data."""
    import warnings

    for path, where in live:
        key = (type(model).__qualname__, path)
        if key in _NOTED:
            continue
        _NOTED.add(key)
        warnings.warn(
            f"treadfx: `{path}` uses tensor data in Python ({where}), so treadfx runs it live as a leaf (its code "
            f"is not traced; it runs as written, with its hooks, at every call). To make this explicit and silence "
            f"this note: transform(..., leaf_modules=[{path!r}]).", stacklevel=6)


def _note_specialised(model: nn.Module, wheres: list[str]) -> None:
    """Say once per model class and line that the graph is specialised on a value computed from tensor data."""
    import warnings

    for where in wheres:
        key = (type(model).__qualname__, where)
        if key in _NOTED:
            continue
        _NOTED.add(key)
        warnings.warn(
            f"treadfx: the forward uses tensor data in Python at {where}, outside any submodule treadfx could run "
            "live; the routed graph is specialised on the value of this call and re-checks it at every call "
            "(each new value is traced once; up to treadfx.transformed.MAX_DATA_VARIANTS graphs are kept). If the "
            "value takes many different values, move that code "
            "into a submodule that does not call the blocks: treadfx runs such modules live; if it is a library's code "
            "you cannot change, keep the value to a few settings (for a padded length: pad to a few fixed "
            "lengths, e.g. batch captions by length buckets).", stacklevel=6)


@contextlib.contextmanager
def _late_builtins(tracer: SpecializingTracer, forward: Callable, model: nn.Module):
    """While tracing, ``max``, ``min``, ``set`` and ``frozenset`` called by the traced forward's own module on late
    ints keep them late (see :class:`LateInt`); every other call (other threads, no late int) is the builtin's.

    The names are shadowed in the globals of the modules that define the traced forward and the model's
    ``forward`` (never in ``builtins``, so ``isinstance(x, set)`` elsewhere is untouched)."""
    import builtins

    def wrap(name: str):
        orig = getattr(builtins, name)

        def call(*args, **kwargs):
            if threading.get_ident() == tracer.thread and not kwargs and args:
                items = list(args[0]) if len(args) == 1 else list(args)
                if any(isinstance(x, LateInt) for x in items) and all(
                        isinstance(x, (int, LateInt)) and not isinstance(x, bool) for x in items):
                    if name in ("max", "min"):
                        return tracer.late_reduce(orig, items)
                    return tracer.late_set(orig, items)
                return orig(items, **kwargs) if len(args) == 1 else orig(*args, **kwargs)
            return orig(*args, **kwargs)

        call.__wrapped__ = orig  # type: ignore[attr-defined]
        return call

    spaces = []
    for fn in (forward, getattr(type(model), "forward", None)):
        g = getattr(inspect_unwrap(fn), "__globals__", None)
        if isinstance(g, dict) and all(g is not s for s in spaces):
            spaces.append(g)
    patched = []
    for g in spaces:
        for name in ("max", "min", "set", "frozenset"):
            if name not in g:
                g[name] = wrap(name)
                patched.append((g, name))
    try:
        yield
    finally:
        for g, name in patched:
            g.pop(name, None)


def inspect_unwrap(fn: Any) -> Any:
    """``fn`` without decorators that kept ``__wrapped__`` (functools.wraps)."""
    seen = 0
    while hasattr(fn, "__wrapped__") and seen < 16:
        fn, seen = fn.__wrapped__, seen + 1
    return fn


_LRU_WRAPPERS: dict[str, Any] = {"modules": -1, "wrappers": []}


def _lru_wrappers() -> list:
    """Every ``functools.lru_cache`` wrapper in the process (rescanned when new modules were imported)."""
    import functools
    import gc
    import sys

    if _LRU_WRAPPERS["modules"] != len(sys.modules):
        import warnings

        with warnings.catch_warnings():  # touching some deprecated module objects warns
            warnings.simplefilter("ignore")
            _LRU_WRAPPERS["wrappers"] = [o for o in gc.get_objects()
                                         if type(o) is functools._lru_cache_wrapper]
        _LRU_WRAPPERS["modules"] = len(sys.modules)
    return _LRU_WRAPPERS["wrappers"]


def _cache_misses(wrapper: Any) -> int:
    try:
        return wrapper.cache_info().misses
    except Exception:  # pragma: no cover - exotic wrappers
        return 0


@contextlib.contextmanager
def autowrap_guard():
    """Nothing a trace leaves behind may reach the user's caches (``functools.lru_cache``).

    A forward may call cached helpers (diffusers' RoPE tables) with values
    derived from the trace; every lru cache that stored a new entry during the trace is
    cleared afterwards, so no proxy or fake tensor is ever served to a real call.
    """
    wrappers = _lru_wrappers()
    before = [_cache_misses(w) for w in wrappers]
    try:
        yield
    finally:
        for w, misses in zip(wrappers, before):
            if _cache_misses(w) != misses:  # something was computed and stored during the trace
                w.cache_clear()


def readable_argument(name: str, arg_names: Sequence[str]) -> str:
    """``args.0`` -> ``x`` using the forward's parameter names."""
    atoms = name.split(".")
    if atoms[0] == "args" and len(atoms) > 1 and atoms[1].isdigit() and int(atoms[1]) < len(arg_names):
        return ".".join([arg_names[int(atoms[1])]] + atoms[2:])
    if atoms[0] == "kwargs" and len(atoms) > 1:
        return ".".join(atoms[1:])
    return name


def _sanitize(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else "in_" + out
