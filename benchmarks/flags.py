"""Argument types shared by the benchmark command lines: each rejects a bad value with a message
naming the flag and what it accepts (argparse then exits with status 2)."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["positive_int", "positive_float", "ratio", "resolve_device", "name_list", "write_json"]


def positive_int(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= 1 for ``flag``."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {v}")
        return v

    return parse


def _number(flag: str, s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be a number, got {s!r}") from None


def ratio(flag: str = "--ratio", allow_zero: bool = True) -> Callable[[str], float]:
    """An argparse ``type`` accepting a routing ratio in [0, 1) for ``flag`` ((0, 1) if not ``allow_zero``)."""
    def parse(s: str) -> float:
        v = _number(flag, s)
        above_low = v >= 0.0 if allow_zero else v > 0.0
        if not (above_low and v < 1.0):
            raise argparse.ArgumentTypeError(f"{flag} must be in {'[' if allow_zero else '('}0, 1), got {v}")
        return v

    return parse


def positive_float(flag: str) -> Callable[[str], float]:
    """An argparse ``type`` accepting numbers > 0 for ``flag``."""
    def parse(s: str) -> float:
        v = _number(flag, s)
        if not v > 0.0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0, got {v}")
        return v

    return parse


def resolve_device(p: argparse.ArgumentParser, args: argparse.Namespace, advice: str = "use --device cpu") -> None:
    """Fill ``args.device`` (cuda when available, else cpu); ``--device cuda`` without CUDA exits 2 with advice."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: torch.cuda.is_available() is False on this machine; {advice}")


def name_list(p: argparse.ArgumentParser, flag: str, value: str, choices: "list[str] | tuple[str, ...]") -> list[str]:
    """The comma-separated names in ``value``, in the given order; an unknown or empty list exits 2 naming ``flag``
    and the choices."""
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in choices]
    if bad or not names:
        p.error(f"{flag}: unknown {bad or 'empty list'}; choose from {', '.join(choices)}")
    return names


def write_json(res: dict, path: "str | None") -> None:
    """Write a benchmark's result to ``path`` as indented JSON (values JSON cannot hold as their ``str``); nothing
    when ``path`` is None."""
    import json

    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2, default=str)
