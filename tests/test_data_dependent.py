"""Data-dependent Python outside the repeated blocks (issue 14.3, issue 15).

* a submodule that uses tensor data (CompVis/tread's label embedder
  ``assert labels.max() <= 999``, Lumina2's ``mask.sum(1).tolist()``) runs live
  as a leaf, with a one-time note naming the ``leaf_modules`` entry;
* a tensor built from Python numbers (HiDream's ``img_sizes``) is folded into
  the graph: no guard;
* data used in the top-level forward specialises the graph on the value of the
  traced call, re-checked at every call (a new value is traced once, then
  served from the cache; RNG draws are those of one run);
* nothing from a trace stays in the user's objects (module attributes,
  ``functools.lru_cache``); numpy scalars and enums are constants of the code;
* ``inspect`` counts FLOPs of models with such modules, and a failing count is
  a ``TransformError``.
"""

from __future__ import annotations

import enum
import functools
import gc
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import treadfx
from treadfx.transformed import state_of

from backbone_refs import put, take
from helpers import TracesSince, tiny_lumina2, tiny_lumina2_inputs


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def trace_count():
    """How many times the model was traced in this test."""
    return TracesSince()


class Block(nn.Module):
    """A small attention + MLP block with per-sample conditioning (permutation-equivariant over tokens)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Linear(d, d)
        self.mod = nn.Linear(d, d)

    def forward(self, x, c):
        h = x + self.mod(c)[:, None]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        return x + a + self.mlp(F.gelu(x + a))


def routed_reference(pre, blocks, post, kept, start, end):
    """Hand-written TREAD: blocks[start..end] see only the kept tokens; the skipped ones keep their value."""
    h, c = pre
    for i, b in enumerate(blocks):
        if i == start:
            saved = h
            h = take(h, kept)
        h = b(h, c)
        if i == end:
            h = put(saved, h, kept)
    return post(h)


def kept_of(tm):
    (rec,) = treadfx.last_routes(tm)
    return rec.kept


# ----------------------------------------------------------------------- CompVis/tread label embedder assert


class LabelEmbedder(nn.Module):
    """CompVis/tread's label embedder: the class table has a null row, and labels are checked in Python."""

    def __init__(self, num_classes: int, d: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, d)
        self.num_classes = num_classes

    def forward(self, labels):
        assert labels.max() <= self.num_classes, "label out of range"
        return self.table(labels)


class CompVisDiT(nn.Module):
    def __init__(self, d: int = 16, depth: int = 4):
        super().__init__()
        self.x_embedder = nn.Linear(4, d)
        self.y_embedder = LabelEmbedder(10, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.final = nn.Linear(d, 4)

    def forward(self, x, y):
        h = self.x_embedder(x)
        c = self.y_embedder(y)
        for blk in self.blocks:
            h = blk(h, c)
        return self.final(h)


def test_label_embedder_assert_runs_live_without_leaf_modules():
    torch.manual_seed(0)
    m = CompVisDiT()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    x, y = torch.randn(2, 8, 4), torch.tensor([3, 10])
    with pytest.warns(UserWarning) as notes:
        out = tm(x, y)
    text = " ".join(str(w.message) for w in notes)
    assert "`y_embedder` uses tensor data in Python" in text and "assert labels.max() <= self.num_classes" in text
    assert "leaf_modules=['y_embedder']" in text
    prog = state_of(tm).current
    assert prog.traced.live_leaves and prog.traced.live_leaves[0][0] == "y_embedder"
    assert "m.y_embedder" in prog.live.live_calls or any(
        n.op == "call_module" and n.target == "m.y_embedder" for n in prog.live.gm.graph.nodes)

    kept = kept_of(tm)
    out.square().mean().backward()
    got = {n: p.grad.clone() for n, p in tm.named_parameters()}
    tm.zero_grad()
    ref = routed_reference((m.x_embedder(x), m.y_embedder(y)), m.blocks, m.final, kept, 1, 2)
    ref.square().mean().backward()
    assert torch.equal(out, ref)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=1e-7, msg=n)

    # the check still runs live, on every call, on the real labels
    with pytest.raises(AssertionError, match="label out of range"):
        tm(x, torch.tensor([3, 11]))
    # and the note is said once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm(x, torch.tensor([0, 1]))


