"""diffusers' HiDream-I1 transformer (``HiDreamImageTransformer2DModel``) trains routed.

The model runs a double-stream chain (image and text streams apart, joint attention) and then a single-stream
chain on the joint stream ``[image N | text T]``, whose forward slices the stream back to ``N + T`` tokens after
every block and appends the next Llama layer's tokens.  Every block gets the joint RoPE table
``[B, N + T + T_llama, 1, d/2, 2, 2]``.  A route must gather that table's image rows with the kept indices, keep
every text row, and keep the between-block slice meaning "drop the appended Llama tokens" when fewer image tokens
are left.  The feed-forward of every block is a mixture of experts (``num_routed_experts > 0`` in the default
config) whose training path indexes tokens by expert with boolean masks: data-dependent sizes inside the block.

Each routed output is compared with :func:`_by_hand`, an independent forward written here with TREAD by hand:
the same modules, the same kept indices, the image rows gathered from the stream and the RoPE table at route-in
and written back into the route-in image tokens at route-out.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import treadfx
from treadfx.planning import end_relative

pytest.importorskip("diffusers")

B = 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize_zero_linears(m: torch.nn.Module) -> torch.nn.Module:
    """diffusers zero-initialises some output layers; make every layer matter."""
    g = _gen(123)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.05)
    return m


def _hidream(experts: int = 0):
    """The tiny random config of tests/test_zoo.py; ``experts`` routed experts in every feed-forward (2 active)."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return _randomize_zero_linears(HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=experts,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1, 0, 1)))


def _inputs(seed: int = 4, h: int = 8, w: int = 8):
    g = _gen(seed)
    return (torch.randn(B, 4, h, w, generator=g),), {
        "timesteps": torch.tensor([10.0, 20.0]), "encoder_hidden_states_t5": torch.randn(B, 5, 8, generator=g),
        "encoder_hidden_states_llama3": torch.randn(2, B, 5, 4, generator=g),
        "pooled_embeds": torch.randn(B, 8, generator=g)}


