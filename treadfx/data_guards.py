"""Guards on tensor *data* that a traced graph was specialised on, and the retry that honours them.

The tracer specialises on shapes.  When a forward uses tensor data in Python
(``assert labels.max() <= 999``, ``mask.sum(1).tolist()``, ``if h.mean() > 0``,
``x[i, :n]`` with a tensor ``n``) outside the repeated blocks, treadfx
(:mod:`treadfx.tracing`) either

* folds it, when the tensor is a constant of the forward (built from Python
  numbers by deterministic factories: HiDream's ``img_sizes``): no guard;
* runs the enclosing submodule live as a leaf, when the use is inside a
  submodule that does not contain the routed blocks (a label embedder's assert,
  Lumina2's RoPE embedder);
* otherwise specialises the graph on the value seen on the real inputs of the
  traced call, and records a guard node (:func:`data_guard`) that re-checks
  the value at every call.

A guard that fails raises :class:`ValueGuardFailure` inside the graph;
:func:`run_guarded` then restores the RNG state, runs the cached variant that
expects this call's value there (no other is tried) and traces a new one when none fits (bounded: at most
``MAX_DATA_VARIANTS`` variants per input signature, with a warning).  Under
``torch.compile`` :func:`run_guarded_compiled` does the same from a frame dynamo
skips: each variant runs as its own compiled graph, a new one is traced eagerly.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from .errors import UntraceableForwardError
from .fake_eval import rng_state, set_rng_state
from .outputs import flatten_output

# treadfx.tracing and treadfx.transformed import this module at their top (they build and run the guard nodes), so
# run_guarded reaches them by function-level imports

__all__ = ["ValueGuardFailure", "data_guard", "structure_of", "run_guarded", "run_guarded_compiled", "LATE_INT",
           "readable_value", "data_value"]


class ValueGuardFailure(UntraceableForwardError):
    """A value the traced graph was specialised on changed (caught by :func:`run_guarded`, which retraces)."""

    def __init__(self, where: str, expected: Any, actual: Any):
        super().__init__(
            f"the traced graph was specialised on the value {expected!r} computed at {where}, but this call computes "
            f"{actual!r}. The transformed model catches this and runs (or traces) the variant that fits, eagerly and "
            "under torch.compile; it reaches you only when a traced graph was run outside the model's forward. Fix: "
            "call the transformed model (or its torch.compile'd wrapper) instead of a graph it traced."
        )
        self.where, self.expected, self.actual = where, expected, actual


def _is_fake(value: Any) -> bool:
    if torch.compiler.is_compiling():  # dynamo traces the check on real (symbolic) values: never fake data here
        return False
    try:  # shape inference or a FLOP count is running: module outputs there are metadata, not this call's data
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            return True
    except AttributeError:  # pragma: no cover - older torch
        pass
    return any(isinstance(x, FakeTensor) or (isinstance(x, torch.Tensor) and x.device.type == "meta")
               for x in pytree.tree_leaves(value))


def structure_of(value: Any) -> Any:
    """What a graph specialises on in a module's result: tensor shapes and dtypes, and every other leaf's value."""
    leaves, _ = flatten_output(value)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(("T", tuple(leaf.shape), leaf.dtype))
        else:
            out.append(leaf)
    return tuple(out)


_CONVERT = {
    "bool": bool,
    "int": int,
    "float": float,
    "index": operator.index,
    "value": lambda v: v,
    "shape": lambda v: tuple(v.shape),
    "structure": structure_of,
}


#: In an expected structure: an int the graph reads at run time (a late-bound int, see treadfx.tracing.LateInt),
#: so any int matches here; what the graph needs of it is checked by guards of its own.
LATE_INT = "<treadfx: late-bound int>"


def _matches(actual: Any, expected: Any) -> bool:
    if isinstance(expected, str) and expected == LATE_INT:
        return isinstance(actual, int) and not isinstance(actual, bool)
    if isinstance(expected, (list, tuple)):
        return (isinstance(actual, (list, tuple)) and len(actual) == len(expected)
                and all(_matches(a, e) for a, e in zip(actual, expected)))
    try:
        return bool(actual == expected)
    except Exception:  # e.g. comparing tensors elementwise: fall back to identity of the repr
        return repr(actual) == repr(expected)


def data_guard(value: Any, kind: str, expected: Any, where: str) -> None:
    """Graph node: raise :class:`ValueGuardFailure` unless ``value`` (converted by ``kind``) equals ``expected``
    (where ``expected`` holds :data:`LATE_INT`, any int matches).

    A no-op on fake or meta values (shape inference and FLOP counting never check data).
    """
    if _is_fake(value):
        return None
    actual = _CONVERT[kind](value)
    same = _matches(actual, expected)
    if not same:
        raise ValueGuardFailure(where, expected, actual)
    return None


data_guard.__treadfx_guard__ = True  # type: ignore[attr-defined]


def data_value(method: str, expected: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """Graph node: ``obj.method(*args, **kwargs)`` (``.item()``, ``.tolist()`` in the traced forward) on real data;
    on fake or meta data (shape inference, FLOP counts) the value the graph was specialised on, which a
    :func:`data_guard` after this node re-checks on every real call."""
    if _is_fake(obj):
        return expected
    return getattr(obj, method)(*args, **kwargs)


# ------------------------------------------------------------------------------------------ runtime


def _variants(st: Any, prog: Any) -> list | None:
    for progs in st.programs.values():
        if any(p is prog for p in progs):
            return progs
    return None


def run_guarded(model: Any, st: Any, prog: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``prog`` on this call; when one of its data guards fails, run (or trace) the variant that fits.

    Guarantees: the result is what the forward computes for this call's data;
    the RNG state each attempt starts from is the caller's, so random draws are
    those of a single run; the variant that ran becomes the first one tried
    next time.  Hooks of modules run live before the failing guard fire once
    per attempt.
    """
    if not getattr(prog.traced, "data_guards", None):
        return prog.run(st, args, kwargs)
    state = rng_state((args, kwargs))
    tried: list = []
    built: list = []  # the variant traced during this call
    current = prog
    while True:
        try:
            out = current.run(st, args, kwargs)
        except ValueGuardFailure as failure:
            current = _next_variant(model, st, current, args, kwargs, tried, built, state, failure)
            continue
        _promote(st, current)
        return out


