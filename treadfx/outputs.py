"""Flattening the structured values a forward returns, and building them anew.

``torch.utils._pytree`` knows tuples, lists, dicts, NamedTuples and the
output classes libraries register (diffusers' ``BaseOutput``), but treats a
plain dataclass or a plain object as an opaque leaf.  A traced graph that
returned such an object would hand every caller the *trace-time* object, full
of proxies.  :func:`flatten_output` looks inside dataclasses and plain
objects too, and :func:`unflatten_output` builds a *new* object of the same
class for every call, so each call gets its own real tensors.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["OutputSpec", "flatten_output", "unflatten_output", "leaf_accessors"]


@dataclasses.dataclass
class OutputSpec:
    """How to rebuild one value: ``kind`` is leaf, tuple, list, namedtuple, dict, dataclass or object."""

    kind: str
    type: type | None = None
    keys: tuple = ()
    children: tuple["OutputSpec", ...] = ()
    template: Any = None  # dataclass / plain object: the object whose other attributes are copied


def _interesting(value: Any, depth: int = 0) -> bool:
    """True if the value holds a tensor or a proxy somewhere we can rebuild."""
    # plain values first: under torch.compile an int may be symbolic, and asking whether it is a Proxy pins it
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return False
    if isinstance(value, (torch.Tensor, fx.Proxy)):
        return True
    if depth > 8 or isinstance(value, nn.Module):
        return False
    if isinstance(value, (tuple, list)):
        return any(_interesting(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_interesting(v, depth + 1) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_interesting(getattr(value, f.name, None), depth + 1) for f in dataclasses.fields(value))
    d = getattr(value, "__dict__", None)
    if isinstance(d, dict) and not callable(value):
        return any(_interesting(v, depth + 1) for v in d.values())
    return False


def flatten_output(value: Any) -> tuple[list, OutputSpec]:
    """Leaves of ``value`` (tensors, proxies and constants) and the spec that rebuilds it.

    Guarantees: ``unflatten_output(leaves, spec)`` equals ``value`` structurally;
    tensors inside tuples, lists, dicts, NamedTuples, dataclasses (including
    ``ModelOutput``-style dict dataclasses) and plain objects are leaves.
    """
    leaves: list = []
    spec = _flatten(value, leaves)
    return leaves, spec


def _flatten(value: Any, leaves: list) -> OutputSpec:
    if not _interesting(value):
        leaves.append(value)
        return OutputSpec("leaf")
    if isinstance(value, (torch.Tensor, fx.Proxy)):
        leaves.append(value)
        return OutputSpec("leaf")
    if dataclasses.is_dataclass(value):
        names = tuple(f.name for f in dataclasses.fields(value) if f.init)
        kids = tuple(_flatten(getattr(value, n), leaves) for n in names)
        return OutputSpec("dataclass", type(value), names, kids, value)
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return OutputSpec("namedtuple", type(value), tuple(type(value)._fields),
                          tuple(_flatten(v, leaves) for v in value))
    if isinstance(value, (tuple, list)):
        return OutputSpec("tuple" if isinstance(value, tuple) else "list", type(value), (),
                          tuple(_flatten(v, leaves) for v in value))
    if isinstance(value, dict):
        keys = tuple(value.keys())
        return OutputSpec("dict", type(value), keys, tuple(_flatten(value[k], leaves) for k in keys))
    names = tuple(k for k, v in vars(value).items() if _interesting(v))
    kids = tuple(_flatten(getattr(value, n), leaves) for n in names)
    return OutputSpec("object", type(value), names, kids, value)


def unflatten_output(leaves: list, spec: OutputSpec) -> Any:
    """A new value with the structure of ``spec`` and these leaves (never the trace-time object)."""
    it = iter(leaves)
    return _build(spec, it)


def _build(spec: OutputSpec, it) -> Any:
    if spec.kind == "leaf":
        return next(it)
    kids = [_build(c, it) for c in spec.children]
    if spec.kind == "tuple":
        return tuple(kids) if spec.type is tuple else spec.type(kids)
    if spec.kind == "list":
        return list(kids) if spec.type is list else spec.type(kids)
    if spec.kind == "namedtuple":
        return spec.type(*kids)
    if spec.kind == "dict":
        out = spec.type() if spec.type is not dict else {}
        for k, v in zip(spec.keys, kids):
            out[k] = v
        return out
    if spec.kind == "dataclass":
        return dataclasses.replace(spec.template, **dict(zip(spec.keys, kids)))
    new = copy.copy(spec.template)
    for k, v in zip(spec.keys, kids):
        object.__setattr__(new, k, v)
    return new


def leaf_accessors(spec: OutputSpec) -> list[list[tuple[str, Any]]]:
    """For every leaf, the access path from the root value: ``("item", key)`` or ``("attr", name)`` steps."""
    out: list[list[tuple[str, Any]]] = []

    def walk(s: OutputSpec, path: list) -> None:
        if s.kind == "leaf":
            out.append(list(path))
            return
        for i, c in enumerate(s.children):
            if s.kind in ("tuple", "list", "namedtuple"):
                step = ("item", i)
            elif s.kind == "dict":
                step = ("item", s.keys[i])
            else:
                step = ("attr", s.keys[i])
            walk(c, path + [step])

    walk(spec, [])
    return out


def pick(value: Any, path: tuple) -> Any:
    """Follow an access path from :func:`leaf_accessors` (used by live graphs to take one output of a call)."""
    for kind, key in path:
        value = value[key] if kind == "item" else getattr(value, key)
    return value

