"""FastEulerDiscreteScheduler, FastEulerAncestralDiscreteScheduler and FastHeunDiscreteScheduler against
diffusers' classes (0.42) as the oracle - whole trajectories over their option matrix (fp32 and float64,
generator noise drawn as diffusers draws it), on every backend, low precision, odd shapes and strides,
fused guidance, seeds, begin_index, add_noise, autograd, torch.compile, bad input - and the plan builders
of fastdiff.samplers.euler against the paper-shaped reference (fastdiff.reference.euler) and the exact
probability-flow ODE of fastdiff.oracle (order of convergence)."""

import inspect
import math
from fractions import Fraction

import diffusers.schedulers.scheduling_euler_ancestral_discrete as d_ancestral
import diffusers.schedulers.scheduling_euler_discrete as d_euler
import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, DEVICES, assert_accuracy_rule, assert_close, require_backend
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.utils import logging

from fastdiff import schedules
from fastdiff.integrations.diffusers import (
    FastEulerAncestralDiscreteScheduler,
    FastEulerDiscreteScheduler,
    FastHeunDiscreteScheduler,
    base,
)
from fastdiff.oracle import default_mixture, ode_solution
from fastdiff.philox import randn, sample_seeds
from fastdiff.reference.euler import get_ancestral_step, sample_euler, sample_euler_ancestral, sample_heun
from fastdiff.samplers.euler import (
    ancestral_sigmas,
    churn_sigmas,
    euler_ancestral_plan,
    euler_plan,
    euler_step,
    heun_plans,
    heun_second,
)
from fastdiff.stepper import Stepper

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers'
logging.set_verbosity_error()  # diffusers warns on every step run without scale_model_input; some tests do

EULER, ANCESTRAL, HEUN = "euler", "ancestral", "heun"
CLASSES = {EULER: (EulerDiscreteScheduler, FastEulerDiscreteScheduler),
           ANCESTRAL: (EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler),
           HEUN: (HeunDiscreteScheduler, FastHeunDiscreteScheduler)}
CHURN = dict(s_churn=2.0, s_tmin=0.3, s_tmax=40.0, s_noise=1.003)

# name -> (family, config, step keywords): every __init__ option of each class at least once
VARIANTS = {
    "euler-default": (EULER, dict(), {}),
    "euler-karras-v-leading-offset": (EULER, dict(use_karras_sigmas=True, prediction_type="v_prediction",
                                                  timestep_spacing="leading", steps_offset=1), {}),
    "euler-exponential-sample-trailing": (EULER, dict(use_exponential_sigmas=True, prediction_type="sample",
                                                      timestep_spacing="trailing"), {}),
    "euler-beta-bounds-sigma-min": (EULER, dict(use_beta_sigmas=True, sigma_min=0.05, sigma_max=20.0,
                                                final_sigmas_type="sigma_min"), {}),
    "euler-log-linear-churn": (EULER, dict(interpolation_type="log_linear"), CHURN),
    "euler-continuous-v-karras-churn": (EULER, dict(timestep_type="continuous", prediction_type="v_prediction",
                                                    use_karras_sigmas=True), CHURN),
    "euler-zero-snr-scaled-trailing-v": (EULER, dict(rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                                                     beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
                                                     prediction_type="v_prediction"), {}),
    "euler-cosine-original-sample": (EULER, dict(beta_schedule="squaredcos_cap_v2",
                                                 prediction_type="original_sample"), {}),
    "euler-trained-betas": (EULER, dict(num_train_timesteps=100, trained_betas=np.linspace(1e-3, 0.1, 100)), {}),
    "ancestral-default": (ANCESTRAL, dict(), {}),
    "ancestral-v-leading-offset": (ANCESTRAL, dict(prediction_type="v_prediction", timestep_spacing="leading",
                                                   steps_offset=1), {}),
    "ancestral-zero-snr-trailing": (ANCESTRAL, dict(rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                                                    beta_start=0.00085, beta_end=0.012,
                                                    timestep_spacing="trailing"), {}),
    # linear betas: rescaled abar_998 < 2^-24 = abar_999, so the training grid's sigma rises at its end (the
    # construction's default grid, which an ancestral step cannot take; the run's grid is fine)
    "ancestral-zero-snr-linear": (ANCESTRAL, dict(rescale_betas_zero_snr=True), {}),
    "ancestral-cosine-trained": (ANCESTRAL, dict(num_train_timesteps=50, trained_betas=[0.02] * 50), {}),
    "heun-default": (HEUN, dict(), {}),
    "heun-karras-v": (HEUN, dict(use_karras_sigmas=True, prediction_type="v_prediction"), {}),
    "heun-exponential-sample-clip": (HEUN, dict(use_exponential_sigmas=True, prediction_type="sample",
                                                clip_sample=True, clip_sample_range=0.8), {}),
    "heun-beta-trailing": (HEUN, dict(use_beta_sigmas=True, timestep_spacing="trailing"), {}),
    "heun-exp-leading-offset": (HEUN, dict(beta_schedule="exp", timestep_spacing="leading", steps_offset=1), {}),
    "heun-cosine-clip-eps": (HEUN, dict(beta_schedule="squaredcos_cap_v2", clip_sample=True), {}),
}

