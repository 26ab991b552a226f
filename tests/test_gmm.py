"""fastdiff.gmm.GaussianMixture against independent oracles: log_prob against a float64 closed form written
here (far-away points included), score against central finite differences of log_prob, EM against a known
mixture drawn here (and against the likelihood of the true parameters), sampling against the Philox
contract and torch's generator draws written out here, plus chi-square / moment statistics and bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from scipy import stats

from fastdiff import philox
from fastdiff.gmm import GaussianMixture

# A well-separated 2-D mixture (means >= 6 stds apart) with float32-exact parameters.
TRUE_W = [0.2, 0.5, 0.3]
TRUE_MU = [[-6.0, 0.0], [0.0, 5.0], [6.0, -2.0]]
TRUE_SD = [[1.0, 0.5], [0.75, 1.25], [0.5, 0.875]]
CHI2_P = 1e-4  # the p-value below which a frequency test fails (a correct sampler fails 1 run in 10^4)


def true_mixture():
    return GaussianMixture(TRUE_W, TRUE_MU, TRUE_SD)


def draw_mixture(w, mu, sd, n, seed):
    """n points of the mixture drawn with torch (float64): the data the fit gets and its components."""
    g = torch.Generator().manual_seed(seed)
    w, mu, sd = (torch.tensor(v, dtype=torch.float64) for v in (w, mu, sd))
    k = torch.multinomial(w, n, replacement=True, generator=g)
    return mu[k] + sd[k] * torch.randn(n, mu.shape[1], generator=g, dtype=torch.float64), k


def closed_form_log_prob(x, w, mu, sd):
    """log sum_k w_k prod_d N(x_d; mu_kd, sd_kd^2) point by point in Python floats (max-shifted sum)."""
    out = []
    for point in x.tolist():
        logs = [math.log(wk) + sum(-0.5 * ((xd - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
                                   for xd, m, s in zip(point, mk, sk))
                for wk, mk, sk in zip(w, mu, sd) if wk > 0]
        top = max(logs)
        out.append(top + math.log(sum(math.exp(v - top) for v in logs)))
    return torch.tensor(out, dtype=torch.float64)


def random_mixture(k, d, seed):
    """A random mixture with float32-exact means and stds, weights summing to 1 in float64."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(k, generator=g) + 0.1).double()
    w = w / w.sum()
    mu = (3 * torch.randn(k, d, generator=g)).double()
    sd = (0.3 + torch.rand(k, d, generator=g)).double()
    return w, mu, sd


# ---- density -----------------------------------------------------------------------------------------

def test_log_prob_is_the_closed_form_far_away_included():
    w, mu, sd = random_mixture(4, 3, seed=1)
    gm = GaussianMixture(w, mu, sd)
    g = torch.Generator().manual_seed(2)
    near = 3 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    far = torch.tensor([[1e3, -1e3, 0.0], [1e6, 1e6, 1e6], [-1e8, 3.0, 2.0], [0.0, 0.0, 1e12]], dtype=torch.float64)
    x = torch.cat([near, far])
    got = gm.log_prob(x)
    assert got.dtype == torch.float64 and bool(torch.isfinite(got).all())
    assert_close(got, closed_form_log_prob(x, w.tolist(), mu.tolist(), sd.tolist()), atol=1e-10, rtol=1e-12,
                 what="log_prob")
    got32 = gm.log_prob(near.float())
    assert got32.dtype == torch.float32
    assert_close(got32, closed_form_log_prob(near.float().double(), w.tolist(), mu.tolist(), sd.tolist()),
                 atol=1e-4, rtol=1e-6, what="log_prob float32")


def test_responsibilities_are_the_posterior_over_components():
    w, mu, sd = random_mixture(3, 2, seed=3)
    gm = GaussianMixture(w, mu, sd)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # r_k = w_k N_k / p: the one-component closed form minus the mixture's closed form
    logp = closed_form_log_prob(x, w.tolist(), mu.tolist(), sd.tolist())
    expected = torch.stack([closed_form_log_prob(x, [1.0], [mu[j].tolist()], [sd[j].tolist()]) + math.log(w[j])
                            for j in range(3)], 1) - logp[:, None]
    assert_close(gm.responsibilities(x), expected.exp(), atol=1e-12, rtol=1e-10, what="responsibilities")


