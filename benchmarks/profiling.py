"""Where the time of a training step goes: a torch.profiler table plus a breakdown by category.

Categories (by operator / kernel name, self time only, so nothing is counted
twice): route gather/scatter, route RNG/argsort, attention, matmul/conv,
everything else; and "unaccounted" = wall time minus the summed self time of
all operators, both taken under the profiler (host-side Python, dispatch and
kernel-launch overhead, or GPU idle time between kernels).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .timing import sync, time_calls

__all__ = ["CATEGORIES", "categorize", "profile_step", "format_breakdown"]

# first match wins; names are lower-cased aten op names or kernel names (inductor kernels carry fused op names)
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("Python/autograd/optimizer overhead (annotated ranges)", ("#", "autograd::engine", "optimizer.")),
    ("route RNG/argsort", ("rand", "uniform", "sort", "randperm", "philox")),
    ("route gather/scatter", ("gather", "scatter", "index_select", "index_copy", "index_put", "aten::index",
                              "take_along")),
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "fmha", "attention")),
    ("matmul/conv", ("aten::mm", "addmm", "aten::bmm", "aten::linear", "aten::matmul", "gemm", "cutlass", "conv",
                     "mkldnn", "onednn", "xmma", "sm90_", "sm80_", "nvjet", "triton_tem", "_mm_", "fused_mm")),
    ("optimizer math (AdamW)", ("lerp", "addcdiv", "addcmul", "_foreach", "adam", "aten::sqrt")),
]


def categorize(name: str) -> str:
    """The category of an operator or kernel name (``other`` when nothing matches)."""
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_step(step: Callable[[], object], device: torch.device | str, steps: int = 3, rows: int = 25) -> dict:
    """Profile ``steps`` calls of ``step`` (already warmed up); returns the table and a per-category breakdown.

    The result has ``table`` (the profiler's top ``rows`` operators by self
    time), ``per_step_ms`` (category -> ms per step, including
    ``unaccounted``), ``wall_ms`` (per step, outside the profiler),
    ``profiled_wall_ms`` (per step, under the profiler) and ``time_kind`` (CPU self time on CPU, device kernel time on CUDA).
    """
    device = torch.device(device)
    wall = sorted(time_calls(step, steps, device))[steps // 2]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("train_step"):
                step()
        sync(device)
        profiled_wall = (time.perf_counter() - t0) * 1e3 / steps
    averages = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    per_cat: dict[str, float] = {}
    total_us = 0.0
    for ev in averages:
        us = float(getattr(ev, attr, 0.0) or 0.0)
        if cuda and getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        if ev.key == "train_step" or ev.key.startswith("ProfilerStep"):
            continue
        if us <= 0:
            continue
        cat = categorize(ev.key)
        per_cat[cat] = per_cat.get(cat, 0.0) + us
        total_us += us
    per_step = {k: v / 1e3 / steps for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])}
    busy = total_us / 1e3 / steps
    per_step["unaccounted (launch/Python overhead or idle)"] = max(0.0, profiled_wall - busy)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=rows)
    return dict(table=table, per_step_ms=per_step, wall_ms=wall, profiled_wall_ms=profiled_wall, busy_ms=busy,
                time_kind="device kernel self time" if cuda else "CPU operator self time")


def format_breakdown(result: dict) -> str:
    """A few lines: ms per step and share of wall time for each category."""
    wall = result["profiled_wall_ms"]
    lines = [f"  step wall {result['wall_ms']:.2f} ms ({wall:.2f} ms under the profiler); {result['time_kind']} "
             f"{result['busy_ms']:.2f} ms; share of the profiled wall:"]
    for cat, ms in result["per_step_ms"].items():
        lines.append(f"    {cat:<54} {ms:9.2f} ms  {100 * ms / wall if wall else 0:5.1f}%")
    return "\n".join(lines)
