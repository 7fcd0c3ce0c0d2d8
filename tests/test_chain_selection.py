"""What ``chain=`` selects, how start/end count then, and errors whose advice fits the case (issue 15).

* Naming one part of a merged chain (``single_transformer_blocks`` of Flux's
  ``transformer_blocks+single_transformer_blocks``) routes that part's blocks, with start/end counted within it
  (negative ones from its end); the whole merged chain's name keeps counting along all its blocks.
* The range check at ``transform()`` never calls an index valid that the first call refuses, and never refuses
  one it would accept; the first call names the routed chain and the chains it does not count (a text refiner).
* ``NoBlocksFoundError`` says what the module tree holds and why that is no chain of blocks, with the fix that
  applies (a list of plain layers, one block reused in a loop, blocks held as attributes, a single block).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import treadfx

from backbone_refs import CASES, sample_of

FLUX = CASES["diffusers_flux"]  # 2 double-stream blocks then 3 single-stream blocks, 16 image tokens


def _flux():
    pytest.importorskip("diffusers")
    m = FLUX.build()
    m.train()
    args, kwargs = FLUX.inputs()
    return m, args, kwargs


# ================================================================== chain= naming a part of a merged chain


def _routed(tm):
    """(start, end, first block path, last block path) of each route the transformed model's program plans."""
    prog = treadfx.transformed.state_of(tm).current
    return [(p.start, p.end, p.chain.paths[p.start], p.chain.paths[p.end]) for p in prog.plans]


def test_a_part_name_routes_that_parts_blocks_and_equals_the_hand_written_reference():
    """Flux: chain='single_transformer_blocks' with start=0, end=1 routes single_transformer_blocks.0 .. .1 (blocks
    2..3 of the merged chain), not transformer_blocks.0 .. .1; inspect says how start/end count."""
    m, args, kwargs = _flux()
    tm = treadfx.transform(m, start=0, end=1, ratio=0.5, chain="single_transformer_blocks")
    torch.manual_seed(0)
    tm(*args, **kwargs)
    assert _routed(tm) == [(0, 1, "single_transformer_blocks.0", "single_transformer_blocks.1")]
    prog = treadfx.transformed.state_of(tm).current
    chains = {c.name: c for c in prog.chains}
    assert prog.chain is chains["single_transformer_blocks"]
    assert prog.chain.note == (
        "routed: named by chain='single_transformer_blocks'; start/end count within `single_transformer_blocks`, "
        "blocks 2..4 of the chain `transformer_blocks+single_transformer_blocks`")
    assert chains["transformer_blocks+single_transformer_blocks"].note.startswith(
        "not routed as a whole: chain='single_transformer_blocks' names its blocks 2..4")
    # the routed output is the hooks' TREAD over blocks 2..3 of the merged chain, with the same kept tokens
    kept = treadfx.last_routes(tm)[0].kept
    with treadfx.fixed_routes(tm, [kept]):
        out = sample_of(tm(*args, **kwargs))
    assert torch.equal(out, FLUX.reference(m, [(2, 3)], [kept], *args, **kwargs))
    m.eval()
    tm.eval()
    with torch.no_grad():
        assert torch.equal(sample_of(tm(*args, **kwargs)), sample_of(m(*args, **kwargs)))


def test_a_name_that_is_no_container_of_blocks_is_refused_by_transform():
    pytest.importorskip("diffusers")
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            "chain='blocks' names no chain: 'blocks' holds no repeated blocks. A chain's name is the path of the "
            "container of its blocks, or the paths of consecutive containers joined by '+' when one chain runs "
            "through them (`treadfx.inspect` prints the chains). The model's repeated blocks are in: "
            "'transformer_blocks' (2 blocks), 'single_transformer_blocks' (3 blocks). Fix: pass one of those "
            "names.")):
        treadfx.transform(FLUX.build(), start=0, end=0, chain="blocks")