def _by_hand(m, args, kwargs, start: int, end: int, kept: torch.Tensor) -> torch.Tensor:
    """HiDream's training forward written out, with TREAD by hand over chain blocks ``start..end`` (0, 1: the
    double-stream blocks; 2, 3: the single-stream blocks).  ``kept``: shared kept indices ``[K]``.

    At route-in the image rows ``kept`` of the stream are taken (text rows stay) and every routed block gets the
    RoPE rows ``kept`` followed by all text rows; at route-out the routed image rows are written into the image
    tokens that entered the route, and the text rows come from the routed output.  A non-square latent is
    patchified into the model's fixed-length buffer of ``max_seq`` tokens (padding after the image tokens, a
    0/1 token mask for the attention keys): padding tokens are never routed, and the mask's image columns are
    gathered like the RoPE rows."""
    (x,), kw = args, kwargs
    cfg = m.config
    p = cfg.patch_size
    b, c, h, w = x.shape
    ph, pw = h // p, w // p
    n = ph * pw
    img_ids = torch.zeros(ph, pw, 3)
    img_ids[..., 1] += torch.arange(ph)[:, None]
    img_ids[..., 2] += torch.arange(pw)[None, :]
    img_ids = img_ids.reshape(n, 3)
    if h == w:
        hs = x.reshape(b, c, ph, p, pw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * c)
        mask = None
    else:  # the model's padded layout: [image n | padding max_seq - n]
        patches = x.reshape(b, c, ph, p, pw, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, n, p * p)
        buf = torch.zeros(b, c, m.max_seq, p * p)
        buf[:, :, :n] = patches
        hs = buf.permute(0, 2, 3, 1).reshape(b, m.max_seq, p * p * c)
        mask = torch.zeros(b, m.max_seq)
        mask[:, :n] = 1.0
        img_ids = torch.cat([img_ids, torch.zeros(m.max_seq - n, 3)])
    img_ids = img_ids.unsqueeze(0).repeat(b, 1, 1)
    hs = m.x_embedder(hs)
    n_all = hs.shape[1]  # image tokens and padding
    d = hs.shape[-1]
    temb = m.t_embedder(kw["timesteps"], x.dtype) + m.p_embedder(kw["pooled_embeds"])
    llama = [m.caption_projection[i](kw["encoder_hidden_states_llama3"][k]).view(b, -1, d)
             for i, k in enumerate(cfg.llama_layers)]
    t5 = m.caption_projection[-1](kw["encoder_hidden_states_t5"]).view(b, -1, d)
    text = torch.cat([t5, llama[-1]], dim=1)  # the text stream of the double-stream blocks
    n_txt = text.shape[1] + llama[0].shape[1]
    rope = m.pe_embedder(torch.cat([img_ids, torch.zeros(b, n_txt, 3)], dim=1))  # [B, N + T, 1, d/2, 2, 2]
    rows = torch.cat([kept, torch.arange(n, rope.shape[1])])  # kept image rows, then padding and text rows
    saved = None

    def route_in(stream):
        nonlocal saved
        saved = stream[:, :n]
        return torch.cat([stream[:, kept], stream[:, n:]], dim=1)

    def route_out(stream):
        img = saved.clone()
        img[:, kept] = stream[:, : len(kept)]
        return torch.cat([img, stream[:, len(kept):]], dim=1)

    blocks = list(m.double_stream_blocks) + list(m.single_stream_blocks)
    n_double = len(m.double_stream_blocks)
    for i, block in enumerate(blocks):
        routed = start <= i <= end
        if i == start:
            hs = route_in(hs)
        table = rope[:, rows] if routed else rope
        if i < n_double:
            keys = None if mask is None else (mask[:, rows[: rows.numel() - n_txt]] if routed else mask)
            hs, text_out = block(hidden_states=hs, hidden_states_masks=keys,
                                 encoder_hidden_states=torch.cat([text, llama[i]], dim=1), temb=temb,
                                 image_rotary_emb=table)
            text = text_out[:, : text.shape[1]]
            if i == n_double - 1:
                hs = torch.cat([hs, text], dim=1)  # the joint stream [image | padding | text]
        else:
            joint = hs.shape[1]
            keys = None
            if mask is not None:
                full = torch.cat([mask, torch.ones(b, n_txt)], dim=1)
                keys = full[:, rows] if routed else full
            hs = block(hidden_states=torch.cat([hs, llama[i]], dim=1), hidden_states_masks=keys,
                       encoder_hidden_states=None, temb=temb, image_rotary_emb=table)
            hs = hs[:, :joint]  # drop the Llama tokens appended for this block
        if i == end:
            hs = route_out(hs)
    out = m.final_layer(hs[:, :n_all], temb)
    s = n_all
    return out.reshape(b, s, p, p, -1).permute(0, 4, 1, 2, 3).reshape(b, -1, s, p * p)  # training unpatchify


