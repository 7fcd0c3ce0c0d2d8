"""What the pass decides on each backbone of issue 3, as ``treadfx.inspect`` reports it.

The expectations are written from the architectures (which tensor is the
image stream, which are side inputs, skips, text streams, extra tokens), not
from treadfx's output: a wrong routing decision fails here even when the
numbers happen to line up.
"""

from __future__ import annotations

import collections
import functools
import re

import pytest
import torch
import torch.nn as nn

import treadfx

from backbone_refs import CASES, build_case, kept_for, sample_of

# per case: selection, order, stream layout, and per route the multiset of (action, role) decisions
G, P, S, K = "gather", "pass", "scatter", "keep"
EXPECTED = {
    # RoPE tables [N, d] have no batch dim: one subset for the batch; t/y conditioning passes through
    "sit_rope_grid": ("shared", "random", "[image 16]",
                      [{(G, "token stream"): 1, (P, "conditioning"): 1, (G, "side input"): 2, (S, "token stream"): 1}]),
    # per-sample positions give batched tables [B, N, d]: per-sample selection is possible
    "sit_rope_pos": ("per_sample", "random", "[image 16]",
                     [{(G, "token stream"): 1, (P, "conditioning"): 1, (G, "side input"): 2, (S, "token stream"): 1}]),
    # per-token timesteps: the modulation [B, N, D] is a side input to gather, not conditioning
    "sit_rope_per_token_t": ("shared", "random", "[image 16]",
                             [{(G, "token stream"): 1, (G, "side input"): 3, (S, "token stream"): 1}]),
    "sit_rope_grid_per_sample": ("per_sample", "random", "[image 16]",
                                 [{(G, "token stream"): 1, (P, "conditioning"): 1, (G, "side input"): 2,
                                   (S, "token stream"): 1}]),
    # route 0 = blocks 1..2 (in_blocks.1, in_blocks.2): the skip made by in_blocks.1 is consumed after the route,
    # so it is scattered; route 1 = blocks 4..5 (out_blocks.0, .1) consumes skips of in_blocks.2 and .1: gathered
    "uvit_two_routes": ("per_sample", "random", "[extra 2 | image 16]",
                        [{(G, "token stream"): 1, (S, "skip connection"): 1, (S, "token stream"): 1,
                          (K, "extra tokens"): 1},
                         {(G, "token stream"): 1, (G, "skip connection"): 2, (S, "token stream"): 1,
                          (K, "extra tokens"): 1}]),
    # a route over in_blocks.0..2 + mid: all three skips are produced inside and consumed after
    "uvit_uncond_skips_out": ("per_sample", "random", "[extra 1 | image 16]",
                              [{(G, "token stream"): 1, (S, "skip connection"): 3, (S, "token stream"): 1,
                                (K, "extra tokens"): 1}]),
    # the scan is order dependent: kept tokens keep their relative order
    "ssm": ("per_sample", "sorted", "[image 16]",
            [{(G, "token stream"): 1, (P, "conditioning"): 1, (S, "token stream"): 1}]),
    "vit_sequential_registers": ("per_sample", "random", "[extra 4 | image 16]",
                                 [{(G, "token stream"): 1, (S, "token stream"): 1, (K, "extra tokens"): 1}]),
    "vit_list_back_registers": ("per_sample", "random", "[extra 1 | image 16 | extra 3]",
                                [{(G, "token stream"): 1, (S, "token stream"): 1, (K, "extra tokens"): 2}]),
    "diffusers_dit": ("per_sample", "random", "[image 16]",
                      [{(G, "token stream"): 1, (P, "conditioning"): 2, (S, "token stream"): 1}]),
    # cross-attention: the text stays whole
    "diffusers_pixart": ("per_sample", "random", "[image 16]",
                         [{(G, "token stream"): 1, (P, "text stream"): 1, (P, "conditioning"): 1,
                           (S, "token stream"): 1}]),
    # joint blocks: the text stream goes in and out of the route untouched
    "diffusers_sd3": ("per_sample", "random", "[image 16]",
                      [{(G, "token stream"): 1, (P, "text stream"): 2, (P, "conditioning"): 1,
                        (S, "token stream"): 1}]),
    "diffusers_sd3_text_len_eq_tokens": ("per_sample", "random", "[image 16]",
                                         [{(G, "token stream"): 1, (P, "text stream"): 2, (P, "conditioning"): 1,
                                           (S, "token stream"): 1}]),
    # RoPE (cos, sin) [T + N, d] without batch dim: image rows gathered, text rows kept; shared selection
    "diffusers_flux": ("shared", "random", "[image 16]",
                       [{(G, "token stream"): 1, (P, "text stream"): 2, (P, "conditioning"): 1,
                         (G, "side input"): 2, (S, "token stream"): 1}]),
    # the registers + text stream goes through the joint block untouched; the route ends in a single block,
    # whose output is [registers | text | image]: its image part is scattered
    "diffusers_auraflow": ("per_sample", "random", "[image 16]",
                           [{(G, "token stream"): 1, (P, "text stream"): 1, (P, "conditioning"): 1,
                             (S, "token stream"): 1}]),
    # RoPE over image tokens only, no batch dim: shared selection; the text stream goes in and out untouched
    "diffusers_cogview4": ("shared", "random", "[image 16]",
                           [{(G, "token stream"): 1, (P, "text stream"): 2, (P, "conditioning"): 1,
                             (G, "side input"): 2, (S, "token stream"): 1}]),
    # route 0 (blocks 1..2) makes the skip block 4 consumes: scattered; route 1 (blocks 4..5) consumes the skips
    # of blocks 1 and 0: gathered. Text (CLIP + T5 concatenated) passes; RoPE [N, d] is gathered in both routes
    "diffusers_hunyuan_skips": ("shared", "random", "[image 16]",
                                [{(G, "token stream"): 1, (P, "text stream"): 1, (P, "conditioning"): 1,
                                  (G, "side input"): 2, (S, "skip connection"): 1, (S, "token stream"): 1},
                                 {(G, "token stream"): 1, (P, "text stream"): 1, (P, "conditioning"): 1,
                                  (G, "side input"): 2, (G, "skip connection"): 2, (S, "token stream"): 1}]),
}


