"""FastDPMSolverMultistepScheduler against diffusers' DPMSolverMultistepScheduler (0.42) as the oracle: whole
trajectories for every config option (fp32 and a float64 run), the paper-shaped reference in float64, the
order of convergence on the Gaussian-mixture oracle, low precision, odd shapes and strides, autograd,
generator noise, seeds, begin_index, fused guidance, torch.compile, add_noise, config round trips and bad
input."""

import inspect
import math
import sys

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, DEVICES, assert_accuracy_rule, assert_close, require_backend
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fastdiff import oracle
from fastdiff.integrations.diffusers.dpmsolver import FastDPMSolverMultistepScheduler as Fast
from fastdiff.philox import randn, sample_seeds
from fastdiff.reference import dpmsolver as ref
from fastdiff.samplers.dpmsolver import dpmsolver_multistep
from fastdiff.stepper import Stepper

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates (sde-)dpmsolver
Diffusers = DPMSolverMultistepScheduler
F64 = torch.float64

ZERO_SNR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
# name -> (config, num_inference_steps, set_timesteps keywords)
VARIANTS = {
    "default": ({}, 8, {}),
    "order1": (dict(solver_order=1), 8, {}),
    "3M": (dict(solver_order=3), 8, {}),
    "2M-heun": (dict(solver_type="heun"), 8, {}),
    "3M-no-lower-order-final": (dict(solver_order=3, lower_order_final=False), 8, {}),
    "16-steps": ({}, 16, {}),
    "3M-16-steps-sigma-min": (dict(solver_order=3, final_sigmas_type="sigma_min"), 16, {}),
    "3M-euler-at-final-16": (dict(solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min"), 16, {}),
    "sde++": (dict(algorithm_type="sde-dpmsolver++"), 8, {}),
    "sde++-3M-heun": (dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), 8, {}),
    "dpmsolver": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 8, {}),
    "dpmsolver-3M-heun-v": (dict(algorithm_type="dpmsolver", solver_order=3, solver_type="heun",
                                 final_sigmas_type="sigma_min", prediction_type="v_prediction"), 8, {}),
    "sde-dpmsolver-heun-sample": (dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                                       final_sigmas_type="sigma_min", prediction_type="sample"), 8, {}),
    "sde-dpmsolver-order1": (dict(algorithm_type="sde-dpmsolver", solver_order=1, final_sigmas_type="sigma_min"),
                             8, {}),
    "karras": (dict(use_karras_sigmas=True), 8, {}),
    "karras-scaled-linear-3M": (dict(use_karras_sigmas=True, beta_schedule="scaled_linear", solver_order=3), 8, {}),
    "exponential-sigma-min": (dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), 8, {}),
    "beta-3M": (dict(use_beta_sigmas=True, solver_order=3), 8, {}),
    "lu": (dict(use_lu_lambdas=True, algorithm_type="sde-dpmsolver++"), 8, {}),
    "flow": (dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), 8, {}),
    "flow-v": (dict(use_flow_sigmas=True, prediction_type="v_prediction", solver_order=3), 8, {}),
    "flow-dynamic-shift": (dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True),
                           8, dict(mu=0.7)),
    "flow-prediction-vp-grid": (dict(prediction_type="flow_prediction"), 8, {}),
    "v": (dict(prediction_type="v_prediction"), 8, {}),
    "sample-thresholding": (dict(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9,
                                 sample_max_value=1.5), 8, {}),
    "dpmsolver-thresholding": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True,
                                    solver_order=3), 8, {}),
    "learned-range": (dict(variance_type="learned_range", solver_order=3), 8, {}),
    "leading-offset": (dict(timestep_spacing="leading", steps_offset=1), 8, {}),
    "trailing-zero-snr-v": (dict(timestep_spacing="trailing", prediction_type="v_prediction", **ZERO_SNR), 8, {}),
    "cosine-lambda-min-clipped": (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 8, {}),
    "trained-betas": (dict(trained_betas=np.linspace(2e-4, 0.03, 1000).tolist(), solver_order=3), 8, {}),
    "custom-timesteps": (dict(solver_order=3), None, dict(timesteps=[901, 700, 500, 320, 180, 90, 40, 10])),
}


