"""The seed methods' schedulers in a real diffusers pipeline, swapped in as users do
(``pipe.scheduler = X.from_config(pipe.scheduler.config, ...)``), on the tiny Stable Diffusion pipeline
(tests/tiny_pipelines.py: classifier-free guidance by the pipeline, its latents and step noise from a seeded
generator). Oracles: where a method reduces to DDIM or DDPM (DDIM-GMM with offset_scale 0; Mix-DDPM's
``original`` strategy, and ``removal_mu`` from the strategy's x_T given as the pipeline's latents), diffusers'
own scheduler in the same pipeline; for DDIM-GMM proper, the pipeline's loop written out here around the
paper-shaped step (``fastdiff.reference.ddim_gmm``) with offsets built by the paper's construction from the
same Gaussian matrix, the components drawn from the pipeline's generator before each step's noise."""

import pytest
import torch
from conftest import assert_close

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' Stable Diffusion pipelines import it

from tiny_pipelines import GUIDANCE, SD_CONFIG, run, tiny_sd  # noqa: E402

from fastdiff import DDIMGMMScheduler, MixDDIMScheduler, MixDDPMScheduler  # noqa: E402
from fastdiff.reference.ddim_gmm import ddim_gmm_step, gmm_offsets  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


def test_ddim_gmm_without_offsets_is_ddim(sd):
    pipe, kw = sd
    pipe.scheduler = diffusers.DDIMScheduler(**SD_CONFIG)
    want = run(pipe, kw, STEPS)
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, offset_scale=0.0)
    assert_close(run(pipe, kw, STEPS), want, atol=3e-5, rtol=1e-4, what="DDIM-GMM, s = 0, vs DDIM")


def pipeline_loop_with_reference(pipe, kw, scale: float, eta: float, seed: int = 2, offset_seed: int = 0):
    """StableDiffusionPipeline's denoising loop, written out, with the paper-shaped DDIM-GMM step."""
    ddim = diffusers.DDIMScheduler(**SD_CONFIG)
    ddim.set_timesteps(STEPS)
    abar = ddim.alphas_cumprod.double()
    clip = ddim.config.clip_sample_range if ddim.config.clip_sample else None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)                       # prepare_latents (init_noise_sigma = 1)
    K, D = 8, 4 * 16 * 16
    pi = torch.full((K,), 1.0 / K, dtype=torch.float64)
    noise = torch.randn((D, K), generator=torch.Generator().manual_seed(offset_seed), dtype=torch.float64)
    delta, Delta_diag = gmm_offsets(noise, pi, scale, ortho=True)  # O in the paper
    prompt = torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])
    for t in ddim.timesteps:
        with torch.no_grad():
            e = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=prompt, return_dict=False)[0]
        uncond, text = e.chunk(2)
        eps = uncond + GUIDANCE * (text - uncond)
        prev = int(t) - 1000 // STEPS
        u = torch.rand((2, 1), generator=g)[:, 0]                     # the component, before the step's noise
        k = (u[:, None] >= torch.arange(1, K) / K).sum(-1)
        z = torch.randn(x.shape, generator=g) if eta > 0 else None
        x = ddim_gmm_step(x.double(), eps.double(), float(abar[int(t)]), float(abar[prev]) if prev >= 0 else 1.0,
                          k, delta, Delta_diag, eta, None if z is None else z.double(), clip=clip).float()
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gmm_in_the_pipeline_is_the_papers_step(sd, eta):
    pipe, kw = sd
    pipe.scheduler = DDIMGMMScheduler.from_config(diffusers.DDIMScheduler(**SD_CONFIG).config, offset_scale=2.0)
    got = run(pipe, kw, STEPS, eta=eta)
    want = pipeline_loop_with_reference(pipe, kw, 2.0, eta)
    assert_close(got, want, atol=1e-4, rtol=1e-4, what=f"DDIM-GMM in the pipeline, eta {eta}")
    plain = run(pipe, kw, STEPS, eta=eta, seed=3)
    assert not torch.equal(got, plain)  # the generator reaches the component draws


def test_mix_ddpm_original_is_ddpm(sd):
    pipe, kw = sd
    pipe.scheduler = diffusers.DDPMScheduler(**SD_CONFIG)
    want = run(pipe, kw, STEPS)
    pipe.scheduler = MixDDPMScheduler.from_config(pipe.scheduler.config, strategy="original")
    assert_close(run(pipe, kw, STEPS), want, atol=3e-5, rtol=1e-4, what="Mix-DDPM original vs DDPM")


@pytest.mark.parametrize("cls,base", [(MixDDPMScheduler, "DDPMScheduler"), (MixDDIMScheduler, "DDIMScheduler")])
def test_mix_removal_mu_starts_from_its_x_T_given_as_the_latents(sd, cls, base):
    """removal_mu's steps are the base scheduler's; its start is ``initial_sample``, which a pipeline takes as
    ``latents=`` (the pipeline itself would draw N(0, I))."""
    pipe, kw = sd
    mix = cls.from_config(getattr(diffusers, base)(**SD_CONFIG).config, strategy="removal_mu")
    x_T = mix.initial_sample((2, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    shift = (x_T - mix.initial_sample((2, 4, 16, 16), generator=torch.Generator().manual_seed(7))).abs().max()
    assert shift == 0  # a seeded start is reproducible
    pipe.scheduler = getattr(diffusers, base)(**SD_CONFIG)
    want = run(pipe, kw, STEPS, latents=x_T)
    pipe.scheduler = mix
    assert_close(run(pipe, kw, STEPS, latents=x_T), want, atol=3e-5, rtol=1e-4, what=f"{cls.__name__} removal_mu")
