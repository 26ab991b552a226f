"""DDMScheduler (decoupled diffusion) against independent oracles: the paper-shaped reference
(``fastdiff.reference.ddm``, the authors' sampler written out) over whole runs with the same noise (fp32 and
float64, every CPU backend, generator noise and per-sample seeds, EDM preconditioning, the second-order
sampler); closed forms (the eta family at eta = 1, the forward marginal kept by one step from a point mass or
a Gaussian data distribution with the exact heads, statistics with stated tolerances); the forward process
and the loss in closed form; bad inputs."""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend

from fastdiff import philox
from fastdiff.integrations.diffusers.ddm import DDMScheduler
from fastdiff.reference import ddm as paper
from fastdiff.samplers.ddm import ddm_grid
from fastdiff.training import ddm as training

SHAPE = (2, 3, 6, 6)


def model(x, t):
    """A smooth stand-in for a network with two heads (C, eps); t read as the float32 of ``timesteps``."""
    t = float(np.float32(t))
    return -0.8 * torch.tanh(x * (1.0 + t)), 0.9 * torch.sin(x + t) + 0.1


def point_mass_heads(x, t, x0):
    """The exact heads of the data distribution delta(x0): C = -x0, eps = (x - (1 - t)*x0)/sqrt(t)."""
    t = float(t)
    return -x0.expand_as(x).to(x.dtype), (x - (1 - t) * x0) / t**0.5


def run(s, x, heads, **step_kw):
    """A whole run of the scheduler: (final sample, [x0 of each call])."""
    x0s = []
    for t in s.timesteps:
        out = s.step(heads(x, t), t, x, **step_kw)
        x, _ = out.prev_sample, x0s.append(out.pred_original_sample)
    return x, x0s


def reference_run(x, steps, dtype, generator=None, noises=None, order=1, second=None, clip=1.0):
    draws = iter(noises) if noises is not None else None

    def noise_sampler(i):
        return next(draws).to(dtype) if draws is not None else torch.randn(x.shape, generator=generator, dtype=dtype)

    return paper.sample_ddm(model, x, steps, noise_sampler, clip=clip, order=order, second=second)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", ["stochastic", "heun"])
