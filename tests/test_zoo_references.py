"""Hand-written forward-hook TREAD references for zoo models of issue 15 not covered elsewhere, and the video
specifics on HunyuanVideo and Sana-Video.

Each reference routes the *original* diffusers model by hand while it runs its own forward, with the kept indices
of the routed call (``treadfx.last_routes(tm)[0].kept``): a pre-hook on block ``start`` saves the image stream and
replaces it with its kept tokens; a pre-hook on every routed block takes the side inputs that have a row per image
token (RoPE rows, the image columns of a joint attention mask) with the same indices, or gives the sub-grid's
height and width (Sana-Video); a hook after block ``end`` writes the processed tokens back into the saved stream.
The hooks share no code with treadfx (gathers and scatters by advanced indexing, treadfx uses gather / scatter).

The routed output and every parameter gradient must equal the reference's bit for bit (``torch.equal``): both run
the same modules on the same values in the same order, and indexing, ``torch.gather`` and their backwards
(``index_put`` / ``scatter_add`` over distinct indices) copy values without rounding.

* Qwen-Image: complex image RoPE ``[N, d/2]`` (rows gathered, the text rows pass), shared selection.
* HunyuanImage: a padded caption, so the joint mask ``[B, 1, 1, N + T]`` has False text columns; its image
  columns and the 2D RoPE (cos, sin) ``[N, d]`` rows are gathered; the route crosses from a dual-stream into a
  single-stream block.
* Video: HunyuanVideo (3D RoPE (cos, sin) ``[F*H*W, d]``, a padded joint mask, shared selection) and Sana-Video
  (structured per-sample selection: a regular sub-grid of every frame, the blocks' grid height and width replaced
  by the sub-grid's, per-sample rows of the 3D RoPE ``[1, F*H*W, 1, d]``): a single frame (F = 1), then another
  frame count and resolution, then the first signature again; each call equal to its hook reference, and the
  repeat not traced again. (Each test builds its own model: every model serves one test, and a fresh transform
  is what the trace count needs.)
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

import treadfx

pytest.importorskip("diffusers")

from backbone_refs import put, sample_of, take, tread_hooks  # noqa: E402
from helpers import TracesSince  # noqa: E402
from test_zoo import (  # noqa: E402  (the tiny random configs, shared with the zoo tests)
    _hunyuan_image, _hunyuan_image_inputs, _hunyuan_video, _qwen_image, _qwen_image_inputs, _sana_video)

B = 2
START, END = 1, 2  # transform(start=1, end=-2) on the 4-block chains of the tiny configs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ running and comparing
Hook = Callable  # (module, args, kwargs) -> (args, kwargs); route-in: (module, args, kwargs, output) -> output


def _hooked(blocks, route_out: Hook, side_inputs: Hook, route_in: Hook):
    """The hand-written route over blocks START..END (see :func:`backbone_refs.tread_hooks`)."""
    return tread_hooks(blocks, START, END, route_out, side_inputs, route_in)


def _loss_and_grads(model: nn.Module, out: torch.Tensor) -> dict[str, torch.Tensor]:
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _routed(m, tm, args, kwargs):
    """A routed training call: ``(output, route record, parameter gradients of a loss on it)``."""
    m.zero_grad(set_to_none=True)
    out = sample_of(tm(*args, **kwargs))
    (rec,) = treadfx.last_routes(tm)
    return out.detach(), rec, _loss_and_grads(m, out)


def _reference(m, hooks, args, kwargs):
    """The original model with TREAD in ``hooks``: ``(output, parameter gradients of the same loss)``."""
    with hooks:
        out = sample_of(m(*args, **kwargs))
    return out.detach(), _loss_and_grads(m, out)


def _assert_same(out, grads, ref, ref_grads):
    """The routed output and every parameter gradient equal the hook reference's, bit for bit."""
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and grads
    different = [n for n in grads if not torch.equal(grads[n], ref_grads[n])]
    assert not different, f"gradients differ from the hook reference: {different}"


# ------------------------------------------------------------------ the hook references
def _qwen_image_hooks(m, kept: torch.Tensor):
    """Qwen-Image's blocks take keywords and return ``(text, image)``; ``image_rotary_emb`` is
    ``(image freqs [N, d/2] complex, text freqs [T, d/2])``: only the image rows are taken."""
    saved = {}

    def route_out(mod, a, kw):
        saved["h"] = kw["hidden_states"]
        return a, {**kw, "hidden_states": take(kw["hidden_states"], kept)}

    def side_inputs(mod, a, kw):
        img, txt = kw["image_rotary_emb"]
        return a, {**kw, "image_rotary_emb": (img[kept], txt)}

    def route_in(mod, a, kw, out):
        text, image = out
        return text, put(saved["h"], image, kept)

    return _hooked(list(m.transformer_blocks), route_out, side_inputs, route_in)


