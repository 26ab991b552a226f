"""FastUniPCMultistepScheduler against diffusers' UniPCMultistepScheduler (0.42) as the oracle - whole trajectories
in fp32 and float64 over every config option, on every backend for a few - and the fused plan against the
paper-shaped reference (fastdiff.reference.unipc), its order of convergence on the Gaussian-mixture oracle's exact
ODE solution, the sigma = 0 limits diffusers computes as NaN, fused guidance, begin_index, low precision,
autograd, torch.compile, and bad input. UniPC is deterministic: it draws no noise, so there is no generator to
match and seeds change nothing (tested)."""

import inspect

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, assert_accuracy_rule, assert_close, require_backend
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fastdiff.integrations.diffusers.base import MAX_PLANS
from fastdiff.integrations.diffusers.unipc import FastUniPCMultistepScheduler
from fastdiff.oracle import default_mixture, ode_solution
from fastdiff.reference.unipc import sample_unipc
from fastdiff.samplers.predictions import predict
from fastdiff.samplers.unipc import converted, unipc_plan
from fastdiff.stepper import Stepper

MIX = default_mixture((3, 8, 8), k=4)
SHAPE = (2, 3, 8, 8)
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
VARIANTS = {  # config, set_timesteps keywords
    "default": dict(),
    "order1": dict(solver_order=1),
    "order3-bh1-sigma_min": dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    "order3-disable-corrector": dict(solver_order=3, disable_corrector=[0, 2, 3]),
    "order3-no-lower-order-final": dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    "noise-pred-v-sigma_min": dict(predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    "noise-pred-sample-order3-bh1": dict(predict_x0=False, prediction_type="sample", solver_order=3,
                                         solver_type="bh1", final_sigmas_type="sigma_min", thresholding=True),
    "sample-leading-offset": dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1),
    "v-trailing-squaredcos": dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                  beta_schedule="squaredcos_cap_v2"),
    "zero-snr-scaled-linear-v": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                     prediction_type="v_prediction"),
    "trained-betas-order3": dict(trained_betas=np.linspace(2e-4, 0.03, 1000).tolist(), solver_order=3),
    "200-train-steps-trailing": dict(num_train_timesteps=200, beta_end=0.08, timestep_spacing="trailing"),
    "karras": dict(use_karras_sigmas=True),
    "karras-sigma-range-order3": dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=60.0, solver_order=3,
                                      final_sigmas_type="sigma_min"),
    "exponential-v": dict(use_exponential_sigmas=True, prediction_type="v_prediction"),
    "exponential-sigma-range": dict(use_exponential_sigmas=True, sigma_min=0.1, sigma_max=40.0),
    "beta-sample": dict(use_beta_sigmas=True, prediction_type="sample"),
    "beta-sigma-range": dict(use_beta_sigmas=True, sigma_max=80.0),
    "midpoint-alias": dict(solver_type="midpoint"),
    "flow-shift": dict(FLOW, flow_shift=3.0),
    "flow-eps-order3": dict(use_flow_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"),
    "flow-v": dict(use_flow_sigmas=True, prediction_type="v_prediction"),
    "flow-terminal-sigma_min": dict(FLOW, shift_terminal=0.1, final_sigmas_type="sigma_min"),
    "flow-karras": dict(FLOW, use_karras_sigmas=True),
    "flow-dynamic-exponential": (dict(FLOW, use_dynamic_shifting=True), dict(mu=0.8)),
    "flow-dynamic-linear": (dict(FLOW, use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=2.0)),
    "flow-custom-sigmas": (dict(FLOW, flow_shift=2.0), dict(sigmas=np.linspace(1.0, 0.05, 7))),
}


def variant(name):
    v = VARIANTS[name]
    return v if isinstance(v, tuple) else (v, {})


def points(sched, j):
    """(alpha_j, sigma_j) of grid point j of a scheduler after set_timesteps (its float32 sigmas)."""
    s = float(sched.sigmas[j])
    if sched.config.use_flow_sigmas:
        return 1 - s, s
    a = (1 + s * s) ** -0.5
    return a, s * a


