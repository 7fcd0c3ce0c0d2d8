"""The training examples (issue 6.2): each trains 3 steps and writes a checkpoint that a plain DiT loads.

Each example's ``main(argv)`` returns the losses, the trained transformed
model, the initial state and the checkpoint path.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import treadfx
from treadfx.models.dit import DiT

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 3  # adaLN-Zero: attention/MLP weights get their first gradient in step 3
BATCH = 16


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"treadfx_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plain_dit_from(state: dict) -> DiT:
    """The checkpoint loaded strictly into the ORIGINAL class, built from scratch with other weights."""
    torch.manual_seed(123)
    m = load_example("train_plain").small_dit()
    m.load_state_dict(state, strict=True)
    return m.eval()


def eval_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 1, 16, 16, generator=g), torch.rand(4, generator=g) * 1000, torch.arange(4)


def check_run(result: dict, state: dict) -> None:
    """Finite losses, every trainable parameter moved, routed training, and the checkpoint reproduces eval."""
    model = result["model"]
    assert treadfx.is_transformed(model) and treadfx.original_class(model) is DiT
    assert len(result["losses"]) == STEPS and all(math.isfinite(v) for v in result["losses"])
    final = model.state_dict()
    assert list(final) == list(result["initial"])
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(final[n], result["initial"][n])]
    assert moved == [n for n, p in model.named_parameters() if p.requires_grad]
    kept = treadfx.last_routes(model)[0].kept  # the last training forward routed: 32 of 64 tokens per sample
    assert kept.shape == (BATCH, 32)
    plain = plain_dit_from(state)
    assert type(plain) is DiT
    with torch.no_grad():
        assert torch.equal(plain(*eval_inputs()), model.eval()(*eval_inputs()))


def test_train_plain(tmp_path):
    """Plain loop: model + EMA + optimizer checkpoint; EMA (decay 0 here) tracks the transformed model's parameters."""
    ex = load_example("train_plain")
    ckpt = tmp_path / "plain.pt"
    result = ex.main(["--steps", str(STEPS), "--batch", str(BATCH), "--ema", "0", "--checkpoint", str(ckpt)])
    saved = torch.load(ckpt, weights_only=True)
    check_run(result, saved["model"])
    assert saved["step"] == STEPS
    ema = plain_dit_from(saved["ema"])
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), result["model"].parameters()))
    resumed = treadfx.transform(ex.small_dit(), start=1, end=-2, ratio=0.5)
    resumed.load_state_dict(saved["model"], strict=True)
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    opt.load_state_dict(saved["opt"])
    state = opt.state_dict()["state"]
    assert len(state) == sum(p.requires_grad for p in resumed.parameters())
    assert {int(s["step"]) for s in state.values()} == {STEPS}


def test_train_accelerate(tmp_path):
    """Accelerate: transform before prepare; the unwrapped model's checkpoint is a DiT checkpoint."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    ex = load_example("train_accelerate")
    ckpt = tmp_path / "accelerate.pt"
    try:
        result = ex.main(["--steps", str(STEPS), "--batch", str(BATCH), "--checkpoint", str(ckpt)])
    finally:
        AcceleratorState._reset_state(True)
    saved = torch.load(ckpt, weights_only=True)
    check_run(result, saved["model"])


def test_train_lightning(tmp_path):
    """Lightning: a LightningModule holding the transformed model; the checkpoint's ``model.*`` keys load into DiT."""
    pytest.importorskip("lightning")
    ex = load_example("train_lightning")
    ckpt = tmp_path / "lightning.ckpt"
    result = ex.main(["--steps", str(STEPS), "--batch", str(BATCH), "--checkpoint", str(ckpt)])
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == STEPS
    assert all(k.startswith("model.") for k in saved["state_dict"])
    check_run(result, {k.removeprefix("model."): v for k, v in saved["state_dict"].items()})


def test_examples_run_as_scripts(tmp_path):
    """``python examples/train_plain.py --steps 2 ...`` works from any directory and writes its checkpoint."""
    ckpt = tmp_path / "script.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_plain.py"), "--steps", "2", "--batch", "8",
                           "--data", "random", "--checkpoint", str(ckpt)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step     1  loss" in proc.stdout and f"saved {ckpt}" in proc.stdout
    plain_dit_from(torch.load(ckpt, weights_only=True)["model"])
