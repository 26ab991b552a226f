"""FastDDIMScheduler against diffusers' DDIMScheduler (0.42) as the oracle: whole trajectories on every
backend, low precision under the accuracy rule, odd shapes, strides, per-sample timesteps, seeds,
thresholding, add_noise/get_velocity, config round trips and bad input; and what a demanding user tries
(tests/test_ddim_user.py)."""

import inspect

import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, DEVICES, assert_accuracy_rule, assert_close, require_backend
from diffusers import DDIMScheduler, PNDMScheduler

from fastdiff.integrations.diffusers import FastDDIMScheduler
from fastdiff.philox import randn, sample_seeds

VARIANTS = {
    "eta0-eps-leading-clip": dict(),
    "eta1-eps-trailing": dict(eta=1.0, timestep_spacing="trailing", clip_sample=False),
    "eta0-v-trailing-alpha0": dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                   set_alpha_to_one=False, clip_sample=False),
    "eta1-v-leading-clip-offset": dict(eta=1.0, prediction_type="v_prediction", steps_offset=1),
    "eta05-sample-linspace-clipped-output": dict(eta=0.5, prediction_type="sample", timestep_spacing="linspace",
                                                 use_clipped_model_output=True, clip_sample_range=0.8),
    "eta0-scaled-linear-zero-snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                        prediction_type="v_prediction", clip_sample=False),
}
STEP_KW = ("eta", "use_clipped_model_output")


def model(x, t):
    """A fixed smooth stand-in for a network: depends on the sample and the timestep."""
    return 0.9 * torch.tanh(x.float() * (1.0 + float(t) / 1000.0)).to(x.dtype) + 0.05


def trajectory(scheduler, x, steps, noises, step_kw, **extra):
    scheduler.set_timesteps(steps)
    xs, x0s = [], []
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(model(x, t), t, x, variance_noise=noises[i] if step_kw.get("eta") else None,
                             **step_kw, **extra)
        x = out.prev_sample
        xs.append(x)
        x0s.append(out.pred_original_sample)
    return xs, x0s


def split(variant):
    step_kw = {k: v for k, v in variant.items() if k in STEP_KW}
    return {k: v for k, v in variant.items() if k not in STEP_KW}, step_kw