def mixture_model(sched, j, x):
    """The exact denoiser of MIX at grid point j, in the scheduler's prediction type (bounded samples)."""
    a, s = points(sched, j)
    pt = sched.config.prediction_type
    if pt == "epsilon":
        return MIX.eps(x, a, s)
    if pt == "sample":
        return MIX.x0(x, a, s)
    eps, x0 = MIX.eps(x, a, s), MIX.x0(x, a, s)
    return a * eps - s * x0 if pt == "v_prediction" else eps - x0


def trajectory(sched, x, steps=8, set_kw=None, exact=False, model=mixture_model, begin=None, **step_kw):
    """Every prev_sample of a run. exact: diffusers' float64 run with its schedule arithmetic in float64 too
    (its sigmas are float32 tensors, which keep alpha, lambda, h and rho in float32 even for float64 samples)."""
    sched.set_timesteps(steps, **(set_kw or {}))
    if exact:
        sched.sigmas = sched.sigmas.double()
    if begin is not None:
        sched.set_begin_index(begin)
    xs = []
    for j, t in enumerate(sched.timesteps):
        if begin is not None and j < begin:
            continue
        x = sched.step(model(sched, j, x), t, x, **step_kw).prev_sample
        xs.append(x)
    return xs


def max_err(xs, refs):
    return max((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(xs, refs))


def check_trajectory(got, want, exact, what):
    """As tests/test_ddim.py: within max(1e-5, 3x diffusers' own fp32 error) of diffusers' fp32 run, and no
    further from the float64 run than 2x diffusers' fp32 run is."""
    assert len(got) == len(want)
    tol = max(1e-5, 3 * max_err(want, exact))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=tol, rtol=tol, what=f"{what} step {i}")
    err, err_diffusers = max_err(got, exact), max_err(want, exact)
    assert err <= 2 * err_diffusers + 1e-7, f"{what}: error vs float64 {err:.3g}, diffusers' {err_diffusers:.3g}"