@functools.cache
def report(case_id: str):
    _m, tm, args, kwargs = build_case(CASES[case_id])
    return treadfx.inspect(tm, *args, **kwargs)


def test_every_case_has_expectations():
    assert set(EXPECTED) == set(CASES)


@pytest.mark.parametrize("case_id", list(EXPECTED))
def test_inspect_lists_what_each_route_gathers_scatters_and_passes(case_id):
    selection, order, layout, per_route = EXPECTED[case_id]
    r = report(case_id)
    assert r.stream_layout == layout
    assert len(r.routes) == len(per_route)
    for route, expected in zip(r.routes, per_route):
        assert route.selection == selection
        assert route.order == order
        got = collections.Counter((t.action, t.role) for t in route.tensors)
        assert dict(got) == expected
        assert all(t.reason for t in route.tensors)  # every decision says why
        text = str(r)
        for t in route.tensors:
            assert f"{t.action:<7} {t.name}: {t.role}" in text


def test_flux_rope_decision_keeps_text_rows():
    r = report("diffusers_flux")
    rope = [t for t in r.routes[0].tensors if t.role == "side input"]
    # [T + N, d] tables: the 5 text rows lead and are never routed; the 16 image rows are gathered on axis 0
    assert [(t.layout, t.axis) for t in rope] == [("[text 5 | image 16]", 0)] * 2


def test_ambiguous_streams_follow_the_documented_rule_and_the_override():
    """SD3 with text length == image tokens: two [B, 16, D] streams. Rule: the stream of the image input.

    ``stream=`` names the forward argument to route instead.
    """
    r = report("diffusers_sd3_text_len_eq_tokens")
    assert r.stream_input == "hidden_states"
    _m, tm, args, kwargs = build_case(CASES["diffusers_sd3_text_len_eq_tokens"], stream="encoder_hidden_states")
    r2 = treadfx.inspect(tm, *args, **kwargs)
    assert r2.stream_input == "encoder_hidden_states"
    gathered = [t.name for t in r2.routes[0].tensors if t.action == "gather"]
    # joint blocks return (text, image): the override routes output [0]
    assert gathered == ["output of `transformer_blocks.0`[0]"]


def test_negative_control_without_rope_gather_fails():
    """The classic hand-written bug (RoPE rows not gathered) cannot even run the routed blocks.

    treadfx's output equals the reference that gathers them.
    """
    case = CASES["diffusers_flux"]
    m, tm, args, kwargs = build_case(case)
    r = report("diffusers_flux")
    kept = [kept_for(route, seed=3) for route in r.routes]
    tm.train()
    with treadfx.fixed_routes(tm, kept):
        out = sample_of(tm(*args, **kwargs))
    good = case.reference(m, case.spans, kept, *args, **kwargs)
    assert torch.equal(out, good)
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):
        case.reference(m, case.spans, kept, *args, gather_side=False, **kwargs)


class _PosBlock(nn.Module):
    """A block that adds its own learned [N, D] table: it only runs at the full token count."""

    def __init__(self, n, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n, d))
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x + self.pos)


class _PosNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.blocks = nn.ModuleList([_PosBlock(16, 8) for _ in range(4)])

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return h


