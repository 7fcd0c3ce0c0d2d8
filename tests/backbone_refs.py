"""Backbone test cases and hand-written TREAD reference forwards.

Every reference here follows the official TREAD algorithm (CompVis/tread) directly
on the original modules and shares no code with treadfx: it takes the kept
image tokens out of the stream before block ``start`` (tokens outside the
image segment -- class, register, time, label tokens -- stay), runs blocks
``start..end`` on them with every token-aligned side input taken with the
same indices (RoPE rows, per-token modulation, U-ViT skips), and puts them
back, out of place, into the stream saved at route-out. Gathers and scatters
use advanced indexing (treadfx uses ``torch.gather`` / ``scatter``).

For our own backbones the reference is the model's forward rewritten by
hand. For diffusers models, whose forwards are long, the reference runs the
model's own forward and does the route-out / route-in in forward hooks on
the routed blocks (``routed_by_hooks``).

Kept indices are ``[B, K]`` (per-sample selection) or ``[K]`` (shared).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from treadfx.models.sit_rope import SiTRoPE, tiny_sit_rope
from treadfx.models.ssm import DiffusionSSM, tiny_ssm
from treadfx.models.uvit import UViT, tiny_uvit, unpatchify
from treadfx.models.vit import DiffusionViT, tiny_vit

BATCH = 2


# ------------------------------------------------------------------ gather / scatter by hand
def take(x: torch.Tensor, kept: torch.Tensor, offset: int = 0, length: int | None = None) -> torch.Tensor:
    """``x: [B, L, ...]`` with its image segment ``[offset, offset + length)`` reduced to the kept tokens."""
    length = x.shape[1] - offset if length is None else length
    img = x[:, offset: offset + length]
    if kept.ndim == 1:
        img = img[:, kept]
    else:
        img = img[torch.arange(x.shape[0])[:, None], kept]
    return torch.cat([x[:, :offset], img, x[:, offset + length:]], dim=1)


def put(base: torch.Tensor, value: torch.Tensor, kept: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``base`` (N image tokens at ``offset``) with the kept image tokens and all other tokens taken from ``value``."""
    k = kept.shape[-1]
    n = base.shape[1] - (value.shape[1] - k)
    # a fresh contiguous tensor, like an out-of-place scatter returns (the saved stream may be a strided
    # view, and the next block's matmuls round differently on other strides)
    out = base.clone(memory_format=torch.contiguous_format)
    out[:, :offset] = value[:, :offset]
    out[:, offset + n:] = value[:, offset + k:]
    rows = slice(None) if kept.ndim == 1 else torch.arange(base.shape[0])[:, None]
    out[rows, offset + kept] = value[:, offset: offset + k]
    return out