def x_T(seed=0, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def pair(**config):
    return UniPCMultistepScheduler(**config), FastUniPCMultistepScheduler(**config)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers_for_every_option(name):
    """8 steps (7 for the custom sigmas) against diffusers in fp32 and in float64 (check_trajectory)."""
    config, set_kw = variant(name)
    x = x_T()
    want = trajectory(UniPCMultistepScheduler(**config), x, set_kw=set_kw)
    exact = trajectory(UniPCMultistepScheduler(**config), x.double(), set_kw=set_kw, exact=True)
    require_backend("cpu")
    fast = FastUniPCMultistepScheduler(**config)
    fast.backend = "cpu"
    got = trajectory(fast, x, set_kw=set_kw)
    ref = UniPCMultistepScheduler(**config)
    ref.set_timesteps(8, **set_kw)
    assert torch.equal(fast.sigmas, ref.sigmas) and torch.equal(fast.timesteps, ref.timesteps)
    check_trajectory(got, want, exact, name)


@pytest.mark.parametrize("kind", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_grid_ends_where_diffusers_ends_it(kind):
    """final_sigmas_type="sigma_min" with converted sigmas ends at the converted grid's last sigma (diffusers'
    UniPC, unlike its DPM-Solver): for a one-step run that is sigma_max, a zero-length (identity) step."""
    for n in (1, 2, 7, 50):
        ref, fast = pair(**{kind: True}, final_sigmas_type="sigma_min")
        ref.set_timesteps(n)
        fast.set_timesteps(n)
        assert torch.equal(fast.sigmas, ref.sigmas) and torch.equal(fast.timesteps, ref.timesteps), (kind, n)
    x = x_T()
    want = trajectory(ref, x, steps=1)
    assert_close(trajectory(fast, x, steps=1)[-1], want[-1], atol=1e-6, rtol=1e-6, what=f"{kind} one step")
    assert_close(want[-1], x, atol=1e-6, rtol=1e-6, what="diffusers' one step: the identity")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["order3-disable-corrector", "noise-pred-v-sigma_min", "flow-shift"])
def test_trajectory_on_every_backend(device, backend, name):
    require_backend(backend, device)
    config, set_kw = variant(name)
    x = x_T(1)
    want = trajectory(UniPCMultistepScheduler(**config), x, set_kw=set_kw)
    exact = trajectory(UniPCMultistepScheduler(**config), x.double(), set_kw=set_kw, exact=True)
    fast = FastUniPCMultistepScheduler(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(device), set_kw=dict(set_kw, device=device),
                     model=lambda s, j, x: mixture_model(s, j, x.cpu()).to(device))
    check_trajectory(got, want, exact, f"{name} {device}-{backend}")


def reference_run(config, steps, x, begin=0, disable=()):
    """The paper-shaped reference (float64) on the drop-in's grid, with the same mixture model."""
    sched = FastUniPCMultistepScheduler(**config)
    sched.set_timesteps(steps)
    pts = [points(sched, j) for j in range(steps + 1)]
    cfg = sched.config

    def model(xj, j):  # the converted output: x0 or eps of the model's prediction
        out = mixture_model(sched, j, xj)
        a, s = pts[j]
        pred = predict(cfg.prediction_type, a, s)
        form = pred.x0 if cfg.predict_x0 else pred.eps
        return form["x"] * xj + form["e0"] * out

    xs = []
    sample_unipc(model, x, [p[0] for p in pts], [p[1] for p in pts], order=cfg.solver_order,
                 variant=cfg.solver_type, predict_x0=cfg.predict_x0, lower_order_final=cfg.lower_order_final,
                 disable_corrector=disable, begin=begin, callback=lambda j, xj: xs.append(xj))
    return xs


@pytest.mark.parametrize("config", [
    dict(solver_order=1), dict(), dict(solver_order=3), dict(solver_order=3, solver_type="bh1"),
    dict(solver_order=2, solver_type="bh1", lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=3, predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(solver_order=2, predict_x0=False, solver_type="bh1"),
], ids=["p1", "p2", "p3", "p3-bh1", "p2-bh1-no-lof", "p3-eps-v", "p2-eps-bh1-zero"])
def test_fused_plan_equals_the_paper_shaped_reference(config):
    """float64: the drop-in's one pass per call (corrector of the last step + predictor of this one, linear
    forms substituted into each other) equals UniP then UniC applied one after the other, to 1e-12; also
    from begin_index 3 and with correctors disabled."""
    x = x_T(2, dtype=torch.float64)
    for begin, disable in ((0, ()), (3, ()), (0, (1, 4))):
        want = reference_run(config, 9, x, begin, disable)
        fast = FastUniPCMultistepScheduler(**config, disable_corrector=list(disable))
        got = trajectory(fast, x, 9, begin=begin or None)
        assert len(got) == len(want) == 9 - begin
        for j, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, atol=1e-12, rtol=1e-12, what=f"{config} begin {begin} disable {disable} step {j}")


def test_plan_builder_through_the_stepper_equals_the_reference():
    """The plan builder alone (no drop-in): a Stepper runs unipc_plan over a hand-made log-SNR grid."""
    lam = np.array([-3.0, -2.1, -1.0, -0.2, 0.9, 1.7, 2.6, 4.0])
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
    N = len(lam) - 1
    for order, variant_, px0 in ((3, "bh2", True), (3, "bh1", False), (2, "bh1", True)):
        m = converted("epsilon", px0, alpha[:N], sigma[:N])
        stepper = Stepper(unipc_plan(alpha, sigma, m, order=order, solver_type=variant_, predict_x0=px0))
        x0 = x = x_T(3, dtype=torch.float64)
        want, model = [], MIX.x0 if px0 else MIX.eps
        sample_unipc(lambda xj, j, model=model: model(xj, alpha[j], sigma[j]), x0, alpha, sigma, order=order,
                     variant=variant_, predict_x0=px0, callback=lambda j, xj, want=want: want.append(xj))
        for j in range(N):
            x, hist, last = stepper.step(x, MIX.eps(x, alpha[j], sigma[j]))
            assert_close(x, want[j], atol=1e-12, rtol=1e-12, what=f"order {order} {variant_} x0={px0} step {j}")


def test_order_of_convergence_on_the_exact_model():
    """The Gaussian-mixture oracle's exact eps-model, float64, exponential sigmas (uniform steps in log-SNR) from
    sigma_max to sigma_min: against the exact probability-flow ODE solution the error falls like N^-(p+1) for
    UniPC-p (the corrector UniC-p raises UniP-p's order by one, Zhao et al. 2023). Measured max error at
    N = 16/32/64: p=1 0.0285/0.0073/0.0018, p=2 6.4e-3/1.0e-3/1.3e-4, p=3 6.3e-3/1.3e-4/6.0e-6 (slopes from 32 to
    64: 2.0, 3.0, 4.45); asserted: slopes > 1.7, 2.6, 3.5."""
    x, errs = x_T(4, dtype=torch.float64), {}
    config = dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min")  # the last step has length 0
    sched = FastUniPCMultistepScheduler(**config)
    sched.set_timesteps(16)
    s_max, s_min = float(sched.sigmas[0]), float(sched.sigmas[-1])
    exact = ode_solution(MIX, x, 1 / (1 + s_max**2), 1 / (1 + s_min**2))
    for order in (1, 2, 3):
        for n in (32, 64):
            got = trajectory(FastUniPCMultistepScheduler(solver_order=order, **config), x, n)[-1]
            errs[order, n] = (got - exact).abs().max().item()
    slope = {p: np.log2(errs[p, 32] / errs[p, 64]) for p in (1, 2, 3)}
    assert slope[1] > 1.7 and slope[2] > 2.6 and slope[3] > 3.5 and errs[3, 64] < 2e-5, (slope, errs)


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(predict_x0=False),
                                    dict(predict_x0=False, prediction_type="sample", solver_order=3)],
                         ids=["bh1-x0", "eps-bh2", "eps-sample-p3"])