def _hunyuan_hooks(m, kept: torch.Tensor):
    """HunyuanVideo / HunyuanImage: chain = dual-stream then single-stream blocks, each called as ``(image, text,
    temb, attention_mask, image_rotary_emb, ...)`` (HunyuanImage passes the last two as keywords) and returning
    ``(image, text)``. The joint mask ``[B, 1, 1, N + T]`` (image columns first) keeps its kept image columns and
    every text column; the RoPE (cos, sin) ``[N, d]`` tables keep their kept rows."""
    saved = {}

    def gathered(mask, rope):
        n = saved["h"].shape[1]
        return torch.cat([mask[..., :n][..., kept], mask[..., n:]], dim=-1), tuple(t[kept] for t in rope)

    def route_out(mod, a, kw):
        saved["h"] = a[0]
        return (take(a[0], kept),) + tuple(a[1:]), kw

    def side_inputs(mod, a, kw):
        if "image_rotary_emb" in kw:  # HunyuanImage
            mask, rope = gathered(kw["attention_mask"], kw["image_rotary_emb"])
            return a, {**kw, "attention_mask": mask, "image_rotary_emb": rope}
        return tuple(a[:3]) + gathered(a[3], a[4]) + tuple(a[5:]), kw  # HunyuanVideo: positional

    def route_in(mod, a, kw, out):
        image, text = out
        return put(saved["h"], image, kept), text

    return _hooked(list(m.transformer_blocks) + list(m.single_transformer_blocks), route_out, side_inputs, route_in)


def _sana_video_hooks(m, kept: torch.Tensor, sub_grid: tuple[int, int]):
    """Sana-Video's blocks are called as ``(image, mask, text, text mask, timestep, frames, height, width,
    (cos, sin))`` with the RoPE tables ``[1, F*H*W, 1, d]``; the Mix-FFN reshapes the tokens to
    ``[B, frames, height, width, D]``. Every routed block gets the sub-grid's height and width and the kept rows of
    the tables per sample (``[B, K, 1, d]``)."""
    saved = {}
    rows, cols = sub_grid

    def route_out(mod, a, kw):
        saved["h"] = a[0]
        return (take(a[0], kept),) + tuple(a[1:]), kw

    def side_inputs(mod, a, kw):
        cos, sin = a[8]
        return tuple(a[:6]) + (rows, cols, (cos[0][kept], sin[0][kept])) + tuple(a[9:]), kw

    def route_in(mod, a, kw, out):
        return put(saved["h"], out, kept)

    return _hooked(list(m.transformer_blocks), route_out, side_inputs, route_in)


