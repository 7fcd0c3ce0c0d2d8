"""The default torch.compile backend (Inductor, CPU C++ codegen) on a routed model.

The other compile tests use dynamo's "eager"/"aot_eager" backends, which decide
graph breaks and recompiles exactly but never lower the route ops. Here
Inductor generates code for the training step, so the claims of the README's
"Precision and compile modes" section are checked as stated: a compiled
routed step computes what eager computes with its routes fixed to the ones
the compiled step drew; seeded selection
draws the same indices compiled and eager; unseeded selection matches eager
for the same ``torch.manual_seed`` with ``fallback_random``;
``mode="max-autotune-no-cudagraphs"`` compiles without graph breaks.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

import treadfx
from treadfx.models.dit import DiT

from helpers import tiny_dit, tiny_dit_inputs


def small_dit() -> DiT:
    return tiny_dit(depth=5)


def inputs(batch: int = 3):
    return tiny_dit_inputs(batch, seed=3, t_scale=1000)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def graphs() -> int:
    """Graphs dynamo compiled so far: first compilations and recompilations alike (with ``fullgraph=True`` one
    per compilation). torch 2.13 fills neither ``counters["recompiles"]`` nor, for a compiled module,
    ``counters["frames"]``; a count that does not grow over a span of calls means nothing recompiled in it."""
    return counters["stats"]["unique_graphs"]


def _grads(model, out, w):
    return torch.autograd.grad((out * w).sum(), [p for p in model.parameters() if p.requires_grad], allow_unused=True)


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs"])
def test_inductor_train_step_matches_eager_with_fixed_routes(mode):
    tm = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)
    cm = torch.compile(tm, fullgraph=True, mode=mode)
    x, t, y = inputs()
    got = cm(x, t, y)  # the compiled routed step draws its routes (Inductor's RNG)
    kept = [rec.kept for rec in treadfx.last_routes(tm)]
    assert [k.shape for k in kept] == [(3, 8)]
    with treadfx.fixed_routes(tm, kept):  # eager with those routes fixed
        want = tm(x, t, y)
    w = torch.randn_like(want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(_grads(tm, got, w), _grads(tm, want, w)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * max(1.0, float(b.abs().max())))
    tm.eval()  # eval compiles the original forward, once
    m = small_dit().eval()
    torch.testing.assert_close(cm(x, t, y), m(x, t, y), rtol=1e-4, atol=1e-5)
    before = graphs()
    for mode in ("train", "eval", "train", "train"):
        getattr(tm, mode)()
        cm(x, t, y)  # new random routes, same K (and after fixed_routes in eager): the graphs are reused
    assert dict(counters["graph_break"]) == {}
    assert graphs() == before == 2


def test_inductor_seeded_selection_equals_eager():
    """The seeded hash is integer arithmetic: compiled and eager draw the same indices, forward after forward."""
    x, t, y = inputs()
    eager = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5, seed=7)
    compiled_model = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5, seed=7)
    cm = torch.compile(compiled_model, fullgraph=True)
    for _ in range(3):
        eager(x, t, y)
        cm(x, t, y)
        (a,), (b,) = treadfx.last_routes(eager), treadfx.last_routes(compiled_model)
        assert torch.equal(a.kept, b.kept)
    assert treadfx.routing_step(compiled_model) == treadfx.routing_step(eager) == 3
    assert graphs() == 1  # the step count is a tensor input: no recompile per step


def test_inductor_unseeded_selection_follows_manual_seed_with_fallback_random():
    x, t, y = inputs()
    eager = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)
    compiled_model = treadfx.transform(small_dit(), start=1, end=3, ratio=0.5)
    with inductor_config.patch(fallback_random=True):
        cm = torch.compile(compiled_model, fullgraph=True)
        cm(x, t, y)  # compile outside the seeded comparison
        for seed in (0, 1):
            torch.manual_seed(seed)
            eager(x, t, y)
            torch.manual_seed(seed)
            cm(x, t, y)
            (a,), (b,) = treadfx.last_routes(eager), treadfx.last_routes(compiled_model)
            assert torch.equal(a.kept, b.kept)