def test_inspect_counts_flops_with_a_live_module():
    torch.manual_seed(0)
    tm = treadfx.transform(CompVisDiT(), start=1, end=2, ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = treadfx.inspect(tm, torch.randn(2, 8, 4), torch.tensor([1, 2]))
    assert 0 < report.routed_flops < report.dense_flops


def test_failing_flop_count_is_a_transform_error():
    from treadfx.fake_eval import FakeEvaluator
    from treadfx.flops import fwd_bwd_flops
    from treadfx.tracing import make_fake_mode

    def data_dependent(x):
        return x[: int(x.sum())]  # not a module, not registered live: the count cannot run it on fakes

    with pytest.raises(treadfx.TransformError, match=r"counting FLOPs of `.*data_dependent` on fake tensors "
                                                     r"failed: DataDependentOutputException"):
        fwd_bwd_flops(FakeEvaluator(make_fake_mode()), data_dependent, (torch.ones(4),), {}, [])


# ------------------------------------------------------------------------------ top-level data: guarded


class SignBranch(nn.Module):
    """The top-level forward branches on tensor data, after random label dropout (RNG before the guard)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])

    def pre(self, x, t):
        h = self.embed(x)
        drop = torch.rand(t.shape[0]) < 0.5
        c = self.cond(torch.where(drop, torch.zeros_like(t), t)[:, None])
        if x.mean() > 0:  # a branch on tensor data in the top-level forward
            h = -h
        return h, c

    def forward(self, x, t):
        h, c = self.pre(x, t)
        for blk in self.blocks:
            h = blk(h, c)
        return h


def test_top_level_branch_on_data_is_specialised_with_a_guard(trace_count):
    torch.manual_seed(0)
    m = SignBranch()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(3)
    signs = [1, -1, 1, 1, -1, -1, 1]
    with pytest.warns(UserWarning, match=r"the forward uses tensor data in Python at .*`if x.mean\(\) > 0:"):
        tm(torch.randn(2, 8, 4, generator=g).abs(), torch.rand(2, generator=g))
    for s in signs:
        x = s * torch.randn(2, 8, 4, generator=g).abs()
        t = torch.rand(2, generator=g)
        kept = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(2)])
        state = torch.get_rng_state()
        with treadfx.fixed_routes(tm, [kept]):
            out = tm(x, t)
        torch.set_rng_state(state)  # the reference draws the same label dropout as one run of the model
        ref = routed_reference(m.pre(x, t), m.blocks, lambda h: h, kept, 1, 2)
        assert torch.equal(out, ref), s
    assert trace_count[0] == 2  # one graph per value of the branch, each traced once


# ------------------------------------------------------------------------- constants folded (HiDream)


class PerSampleUnpatchify(nn.Module):
    """HiDream's inference unpatchify: per-sample sizes in a tensor built from Python ints, used as numbers."""

    def __init__(self, d: int = 16, p: int = 2, c: int = 4):
        super().__init__()
        self.p, self.c = p, c
        self.embed = nn.Linear(p * p * c, d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])
        self.out = nn.Linear(d, p * p * c)

    def patchify(self, img):
        b, c, hh, ww = img.shape
        p = self.p
        sizes = torch.tensor([hh // p, ww // p], dtype=torch.int64).reshape(-1).unsqueeze(0).repeat(b, 1)
        tokens = img.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        return tokens, sizes

    def unpatchify(self, x, sizes):
        outs = []
        for i, size in enumerate(sizes):
            ph, pw = size
            t = x[i, : ph * pw].reshape(1, ph, pw, self.p, self.p, self.c)
            outs.append(t.permute(0, 5, 1, 3, 2, 4).reshape(1, self.c, ph * self.p, pw * self.p))
        return torch.cat(outs, dim=0)

    def forward(self, img, t):
        tokens, sizes = self.patchify(img)
        h, c = self.embed(tokens), self.cond(t[:, None])
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.out(h), sizes)


def test_tensor_of_python_numbers_used_as_numbers_is_folded(trace_count):
    torch.manual_seed(0)
    m = PerSampleUnpatchify()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note: nothing runs live, nothing is guarded
        for _ in range(3):
            img, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
            out = tm(img, t)
            kept = kept_of(tm)
            tokens, sizes = m.patchify(img)
            ref = routed_reference((m.embed(tokens), m.cond(t[:, None])), m.blocks,
                                   lambda h: m.unpatchify(m.out(h), sizes), kept, 1, 2)
            assert torch.equal(out, ref)
    prog = state_of(tm).current
    assert prog.traced.data_guards == [] and prog.traced.live_leaves == []
    assert trace_count[0] == 1


# ------------------------------------------------------------- caption lengths from a mask (Lumina2 style)


class CaptionShiftedPositions(nn.Module):
    """Image positions start after each sample's caption: the lengths come from the mask with ``.tolist()``."""

    def __init__(self, d: int, max_len: int = 64):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, d) * 0.1)

    def forward(self, tokens, mask):
        lengths = mask.sum(dim=1).tolist()
        rows = [self.table[n: n + tokens.shape[1]] for n in lengths]
        return torch.stack(rows, dim=0)