def test_run_equals_reference(backend, dtype, sampler):
    require_backend(backend)
    n = 5
    s = DDMScheduler(sampler=sampler)
    s.backend = backend
    s.set_timesteps(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype) * 1.5
    got, _ = run(s, x, model, generator=torch.Generator().manual_seed(2))
    t, second = ddm_grid(n, sampler=sampler)
    want = reference_run(x, t[:-1] - t[1:], dtype, torch.Generator().manual_seed(2), order=2 if sampler == "heun"
                         else 1, second=second)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close(got, want, atol=tol, rtol=tol, what=f"{sampler} run, {backend}, {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeds_equal_reference_with_philox_noise(backend):
    require_backend(backend)
    n, seeds = 4, philox.sample_seeds(11, SHAPE[0])
    s = DDMScheduler(clip_sample=False)
    s.backend = backend
    s.set_timesteps(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    got, _ = run(s, x, model, seeds=seeds)
    t, _ = ddm_grid(n)
    numel = math.prod(SHAPE[1:])
    noises = [philox.randn(seeds, numel, step=i).reshape(SHAPE) for i in range(len(t) - 1)]
    want = reference_run(x, t[:-1] - t[1:], torch.float32, noises=noises, clip=None)
    assert_close(got, want, atol=3e-5, rtol=3e-5, what=f"seeds, {backend}")
    # per-sample independence: sample 1 alone, with its own seed, takes the same path
    s.set_timesteps(n)
    alone, _ = run(s, x[1:], model, seeds=seeds[1:])
    assert_close(alone, got[1:], atol=1e-6, rtol=1e-6, what="sample 1 alone")


def test_eta_one_is_the_stochastic_step_on_consistent_heads():
    """Where x = (1 - t)*x0_hat + sqrt(t)*eps, the eta family at eta = 1 is the code's step (same noise)."""
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.rand(SHAPE, generator=g) * 1.6 - 0.8, torch.randn(SHAPE, generator=g)
    stochastic, family = DDMScheduler(sampler="stochastic"), DDMScheduler(sampler="eta")
    for s in (stochastic, family):
        s.set_timesteps(6)
    for t in stochastic.timesteps[:-1]:
        x = (1 - float(t)) * x0 + float(t) ** 0.5 * eps
        C, e = -x0, eps
        a = stochastic.step((C, e), t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        b = family.step((C, e), t, x, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
        assert_close(b, a, atol=2e-6, rtol=2e-6, what=f"eta=1 vs stochastic at t={float(t):.3f}")


def _gaussian_heads(x, t, m, sd):
    """Exact heads of data N(m, sd^2) per element: E[x0|x_t] (float64), C = -E[x0|x_t], eps = E[eps|x_t]."""
    a, v = 1 - t, (1 - t) ** 2 * sd**2 + t
    x0 = m + a * sd**2 / v * (x - a * m)
    return -x0, (x - a * x0) / t**0.5


@pytest.mark.parametrize("sampler, eta", [("stochastic", 0.0), ("eta", 0.0), ("eta", 0.5)])
@pytest.mark.parametrize("data", ["point", "gaussian"])
def test_one_step_keeps_the_forward_marginal(sampler, eta, data):
    """From x_t ~ the forward marginal at t = 0.6, one step with the exact heads lands at t' = 0.4 on mean
    (1 - t')m and variance (1 - t')^2 sd^2 + t' - b^2 Var(x0 | x_t). For a point mass (sd = 0) that is the
    forward marginal exactly. For N(m, sd^2) the plug-in of the posterior mean drops x0's posterior variance
    along its coefficient b in x' = a x + b x0_hat + sig z (**derived**: stochastic a = t'/t, b = s/t; eta
    a = sqrt(t' - sig^2)/sqrt(t), b = 1 - t' - a(1 - t)); here b^2 Var(x0|x_t) is 7-12% of the variance, so the
    test tells the two apart. Tolerance: 5 standard errors of the mean and variance of 400k draws."""
    n, m = 400_000, 0.5
    sd = 0.0 if data == "point" else 1.0
    s = DDMScheduler(sampler=sampler, denoise=False, clip_sample=False)
    s.set_timesteps(5)  # 1, .8, .6, .4, .2
    s.set_begin_index(2)
    t, t2 = 0.6, 0.4
    g = torch.Generator().manual_seed(6)
    x0 = m + sd * torch.randn(1, n, generator=g, dtype=torch.float64)
    x = (1 - t) * x0 + t**0.5 * torch.randn(1, n, generator=g, dtype=torch.float64)
    C, e = _gaussian_heads(x, t, m, sd)
    out = s.step((C.float(), e.float()), s.timesteps[2], x.float(), eta=eta,
                 generator=torch.Generator().manual_seed(7)).prev_sample.double()
    sig2 = (t - t2) * t2 / t * (1.0 if sampler == "stochastic" else eta**2)
    a = t2 / t if sampler == "stochastic" else (t2 - sig2) ** 0.5 / t**0.5
    b = (t - t2) / t if sampler == "stochastic" else 1 - t2 - a * (1 - t)
    post_var = sd**2 * t / ((1 - t) ** 2 * sd**2 + t)
    var = (1 - t2) ** 2 * sd**2 + t2 - b**2 * post_var
    assert abs(out.mean().item() - (1 - t2) * m) < 5 * (var / n) ** 0.5
    assert abs(out.var().item() - var) < 5 * var * (2 / n) ** 0.5, (out.var().item(), var)


@pytest.mark.parametrize("steps,denoise", [(4, True), (2, False)])
@pytest.mark.parametrize("sampler", ["stochastic", "eta", "heun"])
def test_edm_preconditioning_equals_the_formula_outside(sampler, steps, denoise):
    """preconditioning="edm" with the raw heads = no preconditioning with C, eps computed outside. (Two steps
    without the denoising step: every row of Heun's plans gives the eps head no weight; the step still takes
    the pair.)"""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(SHAPE, generator=g)
    fused = DDMScheduler(sampler=sampler, preconditioning="edm", denoise=denoise)
    outside = DDMScheduler(sampler=sampler, denoise=denoise)
    for s in (fused, outside):
        s.set_timesteps(steps)
    xa, xb = x, x
    for t in fused.timesteps:
        tf = float(t)
        assert_close(fused.scale_model_input(xa, t), xa / (1 + tf) ** 0.5, atol=1e-7, rtol=1e-6, what="input")
        f_x, f_y = model(fused.scale_model_input(xa, t), t)
        kw = dict(eta=0.3) if sampler == "eta" else {}
        xa = fused.step((f_x, f_y), t, xa, generator=torch.Generator().manual_seed(9), **kw).prev_sample
        f_x, f_y = model(xb / (1 + tf) ** 0.5, t)
        heads = paper.precondition(xb.double(), f_x.double(), f_y.double(), tf)
        xb = outside.step(tuple(h.float() for h in heads), t, xb, generator=torch.Generator().manual_seed(9),
                          **kw).prev_sample
        assert_close(xa, xb, atol=3e-5, rtol=3e-5, what=f"edm at t={tf:.4f}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sampler", ["stochastic", "eta", "heun"])
def test_point_mass_run_ends_on_the_point(backend, sampler):
    require_backend(backend)
    x0 = torch.rand(1, *SHAPE[1:], generator=torch.Generator().manual_seed(10)) * 1.8 - 0.9
    s = DDMScheduler(sampler=sampler)
    s.backend = backend
    s.set_timesteps(7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    kw = dict(eta=0.7) if sampler == "eta" else {}
    final, x0s = run(s, x, lambda x, t: point_mass_heads(x, t, x0), seeds=3, **kw)
    assert_close(final, x0.expand(SHAPE), atol=2e-5, rtol=0, what="end point")
    assert_close(x0s[0], x0.expand(SHAPE), atol=2e-5, rtol=0, what="first x0_hat")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage(dtype):
    """fp16/bf16 storage (fp32 arithmetic): a run's error against the float64 reference at most 2x that of
    the reference itself run in the storage dtype (same noise)."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(15))
    t, _ = ddm_grid(4)
    want = reference_run(x.double(), t[:-1] - t[1:], torch.float64, torch.Generator().manual_seed(16))
    own = reference_run(x.to(dtype), t[:-1] - t[1:], dtype, torch.Generator().manual_seed(16))
    s = DDMScheduler()
    s.set_timesteps(4)
    got, _ = run(s, x.to(dtype), model, generator=torch.Generator().manual_seed(16))
    assert got.dtype == dtype
    assert (got.double() - want).abs().max() <= 2 * (own.double() - want).abs().max()


def test_fused_guidance_equals_guidance_outside():
    """guidance_scale=g with each head holding [uncond; cond] = the step of uncond + g*(cond - uncond)."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(SHAPE, generator=g)
    heads = [torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=g) for _ in range(2)]
    fused, outside = DDMScheduler(sampler="heun"), DDMScheduler(sampler="heun")
    for s in (fused, outside):
        s.set_timesteps(4)
    xa = xb = x
    for t in fused.timesteps:
        xa = fused.step(tuple(heads), t, xa, guidance_scale=3.0, generator=torch.Generator().manual_seed(1)).prev_sample
        mixed = tuple(h[:SHAPE[0]] + 3.0 * (h[SHAPE[0]:] - h[:SHAPE[0]]) for h in heads)
        xb = outside.step(mixed, t, xb, generator=torch.Generator().manual_seed(1)).prev_sample
        assert_close(xa, xb, atol=3e-5, rtol=3e-5, what=f"guided at t={float(t):.4f}")


def test_clip_clamps_the_data_prediction():
    s = DDMScheduler(clip_sample_range=0.5)
    s.set_timesteps(3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(12)) * 3
    C, eps = model(x, 1.0)
    out = s.step((C, eps), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert_close(out.pred_original_sample, paper.pred_x0(x, C, eps, 1.0, clip=0.5), atol=1e-6, rtol=1e-6,
                 what="clamped x0")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_noise(backend):
    require_backend(backend)
    g = torch.Generator().manual_seed(13)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    s = DDMScheduler()
    s.backend = backend
    t = torch.tensor([0.25, 0.9])
    want = (1 - t.double()).view(-1, 1, 1, 1) * x0.double() + t.double().sqrt().view(-1, 1, 1, 1) * noise.double()
    assert_close(s.add_noise(x0, noise, t), want, atol=1e-6, rtol=1e-6, what="per-sample t")
    assert_close(s.add_noise(x0, noise, 0.5), 0.5 * x0.double() + 0.5**0.5 * noise.double(), atol=1e-6, rtol=1e-6,
                 what="one t")
    seeds = philox.sample_seeds(5, SHAPE[0])
    z = philox.randn(seeds, math.prod(SHAPE[1:]), domain=philox.DOMAIN_TRAIN).reshape(SHAPE).double()
    got = training.add_noise(x0, t, seeds=seeds, backend=backend)
    want = (1 - t.double()).view(-1, 1, 1, 1) * x0.double() + t.double().sqrt().view(-1, 1, 1, 1) * z
    assert_close(got, want, atol=2e-6, rtol=2e-6, what="in-kernel training noise")
    got, noise_out = training.add_noise(x0, t, seeds=seeds, backend=backend, return_noise=True)
    assert_close(got, want, atol=2e-6, rtol=2e-6, what="x_t beside its noise")
    assert_close(noise_out, z, atol=2e-6, rtol=2e-6, what="the noise written by the same pass")
    with pytest.raises(ValueError, match="return_noise: only with seeds"):
        training.add_noise(x0, t, noise, return_noise=True)


def test_loss_closed_form():
    """Heads off by constants a (C) and b (eps): simple = a^2/t + b^2/(1 - t + 1e-4), rec = (1 - t)^2 |t a +
    sqrt(t) b| (x_rec - x0 = -t a - sqrt(t) b), averaged over the batch."""
    g = torch.Generator().manual_seed(14)
    x0, noise = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g,
                                                                                  dtype=torch.float64)
    t, a, b = torch.tensor([0.2, 0.7], dtype=torch.float64), 0.3, -0.2
    assert training.ddm_loss(-x0, noise, x0, noise, t).item() == pytest.approx(0.0, abs=1e-12)
    got = training.ddm_loss(-x0 + a, noise + b, x0, noise, t)
    simple = a**2 / t + b**2 / (1 - t + 1e-4)
    rec = (1 - t) ** 2 * (t * a + t.sqrt() * b).abs()
    assert got.item() == pytest.approx((simple.mean() + rec.mean()).item(), rel=1e-10)
    plain = training.ddm_loss(-x0 + a, noise + b, x0, noise, t, weighting=False, reconstruction=False)
    assert plain.item() == pytest.approx(a**2 + b**2, rel=1e-10)
    ts = training.sample_t(1000, torch.Generator().manual_seed(0))
    assert float(ts.min()) >= 1e-4 and float(ts.max()) <= 1.0


def test_grid_and_config_round_trip(tmp_path):
    s = DDMScheduler(sampler="heun", denoise=True, preconditioning="edm")
    s.set_timesteps(5)
    # 5 calls: 2 steps of 2/5 with two calls each, then 1/5 split into 1/5 - 1e-4 and 1e-4 (one call each)
    want = [1.0, 0.6, 0.6, 0.2, 0.2, 1e-4]
    assert np.allclose(s.timesteps.numpy(), want[:4] + [0.2, 1e-4], atol=1e-7)
    assert len(s.timesteps) == len(want)
    s.save_pretrained(tmp_path)
    t = DDMScheduler.from_pretrained(tmp_path)
    public = [k for k in s.config if not k.startswith("_")]
    assert {k: t.config[k] for k in public} == {k: s.config[k] for k in public}
    x = torch.zeros(SHAPE)
    s.step((x, x), 0.6, x)  # a run started at t = 0.6 starts at the first call of the step from 0.6
    assert s.step_index == 3
    u = DDMScheduler.from_config(s.config)
    u.set_timesteps(5)
    assert torch.equal(u.timesteps, s.timesteps)


def test_bad_inputs():
    s = DDMScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step((x, x), 1.0, x)
    s.set_timesteps(4)
    with pytest.raises(TypeError, match="model_output: expected the pair"):
        s.step(x, 1.0, x)
    with pytest.raises(TypeError, match="model_output: expected the pair"):
        s.step((x, x, x), 1.0, x)
    with pytest.raises(ValueError, match="model_output\\[1\\]: expected shape"):
        s.step((x, x[:1]), 1.0, x)
    with pytest.raises(ValueError, match="timestep: 0.3 is not on this run's grid"):
        s.step((x, x), 0.3, x)
    with pytest.raises(TypeError, match="timestep: expected a float"):
        s.step((x, x), "1", x)
    with pytest.raises(ValueError, match="eta: only the 'eta' sampler"):
        s.step((x, x), 1.0, x, eta=0.5)
    s.step((x, x), 1.0, x, generator=torch.Generator())
    with pytest.raises(ValueError, match="model call 1 of the run is at 0.75"):
        s.step((x, x), 0.5, x)
    for t in s.timesteps[1:]:
        s.step((x, x), t, x, generator=torch.Generator())
    with pytest.raises(ValueError, match="all were taken"):
        s.step((x, x), 1e-4, x)
    with pytest.raises(ValueError, match="sampler: expected one of"):
        DDMScheduler(sampler="ddim")
    with pytest.raises(ValueError, match="preconditioning: expected one of"):
        DDMScheduler(preconditioning="karras")
    with pytest.raises(ValueError, match="denoise_step"):
        DDMScheduler(denoise_step=0.5).set_timesteps(4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDMScheduler(sampler="heun").set_timesteps(1)
    with pytest.raises(ValueError, match="t: expected one value or 2"):
        s.add_noise(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="t: expected values in"):
        s.add_noise(x, x, 1.5)

