"""Is a block order dependent?  A numerical permutation probe.

Attention blocks (with their position information passed in as token-aligned
side inputs) are permutation-equivariant over tokens: permuting the input
tokens permutes the output tokens.  Scans (Mamba, RWKV) are not, and a route
through them must keep the kept tokens in their original relative order.

The probe runs one block per distinct structure on random inputs of batch 1
and a small random subset of image tokens, once in order and once permuted,
in eval mode and without gradients, and compares.  It never changes the
block's parameters, and restores its training flags.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .fake_eval import module_structure_key
from .layout import LayoutAnalysis, TokenInfo, image_span

__all__ = ["make_order_probe"]


def _random_like(t: torch.Tensor, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=t.dtype, device=t.device)
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=t.device)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _take(x: torch.Tensor, info: TokenInfo, positions: torch.Tensor) -> torch.Tensor:
    """x with its image segment replaced by the image tokens at ``positions`` (others kept)."""
    off, n = image_span(info.layout)
    total = x.shape[info.axis]
    full = torch.cat([
        torch.arange(off), positions + off, torch.arange(off + n, total)
    ]).to(x.device)
    return x.index_select(info.axis, full)


def make_order_probe(prog, analysis: LayoutAnalysis, tokens: int = 16, tol: float = 1e-3):
    """A callable(chain, start, end, entering, stream) -> path of an order-dependent block, or None."""
    cache: dict[Any, bool] = {}

    def probe(chain, start, end, entering, stream) -> str | None:
        side = {d.node: TokenInfo(d.axis, d.layout, d.batched) for d in entering if d.action == "gather"}
        for node in chain.nodes[start: end + 1]:
            module = prog.gm.get_submodule(node.target)
            key = module_structure_key(module)
            if key not in cache:
                cache[key] = _dependent(prog, analysis, node, module, side, tokens, tol)
            if cache[key]:
                return prog.model_path(node)
        return None

    return probe


def _dependent(prog, analysis: LayoutAnalysis, node: fx.Node, module, side, tokens: int, tol: float) -> bool:
    gen = torch.Generator().manual_seed(0)
    infos: dict[fx.Node, TokenInfo] = {}
    for inp in node.all_input_nodes:
        info = side.get(inp) or analysis.token_info(inp)
        if isinstance(info, TokenInfo) and info.has_image():
            infos[inp] = info
    if not infos:
        return False
    n_img = image_span(next(iter(infos.values())).layout)[1]
    k = min(tokens, n_img)
    if k < 2:
        return False
    subset = torch.randperm(n_img, generator=gen)[:k].sort().values
    perm = torch.randperm(k, generator=gen)
    while k > 1 and torch.equal(perm, torch.arange(k)):
        perm = torch.randperm(k, generator=gen)

    def build(permute: bool):
        def value(n: fx.Node):
            v = n.meta.get("val")
            if not isinstance(v, torch.Tensor):
                return v
            shape = list(v.shape)
            if analysis.is_batched_value(n, v):
                shape[0] = 1
            return n, shape

        env: dict[fx.Node, torch.Tensor] = {}
        gen_local = torch.Generator().manual_seed(1)
        for inp in node.all_input_nodes:
            v = inp.meta.get("val")
            if not isinstance(v, torch.Tensor):
                continue
            shape = list(v.shape)
            if analysis.is_batched_value(inp, v):
                shape[0] = 1
            x = _random_like(v, shape, gen_local)
            info = infos.get(inp)
            if info is not None:
                pos = subset[perm] if permute else subset
                x = _take(x, info, pos)
            env[inp] = x
        return fx.node.map_arg((node.args, node.kwargs), lambda n: env.get(n, n.meta.get("val")))

    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            a_args, a_kwargs = build(False)
            b_args, b_kwargs = build(True)
            out_a = module(*a_args, **a_kwargs)
            out_b = module(*b_args, **b_kwargs)
    except Exception:
        return False  # cannot probe numerically; routing is still shape-checked elsewhere
    finally:
        for m, f in flags:
            m.training = f
    leaves_a, leaves_b = pytree.tree_leaves(out_a), pytree.tree_leaves(out_b)
    out_infos = analysis.info.get(node)
    out_infos = out_infos if isinstance(out_infos, list) else [out_infos]
    for j, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        info = out_infos[j] if j < len(out_infos) else None
        if isinstance(info, TokenInfo) and info.has_image():
            off, _ = image_span(info.layout)
            idx = torch.cat([torch.arange(off), perm + off, torch.arange(off + k, a.shape[info.axis])]).to(a.device)
            a = a.index_select(info.axis, idx)
        scale = a.float().abs().max().clamp_min(1e-6)
        if ((a.float() - b.float()).abs().max() / scale) > tol:
            return True
    return False