def take_table(table: torch.Tensor, kept: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Rows of a per-token table ``[L, d]`` (no batch dim): image rows ``offset + kept``, others kept in place.

    With per-sample ``kept [B, K]`` this gives a batched table ``[B, L', d]``.
    """
    img = table[offset + kept]
    if offset == 0:
        return img
    head = table[:offset]
    if kept.ndim == 2:
        head = head.expand(kept.shape[0], *head.shape)
    return torch.cat([head, img], dim=-2)


def random_kept(batch: int | None, n: int, k: int, seed: int, sort: bool = False) -> torch.Tensor:
    """Random kept indices: ``[batch, k]`` per sample, or ``[k]`` shared when ``batch`` is None."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch or 1, n, generator=g).argsort(dim=1)[:, :k]
    if sort:
        idx = idx.sort(dim=1).values
    return idx if batch else idx[0]


def sample_of(out: Any) -> torch.Tensor:
    """The output tensor of a backbone (diffusers returns a dataclass with ``.sample``)."""
    return out.sample if hasattr(out, "sample") else out


def kept_for(route, seed: int, *, k: int | None = None, batch: int = BATCH) -> torch.Tensor:
    """Fixed kept indices fitting a report route (selection, order), K = its num_keep unless given."""
    k = route.num_keep if k is None else k
    return random_kept(batch if route.selection == "per_sample" else None, route.num_tokens, k, seed,
                       sort=route.order == "sorted")


# ------------------------------------------------------------------ references of our own backbones
def _route_at(routes, i):
    return [r for r, (s, _e) in enumerate(routes) if s == i]


def sit_rope_reference(m: SiTRoPE, routes: Sequence[tuple[int, int]], kept: Sequence[torch.Tensor],
                       x, t, y, pos=None, gather_side: bool = True) -> torch.Tensor:
    """SiT-RoPE forward with TREAD by hand: RoPE rows and per-token conditioning are taken with the kept indices.

    ``gather_side=False`` is the classic hand-written bug (side inputs not gathered), for negative controls.
    """
    h = m.x_embedder(x)
    if m.pos_embed is not None:
        h = h + m.pos_embed
    c = m.embed_conditioning(t, y)
    cos, sin = m.rope(pos)
    cur = (c, cos, sin)
    saved = idx = None
    for i, block in enumerate(m.blocks):
        for r in _route_at(routes, i):
            saved, idx = h, kept[r]
            h = take(h, idx)
            if gather_side:
                rc = take(c, idx) if c.ndim == 3 else c
                tab = (lambda tb: take(tb, idx)) if cos.ndim == 3 else (lambda tb: take_table(tb, idx))
                cur = (rc, tab(cos), tab(sin))
        h = block(h, *cur)
        for r, (_s, e) in enumerate(routes):
            if e == i:
                h = put(saved, h, idx)
                cur = (c, cos, sin)
    h = m.final_layer(h, c)
    return m.unpatchify(h)


def ssm_reference(m: DiffusionSSM, routes, kept, x, t, y) -> torch.Tensor:
    h = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, m.training)
    saved = idx = None
    for i, block in enumerate(m.blocks):
        for r in _route_at(routes, i):
            saved, idx = h, kept[r]
            h = take(h, idx)
        h = block(h, c)
        for r, (_s, e) in enumerate(routes):
            if e == i:
                h = put(saved, h, idx)
    return m.unpatchify(m.final_layer(h, c))


def vit_reference(m: DiffusionViT, routes, kept, x, t, y) -> torch.Tensor:
    """Class and register tokens are never routed: only the image segment is taken / put back."""
    h = m.patch_embed(x)
    n = h.shape[1]
    cond = m.t_embedder(t) + m.y_embedder(y, m.training)
    h = m._pos_embed(h, cond)
    off = m.num_prefix_tokens
    saved = idx = None
    for i, block in enumerate(m.blocks):
        for r in _route_at(routes, i):
            saved, idx = h, kept[r]
            h = take(h, idx, off, n)
        h = block(h)
        for r, (_s, e) in enumerate(routes):
            if e == i:
                h = put(saved, h, idx, off)
    h = m.norm(h)[:, off: off + n]
    return m.unpatchify(m.head(h))


def uvit_reference(m: UViT, routes, kept, x, timesteps, y=None) -> torch.Tensor:
    """U-ViT with TREAD by hand, including its long skips.

    A skip produced outside a route and consumed inside route r is taken with
    r's indices; a skip produced inside route r and consumed after it is put
    back into the stream saved at r's route-out (its skipped tokens re-enter
    with the value they had when they left, like the stream's).
    """
    h = m.patch_embed(x)
    L = h.shape[1]
    tt = m.time_embed(_uvit_t(timesteps, m.embed_dim)).unsqueeze(1)
    h = torch.cat((tt, h), dim=1)
    if y is not None:
        h = torch.cat((m.label_emb(y).unsqueeze(1), h), dim=1)
    h = h + m.pos_embed
    E = m.extras
    chain = list(m.in_blocks) + [m.mid_block] + list(m.out_blocks)
    d = len(m.in_blocks)
    skips: list[list] = []  # [value, route it was produced in (None: full token count)]
    active = None  # (route index, saved stream, kept)
    for i, block in enumerate(chain):
        for r in _route_at(routes, i):
            active = (r, h, kept[r])
            h = take(h, kept[r], E)
        if i < d:
            h = block(h)
            skips.append([h, active[0] if active else None])
        elif i == d:
            h = block(h)
        else:
            s, where = skips.pop()
            if active is not None and where is None:
                s = take(s, active[2], E)
            h = block(h, s)
        for r, (_s, e) in enumerate(routes):
            if e == i:
                _, saved, idx = active
                h = put(saved, h, idx, E)
                for entry in skips:
                    if entry[1] == r:
                        entry[0], entry[1] = put(saved, entry[0], idx, E), None
                active = None
    h = m.decoder_pred(m.norm(h))
    assert h.shape[1] == E + L
    h = unpatchify(h[:, E:], m.in_chans)
    return m.final_layer(h)


def _uvit_t(timesteps, dim):
    from treadfx.models.uvit import timestep_embedding

    return timestep_embedding(timesteps, dim)


# ------------------------------------------------------------------ diffusers: TREAD in forward hooks
@contextlib.contextmanager
def routed_by_hooks(chain: Sequence[nn.Module], start: int, end: int, kept: torch.Tensor, *,
                    out_index: int | None = None, rope_offset: int | None = None, gather_rope: bool = True,
                    rope_arg: int | None = None, prefix_at_route_in: int = 0):
    """Route the original diffusers model by hand while it runs its own forward.

    Before ``chain[start]``: save the image stream (``hidden_states``, first
    positional argument or keyword) and replace it with the kept tokens.
    Before every routed block: replace ``image_rotary_emb = (cos, sin)``
    (``[T + N, d]``, text rows first) by the text rows plus the kept image
    rows (``rope_offset`` = T). After ``chain[end]``: put the processed image
    tokens (the output, or its element ``out_index``) back into the saved stream.
    ``rope_arg``: the position of ``image_rotary_emb`` when blocks get it
    positionally. ``prefix_at_route_in``: the route ends in a block whose
    output is ``[text | image]`` concatenated (AuraFlow's single-stream
    blocks) with this many text tokens in front; only the image part is put back.
    """
    saved: dict[str, torch.Tensor] = {}

    def route_out(mod, args, kwargs):
        if args:
            saved["h"] = args[0]
            args = (take(args[0], kept),) + tuple(args[1:])
        else:
            saved["h"] = kwargs["hidden_states"]
            kwargs = {**kwargs, "hidden_states": take(kwargs["hidden_states"], kept)}
        return args, kwargs

    def side_inputs(mod, args, kwargs):
        if not gather_rope:
            return args, kwargs
        if rope_arg is not None and len(args) > rope_arg:
            rope = tuple(take_table(tb, kept, rope_offset or 0) for tb in args[rope_arg])
            return args[:rope_arg] + (rope,) + tuple(args[rope_arg + 1:]), kwargs
        rope = kwargs.get("image_rotary_emb")
        if rope is not None:
            kwargs = {**kwargs, "image_rotary_emb": tuple(take_table(tb, kept, rope_offset) for tb in rope)}
        return args, kwargs

    def route_in(mod, args, kwargs, output):
        if out_index is None and prefix_at_route_in:
            t = prefix_at_route_in
            return torch.cat([output[:, :t], put(saved["h"], output[:, t:], kept)], dim=1)
        if out_index is None:
            return put(saved["h"], output, kept)
        out = list(output)
        out[out_index] = put(saved["h"], out[out_index], kept)
        return tuple(out)

    with tread_hooks(chain, start, end, route_out, side_inputs, route_in):
        yield


@contextlib.contextmanager
def tread_hooks(chain, start: int, end: int, route_out: Callable, side_inputs: Callable, route_in: Callable):
    """Hand-written TREAD as hooks (with kwargs): ``route_out`` before ``chain[start]`` (runs first),
    ``side_inputs`` before every routed block, ``route_in`` after ``chain[end]``; all removed on exit."""
    handles = [chain[start].register_forward_pre_hook(route_out, with_kwargs=True)]
    handles += [blk.register_forward_pre_hook(side_inputs, with_kwargs=True) for blk in chain[start: end + 1]]
    handles.append(chain[end].register_forward_hook(route_in, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def diffusers_reference(chain_of: Callable[[nn.Module], list], out_index=None, rope_offset=None, **hook_kwargs):
    def ref(m, routes, kept, *args, gather_side: bool = True, **kwargs):
        (start, end), = routes
        with routed_by_hooks(chain_of(m), start, end, kept[0], out_index=out_index, rope_offset=rope_offset,
                             gather_rope=gather_side, **hook_kwargs):
            return sample_of(m(*args, **kwargs))
    return ref


def hunyuan_reference(m: nn.Module, routes, kept, *args, **kwargs) -> torch.Tensor:
    """HunyuanDiT with TREAD by hand, in hooks on its blocks, including its long skips.

    Block ``i > L // 2`` concatenates the output of block ``L - 1 - i`` (its
    skip). As in ``uvit_reference``: a skip produced inside route r and
    consumed after it is put back into the stream saved at r's route-out; a
    full skip consumed inside route r is taken with r's indices; RoPE rows
    (``[N, d]``, image only) are taken in every routed block.
    """
    blocks = list(m.blocks)
    depth = len(blocks)
    span_of = {i: r for r, (s, e) in enumerate(routes) for i in range(s, e + 1)}
    saved: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(mod, args, kwargs):
            h = args[0]
            for r, (s, _e) in enumerate(routes):
                if s == i:
                    saved[r] = h
                    h = take(h, kept[r])
            kwargs = dict(kwargs)
            r = span_of.get(i)
            if r is not None:
                kwargs["image_rotary_emb"] = tuple(take_table(tb, kept[r]) for tb in kwargs["image_rotary_emb"])
            if kwargs.get("skip") is not None:
                skip, producer = kwargs["skip"], depth - 1 - i
                made_in = span_of.get(producer)
                if made_in is not None and made_in != r:  # made inside an earlier route: full again
                    skip = put(saved[made_in], skip, kept[made_in])
                if r is not None and made_in != r:
                    skip = take(skip, kept[r])
                kwargs["skip"] = skip
            return (h,) + tuple(args[1:]), kwargs
        return hook

    def post(i):
        def hook(mod, args, kwargs, output):
            for r, (_s, e) in enumerate(routes):
                if e == i:
                    output = put(saved[r], output, kept[r])
            return output
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        return sample_of(m(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ the cases
@dataclasses.dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    routes: list  # [(start, end, ratio)]
    reference: Callable  # (model, [(start, end)], kept, *args, **kwargs) -> tensor
    transform_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def spans(self):
        return [(s, e) for s, e, _ in self.routes]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _image_inputs(channels=4, size=8, num_classes=10, seed=1):
    g = _gen(seed)
    return (torch.randn(BATCH, channels, size, size, generator=g), torch.rand(BATCH, generator=g) * 1000,
            torch.randint(0, num_classes, (BATCH,), generator=g))


def _sit_pos_inputs():
    x, t, y = _image_inputs()
    g = _gen(7)  # per-sample positions: the grid at a random offset and a random stride (e.g. crops / zooms)
    from treadfx.models.sit_rope import grid_positions

    base = grid_positions(4)
    pos = base[None] * (1 + torch.rand(BATCH, 1, 1, generator=g)) + torch.randint(0, 8, (BATCH, 1, 2), generator=g)
    return (x, t, y), {"pos": pos}


def _sit_per_token_inputs():
    x, _t, y = _image_inputs()
    t = torch.rand(BATCH, 16, generator=_gen(8)) * 1000  # diffusion forcing: one noise level per token
    return (x, t, y), {}


def _dit_diffusers():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=4, sample_size=8,
                              patch_size=2, num_embeds_ada_norm=10)
    for blk in m.transformer_blocks:  # no label dropout in tests (it draws random numbers in every block)
        blk.norm1.emb.class_embedder.dropout_prob = 0.0
    _randomize_zero_linears(m)
    return m


def _pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=4, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12)
    _randomize_zero_linears(m)
    return m


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16)
    _randomize_zero_linears(m)
    return m


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                               axes_dims_rope=(2, 2, 4))
    _randomize_zero_linears(m)
    return m


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    m = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                   num_single_dit_layers=3, attention_head_dim=8, num_attention_heads=2,
                                   joint_attention_dim=12, caption_projection_dim=16, out_channels=4,
                                   pos_embed_max_size=16)
    _randomize_zero_linears(m)
    return m


