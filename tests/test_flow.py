"""FastFlowMatchEulerDiscreteScheduler against diffusers' FlowMatchEulerDiscreteScheduler (0.42) as the
oracle: whole trajectories over the config and set_timesteps options (the same generator noise), every
backend for two configs, low precision under the accuracy rule, odd shapes and strides, mixed dtypes,
float64, autograd, seeds, begin_index, fused guidance, torch.compile, scale_noise, bad input; the
paper-shaped reference in float64 (diffusers' own float64 run rounds the sample to float32 each step, so
the reference is the float64 oracle here), Euler's first order on the Gaussian-mixture oracle's exact flow,
and the stochastic step's marginal."""

import inspect
import math

import diffusers.schedulers.scheduling_flow_match_euler_discrete as diffusers_flow
import noise_capture
import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, DEVICES, assert_accuracy_rule, assert_close, require_backend
from diffusers import FlowMatchEulerDiscreteScheduler
from test_ddim import check_trajectory

from fastdiff.integrations.diffusers.flow import FastFlowMatchEulerDiscreteScheduler as FastFlow
from fastdiff.oracle import GaussianMixture, default_mixture, ode_solution
from fastdiff.philox import randn, sample_seeds
from fastdiff.reference import flow as paper

Flow = FlowMatchEulerDiscreteScheduler
VARIANTS = {  # config, set_timesteps arguments
    "default": (dict(), dict(num_inference_steps=8)),
    "shift3": (dict(shift=3.0), dict(num_inference_steps=8)),
    "dynamic-exponential": (dict(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2, base_image_seq_len=128,
                                 max_image_seq_len=2048), dict(num_inference_steps=8, mu=0.9)),
    "dynamic-linear-terminal": (dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1),
                                dict(num_inference_steps=8, mu=1.5)),
    "karras": (dict(use_karras_sigmas=True, shift=2.0), dict(num_inference_steps=8)),
    "exponential": (dict(use_exponential_sigmas=True), dict(num_inference_steps=8)),
    "beta": (dict(use_beta_sigmas=True, shift=3.0), dict(num_inference_steps=8)),
    "invert": (dict(invert_sigmas=True), dict(num_inference_steps=8)),
    "stochastic": (dict(stochastic_sampling=True, shift=3.0), dict(num_inference_steps=8)),
    "custom-sigmas": (dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
    "custom-timesteps": (dict(shift=3.0), dict(timesteps=[1000.0, 800.0, 500.0, 200.0])),
    "custom-both-stochastic": (dict(stochastic_sampling=True), dict(timesteps=[1000.0, 700.0, 300.0],
                                                                    sigmas=[1.0, 0.7, 0.3])),
}


def model(x, t):
    """A smooth stand-in for a velocity network."""
    return (0.9 * torch.tanh(x.float() * (1.0 + float(t) / 1000.0)) - 0.3 * x.float()).to(x.dtype) + 0.05


def diffusers_noise(noises=None):
    return noise_capture.diffusers_noise(diffusers_flow, noises)


def trajectory(scheduler, x, set_kw, device=None, **step_kw):
    scheduler.set_timesteps(**set_kw, device=device)
    xs = []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.cpu()), t, x, **step_kw).prev_sample
        xs.append(x)
    return xs


def reference(sigmas, x, noises=None):
    """The float64 oracle: Euler steps of ``fastdiff.reference.flow`` over the grid, one list entry a step."""
    xs, s = [], sigmas.double().cpu()
    for i in range(len(s) - 1):
        x = paper.euler_step(x, model(x, 1000 * s[i].float()), s[i], s[i + 1],
                             None if noises is None else noises[i].double())
        xs.append(x)
    return xs