GUIDED = dict(atol=2e-5, rtol=2e-5, guided=True)  # conftest.assert_close: a fused-guidance step


def model(x, t):
    """A fixed smooth stand-in for a network: depends on the (scaled) sample and the timestep."""
    return 0.9 * torch.tanh(x.float() * (1.0 + float(t) / 1000.0)).to(x.dtype) + 0.05


def draws_noise(family, step_kw):
    return family == ANCESTRAL or bool(step_kw.get("s_churn"))


def trajectory(scheduler, x, steps, step_kw=None, seed=None, device=None, **extra):
    """A pipeline's loop: x_T scaled by init_noise_sigma, scale_model_input, the model, step; returns the
    samples and x0s of every call. `seed`: the generator of the step noise. steps=None: the run is set."""
    if steps is not None:
        scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    gen = {} if seed is None else dict(generator=torch.Generator(device or "cpu").manual_seed(seed))
    xs, x0s = [], []
    for t in scheduler.timesteps:
        out = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **(step_kw or {}), **gen, **extra)
        x = out.prev_sample
        xs.append(x)
        x0s.append(out.pred_original_sample)
    return xs, x0s


class _Float64Torch:
    """torch as diffusers' Euler steps see it in the float64 oracle run: they upcast the sample with
    ``sample.to(torch.float32)``, which would round a float64 run to fp32 at every step."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _float32_draw(shape, generator=None, device=None, dtype=None, **kw):
    """diffusers' noise drawn in float32, then cast: the float64 run gets the fp32 run's numbers."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def exact_trajectory(family, config, x, steps, step_kw, seed, monkeypatch):
    """diffusers' trajectory in float64 throughout: the oracle of the error bound."""
    ref = CLASSES[family][0](**config)
    ref.set_timesteps(steps)
    with monkeypatch.context() as patch:
        for module in (d_euler, d_ancestral):
            patch.setattr(module, "randn_tensor", _float32_draw)
            patch.setattr(module, "torch", _Float64Torch())
        return trajectory(ref, x.double(), None, step_kw, seed)


def max_err(xs, refs):
    return max((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(xs, refs))


def check_trajectory(got, want, exact, what):
    """tests/test_ddim.py's rule: every call within 1e-5 of diffusers' fp32 run (elementwise for samples,
    normwise for x0), or 3x diffusers' own distance from its float64 run when larger; and never further
    from the float64 run than 2x diffusers' fp32 run."""
    tol = max(1e-5, 3 * max_err(want, exact))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if what == "x0":
            rel = ((a.cpu().double() - b.double()).abs().max() / b.double().abs().max()).item()
            assert rel <= tol, f"{what} call {i}: normwise relative error {rel:.3g} > {tol:.3g}"
        else:
            assert_close(a, b, atol=tol, rtol=tol, what=f"{what} call {i}")
    err, err_diffusers = max_err(got, exact), max_err(want, exact)
    assert err <= 2 * err_diffusers + 1e-7, f"{what}: error vs float64 {err:.3g}, diffusers' {err_diffusers:.3g}"


def compare(name, monkeypatch, device="cpu", backend="cpu", steps=8):
    family, config, step_kw = VARIANTS[name]
    ref_cls, fast_cls = CLASSES[family]
    seed = 5 if draws_noise(family, step_kw) else None
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want, want0 = trajectory(ref_cls(**config), x, steps, step_kw, seed)
    fast = fast_cls(**config)
    fast.backend = backend
    got, got0 = trajectory(fast, x.to(device), steps, step_kw, seed, device=device if device != "cpu" else None)
    exact, exact0 = exact_trajectory(family, config, x, steps, step_kw, seed, monkeypatch)
    check_trajectory(got, want, exact, "prev_sample")
    check_trajectory(got0, want0, exact0, "x0")
    return fast


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers(name, monkeypatch):
    """8 steps (15 calls for Heun) of every variant against diffusers in fp32 and float64; generator noise
    (ancestral, churn) drawn by the drop-in exactly as diffusers draws it."""
    family, config, _ = VARIANTS[name]
    ref_cls, fast_cls = CLASSES[family]
    ref, fast = ref_cls(**config), fast_cls(**config)
    ref.set_timesteps(8)
    fast.set_timesteps(8)
    assert torch.equal(fast.sigmas, ref.sigmas) and torch.equal(fast.timesteps, ref.timesteps)
    assert fast.timesteps.dtype == ref.timesteps.dtype and torch.equal(fast.init_noise_sigma, ref.init_noise_sigma)
    compare(name, monkeypatch)


@pytest.mark.parametrize("name", ["euler-default", "ancestral-default", "heun-default", "heun-exponential-sample-clip"])
def test_one_step_runs(name, monkeypatch):
    """num_inference_steps=1: one call, sigma_max -> 0 (for Heun only its first call, an Euler step)."""
    compare(name, monkeypatch, steps=1)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["euler-continuous-v-karras-churn", "ancestral-default", "heun-karras-v"])
def test_backends(device, backend, name, monkeypatch):
    require_backend(backend, device)
    compare(name, monkeypatch, device, backend, steps=5)