def _real_step_flops(model, args, kwargs) -> int:
    """FLOPs (torch's FlopCounterMode on real tensors) of a training-mode forward and the gradient of its output's
    sum with respect to the parameters, counted on a second call (a transformed model's first call may analyse)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model(*args, **kwargs)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(model(*args, **kwargs).sample.sum(), params, allow_unused=True)
    return int(counter.get_total_flops())


def _kept(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=_gen(seed))[:k].sort().values


def _eval_is_the_original(tm, m, args, kwargs):
    tm.eval()
    m.eval()
    try:
        with torch.no_grad():
            assert torch.equal(tm(*args, **kwargs).sample, m(*args, **kwargs).sample)
    finally:
        tm.train()
        m.train()


@pytest.mark.parametrize("h,w", [(8, 8), (8, 16)], ids=["square", "padded"])
def test_the_hand_loop_is_the_dense_model(h, w):
    """The reference itself: with every token kept it is HiDream's own training forward, bit for bit."""
    m = _hidream()
    args, kwargs = _inputs(h=h, w=w)
    with torch.no_grad():
        n = (h // 2) * (w // 2)
        assert torch.equal(_by_hand(m, args, kwargs, 1, 2, torch.arange(n)), m(*args, **kwargs).sample)


@pytest.mark.parametrize("start,end", [(2, 3), (0, 1), (1, 2)],
                         ids=["single_stream_chain", "double_stream_chain", "across_both"])
def test_route_equals_the_hand_loop_and_flops_drop_as_predicted(start, end):
    m = _hidream()
    args, kwargs = _inputs()
    tm = treadfx.transform(m, start=start, end=end, ratio=0.5)
    r = treadfx.inspect(tm, *args, **kwargs)
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops
    route = r.routes[0]
    assert (route.num_tokens, route.num_keep, route.selection) == (16, 8, "shared")
    kept = _kept(16, 8, seed=start + 10 * end)
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(*args, **kwargs).sample
    ref = _by_hand(m, args, kwargs, start, end, kept)
    assert torch.equal(out, ref)
    # the RoPE table is gathered on its token axis: image rows by the kept indices, every text row kept
    text = str(r)
    assert "side input [image 16 | text 15] axis 1" in text
    # the single-stream loop's slice back to image + text (after every single-stream block but the last) counts
    # from the end when it is inside the route
    from treadfx.transformed import state_of

    plan = state_of(tm).current.plans[0]
    lines = [(layout, axis, why.split(": ")[0]) for _, layout, axis, why in plan.slice_lines(str)]
    assert lines == ([("[image 16 | text 15]", 1, "[:26] -> [:-5]")] if start == 2 else [])
    assert ("[:26] -> [:-5]" in text) == (start == 2)  # inspect prints the rewritten slice
    out.square().mean().backward()
    _eval_is_the_original(tm, m, args, kwargs)


# ------------------------------------------------------------------ routed experts (the default config)
@pytest.fixture
def no_synthetic_data(monkeypatch):
    """The analysis must not run the user's code on random stand-in data (FakeEvaluator's last resort)."""
    from treadfx.fake_eval import FakeEvaluator

    def refuse(self, module, args, kwargs):
        raise AssertionError(f"{type(module).__name__} was run on synthetic data")

    monkeypatch.setattr(FakeEvaluator, "_real_fallback", refuse)


@pytest.mark.parametrize("start,end", [(2, 3), (1, 2)], ids=["single_stream_chain", "across_both"])
def test_routed_experts_train_routed_like_the_hand_loop(no_synthetic_data, start, end):
    """Default config: 4 routed experts, 2 active.  The MoE feed-forward's training path dispatches tokens with
    boolean masks (``y[idx == i] = expert(x[idx == i])``); the analysis evaluates it with unbacked sizes, and the
    routed model runs it live on the kept tokens, so each kept token gets the experts it would get anyway.  Its
    FLOPs are counted exactly: the experts are identical and every token goes to k of them (the per-expert counts
    of the top-k indices add up to k tokens each, whatever the data)."""
    m = _hidream(experts=4)
    assert m.double_stream_blocks[0].block.ff_i.experts  # the MoE feed-forward
    args, kwargs = _inputs()
    tm = treadfx.transform(m, start=start, end=end, ratio=0.5)
    r = treadfx.inspect(tm, *args, **kwargs)
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops
    assert [(c.name, c.length) for c in r.chains if c.selected] == [("double_stream_blocks+single_stream_blocks", 4)]
    # which chain is routed and why: the caption projections are chains of their own that carry no image tokens
    text = str(r)
    assert "*chain 0 `double_stream_blocks+single_stream_blocks`: 4 blocks -- routed: " in text
    assert "chain 1 `caption_projection.4`: 1 blocks -- not routed: " in text and "receive no image tokens" in text
    # the other caption projections are chains of one block each too, each named by its block (not all alike)
    assert all(f"`caption_projection.{i}`: 1 blocks" in text for i in range(4))
    # the FLOP counts include the MoE feed-forwards (gate, routed experts, shared expert): dense and routed are what
    # torch's FlopCounterMode measures on a real forward and backward of the original and of the routed model in
    # training mode, where each expert gets the tokens the data sends it; nothing is noted as left out
    from treadfx.fake_eval import data_dependent_summary

    assert r.dense_flops == _real_step_flops(m, args, kwargs)
    assert r.routed_flops == _real_step_flops(tm, args, kwargs)
    assert data_dependent_summary(m) == "" and "FLOPs not counted" not in text
    kept = _kept(16, 8, seed=3 + start)
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(*args, **kwargs).sample
    assert torch.equal(out, _by_hand(m, args, kwargs, start, end, kept))
    with torch.no_grad():
        assert not torch.allclose(out, m(*args, **kwargs).sample, atol=1e-4)  # it really routed
    opt = torch.optim.SGD([p for p in tm.parameters() if p.requires_grad], lr=0.1)
    out.square().mean().backward()
    assert m.single_stream_blocks[1].block.ff_i.experts[0].w1.weight.grad is not None
    opt.step()
    _eval_is_the_original(tm, m, args, kwargs)  # eval: the experts' inference path, the original model's


def test_a_data_dependent_submodule_gets_exact_output_shapes_without_data():
    """FakeEvaluator.call_module on a block whose feed-forward indexes tokens by expert: the output metadata is
    what a real call gives, found symbolically (no fallback run), and the submodule that needs the data (the MoE
    feed-forward, not the whole block) is the one recorded (FLOP counts count it on its own)."""
    from diffusers.models.transformers.transformer_hidream_image import (
        HiDreamImageSingleTransformerBlock, MOEFeedForwardSwiGLU)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from treadfx.fake_eval import FakeEvaluator

    torch.manual_seed(0)
    block = HiDreamImageSingleTransformerBlock(32, 4, 8, num_routed_experts=3, num_activated_experts=2).train()
    ev = FakeEvaluator(FakeTensorMode(allow_non_fake_inputs=True))
    ev._real_fallback = None  # a fallback run would fail here
    g = _gen(0)
    x, temb = torch.randn(2, 23, 32, generator=g), torch.randn(2, 32, generator=g)
    rope = torch.randn(2, 23, 1, 4, 2, 2, generator=g)
    out = ev.call_module(block, (x, None, None, temb, rope), {})
    real = block(x, None, None, temb, rope)
    assert (tuple(out.shape), out.stride(), out.dtype, out.requires_grad) == (
        tuple(real.shape), real.stride(), real.dtype, real.requires_grad)
    assert isinstance(block.ff_i, MOEFeedForwardSwiGLU)
    assert ev.is_data_dependent(block.ff_i) and not ev.is_data_dependent(block)
    assert not any(ev.is_data_dependent(sub) for sub in block.ff_i.modules() if sub is not block.ff_i)


def test_the_inference_flag_of_the_moe_is_part_of_the_memo_key():
    """``_force_inference_output=True`` sends training calls through ``moe_infer`` (no grad, host syncs): a private
    flag that changes what the forward computes, so the process-wide memos (output metadata, FLOP counts) must never
    give one feed-forward the other's entry."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    from treadfx.fake_eval import module_structure_key

    default = MOEFeedForwardSwiGLU(32, 64, 4, 2)
    forced = MOEFeedForwardSwiGLU(32, 64, 4, 2, _force_inference_output=True)
    assert module_structure_key(default) != module_structure_key(forced)
    assert module_structure_key(default) == module_structure_key(MOEFeedForwardSwiGLU(32, 64, 4, 2))


def test_an_output_whose_shape_depends_on_the_data_is_not_accepted_symbolically():
    """The symbolic evaluation is exact or refuses: ``x[x > 0]`` keeps an unbacked size in its output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from treadfx.fake_eval import FakeEvaluator

    class Positive(torch.nn.Module):
        def forward(self, x):
            return x[x > 0]

    ev = FakeEvaluator(FakeTensorMode(allow_non_fake_inputs=True))
    with pytest.raises(RuntimeError, match="depends on the data"):
        ev._symbolic_call(Positive(), (ev.to_fake(torch.randn(4, 3)),), {})


# ------------------------------------------------------------------ slices of the joint stream inside a route
@st.composite
def _sliced_layouts(draw):
    """A token axis [extra a | image n | text t], the image tokens a route keeps, and a slice of the axis whose
    bounds are not strictly inside the image tokens (those have no meaning on a subset of them)."""
    a, n, t = draw(st.integers(0, 3)), draw(st.integers(1, 6)), draw(st.integers(0, 6))
    total = a + n + t
    kept = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))

    def outside(b):
        pos = min(max(b + total if b < 0 else b, 0), total)
        return not a < pos < a + n

    bound = st.one_of(st.none(), st.sampled_from([b for b in range(-total - 2, total + 3) if outside(b)]))
    return a, n, t, kept, slice(draw(bound), draw(bound), draw(st.sampled_from([None, 1])))


