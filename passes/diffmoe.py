"""DiffMoE ("Dynamic Token Selection for Scalable Diffusion Transformers") as a treadfx pass.

``treadfx.diffmoe(model, ...)`` replaces the feed-forward network (FFN) of the
repeated blocks with a :class:`treadfx.moe.DiffMoELayer`.  The FFN of a block
is found through the block's graph, never by name:

1. *candidates*: children of the block (the first level of the module tree
   that has any) that are token-wise MLPs: two or more ``nn.Linear`` from
   ``D`` to ``H`` ... back to ``D``, and a numerical probe on ``[2, 3, D]``
   shows that the output is ``[2, 3, D]``, that changing one token changes
   only that token's output and that permuting tokens permutes outputs;
2. *graph*: the block is traced with its children as leaves (treadfx's
   specialising tracer on the block's real input signature when
   ``example_inputs`` are given; ``torch.fx`` symbolic tracing otherwise),
   and a candidate is kept only if its call takes a tensor derived from the
   block's token input (``[..., D]`` with the same ``D`` when shapes are
   known) and feeds the block output.  When the block cannot be traced
   without inputs (diffusers blocks branch on ``x.ndim``), the structural
   candidates alone decide.  Which rule decided is recorded per block
   (``DiffMoEPass.matches``; the converted model keeps them in
   ``model._treadfx_diffmoe_matches``).

Exactly one FFN per block, or :class:`~treadfx.FFNNotFoundError` naming the
block and the ``ffn=`` fix.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from treadfx.blocks import find_block_candidates
from treadfx.errors import FFNNotFoundError, InvalidMoEConfigError, NoBlocksFoundError, TransformError
from treadfx.graph_walk import depends_on, feeds_output
from treadfx.moe import DiffMoELayer, diffmoe_layers

__all__ = ["diffmoe", "DiffMoEPass", "FFNMatch", "find_ffn", "tokenwise_mlp_dims", "diffmoe_block_indices"]


@dataclasses.dataclass
class FFNMatch:
    """The feed-forward submodule found in one block."""

    block_index: int
    block_path: str
    name: str          # path inside the block, e.g. "mlp" or "ff"
    dim: int           # D
    hidden: int        # output features of the first Linear (H, or 2H for gated FFNs)
    how: str           # "ffn= override", "graph (traced on example inputs)", "graph (torch.fx)", "structure"

    @property
    def path(self) -> str:
        return f"{self.block_path}.{self.name}"


# ----------------------------------------------------------------------------------- token-wise MLP


def tokenwise_mlp_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(D, H)`` if ``module`` is a token-wise MLP ``Linear(D, H) ... Linear(., D)``, else None.

    Guarantees: for a module on a real device the answer is backed by a
    numerical probe in eval mode (shape kept, each output token depends on its
    own input token only, the same function at every position); the module's
    training flags are restored and nothing else is changed.  Meta-device
    modules are judged by structure only.
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2 or linears[0].in_features != linears[-1].out_features:
        return None
    D, H = linears[0].in_features, linears[0].out_features
    w = linears[0].weight
    if w.device.type == "meta":
        return D, H
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, D, generator=g).to(w.device, w.dtype)
        x2 = x.clone()
        x2[1, 2] = torch.randn(D, generator=g).to(w.device, w.dtype)
        perm = torch.randperm(6, generator=g).to(w.device)
        with torch.no_grad():
            y = module(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return None
            y2 = module(x2)
            yp = module(x.reshape(6, D)[perm].reshape(2, 3, D))
        tol = (1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2) * (1 + float(y.abs().max()))
        diff = (y2 - y).abs().amax(-1)
        changed = diff > tol
        if not bool(changed[1, 2]) or int(changed.sum()) != 1:
            return None
        if float((yp.reshape(6, D) - y.reshape(6, D)[perm]).abs().max()) > tol:
            return None
        return D, H
    except Exception:
        return None
    finally:
        for m, f in flags:
            m.training = f


def _candidates(block: nn.Module) -> dict[str, tuple[int, int]]:
    """Token-wise MLP children of ``block``; if no child is one, the first deeper level that has any."""
    level = [(n, c) for n, c in block.named_children()]
    while level:
        found = {}
        for name, child in level:
            dims = tokenwise_mlp_dims(child)
            if dims is not None:
                found[name] = dims
        if found:
            return found
        level = [(f"{n}.{cn}", cc) for n, c in level for cn, cc in c.named_children()]
    return {}


# ----------------------------------------------------------------------------------- block graphs


class _ChildLeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[nn.Module]):
        super().__init__()
        self._leaf_ids = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaf_ids or super().is_leaf_module(m, qualname)


def _leaf_names(block: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    return [block.get_submodule(n) for n in names]


def _graph_filter_fx(block: nn.Module, cands: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]] | None:
    """Candidates whose call takes the block's first input (the tokens) and feeds its output; None if untraceable."""
    try:
        tracer = _ChildLeafTracer(_leaf_names(block, list(cands)) + list(block.children()))
        graph = tracer.trace(block)
    except Exception:
        return None
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if not phs:
        return None
    tokens = {phs[0]}
    keep = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in cands and node.args and isinstance(node.args[0], fx.Node):
            if depends_on(node.args[0], tokens) and feeds_output(node):
                keep[node.target] = cands[node.target]
    return keep


