"""Command line: ``python -m treadfx {demo,inspect} ...``.

* ``demo``: trains a small DiT dense and with TREAD for the same wall-clock
  budget on a bundled data set and reports both (see ``treadfx.demo``).
* ``inspect``: prints what the TREAD pass sees in a model: the reference DiT
  by default (``--size/--patch/--resolution``), or any importable factory
  ``MODULE:FACTORY`` returning a model or ``(model, args, kwargs)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

import torch

__all__ = ["CLIError", "main", "parse_tensor_spec"]


class CLIError(Exception):
    """A bad command line or factory: ``main`` prints ``treadfx inspect: error: <message>`` and returns 2."""

_DTYPES = {"float": torch.float32, "float32": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "long": torch.int64, "int": torch.int64, "int64": torch.int64, "bool": torch.bool}


def parse_tensor_spec(spec: str) -> torch.Tensor:
    """``"2,4,32,32"`` or ``"2:long"`` or ``"2,77,768:float"`` -> an example tensor (randn / zeros / ones)."""
    shape_s, _, dtype_s = spec.partition(":")
    try:
        shape = tuple(int(s) for s in shape_s.split(",") if s.strip())
    except ValueError:
        raise CLIError(f"cannot read tensor shape {spec!r}; write it like 2,4,32,32 or 2:long") from None
    dtype = _DTYPES.get(dtype_s or "float")
    if dtype is None:
        raise CLIError(f"unknown dtype {dtype_s!r} in {spec!r}; use one of {sorted(_DTYPES)}")
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _load_factory(target: str) -> Any:
    """Import ``MODULE:FACTORY`` (the current directory first on the path); raises :class:`CLIError` naming the fix."""
    mod_name, _, attr = target.partition(":")
    if not attr or not mod_name:
        raise CLIError(f"{target!r} is not MODULE:FACTORY; write it like mypkg.models:make_dit")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"cannot import {mod_name!r} ({e}); run from the directory that contains it or install it")
    fn = getattr(module, attr, None)
    if fn is None:
        raise CLIError(f"module {mod_name!r} has no attribute {attr!r}; name a function defined in {mod_name}")
    if not callable(fn):
        raise CLIError(f"{target} is a {type(fn).__name__}, not a function; name a factory that takes no "
                       "arguments and returns a model or (model, args, kwargs)")
    return fn


def _make(target: str) -> tuple[torch.nn.Module, tuple, dict]:
    """Call the factory; returns ``(model, args, kwargs)``; raises :class:`CLIError` when it fails or returns junk."""
    fn = _load_factory(target)
    try:
        made = fn()
    except Exception as e:  # noqa: BLE001 -- any failure of user code becomes one line with the fix
        raise CLIError(f"calling {target}() failed with {type(e).__name__}: {_first_line(e)}; the factory must "
                       "take no arguments (wrap it: def make(): return MyModel(...))") from None
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(made, tuple):
        if not 1 <= len(made) <= 3:
            raise CLIError(f"{target}() returned a tuple of {len(made)}; return a model or (model, args, kwargs)")
        model = made[0]
        args = tuple(made[1]) if len(made) > 1 else ()
        kwargs = dict(made[2]) if len(made) > 2 else {}
    else:
        model = made
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{target}() returned a {type(model).__name__}, not a torch.nn.Module; return the model "
                       "or (model, args, kwargs)")
    return model, args, kwargs


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise :class:`CLIError` when ``model.forward`` cannot take ``args``/``kwargs`` (a missing or extra input)."""
    import inspect as _inspect

    try:
        sig = _inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        params = ", ".join(p.name for p in sig.parameters.values()
                           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise CLIError(f"{type(model).__name__}.forward({params}) cannot take the example inputs ({e}): give one "
                       "--input SHAPE[:DTYPE] per positional argument, in order (e.g. --input 2,4,32,32 --input 2 "
                       "--input 2:long), or --kwarg NAME=SHAPE[:DTYPE]") from None


def _cmd_inspect(ns: argparse.Namespace) -> int:
    import treadfx
    from treadfx.models.dit import dit

    torch.manual_seed(ns.seed)
    args: tuple = ()
    kwargs: dict = {}
    if ns.factory:
        model, args, kwargs = _make(ns.factory)
        if ns.input:
            args = tuple(parse_tensor_spec(s) for s in ns.input)
        for kv in ns.kwarg or []:
            name, sep, spec = kv.partition("=")
            if not sep or not name:
                raise CLIError(f"--kwarg {kv!r} is not NAME=SHAPE[:DTYPE]; write it like --kwarg "
                               "encoder_hidden_states=2,77,768")
            kwargs[name] = parse_tensor_spec(spec)
        if not args and not kwargs:
            raise CLIError("no example inputs: give --input SHAPE[:DTYPE] (repeat, in forward's order) or return "
                           "(model, args, kwargs) from the factory")
        _check_inputs(model, args, kwargs)
    else:
        latent = ns.resolution // 8
        model = dit(ns.size, ns.patch, input_size=latent, num_classes=1000)
        args = (torch.randn(ns.batch, 4, latent, latent), torch.rand(ns.batch) * 1000,
                torch.randint(0, 1000, (ns.batch,)))
    try:
        tm = treadfx.transform(model, start=ns.start, end=ns.end, ratio=ns.ratio, chain=ns.chain, stream=ns.stream)
        report = treadfx.inspect(tm, *args, **kwargs)
    except treadfx.TransformError as e:
        print(f"treadfx: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if ns.json else report)
    return 0


def _cmd_demo(ns: argparse.Namespace, rest: Sequence[str]) -> int:
    from treadfx import demo

    return demo.main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    """The `python -m treadfx` argument parser: the `demo` and `inspect` commands and their flags."""
    p = argparse.ArgumentParser(prog="python -m treadfx", description="TREAD token routing as a torch.fx pass.")
    sub = p.add_subparsers(dest="command", metavar="{demo,inspect}")
    sub.add_parser("demo", help="train a small DiT dense vs TREAD on a bundled data set (python -m treadfx demo -h)",
                   add_help=False)
    ins = sub.add_parser("inspect", help="show chains, token stream, routes and FLOPs of a model")
    ins.add_argument("factory", nargs="?", help="MODULE:FACTORY returning a model or (model, args, kwargs); "
                                                "default: the reference DiT")
    ins.add_argument("--size", default="XL", choices=["S", "B", "L", "XL"], help="reference DiT size (default XL)")
    ins.add_argument("--patch", type=int, default=2, choices=[2, 4, 8], help="reference DiT patch size")
    ins.add_argument("--resolution", type=int, default=256, help="image resolution in pixels (latent = /8)")
    ins.add_argument("--batch", type=int, default=2)
    ins.add_argument("--input", "--input-shape", dest="input", action="append", metavar="SHAPE[:DTYPE]",
                     help="positional example input for a factory, e.g. 2,4,32,32 or 2:long (repeat)")
    ins.add_argument("--kwarg", action="append", metavar="NAME=SHAPE[:DTYPE]", help="keyword example input")
    ins.add_argument("--start", type=int, default=2)
    ins.add_argument("--end", type=int, default=-4)
    ins.add_argument("--ratio", type=float, default=0.5)
    ins.add_argument("--chain", default=None, help="chain name when the model has several")
    ins.add_argument("--stream", default=None, help="forward argument carrying the image tokens")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m treadfx`` and the ``treadfx`` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "demo":
        return _cmd_demo(argparse.Namespace(), argv[1:])
    ns = parser.parse_args(argv)
    if ns.command == "inspect":
        try:
            return _cmd_inspect(ns)
        except CLIError as e:
            print(f"treadfx inspect: error: {e}", file=sys.stderr)
            return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