@settings(max_examples=200, deadline=None)
@given(_sliced_layouts())
def test_an_end_relative_slice_selects_the_same_tokens_dense_and_routed(case):
    """Positions as values: on the dense axis the rewritten slice selects what the original selects; on the axis a
    route leaves (the kept image tokens between the same extra and text tokens) it selects exactly the surviving
    part of what the original selected on the dense axis."""
    a, n, t, kept, e = case
    dense = torch.arange(a + n + t)
    routed = torch.cat([dense[:a], dense[a:a + n][torch.tensor(kept)], dense[a + n:]])
    new = end_relative(e, a, n, len(dense))
    assert torch.equal(dense[new], dense[e])
    survivors = set(routed.tolist())
    assert routed[new].tolist() == [v for v in dense[e].tolist() if v in survivors]


def test_per_sample_selection_names_the_rope_table_and_the_fix():
    """The joint RoPE table is built from Python ints (``repeat(batch_size, ...)``), so treadfx sees no batch
    dimension in it: the default route shares one kept subset across the batch (above).  Asking for per-sample
    selection fails at planning with an error that names the table, says that it does line up with the image
    tokens, why the block still fails, and the fix."""
    import re

    m = _hidream()
    args, kwargs = _inputs()
    tm = treadfx.transform(m, start=2, end=3, ratio=0.5, selection="per_sample")
    with pytest.raises(treadfx.UnroutableRegionError) as e:
        treadfx.inspect(tm, *args, **kwargs)
    msg = str(e.value)
    assert re.search(r"block `single_stream_blocks.0` cannot run on the kept tokens \(\d+ of 16 in the probe\); "
                     r"the problem is `\w+` \(shape \[2, 31, 1, 4, 2, 2\]\): it lines up with the image tokens "
                     r"\(\[image 16 \| text 15\] on axis 1\)", msg), msg
    assert "treadfx sees no batch dimension in it" in msg and "Use selection='shared'" in msg