def _graph_filter_traced(block: nn.Module, cands: dict[str, tuple[int, int]], args: tuple, kwargs: dict
                         ) -> dict[str, tuple[int, int]] | None:
    """Like :func:`_graph_filter_fx`, on the block traced with its real (fake) input signature: the call's
    input is ``[..., D]``, derived from a ``[..., D]`` block input, and its output has the input's shape."""
    from treadfx.tracing import trace

    try:
        prog = trace(block, type(block).forward, args, kwargs,
                     leaves=_leaf_names(block, list(cands)) + list(block.children()))
    except Exception:
        return None
    keep = {}
    phs = [n for n in prog.gm.graph.nodes if n.op == "placeholder"]
    for node in prog.gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target).removeprefix(prog.model_root + ".")
        if name not in cands or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        D = cands[name][0]
        inp, out = node.args[0].meta.get("val"), node.meta.get("val")
        if not (isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor)):
            continue
        if inp.ndim < 2 or inp.shape[-1] != D or out.shape != inp.shape:
            continue
        token_inputs = {p for p in phs if isinstance(p.meta.get("val"), torch.Tensor)
                        and p.meta["val"].ndim >= 2 and p.meta["val"].shape[-1] == D}
        if depends_on(node.args[0], token_inputs) and feeds_output(node):
            keep[name] = cands[name]
    return keep


def _block_inputs(model: nn.Module, blocks: Sequence[nn.Module], args: tuple, kwargs: dict) -> dict[int, tuple]:
    """Fake ``(args, kwargs)`` of every call of each block, from one trace of the model with blocks as leaves."""
    from treadfx.transformed import is_transformed, state_of
    from treadfx.tracing import trace

    forward = state_of(model).original_forward if is_transformed(model) else type(model).forward
    prog = trace(model, forward, tuple(args), dict(kwargs), leaves=list(blocks))
    by_id = {id(b): b for b in blocks}
    out: dict[int, tuple] = {}
    for node in prog.gm.graph.nodes:
        if node.op == "call_module":
            mod = prog.gm.get_submodule(node.target)
            if id(mod) in by_id and id(mod) not in out:
                a, k = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
                out[id(mod)] = (tuple(a), dict(k))
    return out