def runs(config, set_kw, device="cpu", backend="cpu", x=None, seed=0):
    """(ours fp32, diffusers fp32, float64 reference) from the same start and noise (ours and diffusers draw
    from generators seeded alike; the reference is fed diffusers' draws)."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) if x is None else x
    ref = Flow(**config)
    with diffusers_noise() as drawn:
        want = trajectory(ref, x, set_kw, generator=torch.Generator().manual_seed(1))
    exact = reference(ref.sigmas, x.double(), drawn if config.get("stochastic_sampling") else None)
    fast = FastFlow(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(device), set_kw, device=device, generator=torch.Generator(device).manual_seed(1))
    assert torch.equal(fast.sigmas.cpu(), ref.sigmas) and torch.equal(fast.timesteps.cpu(), ref.timesteps)
    return got, want, exact


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trajectory_matches_diffusers(name):
    """Every grid option (shift, dynamic shifting with mu, both time-shift types, shift_terminal, Karras /
    exponential / beta sigmas, invert_sigmas, custom sigmas/timesteps) and stochastic sampling: the same
    sigmas and timesteps bit for bit, steps against diffusers' fp32 run and the float64 reference."""
    check_trajectory(*runs(*VARIANTS[name]), "prev_sample")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", ["shift3", "stochastic"])