class CaptionModel(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.pos = CaptionShiftedPositions(d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])

    def forward(self, x, t, mask):
        h = self.embed(x) + self.pos(x, mask)
        c = self.cond(t[:, None])
        for blk in self.blocks:
            h = blk(h, c)
        return h


def _mask(lengths, width=12):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def test_caption_lengths_change_every_step_without_retracing(trace_count):
    torch.manual_seed(0)
    m = CaptionModel()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(2)
    with pytest.warns(UserWarning, match=r"`pos` uses tensor data .*tolist\(\).*leaf_modules=\['pos'\]"):
        tm(torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g), _mask([3, 5]))
    for lengths in ([1, 7], [12, 4], [6, 6], [0, 9]):
        x, t, mask = torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g), _mask(lengths)
        out = tm(x, t, mask)
        ref = routed_reference((m.embed(x) + m.pos(x, mask), m.cond(t[:, None])), m.blocks, lambda h: h,
                               kept_of(tm), 1, 2)
        assert torch.equal(out, ref), lengths
    assert trace_count[0] == 1


class LengthsOut(nn.Module):
    def forward(self, mask):
        return mask.sum(dim=1).tolist()


class PaddedToLongest(nn.Module):
    """The top level pads to the longest caption: its graph depends on the lengths (guarded, not refused)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.lengths = LengthsOut()
        self.cap = nn.Linear(3, d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])

    def forward(self, x, t, cap, mask):
        lengths = self.lengths(mask)
        longest = max(lengths)
        h = torch.cat([self.embed(x), self.cap(cap[:, :longest])], dim=1)
        c = self.cond(t[:, None])
        for blk in self.blocks:
            h = blk(h, c)
        return h[:, : x.shape[1]]


def test_python_values_from_a_live_module_are_guarded(trace_count):
    torch.manual_seed(0)
    m = PaddedToLongest()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lengths in ([2, 5], [5, 1], [2, 5], [5, 1], [3, 2], [2, 5]):
            x, t, cap = torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 6, 3, generator=g)
            out = tm(x, t, cap, _mask(lengths, 6))
            kept = kept_of(tm)
            longest = max(lengths)
            pre = (torch.cat([m.embed(x), m.cap(cap[:, :longest])], dim=1), m.cond(t[:, None]))
            h = pre[0]
            for i, blk in enumerate(m.blocks):  # text tokens after the 8 image tokens are never routed
                if i == 1:
                    saved, h = h, take(h, kept, 0, 8)
                h = blk(h, pre[1])
                if i == 2:
                    h = put(saved, h, kept, 0)
            assert torch.equal(out, h[:, :8]), lengths
    assert trace_count[0] == 2  # one graph per longest caption (the shape depends on it), then served from the cache


class LateUses(nn.Module):
    """Ints a live module computes, used every way a forward may: as slice bounds (read at run time), in a shape
    read (specialised), in arithmetic whose result the graph needs (specialised), in max() and a set()."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lengths = LengthsOut()
        self.embed = nn.Linear(4, d)
        self.table = nn.Parameter(torch.randn(16, d) * 0.1)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])

    def forward(self, x, t, mask):
        return run_late_uses(self, x, t, mask, self.lengths(mask))


