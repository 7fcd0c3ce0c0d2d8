"""Shared fixtures and hypothesis profiles.

Profiles: ``ci`` (the default under CI=true: 50 examples per property, no
deadline), ``dev`` (25 examples, the default otherwise). Select with
``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=50, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# under pytest-xdist each worker gets one thread (the workers already fill the cores)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def fresh_dynamo():
    """A clean dynamo cache and counters before and after the test (for graph-break and recompile counts)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_notes():
    """treadfx's one-time notes (live leaves, specialised values) are once per process: each test starts with none
    given, so a test that expects a note does not depend on which tests ran before it in the same worker."""
    from treadfx import tracing

    tracing.reset_notes()
    yield


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Collect garbage in an xdist worker before it reports "finished" to the controller.

    Why: xdist's worker sends ``workerfinished`` right after ``pytest_sessionfinish``;
    the controller then shuts the worker's execnet gateway down, and execnet sends the
    worker a SIGINT if its main thread is still busy 5 s later. The worker is still in
    ``pytest_unconfigure``, whose ``gc.collect()`` over the suite's torch/fx garbage
    can take that long on a loaded machine; the SIGINT then lands in hypothesis' gc
    callback and is printed as an unraisable ``KeyboardInterrupt`` although nothing was
    interrupted. Collecting here, before ``workerfinished``, leaves little for the
    later collections.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        gc.collect()
