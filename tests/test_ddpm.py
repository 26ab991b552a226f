"""FastDDPMScheduler against diffusers' DDPMScheduler (0.42) as the oracle: whole trajectories over the
config options (fp32 and float64, the same generator noise), on every backend for two configs, learned
variances, low precision under the accuracy rule, odd shapes and strides, seeds, begin_index, fused
guidance, autograd, torch.compile, bad input; the paper-shaped reference (Ho et al. 2020) and the posterior
q(x_prev | x_t, x0) on the Gaussian oracle."""

import inspect

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import noise_capture
import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, DEVICES, assert_accuracy_rule, assert_close, require_backend
from diffusers import DDIMScheduler, DDPMScheduler
from test_ddim import check_trajectory

from fastdiff.integrations.diffusers.ddpm import FastDDPMScheduler
from fastdiff.oracle import GaussianMixture
from fastdiff.philox import randn, sample_seeds
from fastdiff.reference import ddpm as paper

VARIANTS = {  # config, set_timesteps arguments
    "default": (dict(), dict(num_inference_steps=10)),
    "small_log-v-trailing": (dict(variance_type="fixed_small_log", prediction_type="v_prediction",
                                  timestep_spacing="trailing", clip_sample=False), dict(num_inference_steps=10)),
    "large-sample-linspace-range": (dict(variance_type="fixed_large", prediction_type="sample",
                                         timestep_spacing="linspace", clip_sample_range=0.8),
                                    dict(num_inference_steps=10)),
    "learned-offset-sigmoid": (dict(variance_type="learned", steps_offset=1, beta_schedule="sigmoid"),
                               dict(num_inference_steps=10)),
    "learned_range-v-zero-snr": (dict(variance_type="learned_range", prediction_type="v_prediction",
                                      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False),
                                 dict(num_inference_steps=10)),
    "cosine-laplace-custom": (dict(beta_schedule="squaredcos_cap_v2"), dict(timesteps=[999, 800, 650, 400, 120, 0])),
    "laplace-eps-zero-snr-clip": (dict(beta_schedule="laplace", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing"), dict(num_inference_steps=7)),
    "trailing-61-ends-at-minus-1": (dict(timestep_spacing="trailing", clip_sample=False), dict(num_inference_steps=61)),
}

GUIDED = dict(atol=2e-5, rtol=2e-5, guided=True)  # conftest.assert_close: a fused-guidance step


def model(x, t, learned=None):
    """A smooth stand-in for a network; with a learned variance type, the variance channels appended (a
    positive variance for "learned", a value in (-1, 1) for "learned_range")."""
    e = 0.9 * torch.tanh(x.float() * (1.0 + float(t) / 1000.0)).to(x.dtype) + 0.05
    if learned == "learned":
        return torch.cat([e, 0.02 * torch.sigmoid(x) + 1e-4], 1)
    if learned == "learned_range":
        return torch.cat([e, torch.tanh(2 * x)], 1)
    return e


def diffusers_noise(noises=None):
    return noise_capture.diffusers_noise(diffusers_ddpm, noises)


def trajectory(scheduler, x, set_kw, learned=None, device=None, **step_kw):
    scheduler.set_timesteps(**set_kw, device=device)
    xs, x0s = [], []
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, t.cpu(), learned), t, x, **step_kw)
        x = out.prev_sample
        xs.append(x)
        x0s.append(out.pred_original_sample)
    return xs, x0s


def float64(scheduler):
    """diffusers' scheduler with its schedule tensors in float64 (the same values): its step's scalars are
    then float64 too, and its float64 run is exact up to float64 rounding (with float32 tensors, each
    scalar carries a few float32 roundings of its own)."""
    scheduler.alphas_cumprod, scheduler.one = scheduler.alphas_cumprod.double(), scheduler.one.double()
    return scheduler