def _next_variant(model: Any, st: Any, current: Any, args: tuple, kwargs: dict, tried: list, built: list,
                  state: Any, failure: ValueGuardFailure) -> Any:
    """After ``current`` failed a data guard: restore the caller's RNG state and return the cached variant that
    fits this call, or trace a new one (appended to ``built``); raises UntraceableForwardError when the variant
    traced during this call fails its own guard (the value depends on random numbers)."""
    tried.append(current)
    set_rng_state(state)
    progs = _variants(st, current)
    nxt = None
    if progs is not None:
        from .tracing import flatten_call  # noqa: PLC0415 - tracing imports this module

        leaves, _ = flatten_call(args, kwargs)
        for p in progs:
            if any(p is t for t in tried) or not p.values_match(leaves) or not _could_fit(p, failure):
                continue
            if p.guard is not None and p.guard.check() is not None:
                continue
            nxt = p
            break
    if nxt is None:
        if built and current is built[-1]:
            raise UntraceableForwardError(
                f"a value the forward computes from tensor data at {failure.where} differs between two "
                f"evaluations on the same inputs ({failure.expected!r}, then {failure.actual!r}): it depends "
                "on random numbers. treadfx cannot specialise on it. Fix: compute it inside a submodule that "
                "does not call the blocks (treadfx runs such modules live), or express it with tensor ops."
            ) from failure
        nxt = _build_variant(model, st, args, kwargs, tried, failure)
        built.append(nxt)
    st.sync(nxt)
    return nxt


def _expectations(prog: Any) -> dict[str, list]:
    """Per guard location of ``prog``'s graph: the values its data guards there expect (computed once)."""
    found = prog.__dict__.get("_data_guard_expectations")
    if found is None:
        found = {}
        for n in prog.gm.graph.nodes:
            if n.op == "call_function" and n.target is data_guard:
                found.setdefault(n.args[3], []).append(n.args[2])
        prog.__dict__["_data_guard_expectations"] = found
    return found


def _could_fit(prog: Any, failure: ValueGuardFailure) -> bool:
    """False when ``prog`` is specialised on another value at the place where this call's value failed a guard:
    it would fail there too (the value is the same function of this call's inputs), so it is not run."""
    expected = _expectations(prog).get(failure.where)
    return expected is None or any(_matches(failure.actual, e) for e in expected)


