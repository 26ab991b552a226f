"""FastLCMScheduler against diffusers' LCMScheduler (0.42) as the oracle: whole trajectories over the config
and set_timesteps options (fp32 and float64, the same generator noise), every backend for two configs, low
precision under the accuracy rule, odd shapes and strides, seeds, begin_index, fused guidance, autograd,
torch.compile, bad input; the paper-shaped reference (Luo et al. 2023), the consistency boundary condition
and the re-noising's marginal."""

import inspect

import diffusers.schedulers.scheduling_lcm as diffusers_lcm
import noise_capture
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, DEVICES, assert_accuracy_rule, assert_close, require_backend
from diffusers import DDIMScheduler, LCMScheduler
from test_ddim import check_trajectory

from fastdiff.integrations.diffusers.lcm import FastLCMScheduler
from fastdiff.philox import randn, sample_seeds
from fastdiff.reference import lcm as paper

VARIANTS = {  # config, set_timesteps arguments
    "default": (dict(), dict(num_inference_steps=4)),
    "v-clip-original30": (dict(prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.9),
                          dict(num_inference_steps=6, original_inference_steps=30)),
    "sample-linear-scaling5": (dict(prediction_type="sample", beta_schedule="linear", beta_start=0.0001,
                                    beta_end=0.02, timestep_scaling=5.0), dict(num_inference_steps=5)),
    "strength": (dict(), dict(num_inference_steps=4, strength=0.6)),
    "custom-strength-noise-at-the-end": (dict(), dict(timesteps=[999, 759, 499, 259, 99], strength=0.6)),
    "custom-to-minus-1-alpha0": (dict(set_alpha_to_one=False, beta_schedule="squaredcos_cap_v2"),
                                 dict(timesteps=[999, 500, -1])),
    "zero-snr-v": (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                        steps_offset=1), dict(num_inference_steps=4)),
}


def model(x, t):
    return 0.9 * torch.tanh(x.float() * (1.0 + float(t) / 1000.0)).to(x.dtype) + 0.05


def diffusers_noise(noises=None):
    return noise_capture.diffusers_noise(diffusers_lcm, noises)


def float64(scheduler):
    """diffusers' scheduler with float64 schedule tensors (the same values), so its float64 run's scalars are
    float64 too (called with Python int timesteps, c_skip and c_out are)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def trajectory(scheduler, x, set_kw, device=None, host_int=False, **step_kw):
    scheduler.set_timesteps(**set_kw, device=device)
    xs, fs = [], []
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, t.cpu()), int(t) if host_int else t, x, **step_kw)
        x = out.prev_sample
        xs.append(x)
        fs.append(out.denoised)
    return xs, fs


def runs(config, set_kw, device="cpu", backend="cpu", x=None, seed=0):
    """(ours fp32, diffusers fp32, diffusers float64) from the same start and noise: ours and diffusers
    draw from generators seeded alike; the float64 run is fed the fp32 run's draws."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) if x is None else x
    with diffusers_noise() as drawn:
        want = trajectory(LCMScheduler(**config), x, set_kw, generator=torch.Generator().manual_seed(1))
    with diffusers_noise(drawn):
        exact = trajectory(float64(LCMScheduler(**config)), x.double(), set_kw, host_int=True)
    fast = FastLCMScheduler(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(device), set_kw, device=device, generator=torch.Generator(device).manual_seed(1))
    return got, want, exact


def check(got, want, exact):
    check_trajectory(got[0], want[0], exact[0], "prev_sample")
    check_trajectory(got[1], want[1], exact[1], "x0")  # denoised, normwise as x0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers(name):
    """Prediction types, clipping, original_inference_steps, strength (with custom timesteps it leaves
    noise on the last step, as diffusers does), custom timesteps to -1 with set_alpha_to_one=False,
    timestep_scaling, zero terminal SNR; the ignored timestep_spacing/steps_offset."""
    check(*runs(*VARIANTS[name]))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["default", "v-clip-original30"])