def max_err(xs, refs):
    return max((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(xs, refs))


def check_trajectory(got, want, exact, what):
    """Steps within 1e-5 of diffusers' fp32 run - elementwise for samples, normwise for x0 (x0 = (x -
    sigma*e)/alpha is ill-conditioned at high noise) - unless the problem's own fp32 error is larger
    (then within 3x diffusers' distance from its float64 run); and never further from the float64 run
    than 2x diffusers' fp32 run is."""
    tol = max(1e-5, 3 * max_err(want, exact))
    for i, (a, b) in enumerate(zip(got, want)):
        if what == "x0":
            a, b = a.cpu(), b.cpu()
            rel = ((a - b).abs().max() / b.abs().max()).item()
            assert rel <= tol, f"{what} step {i}: normwise relative error {rel:.3g} > {tol:.3g}"
        else:
            assert_close(a, b, atol=tol, rtol=tol, what=f"{what} step {i}")
    err, err_diffusers = max_err(got, exact), max_err(want, exact)
    assert err <= 2 * err_diffusers + 1e-7, f"{what}: error vs float64 {err:.3g}, diffusers' {err_diffusers:.3g}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers(device, backend, name):
    """50 steps against diffusers in fp32 and in float64 (check_trajectory)."""
    require_backend(backend, device)
    config, step_kw = split(VARIANTS[name])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    noises = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(50)]
    want, want0 = trajectory(DDIMScheduler(**config), x, 50, noises, step_kw)
    exact, exact0 = trajectory(DDIMScheduler(**config), x.double(), 50, [n.double() for n in noises], step_kw)
    fast = FastDDIMScheduler(**config)
    fast.backend = backend
    got, got0 = trajectory(fast, x.to(device), 50, [n.to(device) for n in noises], step_kw)
    check_trajectory(got, want, exact, "prev_sample")
    check_trajectory(got0, want0, exact0, "x0")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trailing_spacing_that_ends_at_minus_one(backend):
    """For some step counts diffusers' trailing grid has N+1 timesteps, the last -1 (alphas_cumprod[-1])."""
    require_backend(backend)
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=g)
    noises = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(62)]
    want, _ = trajectory(ref, x, 61, noises, dict(eta=1.0))
    exact, _ = trajectory(DDIMScheduler(timestep_spacing="trailing"), x.double(), 61,
                          [n.double() for n in noises], dict(eta=1.0))
    fast = FastDDIMScheduler(timestep_spacing="trailing")
    fast.backend = backend
    got, _ = trajectory(fast, x, 61, noises, dict(eta=1.0))
    assert len(got) == 62
    check_trajectory(got, want, exact, "prev_sample")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_trajectory_accuracy_rule(backend, dtype):
    """Error vs diffusers in fp32 at most 2x that of diffusers itself run in the same dtype."""
    require_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    noises = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(20)]
    step_kw = dict(eta=1.0)
    want, _ = trajectory(DDIMScheduler(), x, 20, noises, step_kw)
    naive, _ = trajectory(DDIMScheduler(), x.to(dtype), 20, [n.to(dtype) for n in noises], step_kw)
    fast = FastDDIMScheduler()
    fast.backend = backend
    got, _ = trajectory(fast, x.to(dtype), 20, [n.to(dtype) for n in noises], step_kw)
    assert got[-1].dtype == dtype
    assert_accuracy_rule(got[-1], naive[-1], want[-1], what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_and_strided_inputs(backend):
    require_backend(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 17, 19, generator=g)
    noises = [torch.randn(3, 5, 17, 19, generator=g).transpose(2, 3).contiguous().transpose(2, 3)
              for _ in range(10)]
    assert not noises[0].is_contiguous()
    want, _ = trajectory(DDIMScheduler(), x, 10, noises, dict(eta=1.0))
    fast = FastDDIMScheduler()
    fast.backend = backend
    got, _ = trajectory(fast, x[:, :, :, :].transpose(1, 2).contiguous().transpose(1, 2), 10, noises, dict(eta=1.0))
    assert_close(got[-1], want[-1], atol=1e-5, rtol=1e-5, what=f"{backend} odd shape")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dynamic_thresholding(backend):
    require_backend(backend)
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                  prediction_type="sample")
    g = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(2, 3, 8, 8, generator=g)
    noises = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(10)]
    for step_kw in (dict(eta=1.0), dict(eta=0.0, use_clipped_model_output=True)):
        want, want0 = trajectory(DDIMScheduler(**config), x, 10, noises, step_kw)
        fast = FastDDIMScheduler(**config)
        fast.backend = backend
        got, got0 = trajectory(fast, x, 10, noises, step_kw)
        assert_close(got[-1], want[-1], atol=1e-5, rtol=1e-5, what=f"{backend} thresholding {step_kw}")
        assert_close(got0[3], want0[3], atol=1e-5, rtol=1e-5, what="thresholded x0")


@pytest.mark.parametrize("device,backend", DEVICES)
def test_per_sample_timesteps(device, backend):
    """A [B] timestep tensor steps each sample from its own timestep, as diffusers does one at a time (on
    the device: the rows are selected there, no sync)."""
    require_backend(backend, device)
    g = torch.Generator().manual_seed(4)
    x, e = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    ts = torch.tensor([999, 500, 20])
    ref = DDIMScheduler()
    ref.set_timesteps(50)
    fast = FastDDIMScheduler()
    fast.backend = backend
    fast.set_timesteps(50, device=device)
    out = fast.step(e.to(device), ts.to(device), x.to(device))
    for b in range(3):
        want = ref.step(e[b : b + 1], int(ts[b]), x[b : b + 1])
        assert_close(out.prev_sample[b : b + 1], want.prev_sample, atol=1e-5, rtol=1e-5, what=f"sample {b}")


