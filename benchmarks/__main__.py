"""``python -m benchmarks``: the TREAD suite (training step + route ops), then DiffMoE if it is present.

    python -m benchmarks                    # tiny / small sizes on the default device
    python -m benchmarks --model dit-b2 --compile all

Flags are passed to ``benchmarks.step`` (``--model``, ``--compile``, ``--steps``, ...);
``benchmarks.route_ops`` and ``benchmarks.diffmoe_step`` run with their defaults
on the same device.  ``--json`` prints one JSON object with a key per benchmark.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys

from . import route_ops, step


def main(argv: list[str] | None = None) -> dict:
    """Run every benchmark of the suite; returns {name: result}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = step.parse_args(argv)
    as_json = args.json
    results: dict = {}
    dev = ["--device", args.device]
    runs = [("step", lambda: step.main(argv)), ("route_ops", lambda: route_ops.main(dev + (["--json"] if as_json else [])))]
    try:
        diffmoe = importlib.import_module("benchmarks.diffmoe_step")
    except ImportError:
        diffmoe = None
    if diffmoe is not None and hasattr(diffmoe, "main"):
        runs.append(("diffmoe_step", lambda: diffmoe.main(dev + (["--json"] if as_json else []))))
    for name, fn in runs:
        if as_json:  # keep stdout one JSON object: silence each benchmark's own print
            with contextlib.redirect_stdout(io.StringIO()):
                results[name] = fn()
        else:
            print(f"\n=== benchmarks.{name} ===", flush=True)
            results[name] = fn()
    if as_json:
        print(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
