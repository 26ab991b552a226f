"""DDIM-GMM (Gabbur, arXiv 2311.04938): the step's defining property (per-element mean = DDIM's mean and
variance = sigma_t^2 where no variance is clipped, over 24k draws), the offsets' constraints (sum pi_k delta_k = 0,
ORTHO's Gram matrix, RAND's mean norm, diag Delta_k), the component draws (chi-square), the step against the
paper-shaped reference with the same components and noise (every CPU backend, fp32 and float64), ORTHO_VUB,
offset_scale = 0 against diffusers' DDIM, seeds and bad input."""

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from diffusers import DDIMScheduler
from scipy import stats

from fastdiff import philox
from fastdiff.integrations.diffusers.ddim_gmm import DDIMGMMScheduler
from fastdiff.reference import ddim_gmm as paper
from fastdiff.samplers.ddim_gmm import build_offsets


def model(x, t):
    return 0.9 * torch.tanh(x * (1.0 + float(t) / 1000.0)) + 0.05


def sigma2(abar_t, abar_prev, eta):
    return eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)


def test_step_keeps_ddim_mean_and_variance_where_nothing_is_clipped():
    """24k draws of one step (eta = 1) from one fixed (x, eps), D = 32, s chosen so that max diag Delta_k is
    half of sigma_t^2 (nothing clipped): the per-element mean is DDIM's mu_t within 5 standard errors
    (sigma_t/sqrt(B)) and the per-element variance sigma_t^2 within 5 standard errors (~sigma_t^2*sqrt(2/B),
    i.e. 4.6%). Without subtracting diag Delta_k the variance would be 1.5*sigma_t^2."""
    B, shape = 24000, (2, 4, 4)
    ref = DDIMScheduler(clip_sample=False)
    ref.set_timesteps(10)
    t, prev = 501, 401
    abar_t, abar_prev = float(ref.alphas_cumprod[t]), float(ref.alphas_cumprod[prev])
    s2 = sigma2(abar_t, abar_prev, 1.0)
    _, unit_var = build_offsets(32, 8, 1.0, "ortho", None, 0)
    scale = float(np.sqrt(0.5 * s2 / float(unit_var.max())))
    s = DDIMGMMScheduler(clip_sample=False, offset_scale=scale)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(1, *shape, generator=g).expand(B, *shape) for _ in range(2))
    out = s.step(eps, t, x, eta=1.0, seeds=philox.sample_seeds(1, B)).prev_sample.double()
    assert float(s.var_table.max()) < s2, "the test needs unclipped variances"
    x0 = (x[0].double() - (1 - abar_t) ** 0.5 * eps[0].double()) / abar_t**0.5
    mu = abar_prev**0.5 * x0 + (1 - abar_prev - s2) ** 0.5 * eps[0].double()
    se = (s2 / B) ** 0.5
    assert float((out.mean(0) - mu).abs().max()) < 5 * se
    assert float((out.var(0) / s2 - 1).abs().max()) < 5 * (2 / B) ** 0.5


