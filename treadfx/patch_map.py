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
from .layout import LayoutAnalysis, TokenInfo, image_span

__all__ = ["TokenMap", "derive_token_map", "TokenMapError"]


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


_SHAPE_METHODS = {"flatten", "transpose", "permute", "contiguous", "reshape", "view", "unsqueeze", "squeeze",
                  "movedim", "swapaxes"}
_SHAPE_FUNCS = {torch.flatten, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze,
                torch.movedim, torch.swapaxes}
_PASS_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
               F.dropout, F.layer_norm, F.gelu, F.silu}
_PASS_MODULES = (nn.Dropout, nn.LayerNorm, nn.Identity, nn.GroupNorm, nn.Linear)


def _conv_of(gm: fx.GraphModule, node: fx.Node):
    """(kernel, stride, padding, dilation, groups) if ``node`` is a 2-D convolution."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            return tuple(m.kernel_size), tuple(m.stride), tuple(pad), tuple(m.dilation), m.groups
    if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
        w = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
        if w is None:
            return None

        def pair(v, d):
            v = node.kwargs.get(v, d) if isinstance(v, str) else v
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

        stride = pair(node.args[3] if len(node.args) > 3 else "stride", 1)
        padding = pair(node.args[4] if len(node.args) > 4 else "padding", 0)
        dilation = pair(node.args[5] if len(node.args) > 5 else "dilation", 1)
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return tuple(w.shape[-2:]), stride, padding, dilation, groups
    return None


def derive_token_map(gm: fx.GraphModule, analysis: LayoutAnalysis, stream: fx.Node,
                     stream_info: TokenInfo) -> TokenMap:
    """The pixel->token mapping of ``gm`` for the image tokens of ``stream`` (never raises)."""
    _, n_img = image_span(stream_info.layout)
    image = analysis.image_ph
    img_val = image.meta.get("val")
    if not isinstance(img_val, torch.Tensor):
        return TokenMap("unknown", n_img, reason="the image input is not a tensor")
    if img_val.ndim == 3 and img_val.shape[1] == n_img:
        return TokenMap("tokens", n_img)
    if img_val.ndim != 4:
        return TokenMap("unknown", n_img, reason=f"the image input has shape {list(img_val.shape)}")
    # the patchifying convolution: first conv reached from the image through position-preserving ops
    conv, frontier, seen = None, [image], set()
    while frontier and conv is None:
        n = frontier.pop(0)
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            spec = _conv_of(gm, u)
            if spec is not None and u.args and u.args[0] is n:
                conv = (u, spec)
                break
            v = u.meta.get("val")
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(img_val.shape):
                frontier.append(u)
    if conv is None:
        return TokenMap("unknown", n_img, reason="no patch-embedding convolution is applied to the image input")
    node, (kernel, stride, padding, dilation, groups) = conv
    if kernel != stride or any(padding) or dilation != (1, 1):
        return TokenMap("unknown", n_img, reason=f"the convolution on the image input (kernel {kernel}, stride "
                                                 f"{stride}, padding {padding}) does not cut it into patches")
    out = node.meta["val"]
    gh, gw = int(out.shape[-2]), int(out.shape[-1])
    if gh * gw != n_img:
        return TokenMap("unknown", n_img, reason=f"the patch grid {gh}x{gw} does not match {n_img} image tokens")
    # push an index image [1, 1, gh, gw] through the shape operations up to the token stream
    idx = torch.arange(gh * gw, dtype=torch.float64).reshape(1, 1, gh, gw)
    B, D = int(out.shape[0]), int(out.shape[1])
    cur, value = node, idx
    for _ in range(32):
        users = [u for u in cur.users if isinstance(u.meta.get("val"), torch.Tensor)]
        if len(users) != 1:
            break
        u = users[0]
        info = analysis.token_info(u)
        v = u.meta["val"]
        try:
            value = _apply(gm, u, cur, value, B, D)
        except _Unsupported as e:
            return TokenMap("unknown", n_img, reason=str(e))
        cur = u
        if (isinstance(info, TokenInfo) and info.has_image() and v.ndim == 3 and info.axis == 1
                and value.ndim == 3 and value.shape[1] == v.shape[1] and value.shape[2] == 1):
            off, n = image_span(info.layout)
            order = value[0, off: off + n, 0].round().long()
            if n == n_img and sorted(order.tolist()) == list(range(gh * gw)):
                return TokenMap("patch", n_img, (int(kernel[0]), int(kernel[1])), (gh, gw), order)
    return TokenMap("unknown", n_img, reason="the path from the patch embedding to the token stream uses "
                                             "operations treadfx cannot replay on an index image")


class _Unsupported(Exception):
    pass


def _reduced(shape, B: int, D: int) -> list[int]:
    out = list(shape)
    if out and out[0] == B:
        out[0] = 1
    return [1 if s == D else s for s in out]


def _apply(gm: fx.GraphModule, node: fx.Node, src: fx.Node, value: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """Replay ``node`` on the reduced index tensor (batch and channel dims collapsed to 1)."""
    target = node.target
    v_out = node.meta["val"]
    if node.op == "call_method" and target in _SHAPE_METHODS or node.op == "call_function" and target in _SHAPE_FUNCS:
        name = target if isinstance(target, str) else target.__name__
        if name in ("reshape", "view"):
            return value.reshape(_reduced(v_out.shape, B, D))
        args = list(node.args[1:])
        kwargs = dict(node.kwargs)
        out = getattr(torch, name)(value, *args, **kwargs) if node.op == "call_function" else getattr(value, name)(*args, **kwargs)
        expected = _reduced(v_out.shape, B, D)
        if list(out.shape) != expected:
            out = out.reshape(expected) if out.numel() == torch.Size(expected).numel() else out
        return out
    # elementwise ops, norms and Linear act per position: the index image passes through unchanged
    if node.op == "call_function" and target in _PASS_FUNCS:
        return value
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PASS_MODULES):
        return value
    raise _Unsupported(f"`{getattr(target, '__name__', target)}` between the patch embedding and the token stream")