def test_a_part_index_out_of_range_is_refused_by_transform_counting_the_part():
    pytest.importorskip("diffusers")
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route 0 end=3 is out of range: chain='single_transformer_blocks' names 3 blocks "
            "(single_transformer_blocks.0 ... single_transformer_blocks.2), so valid indices are -3..2. Fix: choose "
            "end inside the chain")):
        treadfx.transform(FLUX.build(), start=0, end=3, chain="single_transformer_blocks")


D = 8


class _Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.n = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(self.n(x))


class _ThreeParts(nn.Module):
    """One chain through three containers: `dual` (2 blocks), `single` (3), `tail` (2)."""

    def __init__(self):
        super().__init__()
        self.e = nn.Linear(4, D)
        self.dual = nn.ModuleList([_Blk() for _ in range(2)])
        self.single = nn.ModuleList([_Blk() for _ in range(3)])
        self.tail = nn.ModuleList([_Blk() for _ in range(2)])

    def blocks(self):
        return [*self.dual, *self.single, *self.tail]

    def forward(self, x):
        h = self.e(x)
        for blk in self.blocks():
            h = blk(h)
        return h


@pytest.mark.parametrize("chain, routes, expected, merged", [
    # one part: start/end count within it, negative indices from its end
    ("single", [(0, 1)], [(0, 1, "single.0", "single.1")], [(2, 3)]),
    ("single", [(-1, -1)], [(2, 2, "single.2", "single.2")], [(4, 4)]),
    ("single", [(0, 0), (-2, -1)], [(0, 0, "single.0", "single.0"), (1, 2, "single.1", "single.2")],
     [(2, 2), (3, 4)]),
    ("tail", [(-2, 0)], [(0, 0, "tail.0", "tail.0")], [(5, 5)]),
    # consecutive parts joined by '+': counted along them only
    ("single+tail", [(2, -1)], [(2, 4, "single.2", "tail.1")], [(4, 6)]),
    # the whole chain's name (and no name): counted along all its blocks, as before
    ("dual+single+tail", [(2, 3)], [(2, 3, "single.0", "single.1")], [(2, 3)]),
    (None, [(1, -2)], [(1, 5, "dual.1", "tail.0")], [(1, 5)]),
])
def test_chain_names_a_part_and_start_end_count_within_it(chain, routes, expected, merged):
    m = _ThreeParts()
    tm = treadfx.transform(m, routes=[(s, e, 0.5) for s, e in routes], chain=chain)
    x = torch.randn(2, 16, 4)
    tm(x)
    assert _routed(tm) == expected
    kept = [torch.stack([torch.randperm(16)[:8] for _ in range(2)]) for _ in routes]
    with treadfx.fixed_routes(tm, kept):
        out = tm(x)
    # by hand: TREAD over the same blocks, indexed along the merged chain
    assert torch.equal(out, _tread_by_hand(m.e, m.blocks(), x, merged, kept))


def _tread_by_hand(e, blocks, x, spans, kept):
    """TREAD by hand over a plain chain ``h = block(h)``: per span (start, end), the kept [B, K] tokens are taken
    before block start and put back after block end."""
    h = e(x)
    saved, idx = None, None
    for i, blk in enumerate(blocks):
        for (s, _e), k in zip(spans, kept):
            if i == s:
                saved, idx = h, k[..., None].expand(-1, -1, h.shape[-1])
                h = torch.gather(h, 1, idx)
        h = blk(h)
        for (_s, e), k in zip(spans, kept):
            if i == e:
                h = saved.scatter(1, idx, h)
    return h


def test_a_name_joining_parts_the_chain_does_not_run_through_lists_the_chains_and_their_parts():
    tm = treadfx.transform(_ThreeParts(), start=0, end=0, chain="single+dual")
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            "chain='single+dual' names no chain and no part of one; the model has: 'dual+single+tail' "
            "(7 blocks: parts 'dual' (blocks 0..1), 'single' (blocks 2..4), 'tail' (blocks 5..6)). Fix: pass one "
            "of those names (a part's name routes only its blocks, and start/end count within it).")):
        tm(torch.randn(2, 16, 4))


