"""IADBScheduler (iterative alpha-(de)blending) against independent oracles: the paper-shaped reference
(Algorithm 4), diffusers' FlowMatchEulerDiscreteScheduler stepped on the mapped grid (s = 1 - alpha,
velocity -D), the exact D of a point mass (sampling ends on the point) and of a Gaussian data distribution
(the exact flow map: the higher-order solvers converge faster than Euler), the blend and the loss in closed
form, every CPU backend, bad inputs."""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from diffusers import FlowMatchEulerDiscreteScheduler

from fastdiff import philox
from fastdiff.integrations.diffusers.iadb import IADBScheduler
from fastdiff.oracle import GaussianMixture
from fastdiff.reference import iadb as paper
from fastdiff.training import iadb as training

SHAPE = (2, 3, 6, 6)
SOLVERS = [("euler", 1), ("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("unipc", 3)]


def model(x, alpha):
    """A smooth stand-in for D(x, alpha); alpha read as the float32 of ``timesteps``."""
    a = float(np.float32(alpha))
    return 0.7 * torch.tanh(x * (1.0 + a)) - 0.3 * x + a


def point_mass_d(x, alpha, x1):
    """The exact D of data delta(x1): x1 - x0 with x0 = (x - alpha*x1)/(1 - alpha)."""
    a = float(alpha)
    return x1.expand_as(x) - (x - a * x1) / (1 - a)


def run(s, x, d, **kw):
    for a in s.timesteps:
        x = s.step(d(x, a), a, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_euler_equals_reference(backend):
    require_backend(backend)
    s = IADBScheduler()
    s.backend = backend
    s.set_timesteps(8)
    assert_close(s.timesteps, torch.arange(8) / 8, atol=0, rtol=0, what="alpha grid")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    assert_close(run(s, x, model), paper.sample_iadb(model, x.double(), 8), atol=2e-5, rtol=2e-5,
                 what=f"Euler, {backend}")


def test_euler_is_rectified_flow_euler():
    """diffusers' FlowMatchEulerDiscreteScheduler on sigmas s = 1 - alpha with the velocity -D."""
    n = 10
    s = IADBScheduler()
    s.set_timesteps(n)
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(sigmas=(1.0 - np.arange(n) / n).tolist())
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for a, t in zip(s.timesteps, flow.timesteps):
        x = s.step(model(x, a), a, x).prev_sample
        y = flow.step(-model(y, a), t, y).prev_sample
        assert_close(x, y, atol=2e-6, rtol=2e-6, what=f"alpha={float(a):.2f}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("solver, order", SOLVERS)
def test_point_mass_ends_on_the_point(backend, solver, order):
    require_backend(backend)
    x1 = torch.rand(1, *SHAPE[1:], generator=torch.Generator().manual_seed(2)) * 2 - 1
    s = IADBScheduler(solver=solver, solver_order=order)
    s.backend = backend
    s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert_close(run(s, x, lambda x, a: point_mass_d(x, a, x1)), x1.expand(SHAPE), atol=2e-5, rtol=0,
                 what=f"{solver}-{order}, {backend}")


def _gaussian_errors(solver, order, steps, m=0.3, sd=0.5):
    """Max error of the end point against the exact flow map x -> m + sd*x (per element, data N(m, sd^2):
    the probability flow of x_a = a*x1 + (1 - a)*x0 is the monotone Gaussian transport), with the exact
    D = E[x1 | x_a] - E[x0 | x_a] from the Gaussian-mixture oracle (one component)."""
    data = GaussianMixture([1.0], torch.full((1, 64), m, dtype=torch.float64), sd)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def d(x, a):
        a = float(a)
        return data.x0(x, a, 1 - a) - data.eps(x, a, 1 - a)

    errs = []
    for n in steps:
        s = IADBScheduler(solver=solver, solver_order=order)
        s.set_timesteps(n)
        errs.append(float((run(s, x, d) - (m + sd * x)).abs().max()))
    return errs


def test_higher_order_converges_faster():
    steps = (4, 8, 16)
    euler = _gaussian_errors("euler", 1, steps)
    assert euler[0] / euler[2] > 3, euler  # first order: ~4x from 4 to 16 steps
    for solver, order in SOLVERS[1:]:
        err = _gaussian_errors(solver, order, steps)
        assert err[2] < euler[2] / 4 and err[0] / err[2] > 8, (solver, order, err, euler)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_noise_blends(backend):
    require_backend(backend)
    g = torch.Generator().manual_seed(5)
    x1, x0 = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    s = IADBScheduler()
    s.backend = backend
    a = torch.tensor([0.1, 0.75])
    assert_close(s.add_noise(x1, x0, a), paper.blend(x1.double(), x0.double(), a.double().view(-1, 1, 1, 1)),
                 atol=1e-6, rtol=1e-6, what="per-sample alpha")
    seeds = philox.sample_seeds(6, SHAPE[0])
    z = philox.randn(seeds, math.prod(SHAPE[1:]), domain=philox.DOMAIN_TRAIN).reshape(SHAPE).double()
    assert_close(training.add_noise(x1, 0.4, seeds=seeds, backend=backend), paper.blend(x1.double(), z, 0.4),
                 atol=2e-6, rtol=2e-6, what="in-kernel noise")
    x_a, x0_out = training.add_noise(x1, 0.4, seeds=seeds, backend=backend, return_noise=True)
    assert_close(x0_out, z, atol=2e-6, rtol=2e-6, what="the noise x0 written by the same pass")
    assert_close(x_a, paper.blend(x1.double(), z, 0.4), atol=2e-6, rtol=2e-6, what="x_a beside its noise")


def test_loss_closed_form():
    g = torch.Generator().manual_seed(7)
    x1, x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g,
                                                                               dtype=torch.float64)
    D = x1 - x0 + 0.1
    numel = math.prod(SHAPE)
    assert training.iadb_loss(D, x1, x0).item() == pytest.approx(0.01 * numel, rel=1e-10)
    assert training.iadb_loss(D, x1, x0, reduction="mean").item() == pytest.approx(0.01, rel=1e-10)


def test_config_round_trip(tmp_path):
    s = IADBScheduler(solver="unipc", solver_order=3, num_inference_steps=16)
    s.save_pretrained(tmp_path)
    t = IADBScheduler.from_pretrained(tmp_path)
    t.set_timesteps()
    assert (t.config.solver, t.config.solver_order, len(t.timesteps)) == ("unipc", 3, 16)


def test_bad_inputs():
    x = torch.zeros(SHAPE)
    s = IADBScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 0.0, x)
    s.set_timesteps(4)
    with pytest.raises(TypeError, match="model_output: expected a tensor D"):
        s.step((x, x), 0.0, x)
    with pytest.raises(ValueError, match="model_output: expected shape"):
        s.step(x[:1], 0.0, x)
    with pytest.raises(ValueError, match="timestep: 0.1 is not on this run's grid"):
        s.step(x, 0.1, x)
    with pytest.raises(ValueError, match="timestep: expected one timestep"):
        s.step(x, torch.zeros(2), x)
    for a in s.timesteps:
        s.step(x, a, x)
    with pytest.raises(ValueError, match="all were taken"):
        s.step(x, 0.75, x)
    with pytest.raises(ValueError, match="solver: expected one of"):
        IADBScheduler(solver="heun")
    with pytest.raises(ValueError, match="solver_order: expected 1, 2 or 3"):
        IADBScheduler(solver_order=4)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="alpha: expected values in"):
        s.add_noise(x, x, -0.5)
    with pytest.raises(ValueError, match="reduction"):
        training.iadb_loss(x, x, x, reduction="max")
