"""Today's diffusers zoo (issue 15): chain selection, error advice that fits, eval after training, video.

* A short chain that only prepares a side input (HunyuanVideo/HunyuanImage's text token refiner,
  HiDream's caption projections) is found linked to the image blocks; it is neither routed nor counted
  in route indices, and ``inspect`` says why (a hand-written model with the same structure, checked
  against a hand-written hook reference, and the diffusers models).
* ``NoBlocksFoundError`` says what the blocks receive and gives only the advice that applies.
* Each zoo model (tiny random diffusers configs: Qwen-Image, HiDream, Wan, WanVACE, SkyReels-V2, CogVideoX
  with and without RoPE, ConsisID, LTX-Video, HunyuanVideo, HunyuanImage, Flux2, Chroma, CogView3Plus, Sana,
  Sana-Video, Lumina2): ``inspect`` names the routed chain, the stream layout, the selection and what the route
  gathers, passes and scatters (expected values written from each architecture); then
  ``transform(start=1, end=-2, ratio=0.5)``, a warm-up call, one training step, eval equal to the original
  bit for bit, and fewer FLOPs than dense, as ``inspect`` predicts.
* Video (Wan): single-frame inputs, frame counts and resolutions that change between batches (one
  trace per input signature, none per step), and the 3D RoPE table gathered with the kept indices
  (equal to a forward-hook reference).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx

from backbone_refs import kept_for, put, routed_by_hooks, sample_of, take
from helpers import TracesSince, tiny_lumina2

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


# ============================================================ the diffusers zoo, tiny random configs
def _randomize_zero_linears(m: nn.Module) -> nn.Module:
    """diffusers zero-initialises some output layers; make every layer matter."""
    g = _gen(123)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear) and not mod.weight.any():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.05)
    return m


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4)))


def _qwen_image_inputs(h=4, w=4):
    g = _gen(3)
    return (torch.randn(B, h * w, 16, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 16, generator=g), "encoder_hidden_states_mask": torch.ones(B, 5),
        "timestep": torch.tensor([0.1, 0.2]), "img_shapes": [(1, h, w)] * B}


def _hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    # no routed experts: the MoE feed-forward's training path indexes tokens by expert (data-dependent shapes)
    return _randomize_zero_linears(HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=0,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1, 0, 1)))


def _hidream_inputs():
    g = _gen(4)
    return (torch.randn(B, 4, 8, 8, generator=g),), {
        "timesteps": torch.tensor([10.0, 20.0]), "encoder_hidden_states_t5": torch.randn(B, 5, 8, generator=g),
        "encoder_hidden_states_llama3": torch.randn(2, B, 5, 4, generator=g),
        "pooled_embeds": torch.randn(B, 8, generator=g)}


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32))


def _wan_inputs(frames=2, h=8, w=8, seed=5):
    g = _gen(seed)
    return (torch.randn(B, 4, frames, h, w, generator=g),), {
        "timestep": torch.tensor([10.0, 20.0]), "encoder_hidden_states": torch.randn(B, 5, 16, generator=g)}


def _hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)))


def _hunyuan_video_inputs():
    g = _gen(1)
    return (torch.randn(B, 4, 2, 4, 4, generator=g),), {
        "timestep": torch.tensor([10.0, 20.0]), "encoder_hidden_states": torch.randn(B, 5, 16, generator=g),
        "encoder_attention_mask": torch.ones(B, 5), "pooled_projections": torch.randn(B, 8, generator=g),
        "guidance": torch.tensor([3.0, 3.0])}


def _hunyuan_image():
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4)))


def _hunyuan_image_inputs():
    g = _gen(2)
    return (torch.randn(B, 4, 4, 4, generator=g),), {
        "timestep": torch.tensor([10.0, 20.0]), "encoder_hidden_states": torch.randn(B, 5, 16, generator=g),
        "encoder_attention_mask": torch.ones(B, 5)}


def _wan_vace():
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32, vace_layers=[0, 2],
        vace_in_channels=6))


def _wan_vace_inputs():
    g = _gen(6)
    return (torch.randn(B, 4, 2, 8, 8, generator=g),), {
        "timestep": torch.tensor([10.0, 20.0]), "encoder_hidden_states": torch.randn(B, 5, 16, generator=g),
        "control_hidden_states": torch.randn(B, 6, 2, 8, 8, generator=g)}


def _skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=32))


def _cogvideox(rope: bool = False, cls: str = "CogVideoXTransformer3DModel"):
    import diffusers

    torch.manual_seed(0)
    extra = {"use_rotary_positional_embeddings": rope} if cls == "CogVideoXTransformer3DModel" else {}
    return _randomize_zero_linears(getattr(diffusers, cls)(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=4, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=5, **extra))


def _cogvideox_inputs(rope: bool = False):
    g = _gen(7)
    kwargs = {"encoder_hidden_states": torch.randn(B, 5, 16, generator=g), "timestep": torch.tensor([10, 20])}
    if rope:  # the pipeline passes the 3D RoPE (cos, sin) tables, [F*H*W, head_dim] (2 frames of 4x4 tokens)
        kwargs["image_rotary_emb"] = (torch.randn(2 * 4 * 4, 8, generator=g), torch.randn(2 * 4 * 4, 8, generator=g))
    return (torch.randn(B, 2, 4, 8, 8, generator=g),), kwargs


def _ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=4, caption_channels=12))


def _ltx_video_inputs():
    g = _gen(8)  # packed latents: 2 frames of 4x4 tokens
    return (torch.randn(B, 2 * 4 * 4, 4, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 12, generator=g), "timestep": torch.tensor([10, 20]),
        "encoder_attention_mask": torch.ones(B, 5), "num_frames": 2, "height": 4, "width": 4}


def _flux_ids(axes: int, h: int = 4, w: int = 4) -> torch.Tensor:
    ids = torch.zeros(h * w, axes)
    ids[:, -2] = torch.arange(h).repeat_interleave(w).float()
    ids[:, -1] = torch.arange(w).repeat(h).float()
    return ids


def _flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)))


def _flux2_inputs():
    g = _gen(10)
    return (torch.randn(B, 16, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 12, generator=g), "timestep": torch.tensor([0.1, 0.2]),
        "img_ids": _flux_ids(4), "txt_ids": torch.zeros(5, 4), "guidance": torch.tensor([3.0, 3.0])}


def _chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(ChromaTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1))


def _chroma_inputs():
    g = _gen(11)
    return (torch.randn(B, 16, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 12, generator=g), "timestep": torch.tensor([0.1, 0.2]),
        "img_ids": _flux_ids(3), "txt_ids": torch.zeros(5, 3)}


def _cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=12, time_embed_dim=8, condition_dim=4, pos_embed_max_size=8, sample_size=8))


def _cogview3plus_inputs():
    g = _gen(12)
    return (torch.randn(B, 4, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 12, generator=g), "timestep": torch.tensor([10, 20]),
        "original_size": torch.tensor([[64.0, 64.0]] * B), "target_size": torch.tensor([[64.0, 64.0]] * B),
        "crop_coords": torch.zeros(B, 2)}


def _sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8, patch_size=1))


def _sana_inputs():
    g = _gen(14)
    return (torch.randn(B, 4, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 8, generator=g), "timestep": torch.tensor([10.0, 20.0])}


def _sana_video():
    from diffusers import SanaVideoTransformer3DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=8,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32))


def _sana_video_inputs():
    g = _gen(15)
    return (torch.randn(B, 4, 2, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 8, generator=g), "timestep": torch.tensor([10.0, 20.0])}


def _lumina2():
    return _randomize_zero_linears(tiny_lumina2(layers=4, kv_heads=2, cap_feat_dim=12, axes_lens=(32, 32, 32)))


def _lumina2_inputs():
    g = _gen(16)
    return (torch.randn(B, 4, 8, 8, generator=g),), {
        "timestep": torch.rand(B, generator=g), "encoder_hidden_states": torch.randn(B, 5, 12, generator=g),
        "encoder_attention_mask": torch.ones(B, 5, dtype=torch.bool)}


@dataclasses.dataclass(frozen=True)
class Zoo:
    """A zoo model with example inputs, and what ``inspect`` must report for ``transform(start=1, end=-2,
    ratio=0.5, **options)``, written from the architecture: the routed chain and its length, the token stream's
    layout, the selection, and the route's decisions as a multiset of (action, role)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    chain: str
    length: int
    layout: str
    selection: str
    decisions: dict
    options: dict = dataclasses.field(default_factory=dict)