def test_trajectory_on_every_backend(device, backend, name):
    require_backend(backend, device)
    config, set_kw = VARIANTS[name]
    if device == "cpu":
        check(*runs(config, set_kw, device, backend))
    else:  # a CUDA generator draws other numbers than a CPU one: compare with diffusers on CUDA
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
        want = trajectory(LCMScheduler(**config), x, set_kw, device, generator=torch.Generator(device).manual_seed(1))
        fast = FastLCMScheduler(**config)
        fast.backend = backend
        got = trajectory(fast, x, set_kw, device, generator=torch.Generator(device).manual_seed(1))
        assert_close(got[0][-1], want[0][-1], atol=1e-4, rtol=1e-4, what=f"{device} {backend}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dynamic_thresholding(backend):
    require_backend(backend)
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample")
    x = 2 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    got, want, _ = runs(config, dict(num_inference_steps=4), backend=backend, x=x)
    for i in range(4):
        assert_close(got[0][i], want[0][i], atol=1e-5, rtol=1e-5, what=f"{backend} thresholding step {i}")
        assert_close(got[1][i], want[1][i], atol=1e-5, rtol=1e-5, what=f"{backend} thresholded denoised {i}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accuracy_rule(backend, dtype):
    """Error vs diffusers in fp32 at most 2x that of diffusers run in the same dtype (the same noise: the
    Philox stream of each step, drawn in the kernel from seeds)."""
    require_backend(backend)
    seeds = sample_seeds(5, 2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    stream = [randn(seeds, 4 * 256, step=k).reshape(2, 4, 16, 16) for k in range(4)]
    config = dict(prediction_type="v_prediction")
    with diffusers_noise(stream):
        want, _ = trajectory(LCMScheduler(**config), x, dict(num_inference_steps=4))
    with diffusers_noise(stream):
        naive, _ = trajectory(LCMScheduler(**config), x.to(dtype), dict(num_inference_steps=4))
    fast = FastLCMScheduler(**config)
    fast.backend = backend
    got, _ = trajectory(fast, x.to(dtype), dict(num_inference_steps=4), seeds=seeds)
    assert got[-1].dtype == dtype
    assert_accuracy_rule(got[-1], naive[-1], want[-1], what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_and_strided_inputs(backend):
    require_backend(backend)
    x = torch.randn(3, 5, 19, 17, generator=torch.Generator().manual_seed(2)).transpose(2, 3)
    assert not x.is_contiguous()
    got, want, _ = runs(dict(), dict(num_inference_steps=4), backend=backend, x=x)
    assert_close(got[0][-1], want[0][-1], atol=2e-5, rtol=2e-5, what=f"{backend} odd shape")


def test_float64_and_autograd_like_diffusers():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    config = dict(prediction_type="v_prediction")
    want, _ = trajectory(LCMScheduler(**config), x, dict(num_inference_steps=4),
                         generator=torch.Generator().manual_seed(3))
    got, _ = trajectory(FastLCMScheduler(**config), x, dict(num_inference_steps=4),
                        generator=torch.Generator().manual_seed(3))
    assert got[-1].dtype == torch.float64
    assert_close(got[-1], want[-1], atol=1e-6, rtol=1e-6, what="float64")  # diffusers' scalars are float32
    grads = []
    for s in (LCMScheduler(**config), FastLCMScheduler(**config)):
        s.set_timesteps(4)
        t = s.timesteps[1]
        s.set_begin_index(1)
        xs, out = x.float().clone().requires_grad_(), model(x.float(), t).requires_grad_()
        step = s.step(out, t, xs, generator=torch.Generator().manual_seed(4))
        ((step.prev_sample**2).sum() + step.denoised.sum()).backward()
        grads.append((xs.grad, out.grad))
    assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5, what="d/d sample")
    assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5, what="d/d model_output")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeds_and_begin_index(backend):
    """With seeds the noise of step k is the Philox stream of step k: equal to diffusers fed that noise, the
    same for a sample whatever batch it is in; set_begin_index(k) starts the counter at k."""
    require_backend(backend)
    seeds = sample_seeds(11, 3)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    stream = [randn(seeds, 4 * 64, step=k).reshape(3, 4, 8, 8) for k in range(6)]
    with diffusers_noise(stream):
        want, _ = trajectory(LCMScheduler(), x, dict(num_inference_steps=6))
    fast = FastLCMScheduler()
    fast.backend = backend
    got, _ = trajectory(fast, x, dict(num_inference_steps=6), seeds=seeds)
    assert_close(got[-1], want[-1], atol=2e-5, rtol=2e-5, what=f"{backend} seeds")
    alone, _ = trajectory(fast, x[1:2], dict(num_inference_steps=6), seeds=seeds[1:2])
    assert torch.equal(alone[-1][0], got[-1][1])
    ref = LCMScheduler()
    for s in (ref, fast):
        s.set_timesteps(6)
        s.set_begin_index(2)
    t = fast.timesteps[2]
    got = fast.step(model(x, t), t, x, seeds=seeds)
    with diffusers_noise([stream[2]]):
        want = ref.step(model(x, t), t, x)
    assert fast.step_index == ref.step_index == 3
    assert_close(got.prev_sample, want.prev_sample, atol=1e-5, rtol=1e-5, what="begin_index noise counter")


@pytest.mark.parametrize("device,backend", DEVICES)
def test_fused_guidance_equals_guidance_done_outside(device, backend):
    require_backend(backend, device)
    ref, fast = LCMScheduler(), FastLCMScheduler()
    fast.backend = backend
    ref.set_timesteps(4)
    fast.set_timesteps(4, device=device)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    for t in ref.timesteps:
        u, c = model(x, t), model(-0.5 * x, t)
        gen = torch.Generator().manual_seed(int(t))
        want = ref.step(u + 3.5 * (c - u), t, x, generator=gen)
        got = fast.step(torch.cat([u, c]).to(device), t.to(device), x.to(device), guidance_scale=3.5,
                        generator=torch.Generator().manual_seed(int(t)) if device == "cpu" else None)
        assert_close(got.denoised, want.denoised, atol=2e-5, rtol=2e-5, what=f"guided denoised t={int(t)}")
        if device == "cpu":
            assert_close(got.prev_sample, want.prev_sample, atol=2e-5, rtol=2e-5, what=f"guided prev t={int(t)}")
        x = want.prev_sample


def test_torch_compile_fullgraph_on_the_first_call_after_set_timesteps():
    fast = FastLCMScheduler()
    fast.set_timesteps(4)
    step = torch.compile(fast.step, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 4, 4)
    eager = FastLCMScheduler()
    eager.set_timesteps(4)
    for t in fast.timesteps[:2]:
        got = step(model(x, t), t, x, return_dict=False, seeds=3)
        want = eager.step(model(x, t), t, x, seeds=3)
        assert_close(got[0], want.prev_sample, atol=1e-6, rtol=1e-6, what="compiled")
        assert_close(got[1], want.denoised, atol=1e-6, rtol=1e-6, what="compiled denoised")
    torch._dynamo.reset()


def test_matches_the_paper_shaped_reference():
    """The plans against ``fastdiff.reference.lcm`` (Luo et al. 2023, Algorithm 3) in float64, same noise."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    seeds = sample_seeds(2, 2)
    for config in (dict(), dict(prediction_type="sample", clip_sample=True, timestep_scaling=4.0)):
        fast = FastLCMScheduler(**config)
        got, _ = trajectory(fast, x, dict(num_inference_steps=5), seeds=seeds)
        cfg = fast.config
        want = paper.sample_lcm(model, x, fast.alphas_cumprod.double(), fast.timesteps.tolist(),
                                noise_sampler=lambda i: randn(seeds, 192, step=i, dtype=torch.float64).view(x.shape),
                                timestep_scaling=cfg.timestep_scaling, prediction_type=cfg.prediction_type,
                                clip=1.0 if cfg.clip_sample else None)
        assert_close(got[-1], want, atol=1e-6, rtol=1e-6, what=f"reference {config}")


def test_boundary_condition_and_renoising_marginal():
    """The consistency function's boundary condition (Song et al. 2023, Luo et al. 2023 eq. 9): at t = 0,
    c_skip = 1 and c_out = 0, so the denoised output is the sample itself, exactly. Re-noising: given the
    true x0 (a "sample" model), x_next ~ N(sqrt(abar_next) f, (1 - abar_next)): the standardized residual
    of 8192 elements has mean within 5/sqrt(n) of 0 and variance within 5*sqrt(2/n) of 1."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    for s in (LCMScheduler(), FastLCMScheduler()):
        s.set_timesteps(timesteps=[999, 499, 0])
        s.set_begin_index(2)
        assert torch.equal(s.step(model(x, 0), 0, x).denoised, x)
    fast = FastLCMScheduler(prediction_type="sample")
    fast.set_timesteps(4)
    t, t_next = fast.timesteps[1], fast.timesteps[2]
    fast.set_begin_index(1)
    x0 = torch.randn(16, 8, 8, 8, generator=torch.Generator().manual_seed(8))
    out = fast.step(x0, t, torch.zeros_like(x0), seeds=sample_seeds(1, 16))
    c_skip, c_out = paper.scalings(int(t))
    assert_close(out.denoised, c_out * x0, atol=1e-6, rtol=1e-6, what="f = c_out*x0 at x = 0")
    abar = fast.alphas_cumprod.double()[t_next]
    r = ((out.prev_sample.double() - abar.sqrt() * out.denoised.double()) / (1 - abar).sqrt()).flatten()
    n = r.numel()
    assert abs(r.mean().item()) < 5 / n**0.5 and abs(r.var().item() - 1) < 5 * (2 / n) ** 0.5, (r.mean(), r.var())


def test_same_constructor_attributes_and_config_round_trips(tmp_path):
    ours, theirs = inspect.signature(FastLCMScheduler.__init__), inspect.signature(LCMScheduler.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    step_params = list(inspect.signature(LCMScheduler.step).parameters)
    assert list(inspect.signature(FastLCMScheduler.step).parameters)[: len(step_params)] == step_params
    for config in (dict(), dict(beta_schedule="linear", set_alpha_to_one=False), dict(rescale_betas_zero_snr=True)):
        ref, fast = LCMScheduler(**config), FastLCMScheduler(**config)
        public = [{k for k in vars(s) if not k.startswith("_")} for s in (ref, fast)]
        assert public[1] == public[0] and fast.backend is None  # backend: a property of the drop-ins
        for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "timesteps"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (config, name)
        assert fast.init_noise_sigma == ref.init_noise_sigma and len(fast) == len(ref)
        for kw in (dict(num_inference_steps=7), dict(num_inference_steps=3, strength=0.3),
                   dict(num_inference_steps=8, original_inference_steps=25), dict(timesteps=[999, 600, 20])):
            ref.set_timesteps(**kw)
            fast.set_timesteps(**kw)
            assert torch.equal(fast.timesteps, ref.timesteps), kw
            assert (fast.num_inference_steps, fast.custom_timesteps, fast.step_index, fast.begin_index) == \
                (ref.num_inference_steps, ref.custom_timesteps, ref.step_index, ref.begin_index)
    fast = FastLCMScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).config)
    assert fast.config.steps_offset == 1 and fast.config.original_inference_steps == 50
    fast.save_pretrained(tmp_path)
    assert LCMScheduler.from_pretrained(tmp_path).config.steps_offset == 1


def test_assigned_attributes_are_honoured():
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (LCMScheduler(), FastLCMScheduler()):
        s.set_timesteps(4)
        s.alphas_cumprod = s.alphas_cumprod * 0.9
        s.final_alpha_cumprod = torch.tensor(0.9)
        t = s.timesteps[0]
        outs.append(s.step(model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5, what="assigned alphas_cumprod")


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        FastLCMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="beta_schedule"):
        FastLCMScheduler(beta_schedule="sigmoid")
    fast = FastLCMScheduler()
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        fast.step(x, 999, x)
    with pytest.raises(ValueError, match="exactly one of"):
        fast.set_timesteps()
    with pytest.raises(ValueError, match="exactly one of"):
        fast.set_timesteps(4, timesteps=[999, 500])
    with pytest.raises(ValueError, match="num_inference_steps: 60 is larger than original_inference_steps x strength"):
        fast.set_timesteps(60)
    with pytest.raises(ValueError, match="num_inference_steps: 60 cannot be larger than original_inference_steps"):
        fast.set_timesteps(60, strength=2.0)
    with pytest.raises(ValueError, match="original_inference_steps: 2000 cannot be larger"):
        fast.set_timesteps(4, original_inference_steps=2000)
    with pytest.raises(ValueError, match="descending"):
        fast.set_timesteps(timesteps=[500, 900])
    fast.set_timesteps(2)
    with pytest.raises(ValueError, match=r"timestep: 500 is not one of this run's timesteps"):
        fast.step(x, 500, x)
    fast.set_timesteps(2)
    for t in fast.timesteps:
        fast.step(x, t, x)
    with pytest.raises(ValueError, match="step: the run has 2 steps and all were taken"):
        fast.step(x, fast.timesteps[-1], x)
    fast.set_timesteps(2)
    fast.step(x, fast.timesteps[0], x)
    with pytest.raises(ValueError, match=r"timestep: expected timesteps\[1\] = 499 \(the step index's\), got 999"):
        fast.step(x, 999, x)
    with pytest.raises(ValueError, match="timestep: expected one integer timestep"):
        fast.step(x, torch.tensor(499.0), x)