def test_final_sigma_zero_takes_the_limit_where_diffusers_gives_nan(config):
    """final_sigmas_type="zero": diffusers' last step computes 0*inf (bh1: B(h) = h = inf; noise prediction:
    sigma_t*(e^h - 1)) and returns NaN. The limit is x_N = m_{N-1} = x0 (data prediction) or
    (x_c - sigma_s eps)/alpha_s (noise prediction, x_c = diffusers' last_sample); every step before is
    diffusers'."""
    steps, x = 6, x_T(5)
    ref, fast = pair(**config)
    ref_exact = UniPCMultistepScheduler(**config)
    want, got = trajectory(ref, x, steps), trajectory(fast, x, steps)
    exact = trajectory(ref_exact, x.double(), steps, exact=True)
    assert torch.isnan(want[-1]).all() and torch.isfinite(got[-1]).all()

    def limit(sched, xs):  # from diffusers' sample before the last step and its last corrected sample
        a, s = points(sched, steps - 1)
        pred = predict(sched.config.prediction_type, a, s)
        out = mixture_model(sched, steps - 1, xs[-2])
        if sched.predict_x0:
            return pred.x0["x"] * xs[-2] + pred.x0["e0"] * out
        return (sched.last_sample - s * (pred.eps["x"] * xs[-2] + pred.eps["e0"] * out)) / a

    check_trajectory(got, want[:-1] + [limit(ref, want)], exact[:-1] + [limit(ref_exact, exact)], "limit")


def test_a_run_refused_from_step_0_runs_from_a_later_begin_index():
    """lower_order_final=False to sigma 0: from step 0 the last step is order 2 (refused: diffusers' NaN), but
    an img2img run that starts at the last step warms up there at order 1, as diffusers does."""
    x = x_T(dtype=torch.float64)
    ref, fast = pair(lower_order_final=False)
    for s in (ref, fast):
        s.set_timesteps(5)
        s.set_begin_index(4)
    want = ref.step(0.3 * x, ref.timesteps[4], x).prev_sample
    assert torch.isfinite(want).all()
    assert_close(fast.step(0.3 * x, fast.timesteps[4], x).prev_sample, want, atol=1e-6, rtol=1e-6,
                 what="begin at the last step")