def _cogview4():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    m = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                   num_attention_heads=2, out_channels=4, text_embed_dim=12, time_embed_dim=16,
                                   condition_dim=4, pos_embed_max_size=16, sample_size=8)
    _randomize_zero_linears(m)
    return m


def _hunyuan():
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(0)
    m = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                          hidden_size=16, num_layers=6, cross_attention_dim=12, cross_attention_dim_t5=16,
                          pooled_projection_dim=8, text_len=5, text_len_t5=5, learn_sigma=False)
    _randomize_zero_linears(m)
    return m


def _randomize_zero_linears(m: nn.Module) -> None:
    """diffusers zero-initialises some output layers (e.g. PixArt's); make every layer matter."""
    g = _gen(123)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear) and not mod.weight.any():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.05)


def _dit_inputs():
    g = _gen(2)
    return (torch.randn(BATCH, 4, 8, 8, generator=g),), {"timestep": torch.tensor([1, 2]),
                                                         "class_labels": torch.tensor([1, 2])}


def _pixart_inputs():
    g = _gen(3)
    return (torch.randn(BATCH, 4, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(BATCH, 5, 12, generator=g), "timestep": torch.tensor([1, 2]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3_inputs(text_len=5):
    g = _gen(4)
    return (torch.randn(BATCH, 4, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(BATCH, text_len, 12, generator=g),
        "pooled_projections": torch.randn(BATCH, 10, generator=g), "timestep": torch.tensor([1, 2])}


def _flux_inputs():
    g = _gen(5)
    return (torch.randn(BATCH, 16, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(BATCH, 5, 12, generator=g),
        "pooled_projections": torch.randn(BATCH, 10, generator=g), "timestep": torch.tensor([0.1, 0.2]),
        "img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.randn(5, 3, generator=g)}


def _text_image_inputs(seed, text_dim=12):
    g = _gen(seed)
    return (torch.randn(BATCH, 4, 8, 8, generator=g),), {
        "encoder_hidden_states": torch.randn(BATCH, 5, text_dim, generator=g),
        "timestep": torch.tensor([100.0, 200.0])}


def _cogview4_inputs():
    args, kwargs = _text_image_inputs(6)
    size = torch.tensor([[64.0, 64.0]] * BATCH)
    return args, {**kwargs, "original_size": size, "target_size": size, "crop_coords": torch.zeros(BATCH, 2)}


def _hunyuan_inputs():
    args, kwargs = _text_image_inputs(7)
    g = _gen(8)
    return args, {**kwargs, "text_embedding_mask": torch.ones(BATCH, 5),
                  "encoder_hidden_states_t5": torch.randn(BATCH, 5, 16, generator=g),
                  "text_embedding_mask_t5": torch.ones(BATCH, 5), "image_meta_size": torch.randn(BATCH, 6, generator=g),
                  "style": torch.zeros(BATCH, dtype=torch.long),
                  "image_rotary_emb": (torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g))}


def _flux_chain(m):
    return list(m.transformer_blocks) + list(m.single_transformer_blocks)


CASES: dict[str, Case] = {c.id: c for c in [
    # RoPE tables [N, d] from the grid: shared selection
    Case("sit_rope_grid", lambda: tiny_sit_rope(depth=6), lambda: (_image_inputs(), {}), [(1, 4, 0.5)],
         sit_rope_reference),
    # per-sample position ids -> batched tables [B, N, d]: per-sample selection
    Case("sit_rope_pos", lambda: tiny_sit_rope(depth=6), _sit_pos_inputs, [(1, 3, 0.5)], sit_rope_reference),
    # per-token timesteps -> per-token modulation [B, N, D] + grid tables
    Case("sit_rope_per_token_t", lambda: tiny_sit_rope(depth=6), _sit_per_token_inputs, [(2, 4, 0.75)],
         sit_rope_reference),
    # grid tables [N, d] with per-sample selection forced: blocks get batched tables [B, K, d]
    Case("sit_rope_grid_per_sample", lambda: tiny_sit_rope(depth=6), lambda: (_image_inputs(), {}), [(1, 3, 0.5)],
         sit_rope_reference, {"selection": "per_sample"}),
    # class-conditional U-ViT ([label | time | image]); route 0 produces skips consumed after it,
    # route 1 consumes skips produced before it
    Case("uvit_two_routes", lambda: tiny_uvit(depth=6), lambda: (_image_inputs(), {}),
         [(1, 2, 0.5), (4, 5, 0.25)], uvit_reference),
    # unconditional U-ViT ([time | image]), a route from the first block through the mid block
    Case("uvit_uncond_skips_out", lambda: tiny_uvit(depth=6, num_classes=-1),
         lambda: (_image_inputs()[:2], {}), [(0, 3, 0.5)], uvit_reference),
    Case("ssm", lambda: tiny_ssm(depth=6), lambda: (_image_inputs(), {}), [(1, 4, 0.5)], ssm_reference),
    # nn.Sequential blocks called as self.blocks(x); [cls | 3 registers | image]
    Case("vit_sequential_registers", lambda: tiny_vit(depth=6), lambda: (_image_inputs(), {}), [(1, 4, 0.5)],
         vit_reference),
    # ModuleList, registers after the image tokens ([cls | image | 3 registers]), route over the whole chain
    Case("vit_list_back_registers", lambda: tiny_vit(depth=4, sequential=False, register_position="back",
                                                     no_embed_class=True, init_values=0.5),
         lambda: (_image_inputs(), {}), [(0, 3, 0.5)], vit_reference),
    Case("diffusers_dit", _dit_diffusers, _dit_inputs, [(1, 2, 0.5)],
         diffusers_reference(lambda m: list(m.transformer_blocks))),
    Case("diffusers_pixart", _pixart, _pixart_inputs, [(1, 2, 0.5)],
         diffusers_reference(lambda m: list(m.transformer_blocks))),
    Case("diffusers_sd3", _sd3, _sd3_inputs, [(1, 2, 0.5)],
         diffusers_reference(lambda m: list(m.transformer_blocks), out_index=1)),
    # text length == image token count (16): only the image stream may be routed
    Case("diffusers_sd3_text_len_eq_tokens", _sd3, lambda: _sd3_inputs(text_len=16), [(1, 2, 0.5)],
         diffusers_reference(lambda m: list(m.transformer_blocks), out_index=1)),
    # a route from the double-stream into the single-stream blocks; RoPE [T + N, d], no batch dim
    Case("diffusers_flux", _flux, _flux_inputs, [(1, 3, 0.5)],
         diffusers_reference(_flux_chain, out_index=1, rope_offset=5)),
    # joint (MMDiT) blocks into single blocks that take [8 registers | 5 text | image] concatenated
    Case("diffusers_auraflow", _auraflow, lambda: _text_image_inputs(9), [(1, 2, 0.5)],
         diffusers_reference(lambda m: list(m.joint_transformer_blocks) + list(m.single_transformer_blocks),
                             out_index=None, prefix_at_route_in=13)),
    # joint attention, RoPE (cos, sin) [N, d] over the image tokens only, passed positionally
    Case("diffusers_cogview4", _cogview4, _cogview4_inputs, [(1, 2, 0.5)],
         diffusers_reference(lambda m: list(m.transformer_blocks), out_index=0, rope_arg=3)),
    # U-Net-like long skips (block i > 3 concatenates block 5 - i's output), RoPE [N, d]; route 0 makes the
    # skip of block 4, route 1 consumes the skips of blocks 1 and 0
    Case("diffusers_hunyuan_skips", _hunyuan, _hunyuan_inputs, [(1, 2, 0.5), (4, 5, 0.25)], hunyuan_reference),
]}


def build_case(case: Case, **transform_kwargs):
    """(original model, transformed model, args, kwargs)."""
    import treadfx

    m = case.build()
    m.train()
    kw = dict(case.transform_kwargs)
    kw.update(transform_kwargs)
    tm = treadfx.transform(m, routes=case.routes, **kw)
    args, kwargs = case.inputs()
    return m, tm, args, kwargs