def _sub_grid(kept: torch.Tensor, frames: int, height: int, width: int) -> tuple[int, int]:
    """The ``(rows, columns)`` of the sub-grid the per-sample kept indices ``[B, K]`` form in every frame of an
    ``frames x height x width`` token grid; asserts that each sample keeps, in raster order, the same regular
    sub-grid (equally spaced rows and columns, the same in every frame), the layout Sana's convolution needs."""
    shapes = set()
    for k in kept.tolist():
        rows = sorted({p % (height * width) // width for p in k})
        cols = sorted({p % width for p in k})
        assert k == [f * height * width + r * width + c for f in range(frames) for r in rows for c in cols]
        for axis in (rows, cols):
            assert len({b - a for a, b in zip(axis, axis[1:])}) <= 1  # equally spaced
        shapes.add((len(rows), len(cols)))
    assert len(shapes) == 1
    return shapes.pop()


# ------------------------------------------------------------------ inputs of other shapes than test_zoo's
def _hunyuan_video_inputs(frames: int, h: int, w: int, seed: int):
    """Latents ``[B, 4, frames, h, w]`` (1x1x1 patches: ``frames*h*w`` tokens) and a padded caption."""
    g = _gen(seed)
    mask = torch.ones(B, 5)
    mask[1, 4:] = 0
    return (torch.randn(B, 4, frames, h, w, generator=g),), {
        "timestep": torch.tensor([10.0, 20.0]), "encoder_hidden_states": torch.randn(B, 5, 16, generator=g),
        "encoder_attention_mask": mask, "pooled_projections": torch.randn(B, 8, generator=g),
        "guidance": torch.tensor([3.0, 3.0])}


def _sana_video_inputs(frames: int, h: int, w: int, seed: int):
    """Latents ``[B, 4, frames, h, w]`` (1x2x2 patches: ``frames * h/2 * w/2`` tokens)."""
    g = _gen(seed)
    return (torch.randn(B, 4, frames, h, w, generator=g),), {
        "encoder_hidden_states": torch.randn(B, 5, 8, generator=g), "timestep": torch.tensor([10.0, 20.0])}


# ------------------------------------------------------------------ hook references
def test_qwen_image_complex_rope_rows_are_gathered_like_a_hook_reference():
    """Qwen-Image: image stream ``[image 16]``, shared selection (the RoPE tables have no batch axis), complex
    ``freqs_cis`` image table ``[N, d/2]`` gathered, text table and ``[B, T]`` text mask passed; the route's last
    block returns ``(text, image)``."""
    m = _qwen_image()
    tm = treadfx.transform(m, start=START, end=-2, ratio=0.5)
    args, kwargs = _qwen_image_inputs()
    out, rec, grads = _routed(m, tm, args, kwargs)
    kept = rec.kept
    assert kept.shape == (8,) and rec.num_tokens == 16
    _assert_same(out, grads, *_reference(m, _qwen_image_hooks(m, kept), args, kwargs))


def test_hunyuan_image_padded_caption_mask_and_2d_rope_are_gathered_like_a_hook_reference():
    """HunyuanImage with a padded caption (sample 0 keeps 3 of 5 caption tokens): the joint mask
    ``[B, 1, 1, N + T]`` has False text columns; its image columns and the 2D RoPE (cos, sin) ``[N, d]`` rows are
    gathered with the kept indices, the text columns all kept; the route runs the last dual-stream block and the
    first single-stream block."""
    m = _hunyuan_image()
    tm = treadfx.transform(m, start=START, end=-2, ratio=0.5)
    args, kwargs = _hunyuan_image_inputs()
    mask = torch.ones(B, 5)
    mask[0, 3:] = 0
    kwargs = {**kwargs, "encoder_attention_mask": mask}
    out, rec, grads = _routed(m, tm, args, kwargs)
    kept = rec.kept
    assert kept.shape == (8,) and rec.num_tokens == 16
    _assert_same(out, grads, *_reference(m, _hunyuan_hooks(m, kept), args, kwargs))


# ------------------------------------------------------------------ video: F = 1, changing signatures
SIGNATURES = [(1, 4, 4), (3, 2, 6), (1, 4, 4)]  # (frames, latent height, latent width): a repeat at the end


def test_hunyuan_video_single_frame_then_new_frames_and_resolution_with_3d_rope_trace_once_per_signature():
    """HunyuanVideo (image stream ``[image F*H*W]``, shared selection): a single frame (F = 1), then 3 frames at
    another resolution, then a new batch of the first signature. Each routed call gathers the 3D RoPE
    (cos, sin) ``[F*H*W, d]`` rows (axes t, h, w) and the image columns of the padded joint mask like the hook
    reference, output and gradients; the repeated signature is not traced again."""
    m = _hunyuan_video()
    tm = treadfx.transform(m, start=START, end=-2, ratio=0.5)
    traced = []
    for step, (frames, h, w) in enumerate(SIGNATURES):
        args, kwargs = _hunyuan_video_inputs(frames, h, w, seed=step)
        traces = TracesSince()
        out, rec, grads = _routed(m, tm, args, kwargs)
        traced.append(traces[0] > 0)
        n = frames * h * w
        assert rec.num_tokens == n and rec.kept.shape == (n // 2,)
        _assert_same(out, grads, *_reference(m, _hunyuan_hooks(m, rec.kept), args, kwargs))
    assert traced == [True, True, False]


def test_sana_video_single_frame_then_new_frames_and_resolution_like_a_hook_reference_trace_once_per_signature():
    """Sana-Video (image stream ``[image F*H*W]`` after 1x2x2 patches): structured per-sample selection (each
    sample keeps a regular sub-grid of every frame, half the tokens), the routed blocks' grid height and width
    replaced by the sub-grid's, per-sample rows of the 3D RoPE (cos, sin) ``[1, F*H*W, 1, d]`` gathered
    (``[B, K, 1, d]``). A single frame (F = 1), then 3 frames at another resolution, then a new batch of the first
    signature: each routed call equals the hook reference (output and gradients), and the repeated signature is
    not traced again."""
    m = _sana_video()
    tm = treadfx.transform(m, start=START, end=-2, ratio=0.5)
    traced = []
    for step, (frames, h, w) in enumerate(SIGNATURES):
        args, kwargs = _sana_video_inputs(frames, 2 * h, 2 * w, seed=20 + step)
        traces = TracesSince()
        out, rec, grads = _routed(m, tm, args, kwargs)
        traced.append(traces[0] > 0)
        n = frames * h * w
        assert rec.num_tokens == n and rec.kept.shape == (B, n // 2)
        sub_grid = _sub_grid(rec.kept, frames, h, w)
        _assert_same(out, grads, *_reference(m, _sana_video_hooks(m, rec.kept, sub_grid), args, kwargs))
    assert traced == [True, True, False]
