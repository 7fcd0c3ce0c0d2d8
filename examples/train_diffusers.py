"""Fine-tune a diffusers Flux transformer with TREAD: flow matching, gradient checkpointing, optional LoRA.

    pip install -e ".[examples]"
    python examples/train_diffusers.py --steps 20                         # tiny random Flux, CPU, seconds
    python examples/train_diffusers.py --model /path/to/FLUX.1-dev --subfolder transformer \\
        --device cuda --dtype bf16 --lora 16 --steps 1000                 # a real one from a local path

The model is ``FluxTransformer2DModel``: a tiny random one by default, or one
loaded with ``from_pretrained`` from a local path. The training data here are
random latents and text embeddings of the right shapes (put your own loader in
``batches``): the point is the wiring, which is the same for a real run:

1. build or load the transformer; ``enable_gradient_checkpointing()`` and the
   LoRA adapter (``add_adapter``, peft) go on the bare model, before treadfx;
2. ``treadfx.transform(model, start=2, end=-4, ratio=0.5)`` -- the one TREAD
   line. On Flux the double-stream blocks and then the single-stream blocks
   form one chain (``start``/``end`` count along both);
3. flow matching (rectified flow, as Flux and SD3 are trained): ``x_t = (1 - t) x0
   + t noise``, the model predicts ``noise - x0``; Flux takes ``t`` in [0, 1];
4. save with ``save_pretrained`` (full fine-tune: a plain diffusers checkpoint;
   with ``--lora``: the adapter, via ``save_lora_adapter``).

``main(argv)`` returns the losses, the transformed model, the bare model it
routes, the initial state and the output directory (used by the tests).
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

import treadfx

#: the tiny random Flux: 2 double-stream + 3 single-stream blocks, 16 image tokens of 8 channels, text length 5
TINY_FLUX = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local diffusers model path (default: a tiny random Flux)")
    p.add_argument("--subfolder", default=None, help="subfolder of --model holding the transformer")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tokens", type=int, default=16, help="image tokens per sample (a square number)")
    p.add_argument("--text-len", type=int, default=5)
    p.add_argument("--start", type=int, default=1, help="first routed block of the joint+single chain")
    p.add_argument("--end", type=int, default=-2, help="last routed block (negatives count from the end)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of image tokens that skip the route")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="train a LoRA adapter of this rank (peft)")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="keep every activation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="parameter dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="flux_tread_out", help="output directory for save_pretrained")
    return p


def load_transformer(path: str | None, subfolder: str | None, dtype: torch.dtype) -> torch.nn.Module:
    """A ``FluxTransformer2DModel``: from ``path`` (local files only) or the tiny random configuration."""
    from diffusers import FluxTransformer2DModel

    if path is None:
        model = FluxTransformer2DModel(**TINY_FLUX)
        return model if dtype == torch.float32 else model.to(dtype)
    return FluxTransformer2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)


def flux_ids(tokens: int, text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's position ids: ``img_ids [N, 3]`` = (0, row, col) on the square token grid, ``txt_ids [T, 3]`` zeros."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--tokens {tokens} must be a square number (the latent grid is side x side)")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(tokens, 3).float()
    return img.to(device), torch.zeros(text_len, 3, device=device)


def batches(config: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of packed latents ``x0 [B, N, C]``, text ``[B, T, D]`` and pooled text ``[B, P]``.

    Stand-in data from a fixed pool of 64 samples; replace with your encoded images and prompts.
    """
    g = torch.Generator().manual_seed(seed)
    n = 64
    x0 = torch.randn(n, args.tokens, config.in_channels, generator=g).tanh()
    txt = torch.randn(n, args.text_len, config.joint_attention_dim, generator=g)
    pooled = torch.randn(n, config.pooled_projection_dim, generator=g)
    while True:
        idx = torch.randperm(n, generator=g)[:args.batch]
        yield {"x0": x0[idx].to(device, dtype), "txt": txt[idx].to(device, dtype),
               "pooled": pooled[idx].to(device, dtype), "noise": torch.randn(args.batch, args.tokens,
                                                                             config.in_channels, generator=g),
               "t": torch.sigmoid(torch.randn(args.batch, generator=g))}


def flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], img_ids: torch.Tensor,
                       txt_ids: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """Rectified-flow loss: ``mean((model(x_t, t) - (noise - x0))^2)`` with ``x_t = (1 - t) x0 + t noise``."""
    x0 = batch["x0"]
    noise = batch["noise"].to(x0.device, x0.dtype)
    t = batch["t"].to(x0.device, x0.dtype)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    pred = model(xt, encoder_hidden_states=batch["txt"], pooled_projections=batch["pooled"], timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return ((pred.float() - (noise - x0).float()) ** 2).mean()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train ``--steps`` steps and save; returns ``{losses, model, bare, initial, out}``."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch < 1 or not 0 < args.ratio < 1 or args.lora < 0:
        raise SystemExit("--steps and --batch must be >= 1, --ratio in (0, 1), --lora >= 0")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    bare = load_transformer(args.model, args.subfolder, dtype).to(device)
    if not args.no_grad_checkpointing:
        bare.enable_gradient_checkpointing()
    if args.lora:
        from peft import LoraConfig

        bare.requires_grad_(False)
        bare.add_adapter(LoraConfig(r=args.lora, lora_alpha=args.lora, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    initial = {k: v.detach().clone() for k, v in bare.state_dict().items()}

    model = treadfx.transform(bare, start=args.start, end=args.end, ratio=args.ratio)  # <-- TREAD
    model.train()

    img_ids, txt_ids = flux_ids(args.tokens, args.text_len, device)
    guidance = torch.full((args.batch,), 3.5, device=device, dtype=dtype) if bare.config.guidance_embeds else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    losses = []
    for batch in itertools.islice(batches(bare.config, args, device, dtype, args.seed), args.steps):
        loss = flow_matching_loss(model, batch, img_ids, txt_ids, guidance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        print(f"step {len(losses)}/{args.steps}  loss {losses[-1]:.4f}")

    out = Path(args.out)
    if args.lora:
        bare.save_lora_adapter(str(out / "lora"))  # the adapter alone; load with load_lora_adapter
    else:
        bare.save_pretrained(str(out))  # a plain diffusers checkpoint: FluxTransformer2DModel.from_pretrained(out)
    print(f"saved to {out}")
    return {"losses": losses, "model": model, "bare": bare, "initial": initial, "out": out}


if __name__ == "__main__":
    main()
