"""Graphs specialised on tensor data (Lumina2's padded caption length): one traced variant per value met, each
traced once, and a call goes straight to the variant that expects its value.

Lumina2 pads the joint caption+image sequence to ``max(caption lengths) + N`` and masks attention only when the
caption lengths differ (``use_mask = len(set(seq_lengths)) > 1``), so its routed graph depends on the pair
(longest caption, all lengths equal).  Real batches draw caption lengths at random: these tests do the same.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import treadfx
import treadfx.transformed
from treadfx.transformed import state_of

from helpers import TracesSince, tiny_lumina2, tiny_lumina2_inputs

WIDTH = 4  # caption tokens in the padded tokenizer output


@pytest.fixture
def traces():
    """How many times the transformed model's forward was traced in this test."""
    return TracesSince()


def _graph_key(lengths: list[int]) -> tuple[int, bool]:
    """What Lumina2's forward specialises the routed graph on, read off its code: the padded length and whether
    the attention mask is used."""
    return max(lengths), len(set(lengths)) > 1


def test_random_caption_lengths_trace_each_padded_length_once_and_go_straight_to_its_variant(traces):
    m = tiny_lumina2(layers=3)
    tm = treadfx.transform(m, start=1, end=1, ratio=0.5)
    rope_calls = [0]
    m.rope_embedder.register_forward_hook(lambda *_: rope_calls.__setitem__(0, rope_calls[0] + 1))
    g = torch.Generator().manual_seed(0)
    draws = torch.Generator().manual_seed(2)
    seen: set = set()
    revisits = 0
    for _ in range(14):
        lengths = torch.randint(1, WIDTH + 1, (2,), generator=draws).tolist()
        key = _graph_key(lengths)
        before_traces, before_calls = traces[0], rope_calls[0]
        tm(*tiny_lumina2_inputs(lengths, g, width=WIDTH))
        assert traces[0] - before_traces == (0 if key in seen else 1), (lengths, key, seen)
        if key in seen:
            revisits += 1
            # the current variant fails its guard at rope_embedder's output, then the variant for this value runs:
            # never a scan through the other cached variants
            assert rope_calls[0] - before_calls <= 2
        seen.add(key)
    assert revisits >= 8 and len(seen) >= 5  # the draw exercised both new and repeated values
    assert sum(len(v) for v in state_of(tm).programs.values()) == len(seen)


def test_a_cached_variant_computes_what_a_fresh_trace_computes():
    """Going back to a variant traced earlier gives the output (and kept tokens) of a model traced for this call
    alone, under the same random draws."""
    m = tiny_lumina2(layers=3)
    tm = treadfx.transform(m, start=1, end=1, ratio=0.5)
    g = torch.Generator().manual_seed(2)
    calls = [tiny_lumina2_inputs(lengths, g, width=WIDTH) for lengths in ([2, 4], [3, 3], [4, 1], [1, 4])]
    for args in calls[:3]:
        tm(*args)
    for args in (calls[0], calls[3]):  # a cached variant (padded length 4, mask used), then the same key again
        torch.manual_seed(7)
        out = tm(*args).sample
        kept = treadfx.last_routes(tm)[0].kept
        fresh = treadfx.transform(m, start=1, end=1, ratio=0.5)
        torch.manual_seed(7)
        assert torch.equal(fresh(*args).sample, out)
        assert torch.equal(treadfx.last_routes(fresh)[0].kept, kept)


def test_more_values_than_kept_warns_once_with_readable_values_and_advice(monkeypatch):
    monkeypatch.setattr(treadfx.transformed, "MAX_DATA_VARIANTS", 2)
    m = tiny_lumina2(layers=3)
    tm = treadfx.transform(m, start=1, end=1, ratio=0.5)
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for lengths in ([1, 2], [1, 3], [1, 4], [2, 2]):
            tm(*tiny_lumina2_inputs(lengths, g, width=WIDTH))
    notes = [str(x.message) for x in w if "have come up" in str(x.message)]
    assert len(notes) == 1, notes
    note = notes[0]
    assert "rope_embedder" in note and "more than 2 different values" in note
    assert "tensor[2, " in note and "<treadfx: late-bound int>" not in note
    assert "bucket" in note and "MAX_DATA_VARIANTS" in note
    assert sum(len(v) for v in state_of(tm).programs.values()) == 2
