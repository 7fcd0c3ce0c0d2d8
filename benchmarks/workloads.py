"""Benchmark workloads: a model preset, one fixed training batch, the loss, and its repeated blocks.

Presets (``--model``):

* ``tiny`` — a small DiT (depth 8, width 64, 16x16x4 input, patch 2: 64 tokens) for CPU and tests;
* ``dit-s2``, ``dit-b2``, ``dit-l2``, ``dit-xl2`` — the reference DiT (``treadfx.models.dit``) at 256 px
  (32x32x4 latents, 256 tokens), class-conditional (1000 classes, label dropout 0.1);
* ``flux`` — diffusers ``FluxTransformer2DModel`` with 2 double-stream + 4 single-stream blocks; on CUDA at
  Flux's real width (24 heads x 128 = 3072) and 512 px (1024 image tokens, 256 text tokens), on CPU at width 128;
* ``sd3`` — diffusers ``SD3Transformer2DModel`` with 8 joint blocks; on CUDA at SD3-medium width
  (24 heads x 64 = 1536) and 512 px (1024 image tokens, 256 text tokens), on CPU at width 128.

The objective is rectified flow (``x_t = (1-t) x0 + t eps``, target ``eps - x0``); the batch (``x_t``, ``t``,
conditioning, target) is drawn once, so every variant does exactly the same work per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["Workload", "MODELS", "DEPTHS", "SHRUNK_DEPTHS", "make_workload", "default_route"]

# name -> (default batch on cuda, default batch on cpu)
MODELS: dict[str, tuple[int, int]] = {
    "tiny": (64, 16),
    "dit-s2": (256, 8),
    "dit-b2": (256, 4),
    "dit-l2": (128, 2),
    "dit-xl2": (128, 2),
    "flux": (4, 2),
    "sd3": (8, 2),
}

# name -> length of the chain of repeated blocks (known without building the model)
DEPTHS: dict[str, int] = {"tiny": 8, "dit-s2": 12, "dit-b2": 12, "dit-l2": 24, "dit-xl2": 28, "flux": 6, "sd3": 8}

_DIT_SIZES = {"dit-s2": "S", "dit-b2": "B", "dit-l2": "L", "dit-xl2": "XL"}
# depths of the shrunk DiT presets (``make_workload(..., shrink=True)``): distinct, and deep enough for a route
SHRUNK_DEPTHS = {"dit-s2": 6, "dit-b2": 6, "dit-l2": 7, "dit-xl2": 7}


@dataclasses.dataclass
class Workload:
    """One model preset with its fixed batch; ``build()`` returns the same initial weights on every call."""

    name: str
    description: str
    device: torch.device
    batch_size: int
    depth: int  # length of the chain of repeated blocks
    build: Callable[[], nn.Module]
    args: tuple
    kwargs: dict
    target: torch.Tensor
    prediction: Callable[[Any], torch.Tensor]  # model output -> tensor compared with target
    block_lists: tuple[str, ...]  # attribute paths of the ModuleLists of repeated blocks (regional compile)
    is_dit: bool  # the hand-written reference TREAD applies (reference DiT only)

    def loss(self, model: nn.Module) -> torch.Tensor:
        """Forward + rectified-flow MSE on the fixed batch."""
        pred = self.prediction(model(*self.args, **self.kwargs))
        return (pred.float() - self.target).square().mean()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks of ``model`` (a model built by this workload, or a transformed one)."""
        out: list[nn.Module] = []
        for path in self.block_lists:
            out.extend(model.get_submodule(path))
        return out