def find_ffn(block: nn.Module, block_path: str, block_index: int = 0, ffn: str | None = None,
             block_call: tuple | None = None) -> FFNMatch:
    """The feed-forward submodule of ``block`` (see the module docstring for the rule).

    Raises :class:`~treadfx.FFNNotFoundError` naming the block when there is
    none or more than one, or when ``ffn`` names no suitable submodule.
    """
    cls = type(block).__name__
    if ffn is not None:
        try:
            sub = block.get_submodule(ffn)
        except AttributeError:
            children = ", ".join(n for n, _ in block.named_children())
            raise FFNNotFoundError(
                f"ffn={ffn!r} is not a submodule of block `{block_path}` ({cls}), whose children are: {children}. "
                f"Fix: pass the path of the feed-forward module inside each block, e.g. ffn='mlp'."
            ) from None
        linears = [m for m in sub.modules() if isinstance(m, nn.Linear)]
        if not linears or linears[0].in_features != linears[-1].out_features:
            raise FFNNotFoundError(
                f"ffn={ffn!r} in block `{block_path}` ({cls}) is a {type(sub).__name__} without a Linear D->...->D "
                "path, so it cannot be copied into experts of the same shape. Fix: name the feed-forward module "
                "(Linear D->H, activation, Linear H->D)."
            )
        return FFNMatch(block_index, block_path, ffn, linears[0].in_features, linears[0].out_features, "ffn= override")
    cands = _candidates(block)
    how = "structure"
    found = cands
    if cands:
        graph = None
        if block_call is not None:
            graph = _graph_filter_traced(block, cands, *block_call)
            how = "graph (traced on example inputs)"
        if graph is None:
            graph = _graph_filter_fx(block, cands)
            how = "graph (torch.fx)"
        if graph is None:
            how = "structure"
        else:
            found = graph
    if not found:
        raise FFNNotFoundError(
            f"block `{block_path}` ({cls}) has no feed-forward submodule: no child is a token-wise MLP "
            f"(Linear D->H, activation, Linear H->D) called on the block's [..., D] tokens. "
            f"Fix: name it with treadfx.diffmoe(..., ffn='<path inside the block>'), e.g. ffn='mlp'."
        )
    if len(found) > 1:
        names = ", ".join(f"`{n}`" for n in found)
        raise FFNNotFoundError(
            f"block `{block_path}` ({cls}) has several feed-forward candidates: {names}. "
            f"Fix: name one with treadfx.diffmoe(..., ffn='{next(iter(found))}')."
        )
    name, (D, H) = next(iter(found.items()))
    return FFNMatch(block_index, block_path, name, D, H, how)


# ----------------------------------------------------------------------------------- the pass


def diffmoe_block_indices(num_blocks: int, interleave: bool) -> list[int]:
    """Blocks that get a DiffMoE layer: all, or with ``interleave`` the odd ones (1, 3, 5, ...)."""
    return list(range(1, num_blocks, 2)) if interleave else list(range(num_blocks))