def model(x, t, abar, prediction_type="epsilon", learned=False, shift=0.0):
    """A smooth stand-in for a network, shaped like a trained one: eps = sigma*x + alpha*g(x) keeps x0 =
    alpha*x - sigma*g(x) bounded at high noise; other prediction types get g itself. A learned-variance
    model returns 6 channels for 3."""
    t = int(t)
    y = x.double() if x.dtype == F64 else x.float()
    g = 0.5 * torch.tanh(y * (1.0 + t / 1000.0) + shift) + 0.05
    if prediction_type == "epsilon":
        ab = float(abar[min(t, len(abar) - 1)])
        g = math.sqrt(1 - ab) * y + math.sqrt(ab) * g
    g = g.to(x.dtype)
    return torch.cat([g, 0.3 * g], 1) if learned else g


def trajectory(s, x, steps, set_kw=None, noises=None, exact=False, **step_kw):
    """Every prev_sample of a run; ``exact``: diffusers in float64 throughout (its sigmas promoted, since it
    computes every coefficient from its float32 sigmas even for float64 samples)."""
    s.set_timesteps(steps, **(set_kw or {}))
    if exact:
        s.sigmas = s.sigmas.double()
    cfg, xs = s.config, []
    for i, t in enumerate(s.timesteps):
        e = model(x, t, s.alphas_cumprod, cfg.prediction_type, cfg.variance_type == "learned_range")
        x = s.step(e, t, x, variance_noise=None if noises is None else noises[i], **step_kw).prev_sample
        xs.append(x)
    return xs


def max_err(xs, refs):
    return max((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(xs, refs))


def check_trajectory(got, want, exact, what):
    """Every step within 1e-5 of diffusers' fp32 run (elementwise, absolute and relative) unless the problem's
    own fp32 error is larger (then within 3x diffusers' distance from the float64 run); and never further from
    the float64 run than 2x diffusers' fp32 run is (as tests/test_ddim.py)."""
    assert len(got) == len(want)
    tol = max(1e-5, 3 * max_err(want, exact))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=tol, rtol=tol, what=f"{what} step {i}")
    err, err_diffusers = max_err(got, exact), max_err(want, exact)
    assert err <= 2 * err_diffusers + 1e-7, f"{what}: error vs float64 {err:.3g}, diffusers' {err_diffusers:.3g}"


def inputs(shape=(2, 3, 8, 8), n=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def run_matrix(name, device, backend):
    config, steps, set_kw = VARIANTS[name]
    x, noises = inputs()
    want = trajectory(Diffusers(**config), x, steps, set_kw, noises)
    exact = trajectory(Diffusers(**config), x.double(), steps, set_kw, [n.double() for n in noises], exact=True)
    fast = Fast(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(device), steps, set_kw, [n.to(device) for n in noises])
    check_trajectory(got, want, exact, f"{name} {backend}")


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers(device, backend, name):
    require_backend(backend, device)
    run_matrix(name, device, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["3M", "sde++-3M-heun", "dpmsolver-thresholding"])
def test_trajectory_on_every_backend(device, backend, name):
    require_backend(backend, device)
    run_matrix(name, device, backend)


def test_a_step_of_length_zero_is_the_identity():
    """Karras sigmas end at sigma_min, and final_sigmas_type="sigma_min" appends sigma_min again: the last step
    has h = 0. diffusers' heun weight (e^-h - 1)/h is 0/0 there (NaN images); the step is the identity."""
    config = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="heun", lower_order_final=False)
    x, _ = inputs()
    want = trajectory(Diffusers(**config), x, 16)
    got = trajectory(Fast(**config), x, 16)
    assert torch.isnan(want[-1]).all() and torch.isfinite(got[-1]).all()
    for i in range(15):
        assert_close(got[i], want[i], atol=1e-5, rtol=1e-5, what=f"step {i}")
    assert torch.equal(got[-1], got[-2])


# ------------------------------------------------------------------------------------- the reference
ORDERS = {1: [1] * 9, 2: [1, 2, 2, 2, 2, 2, 2, 2, 1], 3: [1, 2, 3, 3, 3, 3, 3, 2, 1]}  # 9 steps, lower_order_final