JOINT = "transformer_blocks+single_transformer_blocks"
G, P, S = "gather", "pass", "scatter"
TOK, TXT, SIDE, COND = (G, "token stream"), (P, "text stream"), (G, "side input"), (P, "conditioning")
OUT = (S, "token stream")
MOD, TMASK = (P, "modulation"), (P, "text mask")
# What each route must gather, pass and scatter, read off each architecture (route = blocks 1..2 of 4; the stream
# holds image tokens only, so nothing is kept whole in it; N = 2 frames x 4 x 4 or 4 x 4 or 8 x 8 tokens).
# Modulation tensors shaped [B, k, D] (k chunks of the conditioning, made by reshaping a per-sample vector: the
# k axis is no token axis) are passed whole as "modulation"; masks over the text tokens pass as "text mask"; a
# "text stream" is a sequence of text tokens (the blocks' cross-attention context, or a stream they update).
WAN_LIKE = {TOK: 1,  # the block input; the text [B, 5, D] (cross-attention context) passes
            TXT: 1, MOD: 1,  # timestep_proj [B, 6, D]: the six shift/scale/gate chunks of the time embedding
            SIDE: 2, OUT: 1}  # the 3D RoPE (cos, sin) [1, N, 1, d] rows are gathered
COGVIDEO_LIKE = {TOK: 1, TXT: 2, COND: 1, OUT: 1}  # (hidden, text) in and out, temb; positions added before
HUNYUAN_LIKE = {TOK: 1, TXT: 2, COND: 1, OUT: 1,
                SIDE: 3}  # the joint mask [B, 1, 1, N + T] (image part) and RoPE (cos, sin) [N, d]