def _check_number(name: str, value: Any, ok, rule: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise InvalidMoEConfigError(f"{name}={value!r} {rule}. Fix: {fix}.")
    return float(value)


@dataclasses.dataclass
class DiffMoEConfig:
    """The validated arguments of ``diffmoe`` (experts, capacity, which blocks, predictor and threshold settings)."""

    num_experts: int = 8
    capacity: float = 1.0
    interleave: bool = True
    shared_expert: bool = False
    predictor_loss_weight: float = 1.0
    threshold_decay: float = 0.95
    noise_std: float = 0.01
    seed: int | None = None
    ffn: str | None = None
    layer_options: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`~treadfx.InvalidMoEConfigError` (exact message with the fix) for a bad argument."""
        n = self.num_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidMoEConfigError(f"num_experts={n!r} must be an int >= 1. Fix: e.g. num_experts=8.")
        _check_number("capacity", self.capacity, lambda v: v > 0,
                      "must be a number > 0 (experts per token on average; 1.0 keeps the dense FFN compute)",
                      "e.g. capacity=1.0")
        _check_number("predictor_loss_weight", self.predictor_loss_weight, lambda v: v >= 0,
                      "must be a number >= 0", "e.g. predictor_loss_weight=1.0")
        _check_number("threshold_decay", self.threshold_decay, lambda v: 0 <= v < 1,
                      "must be a number in [0, 1) (EMA decay of the capacity thresholds)", "e.g. threshold_decay=0.95")
        _check_number("noise_std", self.noise_std, lambda v: v >= 0,
                      "must be a number >= 0 (relative noise on expert weights)", "e.g. noise_std=0.01, or 0 for exact copies")
        sched = self.layer_options.get("capacity_schedule")
        if sched is not None and not (isinstance(sched, (tuple, list)) and len(sched) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sched)):
            raise InvalidMoEConfigError(
                f"capacity_schedule={sched!r} must be (dense_steps, ramp_steps), two ints >= 0. "
                "Fix: e.g. capacity_schedule=(10000, 20000), or None for the configured capacity from the start.")
        impl = self.layer_options.get("experts_impl", "grouped")
        if impl not in ("grouped", "bmm", "loop"):
            raise InvalidMoEConfigError(f"experts_impl={impl!r} must be 'grouped', 'bmm' or 'loop'. "
                                        "Fix: e.g. experts_impl='grouped'.")
        static = self.layer_options.get("static_capacity")
        if static is not None:
            _check_number("static_capacity", static, lambda v: v > 0,
                          "must be a number > 0 (slots per expert relative to S / E * capacity)",
                          "e.g. static_capacity=2.0, or None for the dynamic inference")
        if self.layer_options.get("init", "official") not in ("official", "treadfx"):
            raise InvalidMoEConfigError(f"init={self.layer_options['init']!r} must be 'official' or 'treadfx'. "
                                        "Fix: e.g. init='official'.")
        if self.ffn is not None and not isinstance(self.ffn, str):
            raise InvalidMoEConfigError(f"ffn={self.ffn!r} must be a str path inside each block. Fix: e.g. ffn='mlp'.")


class DiffMoEPass:
    """Finds the FFN of each selected block (``analyse``) and swaps in DiffMoE layers (``apply``).

    ``matches`` lists, per converted block, the FFN found and which rule found it.
    """

    def __init__(self, config: DiffMoEConfig):
        config.validate()
        self.config = config
        self.matches: list[FFNMatch] = []

    def analyse(self, model: nn.Module, example_inputs: tuple | None = None,
                example_kwargs: dict | None = None) -> list[FFNMatch]:
        """Find the FFN of every block to convert; raises before anything is changed."""
        candidates = find_block_candidates(model)
        if not candidates:
            raise NoBlocksFoundError(
                f"{type(model).__name__} has no repeated blocks: no ModuleList/Sequential holds two or more "
                "submodules of the same class, so treadfx.diffmoe has no FFNs to convert. Fix: keep the transformer "
                "blocks in an nn.ModuleList (as DiT, diffusers and timm do)."
            )
        calls: dict[int, tuple] = {}
        if example_inputs is not None:
            calls = _block_inputs(model, [c.module for c in candidates], tuple(example_inputs),
                                  dict(example_kwargs or {}))
        self.matches = []
        for i in diffmoe_block_indices(len(candidates), self.config.interleave):
            c = candidates[i]
            self.matches.append(find_ffn(c.module, c.path, i, self.config.ffn, calls.get(id(c.module))))
        return self.matches

    def apply(self, model: nn.Module) -> list[DiffMoELayer]:
        """Replace each analysed FFN of ``model`` (same module paths) by a DiffMoE layer built from it."""
        cfg = self.config
        gen = torch.Generator()
        gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ())))
        layers = []
        for m in self.matches:
            parent_path, _, attr = m.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            ffn = getattr(parent, attr)
            layer = DiffMoELayer(ffn, m.dim, cfg.num_experts, cfg.capacity, cfg.shared_expert,
                                 cfg.predictor_loss_weight, cfg.threshold_decay, cfg.noise_std, gen,
                                 **cfg.layer_options)
            setattr(parent, attr, layer)
            layers.append(layer)
        return layers


def diffmoe(
    model: nn.Module,
    num_experts: int = 8,
    capacity: float = 1.0,
    interleave: bool = True,
    shared_expert: bool = False,
    predictor_loss_weight: float = 1.0,
    threshold_decay: float = 0.95,
    noise_std: float = 0.01,
    inplace: bool = False,
    seed: int | None = None,
    *,
    ffn: str | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    capacity_schedule: tuple[int, int] | None = None,
    experts_impl: str = "grouped",
    static_capacity: float | None = None,
    fp32_router: bool = True,
    clamp_k: bool = True,
    topk_before_calibration: bool = False,
    init: str = "official",
) -> nn.Module:
    """Return ``model`` with the FFN of its repeated blocks replaced by DiffMoE layers.

    Guarantees: every invalid argument, a model without repeated blocks, and
    a block whose FFN cannot be identified raise a
    :class:`~treadfx.TransformError` subclass before anything is changed;
    ``model`` is not mutated unless ``inplace=True`` (otherwise the result is
    a ``copy.deepcopy``); with ``interleave=True`` blocks 1, 3, 5, ... (0-based,
    module order) are converted and the others stay dense, else every block;
    each expert is a deep copy of the block's FFN with relative Gaussian noise
    ``noise_std * std(weight)`` added to each weight (``seed`` fixes it), so
    with ``num_experts=1``, ``capacity=1``, ``noise_std=0`` a training forward
    equals the dense model's.  Works on a ``treadfx.transform``-ed model too
    (its traced-program cache is cleared).  ``ffn='mlp'`` names the FFN inside
    each block instead of finding it; ``example_inputs`` lets the finder
    trace each block on its real input signature.

    The layer follows the official DiffMoE algorithm; ``capacity_schedule``
    (``(dense_steps, ramp_steps)``, the official schedule, off by default),
    ``experts_impl`` ("grouped", "bmm", "loop"), ``static_capacity`` (fixed
    expert slots at inference, compiles with ``fullgraph=True``) and
    treadfx's own choices ``fp32_router``, ``clamp_k``,
    ``topk_before_calibration``, ``init`` are passed to every
    :class:`~treadfx.moe.DiffMoELayer` (see ``docs/diffmoe.md``).
    """
    from treadfx.transformed import is_transformed, state_of

    config = DiffMoEConfig(num_experts, capacity, bool(interleave), bool(shared_expert), predictor_loss_weight,
                           threshold_decay, noise_std, seed, ffn,
                           dict(capacity_schedule=capacity_schedule, experts_impl=experts_impl,
                                static_capacity=static_capacity, fp32_router=bool(fp32_router),
                                clamp_k=bool(clamp_k), topk_before_calibration=bool(topk_before_calibration),
                                init=init))
    if not isinstance(model, nn.Module):
        raise TransformError(f"diffmoe() needs a torch.nn.Module, got {type(model).__name__}. Fix: pass the model.")
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or hasattr(model, "_orig_mod"):
        raise TransformError(
            f"diffmoe() got a {type(model).__name__} wrapper. Fix: convert the bare model first, then wrap it "
            "(DDP / FSDP / torch.compile)."
        )
    p = DiffMoEPass(config)  # validates
    if diffmoe_layers(model):
        raise TransformError(
            f"{type(model).__name__} already has DiffMoE layers. Fix: convert the original dense model once."
        )
    p.analyse(model, example_inputs, example_kwargs)
    target = model if inplace else copy.deepcopy(model)
    p.apply(target)
    if is_transformed(target):  # traced TREAD programs ran the old FFNs' fake shapes: re-trace lazily
        st = state_of(target)
        st.programs.clear()
        st.current = None
        if hasattr(st, "record"):
            st.record(None, [])
        else:
            st.last_program = None
    target.__dict__["_treadfx_diffmoe_matches"] = list(p.matches)
    return target