def sde3_as_diffusers(x, m, lam, alpha, sigma, order, algorithm_type, solver_type, noise):
    """The reference step, with diffusers' D2 weight for sde-dpmsolver++ of order 3: the exponential
    integrator's (k-diffusion's phi_3) minus alpha_t."""
    x_t = ref.dpm_solver_step(x, m, lam, alpha, sigma, order, algorithm_type, solver_type, noise)
    if algorithm_type == "sde-dpmsolver++" and order == 3:
        x_t = x_t - alpha[0] * ref.divided_differences(m, lam, 3)[2]
    return x_t


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_float64_equals_the_paper_reference(algorithm_type, order, solver_type):
    """float64 inputs run in float64: the drop-in equals sample_dpm_solver (float64, the same model outputs
    and noise) to 1e-10, for every algorithm, order and solver type (flow coordinates for the "++" ones)."""
    if algorithm_type == "sde-dpmsolver" and order == 3:
        pytest.skip("diffusers has no third-order sde-dpmsolver (test_bad_input_raises_clearly)")
    data = algorithm_type.endswith("++")
    config = dict(algorithm_type=algorithm_type, solver_order=order, solver_type=solver_type,
                  prediction_type="sample" if data else "epsilon",  # the model gives the converted output itself
                  final_sigmas_type="zero" if data else "sigma_min", use_flow_sigmas=data and order == 2)
    x, noises = inputs(dtype=F64)
    fast = Fast(**config)
    got = trajectory(fast, x, 9, noises=noises)
    assert got[-1].dtype == F64
    ts = fast.timesteps

    def m(x, i):
        return model(x, ts[i], fast.alphas_cumprod, config["prediction_type"])

    want = ref.sample_dpm_solver(m, x, fast.sigmas.tolist(), ORDERS[order], algorithm_type, solver_type,
                                 flow=config["use_flow_sigmas"], noise_sampler=lambda i: noises[i],
                                 step=sde3_as_diffusers)
    assert_close(got[-1], want, atol=1e-10, rtol=1e-10, what="float64 vs reference")


def test_third_order_weight_of_diffusers_is_half_the_taylor_one():
    """One 3M step with exact history on the linear problem dx/dlambda of DPM-Solver++ with the data
    prediction m(lambda) = cos(lambda) (exact solution in closed form): diffusers' (and the DPM-Solver
    authors') D2 weight makes the local error fall like h^3 (global order 2); twice that weight, the
    exponential integrator's Taylor term, gives h^4. Measured slopes 2.96-2.99 and 4.04-4.13."""
    def exact(lam_s, lam_t, x):  # x_t = (sigma_t/sigma_s) x + sigma_t int e^l cos(l) dl
        s = lambda lam: 1 / math.sqrt(1 + math.exp(2 * lam))  # noqa: E731
        prim = lambda lam: math.exp(lam) * (math.cos(lam) + math.sin(lam)) / 2  # noqa: E731
        return s(lam_t) / s(lam_s) * x + s(lam_t) * (prim(lam_t) - prim(lam_s))

    errs, errs_taylor = [], []
    for h in (0.04, 0.02, 0.01, 0.005):
        lam = [0.3 + k * h for k in range(4)]
        plan = dpmsolver_multistep([math.exp(-v) for v in lam], [1, 2, 3], prediction_type="sample",
                                   solver_type="heun")
        x, (m2, m1, m0) = 0.7, (torch.tensor([math.cos(v)], dtype=F64) for v in lam[:3])
        got = float(Stepper(plan).step(torch.tensor([x], dtype=F64), m0, m=[m1, m2], row=2)[0])
        want = exact(lam[2], lam[3], x)
        a_t = 1 / math.sqrt(1 + math.exp(-2 * lam[3]))
        d2 = ref.divided_differences([m0, m1, m2], lam[::-1], 3)[2].item()
        weight = -a_t * ((math.expm1(-h) + h) / h**2 - 0.5)
        errs.append(abs(got - want))
        errs_taylor.append(abs(got + weight * d2 - want))
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    slopes_taylor = [math.log2(a / b) for a, b in zip(errs_taylor, errs_taylor[1:])]
    assert all(2.7 < s < 3.3 for s in slopes), slopes
    assert all(3.6 < s < 4.4 for s in slopes_taylor), slopes_taylor


# ------------------------------------------------------------------------- order of convergence (oracle)
_ODE: dict = {}


