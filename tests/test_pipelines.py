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

from tiny_pipelines import SD_CONFIG, run, tiny_sd, vae  # noqa: E402

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


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


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