def test_a_chain_that_is_neither_a_name_nor_an_index_is_refused_by_transform():
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            "chain=1.5 (float) must be a chain's name (str) or its index (int) as `treadfx.inspect` lists the "
            "chains. Fix: pass a name such as 'dual' (the path of the container of the blocks)")):
        treadfx.transform(_ThreeParts(), start=0, end=1, chain=1.5)


# ================================================================== start/end checked against the routed chain


def _hunyuan_image():
    pytest.importorskip("diffusers")
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    m = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4))
    g = torch.Generator().manual_seed(2)
    return m, (torch.randn(2, 4, 4, 4, generator=g),), {
        "timestep": torch.tensor([10.0, 20.0]), "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
        "encoder_attention_mask": torch.ones(2, 5)}


REFINER = "context_embedder.token_refiner.refiner_blocks"


def test_out_of_range_at_transform_names_no_index_valid_that_the_refiner_would_add():
    """6 repeated blocks in all, 2 of them the text refiner: transform() may only refuse what no chain takes, and
    says the exact range is known at the first call; the first call names the routed chain of 4 blocks and the
    refiner it does not count."""
    m, args, kwargs = _hunyuan_image()
    with pytest.raises(treadfx.InvalidRouteError) as e:
        treadfx.transform(m, start=5, end=6)
    msg = str(e.value)
    assert msg.startswith(f"route 0 end=6 is out of range: the model has 6 repeated blocks in all ({REFINER} x2, "
                          "transformer_blocks x2, single_transformer_blocks x2), the most any chain can hold, so no "
                          "index outside -6..5 is valid."), msg
    assert "valid indices are" not in msg and "known at the first call" in msg and "treadfx.inspect" in msg
    tm = treadfx.transform(m, start=4, end=5)  # in range for 6 blocks, not for the routed 4
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route 0 start=4 is out of range for the routed chain `transformer_blocks+single_transformer_blocks` "
            "(4 blocks: transformer_blocks[0..1] HunyuanImageTransformerBlock x2, then single_transformer_blocks[0..1] "
            f"HunyuanImageSingleTransformerBlock x2), so valid indices are -4..3; not routed, so not counted: "
            f"`{REFINER}` (2 blocks). Fix: choose start inside the routed chain; negative indices count from its "
            "end.")):
        tm(*args, **kwargs)


def test_the_last_component_of_a_container_path_is_answered_with_the_full_path():
    m, _args, _kwargs = _hunyuan_image()
    with pytest.raises(treadfx.AmbiguousChainError, match=re.escape(
            f"The model's repeated blocks are in: '{REFINER}' (2 blocks), 'transformer_blocks' (2 blocks), "
            f"'single_transformer_blocks' (2 blocks). Fix: pass one of those names (the full path: '{REFINER}').")):
        treadfx.transform(m, start=0, end=0, chain="refiner_blocks")


def test_transform_accepts_indices_valid_for_the_routed_chain_that_the_six_blocks_would_reverse():
    """start=-2, end=3: blocks 4 > 3 in 6 blocks, but blocks 2..3 of the routed chain of 4."""
    m, args, kwargs = _hunyuan_image()
    tm = treadfx.transform(m, start=-2, end=3, ratio=0.5)
    tm(*args, **kwargs)
    assert _routed(tm) == [
        (2, 3, "single_transformer_blocks.0", "single_transformer_blocks.1")]
    with pytest.raises(treadfx.InvalidRouteError, match=re.escape(
            "route 0: start=5 resolves to block 5, after end=-2 (block 4) in a chain of 6 blocks. Fix: start must be "
            "<= end (end is inclusive). The same holds for every shorter chain: no chain of this model holds more "
            "than 6 blocks.")):
        treadfx.transform(m, start=5, end=-2)


# ================================================================== NoBlocksFoundError: what was found, what blocks


class _Linears(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Linear(4, D)
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])

    def forward(self, x):
        h = self.e(x)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return h


