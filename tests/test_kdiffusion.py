"""The k-diffusion API (fastdiff.integrations.kdiffusion) against k-diffusion's own samplers as the
oracle (same model, same sigmas, same noise through a shared noise sampler), in float32 and float64; the
in-kernel seeds against k-diffusion given that Philox noise; DPM-Solver++(2M)'s second order on the
Gaussian-mixture oracle's exact ODE solution; callbacks, progress bar, bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, assert_close, require_backend

from fastdiff import oracle, philox, schedules
from fastdiff.integrations import kdiffusion as fd
from fastdiff.kdiffusion_oracle import sampling

SAMPLERS = {  # name: (fastdiff function, k-diffusion name, keyword arguments)
    "euler": (fd.sample_euler, "sample_euler", {}),
    "euler_churn": (fd.sample_euler, "sample_euler", {"s_churn": 3.0, "s_tmin": 0.05, "s_tmax": 10.0}),
    "euler_churn_all": (fd.sample_euler, "sample_euler", {"s_churn": 80.0, "s_noise": 1.003}),
    "euler_ancestral": (fd.sample_euler_ancestral, "sample_euler_ancestral", {}),
    "euler_ancestral_eta": (fd.sample_euler_ancestral, "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    "heun": (fd.sample_heun, "sample_heun", {}),
    "heun_churn": (fd.sample_heun, "sample_heun", {"s_churn": 3.0, "s_tmin": 0.05, "s_tmax": 10.0}),
    "dpmpp_2m": (fd.sample_dpmpp_2m, "sample_dpmpp_2m", {}),
    "dpmpp_2m_sde": (fd.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {"eta": 0.8, "s_noise": 0.9}),
    "dpmpp_2m_sde_heun": (fd.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_eta0": (fd.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {"eta": 0.0}),
    "dpmpp_3m_sde": (fd.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", {"eta": 1.0}),
    "dpmpp_3m_sde_eta0": (fd.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", {"eta": 0.0}),
    "dpmpp_sde": (fd.sample_dpmpp_sde, "sample_dpmpp_sde", {"eta": 1.0, "s_noise": 1.1}),
    "dpmpp_sde_r": (fd.sample_dpmpp_sde, "sample_dpmpp_sde", {"eta": 0.5, "r": 0.3}),
}


def noise_args(name, noises):
    """The SDE and ancestral samplers take a noise sampler; Euler's and Heun's churn draws torch.randn_like."""
    torch.manual_seed(5)
    return {"noise_sampler": Recorded(noises)} if "sde" in name or "ancestral" in name else {}


def k_sampling():
    try:
        return sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion's sampling module cannot be loaded: {exc}")


def denoiser(x, sigma):
    """A smooth stand-in for a network: a data prediction that depends on x and sigma."""
    s = sigma.reshape(-1, *[1] * (x.dim() - 1))
    return torch.tanh(x / (1 + s**2) ** 0.5) * 0.8 + 0.05 * s / (1 + s)


class Recorded:
    """A noise sampler handing out pre-drawn tensors in order (one per call), to both samplers."""

    def __init__(self, noises):
        self.noises, self.i = noises, 0

    def __call__(self, sigma, sigma_next):
        self.i += 1
        return self.noises[self.i - 1]


def grid(n=8, dtype=torch.float32):
    sig = schedules.karras_sigmas(0.03, 14.6, n)
    return torch.tensor(np.append(sig, 0.0), dtype=dtype)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_to_k_diffusion_for_the_same_noise(name, dtype):
    ours, theirs, kw = SAMPLERS[name]
    sampler = getattr(k_sampling(), theirs)
    sigmas = grid(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) * 14.6).to(dtype)
    noises = [torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(32)]
    want = sampler(denoiser, x, sigmas, disable=True, **noise_args(name, noises), **kw)
    got = ours(denoiser, x, sigmas, disable=True, **noise_args(name, noises), **kw)
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    assert got.dtype == dtype
    assert_close(got, want, atol=tol, rtol=tol, what=f"{name} {dtype}")


@pytest.mark.parametrize("name", ["euler", "euler_churn_all", "euler_ancestral", "heun", "heun_churn", "dpmpp_2m",
                                  "dpmpp_sde"])
def test_one_step_and_no_step_grids(name):
    """A one-step grid to 0 (Heun: its first call only) equals k-diffusion's; a grid of one sigma takes no step
    and returns x, as k-diffusion's loop does. (k-diffusion's 2M/3M SDE samplers fail on one step: not here.)"""
    ours, theirs, kw = SAMPLERS[name]
    sampler = getattr(k_sampling(), theirs)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    noises = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))]
    one = torch.tensor([14.6, 0.0])
    want = sampler(denoiser, x, one, disable=True, **noise_args(name, noises), **kw)
    got = ours(denoiser, x, one, disable=True, **noise_args(name, noises), **kw)
    assert_close(got, want, atol=2e-5, rtol=2e-5, what=f"{name}, one step")
    assert ours(denoiser, x, torch.tensor([14.6]), disable=True, **kw) is x


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_sde", "euler_ancestral"])
def test_seeds_draw_the_philox_noise(device, backend, name):
    """With seeds the noise is drawn in the kernel: row k of the plan draws Philox step k; k-diffusion given
    that same noise agrees."""
    require_backend(backend, device)
    ours, theirs, kw = SAMPLERS[name]
    sigmas = grid()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 14.6
    seeds = philox.sample_seeds(5, 3)
    rows = 2 * (len(sigmas) - 2) + 1 if name == "dpmpp_sde" else len(sigmas) - 1
    drawn = {k: philox.randn(seeds, 32, step=k).reshape(3, 2, 4, 4) for k in range(rows)}
    order = iter([k for k in range(rows) if name != "dpmpp_sde" or k < rows - 1] if name == "dpmpp_sde"
                 else range(rows))

    def sampler_noise(sigma, sigma_next):
        return drawn[next(order)]

    want = getattr(k_sampling(), theirs)(denoiser, x, sigmas, disable=True, noise_sampler=sampler_noise, **kw)
    got = ours(denoiser, x.to(device), sigmas.to(device), disable=True, seeds=seeds.to(device), backend=backend,
               **kw)
    assert_close(got, want, atol=3e-5, rtol=3e-5, what=f"{name} seeds")


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun"])
def test_second_order_on_the_exact_model(name):
    """Error against the exact probability-flow solution (to sigma_min, where the grid ends without the
    final jump to 0) falls ~4x when the steps double: the slope of log error vs log steps over 8 -> 32
    steps is above 1.7 (second order)."""
    mixture = oracle.default_mixture((2, 4, 4), k=4)
    sigma_max, sigma_min = 10.0, 0.1
    x_T = torch.randn(16, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigma_max
    abar, abar_end = 1 / (1 + sigma_max**2), 1 / (1 + sigma_min**2)
    exact = oracle.ode_solution(mixture, x_T * math.sqrt(abar), abar, abar_end) / math.sqrt(abar_end)

    def model(x, sigma):
        return mixture.x0(x, 1.0, sigma[0].item())

    errs = []
    for n in (8, 16, 32):
        sigmas = torch.tensor(schedules.karras_sigmas(sigma_min, sigma_max, n + 1), dtype=torch.float64)
        errs.append(float((SAMPLERS[name][0](model, x_T, sigmas, disable=True) - exact).abs().max()))
    slope = -np.polyfit(np.log([8, 16, 32]), np.log(errs), 1)[0]
    assert slope > 1.7, f"errors {errs}: slope {slope:.2f}"


def test_callback_and_progress_bar(capsys):
    sigmas = grid(4)
    x = torch.randn(1, 2, 4, 4) * 14.6
    seen = []
    fd.sample_dpmpp_2m_sde(denoiser, x, sigmas, callback=lambda d: seen.append((d["i"], float(d["sigma"]))),
                           disable=False)
    assert [i for i, _ in seen] == [0, 1, 2, 3] and seen[0][1] == pytest.approx(14.6, rel=1e-6)
    assert "4/4" in capsys.readouterr().err


def test_heun_calls_the_model_twice_a_step_and_reports_sigma_hat():
    """Heun: 2 calls a step, 1 into sigma = 0; the callback once a step with k-diffusion's sigma_hat."""
    sigmas = grid(4)
    calls, seen = [], []

    def model(x, sigma):
        calls.append(float(sigma[0]))
        return denoiser(x, sigma)

    fd.sample_heun(model, torch.randn(1, 2, 4, 4) * 14.6, sigmas, disable=True, s_churn=1.0,
                   callback=lambda d: seen.append((d["i"], float(d["sigma_hat"]))))
    gamma = min(1.0 / 4, 2**0.5 - 1)
    hats = [float(s) * (1 + gamma) for s in sigmas[:-1]]
    assert calls == pytest.approx([hats[0], sigmas[1], hats[1], sigmas[2], hats[2], sigmas[3], hats[3]], rel=1e-6)
    assert seen == [(i, pytest.approx(h, rel=1e-6)) for i, h in enumerate(hats)]


