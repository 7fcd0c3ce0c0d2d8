"""A module the user declares with ``leaf_modules=[...]`` is treated like a live module the trace detects itself.

Lumina2's ``rope_embedder`` reads caption lengths with ``.tolist()``; the one-time warning recommends naming it
as a leaf.  ``inspect``'s FLOP counts run the whole forward on fake tensors, so such a module must be called by
its outputs' metadata there (as detected live modules are), never by its code.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import treadfx
import treadfx.fake_eval as fake_eval

from helpers import tiny_lumina2, tiny_lumina2_inputs

pytest.importorskip("diffusers")


def _report(leaves):
    tm = treadfx.transform(tiny_lumina2(), start=1, end=-2, ratio=0.5, leaf_modules=leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return treadfx.inspect(tm, *tiny_lumina2_inputs([5, 8], torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("declared_first", [True, False])
def test_declared_leaf_counts_like_detected_live_module(monkeypatch, declared_first):
    """With ``leaf_modules=['rope_embedder']`` inspect counts FLOPs (routed == predicted), and its counts equal those
    of the default transform, where the trace detects the same module as live, whichever is built first in the
    process (the output-metadata memo is process-wide)."""
    monkeypatch.setattr(fake_eval, "_OUTPUT_META", {})
    monkeypatch.setattr(fake_eval, "_REAL_RUN_MODULES", set(), raising=False)
    order = [["rope_embedder"], []] if declared_first else [[], ["rope_embedder"]]
    reports = {tuple(leaves): _report(leaves) for leaves in order}
    declared, detected = reports[("rope_embedder",)], reports[()]
    assert declared.routed_flops == declared.predicted_routed_flops
    assert declared.routed_flops < declared.dense_flops
    assert (declared.dense_flops, declared.routed_flops) == (detected.dense_flops, detected.routed_flops)
    # the declared leaf's rotary rows are still gathered with the kept tokens
    text = str(declared)
    assert "gather  output of `rope_embedder`" in text