@pytest.mark.parametrize("device,backend", DEVICES)
def test_no_host_sync_inside_a_step(device, backend):
    """A device timestep selects its row on the device: on CUDA a whole trajectory runs under
    set_sync_debug_mode("error") and equals diffusers'."""
    require_backend(backend, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    noises = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(10)]
    want, _ = trajectory(DDIMScheduler(), x, 10, noises, dict(eta=1.0))
    fast = FastDDIMScheduler()
    fast.backend = backend
    fast.set_timesteps(10, device=device)
    xf = x.to(device)
    for i, t in enumerate(fast.timesteps):
        e, n = model(xf, t.cpu()), noises[i].to(device)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            xf = fast.step(e, t, xf, eta=1.0, variance_noise=n).prev_sample
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert_close(xf, want[-1], atol=1e-5, rtol=1e-5, what=f"{device} {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeds_draw_the_fastdiff_stream(backend):
    """With seeds the noise is the Philox stream of step k: equal to diffusers given that noise, and the
    same for a sample whatever batch it is in."""
    require_backend(backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 8, 8, generator=g)
    seeds = sample_seeds(11, 4)
    stream = [randn(seeds, 3 * 64, step=k).reshape(4, 3, 8, 8) for k in range(10)]
    want, _ = trajectory(DDIMScheduler(), x, 10, stream, dict(eta=1.0))
    fast = FastDDIMScheduler()
    fast.backend = backend
    fast.set_seeds(seeds)
    fast.set_timesteps(10)
    xb = x
    for t in fast.timesteps:
        xb = fast.step(model(xb, t), t, xb, eta=1.0).prev_sample
    assert_close(xb, want[-1], atol=2e-5, rtol=2e-5, what=f"{backend} seeds")
    single = FastDDIMScheduler()
    single.backend = backend
    single.set_timesteps(10)
    x2 = x[2:3]
    for t in single.timesteps:
        x2 = single.step(model(x2, t), t, x2, eta=1.0, seeds=seeds[2:3]).prev_sample
    assert torch.equal(x2[0], xb[2])


def test_forward_process_matches_diffusers():
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    ts = torch.tensor([0, 10, 500, 999])
    for config in (dict(), dict(beta_schedule="squaredcos_cap_v2")):
        ref, fast = DDIMScheduler(**config), FastDDIMScheduler(**config)
        assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what="add_noise")
        assert_close(fast.get_velocity(x0, noise, ts), ref.get_velocity(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what="get_velocity")
        assert_close(fast.add_noise(x0, noise, torch.tensor(700)), ref.add_noise(x0, noise, torch.tensor(700)),
                     atol=1e-6, rtol=1e-6, what="add_noise, one timestep")


def test_same_constructor_and_attributes_as_diffusers():
    ours, theirs = inspect.signature(FastDDIMScheduler.__init__), inspect.signature(DDIMScheduler.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    step_params = list(inspect.signature(DDIMScheduler.step).parameters)
    assert list(inspect.signature(FastDDIMScheduler.step).parameters)[: len(step_params)] == step_params
    for config in (dict(), dict(beta_schedule="scaled_linear", set_alpha_to_one=False),
                   dict(trained_betas=[0.01 * (i + 1) / 10 for i in range(10)], num_train_timesteps=10)):
        ref, fast = DDIMScheduler(**config), FastDDIMScheduler(**config)
        for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod", "timesteps"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), name
        assert fast.init_noise_sigma == ref.init_noise_sigma and len(fast) == len(ref)
        ref.set_timesteps(7)
        fast.set_timesteps(7)
        assert torch.equal(fast.timesteps, ref.timesteps)


def test_config_round_trips(tmp_path):
    fast = FastDDIMScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).config)
    assert fast.config.beta_schedule == "scaled_linear" and fast.config.steps_offset == 1
    from_pndm = FastDDIMScheduler.from_config(PNDMScheduler(skip_prk_steps=True).config)
    assert from_pndm.config.num_train_timesteps == 1000
    fast.save_pretrained(tmp_path)
    loaded = FastDDIMScheduler.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(fast.config)
    assert DDIMScheduler.from_pretrained(tmp_path).config.beta_schedule == "scaled_linear"


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        FastDDIMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing: expected one of"):
        FastDDIMScheduler(timestep_spacing="quadratic")
    with pytest.raises(ValueError, match="beta_schedule"):
        FastDDIMScheduler(beta_schedule="cubic")
    fast = FastDDIMScheduler()
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        fast.step(x, 10, x)
    fast.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep: expected a value in \[-1, 1000\), got 1000"):
        fast.step(x, 1000, x)
    with pytest.raises(ValueError, match="generator or `variance_noise`|generator` or `variance_noise"):
        fast.step(x, 900, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="e\\[0\\] must have shape"):
        fast.step(torch.randn(1, 2, 4, 5), 900, x)
    with pytest.raises(TypeError, match="timestep: expected an int or an integer tensor, got float 500.7"):
        fast.step(x, 500.7, x)
    with pytest.raises(TypeError, match="timestep: expected an int or an integer tensor, got str '501'"):
        fast.step(x, "501", x)
    with pytest.raises(TypeError, match="timestep: expected an integer timestep .* got a torch.float32 tensor"):
        fast.step(x, torch.tensor(500.0), x)
    with pytest.raises(ValueError, match=r"timestep: expected values in \[-1, 1000\), got 5..1000"):
        fast.step(torch.randn(2, 2, 4, 4), torch.tensor([5, 1000]), torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="num_inference_steps"):
        fast.set_timesteps(1001)
    with pytest.raises(ValueError, match="trained_betas: expected num_train_timesteps=1000 values, got 10"):
        FastDDIMScheduler(trained_betas=[0.01] * 10)
    for bad in (1.5, [1, 2.5], "3"):
        with pytest.raises(TypeError, match="seeds: expected"):
            fast.set_seeds(bad)


