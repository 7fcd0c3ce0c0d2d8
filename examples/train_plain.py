"""Train a small DiT with TREAD in a plain PyTorch loop.

    python examples/train_plain.py --steps 300            # CPU is enough (the tests run 3 steps)
    python examples/train_plain.py --steps 2000 --device cuda

Rectified-flow velocity loss, AdamW, an EMA copy and a checkpoint. The only
TREAD-specific line is marked ``# <-- TREAD``; the checkpoint it writes is a
plain DiT checkpoint (same keys), loadable without treadfx.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from typing import Any, Sequence

import torch

import treadfx
from treadfx.models.dit import DiT


def load_data(kind: str, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, R, R] in [-1, 1], labels [N]): scikit-learn's 8x8 digits upsampled, or random images."""
    if kind == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            kind = "random"
    if kind == "random":
        g = torch.Generator().manual_seed(0)
        return torch.randn(512, 1, resolution, resolution, generator=g).tanh(), torch.randint(0, 10, (512,), generator=g)
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1), torch.as_tensor(d.target, dtype=torch.int64)


def small_dit() -> DiT:
    """A 6-block DiT on 16x16 one-channel images (64 tokens of width 64)."""
    return DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=2, mlp_ratio=2.0,
               class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


def velocity_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x + t noise, the model predicts the velocity noise - x."""
    t = torch.rand(x.shape[0], device=x.device)
    noise = torch.randn_like(x)
    tb = t[:, None, None, None]
    pred = model((1 - tb) * x + tb * noise, t * 1000, y)
    return ((pred - (noise - x)) ** 2).mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """EMA over parameters: the transformed model's parameters are the original's, same names and order."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", choices=["digits", "random"], default="digits")
    p.add_argument("--checkpoint", default="tread_plain.pt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x_all, y_all = load_data(args.data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=args.batch,
                                         shuffle=True, drop_last=True)

    model = small_dit().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # a plain DiT: the EMA never routes
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    model = treadfx.transform(model, start=1, end=-2, ratio=0.5)  # <-- TREAD: the one-line change

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step, (x, y) in zip(range(args.steps), batches):
        loss = velocity_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, args.ema)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)

    # model.state_dict() has the original keys: this is a DiT checkpoint
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": args.steps,
                "rng": torch.get_rng_state()}, args.checkpoint)
    print(f"saved {args.checkpoint}")
    return {"losses": losses, "model": model, "ema": ema, "initial": initial, "checkpoint": args.checkpoint}


if __name__ == "__main__":
    main()