def default_route(depth: int) -> tuple[int, int]:
    """start = min(2, depth//4), end = depth - min(4, depth//4 + 1): the paper's 2..depth-4 for depth >= 12."""
    start = min(2, depth // 4)
    end = depth - min(4, depth // 4 + 1)
    return start, end


def _rf_batch(x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow: t ~ U(0, 1), x_t = (1-t) x0 + t eps, target eps - x0."""
    b = x0.shape[0]
    t = torch.rand(b, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    tb = t.view(b, *([1] * (x0.ndim - 1)))
    return (1 - tb) * x0 + tb * eps, t, eps - x0


def _dit_workload(name: str, device: torch.device, batch: int, shrink: bool = False) -> Workload:
    from treadfx.models.dit import DiT, dit

    if shrink and name != "tiny":
        depth = SHRUNK_DEPTHS[name]
        cfg = dict(input_size=8, patch_size=2, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
        make = lambda: DiT(**cfg, class_dropout_prob=0.1)  # noqa: E731
        size, classes = 8, 10
        desc = (f"DiT-{_DIT_SIZES[name]}/2 shrunk for a smoke run: depth {depth}, width 32, 2 heads, "
                f"8x8x4 input, patch 2 (16 tokens)")
    elif name == "tiny":
        cfg = dict(input_size=16, patch_size=2, hidden_size=64, depth=8, num_heads=4, num_classes=10)
        make = lambda: DiT(**cfg, class_dropout_prob=0.1)  # noqa: E731
        depth, size, classes, desc = 8, 16, 10, "tiny DiT: depth 8, width 64, 4 heads, 16x16x4 input, patch 2 (64 tokens)"
    else:
        make = lambda: dit(_DIT_SIZES[name], 2)  # noqa: E731
        depth = DEPTHS[name]
        size, classes = 32, 1000
        desc = f"DiT-{_DIT_SIZES[name]}/2, 256 px (32x32x4 latents, 256 tokens), class-conditional"
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, size, size, generator=g)
    xt, t, target = _rf_batch(x0, g)
    y = torch.randint(0, classes, (batch,), generator=g)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return make().to(device).train()

    return Workload(name, desc, device, batch, depth, build,
                    (xt.to(device), (t * 1000).to(device), y.to(device)), {}, target.to(device),
                    lambda out: out[:, :4], ("blocks",), True)


def _flux_workload(device: torch.device, batch: int) -> Workload:
    from diffusers import FluxTransformer2DModel

    gpu = device.type == "cuda"
    heads, head_dim = (24, 128) if gpu else (2, 64)
    rope = (16, 56, 56) if gpu else (8, 28, 28)
    grid, text, joint, pooled, cin = (32, 256, 4096, 768, 64) if gpu else (8, 16, 64, 32, 16)
    cfg = dict(patch_size=1, in_channels=cin, num_layers=2, num_single_layers=4, attention_head_dim=head_dim,
               num_attention_heads=heads, joint_attention_dim=joint, pooled_projection_dim=pooled,
               axes_dims_rope=rope)
    n = grid * grid
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, n, cin, generator=g)
    xt, t, target = _rf_batch(x0, g)
    ii, jj = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    img_ids = torch.stack([torch.zeros(n), ii.flatten().float(), jj.flatten().float()], dim=1)
    kwargs = dict(encoder_hidden_states=torch.randn(batch, text, joint, generator=g).to(device),
                  pooled_projections=torch.randn(batch, pooled, generator=g).to(device),
                  timestep=t.to(device), img_ids=img_ids.to(device), txt_ids=torch.zeros(text, 3).to(device),
                  return_dict=False)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return FluxTransformer2DModel(**cfg).to(device).train()

    desc = (f"diffusers Flux, 2 double + 4 single blocks, width {heads * head_dim} ({heads}x{head_dim}), "
            f"{n} image + {text} text tokens")
    return Workload("flux", desc, device, batch, 6, build, (xt.to(device),), kwargs, target.to(device),
                    lambda out: out[0], ("transformer_blocks", "single_transformer_blocks"), False)


def _sd3_workload(device: torch.device, batch: int) -> Workload:
    from diffusers import SD3Transformer2DModel

    gpu = device.type == "cuda"
    heads = 24 if gpu else 2
    sample, text, joint, pooled, cin = (64, 256, 4096, 2048, 16) if gpu else (16, 16, 64, 32, 4)
    cfg = dict(sample_size=sample, patch_size=2, in_channels=cin, num_layers=8, attention_head_dim=64,
               num_attention_heads=heads, joint_attention_dim=joint, caption_projection_dim=heads * 64,
               pooled_projection_dim=pooled, out_channels=cin, pos_embed_max_size=max(96, sample))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, cin, sample, sample, generator=g)
    xt, t, target = _rf_batch(x0, g)
    kwargs = dict(encoder_hidden_states=torch.randn(batch, text, joint, generator=g).to(device),
                  pooled_projections=torch.randn(batch, pooled, generator=g).to(device),
                  timestep=(t * 1000).to(device), return_dict=False)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return SD3Transformer2DModel(**cfg).to(device).train()

    n = (sample // 2) ** 2
    desc = f"diffusers SD3, 8 joint blocks, width {heads * 64} ({heads}x64), {n} image + {text} text tokens"
    return Workload("sd3", desc, device, batch, 8, build, (xt.to(device),), kwargs, target.to(device),
                    lambda out: out[0], ("transformer_blocks",), False)


def make_workload(name: str, device: torch.device | str, batch: int | None = None, shrink: bool = False) -> Workload:
    """The workload ``name`` (one of :data:`MODELS`) on ``device``; ``batch`` defaults per device.

    ``shrink=True`` (DiT presets only) makes the model tiny for smoke runs:
    depth :data:`SHRUNK_DEPTHS`, width 32, 2 heads, 16 tokens, 10 classes.
    """
    device = torch.device(device)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if shrink and name not in _DIT_SIZES:
        raise ValueError(f"shrink=True applies to the DiT presets ({', '.join(_DIT_SIZES)}), not {name!r}")
    if batch is None:
        batch = MODELS[name][0 if device.type == "cuda" else 1]
    if name == "flux":
        return _flux_workload(device, batch)
    if name == "sd3":
        return _sd3_workload(device, batch)
    return _dit_workload(name, device, batch, shrink)
