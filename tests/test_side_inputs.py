"""Side inputs over tokens: masks on every token axis, per-token modulation, and the error naming the input.

Each tiny model is built by hand; each routed training output is compared
with a hand-written TREAD forward on the kept indices treadfx reports
(``last_routes``): before block ``start`` the kept image tokens are taken,
blocks ``start..end`` run on them with their masks / modulation gathered the
same way, and the result is written back into the stream saved before
``start``.

* a joint text+image attention block with a ``[B, 1, 1, N_img + N_txt]``
  padding mask built like HunyuanVideo's (from ``arange`` and caption lengths,
  no visible cat): the image part of the mask's axis is gathered, the text
  part kept, in the order the block concatenates image and text;
* a block-causal ``[1, 1, N, N]`` mask: gathered on both token axes, shared
  and per sample;
* per-token modulation ``[B, 2, N, D]`` (token axis 2);
* a mask treadfx cannot line up: the error names that input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx

N, T, D, HEADS, DIN = 16, 6, 24, 2, 8


def _heads(x: torch.Tensor, lin: nn.Linear) -> tuple[torch.Tensor, ...]:
    B, L, _ = x.shape
    return lin(x).view(B, L, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4).unbind(0)


def _merge(o: torch.Tensor) -> torch.Tensor:
    B, H, L, hd = o.shape
    return o.transpose(1, 2).reshape(B, L, H * hd)


def take(x: torch.Tensor, kept: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """x's rows ``kept`` ([B, K] per sample, or [K]) along ``axis`` (dim 0 is the batch)."""
    if kept.ndim == 1:
        return x.index_select(axis, kept)
    return torch.stack([x[b].index_select(axis - 1, kept[b]) for b in range(x.shape[0])])


