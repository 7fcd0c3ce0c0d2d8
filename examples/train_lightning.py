"""Train a small DiT with TREAD under Lightning (``lightning.pytorch``).

    python examples/train_lightning.py --steps 300
    python examples/train_lightning.py --steps 300 --device gpu --devices 2     # DDP: transform happens in __init__

The LightningModule holds the transformed model; Lightning moves it, wraps it
(DDP/FSDP strategies) and calls ``.train()``/``.eval()`` as usual. The only
TREAD-specific line is marked ``# <-- TREAD``. Data, model and loss are those
of ``train_plain.py``. The checkpoint's ``state_dict`` holds the DiT's keys
under ``model.``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Sequence

import lightning.pytorch as pl
import torch

import treadfx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_plain import load_data, small_dit, velocity_loss  # noqa: E402


class TreadDiTModule(pl.LightningModule):
    """Rectified-flow training of a DiT whose blocks 1..4 see half of the image tokens."""

    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.lr = lr
        self.model = treadfx.transform(small_dit(), start=1, end=-2, ratio=0.5)  # <-- TREAD: the one-line change
        self.losses: list[float] = []

    def on_train_start(self):
        # seed_everything gave every rank the same RNG stream (same initial weights); unseeded route selection
        # draws from it, so give each rank its own stream for noise, t and routes
        torch.manual_seed(torch.initial_seed() + self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = velocity_loss(self.model, x, y)
        self.losses.append(loss.item())
        if self.global_step % 50 == 0:
            print(f"step {self.global_step:5d}  loss {loss.item():.4f}", flush=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", help="Lightning accelerator: cpu, gpu, mps, auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--data", choices=["digits", "random"], default="digits")
    p.add_argument("--checkpoint", default="tread_lightning.ckpt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(args.seed, verbose=False)
    x_all, y_all = load_data(args.data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=args.batch,
                                         shuffle=True, drop_last=True)
    module = TreadDiTModule(lr=args.lr)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = pl.Trainer(max_steps=args.steps, accelerator=args.device, devices=args.devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    trainer.save_checkpoint(args.checkpoint)
    print(f"saved {args.checkpoint}")
    return {"losses": module.losses, "model": module.model, "initial": initial, "checkpoint": args.checkpoint}


if __name__ == "__main__":
    main()
