"""keep_tokens under shared selection (issue 15: "tokens the user marks are always kept").

With shared selection (one kept subset for the whole batch: models whose RoPE table has no batch dimension, such as
Flux, Qwen-Image, HunyuanVideo, Wan, or ``selection='shared'``), a token marked in any sample must be kept, so the
union of the marks over the batch is what has to fit in the K kept tokens:

* union <= K: every marked token of every sample is in the kept subset (checked by hand on the kept indices, over
  random marks, and the routed output equals a hand-written TREAD reference with those indices);
* union > K (even with at most K per sample): TokenCountError (a TransformError) saying the selection is shared,
  why, that the union counts, and the fixes that apply; never a silently routed marked token;
* the route-out op's own count check (reasons, per-sample counts), and that it compiles without a graph break;
* one real diffusers model with shared selection (Flux2, tiny random config), both cases.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import treadfx
from treadfx.ops import RouteSelect

from helpers import reference_tread, tiny_dit, tiny_dit_inputs

N, K, B = 16, 8, 3  # tiny_dit: 16 image tokens; ratio 0.5 keeps 8


@functools.cache
def shared_dit():
    """(model, transform with one shared route over blocks 1..3 at ratio 0.5, inputs), built once."""
    m = tiny_dit()
    tm = treadfx.transform(m, start=1, end=3, ratio=0.5, selection="shared")
    return m, tm, tiny_dit_inputs(batch=B)


def _mask(marks: list[set[int]], n: int = N) -> torch.Tensor:
    mask = torch.zeros(len(marks), n, dtype=torch.bool)
    for b, s in enumerate(marks):
        mask[b, sorted(s)] = True
    return mask


@st.composite
def marks_within(draw, limit: int = K):
    """Per-sample marks whose union has at most ``limit`` tokens (samples mark different subsets of it)."""
    union = draw(st.sets(st.integers(0, N - 1), max_size=limit))
    return [draw(st.sets(st.sampled_from(sorted(union)))) if union else set() for _ in range(B)]


@st.composite
def marks_beyond(draw):
    """Per-sample marks with at most K tokens each whose union has more than K."""
    union = sorted(draw(st.sets(st.integers(0, N - 1), min_size=K + 1)))
    marks: list[set[int]] = [set() for _ in range(B)]
    for t in union:  # each token of the union to some sample with room (B * K >= N, so there always is one)
        b = draw(st.integers(0, B - 1))
        while len(marks[b]) >= K:
            b = (b + 1) % B
        marks[b].add(t)
    for b in range(B):  # and some overlap between samples
        for t in draw(st.lists(st.sampled_from(union), max_size=K)):
            if len(marks[b]) < K:
                marks[b].add(t)
    return marks


def test_token_count_error_is_a_transform_error():
    assert issubclass(treadfx.TokenCountError, treadfx.TransformError)


@settings(max_examples=20, deadline=None)
@given(marks_within())
def test_shared_selection_keeps_every_token_marked_in_any_sample(marks):
    m, tm, (x, t, y) = shared_dit()
    with treadfx.keep_tokens(tm, _mask(marks)):
        tm(x, t, y)
    (rec,) = treadfx.last_routes(tm)
    kept = rec.kept.tolist()
    assert rec.kept.shape == (K,) and len(set(kept)) == K and all(0 <= i < N for i in kept)  # one subset, K tokens
    union = set().union(*marks)
    assert union <= set(kept), f"marked but routed: {sorted(union - set(kept))}"


def test_shared_selection_with_a_union_of_exactly_k_keeps_the_union_and_matches_the_reference():
    m, tm, (x, t, y) = shared_dit()
    marks = [{0, 1, 2}, {3, 4, 5}, {6, 15, 0}]  # samples disagree; 8 distinct tokens = K
    with treadfx.keep_tokens(tm, _mask(marks)):
        out = tm(x, t, y)
    (rec,) = treadfx.last_routes(tm)
    assert sorted(rec.kept.tolist()) == [0, 1, 2, 3, 4, 5, 6, 15]  # exactly the union: nothing else fits
    ref = reference_tread(m, x, t, y, [(1, 3, 0.5)], [rec.kept.expand(B, K)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _assert_shared_refusal(msg: str, union: int, most: int):
    assert "uses shared selection, one kept subset for the whole batch" in msg
    assert "union of the marks over the batch counts" in msg
    assert f"{union} tokens are marked in the batch (at most {most} in one sample)" in msg
    assert f"keeps only {K} of {N}; {union - K} marked tokens would be routed" in msg
    assert "Fix: mark fewer tokens" in msg and "lower the route ratio to at most" in msg
    assert "marks that agree" in msg


@settings(max_examples=20, deadline=None)
@given(marks_beyond())
def test_shared_selection_refuses_a_union_of_marks_larger_than_k(marks):
    m, tm, (x, t, y) = shared_dit()
    union = set().union(*marks)
    assert len(union) > K and all(len(s) <= K for s in marks)
    with pytest.raises(treadfx.TokenCountError) as e, treadfx.keep_tokens(tm, _mask(marks)):
        tm(x, t, y)
    _assert_shared_refusal(str(e.value), len(union), max(len(s) for s in marks))
    lowered = float(str(e.value).split("at most ")[-1].split(",")[0])
    assert N - int(N * lowered) >= len(union)  # the advised ratio does keep the union


def test_the_refusal_says_why_the_selection_is_shared():
    keep = _mask([set(range(6)), set(range(6, 12))])
    for reason, said in [("`cat` has no batch dimension, so one subset serves the whole batch",
                          "one kept subset for the whole batch: `cat` has no batch dimension"),
                         ("requested", "one kept subset for the whole batch: selection='shared' was requested"),
                         (None, "one kept subset for the whole batch: see treadfx.inspect for why")]:
        sel = RouteSelect(0, N, K, sorted_order=True, shared=True, shared_reason=reason).train()
        with pytest.raises(treadfx.TokenCountError) as e:
            sel(torch.zeros(2, N, 4), keep)
        assert said in str(e.value)
        _assert_shared_refusal(str(e.value), 12, 6)


def test_per_sample_route_out_refuses_more_marks_than_k_in_one_sample():
    sel = RouteSelect(0, N, K, sorted_order=True, shared=False).train()
    keep = _mask([set(range(8)), set(range(9))])  # sample 1 marks 9 > K; the union would not matter
    with pytest.raises(treadfx.TokenCountError, match=r"marks 9 tokens of sample 1, but route 0 keeps only 8 of 16; "
                       r"1 marked tokens would be routed\. Fix: mark fewer tokens, or lower the route ratio to at "
                       r"most 0\.4375"):
        sel(torch.zeros(2, N, 4), keep)
    keep = _mask([set(range(8)), set(range(8, 16))])  # 8 each, 16 in the union: fine per sample
    idx = sel(torch.zeros(2, N, 4), keep)
    assert idx[0].tolist() == list(range(8)) and idx[1].tolist() == list(range(8, 16))


def test_compiled_route_out_keeps_the_union_without_a_graph_break():
    """Under torch.compile the count is not checked (it would need a host sync in the graph; documented), but the
    draw still puts every marked token first, and the eager check does not break the graph."""
    sel = RouteSelect(0, N, K, sorted_order=True, shared=True).train()
    compiled = torch.compile(sel, backend="eager", fullgraph=True)
    keep = _mask([{1, 3}, {5, 7, 9}, {11, 13, 15}])
    for _ in range(3):
        idx = compiled(torch.zeros(B, N, 4), keep)
        assert idx.shape == (K,) and {1, 3, 5, 7, 9, 11, 13, 15} == set(idx.tolist())


# ------------------------------------------------------------------ a diffusers model with shared selection

def _flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    m = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
                                axes_dims_rope=(4, 4, 4, 4))
    ids = torch.zeros(16, 4)  # a 4 x 4 image: (row, column) on the last two axes
    ids[:, -2] = torch.arange(4).repeat_interleave(4).float()
    ids[:, -1] = torch.arange(4).repeat(4).float()
    g = torch.Generator().manual_seed(10)
    args = (torch.randn(2, 16, 8, generator=g),)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 12, generator=g), "timestep": torch.tensor([0.1, 0.2]),
              "img_ids": ids, "txt_ids": torch.zeros(5, 4), "guidance": torch.tensor([3.0, 3.0])}
    return m, args, kwargs


def test_flux2_keeps_the_union_of_the_marks_or_refuses_it():
    m, args, kwargs = _flux2()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)  # the RoPE table has no batch dim: shared selection
    keep = _mask([set(range(4)), set(range(10, 14))])  # 8 in the union = K
    with treadfx.keep_tokens(tm, keep):
        tm(*args, **kwargs)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (8,) and sorted(rec.kept.tolist()) == [0, 1, 2, 3, 10, 11, 12, 13]
    keep[1, 4:6] = True  # sample 1 marks 6, the union 10 > K
    with pytest.raises(treadfx.TokenCountError) as e, treadfx.keep_tokens(tm, keep):
        tm(*args, **kwargs)
    msg = str(e.value)
    assert "uses shared selection, one kept subset for the whole batch" in msg
    assert "10 tokens are marked in the batch (at most 6 in one sample)" in msg and "keeps only 8 of 16" in msg


@pytest.mark.parametrize("eager_first", [False, True], ids=["compiled_first", "eager_first"])
def test_a_compiled_transformed_model_keeps_the_marked_tokens_in_one_graph(eager_first):
    """``torch.compile(model, fullgraph=True)`` with ``keep_tokens``: the token map is derived eagerly (the
    compiled forward cannot), compiling does not retrace the model (torch marks the module it wraps), and every
    marked token is kept."""
    from treadfx.transformed import state_of

    m = tiny_dit(depth=4)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    args = tiny_dit_inputs(batch=2)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 5:8] = True
    compiled = torch.compile(tm, fullgraph=True, backend="eager")
    with treadfx.keep_tokens(tm, mask):
        if eager_first:
            tm(*args)
        for _ in range(2):
            compiled(*args)
            kept = treadfx.last_routes(tm)[0].kept
            assert set(range(3)) <= set(kept[0].tolist()) and {5, 6, 7} <= set(kept[1].tolist())
    assert len(list(state_of(tm).programs_iter())) == 1
    assert not state_of(tm).__dict__.get("retraces")