ZOO = {
    # joint blocks (text, image) out; image RoPE [N, d/2] complex gathered, the text rows (a slice of a buffer) pass;
    # temb passes (conditioning), and so does the [B, T] text padding mask (a text mask)
    "qwen_image": Zoo(_qwen_image, _qwen_image_inputs, "transformer_blocks", 4, "[image 16]", "shared",
                      {TOK: 1, TXT: 2, COND: 1, TMASK: 1, SIDE: 1, (P, "constant"): 1, OUT: 1}),
    # double.1 gets [t5 | llama] + its llama layer (text 15), single.0 its llama layer (text 5); the joint RoPE
    # over [image | text] is gathered on its image part; the single block's output [image | text 15] is scattered
    "hidream": Zoo(_hidream, _hidream_inputs, "double_stream_blocks+single_stream_blocks", 4, "[image 16]", "shared",
                   {TOK: 1, TXT: 2, COND: 1, SIDE: 1, OUT: 1}),
    "wan": Zoo(_wan, _wan_inputs, "blocks", 4, "[image 32]", "shared", WAN_LIKE),
    # the VACE hints are added after blocks 0 and 2, outside the route: the route is Wan's (the stream is the sum)
    "wan_vace": Zoo(_wan_vace, _wan_vace_inputs, "blocks", 4, "[image 32]", "shared", WAN_LIKE,
                    options={"chain": "blocks"}),
    "skyreels_v2": Zoo(_skyreels_v2, lambda: _wan_inputs(seed=9), "blocks", 4, "[image 32]", "shared", WAN_LIKE),
    "cogvideox": Zoo(_cogvideox, _cogvideox_inputs, "transformer_blocks", 4, "[image 32]", "per_sample",
                     COGVIDEO_LIKE),
    # the pipeline's RoPE (cos, sin) [N, d] tables: no batch dim, so one subset serves the batch
    "cogvideox_rope": Zoo(lambda: _cogvideox(rope=True), lambda: _cogvideox_inputs(rope=True), "transformer_blocks",
                          4, "[image 32]", "shared", {**COGVIDEO_LIKE, SIDE: 2}),
    "consisid": Zoo(lambda: _cogvideox(cls="ConsisIDTransformer3DModel"), _cogvideox_inputs, "transformer_blocks", 4,
                    "[image 32]", "per_sample", COGVIDEO_LIKE),
    # the text [B, T, D] (cross-attention context), temb [B, 1, 6D] (modulation) and the text mask bias [B, 1, T]
    # pass; RoPE (cos, sin) [1, N, d] gathered
    "ltx_video": Zoo(_ltx_video, _ltx_video_inputs, "transformer_blocks", 4, "[image 32]", "shared",
                     {TOK: 1, TXT: 1, MOD: 1, TMASK: 1, SIDE: 2, OUT: 1}),
    "hunyuan_video": Zoo(_hunyuan_video, _hunyuan_video_inputs, JOINT, 4, "[image 32]", "shared", HUNYUAN_LIKE),
    "hunyuan_image": Zoo(_hunyuan_image, _hunyuan_image_inputs, JOINT, 4, "[image 16]", "shared", HUNYUAN_LIKE),
    # double blocks (text, image) out, image and text modulations, then [text | image] in the single block with its
    # own modulation; RoPE (cos, sin) [T + N, d] gathered on the image rows; single.0's [text | image] scattered
    "flux2": Zoo(_flux2, _flux2_inputs, JOINT, 4, "[image 16]", "shared",
                 {TOK: 1, TXT: 1, COND: 3, SIDE: 2, OUT: 1}),
    # as Flux, with Chroma's per-block slices of one modulation table: [B, 12, D] for double.1, [B, 3, D] for
    # single.0 (both modulation)
    "chroma": Zoo(_chroma, _chroma_inputs, JOINT, 4, "[image 16]", "shared",
                  {TOK: 1, TXT: 1, MOD: 2, SIDE: 2, OUT: 1}),
    "cogview3plus": Zoo(_cogview3plus, _cogview3plus_inputs, "transformer_blocks", 4, "[image 16]", "per_sample",
                        COGVIDEO_LIKE),
    # structured selection (2x1 cells): the grid sizes are ints rewritten for the routed blocks, not tensors
    "sana": Zoo(_sana, _sana_inputs, "transformer_blocks", 4, "[image 64]", "per_sample",
                {TOK: 1, TXT: 1, COND: 1, OUT: 1}),
    # + the RoPE (cos, sin) rows of the sub-grid; timestep [B, 1, 6D] passes (modulation)
    "sana_video": Zoo(_sana_video, _sana_video_inputs, "transformer_blocks", 4, "[image 32]", "per_sample",
                      {TOK: 1, TXT: 1, MOD: 1, SIDE: 2, OUT: 1}),
    # the joint [caption | image] sequence per sample: the image tokens at each sample's offset are routed, the
    # caption kept; the batched RoPE [B, 5 + 16, d/2] is gathered at the same joint positions; temb passes; the
    # joint attention mask is None (every caption has the same length); the refiners are not routed
    "lumina2": Zoo(_lumina2, _lumina2_inputs, "layers", 4, "[image 16]", "per_sample",
                   {TOK: 1, (G, "per-token input"): 1, COND: 1, OUT: 1}),
}
N_TOKENS = {"qwen_image": 16, "hidream": 16, "hunyuan_image": 16, "flux2": 16, "chroma": 16, "cogview3plus": 16,
            "sana": 64, "lumina2": 16}  # the others: 2 frames of 4 x 4 tokens