def test_a_real_pipeline_gives_diffusers_images():
    """DDPMPipeline with a small random UNet and the ancestral / Euler schedulers: the drop-in gives
    diffusers' images for the same generator (the pipeline's and the scheduler's draws interleaved)."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    for family in (ANCESTRAL, EULER):
        ref_cls, fast_cls = CLASSES[family]
        pipe = DDPMPipeline(unet=unet, scheduler=ref_cls(beta_schedule="scaled_linear", timestep_spacing="trailing"))
        pipe.set_progress_bar_config(disable=True)
        want = pipe(batch_size=2, num_inference_steps=6, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images
        pipe.scheduler = fast_cls.from_config(pipe.scheduler.config)
        got = pipe(batch_size=2, num_inference_steps=6, output_type="np",
                   generator=torch.Generator().manual_seed(1)).images
        assert np.abs(got - want).max() < 1e-5, f"{family}: {np.abs(got - want).max()}"


@pytest.mark.parametrize("family", [EULER, HEUN])
def test_custom_timesteps_and_sigmas(family):
    """set_timesteps(timesteps=...) (Euler, Heun) and sigmas=... (Euler) give diffusers' grid and steps."""
    ref_cls, fast_cls = CLASSES[family]
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    kwargs = [dict(timesteps=[999, 700, 420, 100, 3])]
    if family == EULER:
        kwargs.append(dict(sigmas=[14.0, 5.0, 1.5, 0.4, 0.0]))
    else:
        kwargs.append(dict(num_inference_steps=6, num_train_timesteps=600))
    for kw in kwargs:
        ref, fast = ref_cls(), fast_cls()
        ref.set_timesteps(**kw)
        fast.set_timesteps(**kw)
        assert torch.equal(fast.sigmas, ref.sigmas) and torch.equal(fast.timesteps, ref.timesteps), kw
        xr, xf = x * ref.init_noise_sigma, x * fast.init_noise_sigma
        for t in ref.timesteps:
            xr = ref.step(model(ref.scale_model_input(xr, t), t), t, xr).prev_sample
            xf = fast.step(model(fast.scale_model_input(xf, t), t), t, xf).prev_sample
        assert_close(xf, xr, atol=1e-5, rtol=1e-5, what=f"{family} {kw}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", [EULER, ANCESTRAL, HEUN])
def test_low_precision_accuracy_rule(backend, dtype, family):
    """Error vs diffusers in fp32 at most 2x that of diffusers run in the same dtype."""
    require_backend(backend)
    ref_cls, fast_cls = CLASSES[family]
    step_kw = CHURN if family == EULER else {}
    seed = None if family == HEUN else 3
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want, _ = trajectory(ref_cls(), x, 10, step_kw, seed)
    naive, _ = trajectory(ref_cls(), x.to(dtype), 10, step_kw, seed)
    fast = fast_cls()
    fast.backend = backend
    got, _ = trajectory(fast, x.to(dtype), 10, step_kw, seed)
    assert got[-1].dtype == dtype
    assert_accuracy_rule(got[-1], naive[-1], want[-1], what=f"{family} {backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_and_strided_inputs(backend):
    require_backend(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, 9, generator=g).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    for family in (EULER, ANCESTRAL, HEUN):
        ref_cls, fast_cls = CLASSES[family]
        step_kw, seed = (CHURN, 4) if family == EULER else ({}, 4 if family == ANCESTRAL else None)
        want, _ = trajectory(ref_cls(), x, 6, step_kw, seed)
        fast = fast_cls()
        fast.backend = backend
        got, _ = trajectory(fast, x, 6, step_kw, seed)
        assert_close(got[-1], want[-1], atol=1e-5, rtol=1e-5, what=f"{family} {backend} odd shape")


@pytest.mark.parametrize("channels_last", [False, True])
def test_default_generator_noise_with_a_channels_last_model_output(channels_last):
    """No generator (torch's default one, seeded by torch.manual_seed as pipelines do) and a model that
    returns channels_last outputs: the noise is drawn as diffusers draws it (contiguous, in the default
    generator's order), so the samples and the default generator's state after the run equal diffusers'."""
    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(5))
    runs = []
    for cls in CLASSES[ANCESTRAL]:
        s = cls()
        s.set_timesteps(6)
        torch.manual_seed(11)
        y = x * s.init_noise_sigma
        for t in s.timesteps:
            e = model(s.scale_model_input(y, t), t)
            if channels_last:
                e = e.contiguous(memory_format=torch.channels_last)
                assert not e.is_contiguous()
            y = s.step(e, t, y).prev_sample
        runs.append((y, torch.random.get_rng_state()))
    (want, state), (got, got_state) = runs
    assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"channels_last={channels_last}")
    assert torch.equal(got_state, state)