def test_begin_index_gives_diffusers_results():
    """img2img: set_begin_index(k) after set_timesteps starts the run (warm-up orders, no corrector) at k, as
    diffusers does; a first timestep that is timesteps[k] without begin_index finds k the same way."""
    x = x_T(6)
    for config in (dict(solver_order=3), dict(predict_x0=False, final_sigmas_type="sigma_min")):
        want = trajectory(UniPCMultistepScheduler(**config), x, 10, begin=4)
        got = trajectory(FastUniPCMultistepScheduler(**config), x, 10, begin=4)
        assert len(got) == 6
        for j, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"begin 4 step {j}")
        fast = FastUniPCMultistepScheduler(**config)
        fast.set_timesteps(10)
        xs, xf = [], x
        for j in range(4, 10):
            xf = fast.step(mixture_model(fast, j, xf), fast.timesteps[j], xf).prev_sample
            xs.append(xf)
        assert fast.begin_index is None and fast.step_index == 10
        assert_close(xs[-1], want[-1], atol=2e-5, rtol=2e-5, what="run found from its first timestep")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("config", [dict(), dict(thresholding=True, prediction_type="sample",
                                                 dynamic_thresholding_ratio=0.9, sample_max_value=1.5)],
                         ids=["plain", "thresholding"])