def finite_difference_score(gm, x, h=1e-5):
    """Central differences of log_prob in float64, one coordinate at a time."""
    cols = []
    for d in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, d] = h
        cols.append((gm.log_prob(x + e) - gm.log_prob(x - e)) / (2 * h))
    return torch.stack(cols, 1)


def test_score_is_the_gradient_of_log_prob_in_float64():
    w, mu, sd = random_mixture(5, 4, seed=5)
    gm = GaussianMixture(w, mu, sd)
    x = 3 * torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    # central differences: truncation h^2 |f'''| / 6 and rounding 1e-16 |log p| / h, both below 1e-6 here
    assert_close(gm.score(x), finite_difference_score(gm, x), atol=1e-6, rtol=1e-6, what="score vs FD")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_score_on_every_backend_in_float32(backend):
    require_backend(backend)
    w, mu, sd = random_mixture(3, 5, seed=7)
    gm = GaussianMixture(w, mu, sd)
    x = 3 * torch.randn(33, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x[0] = 200.0  # far from every component: one component takes r = 1, no 0/0
    got = gm.score(x.float(), backend=backend)
    assert got.dtype == torch.float32 and got.shape == (33, 5)
    # float32 arithmetic on |x| ~ 200 / sd^2 ~ 2000: relative 1e-5
    assert_close(got, finite_difference_score(gm, x), atol=2e-4, rtol=1e-5, what=f"score {backend}")


# ---- EM ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted():
    x, _ = draw_mixture(TRUE_W, TRUE_MU, TRUE_SD, 12000, seed=11)
    return x, GaussianMixture.fit(x, 3, seed=0)


def test_em_recovers_a_known_mixture(fitted):
    x, gm = fitted
    order = gm.means[:, 0].argsort()  # the true means are sorted by their first coordinate
    w, mu, sd = gm.weights[order].double(), gm.means[order].double(), gm.stds[order].double()
    # n = 12000, smallest component 2400 points: weight s.e. 0.005, mean s.e. <= 0.03, std s.e. <= 1.5 %
    assert_close(w, torch.tensor(TRUE_W, dtype=torch.float64), atol=0.02, rtol=0, what="weights")
    assert_close(mu, torch.tensor(TRUE_MU, dtype=torch.float64), atol=0.1, rtol=0, what="means")
    assert_close(sd, torch.tensor(TRUE_SD, dtype=torch.float64), atol=0, rtol=0.06, what="stds")
    assert gm.converged_ and 1 <= gm.n_iter_ <= 200


def test_em_finds_at_least_the_likelihood_of_the_true_parameters(fitted):
    x, gm = fitted
    truth = closed_form_log_prob(x[:3000], TRUE_W, TRUE_MU, TRUE_SD).mean().item()
    at_fit = closed_form_log_prob(x[:3000], gm._weights64.tolist(), gm._means64.tolist(),
                                  gm._stds64.tolist()).mean().item()
    full_truth = true_mixture().log_prob(x.double()).mean().item()
    assert gm.log_likelihood_ >= full_truth - 1e-9  # the MLE beats the truth on its own data
    assert abs(gm.log_prob(x[:3000]).mean().item() - at_fit) < 1e-9 and at_fit > truth - 0.01


def test_em_log_likelihood_never_decreases_and_the_fit_is_deterministic(fitted):
    x, gm = fitted
    hist = torch.tensor(gm.log_likelihood_history_)
    assert len(hist) == gm.n_iter_ + 1 and bool((hist.diff() >= -1e-12).all()), hist
    again = GaussianMixture.fit(x, 3, seed=0)
    assert torch.equal(again.means, gm.means) and torch.equal(again.stds, gm.stds)
    assert again.log_likelihood_history_ == gm.log_likelihood_history_


def test_em_overlapping_components_never_decrease_and_respect_the_floor():
    x, _ = draw_mixture([0.5, 0.5], [[0.0, 0.0, 0.0], [1.0, 0.5, 0.0]], [[1.0, 1.0, 1.0]] * 2, 2000, seed=12)
    x[:, 2] = 3.0  # a constant column: its variance is the floor
    gm = GaussianMixture.fit(x, 4, seed=3, min_std=1e-3, tol=0.0, iters=40)
    hist = torch.tensor(gm.log_likelihood_history_)
    assert bool((hist.diff() >= -1e-12).all()), hist
    assert gm.n_iter_ == 40 and not gm.converged_
    assert_close(gm.stds[:, 2], torch.full((4,), 1e-3), atol=0, rtol=1e-6, what="floored std")
    assert abs(gm.weights.double().sum().item() - 1) < 1e-6


def test_em_one_component_is_the_sample_moments():
    x, _ = draw_mixture([1.0], [[1.0, -2.0]], [[2.0, 0.5]], 500, seed=13)
    gm = GaussianMixture.fit(x, 1)
    assert_close(gm._means64[0], x.mean(0), atol=1e-12, rtol=0, what="mean")
    assert_close(gm._stds64[0], x.std(0, unbiased=False), atol=1e-12, rtol=1e-12, what="std")


# ---- sampling ----------------------------------------------------------------------------------------

def check_mixture_statistics(x, comp, what):
    """Component frequencies (chi-square vs the weights) and per-component mean/std (5 standard errors)."""
    n = comp.shape[0]
    counts = torch.bincount(comp, minlength=3).numpy()
    assert stats.chisquare(counts, np.array(TRUE_W) * n).pvalue > CHI2_P, (what, counts)
    for j in range(3):
        xs = x[comp == j].double()
        m = xs.shape[0]
        sd = torch.tensor(TRUE_SD[j], dtype=torch.float64)
        assert bool(((xs.mean(0) - torch.tensor(TRUE_MU[j])).abs() < 5 * sd / math.sqrt(m)).all()), (what, j)
        assert bool(((xs.std(0) / sd - 1).abs() < 5 / math.sqrt(2 * m)).all()), (what, j)


def test_seeded_samples_are_the_philox_contract_and_the_right_mixture():
    gm, n = true_mixture(), 20000
    x, comp = gm.sample(n, seeds=5, return_components=True)
    expected, expected_comp = philox_contract(philox.sample_seeds(5, n), TRUE_W, TRUE_MU, TRUE_SD, 2)
    assert torch.equal(comp, expected_comp)
    assert_close(x, expected, atol=1e-5, rtol=1e-5, what="seeded sample")
    check_mixture_statistics(x, comp, "seeds")


def philox_contract(keys, w, mu, sd, dim):
    """The seeded draw written out: component by inverse CDF on the categorical-domain uniform, normals of
    the training domain, x = mu_k + sd_k z (float64)."""
    u = philox.uniform(keys, 1, domain=philox.DOMAIN_CATEGORICAL)[:, 0]
    k = philox.categorical(u, w)
    z = philox.randn(keys, dim, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)
    mu, sd = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sd, dtype=torch.float64)
    return mu[k] + sd[k] * z, k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_samples_on_every_backend_and_dtype(backend, dtype):
    require_backend(backend)
    w, mu, sd = random_mixture(4, 7, seed=14)
    gm, n = GaussianMixture(w, mu, sd), 37
    keys = philox.sample_seeds(2, n)
    expected, k = philox_contract(keys, w, mu, sd, 7)
    x, comp = gm.sample(n, seeds=keys, return_components=True, dtype=dtype, backend=backend)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert x.dtype == dtype and torch.equal(comp, k)
    assert_close(x, expected, atol=tol, rtol=tol, what=f"seeded {backend} {dtype}")
    x, comp = gm.sample(n, generator=torch.Generator().manual_seed(1), return_components=True, dtype=dtype,
                        backend=backend)
    g = torch.Generator().manual_seed(1)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    z = torch.randn(n, 7, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(comp, k)
    assert_close(x, mu[k] + sd[k] * z.double(), atol=tol, rtol=tol, what=f"generator {backend} {dtype}")


def test_seeds_reproduce_each_sample_whatever_the_batch():
    gm = true_mixture()
    big = gm.sample(12, seeds=9)
    assert torch.equal(gm.sample(5, seeds=9), big[:5])
    keys = philox.sample_seeds(9, 12)
    assert torch.equal(gm.sample(1, seeds=keys[7:8]), big[7:8])
    assert torch.equal(gm.sample(3, seeds=[int(keys[4]), int(keys[0]), int(keys[4])]), big[[4, 0, 4]])


def test_generator_samples_are_multinomial_and_randn_of_that_generator():
    gm, n = true_mixture(), 20000
    x, comp = gm.sample(n, generator=torch.Generator().manual_seed(3), return_components=True)
    g = torch.Generator().manual_seed(3)
    k = torch.multinomial(torch.tensor(TRUE_W, dtype=torch.float64), n, replacement=True, generator=g)
    z = torch.randn(n, 2, generator=g)
    mu, sd = torch.tensor(TRUE_MU), torch.tensor(TRUE_SD)
    assert torch.equal(comp, k)
    assert_close(x, mu[k] + sd[k] * z, atol=1e-6, rtol=1e-6, what="generator sample")
    again = gm.sample(n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, x)
    check_mixture_statistics(x, comp, "generator")
    torch.manual_seed(0)
    first = gm.sample(4)
    torch.manual_seed(0)
    assert torch.equal(gm.sample(4), first) and first.shape == (4, 2)


def test_low_precision_and_empty_inputs():
    gm = true_mixture()
    x = (3 * torch.randn(16, 2, generator=torch.Generator().manual_seed(15))).half()
    got = gm.score(x)
    assert got.dtype == torch.float16
    # fp16 storage of the result: 2**-11 relative, float32 arithmetic inside
    assert_close(got, finite_difference_score(gm, x.double()), atol=1e-2, rtol=2e-3, what="score fp16")
    assert gm.log_prob(x).dtype == torch.float32
    assert gm.sample(0).shape == (0, 2) and gm.sample(0, seeds=1).shape == (0, 2)
    assert gm.log_prob(torch.zeros(0, 2)).shape == (0,) and gm.score(torch.zeros(0, 2)).shape == (0, 2)


# ---- misc and bad input ------------------------------------------------------------------------------

def test_properties_repr_and_to():
    gm = true_mixture()
    assert (gm.k, gm.dim) == (3, 2) and gm.means.dtype == torch.float32 and gm.weights.shape == (3,)
    assert "GaussianMixture(k=3, dim=2" in repr(gm)
    moved = gm.to("cpu")
    assert torch.equal(moved.means, gm.means) and moved is not gm


BAD = [
    (dict(weights=[0.5, 0.6, 0.3]), ValueError, r"weights: expected a sum of 1"),
    (dict(weights=[-0.2, 0.9, 0.3]), ValueError, r"weights: expected non-negative"),
    (dict(stds=[[1.0, 0.5], [0.75, -1.0], [0.5, 0.875]]), ValueError, r"stds: expected values > 0"),
    (dict(stds=[[1.0, 0.5], [0.75, 0.0], [0.5, 0.875]]), ValueError, r"stds: expected values > 0"),
    (dict(weights=[0.5, 0.5]), ValueError, r"means: expected K = 2 rows"),
    (dict(stds=[[1.0, 0.5, 1.0]] * 3), ValueError, r"stds: expected shape \(3, 2\)"),
    (dict(means=[0.0, 1.0, 2.0]), ValueError, r"means: expected 2 dimensions"),
    (dict(means=[[0.0, float("nan")]] * 3), ValueError, r"means: expected finite values"),
    (dict(weights="abc"), TypeError, r"weights: expected a tensor or an array-like"),
]


@pytest.mark.parametrize("change,err,match", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_mixtures_are_refused_naming_the_argument(change, err, match):
    args = dict(weights=TRUE_W, means=TRUE_MU, stds=TRUE_SD) | change
    with pytest.raises(err, match=match):
        GaussianMixture(**args)


def test_bad_fits_and_queries_are_refused_naming_the_argument():
    x = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k: expected at most the number of features \(10\), got 11"):
        GaussianMixture.fit(x, 11)
    with pytest.raises(ValueError, match=r"k: expected an int >= 1, got 0"):
        GaussianMixture.fit(x, 0)
    with pytest.raises(ValueError, match=r"features: expected 2 dimensions, got shape \(10,\)"):
        GaussianMixture.fit(x[:, 0], 2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"features: expected finite values"):
        GaussianMixture.fit(bad, 2)
    with pytest.raises(ValueError, match=r"min_std: expected > 0"):
        GaussianMixture.fit(x, 2, min_std=0.0)
    gm = true_mixture()
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 2\], got \(4, 3\)"):
        gm.log_prob(torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        gm.log_prob(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"n: expected an int >= 0"):
        gm.sample(-1)
    with pytest.raises(ValueError, match=r"seeds, generator: expected at most one"):
        gm.sample(2, seeds=1, generator=torch.Generator())
