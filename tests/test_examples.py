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


# ---------------------------------------------------------------------------------------------------- diffusers


def flux_eval_inputs(config, tokens=16, text_len=5):
    """Fixed inputs for an eval forward of the tiny Flux, built here independently of the example."""
    g = torch.Generator().manual_seed(11)
    side = int(tokens ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(tokens, 3).float()
    return dict(hidden_states=torch.randn(2, tokens, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(2, text_len, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.3, 0.8]), img_ids=img_ids, txt_ids=torch.zeros(text_len, 3), return_dict=False)


@pytest.fixture(scope="module")
def flux_full(tmp_path_factory):
    ex = load_example("train_diffusers")
    out = tmp_path_factory.mktemp("flux") / "full"
    return ex.main(["--steps", str(STEPS), "--batch", "2", "--out", str(out)])


def test_train_diffusers_full_finetune_routes_and_saves_a_plain_checkpoint(flux_full):
    from diffusers import FluxTransformer2DModel

    res = flux_full
    model, bare = res["model"], res["bare"]
    assert treadfx.is_transformed(model) and treadfx.original_class(model) is FluxTransformer2DModel
    assert bare.is_gradient_checkpointing
    assert len(res["losses"]) == STEPS and all(math.isfinite(v) for v in res["losses"])
    # Flux routes with one shared subset (its RoPE table has no batch axis): 8 of the 16 image tokens kept
    rec = treadfx.last_routes(model)[0]
    assert rec.kept.shape == (8,) and rec.num_tokens == 16
    final = bare.state_dict()
    moved = [k for k in final if not torch.equal(final[k], res["initial"][k])]
    assert len(moved) > 0.9 * len(final)
    # save_pretrained wrote a plain diffusers checkpoint that reproduces the trained model's eval output
    loaded = FluxTransformer2DModel.from_pretrained(str(res["out"])).eval()
    assert type(loaded) is FluxTransformer2DModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(**flux_eval_inputs(loaded.config))[0],
                                   model.eval()(**flux_eval_inputs(loaded.config))[0], rtol=0, atol=0)


def test_train_diffusers_gradient_checkpointing_changes_nothing_but_memory(flux_full, tmp_path):
    """Same seed without checkpointing: the same losses and the same trained weights."""
    ex = load_example("train_diffusers")
    plain = ex.main(["--steps", str(STEPS), "--batch", "2", "--no-grad-checkpointing", "--out", str(tmp_path / "p")])
    assert not plain["bare"].is_gradient_checkpointing
    assert plain["losses"] == pytest.approx(flux_full["losses"], rel=1e-5, abs=1e-6)
    ref = flux_full["bare"].state_dict()
    for k, v in plain["bare"].state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_train_diffusers_lora_trains_only_the_adapter_and_saves_it(tmp_path):
    from diffusers import FluxTransformer2DModel

    ex = load_example("train_diffusers")
    res = ex.main(["--steps", str(STEPS), "--batch", "2", "--lora", "4", "--out", str(tmp_path / "lora")])
    bare, initial = res["bare"], res["initial"]
    final = bare.state_dict()
    lora_keys = [k for k in final if "lora_" in k]
    assert lora_keys and all(torch.equal(final[k], initial[k]) for k in final if "lora_" not in k)
    assert any(not torch.equal(final[k], initial[k]) for k in lora_keys if "lora_B" in k)
    assert treadfx.last_routes(res["model"])[0].kept.shape == (8,)
    # the saved adapter, loaded into a fresh base with the same seed, gives the trained model's eval output
    torch.manual_seed(0)
    fresh = FluxTransformer2DModel(**ex.TINY_FLUX)
    fresh.load_lora_adapter(str(tmp_path / "lora" / "lora"), weight_name="pytorch_lora_weights.safetensors",
                            adapter_name="default", prefix=None)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**flux_eval_inputs(fresh.config))[0],
                                   res["model"].eval()(**flux_eval_inputs(fresh.config))[0], rtol=1e-5, atol=1e-6)