# ------------------------------------------------------------------ non-square latents: padded token buffer
@pytest.mark.parametrize("start,end", [(1, 2), (2, 3)], ids=["across_both", "single_stream_chain"])
def test_a_non_square_latent_routes_its_image_tokens_and_keeps_the_padding(start, end):
    """HiDream patchifies a non-square latent into a zero-padded buffer of ``max_seq`` tokens (an in-place write
    into ``torch.zeros``) with a 0/1 mask over the keys.  The stream is ``[image N | extra padding]``: only the N
    image tokens are routed, the padding is always kept, and the mask is gathered on its token axis (in the
    single-stream blocks after its text columns are appended)."""
    m = _hidream()
    args, kwargs = _inputs(h=8, w=16)
    tm = treadfx.transform(m, start=start, end=end, ratio=0.5)
    r = treadfx.inspect(tm, *args, **kwargs)
    text = str(r)
    stream = "[image 32 | extra 224]" if start < 2 else "[image 32 | extra 224 | text 15]"
    assert f"layout {stream}" in text and f"token stream {stream} axis 1 -- the image tokens this route" in text
    assert "keep    224 extra token(s) of the stream" in text
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops
    assert (r.routes[0].num_tokens, r.routes[0].num_keep) == (32, 16)
    kept = _kept(32, 16, seed=start)
    with treadfx.fixed_routes(tm, [kept]):
        out = tm(*args, **kwargs).sample
    assert torch.equal(out, _by_hand(m, args, kwargs, start, end, kept))
    out.square().mean().backward()
    _eval_is_the_original(tm, m, args, kwargs)