def test_trajectory_on_every_backend(device, backend, name):
    require_backend(backend, device)
    config, set_kw = VARIANTS[name]
    if device == "cpu":
        check_trajectory(*runs(config, set_kw, device, backend), "prev_sample")
    else:  # a CUDA generator draws other numbers than a CPU one: compare with diffusers on CUDA
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
        want = trajectory(Flow(**config), x, set_kw, device, generator=torch.Generator(device).manual_seed(1))
        fast = FastFlow(**config)
        fast.backend = backend
        got = trajectory(fast, x, set_kw, device, generator=torch.Generator(device).manual_seed(1))
        assert_close(got[-1], want[-1], atol=1e-5, rtol=1e-5, what=f"{device} {backend}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_low_precision_accuracy_rule(backend, dtype, stochastic):
    """Error vs diffusers in fp32 at most 2x that of diffusers run in the same dtype (same generator)."""
    require_backend(backend)
    config = dict(shift=3.0, stochastic_sampling=stochastic)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want = trajectory(Flow(**config), x, dict(num_inference_steps=8), generator=torch.Generator().manual_seed(2))
    naive = trajectory(Flow(**config), x.to(dtype), dict(num_inference_steps=8),
                       generator=torch.Generator().manual_seed(2))
    fast = FastFlow(**config)
    fast.backend = backend
    got = trajectory(fast, x.to(dtype), dict(num_inference_steps=8), generator=torch.Generator().manual_seed(2))
    assert got[-1].dtype == dtype == naive[-1].dtype
    assert_accuracy_rule(got[-1], naive[-1], want[-1], what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shape_strided_and_mixed_dtypes(backend):
    """Odd shapes and non-contiguous inputs; an fp16 model output with an fp32 sample gives fp16, as diffusers
    (which computes in fp32 and returns the model output's dtype)."""
    require_backend(backend)
    x = torch.randn(3, 5, 19, 17, generator=torch.Generator().manual_seed(2)).transpose(2, 3)
    assert not x.is_contiguous()
    got, want, _ = runs(dict(shift=3.0), dict(num_inference_steps=6), backend=backend, x=x)
    assert_close(got[-1], want[-1], atol=1e-5, rtol=1e-5, what=f"{backend} odd shape")
    outs = []
    for s in (Flow(), FastFlow()):
        s.backend = backend
        s.set_timesteps(4)
        t = s.timesteps[1]
        s.set_begin_index(1)
        outs.append(s.step(model(x, t).half(), t, x).prev_sample)
    assert outs[1].dtype == outs[0].dtype == torch.float16
    assert_close(outs[1], outs[0], atol=1e-3, rtol=1e-3, what="mixed dtypes")


def test_float64_and_autograd_like_diffusers():
    """float64 inputs run in float64 (diffusers rounds the sample to float32 first, hence 1e-6); gradients
    equal diffusers'."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for config in (dict(shift=3.0), dict(stochastic_sampling=True)):
        want = trajectory(Flow(**config), x, dict(num_inference_steps=6), generator=torch.Generator().manual_seed(3))
        got = trajectory(FastFlow(**config), x, dict(num_inference_steps=6), generator=torch.Generator().manual_seed(3))
        assert got[-1].dtype == torch.float64
        assert_close(got[-1], want[-1], atol=1e-6, rtol=1e-6, what=f"float64 {config}")
        grads = []
        for s in (Flow(**config), FastFlow(**config)):
            s.set_timesteps(6)
            xs, out = x.float().clone().requires_grad_(), model(x.float(), 500).requires_grad_()
            step = s.step(out, s.timesteps[0], xs, generator=torch.Generator().manual_seed(4))
            (step.prev_sample**2).sum().backward()
            grads.append((xs.grad, out.grad))
        assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5, what="d/d sample")
        assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5, what="d/d model_output")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeds_and_begin_index(backend):
    """stochastic_sampling with seeds: the noise of step k is the Philox stream of step k (equal to diffusers
    fed that noise; a sample's noise whatever its batch); set_begin_index(k) starts the counter at k."""
    require_backend(backend)
    seeds = sample_seeds(11, 3)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    stream = [randn(seeds, 4 * 64, step=k).reshape(3, 4, 8, 8) for k in range(6)]
    config = dict(stochastic_sampling=True, shift=3.0)
    with diffusers_noise(stream):
        want = trajectory(Flow(**config), x, dict(num_inference_steps=6))
    fast = FastFlow(**config)
    fast.backend = backend
    got = trajectory(fast, x, dict(num_inference_steps=6), seeds=seeds)
    assert_close(got[-1], want[-1], atol=2e-5, rtol=2e-5, what=f"{backend} seeds")
    fast.set_seeds(seeds[1:2])
    alone = trajectory(fast, x[1:2], dict(num_inference_steps=6))
    assert torch.equal(alone[-1][0], got[-1][1])
    fast.set_seeds(None)
    ref = Flow(**config)
    for s in (ref, fast):
        s.set_timesteps(6)
        s.set_begin_index(3)
    t = fast.timesteps[3]
    got = fast.step(model(x, t), t, x, seeds=seeds).prev_sample
    with diffusers_noise([stream[3]]):
        want = ref.step(model(x, t), t, x).prev_sample
    assert fast.step_index == ref.step_index == 4
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="begin_index noise counter")


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_fused_guidance_equals_guidance_done_outside(device, backend, stochastic):
    require_backend(backend, device)
    ref, fast = Flow(shift=3.0, stochastic_sampling=stochastic), FastFlow(shift=3.0, stochastic_sampling=stochastic)
    fast.backend = backend
    ref.set_timesteps(4)
    fast.set_timesteps(4, device=device)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    for t in ref.timesteps:
        u, c = model(x, t), model(-0.5 * x, t)
        want = ref.step(u + 4.5 * (c - u), t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        got = fast.step(torch.cat([u, c]).to(device), t.to(device), x.to(device), guidance_scale=4.5,
                        generator=torch.Generator(device).manual_seed(int(t))).prev_sample
        if device == "cpu" or not stochastic:
            assert_close(got, want, atol=2e-5, rtol=2e-5, what=f"guided t={float(t)}")
        x = want


def test_torch_compile_fullgraph_on_the_first_call_after_set_timesteps():
    x = torch.randn(2, 4, 4, 4)
    for config, kw in ((dict(shift=3.0), {}), (dict(stochastic_sampling=True), dict(seeds=3))):
        fast, eager = FastFlow(**config), FastFlow(**config)
        for s in (fast, eager):
            s.set_timesteps(4)
        step = torch.compile(fast.step, fullgraph=True, backend="aot_eager")
        for t in fast.timesteps[:2]:
            got = step(model(x, t), t, x, return_dict=False, **kw)
            assert_close(got[0], eager.step(model(x, t), t, x, **kw).prev_sample, atol=1e-6, rtol=1e-6,
                         what=f"compiled {config}")
        torch._dynamo.reset()


def test_euler_is_first_order_on_the_exact_flow():
    """Euler's global error on the Gaussian-mixture oracle's exact flow halves when the steps double
    (ratio in [1.6, 2.4] from 8 to 16 to 32 steps). The exact solution: x_s = (1 - s) y with y the VP
    probability-flow ODE's scaled sample at rho = s/(1 - s) (``fastdiff.oracle.ode_solution``); the model
    is the exact velocity E[eps - x0 | x_s]."""
    base = default_mixture((2, 4, 4), k=4)
    data = GaussianMixture(base.weights, base.means, 0.3 + base.stds)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s0 = 0.9
    rho0 = s0 / (1 - s0)
    abar0 = 1 / (1 + rho0**2)
    exact = ode_solution(data, x / (1 - s0) * math.sqrt(abar0), abar0)

    def velocity(x, t):
        s = float(t) / 1000
        return (data.eps(x.double(), 1 - s, s) - data.x0(x.double(), 1 - s, s)).float()

    errs = []
    for n in (8, 16, 32):
        fast = FastFlow()
        fast.set_timesteps(sigmas=np.linspace(s0, s0 / n, n).tolist())
        xs = x.float()
        for t in fast.timesteps:
            xs = fast.step(velocity(xs, t), t, xs).prev_sample
        errs.append((xs.double() - exact).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(1.6 <= r <= 2.4 for r in ratios), (errs, ratios)


def test_stochastic_step_keeps_the_marginal():
    """stochastic_sampling given the true velocity of a known (x0, eps) pair: x0 = x - s*u is exact and
    x_next = (1 - s_next) x0 + s_next z ~ N((1 - s_next) x0, s_next^2): the standardized residual of 8192
    elements has mean within 5/sqrt(n) of 0 and variance within 5*sqrt(2/n) of 1."""
    fast = FastFlow(stochastic_sampling=True, shift=3.0)
    fast.set_timesteps(6)
    fast.set_begin_index(2)
    s, s_next = fast.sigmas[2].double(), fast.sigmas[3].double()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 8, 8, 8, generator=g), torch.randn(16, 8, 8, 8, generator=g)
    x = paper.scale_noise(x0, eps, s.float())
    out = fast.step(eps - x0, fast.timesteps[2], x, seeds=sample_seeds(4, 16)).prev_sample.double()
    r = ((out - (1 - s_next) * x0.double()) / s_next).flatten()
    n = r.numel()
    assert abs(r.mean().item()) < 5 / n**0.5 and abs(r.var().item() - 1) < 5 * (2 / n) ** 0.5, (r.mean(), r.var())


def test_scale_noise_matches_diffusers():
    """The forward process x_s = (1 - s) x0 + s noise at the step index of each timestep (found in the grid,
    or begin_index / the step index when set), against diffusers and the closed form."""
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ref, fast = Flow(shift=3.0), FastFlow(shift=3.0)
    for s in (ref, fast):
        s.set_timesteps(10)
    ts = ref.timesteps[[0, 4, 9]]
    want = ref.scale_noise(x0, ts, noise)
    assert_close(fast.scale_noise(x0, ts, noise), want, atol=1e-6, rtol=1e-6, what="scale_noise per sample")
    sig = ref.sigmas[[0, 4, 9]].view(3, 1, 1, 1)
    assert_close(want, paper.scale_noise(x0, noise, sig), atol=1e-6, rtol=1e-6, what="closed form")
    for s in (ref, fast):
        s.set_begin_index(6)
    for _ in range(2):
        assert_close(fast.scale_noise(x0, ts[:1], noise), ref.scale_noise(x0, ts[:1], noise), atol=1e-6, rtol=1e-6,
                     what="scale_noise at begin_index / step_index")
        for s in (ref, fast):
            s.step(model(x0, s.timesteps[6]), s.timesteps[6], x0)
    with pytest.raises(ValueError, match="noise: scale_noise needs the noise tensor"):
        fast.scale_noise(x0, ts)


def test_same_constructor_attributes_and_config_round_trips(tmp_path):
    ours, theirs = inspect.signature(FastFlow.__init__), inspect.signature(Flow.__init__)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    step_params = list(inspect.signature(Flow.step).parameters)
    assert list(inspect.signature(FastFlow.step).parameters)[: len(step_params)] == step_params
    for config in (dict(), dict(shift=3.0), dict(use_dynamic_shifting=True)):
        ref, fast = Flow(**config), FastFlow(**config)
        public = [{k for k in vars(s) if not k.startswith("_")} for s in (ref, fast)]
        assert public[1] == public[0] and fast.backend is None  # backend: a property of the drop-ins
        for name in ("timesteps", "sigmas"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (config, name)
        assert (fast.sigma_min, fast.sigma_max, fast.shift, fast.step_index, fast.begin_index, len(fast)) == \
            (ref.sigma_min, ref.sigma_max, ref.shift, ref.step_index, ref.begin_index, len(ref))
        for s in (ref, fast):
            s.set_shift(2.0)
            s.set_timesteps(5, mu=0.7)
        assert torch.equal(fast.sigmas, ref.sigmas) and fast.num_inference_steps == ref.num_inference_steps
    for name in ("add_noise", "get_velocity", "alphas_cumprod", "init_noise_sigma"):
        assert hasattr(Flow(), name) == hasattr(FastFlow(), name), name
    fast = FastFlow.from_config(Flow(shift=3.0, use_beta_sigmas=True).config)
    assert fast.config.shift == 3.0 and fast.config.use_beta_sigmas
    fast.save_pretrained(tmp_path)
    assert Flow.from_pretrained(tmp_path).config.use_beta_sigmas


def test_assigned_sigmas_are_honoured():
    """sigmas assigned (or changed in place) after set_timesteps are the ones the next step uses, as in
    diffusers (which reads sigmas[step_index] at each step)."""
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (Flow(), FastFlow()):
        s.set_timesteps(4)
        s.sigmas = s.sigmas * 0.9
        x1 = s.step(model(x, s.timesteps[0]), s.timesteps[0], x).prev_sample
        s.sigmas[2] = 0.3
        outs.append(s.step(model(x1, s.timesteps[1]), s.timesteps[1], x1).prev_sample)
    assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6, what="assigned sigmas")


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match="only one of them"):
        FastFlow(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="time_shift_type: expected one of"):
        FastFlow(time_shift_type="quadratic")
    fast = FastFlow(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu: `mu` must be passed"):
        fast.set_timesteps(4)
    fast = FastFlow()
    with pytest.raises(ValueError, match="should have the same length"):
        fast.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    with pytest.raises(ValueError, match="should have the same length as num_inference_steps"):
        fast.set_timesteps(3, sigmas=[1.0, 0.5])
    fast.set_timesteps(2)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="timestep: passing integer indices"):
        fast.step(x, 0, x)
    with pytest.raises(ValueError, match="timestep: passing integer indices"):
        fast.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="per_token_timesteps: per-token sigmas"):
        fast.step(x, fast.timesteps[0], x, per_token_timesteps=torch.ones(1, 16))
    with pytest.raises(ValueError, match="timestep: 123.0 is not one of this run's timesteps"):
        fast.step(x, 123.0, x)
    fast.set_timesteps(2)
    for t in fast.timesteps:
        fast.step(x, t, x)
    with pytest.raises(ValueError, match="step: the run has 2 steps and all were taken"):
        fast.step(x, fast.timesteps[-1], x)
    with pytest.raises(ValueError, match=r"model_output: with guidance_scale it holds \[uncond; cond\]"):
        fast.set_timesteps(2)
        fast.step(x, fast.timesteps[0], x, guidance_scale=2.0)