def test_fused_guidance_equals_guidance_done_outside(backend, config):
    """guidance_scale=g with model_output = [uncond; cond] equals diffusers given uncond + g*(cond - uncond), over a
    run (history and corrector included); the samples leave [-1, 1] so thresholding acts."""
    require_backend(backend)
    g = 4.0
    ref, fast = pair(**config)
    fast.backend = backend

    def pair_out(s, j, x):
        e = mixture_model(s, j, x)
        return 1.5 * e, 1.5 * e + 0.3 * torch.tanh(x)

    want = trajectory(ref, x_T(7), model=lambda s, j, x: (lambda u, c: u + g * (c - u))(*pair_out(s, j, x)))
    got = trajectory(fast, x_T(7), model=lambda s, j, x: torch.cat(pair_out(s, j, x)), guidance_scale=g)
    for j, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=3e-5, rtol=3e-5, what=f"guided step {j}")
    with pytest.raises(ValueError, match=r"model_output: with guidance_scale it holds \[uncond; cond\]"):
        fast.set_timesteps(4)
        fast.step(torch.zeros(SHAPE), fast.timesteps[0], torch.zeros(SHAPE), guidance_scale=2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_thresholding_matches_diffusers(backend):
    """Dynamic thresholding of x0 between two kernels (the quantile), with samples far outside [-1, 1]."""
    require_backend(backend)
    config = dict(thresholding=True, prediction_type="sample", dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                  solver_order=3)
    model = lambda s, j, x: 3 * torch.tanh(x) + 0.2  # noqa: E731
    x = 2 * x_T(8)
    want = trajectory(UniPCMultistepScheduler(**config), x, model=model)
    exact = trajectory(UniPCMultistepScheduler(**config), x.double(), model=model, exact=True)
    fast = FastUniPCMultistepScheduler(**config)
    fast.backend = backend
    check_trajectory(trajectory(fast, x, model=model), want, exact, f"thresholding {backend}")


def test_deterministic_seeds_change_nothing():
    """UniPC draws no noise (diffusers' step takes no generator): seeds and set_seeds are accepted, checked, and
    leave every sample bit-equal."""
    x = x_T(9)
    plain = trajectory(FastUniPCMultistepScheduler(), x)
    seeded = FastUniPCMultistepScheduler()
    seeded.set_seeds(3)
    got = trajectory(seeded, x, seeds=torch.tensor([5, 6]))
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    with pytest.raises(TypeError, match="seeds: expected"):
        trajectory(FastUniPCMultistepScheduler(), x, seeds=1.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accuracy_rule(backend, dtype):
    """Error vs diffusers in fp32 at most 2x that of diffusers itself run in the same dtype."""
    require_backend(backend)
    x = x_T(10, (2, 4, 16, 16))
    model = lambda s, j, x: 0.9 * torch.tanh(x.float() * 0.7).to(x.dtype) + 0.05  # noqa: E731
    config = dict(solver_order=3, final_sigmas_type="sigma_min")
    want = trajectory(UniPCMultistepScheduler(**config), x, model=model)[-1]
    naive = trajectory(UniPCMultistepScheduler(**config), x.to(dtype), model=model)[-1]
    fast = FastUniPCMultistepScheduler(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(dtype), model=model)[-1]
    assert got.dtype == dtype
    assert_accuracy_rule(got, naive, want, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_and_strided_inputs(backend):
    require_backend(backend)
    x = x_T(11, (3, 5, 7, 9))
    model = lambda s, j, x: (0.9 * torch.tanh(x) + 0.05).transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    want = trajectory(UniPCMultistepScheduler(solver_order=3), x, model=model)
    fast = FastUniPCMultistepScheduler(solver_order=3)
    fast.backend = backend
    got = trajectory(fast, x.transpose(1, 2).contiguous().transpose(1, 2), model=model)
    assert_close(got[-1], want[-1], atol=1e-4, rtol=1e-5, what=f"{backend} odd shape, strided")


def test_float64_mixed_dtypes_and_autograd_like_diffusers():
    """float64 runs in float64 (to diffusers' float64 run with float64 schedule arithmetic); an fp16 model
    output with an fp32 sample gives fp32 samples; gradients through two steps equal diffusers'."""
    x = x_T(12, dtype=torch.float64)
    exact = trajectory(UniPCMultistepScheduler(solver_order=3), x, exact=True)
    got = trajectory(FastUniPCMultistepScheduler(solver_order=3), x)
    assert got[-1].dtype == torch.float64
    assert_close(got[-1], exact[-1], atol=1e-12, rtol=1e-12, what="float64")
    half = lambda s, j, x: mixture_model(s, j, x).half()  # noqa: E731
    want = trajectory(UniPCMultistepScheduler(), x.float(), model=half)
    mixed = trajectory(FastUniPCMultistepScheduler(), x.float(), model=half)
    exact = trajectory(UniPCMultistepScheduler(), x, model=lambda s, j, x: half(s, j, x.float()).double(), exact=True)
    assert mixed[-1].dtype == want[-1].dtype == torch.float32
    # diffusers rounds sigma_t*model_output to fp16 (a 0-d float32 scalar keeps the fp16 dtype); fastdiff
    # computes in fp32, so it is at least as close to the float64 run of the same (fp16) model outputs
    assert max_err(mixed, exact) <= max_err(want, exact), (max_err(mixed, exact), max_err(want, exact))
    grads = []
    for sched in pair(solver_order=2):
        sched.set_timesteps(6)
        x0 = x_T(13).requires_grad_()
        e = [torch.tanh(x0 * (k + 1)) for k in range(3)]
        xs = x0
        for k in range(3):
            xs = sched.step(e[k], sched.timesteps[k], xs).prev_sample
        (xs**2).sum().backward()
        grads.append(x0.grad)
    assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-5, what="d/d x_T through three steps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_compile_fullgraph_on_the_first_call_after_set_timesteps(dtype):
    """The first three steps traced whole (history growing, the corrector starting), both return forms. Each
    step index is its own graph (the stepper's index is a Python int). float64 runs the torch reference into
    the stepper's history buffers, traced too."""
    torch._dynamo.reset()
    fast = FastUniPCMultistepScheduler(solver_order=3)
    fast.set_timesteps(6)
    step = torch.compile(fast.step, fullgraph=True, backend="aot_eager")
    ref = FastUniPCMultistepScheduler(solver_order=3)
    ref.set_timesteps(6)
    x = xr = x_T(14, dtype=dtype)
    for j in range(3):
        t = fast.timesteps[j]
        x = step(mixture_model(fast, j, x), t, x, return_dict=False)[0] if j != 1 else \
            step(mixture_model(fast, j, x), t, x).prev_sample
        xr = ref.step(mixture_model(ref, j, xr), t, xr).prev_sample
        assert_close(x, xr, atol=1e-6, rtol=1e-6, what=f"compiled step {j}")


def test_same_constructor_attributes_and_state_as_diffusers():
    ours, theirs = (inspect.signature(c.__init__) for c in (FastUniPCMultistepScheduler, UniPCMultistepScheduler))
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    step_params = list(inspect.signature(UniPCMultistepScheduler.step).parameters)
    assert list(inspect.signature(FastUniPCMultistepScheduler.step).parameters)[: len(step_params)] == step_params
    set_params = list(inspect.signature(UniPCMultistepScheduler.set_timesteps).parameters)
    assert list(inspect.signature(FastUniPCMultistepScheduler.set_timesteps).parameters) == set_params
    for config in (dict(), dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),
                   dict(trained_betas=[0.01 * (i + 1) / 10 for i in range(10)], num_train_timesteps=10)):
        ref, fast = pair(**config)
        for name in ("betas", "alphas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t", "sigmas", "timesteps"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), name
        assert (fast.init_noise_sigma, fast.order, len(fast), fast.predict_x0, fast.solver_p) == \
            (ref.init_noise_sigma, ref.order, len(ref), ref.predict_x0, ref.solver_p)
        assert fast.step_index is None and fast.begin_index is None
    ref, fast = pair(solver_order=3)
    x = x_T(15)
    for s in (ref, fast):
        s.set_timesteps(7)
        xs = x
        for j in range(3):
            xs = s.step(mixture_model(s, j, xs), s.timesteps[j], xs).prev_sample
    assert fast.step_index == ref.step_index == 3 and fast.lower_order_nums == ref.lower_order_nums == 3
    assert fast.this_order == ref.this_order == 3
    assert_close(fast.last_sample, ref.last_sample, atol=2e-5, rtol=2e-5, what="last_sample")
    for a, b in zip(fast.model_outputs, ref.model_outputs):  # x0 at t = 999 multiplies rounding by 1/alpha = 157
        assert (a - b).abs().max() <= 2e-4 * b.abs().max(), "model_outputs"


def test_config_round_trips(tmp_path):
    fast = FastUniPCMultistepScheduler.from_config(DPMSolverMultistepScheduler(beta_schedule="scaled_linear").config)
    assert fast.config.beta_schedule == "scaled_linear" and fast.config.solver_type == "bh2"  # DPM's midpoint
    assert FastUniPCMultistepScheduler.from_config(DDIMScheduler(steps_offset=1).config).config.steps_offset == 1
    fast = FastUniPCMultistepScheduler(solver_order=3, disable_corrector=[1], use_karras_sigmas=True)
    fast.save_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(FastUniPCMultistepScheduler.from_pretrained(tmp_path).config) == public(fast.config)
    theirs = UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert theirs.config.solver_order == 3 and theirs.disable_corrector == [1]
    assert isinstance(UniPCMultistepScheduler.from_config(fast.config), UniPCMultistepScheduler)


def test_add_noise_matches_diffusers():
    """diffusers' UniPC noises at the grid point of each timestep (not alphas_cumprod[t]): before set_timesteps,
    after it, and with begin_index."""
    x0, noise = x_T(16), x_T(17)
    for config in (dict(), dict(use_flow_sigmas=True, prediction_type="flow_prediction")):
        ref, fast = pair(**config)
        ts = torch.tensor([999, 500])
        assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what="before set_timesteps")
        for s in (ref, fast):
            s.set_timesteps(10)
        ts = torch.stack([ref.timesteps[2], ref.timesteps[7]])
        assert_close(fast.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), atol=1e-6, rtol=1e-6,
                     what="grid timesteps")
        for s in (ref, fast):
            s.set_begin_index(3)
        assert_close(fast.add_noise(x0, noise, ts[:1]), ref.add_noise(x0, noise, ts[:1]), atol=1e-6, rtol=1e-6,
                     what="begin_index")


