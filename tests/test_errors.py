"""Every bad input raises a TransformError subclass naming the problem and the fix, and corrupts nothing."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import treadfx
from treadfx.models.dit import DiT

from helpers import tiny_dit


def small_dit(depth: int = 6) -> DiT:
    return tiny_dit(depth=depth)


def inputs(batch: int = 2):
    return torch.randn(batch, 4, 8, 8), torch.rand(batch), torch.randint(0, 10, (batch,))


def test_every_error_is_a_transform_error():
    for cls in (treadfx.InvalidRatioError, treadfx.InvalidRouteError, treadfx.NoBlocksFoundError,
                treadfx.AmbiguousChainError, treadfx.TokenCountError, treadfx.UntraceableForwardError,
                treadfx.StreamAnalysisError, treadfx.UnroutableRegionError, treadfx.CompileTimeTraceError):
        assert issubclass(cls, treadfx.TransformError)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(treadfx.InvalidRatioError, match=re.escape(
            f"ratio={ratio!r} is outside [0, 1): it is the fraction of tokens skipped, and at least one token must "
            "stay. Fix: use a value such as 0.5 (the paper default); 0 disables routing.")):
        treadfx.transform(small_dit(), start=1, end=2, ratio=ratio)


def test_ratio_not_a_number():
    with pytest.raises(treadfx.InvalidRatioError, match=re.escape(
            "ratio must be a number in [0, 1), got '0.5' (str). Fix: pass the fraction of tokens to skip, "
            "e.g. ratio=0.5.")):
        treadfx.transform(small_dit(), start=1, end=2, ratio="0.5")


def test_start_after_end():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route start=4 comes after end=2. Fix: start must be <= end (end is inclusive).")):
        treadfx.transform(small_dit(), start=4, end=2)


def test_start_out_of_range_at_transform_time():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route 0 end=6 is out of range: the model has 6 repeated blocks (blocks.0 ... blocks.5), so valid "
            "indices are -6..5. Fix: choose end inside the chain; negative indices count from the end.")):
        treadfx.transform(small_dit(), start=1, end=6)


def test_negative_indices_resolving_backwards_are_refused_by_transform():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route 0: start=4 resolves to block 4, after end=-3 (block 3) in a chain of 6 blocks. "
            "Fix: start must be <= end (end is inclusive).")):
        treadfx.transform(small_dit(), start=4, end=-3)  # -3 is block 3 in a chain of 6


def test_overlapping_routes():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route 1 (blocks 2..4) overlaps route 0 (blocks 0..2). Fix: give routes in increasing order with no "
            "shared block; a route starts after the previous one ends.")):
        treadfx.transform(small_dit(), routes=[(0, 2, 0.5), (2, 4, 0.5)])


def test_unordered_routes():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape("route 1 (blocks 0..1) comes before route 0")):
        treadfx.transform(small_dit(), routes=[(3, 4, 0.5), (0, 1, 0.5)])


def test_start_and_routes_together():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "pass either routes=[...] or start/end, not both. Fix: drop start/end or routes.")):
        treadfx.transform(small_dit(), start=1, end=2, routes=[(1, 2, 0.5)])


def test_only_start_given():
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape("start=1 and end=None: give both or neither.")):
        treadfx.transform(small_dit(), start=1)


def test_no_repeated_blocks():
    """A Sequential of plain layers: the message says what it holds and why that is no chain of blocks."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    with pytest.raises(treadfx.NoBlocksFoundError) as e:
        treadfx.transform(model)
    msg = str(e.value)
    assert msg.startswith("Sequential has no repeated blocks: the model (Sequential) holds 2 `Linear` layers, but a "
                          "layer without submodules is not a block."), msg
    assert "Fix: wrap each layer and its residual in a small nn.Module" in msg


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class TwoTowers(nn.Module):
    """Two independent chains over the same image tokens: route indices are ambiguous."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.tower_a = nn.ModuleList([Block(d) for _ in range(3)])
        self.tower_b = nn.ModuleList([Block(d) for _ in range(3)])

    def forward(self, x):
        h = self.embed(x)
        a, b = h, h
        for blk in self.tower_a:
            a = blk(a)
        for blk in self.tower_b:
            b = blk(b)
        return a + b


def test_several_chains_make_indices_ambiguous():
    tm = treadfx.transform(TwoTowers(), start=0, end=1)
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            "the model has several chains of repeated blocks carrying image tokens: 'tower_a' (3 blocks: "
            "tower_a[0..2] Block x3); 'tower_b' (3 blocks: tower_b[0..2] Block x3). Route indices would be ambiguous. "
            "Fix: pass chain='<name>' to transform().")):
        tm(torch.randn(2, 5, 4))


def test_naming_the_chain_resolves_the_ambiguity():
    m = TwoTowers()
    tm = treadfx.transform(m, start=0, end=1, chain="tower_b")
    x = torch.randn(2, 6, 4)
    out = tm(x)
    assert out.shape == (2, 6, 8)
    report = treadfx.inspect(tm, x)
    assert [c.name for c in report.chains if c.selected] == ["tower_b"]


def test_unknown_chain_name():
    """A name that is no container of blocks is refused by transform(), before anything changes."""
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            "chain='tower_c' names no chain: 'tower_c' holds no repeated blocks. A chain's name is the path of the "
            "container of its blocks, or the paths of consecutive containers joined by '+' when one chain runs "
            "through them (`treadfx.inspect` prints the chains). The model's repeated blocks are in: 'tower_a' "
            "(3 blocks), 'tower_b' (3 blocks). Fix: pass one of those names.")):
        treadfx.transform(TwoTowers(), start=0, end=1, chain="tower_c")


def test_a_name_joining_chains_that_do_not_run_into_each_other():
    """Both containers exist, but no traced chain runs from one into the other: the first call lists the chains
    and their parts."""
    tm = treadfx.transform(TwoTowers(), start=0, end=1, chain="tower_a+tower_b")
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            "chain='tower_a+tower_b' names no chain and no part of one; the model has: 'tower_a' (3 blocks); "
            "'tower_b' (3 blocks). Fix: pass one of those names (a part's name routes only its blocks, and "
            "start/end count within it).")):
        tm(torch.randn(2, 5, 4))


def test_fixed_indices_with_no_kept_token():
    tm = treadfx.transform(small_dit(), start=1, end=2)
    with pytest.raises(treadfx.TokenCountError, match=re.escape(
            "fixed kept indices for route 0 have shape [2, 0]: a route must keep between 1 and 16 of the 16 image "
            "tokens, as [B, K] (per-sample selection). Fix: pass K >= 1 indices per sample.")):
        with treadfx.fixed_routes(tm, [torch.zeros(2, 0, dtype=torch.long)]):
            tm(*inputs())


class DataBranch(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])

    def forward(self, x):
        h = self.embed(x)
        if h.mean() > 0:  # a branch on tensor data
            h = -h
        for blk in self.blocks:
            h = blk(h)
        return h


def test_untraceable_data_dependent_branch_names_the_line():
    # a real call specialises on the value with a guard (tests/test_data_dependent.py); shape-only analysis
    # (meta inputs) has no value to specialise on and refuses, naming the line and the fixes
    tm = treadfx.transform(DataBranch(), start=1, end=2)
    with pytest.raises(treadfx.UntraceableForwardError) as info:
        treadfx.prepare(tm, torch.randn(2, 5, 4, device="meta"))
    msg = str(info.value)
    assert msg.startswith("the forward uses the *data* of tensor `gt` (shape []) in a Python condition "
                          "(if/while/and/or/assert) at ")
    assert "test_errors.py:" in msg and "in forward: `if h.mean() > 0:  # a branch on tensor data`" in msg
    assert msg.endswith("Fix: call the model (or treadfx.prepare / inspect) with real tensors, express it with "
                        "tensor ops (torch.where, masking), or move it inside a submodule that does not call the "
                        "blocks (treadfx runs such modules live).")


def test_stream_argument_that_does_not_exist():
    tm = treadfx.transform(small_dit(), start=1, end=2, stream="latents")
    with pytest.raises(treadfx.StreamAnalysisError, match=re.escape(
            "stream='latents' names no tensor input of forward; its tensor inputs are ['x', 't', 'y']. Fix: pass the "
            "name of the argument that carries the image (noisy latent).")):
        tm(*inputs())


def test_already_transformed():
    tm = treadfx.transform(small_dit(), start=1, end=2)
    with pytest.raises(treadfx.TransformError, match=re.escape("this model is already transformed by treadfx.")):
        treadfx.transform(tm)


def test_not_a_module():
    with pytest.raises(treadfx.TransformError, match=re.escape(
            "transform() needs a torch.nn.Module, got function. Fix: pass the model.")):
        treadfx.transform(lambda x: x)


def test_failed_trace_leaves_the_original_model_usable_and_unchanged():
    m = DataBranch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tm = treadfx.transform(m, start=1, end=2)
    x = torch.randn(2, 5, 4)
    with pytest.raises(treadfx.UntraceableForwardError):
        treadfx.prepare(tm, x.to("meta"))  # shape-only analysis of a branch on data fails
    assert type(m) is DataBranch
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m(x).shape == (2, 5, 8)
    tm.eval()
    assert torch.equal(tm(x), m.eval()(x))  # eval never traces


def test_set_ratio_validates():
    tm = treadfx.transform(small_dit(), start=1, end=2)
    with pytest.raises(treadfx.InvalidRatioError):
        treadfx.set_ratio(tm, 1.0)
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape("route=3 but the model has 1 routes. Fix: use 0..0.")):
        treadfx.set_ratio(tm, 0.3, route=3)


def test_helpers_on_an_untransformed_model():
    with pytest.raises(treadfx.TransformError, match=re.escape(
            "DiT is not a treadfx-transformed model. Fix: call treadfx.transform(model, ...) first.")):
        treadfx.set_ratio(small_dit(), 0.5)


class _PrefixBlock(nn.Module):
    """Treats the first ``n_first`` tokens differently (HunyuanVideo-I2V's first-frame modulation)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, n_first):
        return x + torch.cat([self.a(x[:, :n_first]), self.b(x[:, n_first:])], 1)


class _PrefixModel(nn.Module):
    def __init__(self, n_first: int, d: int = 8):
        super().__init__()
        self.n_first = n_first
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList([_PrefixBlock(d) for _ in range(4)])

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h, self.n_first)
        return h


def test_a_block_taking_a_count_of_its_tokens_is_refused_naming_it_and_the_fix():
    """On the kept tokens the first ``n_first`` positions are other tokens than in the full sequence: routing would
    be silently wrong, so the route is refused, naming the block, the argument and its value."""
    torch.manual_seed(0)
    m = _PrefixModel(n_first=4)
    x = torch.randn(2, 16, 4)
    dense = m(x)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    with pytest.raises(treadfx.UnroutableRegionError) as e:
        tm(x)
    msg = str(e.value)
    assert "block `blocks.1` takes `n_first`=4" in msg and "below the 16 image tokens" in msg
    assert "Fix: end the route before the blocks that take `n_first`" in msg
    tm.eval()
    assert torch.equal(tm(x), dense)  # eval is the original model