def readable_value(value: Any) -> str:
    """A guarded value as a user reads it: tensors as ``tensor[2, 16, 8]``, late-bound ints as ``<int>``."""
    if isinstance(value, str) and value == LATE_INT:
        return "<int>"
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "T" and isinstance(value[1], tuple):
        return f"tensor{list(value[1])}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(readable_value(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def _promote(st: Any, current: Any) -> None:
    """The variant that ran becomes the first one tried next time, and the model's current program."""
    progs = _variants(st, current)
    if progs is not None and progs and progs[0] is not current:
        progs.remove(current)
        progs.insert(0, current)
    st.current = current


# ------------------------------------------------------------------------------------------ under torch.compile
#
# A compiled model cannot catch a guard failure inside its graph and switch graphs there, so the dispatch among
# the variants runs in a frame dynamo skips (_compiled_dispatch, recursive=False: the frames it calls are still
# compiled), and each variant's program runs in its own compiled frame (_run_variant: dynamo guards on the
# program, so every variant gets its own graph, compiled once).  What is not the program itself (finding,
# tracing and syncing variants, RNG state) runs eagerly (torch.compiler.disable).  A guard failure raised by a
# compiled variant propagates out of its frame into the dispatcher, which restores the RNG state and tries the
# next variant, exactly as run_guarded does eagerly.


def _run_variant(prog: Any, st: Any, args: tuple, kwargs: dict) -> Any:
    return prog.run(st, args, kwargs)


def _eager_first(model: Any, st: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    from . import transformed as tr  # noqa: PLC0415 - transformed imports this module

    prog = tr.program_for(model, st, args, kwargs)
    st.current = prog
    st.sync(prog)
    return prog, rng_state((args, kwargs))


_eager_first_d = torch.compiler.disable(_eager_first)
_next_variant_d = torch.compiler.disable(_next_variant)
_promote_d = torch.compiler.disable(_promote)


def _compiled_dispatch(model: Any, st: Any, args: tuple, kwargs: dict) -> Any:
    prog, state = _eager_first_d(model, st, args, kwargs)
    tried: list = []
    built: list = []
    current = prog
    while True:
        try:
            out = _run_variant(current, st, args, kwargs)
        except ValueGuardFailure as failure:
            current = _next_variant_d(model, st, current, args, kwargs, tried, built, state, failure)
            continue
        _promote_d(st, current)
        return out


_compiled_dispatch_d = torch.compiler.disable(_compiled_dispatch, recursive=False)


def run_guarded_compiled(model: Any, st: Any, args: tuple, kwargs: dict) -> Any:
    """:func:`run_guarded` for a model called under ``torch.compile``: the program whose data guards hold is run,
    each variant compiled as its own graph, a new variant traced eagerly when none fits.

    Guarantees: the result equals the eager model's on the same kept indices; the dispatch is one graph break
    (the call into this function), and each variant compiles once per input signature it meets (at most
    ``MAX_DATA_VARIANTS`` variants are kept per signature).
    """
    return _compiled_dispatch_d(model, st, args, kwargs)


def _build_variant(model: Any, st: Any, args: tuple, kwargs: dict, tried: list, failure: ValueGuardFailure) -> Any:
    from . import transformed as tr  # noqa: PLC0415 - transformed imports this module

    progs = _variants(st, tried[0])
    hidden = []
    if progs is not None:  # none fits (tried and failed, or expects another value): hide them, program_for builds
        hidden = list(progs)
        progs.clear()
    prog = tr.program_for(model, st, args, kwargs)
    progs = _variants(st, prog)
    if progs is not None:
        for p in hidden:
            progs.insert(0, p)
        progs.remove(prog)
        progs.insert(0, prog)
        limit = tr.MAX_DATA_VARIANTS
        while len(progs) > limit:
            progs.pop()
            key = "data-values"  # once per model
            if key not in st.warned:
                st.warned.add(key)
                warnings.warn(
                    f"treadfx: the forward specialises on a value it computes from tensor data at {failure.where} "
                    f"(now {readable_value(failure.actual)}, before {readable_value(failure.expected)}), and more "
                    f"than {limit} different values of it have come up. Each new value is traced once (this one took "
                    f"{prog.trace_seconds:.1f} s) and only the {limit} most recently used graphs are kept, so calls "
                    "with other values retrace. Fix: let the value take fewer distinct values (for a padded caption "
                    "length: batches whose longest caption falls on a few lengths, e.g. a sampler that buckets "
                    "captions by length), or raise treadfx.transformed.MAX_DATA_VARIANTS.", stacklevel=5)
    return prog
