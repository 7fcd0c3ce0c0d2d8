"""Is a block order dependent?  A numerical permutation probe.

Attention blocks (with their position information passed in as token-aligned
side inputs) are permutation-equivariant over tokens: permuting the input
tokens permutes the output tokens.  Scans (Mamba, RWKV) are not, and a route
through them must keep the kept tokens in their original relative order.

The probe runs one block per distinct structure on random inputs of batch 1
and a small random subset of image tokens, once in order and once permuted,
in eval mode and without gradients, and compares.  It calls
``module.forward`` directly (the block's own forward hooks do not run), draws
from private generators and restores torch's global RNG state, never changes
the block's parameters, and restores its training flags and the last-forward
statistics of its DiffMoE layers.  A probe that raises
proves nothing: the finding says so, and the planner then keeps tokens
sorted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .fake_eval import module_structure_key
from .layout import LayoutAnalysis, TokenInfo, image_span
from .moe import statistics_kept
from .ops import gather_op

__all__ = ["make_order_probe", "OrderFinding"]


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


@dataclasses.dataclass(frozen=True)
class OrderFinding:
    """What the order probe found for the blocks of one route.

    ``dependent``: path of a block shown to be order dependent, or None.
    ``unproven``: why equivariance could not be shown (the probe failed), or None.
    Both None: every routed block is permutation-equivariant over tokens.
    """

    dependent: str | None = None
    unproven: str | None = None


def make_order_probe(prog, analysis: LayoutAnalysis, tokens: int = 16, tol: float = 1e-3):
    """A callable(chain, start, end, entering, stream) -> :class:`OrderFinding` for blocks ``start..end``.

    Each distinct block structure is probed once (cached).  The probe calls
    ``module.forward`` directly (no forward hooks of the block run), draws its
    random inputs from a private generator and leaves torch's global RNG
    state as it found it.
    """
    cache: dict[Any, str | bool] = {}  # True: dependent, False: equivariant, str: why the probe failed

    def probe(chain, start, end, entering, stream) -> OrderFinding:
        side = {d.node: TokenInfo(d.axis, d.layout, d.batched) for d in entering
                if d.action == "gather" and getattr(d, "parts", None) is None}
        # masks with several token axes and modules holding token tables: taken by their own gather op
        side.update({d.node: d for d in entering if d.action == "gather" and getattr(d, "parts", None) is not None})
        unproven = None
        for node in chain.nodes[start: end + 1]:
            module = prog.gm.get_submodule(node.target)
            key = module_structure_key(module)
            if key not in cache:
                cache[key] = _dependent(analysis, node, module, side, tokens, tol)
            if cache[key] is True:
                return OrderFinding(dependent=prog.model_path(node))
            if isinstance(cache[key], str) and unproven is None:
                unproven = f"probing `{prog.model_path(node)}` failed: {cache[key]}"
        return OrderFinding(unproven=unproven)

    return probe


def _image_inputs(analysis: LayoutAnalysis, node: fx.Node, side) -> dict[fx.Node, TokenInfo]:
    infos: dict[fx.Node, TokenInfo] = {}
    for inp in node.all_input_nodes:
        info = side.get(inp) or analysis.token_info(inp)
        if not isinstance(info, TokenInfo) and info is not None:
            infos[inp] = info  # a decision with parts (see _probe_inputs)
        elif isinstance(info, TokenInfo) and info.has_image():
            infos[inp] = info
    return infos


def _probe_inputs(analysis: LayoutAnalysis, node: fx.Node, infos, positions: torch.Tensor):
    """(args, kwargs) for one block call: random batch-1 inputs, image tokens taken at ``positions``."""
    env: dict[fx.Node, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)  # the same draws for the plain and the permuted call
    for inp in node.all_input_nodes:
        v = inp.meta.get("val")
        info = infos.get(inp)
        if info is not None and not isinstance(info, TokenInfo) and isinstance(v, torch.nn.Module):
            env[inp] = gather_op(info, False)(v, positions)  # the module's tables at the same positions
            continue
        if not isinstance(v, torch.Tensor):
            continue
        shape = list(v.shape)
        if analysis.is_batched_value(inp, v):
            shape[0] = 1
        x = _random_like(v, shape, gen)
        if isinstance(info, TokenInfo):
            x = _take(x, info, positions)
        elif info is not None:
            x = gather_op(info, False)(x, positions)
        env[inp] = x
    return fx.node.map_arg((node.args, node.kwargs), lambda n: env.get(n, n.meta.get("val")))


def _cuda_devices(args) -> list[int]:
    return sorted({t.device.index or 0 for t in pytree.tree_leaves(args)
                   if isinstance(t, torch.Tensor) and t.device.type == "cuda"})


def _run_block(module, call_args) -> Any:
    """``module.forward`` in eval mode without gradients, hooks or global-RNG side effects; restores training
    flags and the last-forward statistics of DiffMoE layers inside (``diffmoe_loss`` / ``diffmoe_stats`` read
    them after the user's own forward)."""
    flags = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    devices = _cuda_devices((call_args, params))
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices), statistics_kept(module):
            return module.forward(*call_args[0], **call_args[1])
    finally:
        for m, f in flags:
            m.training = f


def _dependent(analysis: LayoutAnalysis, node: fx.Node, module, side, tokens: int, tol: float) -> bool | str:
    """True if the block is order dependent, False if equivariant, or why the probe could not run."""
    gen = torch.Generator().manual_seed(0)
    infos = _image_inputs(analysis, node, side)
    if not any(isinstance(i, TokenInfo) for i in infos.values()):
        return False
    n_img = image_span(next(i for i in infos.values() if isinstance(i, TokenInfo)).layout)[1]
    k = min(tokens, n_img)
    if k < 2:
        return False  # one kept token has one order
    subset = torch.randperm(n_img, generator=gen)[:k].sort().values
    perm = torch.randperm(k, generator=gen)
    while torch.equal(perm, torch.arange(k)):
        perm = torch.randperm(k, generator=gen)
    try:
        out_a = _run_block(module, _probe_inputs(analysis, node, infos, subset))
        out_b = _run_block(module, _probe_inputs(analysis, node, infos, subset[perm]))
    except Exception as e:  # noqa: BLE001 - reported as the reason equivariance is not shown
        return f"{type(e).__name__}: {e}"
    return _differs(analysis, node, out_a, out_b, perm, k, tol)


def _differs(analysis: LayoutAnalysis, node: fx.Node, out_a, out_b, perm: torch.Tensor, k: int, tol: float) -> bool:
    """True if the permuted call's outputs are not the plain call's outputs permuted (relative error > tol)."""
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