@functools.cache
def zoo_case(name: str):
    """``(model, transform, args, kwargs, inspect report)`` of a zoo model, built once per test process: the model
    after a dense validation call (which fills diffusers' lru-cached RoPE helpers), a fresh transform, and its
    report taken before any routed call."""
    z = ZOO[name]
    m = z.build()
    args, kwargs = z.inputs()
    m.eval()
    with torch.no_grad():
        sample_of(m(*args, **kwargs))
    m.train()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5, **z.options)
    return m, tm, args, kwargs, treadfx.inspect(tm, *args, **kwargs)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_inspect_lists_what_is_routed_then_training_routes_and_eval_is_the_original(name):
    """One test per model (each model is built and inspected once, on whichever xdist worker runs it)."""
    z = ZOO[name]
    m, tm, args, kwargs, r = zoo_case(name)
    # inspect: what is routed (chain, blocks, tokens kept), gathered, passed and scattered
    assert [(c.name, c.length) for c in r.chains if c.selected] == [(z.chain, z.length)]
    assert r.stream_layout == z.layout
    (route,) = r.routes
    n = N_TOKENS.get(name, 32)
    assert (route.start, route.end, route.num_tokens, route.num_keep) == (1, z.length - 2, n, n // 2)
    assert route.selection == z.selection
    assert dict(collections.Counter((t.action, t.role) for t in route.tensors)) == z.decisions
    assert all(t.reason for t in route.tensors)  # every decision says why
    text = str(r)
    for t in route.tensors:
        assert f"{t.action:<7} {t.name}: {t.role}" in text
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops

    # training routes (a warm-up call, then one SGD step), and eval is the original model bit for bit
    sample_of(tm(*args, **kwargs))  # warm-up
    with torch.no_grad():
        dense_train = sample_of(m(*args, **kwargs))  # the original forward in training mode (HiDream's differs)
    opt = torch.optim.SGD([p for p in tm.parameters() if p.requires_grad], lr=0.1)
    routed = sample_of(tm(*args, **kwargs))
    assert [rec.kept.shape[-1] for rec in treadfx.last_routes(tm)] == [route.num_keep]
    assert not torch.allclose(routed.detach(), dense_train, atol=1e-4)  # training really routed
    routed.square().mean().backward()
    opt.step()

    tm.eval()
    m.eval()
    try:
        with torch.no_grad():
            dense = sample_of(m(*args, **kwargs))  # the original forward, trained weights (shared parameters)
            out = sample_of(tm(*args, **kwargs))
        assert torch.equal(out, dense)
    finally:
        tm.train()
        m.train()


# ============================================================ video: Wan, 3D RoPE, F = 1, changing signatures
def _wan_by_hooks(m, kept: torch.Tensor, args, kwargs, start: int = 1, end: int = 2) -> torch.Tensor:
    """TREAD by hand on Wan's own forward: before block ``start`` the image stream is replaced by its kept
    tokens; every routed block gets the rows ``kept`` of the 3D RoPE tables (cos, sin: ``[1, F*H*W, 1, d]``,
    the 4th positional argument); after block ``end`` the kept tokens go back into the saved stream."""
    blocks, saved = list(m.blocks), {}

    def rows(table):
        return table[:, kept] if kept.ndim == 1 else table[0][kept]

    def route_out(mod, a):
        saved["h"] = a[0]
        return (take(a[0], kept),) + tuple(a[1:])

    def rope_rows(mod, a):
        return tuple(a[:3]) + (tuple(rows(t) for t in a[3]),) + tuple(a[4:])

    def route_in(mod, a, out):
        return put(saved["h"], out, kept)

    handles = [blocks[start].register_forward_pre_hook(route_out)]
    handles += [b.register_forward_pre_hook(rope_rows) for b in blocks[start: end + 1]]
    handles.append(blocks[end].register_forward_hook(route_in))
    try:
        return sample_of(m(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("frames", [1, 2], ids=["single_frame", "two_frames"])
def test_wan_3d_rope_is_gathered_like_a_hook_reference_and_eval_is_the_original(frames):
    m, tm, _args, _kwargs, r = zoo_case("wan")  # the shared Wan; its report is of the two-frame inputs
    args, kwargs = _wan_inputs(frames=frames)
    if frames != 2:
        r = treadfx.inspect(tm, *args, **kwargs)
    assert r.routes[0].num_tokens == frames * 4 * 4
    kept = kept_for(r.routes[0], seed=7 + frames)
    with treadfx.fixed_routes(tm, [kept]):
        out = sample_of(tm(*args, **kwargs))
    ref = _wan_by_hooks(m, kept, args, kwargs)
    assert torch.equal(out, ref)
    tm.eval()
    m.eval()
    try:
        with torch.no_grad():
            assert torch.equal(sample_of(tm(*args, **kwargs)), sample_of(m(*args, **kwargs)))
    finally:
        tm.train()
        m.train()


@pytest.fixture
def trace_count():
    """How many times a model was traced (every new input signature starts with one trace)."""
    return TracesSince()


def test_wan_frame_count_and_resolution_changing_between_batches_trace_once_per_signature(trace_count):
    m = _wan()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    shapes = [(2, 8, 8), (3, 8, 12), (1, 8, 8), (2, 8, 8), (3, 8, 12), (1, 8, 8), (2, 8, 8)]
    traced = []
    for step, (f, h, w) in enumerate(shapes):
        before = trace_count[0]
        args, kwargs = _wan_inputs(frames=f, h=h, w=w, seed=step)
        out = sample_of(tm(*args, **kwargs))
        traced.append(trace_count[0] > before)
        assert out.shape == args[0].shape
        n = f * (h // 2) * (w // 2)
        assert [(rec.num_tokens, rec.kept.shape[-1]) for rec in treadfx.last_routes(tm)] == [(n, n // 2)]
    # traced on the first batch of each (frames, height, width) signature only, never again per step
    assert traced == [True, True, True, False, False, False, False]


# ============================================================ inspect's FLOP count: the backward derived, not run
class FlopMix(nn.Module):
    """Every case the derived backward count must get right: a layer on an input that needs no gradient (only the
    weight's), a dead branch (its matmul never differentiated), a detached value, a no-grad region, bmm and
    baddbmm between activations, grouped and transposed convolutions, CPU attention (counted by neither)."""

    def __init__(self):
        super().__init__()
        self.inp, self.dead, self.after_detach = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.frozen, self.head = nn.Linear(8, 8), nn.Linear(8, 4, bias=False)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.deconv = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x, img):
        h = self.inp(x)  # x needs no gradient: only the weight's matmul runs backward
        self.dead(h)  # never reaches the output
        with torch.no_grad():
            z = self.frozen(h)
        a = torch.bmm(h, h.transpose(1, 2))
        h = torch.baddbmm(h, a, h) + self.after_detach(h.detach()) + z
        q = h.view(2, 4, 2, 4).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 4, 8) + h
        y = self.deconv(self.conv(img))
        return self.head(h), y


def test_flop_count_derives_the_backward_exactly_as_a_real_forward_and_backward_counts_it():
    from torch.utils.flop_counter import FlopCounterMode

    from treadfx.fake_eval import FakeEvaluator
    from treadfx.flops import fwd_bwd_flops, module_params
    from treadfx.tracing import make_fake_mode

    torch.manual_seed(0)
    m = FlopMix()
    x, img = torch.randn(2, 4, 8), torch.randn(2, 4, 6, 6)
    with FlopCounterMode(display=False) as real:  # the reference: a real forward and backward
        out = m(x, img)
        sum(o.float().sum() for o in out).backward()
    m.zero_grad(set_to_none=True)
    counted = fwd_bwd_flops(FakeEvaluator(make_fake_mode()), m, (x, img), {}, module_params(m))
    assert counted == real.get_total_flops() > 0
    assert all(p.grad is None for p in m.parameters())  # the count writes no gradient
    # an input that needs a gradient adds the input-side matmul and convolution of the backward
    with FlopCounterMode(display=False) as real:
        out = m(x.requires_grad_(), img.requires_grad_())
        sum(o.float().sum() for o in out).backward()
    assert fwd_bwd_flops(FakeEvaluator(make_fake_mode()), m, (x, img), {}, module_params(m)) == \
        real.get_total_flops() > counted
