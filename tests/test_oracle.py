"""The Gaussian-mixture oracle against independent oracles: autograd of an explicit torch.distributions
density, closed-form Gaussian posteriors and PF-ODE flows, Monte Carlo and quadrature of E[eps | x_t], the
1-D monotone transport (CDF) map, diffusers' DDIM at many steps, and a PNG decoder written with zlib."""

import math
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import assert_close

from fastdiff.oracle import (
    GaussianMixture,
    default_alphas_cumprod,
    default_mixture,
    ode_solution,
    to_image_grid,
    write_png,
)

F64 = torch.float64


def small_mixture(shape=(3, 4, 5)):
    means = 0.5 * torch.randn(3, *shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    return GaussianMixture(torch.tensor([0.2, 0.5, 0.3]), means, torch.tensor([0.1, 0.3, 0.2], dtype=F64))


def mixture_1d():
    """Three well-separated 1-D components (nearest-mean assignment is right for all but ~1e-6 of draws)."""
    means = torch.tensor([[-2.0], [0.5], [2.5]], dtype=F64)
    return GaussianMixture(torch.tensor([0.2, 0.5, 0.3]), means, torch.tensor([0.15, 0.2, 0.1], dtype=F64))


def explicit_log_prob(m, x, a, s):
    """log p_t by torch.distributions: sum_k pi_k N(a mu_k, (a^2 s_k^2 + s^2) I), no code shared with oracle."""
    a, s = torch.as_tensor(a, dtype=F64).reshape(-1, 1, 1), torch.as_tensor(s, dtype=F64).reshape(-1, 1, 1)
    comp = torch.distributions.Independent(torch.distributions.Normal(
        a * m.means.reshape(1, 3, -1), (a**2 * m.stds.reshape(1, 3, 1) ** 2 + s**2).sqrt()), 1)
    return torch.logsumexp(comp.log_prob(x.reshape(x.shape[0], 1, -1)) + m.weights.log(), dim=1)


PER_SAMPLE = (torch.tensor([0.3, 0.9, 0.99, 0.6]), torch.tensor([0.95, 0.44, 0.14, 0.8]))


@pytest.mark.parametrize("a,s", [(0.8, 0.6), (0.05, 0.9987), (1.0, 0.0), PER_SAMPLE])
def test_eps_is_minus_sigma_grad_log_prob(a, s):
    m = small_mixture()
    x = (torch.randn(4, 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.7).requires_grad_()
    lp = explicit_log_prob(m, x, a, s)
    assert_close(m.log_prob(x, a, s), lp, atol=1e-10, rtol=1e-12, what="log_prob")
    (grad,) = torch.autograd.grad(lp.sum(), x)
    sig = torch.as_tensor(s, dtype=F64).reshape(-1, 1, 1, 1)
    assert_close(m.score(x, a, s), grad, atol=1e-9, rtol=1e-10, what="score")
    assert_close(m.eps(x, a, s), -sig * grad, atol=1e-10, rtol=1e-10, what="eps")


def test_single_gaussian_closed_form():
    """K=1: E[eps|x_t] = sigma (x - a mu)/(a^2 s^2 + sigma^2), E[x0|x_t] = mu + a s^2 (x - a mu)/(...);
    the PF-ODE keeps (x_t - alpha_t mu)/sqrt(alpha_t^2 s^2 + sigma_t^2) fixed (ode error measured 3.4e-11)."""
    mu = torch.randn(1, 2, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1)) * 0.5
    s = 0.2
    m = GaussianMixture(torch.ones(1, dtype=F64), mu, s)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, 8, 8, dtype=F64, generator=g)
    a, sg = 0.7, math.sqrt(1 - 0.49)
    var = a**2 * s**2 + sg**2
    assert_close(m.eps(x, a, sg), sg * (x - a * mu) / var, atol=1e-13, rtol=1e-12, what="eps")
    assert_close(m.x0(x, a, sg), mu + a * s**2 * (x - a * mu) / var, atol=1e-13, rtol=1e-12, what="x0")
    for abar_from, abar_to in [(4e-5, 1.0), (0.01, 0.7), (0.3, 0.9999)]:
        af, at = math.sqrt(abar_from), math.sqrt(abar_to)
        x_T = af * mu + math.sqrt(abar_from * s**2 + 1 - abar_from) * torch.randn(5, 2, 8, 8, dtype=F64, generator=g)
        want = at * mu + (x_T - af * mu) * math.sqrt(abar_to * s**2 + 1 - abar_to) / math.sqrt(
            abar_from * s**2 + 1 - abar_from)
        assert_close(ode_solution(m, x_T, abar_from, abar_to), want, atol=1e-9, rtol=0, what=f"ode {abar_from}")