def test_float64_and_mixed_dtypes_like_diffusers(monkeypatch):
    """float64 runs in float64: equal to diffusers run in float64 throughout (its Euler steps round the
    sample to fp32 on the way; not here); an fp16 model output with an fp32 sample gives diffusers'
    dtypes (Euler: the model's; Heun: promoted)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for family in (EULER, ANCESTRAL, HEUN):
        ref_cls, fast_cls = CLASSES[family]
        step_kw, seed = (CHURN, 1) if family == EULER else ({}, 1 if family == ANCESTRAL else None)
        want, want0 = exact_trajectory(family, {}, x, 6, step_kw, seed, monkeypatch)
        with monkeypatch.context() as patch:
            patch.setattr(base, "randn_tensor", _float32_draw)
            got, got0 = trajectory(fast_cls(), x.double(), 6, step_kw, seed)
        assert got[-1].dtype == got0[-1].dtype == want[-1].dtype == torch.float64
        # 1e-6, not 1e-12: diffusers rounds its step scalars (dt, the churn lift) to float32; the plans
        # combine the same float32 sigmas in float64
        for a, b, what in ((got[-1], want[-1], "sample"), (got0[-1], want0[-1], "x0")):
            assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=0, what=f"{family} float64 {what}")
    x = x.double()
    for family in (EULER, ANCESTRAL, HEUN):
        ref_cls, fast_cls = CLASSES[family]
        outs = []
        for s in (ref_cls(), fast_cls()):
            s.set_timesteps(5)
            t = s.timesteps[1]
            s.set_begin_index(1)
            kw = dict(generator=torch.Generator().manual_seed(0)) if family == ANCESTRAL else {}
            outs.append(s.step(x.half()[:, :1], t, x.float()[:, :1], **kw).prev_sample)
        assert outs[1].dtype == outs[0].dtype, family
        assert_close(outs[1], outs[0], atol=2e-3, rtol=2e-3, what=f"{family} mixed dtypes")


def test_outputs_are_differentiable_like_diffusers():
    """Gradients through both outputs of a step (Euler, Heun's second call) and add_noise equal diffusers'."""
    g = torch.Generator().manual_seed(3)
    x_in, e_in, e2_in = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    for family in (EULER, HEUN):
        ref_cls, fast_cls = CLASSES[family]
        grads = []
        for s in (ref_cls(prediction_type="v_prediction"), fast_cls(prediction_type="v_prediction")):
            s.set_timesteps(6)
            x, e, e2 = (v.clone().requires_grad_() for v in (x_in, e_in, e2_in))
            t = s.timesteps[0]
            out = s.step(e, t, x)
            loss = (out.prev_sample**2).sum() + out.pred_original_sample.sum()
            if family == HEUN:  # the second call reads the first's x0 and start sample
                out = s.step(e2, s.timesteps[1], out.prev_sample)
                loss = loss + (out.prev_sample**2).sum() + out.pred_original_sample.sum()
            loss = loss + s.add_noise(x, e, s.timesteps[2:4]).square().sum()
            loss.backward()
            grads.append((x.grad, e.grad, e2.grad))
        for name, a, b in zip(("sample", "model_output", "model_output 2"), grads[1], grads[0]):
            if b is not None:
                assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"{family} d/d {name}")


@pytest.mark.parametrize("family", [EULER, ANCESTRAL, HEUN])
def test_torch_compile_fullgraph_on_the_first_call_after_set_timesteps(family):
    """torch.compile(step, fullgraph=True) from the first call after set_timesteps: the default plans are
    built there. Heun's two calls, and Euler's churn with seeds (its plan built by one eager step first:
    a generator cannot be traced) compile too; each call equals the eager drop-in's."""
    _, fast_cls = CLASSES[family]
    fast, want = fast_cls(), fast_cls()
    for s in (fast, want):
        s.set_timesteps(6)
    step = torch.compile(fast.step, fullgraph=True, backend="aot_eager")
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    kw = dict(seeds=sample_seeds(1, 2)) if family == ANCESTRAL else {}
    xc = xe = x
    for t in fast.timesteps[: 2 if family == HEUN else 1]:
        xc = step(e, t, xc, return_dict=False, **kw)[0]
        xe = want.step(e, t, xe, **kw).prev_sample
        assert_close(xc, xe, atol=1e-6, rtol=1e-6, what=f"{family} compiled step")
    assert fast.step_index == want.step_index
    if family == EULER:
        churn = dict(s_churn=1.0, seeds=sample_seeds(2, 2))
        for s in (fast, want):
            s.step(e, s.timesteps[1], x, **churn)
            s.set_timesteps(6)
        for t in fast.timesteps[:2]:
            xc = step(e, t, xc, return_dict=False, **churn)[0]
            xe = want.step(e, t, xe, **churn).prev_sample
        assert_close(xc, xe, atol=1e-6, rtol=1e-6, what="compiled churn")


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("family", [EULER, ANCESTRAL, HEUN])
def test_fused_guidance_equals_guidance_done_outside(device, backend, family):
    """guidance_scale=g with model_output = [uncond; cond] equals diffusers given uncond + g*(cond - uncond)
    (Heun: both calls; Euler with churn and ancestral: the same generator noise)."""
    require_backend(backend, device)
    ref_cls, fast_cls = CLASSES[family]
    ref, fast = ref_cls(), fast_cls()
    fast.backend = backend
    ref.set_timesteps(6)
    fast.set_timesteps(6, device=device)
    g = torch.Generator().manual_seed(9)
    x, u, c = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    x = x * ref.init_noise_sigma
    step_kw = CHURN if family == EULER else {}
    seeded = {} if family == HEUN else dict(generator=torch.Generator().manual_seed(2))
    seeded_fast = {} if family == HEUN else dict(generator=torch.Generator().manual_seed(2))
    xr, xf = x, x.to(device)
    for t in ref.timesteps[:3]:
        want = ref.step(u + 7.5 * (c - u), t, xr, **step_kw, **seeded)
        got = fast.step(torch.cat([u, c]).to(device), t.to(device), xf, **step_kw, **seeded_fast, guidance_scale=7.5)
        assert_close(got.prev_sample, want.prev_sample, **GUIDED, what=f"{family} guided prev t={t}")
        assert_close(got.pred_original_sample, want.pred_original_sample, **GUIDED, what="guided x0")
        xr, xf = want.prev_sample, got.prev_sample
    with pytest.raises(ValueError, match=r"model_output: with guidance_scale it holds \[uncond; cond\]"):
        fast.step(c.to(device), ref.timesteps[3].to(device), xf, guidance_scale=2.0)


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("family", [EULER, ANCESTRAL, HEUN])
def test_no_host_sync_inside_a_step(device, backend, family, monkeypatch):
    """Device timesteps are not read (the run starts at step 0), the input scale is a host scalar, the noise
    comes from seeds: on CUDA a whole trajectory runs under set_sync_debug_mode("error"), and equals
    diffusers' on the CPU fed the same Philox noise."""
    require_backend(backend, device)
    ref_cls, fast_cls = CLASSES[family]
    step_kw = dict(s_churn=1.0) if family == EULER else {}
    seeds = sample_seeds(4, 2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ref_cls()
    ref.set_timesteps(6)
    if family != HEUN:
        philox_draws(monkeypatch, d_euler if family == EULER else d_ancestral, seeds, 256, range(6))
    want, _ = trajectory(ref, x, None, step_kw)
    fast = fast_cls()
    fast.backend = backend
    fast.set_timesteps(6, device=device)
    xf = x.to(device) * fast.init_noise_sigma
    seeds_on = seeds.to(device)
    for t, t_host in zip(fast.timesteps, fast.timesteps.tolist()):
        assert t.device.type == device
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            e = model(fast.scale_model_input(xf, t), t_host)
            xf = fast.step(e, t, xf, **step_kw, seeds=seeds_on).prev_sample
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert_close(xf, want[-1], atol=2e-5, rtol=2e-5, what=f"{family} {device}")


def philox_draws(monkeypatch, module, seeds, per_sample, calls):
    """diffusers' randn_tensor replaced by the Philox stream: draw k is step `calls[k]`'s noise."""
    it = iter(calls)

    def draw(shape, generator=None, device=None, dtype=None, **kw):
        return randn(seeds, per_sample, step=next(it)).reshape(shape).to(dtype)
    monkeypatch.setattr(module, "randn_tensor", draw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", [EULER, ANCESTRAL])
def test_seeds_draw_the_fastdiff_stream(backend, family, monkeypatch):
    """With seeds the noise is the Philox stream at noise step = the step index: equal to diffusers fed
    that noise, and a sample's result does not depend on its batch."""
    require_backend(backend)
    ref_cls, fast_cls = CLASSES[family]
    step_kw = dict(s_churn=2.0, s_tmin=0.5, s_tmax=20.0) if family == EULER else {}
    seeds = sample_seeds(11, 3)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    ref = ref_cls()
    ref.set_timesteps(8)
    sig = ref.sigmas[:-1]
    calls = [i for i, s in enumerate(sig) if family == ANCESTRAL or 0.5 <= s <= 20.0]
    philox_draws(monkeypatch, d_euler if family == EULER else d_ancestral, seeds, 32, calls)
    want, _ = trajectory(ref, x, 8, step_kw)
    fast = fast_cls()
    fast.backend = backend
    fast.set_seeds(seeds)
    got, _ = trajectory(fast, x, 8, step_kw)
    assert_close(got[-1], want[-1], atol=2e-5, rtol=2e-5, what=f"{family} {backend} seeds")
    single = fast_cls()
    single.backend = backend
    alone, _ = trajectory(single, x[1:2], 8, step_kw, seeds=seeds[1:2])
    assert torch.equal(alone[-1][0], got[-1][1])


@pytest.mark.parametrize("family", [EULER, ANCESTRAL, HEUN])
def test_begin_index_like_diffusers(family, monkeypatch):
    """set_begin_index (img2img; Heun's index counts calls: 2k) starts where diffusers starts, add_noise
    reads its sigma, and seeds count noise steps from there."""
    ref_cls, fast_cls = CLASSES[family]
    begin = 4 if family == HEUN else 3
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    seeds = sample_seeds(3, 2)
    runs = []
    for s in (ref_cls(), fast_cls()):
        s.set_timesteps(6)
        s.set_begin_index(begin)
        ts = s.timesteps[begin:]
        x = s.add_noise(x0, noise, ts[:1].repeat(2))
        for t in ts:
            gen = {} if family == HEUN else dict(generator=torch.Generator().manual_seed(int(t)))  # same draws
            out = s.step(model(s.scale_model_input(x, t), t), t, x, **gen)
            x = out.prev_sample
        runs.append(x)
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5, what=f"{family} begin_index")
    if family == HEUN:
        return
    ref, fast = ref_cls(), fast_cls()
    ref.set_timesteps(6)
    ref.set_begin_index(begin)
    calls = list(range(begin, 6))
    philox_draws(monkeypatch, d_euler if family == EULER else d_ancestral, seeds, 48, calls)
    step_kw = dict(s_churn=1.0) if family == EULER else {}
    xr = xf = x0 * ref.sigmas[begin]
    fast.set_timesteps(6)
    fast.set_begin_index(begin)
    assert fast.begin_index == begin
    for t in ref.timesteps[begin:]:
        xr = ref.step(model(xr, t), t, xr, **step_kw).prev_sample
        xf = fast.step(model(xf, t), t, xf, **step_kw, seeds=seeds).prev_sample
    assert_close(xf, xr, atol=2e-5, rtol=2e-5, what=f"{family} begin_index noise")


@pytest.mark.parametrize("family", [EULER, ANCESTRAL, HEUN])
def test_add_noise_matches_diffusers(family):
    """x0 + sigma*noise with each timestep's sigma: per-sample timesteps (Heun's duplicated ones: the
    second), after begin_index, after a step; and Euler's get_velocity."""
    ref_cls, fast_cls = CLASSES[family]
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    ref, fast = ref_cls(), fast_cls()
    for s in (ref, fast):
        s.set_timesteps(10)
    ts = ref.timesteps[torch.tensor([0, 3, 7, 3])]
    assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6, what="per sample")
    one = ref.timesteps[5:6]
    assert_close(fast.add_noise(x0, noise, one), ref.add_noise(x0, noise, one), atol=1e-6, rtol=1e-6, what="one")
    if family == EULER:
        assert_close(fast.get_velocity(x0, noise, ts), ref.get_velocity(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what="get_velocity")
        with pytest.raises(ValueError, match="Passing integer indices"):
            fast.get_velocity(x0, noise, torch.tensor([1, 2, 3, 4]))
    for s in (ref, fast):
        s.set_begin_index(2)
    assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6, what="begin")
    for s in (ref, fast):
        s.step(x0, s.timesteps[2], x0, **({} if family == HEUN else dict(generator=torch.Generator())))
    assert fast.step_index == ref.step_index == 3
    assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6, what="after")


