"""Every drop-in in a real diffusers pipeline, as users swap it in (``pipe.scheduler =
Fast*.from_config(pipe.scheduler.config)``): a tiny Stable Diffusion pipeline (UNet2DConditionModel and
AutoencoderKL from small configs, prompt embeddings given, classifier-free guidance by the pipeline, the
pipeline's own latents from a seeded generator) and a tiny Stable Diffusion 3 pipeline for flow matching.
The oracle is the same pipeline with the diffusers scheduler: the same final latents (fp32 rounding of a
few steps) for the same generator - stochastic schedulers included (the drop-ins draw diffusers' noise)."""

import pytest
import torch
from conftest import assert_close

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' Stable Diffusion pipelines import it

import fastdiff.integrations.diffusers as fd  # noqa: E402

SD_CASES = {  # name: (diffusers class, config)
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {}),
    "dpmsolver++-3-karras": ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # (bh1 into sigma = 0 is NaN in diffusers; fastdiff takes the limit there: tests/test_unipc.py)
    "unipc-bh1-v": ("UniPCMultistepScheduler", {"solver_type": "bh1", "prediction_type": "v_prediction",
                                                "final_sigmas_type": "sigma_min"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras-trailing": ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                   norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), sample_size=8)


@pytest.fixture(scope="module")
def sd():
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


def run(pipe, kw, steps, seed=2):
    torch.manual_seed(seed)  # the SD3 pipeline passes no generator to step: stochastic flow draws from torch's
    with torch.no_grad():
        return pipe(**kw, num_inference_steps=steps, guidance_scale=5.0, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("name", list(SD_CASES))
def test_stable_diffusion_pipeline_gives_diffusers_latents(sd, name):
    pipe, kw = sd
    cls, config = SD_CASES[name]
    steps = 4 if name == "lcm" else 6
    pipe.scheduler = getattr(diffusers, cls)(**SD_CONFIG, **config)
    want = run(pipe, kw, steps)
    pipe.scheduler = getattr(fd, f"Fast{cls}").from_config(pipe.scheduler.config)
    got = run(pipe, kw, steps)
    assert type(pipe.scheduler).__name__ == f"Fast{cls}"
    assert got.shape == (2, 4, 16, 16) and torch.isfinite(got).all()
    assert_close(got, want, atol=2e-5, rtol=1e-4, what=f"{name} in StableDiffusionPipeline")
    assert not torch.equal(got, run(pipe, kw, steps, seed=3))  # the generator reaches the run


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5,
                                                      "max_shift": 1.15, "stochastic_sampling": True}],
                         ids=["shift", "dynamic-stochastic"])
def test_stable_diffusion_3_pipeline_gives_diffusers_latents(config):
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=8, pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**config), vae=vae(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    kw = {"prompt_embeds": torch.randn(1, 5, 12, generator=g),
          "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g),
          "pooled_prompt_embeds": torch.randn(1, 6, generator=g),
          "negative_pooled_prompt_embeds": torch.randn(1, 6, generator=g)}
    want = run(pipe, kw, 6)
    pipe.scheduler = fd.FastFlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    got = run(pipe, kw, 6)
    assert_close(got, want, atol=2e-5, rtol=1e-4, what=f"{config} in StableDiffusion3Pipeline")