def runs(config, set_kw, device="cpu", backend="cpu", x=None, seed=0):
    """(ours fp32, diffusers fp32, diffusers float64) trajectories from the same start and noise: diffusers
    and ours each draw from a generator seeded alike (so ours must draw exactly what diffusers draws);
    the float64 run (``float64``) is fed the fp32 run's draws."""
    learned = config.get("variance_type") if config.get("variance_type", "").startswith("learned") else None
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) if x is None else x
    with diffusers_noise() as drawn:
        want = trajectory(DDPMScheduler(**config), x, set_kw, learned, generator=torch.Generator().manual_seed(1))
    with diffusers_noise(drawn):
        exact = trajectory(float64(DDPMScheduler(**config)), x.double(), set_kw, learned)
    fast = FastDDPMScheduler(**config)
    fast.backend = backend
    gen = torch.Generator(device).manual_seed(1)
    got = trajectory(fast, x.to(device), set_kw, learned, device=device, generator=gen)
    return got, want, exact


def check(got, want, exact):
    check_trajectory(got[0], want[0], exact[0], "prev_sample")
    check_trajectory(got[1], want[1], exact[1], "x0")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers(name):
    """Every variance type, prediction type, spacing, beta schedule, clipping, zero terminal SNR, custom
    timesteps: fp32 steps against diffusers' fp32 and float64 runs (check_trajectory)."""
    check(*runs(*VARIANTS[name]))


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_a_real_pipeline_gives_diffusers_images(variance_type):
    """DDPMPipeline with a small random UNet (6 output channels for the learned variance): the drop-in gives
    diffusers' images for the same generator (its initial noise and every step's draw)."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=6 if variance_type == "learned_range" else 3,
                       layers_per_block=1, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=6, output_type="np")
    want = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)
    got = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["default", "learned_range-v-zero-snr"])
def test_trajectory_on_every_backend(device, backend, name):
    require_backend(backend, device)
    config, set_kw = VARIANTS[name]
    if device == "cpu":
        check(*runs(config, set_kw, device, backend))
    else:  # a CUDA generator draws other numbers than a CPU one: compare with diffusers on CUDA
        learned = config.get("variance_type") if "learned" in name else None
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
        want = trajectory(DDPMScheduler(**config), x, set_kw, learned, device=device,
                          generator=torch.Generator(device).manual_seed(1))
        fast = FastDDPMScheduler(**config)
        fast.backend = backend
        got = trajectory(fast, x, set_kw, learned, device=device, generator=torch.Generator(device).manual_seed(1))
        assert_close(got[0][-1], want[0][-1], atol=1e-4, rtol=1e-4, what=f"{device} {backend}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dynamic_thresholding(backend):
    require_backend(backend)
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample")
    x = 2 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for extra, n in ((dict(), 8), (dict(variance_type="learned_range"), 8),
                     (dict(prediction_type="epsilon", timestep_spacing="trailing"), 61)):  # 61: ends at t = -1
        check(*runs({**config, **extra}, dict(num_inference_steps=n), backend=backend, x=x))


def test_before_set_timesteps_steps_go_to_t_minus_1():
    """diffusers' DDPM steps without set_timesteps: t -> t - 1 (the full chain); the drop-in too
    (check_trajectory: at t = 999 x0 = (x - sigma*e)/0.006 makes fp32's own error ~1e-4)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))

    def chain(s, x, **kw):
        xs = []
        for t in (999, 998, 997, 1, 0):
            x = s.step(model(x, t), t, x, **kw).prev_sample
            xs.append(x)
        return xs

    with diffusers_noise() as drawn:
        want = chain(DDPMScheduler(variance_type="fixed_large"), x, generator=torch.Generator().manual_seed(2))
    with diffusers_noise(drawn):
        exact = chain(float64(DDPMScheduler(variance_type="fixed_large")), x.double())
    got = chain(FastDDPMScheduler(variance_type="fixed_large"), x, generator=torch.Generator().manual_seed(2))
    check_trajectory(got, want, exact, "prev_sample")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accuracy_rule(backend, dtype):
    """Error vs diffusers in fp32 at most 2x that of diffusers run in the same dtype (the same noise: the
    Philox stream of each step, which ours draws in the kernel from seeds)."""
    require_backend(backend)
    config = dict(variance_type="learned_range", clip_sample=False)
    seeds = sample_seeds(5, 2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    stream = [randn(seeds, 4 * 256, step=k).reshape(2, 4, 16, 16) for k in range(10)]
    with diffusers_noise(stream):
        want, _ = trajectory(DDPMScheduler(**config), x, dict(num_inference_steps=10), "learned_range")
    with diffusers_noise(stream):
        naive, _ = trajectory(DDPMScheduler(**config), x.to(dtype), dict(num_inference_steps=10), "learned_range")
    fast = FastDDPMScheduler(**config)
    fast.backend = backend
    got, _ = trajectory(fast, x.to(dtype), dict(num_inference_steps=10), "learned_range", seeds=seeds)
    assert got[-1].dtype == dtype
    assert_accuracy_rule(got[-1], naive[-1], want[-1], what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_and_strided_inputs(backend):
    require_backend(backend)
    x = torch.randn(3, 5, 19, 17, generator=torch.Generator().manual_seed(2)).transpose(2, 3)
    assert not x.is_contiguous()
    for config in (dict(), dict(variance_type="learned_range")):
        got, want, exact = runs(config, dict(num_inference_steps=6), backend=backend, x=x)
        assert_close(got[0][-1], want[0][-1], atol=1e-5, rtol=1e-5, what=f"{backend} odd shape {config}")


def test_float64_and_autograd_like_diffusers():
    """float64 inputs run in float64 (the same generator draws as diffusers'); gradients through both
    outputs equal diffusers', learned variance included."""
    config = dict(variance_type="learned_range", prediction_type="v_prediction", clip_sample=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want, _ = trajectory(DDPMScheduler(**config), x, dict(num_inference_steps=5), "learned_range",
                         generator=torch.Generator().manual_seed(3))
    got, _ = trajectory(FastDDPMScheduler(**config), x, dict(num_inference_steps=5), "learned_range",
                        generator=torch.Generator().manual_seed(3))
    assert got[-1].dtype == torch.float64
    assert_close(got[-1], want[-1], atol=1e-6, rtol=1e-6, what="float64")  # diffusers' scalars are float32
    grads = []
    for s in (DDPMScheduler(**config), FastDDPMScheduler(**config)):
        s.set_timesteps(10)
        xs, out = x.float().clone().requires_grad_(), model(x.float(), 500, "learned_range").requires_grad_()
        step = s.step(out, 500, xs, generator=torch.Generator().manual_seed(4))
        ((step.prev_sample**2).sum() + step.pred_original_sample.sum()).backward()
        grads.append((xs.grad, out.grad))
    assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5, what="d/d sample")
    assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5, what="d/d model_output (variance channels too)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeds_and_begin_index(backend):
    """With seeds the noise of step k is the Philox stream of step k: equal to diffusers fed that noise, the
    same for a sample whatever batch it is in; set_begin_index(k) starts the counter at k."""
    require_backend(backend)
    config = dict(variance_type="learned_range")
    seeds = sample_seeds(11, 3)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    stream = [randn(seeds, 3 * 64, step=k).reshape(3, 3, 8, 8) for k in range(10)]
    with diffusers_noise(stream):
        want, _ = trajectory(DDPMScheduler(**config), x, dict(num_inference_steps=10), "learned_range")
    fast = FastDDPMScheduler(**config)
    fast.backend = backend
    got, _ = trajectory(fast, x, dict(num_inference_steps=10), "learned_range", seeds=seeds)
    assert_close(got[-1], want[-1], atol=2e-5, rtol=2e-5, what=f"{backend} seeds")
    alone, _ = trajectory(fast, x[1:2], dict(num_inference_steps=10), "learned_range", seeds=seeds[1:2])
    assert torch.equal(alone[-1][0], got[-1][1])
    fast.set_timesteps(10)
    fast.set_begin_index(4)
    t = fast.timesteps[4]
    got = fast.step(model(x, t, "learned_range"), t, x, seeds=seeds).prev_sample
    ref = DDPMScheduler(**config)
    ref.set_timesteps(10)
    with diffusers_noise([stream[4]]):
        want = ref.step(model(x, t, "learned_range"), t, x).prev_sample
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="begin_index noise counter")


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("config", [dict(), dict(variance_type="learned_range"),
                                    dict(thresholding=True, prediction_type="sample")], ids=["clip", "learned", "thr"])
def test_fused_guidance_equals_guidance_done_outside(device, backend, config):
    """guidance_scale=g with model_output = [uncond; cond] (2B rows; with learned variances both halves
    of the channels) equals diffusers given uncond + g*(cond - uncond), the same generator."""
    require_backend(backend, device)
    learned = config.get("variance_type")
    ref, fast = DDPMScheduler(**config), FastDDPMScheduler(**config)
    fast.backend = backend
    ref.set_timesteps(10)
    fast.set_timesteps(10, device=device)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    u, c = model(x, 900, learned), model(-0.5 * x, 900, learned)
    for t in (900, 0):
        want = ref.step(u + 7.5 * (c - u), t, x, generator=torch.Generator().manual_seed(t))
        got = fast.step(torch.cat([u, c]).to(device), t, x.to(device), guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(t) if device == "cpu" else None)
        if device == "cpu" or t == 0:
            assert_close(got.prev_sample, want.prev_sample, **GUIDED, what=f"guided prev t={t}")
        assert_close(got.pred_original_sample, want.pred_original_sample, **GUIDED, what="guided x0")
    with pytest.raises(ValueError, match=r"model_output: with guidance_scale it holds \[uncond; cond\]"):
        fast.step(torch.cat([u, c])[:3].to(device), 900, x.to(device), guidance_scale=2.0)


def test_torch_compile_fullgraph_on_the_first_call_after_set_timesteps():
    """The step traces whole (a CPU timestep is then not read: rows on the device, the run's timestep at the
    step index decides the draw); equal to the eager step with the same seeds."""
    for config in (dict(), dict(variance_type="learned_range")):
        fast = FastDDPMScheduler(**config)
        fast.set_timesteps(10)
        step = torch.compile(fast.step, fullgraph=True, backend="aot_eager")
        x = torch.randn(2, 3, 4, 4)
        t = fast.timesteps[0]
        out = model(x, t, config.get("variance_type"))
        got = step(out, t, x, return_dict=False, seeds=3)
        eager = FastDDPMScheduler(**config)
        eager.set_timesteps(10)
        assert_close(got[0], eager.step(out, t, x, seeds=3).prev_sample, atol=1e-6, rtol=1e-6, what="compiled")
        torch._dynamo.reset()


def test_matches_the_paper_shaped_reference():
    """The plans against ``fastdiff.reference.ddpm`` (Ho et al. eq. 6-7, Nichol & Dhariwal eq. 15) in float64
    with the same noise, every variance type."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    seeds = sample_seeds(2, 2)
    for vt in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
        learned = vt if vt.startswith("learned") else None
        fast = FastDDPMScheduler(variance_type=vt, clip_sample=False)
        got, _ = trajectory(fast, x, dict(num_inference_steps=8), learned, seeds=seeds)
        ts = fast.timesteps.tolist()
        abar = fast.alphas_cumprod.double()
        want = paper.sample_ddpm(lambda x, t, learned=learned: model(x, t, learned), x, abar, ts, variance_type=vt,
                                 noise_sampler=lambda i: randn(seeds, 192, step=i, dtype=torch.float64).view(x.shape))
        assert_close(got[-1], want, atol=1e-6, rtol=1e-6, what=f"reference {vt}")


def test_posterior_on_the_gaussian_oracle():
    """The defining property (Ho et al. 2020, eq. 6-7). Deterministic part: with the exact model of a
    Gaussian dataset, x_prev - std*z is the posterior mean mu~(x_t, E[x0|x_t]) computed in float64 from
    the oracle. Statistical part: given the true x0, x_prev ~ q(x_prev | x0) = N(sqrt(abar_prev) x0,
    1 - abar_prev) for fixed_small: the standardized residual of 8192 elements has mean within 5/sqrt(n)
    of 0 and variance within 5*sqrt(2/n) of 1."""
    data = GaussianMixture([1.0], 0.3 * torch.ones(1, 2, 16, 16), 0.5)
    fast = FastDDPMScheduler(clip_sample=False)
    fast.set_timesteps(20)
    seeds = sample_seeds(8, 16)
    abar = fast.alphas_cumprod.double()
    t, prev = 500, 450
    a_t, s_t = abar[t].sqrt(), (1 - abar[t]).sqrt()
    x0 = data.sample(16, torch.Generator().manual_seed(0))
    x_t = a_t * x0 + s_t * torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast.set_begin_index(fast.timesteps.tolist().index(t))
    eps = data.eps(x_t, a_t, s_t).float()
    got = fast.step(eps, t, x_t.float(), seeds=seeds).prev_sample.double()
    mean, var, _ = paper.posterior(x_t, data.x0(x_t, a_t, s_t), abar[t], abar[prev])
    z = randn(seeds, 512, step=fast.step_index - 1, dtype=torch.float64).reshape(x0.shape)
    assert_close(got - var.sqrt() * z, mean, atol=2e-5, rtol=2e-5, what="posterior mean")
    fast = FastDDPMScheduler(prediction_type="sample", clip_sample=False)
    fast.set_timesteps(20)
    fast.set_begin_index(fast.timesteps.tolist().index(t))
    got = fast.step(x0.float(), t, x_t.float(), seeds=seeds).prev_sample.double()
    r = ((got - abar[prev].sqrt() * x0) / (1 - abar[prev]).sqrt()).flatten()
    n = r.numel()
    assert abs(r.mean().item()) < 5 / n**0.5 and abs(r.var().item() - 1) < 5 * (2 / n) ** 0.5, (r.mean(), r.var())


def test_same_constructor_attributes_and_config_round_trips(tmp_path):
    ours, theirs = inspect.signature(FastDDPMScheduler.__init__), inspect.signature(DDPMScheduler.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    step_params = list(inspect.signature(DDPMScheduler.step).parameters)
    assert list(inspect.signature(FastDDPMScheduler.step).parameters)[: len(step_params)] == step_params
    for config in (dict(), dict(beta_schedule="sigmoid"), dict(beta_schedule="laplace", rescale_betas_zero_snr=True),
                   dict(trained_betas=[0.01 * (i + 1) / 10 for i in range(10)], num_train_timesteps=10)):
        ref, fast = DDPMScheduler(**config), FastDDPMScheduler(**config)
        public = [{k for k in vars(s) if not k.startswith("_")} for s in (ref, fast)]
        assert public[1] == public[0] and fast.backend is None  # backend: a property of the drop-ins
        for name in ("betas", "alphas", "alphas_cumprod", "one", "timesteps"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (config, name)
        assert fast.init_noise_sigma == ref.init_noise_sigma and len(fast) == len(ref)
        assert fast.variance_type == ref.variance_type and fast.custom_timesteps == ref.custom_timesteps
        for kw in (dict(num_inference_steps=7), dict(timesteps=[9, 5, 2])):
            ref.set_timesteps(**kw)
            fast.set_timesteps(**kw)
            assert torch.equal(fast.timesteps, ref.timesteps) and fast.custom_timesteps == ref.custom_timesteps
            assert fast.num_inference_steps == ref.num_inference_steps
            assert int(fast.previous_timestep(fast.timesteps[1])) == int(ref.previous_timestep(ref.timesteps[1]))
    fast = FastDDPMScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).config)
    assert fast.config.beta_schedule == "scaled_linear" and fast.config.variance_type == "fixed_small"
    fast.save_pretrained(tmp_path)
    assert DDPMScheduler.from_pretrained(tmp_path).config.steps_offset == 1
    assert FastDDPMScheduler.from_config(DDPMScheduler(variance_type="learned").config).variance_type == "learned"


def test_forward_process_matches_diffusers():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    ts = torch.tensor([0, 10, 500, 999])
    ref, fast = DDPMScheduler(beta_schedule="sigmoid"), FastDDPMScheduler(beta_schedule="sigmoid")
    assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6, what="add_noise")
    assert_close(fast.get_velocity(x0, noise, ts), ref.get_velocity(x0, noise, ts), atol=1e-6, rtol=1e-6,
                 what="get_velocity")


def test_assigned_attributes_are_honoured():
    """alphas_cumprod assigned (or changed in place) after a step is used by the next one, as in diffusers;
    assigning another variance_type is refused (diffusers' step would mix the assigned and the configured
    one)."""
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref, fast = DDPMScheduler(), FastDDPMScheduler()
    outs = []
    for s in (ref, fast):
        s.set_timesteps(10)
        s.step(model(x, 900), 900, x, generator=torch.Generator().manual_seed(0))
        s.alphas_cumprod = s.alphas_cumprod * 0.9
        s.alphas_cumprod[700] = 0.5
        outs.append(s.step(model(x, 800), 800, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5, what="assigned alphas_cumprod")
    fast.variance_type = "fixed_small"
    with pytest.raises(ValueError, match="variance_type: cannot assign 'fixed_large'"):
        fast.variance_type = "fixed_large"


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="variance_type: 'fixed_large_log' is not supported"):
        FastDDPMScheduler(variance_type="fixed_large_log")
    with pytest.raises(ValueError, match="variance_type: expected one of"):
        FastDDPMScheduler(variance_type="learned_log")
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        FastDDPMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="beta_schedule"):
        FastDDPMScheduler(beta_schedule="cubic")
    fast = FastDDPMScheduler()
    x = torch.randn(1, 3, 4, 4)
    fast.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep: 850 is not one of this run's timesteps"):
        fast.step(x, 850, x)
    with pytest.raises(ValueError, match=r"timestep: expected a value in \[-1, 1000\), got 1000"):
        fast.step(x, 1000, x)
    with pytest.raises(TypeError, match="timestep: expected an int or an integer tensor"):
        fast.step(x, 900.0, x)
    with pytest.raises(ValueError, match="e\\[0\\] must have shape"):
        fast.step(torch.randn(1, 6, 4, 4), 900, x)
    with pytest.raises(ValueError, match="descending"):
        fast.set_timesteps(timesteps=[500, 700])
    with pytest.raises(ValueError, match="Can only pass one of"):
        fast.set_timesteps(10, timesteps=[700, 500])
    with pytest.raises(ValueError, match="num_inference_steps"):
        fast.set_timesteps(1001)
    learned = FastDDPMScheduler(variance_type="learned_range")
    learned.set_timesteps(10)
    with pytest.raises(ValueError, match=r"model_output: variance_type 'learned_range' expects 2\*3 channels"):
        learned.step(x, 900, x)


def test_learned_variance_rows_are_the_noise_scale():
    """The kernel's noise scale for learned_range is exp(0.5*(f log beta + (1-f) log beta~)), f = (v+1)/2,
    per element: with the model's v = -1 (beta~) and v = 1 (beta) it equals fixed_small's and
    fixed_large's, on a host and on a per-sample (tensor) timestep."""
    x = torch.randn(2, 3, 4, 4)
    e = model(x, 600)
    outs = {}
    for vt, v in (("learned_range", -1.0), ("fixed_small", None), ("learned_range", 1.0), ("fixed_large", None)):
        s = FastDDPMScheduler(variance_type=vt)
        s.set_timesteps(10)
        out = e if v is None else torch.cat([e, torch.full_like(e, v)], 1)
        outs[(vt, v)] = [s.step(out, ts, x, seeds=[1, 2]).prev_sample for ts in (600, torch.tensor([600, 600]))]
    for (a, b) in ((("learned_range", -1.0), ("fixed_small", None)), (("learned_range", 1.0), ("fixed_large", None))):
        for got, want in zip(outs[a], outs[b]):
            assert_close(got, want, atol=1e-6, rtol=1e-6, what=f"{a} vs {b}")
    assert np.isfinite(outs[("learned_range", 1.0)][1].numpy()).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_learned_variance_out_of_domain_is_nan_like_diffusers(backend):
    """variance_type="learned" scales the noise by sqrt(v): a negative (or NaN) v is NaN in diffusers, and must
    be NaN here too - elementwise, the same elements - not a noiseless step (the kernels clip the gathered
    variance at 0 for DDIM-GMM, which would hide it). Elsewhere the step equals diffusers'."""
    require_backend(backend, "cpu")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    e = model(x, 600)
    v = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)) * 0.01
    v[0, 0, 0, 0] = float("nan")
    ref, fast = DDPMScheduler(variance_type="learned"), FastDDPMScheduler(variance_type="learned")
    fast.backend = backend
    for s in (ref, fast):
        s.set_timesteps(10)
    want = ref.step(torch.cat([e, v], 1), 600, x, generator=torch.Generator().manual_seed(1)).prev_sample
    got = fast.step(torch.cat([e, v], 1), 600, x, generator=torch.Generator().manual_seed(1)).prev_sample
    bad = torch.isnan(want)
    assert bad.sum() == (v < 0).sum() + 1 and torch.equal(torch.isnan(got), bad)
    assert_close(got[~bad], want[~bad], atol=1e-6, rtol=1e-5, what="learned variance, v >= 0")
