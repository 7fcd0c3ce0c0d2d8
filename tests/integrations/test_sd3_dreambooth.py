"""diffusers SD3 DreamBooth-style fine-tuning with treadfx: ``transformer = treadfx.transform(transformer, ...)``.

A tiny StableDiffusion3Pipeline from random components (tests/integrations/models_sd3.py). Checks: the
flow-matching step's loss and gradients equal a hand-written TREAD forward (tests/backbone_refs.py's hooks on
the SD3 joint blocks) on the kept indices ``treadfx.last_routes`` reports; validation sampling with the
transformer still in train mode (the pipeline runs under ``torch.no_grad()``) is not routed and equals eval
sampling; the FLOPs drop as ``inspect`` predicts; ``pipeline.save_pretrained`` writes the original class name
into ``transformer/config.json`` and ``model_index.json``, and ``StableDiffusion3Pipeline.from_pretrained``
reloads a plain ``SD3Transformer2DModel`` with the trained weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import treadfx

pytest.importorskip("transformers")

from backbone_refs import CASES  # noqa: E402
from integrations.models_common import (  # noqa: E402
    assert_flop_saving_as_predicted,
    assert_grads_match,
    step_flops,
    step_grads,
)
from integrations.models_sd3 import TEXT_LEN, VOCAB, dreambooth_loss, encode_prompt, tiny_sd3_components  # noqa: E402

SPAN = (1, 2)


def _data(components, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    ids = torch.randint(0, VOCAB, (2, TEXT_LEN), generator=g)
    embeds, pooled = encode_prompt(components, ids)
    return pixels, embeds, pooled


def _setup():
    comps = tiny_sd3_components()
    original = comps["transformer"]
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        comps[name].requires_grad_(False)
    comps["transformer"] = treadfx.transform(original, start=SPAN[0], end=SPAN[1], ratio=0.5)  # <-- the change
    return comps, original, copy.deepcopy(comps["scheduler"])


def test_dreambooth_step_equals_hand_written_tread():
    comps, original, sched = _setup()
    tm, vae = comps["transformer"], comps["vae"]
    pixels, embeds, pooled = _data(comps)
    tm.train()
    torch.manual_seed(3)
    loss = dreambooth_loss(tm, vae, sched, pixels, embeds, pooled)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (2, 8) and rec.num_tokens == 16
    got = step_grads(loss, tm)

    reference = CASES["diffusers_sd3"].reference  # route-out / route-in in hooks on the original joint blocks

    def routed_by_hand(**kw):
        kw.pop("return_dict")
        return (reference(original, [SPAN], [rec.kept], **kw),)

    original.train()
    torch.manual_seed(3)
    ref = dreambooth_loss(routed_by_hand, vae, sched, pixels, embeds, pooled)
    assert torch.equal(loss, ref)
    assert_grads_match(got, step_grads(ref, original))


def test_validation_sampling_in_train_mode_is_not_routed():
    from diffusers import StableDiffusion3Pipeline

    comps, original, sched = _setup()
    tm = comps["transformer"]
    pixels, embeds, pooled = _data(comps)
    tm.train()
    dreambooth_loss(tm, comps["vae"], sched, pixels, embeds, pooled).backward()
    pipe = StableDiffusion3Pipeline(**comps)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
                    negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=16, width=16,
                    num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    assert tm.training
    during_training = sample()
    assert treadfx.last_routes(tm) == [] and tm.training
    tm.eval()
    assert torch.equal(during_training, sample())
    pipe.transformer = original.eval()  # the untransformed model gives the same images
    assert torch.equal(during_training, sample())


def test_dreambooth_step_flops_drop_as_inspect_predicts():
    comps, original, sched = _setup()
    tm, vae = comps["transformer"], comps["vae"]
    pixels, embeds, pooled = _data(comps)
    latents = torch.randn(2, 4, 8, 8)
    report = treadfx.inspect(tm, hidden_states=latents, timestep=torch.tensor([10.0, 500.0]),
                             encoder_hidden_states=embeds, pooled_projections=pooled)
    torch.manual_seed(4)
    routed = step_flops(lambda: dreambooth_loss(tm, vae, sched, pixels, embeds, pooled), tm)
    torch.manual_seed(4)
    dense = step_flops(lambda: dreambooth_loss(original, vae, sched, pixels, embeds, pooled), original)
    assert_flop_saving_as_predicted(report, dense, routed)


def test_save_pretrained_and_reload_the_pipeline(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    comps, original, sched = _setup()
    tm = comps["transformer"]
    pixels, embeds, pooled = _data(comps)
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    for _ in range(2):
        opt.zero_grad()
        dreambooth_loss(tm, comps["vae"], sched, pixels, embeds, pooled).backward()
        opt.step()
    trained = tm.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in trained)

    StableDiffusion3Pipeline(**comps).save_pretrained(tmp_path)  # what the training script's end does
    index = json.loads((tmp_path / "model_index.json").read_text())
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert config["_class_name"] == "SD3Transformer2DModel"

    # the tiny pipeline has no tokenizer files to save: they are passed as None, as they were built
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, tokenizer=None, tokenizer_2=None, tokenizer_3=None)
    assert type(loaded.transformer) is SD3Transformer2DModel and not treadfx.is_transformed(loaded.transformer)
    reloaded = loaded.transformer.state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
    x = torch.randn(2, 4, 8, 8)
    kw = dict(encoder_hidden_states=embeds, pooled_projections=pooled, timestep=torch.tensor([10.0, 500.0]))
    tm.eval()
    with torch.no_grad():
        assert torch.equal(loaded.transformer.eval()(x, **kw).sample, tm(x, **kw).sample)
