"""FastDDIMScheduler tried as a demanding user would, each against diffusers' DDIMScheduler: a real
pipeline from a small config, zero terminal SNR, autograd, float64, torch.compile on the first call,
attributes changed after construction, inf inputs, empty batches, generator noise, seeds, begin_index,
mixed dtypes. Each of these once failed (or was silently wrong)."""

import numpy as np
import pytest
import torch
from conftest import DEVICES, assert_close, require_backend
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from fastdiff.integrations.diffusers import FastDDIMScheduler
from fastdiff.integrations.diffusers.base import MAX_PLANS, output
from fastdiff.philox import randn, sample_seeds

GUIDED = dict(atol=2e-5, rtol=2e-5, guided=True)  # conftest.assert_close: a fused-guidance step


def model(x, t):
    return 0.9 * torch.tanh(x * (1.0 + float(t) / 1000.0)) + 0.05


def run(scheduler, x, steps=10, **step_kw):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **step_kw).prev_sample
    return x


def pair(**config):
    return DDIMScheduler(**config), FastDDIMScheduler(**config)


def test_a_real_pipeline_from_a_small_config_gives_diffusers_images():
    """DDIMPipeline with a small random UNet: the drop-in gives diffusers' images with the same generator,
    at eta = 0 and eta = 1 (diffusers' own noise drawn the same way)."""
    from diffusers import DDIMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    for eta in (0.0, 1.0):
        want = pipe(batch_size=2, num_inference_steps=8, eta=eta, output_type="np",
                    generator=torch.Generator().manual_seed(1)).images
        reference = pipe.scheduler
        pipe.scheduler = FastDDIMScheduler.from_config(reference.config)
        got = pipe(batch_size=2, num_inference_steps=8, eta=eta, output_type="np",
                   generator=torch.Generator().manual_seed(1)).images
        pipe.scheduler = reference
        assert np.abs(got - want).max() < 1e-5, f"eta={eta}: {np.abs(got - want).max()}"


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_terminal_snr(spacing, prediction_type):
    """rescale_betas_zero_snr=True makes abar_999 = 0. diffusers runs every prediction type; with eps at
    t = 999 (trailing) x0 = (x - e)/0 is +-inf, clipped to +-1 as diffusers clips it."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                  timestep_spacing=spacing, prediction_type=prediction_type)
    ref, fast = pair(**config)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want, got = run(ref, x), run(fast, x)
    assert torch.isfinite(want).all()
    assert_close(got, want, atol=2e-5, rtol=2e-5, what=f"zero SNR {spacing} {prediction_type}")


def test_inf_in_the_sample_with_clip_sample_matches_diffusers():
    """x = inf: x0 = clamp(+-inf) = +-1 and eps-prediction's x_prev does not read x (weight 0): finite, as
    in diffusers, where 0*inf in a fused sum would have given NaN."""
    ref, fast = pair()
    for s in (ref, fast):
        s.set_timesteps(10)
    x = torch.tensor([[1.0, float("inf"), -float("inf"), 0.5]])
    e = torch.tensor([[0.1, 0.2, 0.3, float("inf")]])
    want, got = ref.step(e, 500, x), fast.step(e, 500, x)
    assert_close(got.prev_sample, want.prev_sample, atol=1e-6, rtol=1e-6, what="prev")
    assert_close(got.pred_original_sample, want.pred_original_sample, atol=1e-6, rtol=1e-6, what="x0")


def test_outputs_are_differentiable_like_diffusers():
    """DPS-style guidance differentiates through pred_original_sample: gradients equal diffusers', for
    step (both outputs), add_noise and get_velocity."""
    ref, fast = pair(prediction_type="v_prediction", clip_sample=True)
    for s in (ref, fast):
        s.set_timesteps(20)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ts = torch.tensor([700, 300])
    grads = []
    for s in (ref, fast):
        x, e = (noise.clone().requires_grad_(), x0.clone().requires_grad_())
        out = s.step(e, 500, x, eta=1.0, variance_noise=noise)
        loss = (out.prev_sample**2).sum() + out.pred_original_sample.sum()
        loss = loss + s.add_noise(x, e, ts).square().sum() + s.get_velocity(x, e, ts).sum()
        loss.backward()
        grads.append((x.grad, e.grad))
    assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5, what="d/d sample")
    assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5, what="d/d model_output")


def test_float64_like_diffusers():
    """float64 inputs are computed in float64 (diffusers does; its coefficients are float32 numbers)."""
    ref, fast = pair(prediction_type="sample", clip_sample=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want, got = run(ref, x, eta=0.5, variance_noise=noise), run(fast, x, eta=0.5, variance_noise=noise)
    assert got.dtype == torch.float64
    assert_close(got, want, atol=1e-6, rtol=1e-6, what="float64")


def test_mixed_dtypes_promote_like_diffusers():
    """An fp16 model output with an fp32 sample gives fp32, as in diffusers - computed in fp32 throughout,
    so at least as close to the float64 result as diffusers (whose eps*coefficient rounds to fp16)."""
    ref, fast = pair()
    for s in (ref, fast):
        s.set_timesteps(10)
    x, e = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4).half()
    want, got = ref.step(e, 300, x).prev_sample, fast.step(e, 300, x).prev_sample
    exact = ref.step(e.double(), 300, x.double()).prev_sample
    assert got.dtype == want.dtype == torch.float32
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max()


def test_torch_compile_fullgraph_on_the_first_call_after_set_timesteps():
    fast = FastDDIMScheduler()
    fast.set_timesteps(10)
    step = torch.compile(fast.step, fullgraph=True, backend="aot_eager")
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = fast.timesteps[2]
    got = step(e, t, x, return_dict=False)
    want = FastDDIMScheduler()
    want.set_timesteps(10)
    assert_close(got[0], want.step(e, t, x).prev_sample, atol=1e-6, rtol=1e-6, what="compiled step")


def test_assigned_attributes_are_honoured():
    """alphas_cumprod, final_alpha_cumprod and num_inference_steps assigned (or alphas_cumprod changed in
    place) after a step are used by the next one, as diffusers uses them."""
    ref, fast = pair()
    x, e = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    for s in (ref, fast):
        s.set_timesteps(10)
        s.step(e, 500, x)
        s.alphas_cumprod = s.alphas_cumprod * 0.9
    assert_close(fast.step(e, 500, x).prev_sample, ref.step(e, 500, x).prev_sample, atol=1e-6, rtol=1e-6,
                 what="alphas_cumprod assigned")
    for s in (ref, fast):
        s.alphas_cumprod[400] = 0.5
    assert_close(fast.step(e, 500, x).prev_sample, ref.step(e, 500, x).prev_sample, atol=1e-6, rtol=1e-6,
                 what="alphas_cumprod changed in place")
    for s in (ref, fast):
        s.final_alpha_cumprod = torch.tensor(0.9)
        s.num_inference_steps = 4
    for t in (500, 100):
        assert_close(fast.step(e, t, x).prev_sample, ref.step(e, t, x).prev_sample, atol=1e-6, rtol=1e-6,
                     what=f"final_alpha_cumprod, num_inference_steps assigned (t={t})")


def test_empty_batches():
    ref, fast = pair()
    for s in (ref, fast):
        s.set_timesteps(10)
    x = torch.randn(0, 3, 4, 4)
    ts = torch.zeros(0, dtype=torch.int64)
    for s in (ref, fast):
        assert s.add_noise(x, x, ts).shape == x.shape and s.get_velocity(x, x, ts).shape == x.shape
    assert fast.step(x, 500, x, eta=1.0).prev_sample.shape == x.shape


@pytest.mark.parametrize("device,backend", DEVICES)
def test_generator_noise_gives_diffusers_images(device, backend):
    """With a generator the drop-in draws diffusers' noise itself: the same images for the same seed."""
    require_backend(backend, device)
    ref, fast = pair()
    fast.backend = backend
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    want = run(ref, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    fast.set_timesteps(10, device=device)
    xf, gen = x.to(device), torch.Generator(device).manual_seed(5)
    for t in fast.timesteps:
        xf = fast.step(model(xf, t.cpu()), t, xf, eta=1.0, generator=gen).prev_sample
    if device == "cpu":
        assert_close(xf, want, atol=1e-5, rtol=1e-5, what="generator noise")
    else:  # a CUDA generator draws other numbers than a CPU one: diffusers on CUDA is the oracle there
        ref.set_timesteps(10, device=device)
        xr, gen = x.to(device), torch.Generator(device).manual_seed(5)
        for t in ref.timesteps:
            xr = ref.step(model(xr, t.cpu()), t, xr, eta=1.0, generator=gen).prev_sample
        assert_close(xf, xr, atol=1e-5, rtol=1e-5, what="generator noise (cuda)")


def test_int_seeds_give_each_sample_its_own_noise_whatever_the_batch():
    """set_seeds(int): sample b's noise depends on (seed, b) only: a batch of 4 repeats the batch of 1's
    first sample exactly, and step k draws Philox step k."""
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for batch in (4, 1):
        fast = FastDDIMScheduler()
        fast.set_seeds(7)
        outs.append(run(fast, x[:batch], eta=1.0))
    assert torch.equal(outs[0][:1], outs[1])
    seeds = sample_seeds(7, 4)
    noises = [randn(seeds, 32, step=k).reshape(4, 2, 4, 4) for k in range(10)]
    ref = DDIMScheduler()
    ref.set_timesteps(10)
    xr = x
    for k, t in enumerate(ref.timesteps):
        xr = ref.step(model(xr, t), t, xr, eta=1.0, variance_noise=noises[k]).prev_sample
    assert_close(outs[0], xr, atol=2e-5, rtol=2e-5, what="int seeds = Philox noise")


def test_set_timesteps_forgets_begin_index():
    """Seeded runs must not depend on the scheduler's history: set_timesteps resets begin_index (and the
    noise counter), as diffusers' schedulers do."""
    x = torch.randn(1, 2, 4, 4)
    fresh = FastDDIMScheduler()
    fresh.set_seeds(3)
    want = run(fresh, x, eta=1.0)
    used = FastDDIMScheduler()
    used.set_seeds(3)
    used.set_timesteps(10)
    used.set_begin_index(4)
    assert used.begin_index == 4
    got = run(used, x, eta=1.0)
    assert used.begin_index is None
    assert torch.equal(got, want)


def test_plans_kept_are_bounded():
    """eta changing every call builds a plan per eta; no more than MAX_PLANS are kept."""
    fast = FastDDIMScheduler()
    fast.set_timesteps(10)
    x = torch.randn(1, 2, 4, 4)
    for i in range(3 * MAX_PLANS):
        fast.step(x, 500, x, eta=0.01 * (i + 1), variance_noise=x)
    assert len(fast._plans) <= MAX_PLANS


def test_fast_output_objects_are_diffusers_objects():
    """``output`` builds what DDIMSchedulerOutput(...) builds: same type, items, attributes, tuple."""
    a, b = torch.zeros(1), torch.ones(1)
    for x0 in (b, None):
        want, got = DDIMSchedulerOutput(prev_sample=a, pred_original_sample=x0), output(DDIMSchedulerOutput, a, x0)
        assert type(got) is type(want) and list(got.items()) == list(want.items())
        assert vars(got) == vars(want) and got.to_tuple() == want.to_tuple() and got[0] is a
    assert vars(output(DDIMSchedulerOutput, a)) == vars(DDIMSchedulerOutput(a))


def test_step_index_rows_follow_diffusers_rules():
    """The shared base's rows by step index (what multistep drop-ins use): found from the first timestep
    as diffusers' index_for_timestep finds it (second of two equal ones, last when absent), from
    begin_index when set, 0 for a device timestep (no sync); then counted by the steps taken."""
    fast = FastDDIMScheduler(timestep_spacing="trailing")
    fast.set_timesteps(61)  # trailing yields 62 timesteps, the last -1
    grid = fast.timesteps.tolist()
    assert fast.step_index is None
    assert fast._step_row(torch.tensor(grid[5])) == 5
    x = torch.zeros(1, 4)
    fast.step(x, grid[5], x)
    assert fast.step_index == 6 and fast._step_row(grid[6]) == 6
    fast.set_timesteps(61)
    assert fast._step_row(12345) == len(grid) - 1
    fast.set_timesteps(10)
    fast.set_begin_index(3)
    assert fast.step_index == 3 and fast._step_row(0) == 3
    fast.set_timesteps(10)
    fast._host_timesteps = [900, 800, 800, 700]
    assert fast._step_row(800) == 2


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("config", [dict(), dict(thresholding=True, prediction_type="sample")], ids=["clip", "thr"])
def test_fused_guidance_equals_guidance_done_outside(device, backend, config):
    """guidance_scale=g with model_output = [uncond; cond] (2B rows) equals diffusers given the combined
    output uncond + g*(cond - uncond): the pair is mixed inside the step's one pass."""
    require_backend(backend, device)
    ref, fast = pair(**config)
    fast.backend = backend
    ref.set_timesteps(10)
    fast.set_timesteps(10, device=device)
    g = torch.Generator().manual_seed(9)
    x, u, c, n = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(4))
    for t in (900, 400):
        want = ref.step(u + 7.5 * (c - u), t, x, eta=0.5, variance_noise=n)
        got = fast.step(torch.cat([u, c]).to(device), t, x.to(device), eta=0.5, variance_noise=n.to(device),
                        guidance_scale=7.5)
        assert_close(got.prev_sample, want.prev_sample, **GUIDED, what=f"guided prev t={t}")
        assert_close(got.pred_original_sample, want.pred_original_sample, **GUIDED, what="guided x0")
    with pytest.raises(ValueError, match=r"model_output: with guidance_scale it holds \[uncond; cond\]"):
        fast.step(c, 400, x, guidance_scale=2.0)


def test_thresholding_at_timestep_minus_one():
    """Trailing spacing with 61 steps ends at timestep -1 (alphas_cumprod[-1]): dynamic thresholding's x0
    there too comes from abar[-1], as in diffusers (the x0 table's last row once took abar[0])."""
    config = dict(timestep_spacing="trailing", thresholding=True, dynamic_thresholding_ratio=0.9)
    ref, fast = pair(**config)
    for s in (ref, fast):
        s.set_timesteps(61)
    x, e = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)), torch.randn(2, 3, 4, 4)
    want, got = ref.step(e, -1, x), fast.step(e, -1, x)
    assert_close(got.pred_original_sample, want.pred_original_sample, atol=1e-6, rtol=1e-6, what="x0 at -1")
    assert_close(got.prev_sample, want.prev_sample, atol=1e-6, rtol=1e-6, what="prev at -1")
