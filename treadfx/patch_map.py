"""Which pixels (or latent positions) each image token covers, derived from the traced graph.

For losses and masks given in pixel/latent space ``[B, C, H, W]``, treadfx
needs the patch size, the token grid and the token order.  They are read from
the graph, not asked from the user: the patch embedding is the convolution
applied to the image input with ``stride == kernel_size`` and no padding, and
the token order is found by pushing an index image through the shape
operations that lead from its output to the token stream (``flatten(2)`` +
``transpose(1, 2)``, ``permute`` + ``reshape`` ...).  Models whose image input
already is a token sequence ``[B, N, C]`` (Flux's packed latents) map tokens to
themselves.  Anything else is reported as "token space only".
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import TransformError
from .layout import LayoutAnalysis, TokenInfo, image_span, rule_for

__all__ = ["TokenMap", "derive_token_map", "TokenMapError", "CONV_RULES", "REPLAY_RULES"]


class TokenMapError(TransformError):
    """A pixel-space tensor was given but the model's pixel->token mapping cannot be derived."""


@dataclasses.dataclass
class TokenMap:
    """Pixel->token mapping of one model and input signature.

    ``kind`` is "patch" (``order[n]`` is the row-major patch index of image
    token n on a ``grid`` of ``patch``-sized patches) or "tokens" (the image
    input already is ``[B, N, C]``), or "unknown" (with ``reason``).
    """

    kind: str
    num_tokens: int
    patch: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    order: torch.Tensor | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.kind == "patch":
            row_major = self.order is not None and torch.equal(self.order, torch.arange(self.num_tokens))
            return (f"patch {self.patch[0]}x{self.patch[1]} on a {self.grid[0]}x{self.grid[1]} grid, "
                    f"{'row-major' if row_major else 'permuted'} token order")
        if self.kind == "tokens":
            return "the image input already is a token sequence"
        return f"unknown ({self.reason}); pass token-space [B, N] tensors"

    def per_token(self, values: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """[B, N] per image token from [B, N], [B, N, *] or pixel-space [B, C, H, W] values.

        ``reduce`` is "mean" (losses) or "any" (masks: a token counts if any of its pixels does).
        """
        B = values.shape[0]
        if values.ndim >= 2 and values.shape[1] == self.num_tokens and (values.ndim == 2 or self.kind != "patch"
                                                                         or values.ndim == 3):
            flat = values.reshape(B, self.num_tokens, -1)
            return flat.float().mean(-1) if reduce == "mean" else flat.bool().any(-1)
        if self.kind != "patch":
            raise TokenMapError(
                f"got a tensor of shape {list(values.shape)}, but treadfx cannot map pixels to tokens for this model: "
                f"{self.describe()}. Fix: pass a token-space tensor of shape [B, {self.num_tokens}]."
            )
        (ph, pw), (gh, gw) = self.patch, self.grid
        if values.ndim == 3:
            values = values.unsqueeze(1)
        if values.ndim != 4 or values.shape[-2:] != (gh * ph, gw * pw):
            raise TokenMapError(
                f"got a tensor of shape {list(values.shape)}; expected [B, C, {gh * ph}, {gw * pw}] in the image "
                f"input's space or [B, {self.num_tokens}] per token. Fix: pass one of those shapes."
            )
        C = values.shape[1]
        patches = values.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        per = patches.float().mean(-1) if reduce == "mean" else patches.bool().any(-1)
        return per[:, self.order.to(per.device)]

    def patchify(self, values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, C*p*p] in token order (token-space tensors are returned as [B, N, -1])."""
        B = values.shape[0]
        if self.kind != "patch":
            return values.reshape(B, self.num_tokens, -1)
        (ph, pw), (gh, gw) = self.patch, self.grid
        C = values.shape[1]
        patches = values.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        return patches[:, self.order.to(values.device)]


# ---- patch-embedding convolutions: node -> (kernel, stride, padding, dilation, groups) ---------------------

def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv2d_module(gm: fx.GraphModule, node: fx.Node):
    m = gm.get_submodule(node.target)
    pad = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
    return tuple(m.kernel_size), tuple(m.stride), tuple(pad), tuple(m.dilation), m.groups


def _conv2d_function(gm: fx.GraphModule, node: fx.Node):
    w = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if w is None:
        return None

    def arg(pos: int, name: str, default):
        return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)

    return (tuple(w.shape[-2:]), _pair(arg(3, "stride", 1)), _pair(arg(4, "padding", 0)),
            _pair(arg(5, "dilation", 1)), arg(6, "groups", 1))


#: Ops that are 2-D convolutions, keyed by function or module class: (gm, node) -> their geometry or None.
CONV_RULES = {nn.Conv2d: _conv2d_module, F.conv2d: _conv2d_function, torch.conv2d: _conv2d_function}


def _conv_of(gm: fx.GraphModule, node: fx.Node):
    """(kernel, stride, padding, dilation, groups) if ``node`` is a 2-D convolution."""
    rule = rule_for(CONV_RULES, node, gm)
    return rule(gm, node) if rule is not None else None


# ---- replaying the path to the token stream on an index image --------------------------------------------

class _Unsupported(Exception):
    pass


def _reduced(shape, B: int, D: int) -> list[int]:
    out = list(shape)
    if out and out[0] == B:
        out[0] = 1
    return [1 if s == D else s for s in out]


def _replay_reshape(node: fx.Node, value: torch.Tensor, B: int, D: int) -> torch.Tensor:
    return value.reshape(_reduced(node.meta["val"].shape, B, D))


def _replay_shape_op(node: fx.Node, value: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """Apply the same shape operation (same arguments) to the index tensor, then match the reduced shape."""
    target = node.target
    name = target if isinstance(target, str) else target.__name__
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    fn = getattr(torch, name) if node.op == "call_function" else getattr(type(value), name)
    out = fn(value, *args, **kwargs)
    expected = _reduced(node.meta["val"].shape, B, D)
    if list(out.shape) != expected:
        out = out.reshape(expected) if out.numel() == torch.Size(expected).numel() else out
    return out


def _replay_identity(node: fx.Node, value: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """Elementwise ops, norms and Linear act per position: the index image passes through unchanged."""
    return value


#: How each op moves positions, replayed on an index image with batch and channel dims collapsed to 1:
#: (node, index tensor, B, D) -> index tensor.  An op not listed stops the derivation ("token space only").
REPLAY_RULES = {
    **{op: _replay_reshape for op in ("reshape", "view", torch.reshape)},
    **{op: _replay_shape_op for op in ("flatten", "transpose", "permute", "contiguous", "unsqueeze", "squeeze",
                                       "movedim", "swapaxes", torch.flatten, torch.transpose, torch.permute,
                                       torch.unsqueeze, torch.squeeze, torch.movedim, torch.swapaxes)},
    **{op: _replay_identity for op in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                                       torch.sub, torch.mul, F.dropout, F.layer_norm, F.gelu, F.silu, nn.Dropout,
                                       nn.LayerNorm, nn.Identity, nn.GroupNorm, nn.Linear)},
}


def _apply(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """Replay ``node`` on the reduced index tensor (batch and channel dims collapsed to 1)."""
    rule = rule_for(REPLAY_RULES, node, gm)
    if rule is None:
        raise _Unsupported(f"`{getattr(node.target, '__name__', node.target)}` between the patch embedding and "
                           "the token stream")
    return rule(node, value, B, D)


def derive_token_map(gm: fx.GraphModule, analysis: LayoutAnalysis, stream: fx.Node,
                     stream_info: TokenInfo) -> TokenMap:
    """The pixel->token mapping of ``gm`` for the image tokens of ``stream`` (never raises).

    Steps: the image input's kind; the patchifying convolution; its geometry;
    the token order, by replaying the ops from the convolution to the stream on
    an index image (op knowledge in :data:`REPLAY_RULES`).
    """
    _, n_img = image_span(stream_info.layout)
    img_val = analysis.image_ph.meta.get("val")
    if not isinstance(img_val, torch.Tensor):
        return TokenMap("unknown", n_img, reason="the image input is not a tensor")
    if img_val.ndim == 3 and img_val.shape[1] == n_img:
        return TokenMap("tokens", n_img)
    if img_val.ndim != 4:
        return TokenMap("unknown", n_img, reason=f"the image input has shape {list(img_val.shape)}")
    conv = _patch_conv(gm, analysis.image_ph)
    if conv is None:
        return TokenMap("unknown", n_img, reason="no patch-embedding convolution is applied to the image input")
    node, (kernel, stride, padding, dilation, _groups) = conv
    if kernel != stride or any(padding) or dilation != (1, 1):
        return TokenMap("unknown", n_img, reason=f"the convolution on the image input (kernel {kernel}, stride "
                                                 f"{stride}, padding {padding}) does not cut it into patches")
    out = node.meta["val"]
    gh, gw = int(out.shape[-2]), int(out.shape[-1])
    if gh * gw != n_img:
        return TokenMap("unknown", n_img, reason=f"the patch grid {gh}x{gw} does not match {n_img} image tokens")
    order = _token_order(gm, analysis, node, n_img)
    if isinstance(order, str):
        return TokenMap("unknown", n_img, reason=order)
    return TokenMap("patch", n_img, (int(kernel[0]), int(kernel[1])), (gh, gw), order)


def _patch_conv(gm: fx.GraphModule, image: fx.Node):
    """(node, geometry) of the first convolution reached from the image through shape-preserving ops, or None."""
    img_shape = tuple(image.meta["val"].shape)
    frontier, seen = [image], set()
    while frontier:
        n = frontier.pop(0)
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            spec = _conv_of(gm, u)
            if spec is not None and u.args and u.args[0] is n:
                return u, spec
            v = u.meta.get("val")
            if isinstance(v, torch.Tensor) and tuple(v.shape) == img_shape:
                frontier.append(u)
    return None


def _token_order(gm: fx.GraphModule, analysis: LayoutAnalysis, conv: fx.Node, n_img: int) -> torch.Tensor | str:
    """The row-major patch index of each image token, or why it cannot be derived."""
    out = conv.meta["val"]
    gh, gw = int(out.shape[-2]), int(out.shape[-1])
    # push an index image [1, 1, gh, gw] through the shape operations up to the token stream
    value = torch.arange(gh * gw, dtype=torch.float64).reshape(1, 1, gh, gw)
    B, D = int(out.shape[0]), int(out.shape[1])
    cur = conv
    for _ in range(32):
        users = [u for u in cur.users if isinstance(u.meta.get("val"), torch.Tensor)]
        if len(users) != 1:
            break
        u = users[0]
        info = analysis.token_info(u)
        v = u.meta["val"]
        try:
            value = _apply(gm, u, value, B, D)
        except _Unsupported as e:
            return str(e)
        cur = u
        if (isinstance(info, TokenInfo) and info.has_image() and v.ndim == 3 and info.axis == 1
                and value.ndim == 3 and value.shape[1] == v.shape[1] and value.shape[2] == 1):
            off, n = image_span(info.layout)
            order = value[0, off: off + n, 0].round().long()
            if n == n_img and sorted(order.tolist()) == list(range(gh * gw)):
                return order
    return "the path from the patch embedding to the token stream uses operations treadfx cannot replay on an " \
           "index image"