def run_late_uses(m, x, t, mask, lens):
    h = m.embed(x)
    scaled = torch.zeros_like(h)
    for i, n in enumerate(lens):
        scaled[i, :n] = h[i, :n] * 2  # late slice bounds
    h = h + scaled
    k = h[:, : lens[0]].shape[1]  # a shape read
    h = h + m.table[k] + m.table[max(lens)] * (len(set(lens)) + sum(lens) % 3)
    c = m.cond(t[:, None])
    for blk in m.blocks:
        h = blk(h, c)
    return h


def test_late_ints_are_read_at_run_time_and_guarded_where_the_graph_needs_them(trace_count):
    torch.manual_seed(0)
    m = LateUses()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(7)
    expected_traces = 0
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lengths in ([3, 5], [3, 2], [3, 8], [3, 5], [4, 4], [3, 11], [2, 2]):
            # the graph depends on lens[0] (a shape), the equality pattern (a set) and the multiplier (a tensor
            # operand); max(lens) only indexes a table, so it is read at run time like lens[1]
            key = (lengths[0], len(set(lengths)), len(set(lengths)) + sum(lengths) % 3)
            expected_traces += key not in seen
            seen.add(key)
            x, t = torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g)
            mask = _mask(lengths, 12)
            out = tm(x, t, mask)
            lens = mask.sum(dim=1).tolist()

            # hand-written: the same arithmetic on plain ints, then routed blocks on the kept tokens
            h = m.embed(x)
            scaled = torch.zeros_like(h)
            for i, n in enumerate(lens):
                scaled[i, :n] = h[i, :n] * 2
            h = h + scaled
            h = h + m.table[lens[0]] + m.table[max(lens)] * (len(set(lens)) + sum(lens) % 3)
            ref = routed_reference((h, m.cond(t[:, None])), m.blocks, lambda v: v, kept_of(tm), 1, 2)
            assert torch.equal(out, ref), lengths
            assert trace_count[0] == expected_traces, lengths
    assert expected_traces == 3  # [3, 2], [3, 8], [3, 5] again, [3, 11] (lens[1] and max alone change): no trace