class _Wrapped(nn.Module):
    """The fix the advice gives for _Linears: each layer and its residual in a small module."""

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, h):
            return h + torch.relu(self.layer(h))

    def __init__(self, src: _Linears):
        super().__init__()
        self.e = src.e
        self.layers = nn.ModuleList([self.Block(layer) for layer in src.layers])

    def forward(self, x):
        h = self.e(x)
        for blk in self.layers:
            h = blk(h)
        return h


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Linear(4, D)
        self.blk = _Blk()

    def forward(self, x):
        h = self.e(x)
        for _ in range(4):
            h = self.blk(h)
        return h


class _Step(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h):
        return self.block(h)


class _Shared(nn.Module):
    """The fix the advice gives for _Reused: one thin wrapper per step around the shared block."""

    def __init__(self, src: _Reused):
        super().__init__()
        self.e = src.e
        self.blk = src.blk
        self.steps = nn.ModuleList([_Step(self.blk) for _ in range(4)])

    def forward(self, x):
        h = self.e(x)
        for step in self.steps:
            h = step(h)
        return h


class _Attrs(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Linear(4, D)
        self.b0, self.b1, self.b2 = _Blk(), _Blk(), _Blk()

    def forward(self, x):
        h = self.e(x)
        for b in (self.b0, self.b1, self.b2):
            h = b(h)
        return h


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Linear(4, D)
        self.blocks = nn.ModuleList([_Blk()])

    def forward(self, x):
        return self.blocks[0](self.e(x))


def _no_blocks(model) -> str:
    with pytest.raises(treadfx.NoBlocksFoundError) as e:
        treadfx.transform(model, start=1, end=2)
    return str(e.value)


def test_a_list_of_plain_layers_is_named_and_the_advised_wrapping_routes():
    msg = _no_blocks(_Linears())
    assert msg.startswith("_Linears has no repeated blocks: `layers` (ModuleList) holds 4 `Linear` layers, but a "
                          "layer without submodules is not a block."), msg
    assert "no ModuleList/Sequential holds" not in msg
    assert "Fix: wrap each layer and its residual in a small nn.Module" in msg
    src = _Linears()
    tm = treadfx.transform(_Wrapped(src), start=1, end=2, ratio=0.5)
    x = torch.randn(2, 16, 4)
    kept = torch.stack([torch.randperm(16)[:8] for _ in range(2)])
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(x)
    steps = [lambda h, layer=layer: h + torch.relu(layer(h)) for layer in src.layers]
    assert torch.equal(out, _tread_by_hand(src.e, steps, x, [(1, 2)], [kept]))


def test_one_block_applied_in_a_loop_is_named_as_weight_sharing_and_the_advised_wrappers_route():
    msg = _no_blocks(_Reused())
    assert msg.startswith("_Reused has no repeated blocks: forward applies one block, `blk` (_Blk), in a loop "
                          "(`for _ in range(4):`): weight-shared repetition."), msg
    assert "self.steps = nn.ModuleList([Step(self.blk) for _ in range(n)])" in msg
    src = _Reused()
    tm = treadfx.transform(_Shared(src), start=1, end=2, ratio=0.5)
    x = torch.randn(2, 16, 4)
    kept = torch.stack([torch.randperm(16)[:8] for _ in range(2)])
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(x)
    assert torch.equal(out, _tread_by_hand(src.e, [src.blk] * 4, x, [(1, 2)], [kept]))


def test_blocks_held_as_attributes_and_a_single_block_get_their_own_advice():
    msg = _no_blocks(_Attrs())
    assert msg.startswith("_Attrs has no repeated blocks in a container: 3 `_Blk` modules are held as separate "
                          "attributes (`b0`, `b1`, `b2`)"), msg
    assert "Fix: keep them in one (`self.blocks = nn.ModuleList([...])`)" in msg
    msg = _no_blocks(_One())
    assert msg.startswith("_One has no repeated blocks: `blocks` (ModuleList) holds a single block (`_Blk`), and a "
                          "chain needs two or more blocks"), msg