def oracle_run(config, steps):
    """(error vs the exact PF-ODE solution, the run) of the drop-in in float64 driven by the mixture's exact
    eps at each grid sigma; Lu's uniform-lambda grid from sigma_max to sigma_min (the same ends for every N)."""
    mixture = oracle.default_mixture((3, 8, 8), k=3)
    x_T = torch.randn(4, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    fast = Fast(use_lu_lambdas=True, final_sigmas_type="sigma_min", lower_order_final=False, **config)
    fast.set_timesteps(steps)
    abar = (1 / (1 + fast.sigmas.double() ** 2)).tolist()
    if "exact" not in _ODE:
        _ODE["exact"] = oracle.ode_solution(mixture, x_T, abar[0], abar[-1], steps=256)
    x = x_T
    for i, t in enumerate(fast.timesteps):
        x = fast.step(mixture.eps(x, math.sqrt(abar[i]), math.sqrt(1 - abar[i])), t, x).prev_sample
    return (x - _ODE["exact"]).abs().max().item()


@pytest.mark.parametrize("config", [dict(), dict(solver_type="heun"), dict(algorithm_type="dpmsolver")],
                         ids=["2M", "2M-heun", "dpmsolver-2M"])
def test_second_order_convergence_on_the_oracle(config):
    """Max error vs the exact ODE solution at 10, 20, 40 steps: each doubling divides it by 2^p, p in
    [1.7, 2.5] (measured 1.89-2.29; 2.0-2.1 at 40 -> 80 steps)."""
    errs = [oracle_run(config, n) for n in (10, 20, 40)]
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(1.7 <= s <= 2.5 for s in slopes), (errs, slopes)


def test_third_order_convergence_on_the_oracle():
    """3M at 10, 20, 40 steps: slopes 3.6 and 2.9 measured (>= 2.6 asserted), and 2.6x more accurate than 2M
    at 40 steps (> 2x asserted). Asymptotically it is second order (40 -> 80 steps measured 2.3: the D2
    weight, see test_third_order_weight_of_diffusers_is_half_the_taylor_one)."""
    errs = [oracle_run(dict(solver_order=3), n) for n in (10, 20, 40)]
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(s >= 2.6 for s in slopes), (errs, slopes)
    assert errs[2] < oracle_run({}, 40) / 2


# ---------------------------------------------------------------------------------- numerics, shapes
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++")], ids=["3M", "sde"])
def test_low_precision_trajectory_accuracy_rule(backend, dtype, config):
    """Error vs diffusers in fp32 at most 2x that of diffusers itself run in the same dtype."""
    require_backend(backend)
    x, noises = inputs((2, 4, 16, 16), n=10, seed=1)
    want = trajectory(Diffusers(**config), x, 10, noises=noises)
    naive = trajectory(Diffusers(**config), x.to(dtype), 10, noises=[n.to(dtype) for n in noises])
    fast = Fast(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(dtype), 10, noises=[n.to(dtype) for n in noises])
    assert got[-1].dtype == dtype
    assert_accuracy_rule(got[-1], naive[-1], want[-1], what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_and_strided_inputs(backend):
    require_backend(backend)
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    x, noises = inputs((3, 5, 17, 19), n=8, seed=2)
    strided = [n.transpose(2, 3).contiguous().transpose(2, 3) for n in noises]
    assert not strided[0].is_contiguous()
    want = trajectory(Diffusers(**config), x, 8, noises=noises)
    fast = Fast(**config)
    fast.backend = backend
    fast.set_timesteps(8)
    xf = x.transpose(1, 2).contiguous().transpose(1, 2)
    for i, t in enumerate(fast.timesteps):
        e = model(xf, t, fast.alphas_cumprod).transpose(2, 3).contiguous().transpose(2, 3)
        xf = fast.step(e, t, xf, variance_noise=strided[i]).prev_sample
    assert_close(xf, want[-1], atol=1e-5, rtol=1e-5, what=f"{backend} odd shape, strided")


def test_mixed_dtypes_like_diffusers():
    """An fp16 model output with an fp32 sample: diffusers returns its converted output's dtype (fp32 for
    eps, fp16 for a "sample" model); computed in fp32 here, close to its result."""
    for prediction_type, dtype in (("epsilon", torch.float32), ("sample", torch.float16)):
        ref_s, fast = Diffusers(prediction_type=prediction_type), Fast(prediction_type=prediction_type)
        x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        for s in (ref_s, fast):
            s.set_timesteps(10)
        for t in ref_s.timesteps[:3]:
            e = model(x, t, ref_s.alphas_cumprod, prediction_type).half()
            want, got = ref_s.step(e, t, x).prev_sample, fast.step(e, t, x).prev_sample
            assert got.dtype == want.dtype == dtype
            assert_close(got, want, atol=2e-3, rtol=2e-3, what=f"mixed {prediction_type}")
            x = want.float()


def test_outputs_are_differentiable_like_diffusers():
    """At a second-order step: gradients of prev_sample w.r.t. the sample and the model output equal
    diffusers' (the history from the first step is a constant to both)."""
    x, _ = inputs((2, 3, 4, 4))
    grads = []
    for s in (Diffusers(), Fast()):
        s.set_timesteps(10)
        t0, t1 = s.timesteps[:2]
        x1 = s.step(model(x, t0, s.alphas_cumprod), t0, x).prev_sample
        xg = x1.clone().requires_grad_()
        eg = model(x1, t1, s.alphas_cumprod).requires_grad_()
        out = s.step(eg, t1, xg).prev_sample
        (out**2).sum().backward()
        grads.append((xg.grad, eg.grad))
    assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5, what="d/d sample")
    assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5, what="d/d model_output")