def test_assigned_sigmas_are_honoured():
    """A run's sigmas changed in place, or assigned, are what the next step reads, as in diffusers."""
    x = torch.randn(1, 2, 4, 4)
    ref, fast = EulerDiscreteScheduler(), FastEulerDiscreteScheduler()
    for s in (ref, fast):
        s.set_timesteps(5)
        s.sigmas[2] = 3.0
    outs = []
    for s in (ref, fast):
        y = x
        for t in s.timesteps[:3]:
            y = s.step(model(y, t), t, y).prev_sample
        s.sigmas = s.sigmas * 0.5
        outs.append(s.step(model(y, 1), s.timesteps[3], y).prev_sample)
    assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5, what="sigmas changed")


def test_same_constructor_attributes_and_config_as_diffusers(tmp_path):
    for family, (ref_cls, fast_cls) in CLASSES.items():
        ours, theirs = inspect.signature(fast_cls.__init__), inspect.signature(ref_cls.__init__)
        assert [(p.name, p.default) for p in ours.parameters.values()] == \
            [(p.name, p.default) for p in theirs.parameters.values()], family
        for method in ("step", "set_timesteps", "scale_model_input", "add_noise"):
            params = list(inspect.signature(getattr(ref_cls, method)).parameters)
            assert list(inspect.signature(getattr(fast_cls, method)).parameters)[: len(params)] == params
        ref, fast = ref_cls(), fast_cls()
        for name in ("betas", "alphas", "alphas_cumprod", "sigmas", "timesteps"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (family, name)
            assert getattr(fast, name).dtype == getattr(ref, name).dtype, (family, name)
        assert fast.order == ref.order and len(fast) == len(ref) and fast.num_inference_steps == \
            ref.num_inference_steps
        assert torch.equal(fast.init_noise_sigma, ref.init_noise_sigma)
        assert fast.step_index is None and fast.begin_index is None
        converted = fast_cls.from_config(ref_cls(steps_offset=1).config)
        assert converted.config.steps_offset == 1
        back = ref_cls.from_config(converted.config)
        assert back.config.steps_offset == 1
        assert fast_cls.from_config(DDIMScheduler().config).config.num_train_timesteps == 1000
        converted.save_pretrained(tmp_path / family)
        loaded = fast_cls.from_pretrained(tmp_path / family)
        assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
            {k: v for k, v in converted.config.items() if not k.startswith("_")}
    heun = FastHeunDiscreteScheduler()
    heun.set_timesteps(4)
    assert heun.state_in_first_order
    heun.step(torch.zeros(1, 2), heun.timesteps[0], torch.zeros(1, 2))
    assert not heun.state_in_first_order
    euler = FastEulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    assert torch.equal(euler.timesteps, EulerDiscreteScheduler(timestep_type="continuous",
                                                               prediction_type="v_prediction").timesteps)


def test_step_index_rules_and_scale_model_input():
    """The first call finds its place (the second of two equal Heun timesteps); scale_model_input divides by
    diffusers' sqrt(sigma^2 + 1) bit for bit; a step after set_timesteps starts again."""
    ref, fast = HeunDiscreteScheduler(), FastHeunDiscreteScheduler()
    for s in (ref, fast):
        s.set_timesteps(5)
    x = torch.randn(1, 3, 4, 4)
    t = ref.timesteps[3]  # equal to timesteps[4]
    assert torch.equal(fast.scale_model_input(x, t), ref.scale_model_input(x, t))
    assert fast.step_index == ref.step_index == 4
    e = FastEulerDiscreteScheduler()
    e.set_timesteps(4)
    assert e.index_for_timestep(e.timesteps[2]) == 2 and e.index_for_timestep(float(e.timesteps[1])) == 1


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="prediction_type: EulerAncestralDiscreteScheduler has no 'sample'"):
        FastEulerAncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        FastEulerDiscreteScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="interpolation_type: expected one of"):
        FastEulerDiscreteScheduler(interpolation_type="cubic")
    with pytest.raises(ValueError, match="final_sigmas_type: expected one of"):
        FastEulerDiscreteScheduler(final_sigmas_type="one")
    with pytest.raises(ValueError, match="timestep_spacing: expected one of"):
        FastHeunDiscreteScheduler(timestep_spacing="quadratic")
    with pytest.raises(ValueError, match="Only one of `config.use_beta_sigmas`"):
        FastHeunDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="trained_betas: expected num_train_timesteps=1000 values, got 10"):
        FastEulerDiscreteScheduler(trained_betas=[0.01] * 10)
    with pytest.raises(ValueError, match="beta_schedule"):
        FastEulerAncestralDiscreteScheduler(beta_schedule="exp")
    e = FastEulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="Cannot set `timesteps` with `config.use_karras_sigmas = True`"):
        e.set_timesteps(timesteps=[900, 100])
    with pytest.raises(ValueError, match="Only one of `timesteps` or `sigmas`"):
        e.set_timesteps(timesteps=[900, 100], sigmas=[1.0, 0.0])
    e.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="Passing integer indices"):
        e.step(x, 999, x)
    with pytest.raises(ValueError, match="Passing integer indices"):
        e.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="timestep: 500.5 is not one of this run's timesteps"):
        e.step(x, 500.5, x)
    with pytest.raises(ValueError, match="timestep: expected one timestep"):
        e.step(x, e.timesteps[:2], x)
    for t in e.timesteps:
        x = e.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="step: this run has 4 steps and step index 4 is past its end"):
        e.step(x, e.timesteps[-1], x)
    h = FastHeunDiscreteScheduler()
    h.set_timesteps(3)
    for t in h.timesteps:
        x = h.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="step: this run has 5 steps"):
        h.step(x, h.timesteps[-1], x)
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
        FastEulerAncestralDiscreteScheduler().set_timesteps(0)
    a = FastEulerAncestralDiscreteScheduler()
    a.set_timesteps(4)
    with pytest.raises(TypeError, match="seeds: expected"):
        a.step(x, a.timesteps[0], x, seeds=1.5)


