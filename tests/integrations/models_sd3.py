"""A tiny StableDiffusion3Pipeline from random components, and the DreamBooth-style SD3 training step.

Components (random weights, built from configs, nothing downloaded): an ``SD3Transformer2DModel`` (16 image
tokens), two CLIP text encoders with projection and a T5 encoder (transformers), an ``AutoencoderKL`` with
scale factor 2, and ``FlowMatchEulerDiscreteScheduler``. The tiny pipeline has no tokenizers (tokenizer files
cannot be made from configs): prompts are token ids, encoded the way SD3 does it (CLIP penultimate hidden
states of both encoders side by side, zero-padded to T5's width, then T5's states appended along the
sequence; the pooled embedding is both CLIP projections side by side).

The training step follows diffusers' SD3 DreamBooth recipe: VAE latents shifted and scaled, timesteps drawn
by ``compute_density_for_timestep_sampling`` and mapped through the scheduler's sigmas, the flow-matching
interpolation ``(1 - sigma) x + sigma noise``, target ``noise - x`` and SD3's loss weighting.
"""

from __future__ import annotations

import torch

TEXT_LEN = 6
VOCAB = 50


def tiny_sd3_components(seed: int = 0) -> dict:
    """The pipeline's components as ``StableDiffusion3Pipeline(**components)`` takes them (tokenizers None)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(s):
        torch.manual_seed(seed + s)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=TEXT_LEN, projection_dim=5))

    te1, te2 = clip(1), clip(2)
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16, shift_factor=0.1,
                        scaling_factor=1.5)
    torch.manual_seed(seed + 5)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=16)
    g = torch.Generator().manual_seed(seed + 6)
    with torch.no_grad():  # diffusers zero-initialises some output layers: make every layer matter
        for mod in transformer.modules():
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.05)
    return dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                text_encoder=te1, tokenizer=None, text_encoder_2=te2, tokenizer_2=None, text_encoder_3=t5,
                tokenizer_3=None)


@torch.no_grad()
def encode_prompt(components: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 2 * TEXT_LEN, 16], pooled [B, 10]) of token ids ``[B, TEXT_LEN]``, as SD3 encodes."""
    hidden, pooled = [], []
    for name in ("text_encoder", "text_encoder_2"):
        out = components[name](ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(hidden, dim=-1)
    t5 = components["text_encoder_3"](ids)[0]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def dreambooth_loss(transformer, vae, scheduler, pixels: torch.Tensor, prompt_embeds, pooled,
                    weighting_scheme: str = "logit_normal") -> torch.Tensor:
    """One SD3 DreamBooth loss (draws the latent sample, the noise, then the timesteps, then calls the model).

    ``scheduler`` is the training copy of the scheduler (a pipeline's ``set_timesteps`` changes its tables)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    b = latents.shape[0]
    u = compute_density_for_timestep_sampling(weighting_scheme, b, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(b, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled, return_dict=False)[0]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    return (weighting.float() * (pred.float() - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