# ------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("device,backend", DEVICES)
def test_generator_noise_gives_diffusers_images(device, backend):
    """With a generator the drop-in draws diffusers' noise itself (float32, every step, the last one too): the
    same samples, and the generator left in the same state."""
    require_backend(backend, device)
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    x, _ = inputs()
    runs = []
    for s in (Diffusers(**config), Fast(**config)):
        s.backend = backend
        s.set_timesteps(8, device=device)
        xs, gen = x.to(device), torch.Generator(device).manual_seed(5)
        for t in s.timesteps:
            xs = s.step(model(xs, t.cpu(), s.alphas_cumprod), t, xs, generator=gen).prev_sample
        runs.append((xs, gen.get_state()))
    assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5, what="generator noise")
    assert torch.equal(runs[1][1], runs[0][1]), "a different number of draws"


def test_a_real_pipeline_from_a_small_config_gives_diffusers_images():
    """DDPMPipeline (which passes its generator to step) with a small random UNet and sde-dpmsolver++: the
    drop-in gives diffusers' images for the same generator."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=Diffusers(algorithm_type="sde-dpmsolver++"))
    pipe.set_progress_bar_config(disable=True)
    images = lambda: pipe(batch_size=2, num_inference_steps=6, output_type="np",  # noqa: E731
                          generator=torch.Generator().manual_seed(1)).images
    want = images()
    pipe.scheduler = Fast.from_config(pipe.scheduler.config)
    got = images()
    assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeds_draw_the_fastdiff_stream(backend):
    """With seeds the noise of step k is the Philox stream at step k: equal to diffusers given that noise,
    and the same for a sample whatever batch it is in."""
    require_backend(backend)
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3)
    x, _ = inputs((4, 3, 8, 8))
    seeds = sample_seeds(11, 4)
    stream = [randn(seeds, 3 * 64, step=k).reshape(4, 3, 8, 8) for k in range(8)]
    want = trajectory(Diffusers(**config), x, 8, noises=stream)
    fast = Fast(**config)
    fast.backend = backend
    fast.set_seeds(seeds)
    got = trajectory(fast, x, 8)
    assert_close(got[-1], want[-1], atol=2e-5, rtol=2e-5, what=f"{backend} seeds")
    single = Fast(**config)
    single.backend = backend
    alone = trajectory(single, x[2:3], 8, seeds=seeds[2:3])
    assert torch.equal(alone[-1][0], got[-1][2])


@pytest.mark.parametrize("config", [dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++")], ids=["3M", "sde"])
def test_begin_index_starts_the_warm_up_and_the_noise_counter(config):
    """img2img: set_begin_index(k) runs from step k with a first-order first step, as diffusers does; seeds
    draw Philox step k there. Without begin_index, a first timestep timesteps[k] starts there too."""
    x, _ = inputs()
    seeds = sample_seeds(3, 2)
    stream = [randn(seeds, 3 * 64, step=k).reshape(2, 3, 8, 8) for k in range(10)]
    for begin in (True, False):
        runs = []
        for s in (Diffusers(**config), Fast(**config)):
            s.set_timesteps(10)
            if begin:
                s.set_begin_index(4)
            xs = x
            for k in range(4, 10):
                t = s.timesteps[k]
                e = model(xs, t, s.alphas_cumprod)
                if isinstance(s, Diffusers):
                    xs = s.step(e, t, xs, variance_noise=stream[k]).prev_sample
                else:
                    xs = s.step(e, t, xs, seeds=seeds).prev_sample
                assert s.step_index == k + 1
            runs.append(xs)
        assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5, what=f"begin_index={begin}")


def test_step_index_and_warm_up_counter_follow_diffusers():
    ref_s, fast = Diffusers(solver_order=3), Fast(solver_order=3)
    x = torch.zeros(1, 4)
    for s in (ref_s, fast):
        s.set_timesteps(6)
    assert fast.step_index is None and fast.lower_order_nums == 0 and fast.begin_index is None
    for t in ref_s.timesteps:
        for s in (ref_s, fast):
            s.step(x, t, x)
        assert (fast.step_index, fast.lower_order_nums) == (ref_s.step_index, ref_s.lower_order_nums)


# ------------------------------------------------------------------------------------------ guidance
@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("config", [dict(), dict(prediction_type="sample", thresholding=True),
                                    dict(variance_type="learned_range", solver_order=3),
                                    dict(algorithm_type="sde-dpmsolver++")], ids=["2M", "thr", "learned", "sde"])
def test_fused_guidance_equals_guidance_done_outside(device, backend, config):
    """guidance_scale=g with model_output = [uncond; cond] (2B rows) equals diffusers given the combined
    output uncond + g*(cond - uncond), over a whole run (the history holds guided outputs)."""
    require_backend(backend, device)
    learned = config.get("variance_type") == "learned_range"
    x, noises = inputs()
    runs = []
    for s in (Diffusers(**config), Fast(**config)):
        s.backend = backend
        s.set_timesteps(6)
        xs = x.to(device)
        for i, t in enumerate(s.timesteps):
            u = model(xs, t, s.alphas_cumprod, config.get("prediction_type", "epsilon"), learned)
            c = model(xs, t, s.alphas_cumprod, config.get("prediction_type", "epsilon"), learned, shift=0.3)
            if isinstance(s, Diffusers):
                xs = s.step(u + 7.5 * (c - u), t, xs, variance_noise=noises[i]).prev_sample
            else:
                xs = s.step(torch.cat([u, c]), t, xs, variance_noise=noises[i].to(device),
                            guidance_scale=7.5).prev_sample
        runs.append(xs)
    assert_close(runs[1], runs[0], atol=2e-5, rtol=2e-5, what="guided")
    fast = Fast(**config)
    fast.set_timesteps(6)
    with pytest.raises(ValueError, match=r"model_output: with guidance_scale it holds \[uncond; cond\]"):
        fast.step(x if not learned else torch.cat([x, x], 1), fast.timesteps[0], x, guidance_scale=2.0)


# --------------------------------------------------------------------------------- plans, compile
def test_plans_are_built_in_set_timesteps_not_in_step(monkeypatch):
    """A whole run (and a second set_timesteps of the same grid) builds no plan inside step."""
    mod = sys.modules[Fast.__module__]
    for config in (dict(solver_order=3), dict(thresholding=True, prediction_type="sample")):
        fast = Fast(**config)
        fast.set_timesteps(8)
        x, _ = inputs()
        trajectory(fast, x, 8)

        def refuse(*args, **kwargs):
            raise AssertionError("a plan was built")

        with monkeypatch.context() as m:
            m.setattr(mod, "dpmsolver_multistep", refuse)
            m.setattr(mod, "dpmsolver_x0", refuse)
            trajectory(fast, x, 8)


@pytest.mark.parametrize("config", [dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
                                    dict(thresholding=True, prediction_type="sample"),
                                    dict(solver_order=3, dtype=torch.float64)], ids=["3M", "sde", "thr", "3M-float64"])
def test_torch_compile_fullgraph_on_the_first_calls_after_set_timesteps(config):
    """Steps 0-2 (first to third order) traced with fullgraph=True, then eager steps: the eager run's result.
    (Each step index is a new trace - a multistep run recompiles per step.) float64 runs the torch reference
    into the stepper's history buffers, traced too."""
    torch._dynamo.reset()
    config = dict(config)
    dtype = config.pop("dtype", torch.float32)
    x, e = torch.randn(2, 3, 4, 4, dtype=dtype), torch.randn(2, 3, 4, 4, dtype=dtype)
    runs = []
    for compiled in (True, False):
        fast = Fast(**config)
        fast.set_timesteps(6)
        fast.set_seeds(3)
        step = torch.compile(fast.step, fullgraph=True, backend="aot_eager") if compiled else fast.step
        xs = x
        for i, t in enumerate(fast.timesteps):
            xs = (step if i < 3 else fast.step)(0.3 * e + 0.1 * xs, t, xs).prev_sample
        runs.append(xs)
    assert_close(runs[0], runs[1], atol=1e-6, rtol=1e-6, what="compiled steps")