def put(full: torch.Tensor, kept: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``full`` with rows ``kept`` of axis 1 replaced by ``part``."""
    out = full.clone()
    rows = kept if kept.ndim == 2 else kept.unsqueeze(0).expand(full.shape[0], -1)
    for b in range(full.shape[0]):
        out[b, rows[b]] = part[b]
    return out


def routed_blocks(blocks, h, side, kept_side, kept, start, end):
    """Hand-written TREAD over ``blocks(h, side)``: route-out of ``kept`` before block ``start``, the routed blocks
    get ``kept_side``, route-in (skipped tokens unchanged) after block ``end``."""
    saved = None
    for i, block in enumerate(blocks):
        if i == start:
            saved, h = h, take(h, kept)
        h = block(h, kept_side if start <= i <= end else side)
        if i == end:
            h = put(saved, kept, h)
    return h


# --------------------------------------------------------------------------- joint attention + padding mask


class JointBlock(nn.Module):
    """Image and text tokens attend jointly: ``cat([image, text])`` inside the block, one padding mask."""

    def __init__(self):
        super().__init__()
        self.qkv_img, self.qkv_txt = nn.Linear(D, 3 * D), nn.Linear(D, 3 * D)
        self.out_img, self.out_txt = nn.Linear(D, D), nn.Linear(D, D)
        self.mod = nn.Linear(D, D)

    def forward(self, img, txt, c, attention_mask):
        n = img.shape[1]
        qi, ki, vi = _heads(img, self.qkv_img)
        qt, kt, vt = _heads(txt, self.qkv_txt)
        q, k, v = (torch.cat([a, b], dim=2) for a, b in ((qi, qt), (ki, kt), (vi, vt)))
        o = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask))
        img = img + self.out_img(o[:, :n]) * (1 + self.mod(c).unsqueeze(1))
        txt = txt + self.out_txt(o[:, n:])
        return img, txt


class JointModel(nn.Module):
    def __init__(self, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(DIN, D)
        self.blocks = nn.ModuleList([JointBlock() for _ in range(depth)])
        self.head = nn.Linear(D, DIN)

    def joint_mask(self, img, txt, text_mask):
        """HunyuanVideo's way: valid = position < N_img + caption length, as [B, 1, 1, N_img + N_txt]."""
        length = img.shape[1] + text_mask.sum(dim=1)
        pos = torch.arange(img.shape[1] + txt.shape[1], device=img.device)
        return (pos.unsqueeze(0) < length.unsqueeze(1))[:, None, None, :]

    def forward(self, x, text, c, text_mask):
        img = self.embed(x)
        mask = self.joint_mask(img, text, text_mask)
        txt = text
        for block in self.blocks:
            img, txt = block(img, txt, c, mask)
        return self.head(img)


def joint_reference(m: JointModel, x, text, c, text_mask, kept, start, end):
    img = m.embed(x)
    mask = m.joint_mask(img, text, text_mask)
    # kept image columns of the mask, then every text column (the block concatenates image then text)
    kept_mask = torch.cat([take(mask[:, 0, 0], kept).view(x.shape[0], 1, 1, -1), mask[..., N:]], dim=-1)
    txt, saved = text, None
    for i, block in enumerate(m.blocks):
        if i == start:
            saved, img = img, take(img, kept)
        img, txt = block(img, txt, c, kept_mask if start <= i <= end else mask)
        if i == end:
            img = put(saved, kept, img)
    return m.head(img)


def _joint_inputs():
    g = torch.Generator().manual_seed(0)
    text_mask = torch.ones(3, T, dtype=torch.bool)
    text_mask[0, 2:] = False  # padded captions
    text_mask[2, 4:] = False
    return (torch.randn(3, N, DIN, generator=g), torch.randn(3, T, D, generator=g), torch.randn(3, D, generator=g),
            text_mask)


def _check_step(model, routed, reference, inputs, start, end):
    routed.train()
    out = routed(*inputs)
    (rec,) = treadfx.last_routes(routed)
    out.square().mean().backward()
    got = {n: p.grad.clone() for n, p in routed.named_parameters() if p.grad is not None}
    routed.zero_grad(set_to_none=True)
    ref = reference(model, *inputs, rec.kept, start, end)
    ref.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    routed.eval()
    with torch.no_grad():
        assert torch.equal(routed(*inputs), model(*inputs))  # eval: the original model, bit for bit
    return rec.kept


def test_joint_padding_mask_gathers_image_part_and_keeps_text_part():
    torch.manual_seed(0)
    model = JointModel()
    routed = treadfx.transform(model, start=1, end=2, ratio=0.5)
    kept = _check_step(model, routed, joint_reference, _joint_inputs(), 1, 2)
    assert kept.shape == (3, N // 2)  # the mask has a batch dim: per-sample selection, as in official TREAD


# --------------------------------------------------------------------------- block-causal mask


class CausalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask):
        q, k, v = _heads(x, self.qkv)
        return x + self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class BlockCausalModel(nn.Module):
    """Frames of 4 tokens; a token sees its own frame and earlier ones: a [1, 1, N, N] mask."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(DIN, D)
        self.blocks = nn.ModuleList([CausalBlock() for _ in range(depth)])

    def causal_mask(self, n, device):
        frame = torch.arange(n, device=device) // 4
        return (frame.unsqueeze(1) >= frame.unsqueeze(0))[None, None]

    def forward(self, x):
        h = self.embed(x)
        mask = self.causal_mask(h.shape[1], h.device)
        for block in self.blocks:
            h = block(h, mask)
        return h


def causal_reference(m: BlockCausalModel, x, kept, start, end):
    h = m.embed(x)
    mask = m.causal_mask(N, h.device)
    if kept.ndim == 1:
        kept_mask = mask[:, :, kept][:, :, :, kept]
    else:  # one [K, K] mask per sample
        kept_mask = torch.stack([mask[0, 0][kb][:, kb] for kb in kept]).unsqueeze(1)
    return routed_blocks(m.blocks, h, mask, kept_mask, kept, start, end)


@pytest.mark.parametrize("selection", ["auto", "per_sample"])
def test_block_causal_mask_is_gathered_on_both_token_axes(selection):
    torch.manual_seed(1)
    model = BlockCausalModel()
    routed = treadfx.transform(model, start=1, end=2, ratio=0.5, selection=selection, order="sorted")
    x = torch.randn(3, N, DIN, generator=torch.Generator().manual_seed(1))
    kept = _check_step(model, routed, causal_reference, (x,), 1, 2)
    # a mask without batch dim makes the default selection shared (one [K, K] mask for the batch)
    assert kept.shape == ((N // 2,) if selection == "auto" else (3, N // 2))


# --------------------------------------------------------------------------- per-token modulation, axis 2


class ModBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, mod):
        shift, scale = mod.unbind(1)  # [B, N, D] each
        return x + self.lin(F.layer_norm(x, (D,)) * (1 + scale) + shift)


class PerTokenTimeModel(nn.Module):
    """Diffusion forcing style: one timestep per token, embedded to modulation [B, 2, N, D]."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(DIN, D)
        self.t_embed = nn.Linear(1, 2 * D)
        self.blocks = nn.ModuleList([ModBlock() for _ in range(depth)])

    def modulation(self, t_tok):
        B, n = t_tok.shape
        return self.t_embed(t_tok.unsqueeze(-1)).view(B, n, 2, D).permute(0, 2, 1, 3)

    def forward(self, x, t_tok):
        h = self.embed(x)
        mod = self.modulation(t_tok)
        for block in self.blocks:
            h = block(h, mod)
        return h


def pertoken_reference(m: PerTokenTimeModel, x, t_tok, kept, start, end):
    h, mod = m.embed(x), m.modulation(t_tok)
    kept_mod = take(mod, kept, axis=2)
    return routed_blocks(m.blocks, h, mod, kept_mod, kept, start, end)


def test_per_token_modulation_is_gathered_on_its_token_axis():
    torch.manual_seed(2)
    model = PerTokenTimeModel()
    routed = treadfx.transform(model, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(2)
    kept = _check_step(model, routed, pertoken_reference, (torch.randn(3, N, DIN, generator=g),
                                                           torch.rand(3, N, generator=g)), 1, 2)
    assert kept.shape == (3, N // 2)


# --------------------------------------------------------------------------- the error names the input


class RegisterBlock(nn.Module):
    """Appends a learned register token inside the block, so its mask has N + 1 positions."""

    def __init__(self):
        super().__init__()
        self.reg = nn.Parameter(torch.randn(1, 1, D))
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, attention_mask):
        h = torch.cat([x, self.reg.expand(x.shape[0], -1, -1)], dim=1)
        q, k, v = _heads(h, self.qkv)
        o = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask))
        return x + self.out(o[:, : x.shape[1]])


class RegisterModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(DIN, D)
        self.blocks = nn.ModuleList([RegisterBlock() for _ in range(4)])

    def forward(self, x, attention_mask):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, attention_mask)
        return h


def test_unroutable_block_error_names_the_input_that_cannot_follow(capfd):
    torch.manual_seed(3)
    routed = treadfx.transform(RegisterModel(), start=1, end=2)
    routed.train()
    x, mask = torch.randn(2, N, DIN), torch.ones(2, 1, 1, N + 1, dtype=torch.bool)
    capfd.readouterr()
    with pytest.raises(treadfx.UnroutableRegionError) as exc:
        routed(x, mask)
    msg = str(exc.value)
    assert "the problem is input `attention_mask` (shape [2, 1, 1, 17]; axis 3 (17 positions))" in msg
    assert "block `blocks.1`" in msg and "Fix:" in msg
    # no torch meta-kernel error logs before the refusal (torch's loggers write to stderr themselves)
    assert "failed while attempting to run meta" not in capfd.readouterr().err


def test_failing_fake_propagation_logs_no_meta_kernel_errors(capfd):
    """The routed graph's final fake run raises a StreamAnalysisError when it fails; torch's fake-tensor
    error log of the failing kernel must not be printed before it."""
    from treadfx.fake_eval import FakeEvaluator
    from treadfx.tracing import make_fake_mode

    def bad(q, table):
        return q * table  # [2, 2, 8, 16] * [16, 16]: cannot broadcast

    gm = torch.fx.symbolic_trace(bad)
    ev = FakeEvaluator(make_fake_mode())
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="broadcast"):
        ev.propagate(gm, [ev.to_fake(torch.randn(2, 2, 8, 16)), ev.to_fake(torch.randn(16, 16))])
    assert "failed while attempting to run meta" not in capfd.readouterr().err  # torch's loggers write to stderr


# --------------------------------------------------------------------------- diffusers HunyuanVideo


def _hunyuan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_single_layers=3, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 2), guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    text_mask = torch.ones(2, 5, dtype=torch.bool)
    text_mask[0, 3:] = False  # a padded caption: the joint mask has False columns in its text part
    kwargs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 5, 16, generator=g), encoder_attention_mask=text_mask,
                  pooled_projections=torch.randn(2, 8, generator=g), guidance=torch.tensor([3000.0, 3000.0]),
                  return_dict=False)
    return model, kwargs