def test_bad_input():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="sigmas: expected a 1-D tensor"):
        fd.sample_dpmpp_2m(denoiser, x, torch.tensor(1.0), disable=True)
    with pytest.raises(ValueError, match="sigmas: expected N\\+1 >= 2 positive sigmas"):
        fd.sample_dpmpp_2m(denoiser, x, torch.tensor([1.0, -1.0, 0.0]), disable=True)
    with pytest.raises(ValueError, match="solver_type: expected 'midpoint' or 'heun'"):
        fd.sample_dpmpp_2m_sde(denoiser, x, grid(3), disable=True, solver_type="rk4")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m_sde", "dpmpp_sde", "euler_ancestral", "heun_churn"])
def test_fused_guidance_equals_guidance_in_the_denoiser(name):
    """guidance_scale=g: one model call on [x; x] returning [uncond; cond], mixed in the step, equals
    k-diffusion with a denoiser that mixes them itself (a CFGDenoiser)."""
    ours, theirs, kw = SAMPLERS[name]
    sigmas = grid()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=g) * 14.6
    noises = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(32)]

    def pair(x, sigma):  # [uncond; cond] for a batch stacked as [x; x]
        B = x.shape[0] // 2
        return torch.cat([denoiser(x[:B], sigma[:B]), denoiser(x[B:] * 0.9, sigma[B:]) + 0.1])

    def cfg(x, sigma):
        out = pair(torch.cat([x, x]), torch.cat([sigma, sigma]))
        return out[:2] + 5.0 * (out[2:] - out[:2])

    want = getattr(k_sampling(), theirs)(cfg, x, sigmas, disable=True, **noise_args(name, noises), **kw)
    got = ours(pair, x, sigmas, disable=True, guidance_scale=5.0, **noise_args(name, noises), **kw)
    assert_close(got, want, atol=5e-5, rtol=5e-5, what=f"{name} guided")