def test_set_timesteps_forgets_begin_index_and_heun_state():
    h = FastHeunDiscreteScheduler()
    h.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    h.step(x, h.timesteps[0], x)
    h.set_begin_index(2)
    h.set_timesteps(4)
    assert h.begin_index is None and h.state_in_first_order and h.step_index is None


# --------------------------------------------------------------------- plan builders vs the references

def ve_model(x, sigma):
    """eps(x; sigma) in VE coordinates, smooth in both (float64)."""
    return torch.tanh(x / math.sqrt(1 + sigma**2)) + 0.1 * sigma / (1 + sigma)


def denoiser(x, sigma):
    return x - sigma * ve_model(x, sigma)


SIGMAS = schedules.karras_sigmas(0.05, 20.0, 9).tolist() + [0.0]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_euler_with_karras_churn_matches_the_reference(backend):
    """euler_plan(churn="karras"): step i's output carries step i+1's lift (the model sees x_hat), the first
    lift is x_T's; equal to Algorithm 2 (sample_euler) with the same noise. In float64 on the reference,
    to 1e-5 in fp32 on the kernels."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    noises = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in SIGMAS]
    churn = dict(s_churn=3.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.01)
    want = sample_euler(denoiser, x_T, SIGMAS, **churn, noise_sampler=lambda i: noises[i])
    sigma_hat = churn_sigmas(SIGMAS, churn["s_churn"], churn["s_tmin"], churn["s_tmax"])
    plan = euler_plan(SIGMAS, **churn)
    dtype = torch.float64 if backend == "torch" else torch.float32
    stepper = Stepper(plan, backend=backend)
    x = x_T + noises[0] * churn["s_noise"] * math.sqrt(sigma_hat[0] ** 2 - SIGMAS[0] ** 2)
    x = x.to(dtype)
    for i in range(len(SIGMAS) - 1):
        x, x0 = stepper.step(x, ve_model(x.double(), sigma_hat[i]).to(dtype), noise=noises[i + 1].to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(x, want, atol=tol, rtol=tol, what=f"euler churn {backend}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_euler_ancestral_and_heun_match_the_reference(backend):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    noises = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in SIGMAS]
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        def out(x, s, prediction_type=prediction_type):  # the model output of the type, from eps (VE)
            e = ve_model(x.double(), s)
            x0 = x.double() - s * e
            n = math.sqrt(1 + s**2)
            return {"epsilon": e, "v_prediction": (e - s * x0) / n, "sample": x0}[prediction_type].to(dtype)

        want = sample_euler_ancestral(denoiser, x_T, SIGMAS, eta=0.7, s_noise=1.02, noise_sampler=lambda i: noises[i])
        stepper = Stepper(euler_ancestral_plan(SIGMAS, eta=0.7, s_noise=1.02, prediction_type=prediction_type),
                          backend=backend)
        x = x_T.to(dtype)
        for i, s in enumerate(SIGMAS[:-1]):
            x, _ = stepper.step(x, out(x, s), noise=noises[i].to(dtype))
        assert_close(x, want, atol=tol, rtol=tol, what=f"ancestral {prediction_type} {backend}")

        want = sample_heun(denoiser, x_T, SIGMAS)
        first, second = heun_plans(SIGMAS, prediction_type=prediction_type)
        stepper = Stepper(first, backend=backend)
        x = x_T.to(dtype)
        for i, (s, s_next) in enumerate(zip(SIGMAS[:-1], SIGMAS[1:])):
            x_2, x0 = stepper.step(x, out(x, s), plan=first, row=i, advance=False)
            if s_next > 0:
                x_2, _ = stepper.step(x_2, out(x_2, s_next), plan=second, row=i, m=[x0, x], advance=False)
            x = x_2
        assert_close(x, want, atol=tol, rtol=tol, what=f"heun {prediction_type} {backend}")


def test_euler_order_of_convergence_on_the_oracle():
    """Against the exact probability-flow ODE of a Gaussian mixture (fastdiff.oracle, sigma 2 -> 0.3 on
    Karras grids): doubling the steps from 32 to 64 divides Euler's error by ~2 (first order; measured
    1.75, 1.87 from 64 to 128) and Heun's by ~4 (second order; measured 3.55, 3.76 from 64 to 128)."""
    m = default_mixture((3, 4, 4), k=4)
    smax, smin = 2.0, 0.3
    y_T = smax * torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a_from, a_to = 1 / math.sqrt(1 + smax**2), 1 / math.sqrt(1 + smin**2)
    exact = ode_solution(m, a_from * y_T, a_from**2, a_to**2) / a_to  # VE: x = x_VP/alpha

    def eps(x, s):
        return m.eps(x, 1.0, s)

    errs = {"euler": [], "heun": []}
    for n in (32, 64):
        sigmas = schedules.karras_sigmas(smin, smax, n + 1)
        stepper, x = Stepper(euler_plan(sigmas)), y_T
        for s in sigmas[:-1]:
            x, _ = stepper.step(x, eps(x, s))
        errs["euler"].append((x - exact).abs().max().item())
        first, second = heun_plans(sigmas)
        stepper, x = Stepper(first), y_T
        for i in range(n):
            x_2, x0 = stepper.step(x, eps(x, sigmas[i]), plan=first, row=i, advance=False)
            x, _ = stepper.step(x_2, eps(x_2, sigmas[i + 1]), plan=second, row=i, m=[x0, x], advance=False)
        errs["heun"].append((x - exact).abs().max().item())
    euler, heun = (errs[k][0] / errs[k][1] for k in ("euler", "heun"))
    assert 1.5 < euler < 2.5 and 3.0 < heun < 5.0, errs


