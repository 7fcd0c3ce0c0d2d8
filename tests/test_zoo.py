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


# name: (model, inputs, the routed chain, its length)
ZOO = {
    "qwen_image": (_qwen_image, _qwen_image_inputs, "transformer_blocks", 4),
    "hidream": (_hidream, _hidream_inputs, "double_stream_blocks+single_stream_blocks", 4),
    "wan": (_wan, _wan_inputs, "blocks", 4),
    "hunyuan_video": (_hunyuan_video, _hunyuan_video_inputs, "transformer_blocks+single_transformer_blocks", 4),
    "hunyuan_image": (_hunyuan_image, _hunyuan_image_inputs, "transformer_blocks+single_transformer_blocks", 4),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_trains_routed_and_eval_is_the_original(name):
    build, inputs, chain_name, length = ZOO[name]
    m = build()
    args, kwargs = inputs()
    m.eval()
    with torch.no_grad():
        sample_of(m(*args, **kwargs))  # a validation call first: fills diffusers' lru-cached RoPE helpers
    m.train()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    r = treadfx.inspect(tm, *args, **kwargs)  # on the fresh transform, before any routed call
    assert [(c.name, c.length) for c in r.chains if c.selected] == [(chain_name, length)]
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops
    route = r.routes[0]
    assert (route.start, route.end, route.num_keep) == (1, length - 2, route.num_tokens // 2)

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
    m = _wan()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    args, kwargs = _wan_inputs(frames=frames)
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
def trace_count(monkeypatch):
    """How many times a model was traced (every new input signature starts with one trace)."""
    count = [0]
    original = tracing._trace

    def counting(*a, **k):
        count[0] += 1
        return original(*a, **k)

    monkeypatch.setattr(tracing, "_trace", counting)
    return count


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
