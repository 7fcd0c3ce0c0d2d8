"""Shared measuring helpers for the benchmarks: step timing, spread, peak memory, dynamo counters, environment.

Every benchmark in this package (TREAD step, route ops, DiffMoE) should measure
the same way:

* :func:`time_calls` times a callable ``n`` times.  On CUDA each call is
  bracketed by CUDA events and the device is synchronised before the first and
  after the last call; on CPU it uses ``time.perf_counter``.
* :func:`summarize` gives median, p10/p90, IQR and mean of a list of times.
* :class:`PeakMemory` measures peak memory of a block of work:
  ``torch.cuda.max_memory_allocated`` (after a reset) on CUDA, and on CPU the
  peak process RSS above the RSS at entry, sampled every 5 ms by a thread.
* :class:`DynamoCounts` snapshots ``torch._dynamo.utils.counters`` (graph
  breaks, recompiles, unique graphs) so a caller can report what happened after
  warm-up.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import statistics
import subprocess
import threading
import time
from typing import Callable

import torch

__all__ = [
    "sync", "time_calls", "summarize", "PeakMemory", "DynamoCounts", "reset_dynamo", "free_memory", "environment",
    "rss_bytes", "trim_heap", "steady_cpu_allocator",
]


def sync(device: torch.device | str) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device: torch.device | str) -> list[float]:
    """Wall time of ``n`` calls of ``fn`` in milliseconds, one entry per call.

    CUDA: one pair of CUDA events per call, synchronised once before and once
    after the loop (so host-side launch overhead that does not hide behind the
    GPU shows up as gaps between events, as in a real training loop).
    """
    device = torch.device(device)
    if n <= 0:
        return []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda.synchronize(device)
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    """Median, p10, p25, p75, p90, IQR, mean, min and count of a list of times (ms)."""
    if not times_ms:
        raise ValueError("summarize() needs at least one time")
    xs = sorted(times_ms)
    p25, p75 = _quantile(xs, 0.25), _quantile(xs, 0.75)
    return dict(
        median_ms=statistics.median(xs), p10_ms=_quantile(xs, 0.10), p25_ms=p25, p75_ms=p75,
        p90_ms=_quantile(xs, 0.90), iqr_ms=p75 - p25, mean_ms=statistics.fmean(xs), min_ms=xs[0], n=len(xs),
    )


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def steady_cpu_allocator() -> bool:
    """Keep glibc malloc from returning memory to the OS between steps (no mmap'd chunks, 2 GiB trim threshold).

    Without it, large CPU tensors are mmap'd and unmapped (or the heap is
    trimmed) every step, and the page faults of re-touching fresh memory make
    CPU step times bimodal (measured: DiT-S/2 dense 1.42-2.13 s per step,
    steady 1.38 s with this).  Same as ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647``.  Returns whether it took effect.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """Collect garbage and hand freed malloc memory back to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: peak memory of the work inside it, in bytes (``.peak``) and what was measured (``.kind``).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
    minus what was allocated at entry (so it is this block's own peak, also when
    other variants stay alive).  CPU: peak RSS minus RSS at entry, sampled every 5 ms; at
    entry, garbage is collected and glibc's ``malloc_trim`` returns freed heap
    memory to the OS, so memory freed by an earlier variant is not silently
    reused (a delta: what was allocated before entry is not counted).
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak: int | None = None
        self.kind = ("cuda max_memory_allocated above entry" if self.device.type == "cuda"
                     else "cpu peak RSS delta (sampled every 5 ms)")
        self._stop = threading.Event()
        self._max = 0
        self._base = 0
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
        else:
            trim_heap()
            self._base = self._max = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device)) - self._base
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._max = max(self._max, rss_bytes())
            self.peak = int(self._max - self._base)


def _recompile_count() -> int:
    """How many dynamo compilations so far were recompilations (a guard of an already compiled frame failed).

    Current torch versions no longer fill ``counters["recompiles"]``; they record
    a ``recompile_reason`` in each compilation's metrics
    (``torch._dynamo.utils.get_compilation_metrics``) instead.  The larger of
    the two is returned, so older and newer versions both count.  The metrics
    are kept in a bounded deque, so :func:`_keep_compilation_metrics` lifts its
    bound first (otherwise differences of this count would be wrong after 64
    compilations).
    """
    from torch._dynamo import utils

    legacy = int(sum(utils.counters["recompiles"].values()))
    get = getattr(utils, "get_compilation_metrics", None)
    recorded = sum(1 for m in get() if getattr(m, "recompile_reason", None)) if get is not None else 0
    return max(legacy, recorded)


def _keep_compilation_metrics() -> None:
    from torch._dynamo import utils

    limit = getattr(utils, "set_compilation_metrics_limit", None)
    if limit is not None and getattr(utils, "_compilation_metrics", None) is not None \
            and utils._compilation_metrics.maxlen is not None and utils._compilation_metrics.maxlen < 10**6:
        limit(10**6)


@dataclasses.dataclass
class DynamoCounts:
    """A snapshot of dynamo's graph-break / recompile / graph / compiled-frame counts.

    ``graph_breaks`` and ``unique_graphs`` come from ``torch._dynamo.utils.counters``;
    ``recompiles`` from :func:`_recompile_count`; ``compiles`` is
    ``counters["frames"]["total"]``, every frame dynamo compiled (first
    compilations and recompilations), so a non-zero difference across timed
    steps means something compiled after warm-up.
    """

    graph_breaks: int
    recompiles: int
    unique_graphs: int
    compiles: int = 0

    @staticmethod
    def now() -> "DynamoCounts":
        """The counts as they are now (sums over all reasons)."""
        from torch._dynamo.utils import counters

        _keep_compilation_metrics()
        return DynamoCounts(
            graph_breaks=int(sum(counters["graph_break"].values())),
            recompiles=_recompile_count(),
            unique_graphs=int(counters["stats"]["unique_graphs"]),
            compiles=int(counters["frames"]["total"]),
        )

    def __sub__(self, other: "DynamoCounts") -> "DynamoCounts":
        return DynamoCounts(self.graph_breaks - other.graph_breaks, self.recompiles - other.recompiles,
                            self.unique_graphs - other.unique_graphs, self.compiles - other.compiles)

    def __add__(self, other: "DynamoCounts") -> "DynamoCounts":
        return DynamoCounts(self.graph_breaks + other.graph_breaks, self.recompiles + other.recompiles,
                            self.unique_graphs + other.unique_graphs, self.compiles + other.compiles)


def reset_dynamo() -> None:
    """Forget compiled code and zero dynamo's counters (between variants)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def free_memory(device: torch.device | str) -> None:
    """Collect garbage and return cached device memory, so the next variant starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device | str) -> dict:
    """Where the numbers come from: device name, CPU model, threads, torch / CUDA versions, date."""
    device = torch.device(device)
    env = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        cpu_model=_cpu_model(),
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    return env