def test_plans_are_built_in_set_timesteps_and_kept_bounded():
    """set_timesteps builds the run's plan; a second run on the same grid reuses it (no rebuild); new guidance
    scales and grids build more, at most MAX_PLANS kept; assigning disable_corrector rebuilds (diffusers reads it
    every step)."""
    fast = FastUniPCMultistepScheduler()
    fast.set_timesteps(8)
    plan = fast._current[1][0]
    fast.set_timesteps(8)
    assert fast._current[1][0] is plan
    x = x_T(18)
    for k in range(MAX_PLANS + 3):
        fast.set_timesteps(5 + k)
        fast.step(torch.cat([x, x]), fast.timesteps[0], x, guidance_scale=1.0 + k)
    assert len(fast._store) <= MAX_PLANS
    ref, fast = pair(solver_order=2)
    for s in (ref, fast):
        s.set_timesteps(6)
        s.disable_corrector = [1, 2]
    want, got = trajectory(ref, x, 6), trajectory(fast, x, 6)
    assert_close(got[-1], want[-1], atol=2e-5, rtol=2e-5, what="disable_corrector assigned")


def test_bad_input_raises_clearly():
    for kwargs, match in [
        (dict(solver_p=DDIMScheduler()), "solver_p: fastdiff's UniPC fuses its own predictor"),
        (dict(solver_order=4), "solver_order: fastdiff's UniPC fuses orders 1 to 3"),
        (dict(solver_type="rk4"), "solver_type: expected one of"),
        (dict(prediction_type="x0"), "prediction_type: expected one of"),
        (dict(prediction_type="flow_prediction", predict_x0=False), "prediction_type: 'flow_prediction' needs"),
        (dict(use_flow_sigmas=True, use_exponential_sigmas=True), "use_flow_sigmas: not with"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "Only one of"),
        (dict(shift_terminal=0.1), "shift_terminal"),
        (dict(timestep_spacing="quadratic"), "timestep_spacing: expected one of"),
        (dict(final_sigmas_type="max"), "final_sigmas_type: expected one of"),
        (dict(beta_schedule="cubic"), "beta_schedule"),
        (dict(trained_betas=[0.01] * 10), "trained_betas: expected num_train_timesteps=1000 values, got 10"),
    ]:
        with pytest.raises(ValueError, match=match):
            FastUniPCMultistepScheduler(**kwargs)
    fast = FastUniPCMultistepScheduler()
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        fast.step(x, 10, x)
    with pytest.raises(ValueError, match="Passing `sigmas` is only supported"):
        fast.set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
        fast.set_timesteps(0)
    with pytest.raises(ValueError, match="`mu` must be passed"):
        FastUniPCMultistepScheduler(**FLOW, use_dynamic_shifting=True).set_timesteps(5)
    refused = FastUniPCMultistepScheduler(lower_order_final=False)
    refused.set_timesteps(5)  # a later begin_index may take the run: the step that reads the plan refuses it
    with pytest.raises(ValueError, match="lower_order_final=True.*final_sigmas_type='sigma_min'"):
        refused.step(x, refused.timesteps[0], x)
    fast.set_timesteps(3)
    with pytest.raises(ValueError, match=r"timestep: 500 is not one of this run's timesteps \[999, 666, 333\]"):
        fast.step(x, 500, x)
    for t in fast.timesteps:
        fast.step(x, t, x)
    with pytest.raises(ValueError, match="all 3 steps of this run were taken"):
        fast.step(x, fast.timesteps[-1], x)
    fast.set_timesteps(3)
    with pytest.raises(ValueError, match="e\\[0\\] must have shape"):
        fast.step(torch.zeros(1, 2, 4, 5), 999, x)