def test_unsupported_pattern_names_the_block_and_the_tensor():
    tm = treadfx.transform(_PosNet(), start=1, end=2)
    with pytest.raises(treadfx.UnroutableRegionError) as e:
        tm(torch.randn(2, 16, 3))
    msg = str(e.value)
    assert msg.startswith("route 0 (chain blocks 1..2): block `blocks.1` cannot run on the kept tokens (15 of 16 in "
                          "the probe); the problem is the block's own parameter `blocks.1.pos` [16, 8]: it is a "
                          "per-token table inside the block")
    assert "Inputs: output of `blocks.0`=[2, 16, 8]. Error (in `add` at test_backbone_decisions.py:" in msg
    assert re.search(r"torch.Size\(\[16, 8\]\)", msg)
    assert msg.endswith("Fix: pass it as an input to the block (treadfx then gathers it with the kept tokens) or end "
                        "the route before this block.")
    # and in eval the model still runs as the original
    tm.eval()
    assert tm(torch.randn(2, 16, 3)).shape == (2, 16, 8)


def test_sana_random_selection_is_refused_naming_the_operation_and_structured_selection():
    """Sana's Mix-FFN folds the tokens back into the H x W grid for a depthwise conv: a random subset cannot run
    there, so an explicit random selection is refused naming the operation and the structured selection that works
    (the default, 'auto', picks it: tests/test_structured.py)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                               num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8,
                               cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=1)
    tm = treadfx.transform(m, start=1, end=1, ratio=0.5, selection="per_sample")
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.tensor([10.0, 20.0])
    with pytest.raises(treadfx.UnroutableRegionError) as e:
        tm(x, encoder_hidden_states=text, timestep=t)
    msg = str(e.value)
    assert msg.startswith("route 0 (chain blocks 1..1): block `transformer_blocks.1` cannot run on the kept tokens "
                          "(63 of 64 in the probe). Inputs: output of `transformer_blocks.0`=[2, 64, 16]")
    assert "unflatten: Provided sizes [8, 8] don't multiply up to the size of dim 1 (63)" in msg
    assert "Fix: use selection='structured' (or 'auto')" in msg and "0.5 (1/2: 2x1 cells)" in msg
    tm.eval()
    m.eval()
    with torch.no_grad():  # the refused model is still the original in eval
        assert torch.equal(tm(x, encoder_hidden_states=text, timestep=t).sample,
                           m(x, encoder_hidden_states=text, timestep=t).sample)


def test_lumina2_chains_are_named_and_the_model_is_left_unchanged():
    """Lumina2's caption-length `.tolist()` runs live, so the forward traces; of its three chains the joint `layers`
    is routed (the noise refiner feeds it, the context refiner carries text), see tests/test_lumina2.py."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    m = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
                                  num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                  cap_feat_dim=12, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tm = treadfx.transform(m, start=1, end=1, ratio=0.5)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.rand(2),
                  encoder_hidden_states=torch.randn(2, 5, 12), encoder_attention_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.warns(UserWarning, match="rope_embedder"):
        tm(**inputs)
    prog = treadfx.transformed.state_of(tm).current
    chains = {c.name: c for c in prog.chains}
    assert prog.chain.name == "layers" and set(chains) == {"layers", "noise_refiner", "context_refiner"}
    assert chains["noise_refiner"].note.startswith("not routed: a refiner")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the model is left as it was


def test_wan_vace_routes_wan_blocks_by_default_and_refuses_the_vace_side_branch():
    """WanVACE: `vace_blocks` compute control hints from the image tokens that are added into Wan's `blocks` after
    blocks 0 and 2; `blocks` carries the image tokens to the output, so it is the default chain (the same route as
    chain='blocks'), inspect says the VACE chain is a side branch, and naming it is refused: a skipped token has no
    identity value in a hint, so routing the branch would add wrong hints."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    m = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32, vace_layers=[0, 2],
        vace_in_channels=6)
    g = torch.Generator().manual_seed(6)
    kw = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([10.0, 20.0]),
              encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
              control_hidden_states=torch.randn(2, 6, 2, 8, 8, generator=g))
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    torch.manual_seed(3)
    out = tm(**kw).sample
    prog = treadfx.transformed.state_of(tm).current
    chains = {c.name: c for c in prog.chains}
    assert prog.chain.name == "blocks" and set(chains) == {"blocks", "vace_blocks"}
    note = chains["vace_blocks"].note
    assert note.startswith("not routed: a side branch") and "`blocks.1`, `blocks.3`" in note, note
    named = treadfx.transform(m, start=1, end=-2, ratio=0.5, chain="blocks")
    torch.manual_seed(3)
    assert torch.equal(named(**kw).sample, out)  # the default is chain='blocks', same kept tokens
    with pytest.raises(treadfx.InvalidRouteError) as e:
        treadfx.transform(m, start=0, end=0, ratio=0.5, chain="vace_blocks")(**kw)
    msg = str(e.value)
    assert msg.startswith("chain='vace_blocks' selects `vace_blocks`, a side branch") and \
        "Fix: route `blocks` (the default, or chain='blocks')" in msg, msg
