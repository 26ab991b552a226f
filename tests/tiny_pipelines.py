"""A tiny Stable Diffusion pipeline built from small configs (no weights downloaded: UNet2DConditionModel and
AutoencoderKL of a few channels, prompt embeddings given), and the call the pipeline tests make: classifier-free
guidance by the pipeline, its latents and step noise from a seeded generator, the final latents returned."""

import diffusers
import torch

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
GUIDANCE = 5.0


def vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                   norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), sample_size=8)


def tiny_sd():
    """(pipeline, prompt kwargs): a batch of 2 prompts, 16x16 images (2x4x16x16 latents)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4)
    first = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=first,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    return pipe, {"prompt_embeds": torch.randn(2, 5, 12, generator=g),
                  "negative_prompt_embeds": torch.randn(2, 5, 12, generator=g)}


def run(pipe, kw, steps, seed=2, **extra):
    torch.manual_seed(seed)  # the SD3 pipeline passes no generator to step: stochastic flow draws from torch's
    with torch.no_grad():
        return pipe(**kw, num_inference_steps=steps, guidance_scale=GUIDANCE, height=16, width=16,
                    output_type="latent", generator=torch.Generator().manual_seed(seed), **extra).images