def test_assigned_sigmas_are_honoured():
    """sigmas assigned (or changed in place) after set_timesteps are used by the next steps, as in diffusers."""
    x, _ = inputs()
    runs = []
    for s in (Diffusers(solver_order=3), Fast(solver_order=3)):
        s.set_timesteps(8)
        s.sigmas = s.sigmas * 1.05
        xs = x
        for i, t in enumerate(s.timesteps):
            if i == 4:
                s.sigmas[5] *= 0.9
            xs = s.step(model(xs, t, s.alphas_cumprod), t, xs).prev_sample
        runs.append(xs)
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5, what="assigned sigmas")


# ------------------------------------------------------------------------------- grids, attributes
GRIDS = [dict(), dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing"),
         dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
         dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True), dict(use_lu_lambdas=True),
         dict(use_lu_lambdas=True, use_karras_sigmas=True), dict(use_flow_sigmas=True, flow_shift=3.0),
         dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), dict(final_sigmas_type="sigma_min"),
         dict(timestep_spacing="trailing", **ZERO_SNR)]


@pytest.mark.parametrize("config", GRIDS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_attributes_and_grids_equal_diffusers(config):
    ref_s, fast = Diffusers(**config), Fast(**config)
    for name in ("betas", "alphas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas", "timesteps"):
        assert torch.equal(getattr(fast, name), getattr(ref_s, name)), name
    assert (fast.init_noise_sigma, fast.order, len(fast), fast.num_inference_steps) == \
        (ref_s.init_noise_sigma, ref_s.order, len(ref_s), ref_s.num_inference_steps)
    for kw in (dict(num_inference_steps=7), dict(num_inference_steps=25), dict(num_inference_steps=1)):
        ref_s.set_timesteps(**kw)
        fast.set_timesteps(**kw)
        assert torch.equal(fast.sigmas, ref_s.sigmas) and fast.sigmas.dtype == torch.float32, kw
        assert torch.equal(fast.timesteps, ref_s.timesteps), kw
        assert fast.num_inference_steps == ref_s.num_inference_steps


def test_custom_timesteps_and_dynamic_shifting_equal_diffusers():
    for config, kw in ((dict(), dict(timesteps=[999, 500, 20])),
                       (dict(use_flow_sigmas=True, use_dynamic_shifting=True), dict(num_inference_steps=9, mu=0.6))):
        ref_s, fast = Diffusers(**config), Fast(**config)
        ref_s.set_timesteps(**kw)
        fast.set_timesteps(**kw)
        assert torch.equal(fast.sigmas, ref_s.sigmas) and torch.equal(fast.timesteps, ref_s.timesteps)
        assert fast.config.flow_shift == ref_s.config.flow_shift


def test_same_constructor_and_step_as_diffusers():
    ours, theirs = inspect.signature(Fast.__init__), inspect.signature(Diffusers.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    params = list(inspect.signature(Diffusers.step).parameters)
    assert list(inspect.signature(Fast.step).parameters)[: len(params)] == params
    assert list(inspect.signature(Fast.set_timesteps).parameters) == \
        list(inspect.signature(Diffusers.set_timesteps).parameters)
    out = Fast()
    out.set_timesteps(4)
    x = torch.zeros(1, 2)
    got = out.step(x, out.timesteps[0], x)
    assert type(got).__name__ == "SchedulerOutput" and list(got.keys()) == ["prev_sample"]
    assert len(out.step(x, out.timesteps[1], x, return_dict=False)) == 1


def test_config_round_trips(tmp_path):
    fast = Fast.from_config(Diffusers(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True).config)
    assert fast.config.algorithm_type == "sde-dpmsolver++" and fast.config.use_karras_sigmas
    fast.save_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(Fast.from_pretrained(tmp_path).config) == public(fast.config)
    assert Diffusers.from_pretrained(tmp_path).config.algorithm_type == "sde-dpmsolver++"
    for other in (DEISMultistepScheduler(), UniPCMultistepScheduler()):  # "deis", "logrho", "bh2" mapped
        assert public(Fast.from_config(other.config).config) == public(Diffusers.from_config(other.config).config)


def test_add_noise_matches_diffusers():
    """At the grid point of each timestep (diffusers' rules: before set_timesteps, by timestep, after
    begin_index, after a step), VP and flow coordinates."""
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for config in (dict(), dict(use_karras_sigmas=True), dict(use_flow_sigmas=True, flow_shift=2.0)):
        ref_s, fast = Diffusers(**config), Fast(**config)
        ts = torch.tensor([0, 10, 500, 999])
        assert_close(fast.add_noise(x0, noise, ts), ref_s.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what="before set_timesteps")
        for s in (ref_s, fast):
            s.set_timesteps(10)
        ts = torch.cat([ref_s.timesteps[[0, 3, 9]], torch.tensor([1234])])  # the last one is off the grid
        assert_close(fast.add_noise(x0, noise, ts), ref_s.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what=f"by timestep {config}")
        for s in (ref_s, fast):
            s.set_begin_index(3)
        assert_close(fast.add_noise(x0, noise, ts[:1]), ref_s.add_noise(x0, noise, ts[:1]), atol=1e-6, rtol=1e-6,
                     what="begin_index")
        for s in (ref_s, fast):
            s.step(x0, s.timesteps[3], x0, variance_noise=noise)
        assert_close(fast.add_noise(x0, noise, ts[:1]), ref_s.add_noise(x0, noise, ts[:1]), atol=1e-6, rtol=1e-6,
                     what="after a step")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clearly():
    for kw, match in ((dict(algorithm_type="dpm"), "algorithm_type: expected one of"),
                      (dict(solver_type="rk4"), "solver_type: expected"),
                      (dict(algorithm_type="dpmsolver"), "`final_sigmas_type` zero is not supported"),
                      (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                            prediction_type="flow_prediction"), "prediction_type: flow_prediction needs"),
                      (dict(prediction_type="x0"), "prediction_type: expected one of"),
                      (dict(use_karras_sigmas=True, use_beta_sigmas=True), "Only one of"),
                      (dict(solver_order=4), "solver_order: expected 1, 2 or 3"),
                      (dict(timestep_spacing="quadratic"), "timestep_spacing: expected one of"),
                      (dict(final_sigmas_type="max"), "final_sigmas_type: expected one of"),
                      (dict(beta_schedule="cubic"), "beta_schedule"),
                      (dict(trained_betas=[0.01] * 10), "trained_betas: expected num_train_timesteps=1000")):
        with pytest.raises(ValueError, match=match):
            Fast(**kw)
    fast = Fast()
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        fast.step(x, 10, x)
    for kw, match in ((dict(), "Must pass exactly one"),
                      (dict(num_inference_steps=5, timesteps=[5]), "Can only pass one of"),
                      (dict(num_inference_steps=5, mu=0.5), "mu: needs use_dynamic_shifting"),
                      (dict(timesteps=[999, 1000]), "timesteps: expected"),
                      (dict(num_inference_steps=1001), "num_inference_steps")):
        with pytest.raises(ValueError, match=match):
            fast.set_timesteps(**kw)
    for kw, match in ((dict(use_karras_sigmas=True), "Cannot use `timesteps` with `config.use_karras_sigmas"),
                      (dict(use_beta_sigmas=True), "Cannot set `timesteps` with `config.use_beta_sigmas"),
                      (dict(use_flow_sigmas=True), "timesteps: custom timesteps cannot be used")):
        with pytest.raises(ValueError, match=match):
            Fast(**kw).set_timesteps(timesteps=[500, 10])
    fast.set_timesteps(4)
    with pytest.raises(ValueError, match=r"timestep: 501 is not one of this run's timesteps \[999, 749, 500, 250\]"):
        fast.step(x, 501, x)  # diffusers would silently run the last step from 501
    with pytest.raises(TypeError, match="timestep: expected an int or an integer tensor, got float"):
        fast.step(x, 999.5, x)
    with pytest.raises(TypeError, match="got str"):
        fast.step(x, "999", x)
    with pytest.raises(ValueError, match="timestep: expected one timestep"):
        fast.step(x, torch.tensor([999, 749]), x)
    with pytest.raises(ValueError, match="e\\[0\\] must have shape"):
        fast.step(torch.randn(1, 2, 4, 5), 999, x)
    fast.set_timesteps(4)
    for t in fast.timesteps:
        fast.step(x, t, x)
    with pytest.raises(ValueError, match="step: this run has 4 steps and all were taken"):
        fast.step(x, 250, x)
    for bad in (1.5, "3"):
        with pytest.raises(TypeError, match="seeds: expected"):
            fast.set_seeds(bad)


def test_third_order_sde_dpmsolver_is_refused_where_diffusers_fails():
    """diffusers has no third-order sde-dpmsolver update: its step fails there (UnboundLocalError); the drop-in
    refuses the run in set_timesteps, and equals diffusers on runs that never reach third order."""
    config = dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    x, noises = inputs()
    with pytest.raises(UnboundLocalError):
        trajectory(Diffusers(**config), x, 8, noises=noises)
    with pytest.raises(ValueError, match="solver_order: sde-dpmsolver has no third-order update"):
        Fast(**config).set_timesteps(8)
    want = trajectory(Diffusers(**config), x, 4, noises=noises)  # orders 1, 2, 2, 1
    exact = trajectory(Diffusers(**config), x.double(), 4, noises=[n.double() for n in noises], exact=True)
    check_trajectory(trajectory(Fast(**config), x, 4, noises=noises), want, exact, "4 steps")