class JointByWrites(nn.Module):
    """Not Lumina2: any forward that writes each sample's caption and image tokens into a fresh buffer at offsets
    computed from data (a live module's ``.tolist()``) gets its image tokens routed at those offsets."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.lengths = LengthsOut()
        self.embed = nn.Linear(4, d)
        self.cap = nn.Linear(3, d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])

    def forward(self, x, t, cap, mask):
        lens = self.lengths(mask)
        img, txt = self.embed(x), self.cap(cap)
        n = img.shape[1]
        joint = img.new_zeros(img.shape[0], max(lens) + n, img.shape[2])
        for i, c in enumerate(lens):
            joint[i, :c] = txt[i, :c]
            joint[i, c:c + n] = img[i]
        c = self.cond(t[:, None])
        for blk in self.blocks:
            joint = blk(joint, c)
        return torch.stack([joint[i, k:k + n] for i, k in enumerate(lens)])


def test_image_tokens_written_at_per_sample_offsets_are_routed_there(trace_count):
    torch.manual_seed(0)
    m = JointByWrites()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lengths in ([2, 5], [5, 0], [5, 1], [3, 5]):
            x, t, cap = torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 6, 3, generator=g)
            out = tm(x, t, cap, _mask(lengths, 6))
            kept = kept_of(tm)  # [B, K] indices of image tokens
            assert kept.shape == (2, 4) and int(kept.max()) < 8
            img, txt = m.embed(x), m.cap(cap)
            joint = torch.zeros(2, 5 + 8, 16)
            pos = []
            for i, c in enumerate(lengths):  # caption, kept image tokens at the sample's offset, padding
                joint[i, :c], joint[i, c:c + 8] = txt[i, :c], img[i]
                pos.append(torch.cat([torch.arange(c), c + kept[i], torch.arange(c + 8, 13)]))
            h, cond = joint, m.cond(t[:, None])
            for k, blk in enumerate(m.blocks):
                if k == 1:
                    saved, h = h, torch.stack([h[i, p] for i, p in enumerate(pos)])
                h = blk(h, cond)
                if k == 2:
                    full = saved.clone()
                    for i, p in enumerate(pos):
                        full[i, p] = h[i]
                    h = full
            ref = torch.stack([h[i, c:c + 8] for i, c in enumerate(lengths)])
            assert torch.equal(out, ref), lengths
    assert trace_count[0] == 1  # the longest caption is 5 every time; the offsets are read at every call


# ----------------------------------------------------------------------------- nothing leaks, constants


def _leaks(obj, seen=None, depth=0):
    """Proxies or fake tensors reachable from ``obj`` through containers and plain attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, (fx.Proxy, FakeTensor)):
        return [obj]
    if isinstance(obj, torch.Tensor) and obj.device.type == "meta":
        return [obj]
    out = []
    if isinstance(obj, dict):
        for v in list(obj.values()) + list(obj.keys()):
            out += _leaks(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            out += _leaks(v, seen, depth + 1)
    elif isinstance(obj, nn.Module):
        for v in vars(obj).values():
            out += _leaks(v, seen, depth + 1)
    return out


def _lru_leaks():
    bad = []
    for w in gc.get_objects():
        if type(w) is functools._lru_cache_wrapper:
            for ref in gc.get_referents(w):
                if isinstance(ref, dict):
                    bad += _leaks(ref)
    return bad


@functools.lru_cache(maxsize=8)
def _cached_table(n: int, d: int, device: str = "cpu") -> torch.Tensor:
    return torch.arange(n * d, dtype=torch.float32, device=device).reshape(n, d) / (n * d)


class CachingModel(nn.Module):
    """Stores a value computed in forward on itself and reads an lru_cache'd table (diffusers' RoPE helpers)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(4)])
        self.memo: dict = {}

    def forward(self, x):
        h = self.embed(x) + _cached_table(x.shape[1], self.embed.out_features, str(x.device))
        self.last_scale = h.abs().mean()  # a value of the model written by the forward
        self.memo.setdefault(x.shape[1], h.detach()[0, 0])  # a cache filled in place
        for blk in self.blocks:
            h = blk(h)
        return h


def test_nothing_from_the_trace_stays_in_the_model_or_lru_caches():
    torch.manual_seed(0)
    m = CachingModel()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    x = torch.randn(2, 8, 4)
    with pytest.warns(UserWarning) as notes:
        tm(x).sum().backward()
    text = " ".join(str(w.message) for w in notes)
    assert "the forward sets `last_scale` on the model; the routed graph runs the computation but not this " \
           "assignment" in text
    assert "the forward stores values in `memo` (a cache of the model); entries added while treadfx traced it " \
           "were removed" in text
    assert _leaks(tm) == [] and _leaks(m) == [] and _lru_leaks() == []
    assert "last_scale" not in vars(tm)  # never a trace value; the routed call does not replay the write
    assert tm.memo == {}
    tm.eval()
    assert torch.equal(tm(x), m.eval()(x))


def _hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(16, 16), llama_layers=[0, 1, 2],
        force_inference_output=True)


def _hidream_inputs(g):
    b = 2
    return (torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, 6, 16, generator=g), torch.randn(3, b, 6, 8, generator=g), torch.randn(b, 16, generator=g))


def test_hidream_per_sample_unpatchify_trains_routed(trace_count):
    pytest.importorskip("diffusers")
    m = _hidream()
    tm = treadfx.transform(m, start=0, end=1, ratio=0.5, chain="double_stream_blocks")
    g = torch.Generator().manual_seed(5)
    args = _hidream_inputs(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # img_sizes is folded: no note, no guard
        out = tm(*args).sample
    prog = state_of(tm).current
    assert prog.traced.data_guards == [] and prog.traced.live_leaves == []
    kept = kept_of(tm)
    n_img = 16
    saved = {}

    def route_out(mod, a, kw):
        saved["h"] = kw["hidden_states"]
        return a, {**kw, "hidden_states": take(kw["hidden_states"], kept)}

    def rope(mod, a, kw):
        return a, {**kw, "image_rotary_emb": take(kw["image_rotary_emb"], kept, 0, n_img)}

    def route_in(mod, a, kw, output):
        return (put(saved["h"], output[0], kept),) + tuple(output[1:])

    blocks = m.double_stream_blocks
    hooks = [blocks[0].register_forward_pre_hook(route_out, with_kwargs=True),
             blocks[0].register_forward_pre_hook(rope, with_kwargs=True),
             blocks[1].register_forward_pre_hook(rope, with_kwargs=True),
             blocks[1].register_forward_hook(route_in, with_kwargs=True)]
    try:
        ref = m(*args).sample
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.square().mean().backward()
    tm.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(tm(*args).sample, m(*args).sample)
    assert trace_count[0] == 1
    assert _leaks(tm) == [] and _lru_leaks() == []


def test_qwen_image_rope_caches_hold_no_trace_values_and_eval_is_the_original():
    pytest.importorskip("diffusers")
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=8,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 5, 16, generator=g), encoder_hidden_states_mask=torch.ones(2, 5),
                  timestep=torch.rand(2, generator=g), img_shapes=[(1, 4, 4)] * 2)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    tm(**kwargs).sample.square().mean().backward()
    assert len(treadfx.last_routes(tm)) == 1
    assert _leaks(tm) == [] and _lru_leaks() == []
    tm.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(tm(**kwargs).sample, m(**kwargs).sample)


def test_lumina2_rope_embedder_runs_live_and_nothing_leaks():
    pytest.importorskip("diffusers")
    m = tiny_lumina2(layers=4)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5, chain="layers")
    g = torch.Generator().manual_seed(6)
    args = tiny_lumina2_inputs([5, 7], g)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        tm(*args).sample.mean().backward()  # routed (tests/test_lumina2.py checks the values)
    assert len(treadfx.last_routes(tm)) == 1
    assert any("`rope_embedder` uses tensor data" in str(w.message) and "tolist()" in str(w.message)
               for w in notes)
    assert _leaks(tm) == [] and _leaks(m) == [] and _lru_leaks() == []
    tm.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(tm(*args).sample, m(*args).sample)


class Act(enum.Enum):
    GELU = "gelu"
    TANH = "tanh"


class ScaledBlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, kind, scale):
        y = self.lin(x) * scale
        return x + (torch.tanh(y) if kind is Act.TANH else F.gelu(y))


class NumpyEnumModel(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.kind = Act.TANH
        self.blocks = nn.ModuleList([ScaledBlock(d) for _ in range(4)])

    def forward(self, x):
        h = self.embed(x) * np.float32(0.5) + np.sqrt(np.float64(2.0)) + np.int64(1)
        h = torch.full_like(h, np.float32(0.25)) + h
        for blk in self.blocks:
            h = blk(h, self.kind, np.float32(0.5))
        return h, self.kind, np.float32(3.0)


def test_numpy_scalars_and_enums_are_constants_of_the_code():
    torch.manual_seed(0)
    m = NumpyEnumModel()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    x = torch.randn(2, 6, 4)
    out, kind, scale = tm(x)
    assert kind is Act.TANH and scale == np.float32(3.0)
    kept = kept_of(tm)
    h = m.embed(x) * 0.5 + float(np.sqrt(2.0)) + 1
    h = torch.full_like(h, 0.25) + h
    for i, blk in enumerate(m.blocks):
        if i == 1:
            saved, h = h, take(h, kept)
        h = blk(h, Act.TANH, 0.5)
        if i == 2:
            h = put(saved, h, kept)
    assert torch.equal(out, h)


class ItemSlice(nn.Module):
    """The model's own forward (no submodule to run live) reads a token count from a mask with ``.item()`` or
    ``.tolist()`` and slices the tokens with it before the blocks."""

    def __init__(self, how: str, d: int = 16):
        super().__init__()
        self.how = how
        self.embed = nn.Linear(4, d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])
        self.out = nn.Linear(d, 4)

    def pre(self, x, t, valid):
        n = int(valid[0].sum().item()) if self.how == "item" else max(valid.sum(1).tolist())
        return self.embed(x)[:, : int(n)], self.cond(t[:, None])

    def forward(self, x, t, valid):
        h, c = self.pre(x, t, valid)
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(h)


@pytest.mark.parametrize("how", ["item", "tolist"])
def test_item_and_tolist_in_the_top_level_forward_are_specialised_with_a_guard(how, trace_count):
    """Like ``int(t)``: the graph is specialised on the value and re-checked at every call (a new value traces
    once), and the routed output equals the hand-written reference on the same kept tokens."""
    torch.manual_seed(0)
    m = ItemSlice(how)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(5)
    for n in (12, 8, 12):
        x, t = torch.randn(2, 12, 4, generator=g), torch.rand(2, generator=g)
        valid = (torch.arange(12) < n).float().expand(2, 12)
        kept = torch.stack([torch.randperm(n, generator=g)[: n - n // 2] for _ in range(2)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with treadfx.fixed_routes(tm, [kept]):
                out = tm(x, t, valid)
        ref = routed_reference(m.pre(x, t, valid), m.blocks, m.out, kept, 1, 2)
        assert out.shape == (2, n, 4) and torch.equal(out, ref), n
    assert trace_count[0] == 2  # one graph per value, each traced once
    # inspect counts the dense forward on the graph specialised on this call's value (the original forward cannot
    # run on fake tensors): equal to torch's count of a real forward and backward of the original model
    from torch.utils.flop_counter import FlopCounterMode

    valid = (torch.arange(12) < 12).float().expand(2, 12)  # the value of the last call: inspect's variant
    x, t = torch.randn(2, 12, 4, generator=g), torch.rand(2, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = treadfx.inspect(tm, x, t, valid)
    with FlopCounterMode(display=False) as counter:
        m(x, t, valid).sum().backward()
    assert r.dense_flops == counter.get_total_flops() > r.routed_flops
    # indices for 12 tokens on a call with 8: refused whether the variant for 8 is tried second or first
    x, t = torch.randn(2, 12, 4, generator=g), torch.rand(2, generator=g)
    valid = (torch.arange(12) < 8).float().expand(2, 12)
    for _ in range(2):
        with pytest.raises(treadfx.TokenCountError, match="between 1 and 8 of the 8 image tokens"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with treadfx.fixed_routes(tm, [kept]):
                    tm(x, t, valid)
        tm(x, t, valid)  # makes the 8-token variant the first one tried


class NumpyArrayModel(nn.Module):
    """A numpy table attribute turned into a tensor in forward, the three usual ways."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.cond = nn.Linear(1, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(4)])
        self.table = np.linspace(0.0, 1.0, d, dtype=np.float64)  # float64: torch.tensor keeps it, a list would not

    def pre(self, x, t):
        h = self.embed(x) + torch.tensor(self.table).to(x.dtype) + torch.from_numpy(self.table).to(x.dtype)
        return h * torch.as_tensor(self.table[:1]).to(x.dtype), self.cond(t[:, None])

    def forward(self, x, t):
        h, c = self.pre(x, t)
        for blk in self.blocks:
            h = blk(h, c)
        return h


def test_numpy_arrays_are_constants_of_the_code_and_in_place_edits_are_seen():
    torch.manual_seed(0)
    m = NumpyArrayModel()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(6)
    for step in range(2):
        x, t = torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g)
        out = tm(x, t)
        ref = routed_reference(m.pre(x, t), m.blocks, lambda h: h, kept_of(tm), 1, 2)
        assert torch.equal(out, ref), step
        m.table *= 2.0  # the code reads the array object at every call, like the original forward
    tm.eval()
    x, t = torch.randn(2, 8, 4, generator=g), torch.rand(2, generator=g)
    assert torch.equal(tm(x, t), m(x, t))