def test_begin_index_sets_the_noise_counter():
    """set_begin_index (img2img) restarts the seeds' step counter there: step k draws Philox step k."""
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    seeds = sample_seeds(3, 2)
    ref = DDIMScheduler()
    ref.set_timesteps(10)
    fast = FastDDIMScheduler()
    fast.set_timesteps(10)
    fast.set_begin_index(5)
    assert fast.begin_index == 5
    t = fast.timesteps[5]
    got = fast.step(e, t, x, eta=1.0, seeds=seeds).prev_sample
    want = ref.step(e, t, x, eta=1.0, variance_noise=randn(seeds, 48, step=5).reshape(2, 3, 4, 4)).prev_sample
    assert_close(got, want, atol=1e-6, rtol=1e-6, what="begin_index noise")


def test_direction_weight_is_computed_where_diffusers_rounds_to_nan():
    """eta = 1 on the first step of squaredcos_cap_v2 with trailing spacing (abar_999 ~ 2e-9): the direction
    weight sqrt(1 - abar_prev - sigma^2) = (1 - abar_prev) sqrt(abar_t / (abar_prev (1 - abar_t))) ~ 1.5e-4,
    which diffusers' float32 arithmetic turns into the root of a negative number (NaN images). The drop-in
    gives the step with the true weight; z is diffusers' own draw."""
    cfg = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    ref, fast = DDIMScheduler(**cfg), FastDDIMScheduler(**cfg)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = torch.tanh(x)
    outs = []
    for s in (ref, fast):
        s.set_timesteps(5)
        outs.append(s.step(eps, s.timesteps[0], x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample)
    assert torch.isnan(outs[0]).all()
    t, prev = 999, 799
    a_t, a_p = ref.alphas_cumprod[t].double(), ref.alphas_cumprod[prev].double()
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    sigma = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction = (1 - a_p) * (a_t / (a_p * (1 - a_t))).sqrt()
    assert_close(outs[1], a_p.sqrt() * x0 + direction * eps + sigma * z, atol=1e-9, rtol=1e-9, what="exact step")