def hunyuan_hook_reference(model, kwargs, kept: torch.Tensor, start: int, end: int):
    """TREAD by forward hooks on the original model: before block ``start`` keep the image tokens ``kept``;
    every routed block gets the kept columns of the image part of the joint [B, 1, 1, N_img + N_txt] mask
    (text columns all kept) and the kept rows of the RoPE (cos, sin) tables; after block ``end`` the
    processed tokens are written back into the stream saved before ``start``."""
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    saved = {}

    def pre(i):
        def hook(_module, args):
            h, enc, temb, mask, rope, *rest = args
            if i == start:
                saved["h"] = h
                h = h[:, kept]
            n = saved["h"].shape[1]
            mask = torch.cat([mask[..., :n][..., kept], mask[..., n:]], dim=-1)
            return (h, enc, temb, mask, tuple(r[kept] for r in rope), *rest)
        return hook

    def post(_module, _args, out):
        h, enc = out
        full = saved["h"].clone()
        full[:, kept] = h
        return full, enc

    handles = [blocks[i].register_forward_pre_hook(pre(i)) for i in range(start, end + 1)]
    handles.append(blocks[end].register_forward_hook(post))
    try:
        return model(**kwargs)[0]
    finally:
        for h in handles:
            h.remove()


def test_hunyuan_video_joint_mask_and_rope_are_gathered():
    """The route lies in the real blocks (`transformer_blocks` + `single_transformer_blocks`), crossing from
    the dual-stream into the single-stream blocks; the joint mask's image part is gathered there."""
    model, kwargs = _hunyuan()
    start, end = 1, 3
    routed = treadfx.transform(model, start=start, end=end, ratio=0.5)
    routed.train()
    out = routed(**kwargs)[0]
    (rec,) = treadfx.last_routes(routed)
    assert rec.kept.shape == (16,)  # 32 image tokens; the RoPE tables have no batch dim: shared selection
    out.square().mean().backward()
    got = {n: p.grad.clone() for n, p in routed.named_parameters() if p.grad is not None}
    routed.zero_grad(set_to_none=True)
    ref = hunyuan_hook_reference(model, kwargs, rec.kept, start, end)
    ref.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    routed.eval()
    with torch.no_grad():
        assert torch.equal(routed(**kwargs)[0], model(**kwargs)[0])


# ------------------------------------------------------------ which side inputs to gather: the search
from itertools import combinations  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from treadfx.planning import first_working_subset  # noqa: E402


@st.composite
def _upward_closed_families(draw):
    """n candidate inputs (one reading each) and the minimal sets of a family of working sets closed under
    adding inputs (gathering one more token-aligned input never breaks a block that runs)."""
    n = draw(st.integers(1, 6))
    minimal = draw(st.lists(st.sets(st.integers(0, n - 1), min_size=1), max_size=3))
    return n, [frozenset(m) for m in minimal]


@settings(max_examples=300, deadline=None)
@given(_upward_closed_families())
def test_first_working_subset_is_the_smallest_first_choice_in_at_most_n_plus_2_runs_when_unique(case):
    """The subset chosen equals the first working one of a plain smallest-first enumeration (written out here),
    each distinct subset is run at most once, and when one set of two or more inputs is the only minimal one the
    search takes at most n + 2 runs (n + 1 when all n inputs are needed; the enumeration takes 2^n - 1)."""
    n, minimal = case
    side = [(f"in{i}", f"reading{i}") for i in range(n)]
    calls: list[frozenset] = []

    def works(subset) -> bool:
        idx = frozenset(int(inp[2:]) for inp, _ in subset)
        calls.append(idx)
        return any(m <= idx for m in minimal)

    expected = None
    for r in range(1, n + 1):
        for combo in combinations(range(n), r):
            if any(m <= set(combo) for m in minimal):
                expected = tuple(side[i] for i in combo)
                break
        if expected is not None:
            break
    got = first_working_subset(side, works)
    assert (tuple(got) if got is not None else None) == expected
    assert len(calls) == len(set(calls))
    if len(set(minimal)) == 1 and len(minimal[0]) >= 2:
        assert len(calls) <= n + 2
        if len(minimal[0]) == n:  # every input needed (HunyuanVideo's mask, cos, sin): 2^n - 1 runs before
            assert len(calls) == n + 1