def test_builders_closed_forms_and_bad_input():
    """sigma_down^2 + sigma_up^2 = sigma_next^2 (as k-diffusion's get_ancestral_step); Euler into sigma = 0
    returns x0 exactly; the builders name what they refuse."""
    s = np.array(SIGMAS)
    down, up = ancestral_sigmas(s[:-1], s[1:], eta=0.8)
    np.testing.assert_allclose(down**2 + up**2, s[1:] ** 2, rtol=1e-13, atol=0)
    for i in range(len(s) - 1):
        np.testing.assert_allclose((down[i], up[i]), get_ancestral_step(s[i], s[i + 1], 0.8), rtol=1e-14)
    # a step from a large sigma (squaredcos' sigma_max): sigma_down^2 = sigma_next^2 - sigma_up^2 in exact
    # rational arithmetic, which a float difference keeps to ~1e-8 only
    for eta in (1.0, 0.8):
        f, t = Fraction(20291.302734375), Fraction(1.7507)
        exact = t**2 - Fraction(eta) ** 2 * t**2 * (f**2 - t**2) / f**2
        got, _ = ancestral_sigmas(float(f), float(t), eta=eta)
        np.testing.assert_allclose(got, math.sqrt(exact), rtol=1e-14)
    x, e = torch.randn(2, 5), torch.randn(2, 5)
    last = euler_step(2.0, 2.0, 0.0)
    out, x0 = Stepper(last, backend="cpu").step(x, e)
    assert torch.equal(out, x0)
    with pytest.raises(ValueError, match="sigma_hat: expected > 0"):
        euler_step([1.0, 0.0], [1.0, 0.0], [0.5, 0.0])
    with pytest.raises(ValueError, match="lift, lift_next: a row draws one z"):
        euler_step(1.0, 1.1, 0.5, lift=0.1, lift_next=0.2)
    with pytest.raises(ValueError, match="sigma_next: Heun's second call runs at sigma_next > 0"):
        heun_second([1.0, 0.5], [0.5, 0.0])
    with pytest.raises(ValueError, match="churn: expected 'karras' or 'diffusers'"):
        euler_plan(SIGMAS, churn="edm")
