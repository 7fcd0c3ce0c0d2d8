"""Train a small DiT with TREAD under Hugging Face Accelerate.

    python examples/train_accelerate.py --steps 300
    accelerate launch --num_processes 2 examples/train_accelerate.py --steps 300   # DDP, each rank draws its own routes

Transform the bare model *before* ``accelerator.prepare`` (prepare may wrap it
in DistributedDataParallel, which ``treadfx.transform`` rejects). The only
TREAD-specific line is marked ``# <-- TREAD``. Data, model and loss are those
of ``train_plain.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import treadfx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_plain import load_data, small_dit, velocity_loss  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", help="cpu forces the CPU; anything else lets accelerate choose")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--data", choices=["digits", "random"], default="digits")
    p.add_argument("--checkpoint", default="tread_accelerate.pt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    set_seed(args.seed)  # the same initial weights on every rank
    x_all, y_all = load_data(args.data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=args.batch,
                                         shuffle=True, drop_last=True)

    model = small_dit()
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    model = treadfx.transform(model, start=1, end=-2, ratio=0.5)  # <-- TREAD: before accelerator.prepare

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    set_seed(args.seed, device_specific=True)  # each rank its own RNG stream: own noise, t and (unseeded) routes
    model.train()
    losses = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step, (x, y) in zip(range(args.steps), batches):
        loss = velocity_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        losses.append(loss.item())
        if accelerator.is_main_process and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)

    accelerator.wait_for_everyone()
    bare = accelerator.unwrap_model(model)  # the transformed model; its state_dict is a plain DiT state_dict
    if accelerator.is_main_process:
        accelerator.save({"model": bare.state_dict(), "step": args.steps}, args.checkpoint)
        print(f"saved {args.checkpoint}")
    return {"losses": losses, "model": bare, "initial": initial, "checkpoint": args.checkpoint,
            "accelerator": accelerator}


if __name__ == "__main__":
    main()