@pytest.mark.parametrize("weights", [None, [0.1, 0.2, 0.3, 0.4]])
def test_offsets_satisfy_the_moment_constraints(weights):
    """sum_k pi_k delta_k = 0; diag Delta_k = (1/(K pi_k)) sum_l pi_l delta_l^2; ORTHO: delta delta^T/s^2 =
    (I - 1 pi^T)(I - pi 1^T) (C = U(I - pi 1^T) with orthonormal U); RAND: sum pi_k ||delta_k||^2 = s^2; both
    equal the
    paper-shaped construction from the same O ~ N(0, I)."""
    K, D, s = 4, 40, 2.5
    pi = torch.full((K,), 1 / K, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    noise = torch.randn((D, K), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kind in ("ortho", "rand"):
        delta, var = build_offsets(D, K, s, kind, weights, seed=3)
        assert float((pi @ delta).abs().max()) < 1e-12
        assert_close(var, (pi @ delta**2)[None, :] / (K * pi[:, None]), atol=1e-14, rtol=1e-12, what="diag Delta")
        want_delta, want_var = paper.gmm_offsets(noise, pi, s, ortho=kind == "ortho")
        assert_close(delta, want_delta, atol=1e-12, rtol=1e-10, what=f"{kind} delta")
        assert_close(var, want_var, atol=1e-12, rtol=1e-10, what=f"{kind} var")
        if kind == "ortho":
            P = torch.eye(K, dtype=torch.float64) - pi[:, None] * torch.ones(K, dtype=torch.float64)[None, :]
            assert_close(delta @ delta.T / s**2, P.T @ P, atol=1e-12, rtol=0, what="ORTHO Gram")
        else:
            assert abs(float(pi @ delta.norm(dim=1) ** 2) - s**2) < 1e-12, "RAND: pi-weighted mean of ||delta||^2"
            assert float((delta.norm(dim=1) / s - 1).abs().max()) < 0.4, "RAND norms: s within O(1/sqrt(D))"


@pytest.mark.parametrize("draw", ["seeds", "generator"])
def test_component_frequencies_pass_chi_square(draw):
    """eta = 0: x_prev - mu_t = delta_{k_n} exactly (no noise); the nearest offset row gives k_n. 4000 samples
    with pi = (0.1, 0.2, 0.3, 0.4): chi-square against pi, p > 1e-4."""
    pi, B = [0.1, 0.2, 0.3, 0.4], 4000
    s = DDIMGMMScheduler(clip_sample=False, n_components=4, weights=pi, offset_scale=4.0)
    s.set_timesteps(10)
    x, eps = torch.zeros(B, 1, 4, 4), torch.zeros(B, 1, 4, 4)
    kw = {"seeds": philox.sample_seeds(2, B)} if draw == "seeds" else {"generator": torch.Generator().manual_seed(2)}
    out = s.step(eps, 501, x, **kw).prev_sample.reshape(B, -1).double()
    k = torch.cdist(out, s.delta_table).argmin(1)
    counts = np.bincount(k.numpy(), minlength=4)
    assert stats.chisquare(counts, B * np.asarray(pi)).pvalue > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["ortho", "rand", "ortho_vub"])
def test_step_equals_the_reference_with_the_same_draws(kind, backend, dtype):
    """10 steps at eta = 0.6 (ORTHO_VUB: offsets times f_t = min(1, sigma_t/sqrt(max diag Delta)), the variance
    table times f_t^2), s = 3 (variances clipped at some steps): each equals the paper-shaped step given the same
    components (torch.rand from the generator through the inverse CDF) and noise (randn after it)."""
    require_backend(backend)
    pi = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    s = DDIMGMMScheduler(n_components=3, weights=pi.tolist(), offset_scale=3.0, offset_kind=kind)
    s.backend = backend
    s.set_timesteps(10)
    x = torch.randn(4, 2, 3, 5, generator=torch.Generator().manual_seed(4), dtype=dtype)
    abar = s.alphas_cumprod.double()
    g, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in s.timesteps:
        t = int(t)
        got = s.step(model(x, t), t, x, eta=0.6, generator=g).prev_sample
        k = philox.categorical(torch.rand((4, 1), generator=g_ref), pi)[:, 0]
        z = torch.randn(x.shape, generator=g_ref, dtype=dtype)
        prev = abar[t - 100] if t >= 100 else torch.tensor(1.0, dtype=torch.float64)
        delta, var = s.delta_table, s.var_table
        if kind == "ortho_vub":
            f = min(1.0, float(sigma2(abar[t], prev, 0.6)) ** 0.5 / float(var.max()) ** 0.5)
            delta, var = f * delta, f**2 * var
        want = paper.ddim_gmm_step(x.double(), model(x, t).double(), abar[t], prev, k, delta.float().double(),
                                   var.float().double(), 0.6, z.double(), clip=1.0)
        tol = 2e-5 if dtype == torch.float32 else 1e-7  # the tables are float32 in every dtype
        atol = tol
        if kind == "ortho_vub" and dtype == torch.float32:  # VUB puts the largest variance at exactly 0, where
            # sqrt turns float32's rounding of VAR - var (eps32*VAR) into sqrt(eps32*VAR) in the noise std
            atol += 2 * (2**-23 * float(sigma2(abar[t], prev, 0.6))) ** 0.5 * float(z.abs().max())
        assert_close(got, want, atol=atol, rtol=tol, what=f"{kind} step t={t} ({backend}, {dtype})")
        x = got


@pytest.mark.parametrize("kw", [dict(offset_scale=0.0, eta=0.5), dict(offset_kind="ortho_vub", eta=0.0)])
def test_without_offsets_it_is_diffusers_ddim(kw):
    """offset_scale = 0, and ORTHO_VUB at eta = 0 (f_t = 0): diffusers' DDIM trajectory (same generator)."""
    eta = kw.pop("eta")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    runs = []
    for s in (DDIMScheduler(), DDIMGMMScheduler(**kw)):
        s.set_timesteps(10)
        g, y = torch.Generator().manual_seed(7), x
        for t in s.timesteps:
            y = s.step(model(y, t), t, y, eta=eta, generator=g).prev_sample
        runs.append(y)
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5, what=str(kw))