def test_sample_moments():
    """Mean sum pi mu and variance sum pi (s^2 + mu^2) - mean^2 per element, within 5 standard errors."""
    m, n = small_mixture(shape=(6,)), 400_000
    x = m.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 6) and x.dtype == F64
    w = m.weights[:, None]
    mean = (w * m.means).sum(0)
    var = (w * (m.stds[:, None] ** 2 + m.means**2)).sum(0) - mean**2
    c = x - mean
    se_var = ((c**4).mean(0) - var**2).sqrt() / math.sqrt(n)
    assert bool(((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() < 5 * se_var).all()), (x.var(0), var)


def test_eps_1d_monte_carlo_and_quadrature():
    """E[eps | x_t]: (1) Monte Carlo: in each of 25 quantile bins of x_t, mean(eps) = mean(eps_hat(x_t))
    (tower property, no binning bias) within 5 standard errors; (2) quadrature of
    int eps N(eps) sum_k pi_k N(x - s eps; a mu_k, a^2 s_k^2) d eps / p(x) on a fine grid (trapezoid rule,
    spectrally accurate here) to 1e-12 (measured 1.3e-15)."""
    m, a, s, n = mixture_1d(), 0.6, 0.8, 1_000_000
    g = torch.Generator().manual_seed(0)
    x0, eps = m.sample(n, generator=g), torch.randn(n, 1, dtype=F64, generator=g)
    xt = a * x0 + s * eps
    resid = (eps - m.eps(xt, a, s))[:, 0]
    bins = torch.bucketize(xt[:, 0], torch.quantile(xt[::10, 0], torch.linspace(0, 1, 26, dtype=F64)[1:-1]))
    cnt = torch.bincount(bins, minlength=25).double()
    mean = torch.bincount(bins, resid, minlength=25) / cnt
    se = (torch.bincount(bins, resid**2, minlength=25) / cnt - mean**2).clamp_min(0).sqrt() / cnt.sqrt()
    assert bool((mean.abs() < 5 * se).all()), (mean / se)
    e = torch.linspace(-12, 12, 48001, dtype=F64)[None, :, None]
    xs = torch.linspace(-3, 3, 61, dtype=F64)[:, None, None]
    mu, sd = m.means[:, 0], m.stds
    comp = m.weights / sd * torch.exp(-0.5 * ((xs - s * e - a * mu) / (a * sd)) ** 2)
    dens = torch.exp(-0.5 * e**2) * comp.sum(-1, keepdim=True)
    want = (e * dens).sum(1) / dens.sum(1)
    assert_close(m.eps(xs[:, 0], a, s), want, atol=1e-12, rtol=0, what="quadrature")


def test_ode_converges():
    """Uniform RK4: halving the step (512 -> 1024) changes the answer by < 1e-7 (measured <= 3.7e-9, fourth
    order); the adaptive default (tol 1e-8) agrees with 2048 uniform steps to 1e-9 (measured 5e-11 and
    2.9e-10). For an image mixture from diffusers' t=999 and a 1-D mixture with narrow components."""
    abar0 = float(default_alphas_cumprod()[999])
    for m, x_T in [(default_mixture((3, 8, 8), k=5), torch.randn(16, 3, 8, 8, dtype=F64,
                                                                  generator=torch.Generator().manual_seed(5))),
                   (mixture_1d(), torch.linspace(-4, 4, 101, dtype=F64)[:, None])]:
        a, b, c = (ode_solution(m, x_T, abar0, steps=n) for n in (512, 1024, 2048))
        assert_close(a, b, atol=1e-7, rtol=0, what="512 vs 1024 steps")
        assert_close(ode_solution(m, x_T, abar0), c, atol=1e-9, rtol=0, what="adaptive vs 2048 steps")


def test_ode_matches_independent_euler():
    """Plain Euler (= DDIM) in rho on a log grid, stepping y = x/alpha with mixture.eps in x-space (no
    reduction, no w-variable), converges to ode_solution at first order: the error falls ~4x from 500
    to 2000 steps (measured 2.5e-3 -> 6.1e-4)."""
    m, abar0 = default_mixture((3, 8, 8), k=5), 1e-3
    x_T = torch.randn(8, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref, rho0, errs = ode_solution(m, x_T, abar0), math.sqrt((1 - abar0) / abar0), []
    for n in (500, 2000):
        rhos = torch.cat([torch.logspace(math.log10(rho0), -4, n, dtype=F64), torch.zeros(1, dtype=F64)]).tolist()
        y = x_T / math.sqrt(abar0)
        for r0, r1 in zip(rhos[:-1], rhos[1:]):
            a = 1 / math.sqrt(1 + r0**2)
            y = y + (r1 - r0) * m.eps(a * y, a, r0 * a)
        errs.append(float((y - ref).abs().max()))
    assert errs[1] < 2e-3 and 3 < errs[0] / errs[1] < 5, errs


def test_ode_transports_noise_to_data_1d():
    """In 1-D the PF-ODE flow is monotone and maps p_T to p_0, so it is the quantile map:
    F_0(ode(x)) = F_T(x) (exact CDFs; measured 3.8e-11); pushed samples have the weights as component
    proportions within 4 binomial standard errors."""
    m, abar_T = mixture_1d(), 1e-3

    def cdf(x, abar):
        std = (abar * m.stds**2 + 1 - abar).sqrt()
        return (m.weights * torch.special.ndtr((x - math.sqrt(abar) * m.means[:, 0]) / std)).sum(-1)

    x_T = torch.linspace(-3.5, 3.5, 141, dtype=F64)[:, None]
    x_0 = ode_solution(m, x_T, abar_T)
    assert bool((x_0[1:] > x_0[:-1]).all()), "flow map is not monotone"
    assert_close(cdf(x_0, 1.0), cdf(x_T, abar_T), atol=1e-9, rtol=0, what="CDF")
    n = 5000
    g = torch.Generator().manual_seed(2)
    x_T = math.sqrt(abar_T) * m.sample(n, generator=g) + math.sqrt(1 - abar_T) * torch.randn(n, 1, dtype=F64,
                                                                                           generator=g)
    k = (ode_solution(m, x_T, abar_T, steps=128) - m.means[:, 0]).abs().argmin(1)
    frac = torch.bincount(k, minlength=3) / n
    assert bool(((frac - m.weights).abs() < 4 * (m.weights * (1 - m.weights) / n).sqrt()).all()), frac


def test_model_prediction_types():
    """All three outputs satisfy x = alpha x0 + sigma eps and v = alpha eps - sigma x0 with
    alpha = sqrt(abar[t]), sigma = sqrt(1 - abar[t]), for int, 0-d and per-sample timesteps; dtype kept."""
    m = small_mixture()
    x = torch.randn(4, 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(5))
    abar = torch.linspace(0.999, 0.01, 50, dtype=F64)
    for t in [0, 17, torch.tensor(49), torch.tensor([3, 0, 49, 20])]:
        ab = abar[torch.as_tensor(t)].reshape(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        e, v, x0 = (m.model(p, abar)(x, t).sample for p in ("epsilon", "v_prediction", "sample"))
        assert_close(a * x0 + s * e, x, atol=1e-12, rtol=1e-12, what=f"x = a x0 + s eps, t={t}")
        assert_close(v, a * e - s * x0, atol=1e-12, rtol=1e-12, what=f"v, t={t}")
        a, s = (c.flatten() if c.numel() > 1 else float(c) for c in (a, s))
        assert_close(e, m.eps(x, a, s), atol=1e-12, rtol=1e-12, what="eps")
    out = m.model()(x.float(), torch.tensor(999))
    assert out.sample.dtype == torch.float32 and out[0] is out.sample


def test_model_matches_ode_through_diffusers_ddim():
    """diffusers' DDIMScheduler (eta=0, first order) driven by the exact model converges to ode_solution:
    the error falls like 1/N (measured max |err| 0.089 at 50 steps, 0.0116 at 500)."""
    diffusers = pytest.importorskip("diffusers")
    m = default_mixture((3, 8, 8), k=4)
    x_T = torch.randn(8, 3, 8, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    errs = []
    for n in (50, 500):
        sch = diffusers.DDIMScheduler(clip_sample=False)   # the default clips x0 to [-1, 1]: not the ODE
        sch.set_timesteps(n)
        ref = ode_solution(m, x_T.double(), float(sch.alphas_cumprod[sch.timesteps[0]]))
        x, f = x_T.clone(), m.model("epsilon", sch.alphas_cumprod)
        for t in sch.timesteps:
            x = sch.step(f(x, t).sample, t, x).prev_sample
        errs.append((x.double() - ref).abs().max().item())
    assert errs[1] < 0.015 and 6 < errs[0] / errs[1] < 12, errs


def test_default_mixture():
    m = default_mixture()
    assert m.shape == (3, 32, 32) and m.dim == 3072 and len(m.weights) == 8
    assert float(m.means.abs().max()) <= 0.8 + 1e-12 and bool(((m.stds >= 0.05) & (m.stds <= 0.15)).all())
    d = torch.cdist(m.means.reshape(8, -1), m.means.reshape(8, -1)) / math.sqrt(m.dim)
    assert float((d + torch.eye(8)).min()) > 0.1, "component means not visually distinct"
    assert torch.equal(default_mixture(seed=0).means, m.means) and not torch.equal(default_mixture(seed=1).means,
                                                                                   m.means)
    x = m.sample(64, generator=torch.Generator().manual_seed(0))
    assert float((x.abs() <= 1).double().mean()) > 0.98


def test_ode_demo_size_is_fast():
    m = default_mixture()
    x_T = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    x = ode_solution(m, x_T, float(default_alphas_cumprod()[999]))
    assert time.perf_counter() - t0 < 5.0
    assert x.dtype == torch.float32 and float((x.abs() <= 1).double().mean()) > 0.98


@pytest.mark.parametrize("call,arg", [
    (lambda: GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 3), 0.1), "weights"),
    (lambda: GaussianMixture(torch.tensor([1.5, -0.5]), torch.zeros(2, 3), 0.1), "weights"),
    (lambda: GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(3, 3), 0.1), "means"),
    (lambda: GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(2, 3), torch.tensor([0.1, 0.0])), "stds"),
    (lambda: GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(2, 3), torch.ones(3)), "stds"),
    (lambda: GaussianMixture(torch.tensor([0.5, 0.5]), torch.full((2, 3), float("nan")), 0.1), "means"),
    (lambda: small_mixture().eps(torch.zeros(2, 3, 4), 0.5, 0.5), "x"),
    (lambda: small_mixture().eps(torch.zeros(2, 3, 4, 5), torch.ones(3), 0.5), "alpha"),
    (lambda: small_mixture().v(torch.zeros(2, 3, 4, 5), 0.5, -0.1), "sigma"),
    (lambda: small_mixture().model("flow"), "prediction_type"),
    (lambda: small_mixture().model(alphas_cumprod=torch.tensor([0.5, 1.5])), "alphas_cumprod"),
    (lambda: small_mixture().model()(torch.zeros(1, 3, 4, 5), 1000), "timestep"),
    (lambda: ode_solution(small_mixture(), torch.zeros(1, 3, 4, 5), 0.9, 0.5), "abar_from"),
    (lambda: ode_solution(small_mixture(), torch.zeros(1, 3, 4), 0.1), "x_T"),
    (lambda: ode_solution(small_mixture(), torch.full((1, 3, 4, 5), float("inf")), 0.1), "x_T"),
    (lambda: ode_solution(small_mixture(), torch.zeros(1, 3, 4, 5), 0.1, tol=0.0), "tol"),
    (lambda: default_mixture(shape=(32, 32)), "shape"),
    (lambda: to_image_grid(torch.zeros(2, 2, 4, 4)), "x"),
    (lambda: write_png("/dev/null", np.zeros((4, 4, 3), np.float32)), "img"),
])
def test_bad_input(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


def test_png_roundtrip(tmp_path):
    """Decode the file by hand: signature, chunk CRCs, IHDR fields, zlib IDAT rows (filter byte 0)."""
    x = torch.rand(5, 3, 6, 7, dtype=F64) * 2 - 1
    img = to_image_grid(x, nrow=3)
    assert img.shape == (2 * 8 + 2, 3 * 9 + 2, 3) and img.dtype == np.uint8
    assert np.array_equal(img[2:8, 2:9], ((x[0] + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8))
    for arr, ctype in [(img, 2), (img[..., 0], 0)]:
        path = tmp_path / "g.png"
        write_png(path, arr)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        chunks, pos = [], 8
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
            assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
            chunks.append((kind, body))
            pos += 12 + length
        assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
        w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
        assert (w, h, depth, color, comp, filt, interlace) == (arr.shape[1], arr.shape[0], 8, ctype, 0, 0, 0)
        raw = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(h, -1)
        assert (raw[:, 0] == 0).all() and np.array_equal(raw[:, 1:].reshape(arr.shape), arr)