def test_config_round_trip(tmp_path):
    s = DDIMGMMScheduler(n_components=3, weights=[0.2, 0.3, 0.5], offset_kind="rand", offset_scale=2.0)
    s.save_pretrained(tmp_path)
    r = DDIMGMMScheduler.from_pretrained(tmp_path)
    assert (r.config.offset_kind, r.config.offset_scale, list(r.config.weights)) == ("rand", 2.0, [0.2, 0.3, 0.5])
    assert DDIMGMMScheduler.from_config(DDIMScheduler().config).config.offset_kind == "ortho"


def test_seeds_reproduce_each_sample_across_batch_sizes():
    seeds = philox.sample_seeds(8, 3)

    def run(sd):
        s = DDIMGMMScheduler(offset_scale=2.0)
        s.set_timesteps(5)
        x = philox.randn(sd, 32, domain=philox.DOMAIN_INIT).reshape(len(sd), 2, 4, 4)
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, eta=0.5, seeds=sd).prev_sample
        return x

    assert_close(run(seeds)[2:], run(seeds[2:]), atol=1e-6, rtol=1e-6, what="per-sample seeds")


@pytest.mark.parametrize("kw,match", [
    (dict(n_components=3, weights=[0.5, 0.3, 0.3]), "weights: expected weights summing to 1"),
    (dict(n_components=3, weights=[0.5, 0.5]), "weights: expected 3 weights"),
    (dict(offset_kind="orthogonal"), "offset_kind: expected one of"),
    (dict(offset_scale=-1.0), "offset_scale: expected a finite value >= 0"),
    (dict(n_components=0), "n_components: expected an int >= 1"),
])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        DDIMGMMScheduler(**kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage(dtype):
    """fp16/bf16 storage, one eta = 1 step with given components and noise: the fused step's error against the
    float64 reference is at most twice that of the reference run in the same dtype (the accuracy rule)."""
    s = DDIMGMMScheduler(offset_scale=3.0)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 2, 8, 8, generator=g)
    t, abar = 501, s.alphas_cumprod.double()
    gen, gen_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = s.step(model(x, t).to(dtype), t, x.to(dtype), eta=1.0, generator=gen).prev_sample
    kk = philox.categorical(torch.rand((4, 1), generator=gen_ref), [1 / 8] * 8)[:, 0]
    zz = torch.randn(x.shape, generator=gen_ref, dtype=dtype)
    args = (x.to(dtype), model(x, t).to(dtype), abar[t], abar[t - 100], kk)
    exact = paper.ddim_gmm_step(*(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args),
                                s.delta_table.float().double(), s.var_table.float().double(), 1.0, zz.double(),
                                clip=1.0)
    same = paper.ddim_gmm_step(*args[:2], float(abar[t]), float(abar[t - 100]), kk, s.delta_table.to(dtype),
                               s.var_table.to(dtype), 1.0, zz, clip=1.0)
    err, err_same = float((got.double() - exact).abs().max()), float((same.double() - exact).abs().max())
    assert err <= 2 * err_same + 1e-6, (err, err_same)
