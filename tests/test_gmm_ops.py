"""ops.gmm_noise and ops.gmm_score on every backend, against oracles written here: the float64 formula
x = mu_k + s_k z with the components and normals of the Philox contract (philox.uniform/categorical/randn),
chi-square and moment tests of the draws, a finite-difference gradient of a float64 log-density, and
closed forms."""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, assert_close, require_backend

from fastdiff import ops, philox

K = 3
WEIGHTS = [0.2, 0.3, 0.5]
LOW = [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)]  # dtype, unit roundoff (rel. error of one rounding)


def mixture(D: int, seed: int = 0, k: int = K, constant: bool = False):
    """(weights, means, stds) float32 with well-separated means; `constant`: [K] tables."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(WEIGHTS if k == K else [1.0 / k] * k)
    cols = 1 if constant else D
    mu = 3.0 * torch.arange(k, dtype=torch.float32)[:, None] + 0.5 * torch.randn(k, cols, generator=g)
    s = 0.5 + torch.rand(k, cols, generator=g)
    return (w, mu[:, 0], s[:, 0]) if constant else (w, mu, s)


def expected_noise(mu, s, z, ids, shape, per):
    """float64 numpy x[n, i] = mu[k, i] + s[k, i] z[n, i], k = the id of element i's draw."""
    B, D = shape[0], math.prod(shape[1:])
    ids = ids.reshape(B, -1).cpu().numpy()
    k = np.repeat(ids, D // ids.shape[1], axis=1)
    mu = np.broadcast_to(mu.double().reshape(K, -1).numpy(), (K, D))
    s = np.broadcast_to(s.double().reshape(K, -1).numpy(), (K, D))
    cols = np.arange(D)[None, :]
    x = mu[k, cols] + s[k, cols] * z.double().reshape(B, D).cpu().numpy()
    return torch.from_numpy(x).reshape(shape)


def contract_ids(seeds, weights, n_draws, shape, step=0):
    """The components the Philox contract gives: inverse CDF on philox.uniform (DOMAIN_CATEGORICAL)."""
    u = philox.uniform(seeds, n_draws, step=step, domain=philox.DOMAIN_CATEGORICAL)
    return philox.categorical(u, weights).reshape(shape)


def ids_shape(shape, per):
    return {"sample": shape[:1], "channel": shape[:2], "element": shape}[per]


# ------------------------------------------------------------------------------------------- gmm_noise

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per", ["sample", "channel", "element"])
@pytest.mark.parametrize("constant", [False, True])
def test_noise_given_draws_is_the_formula(device, backend, per, constant):
    require_backend(backend, device)
    shape = (3, 5, 7)  # D = 35: no multiple of 4 or of a block
    w, mu, s = mixture(35, constant=constant)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=g)
    ids = torch.randint(0, K, ids_shape(shape, per), generator=g)
    x, k = ops.gmm_noise(w.to(device), mu.to(device), s.to(device), shape, per=per, noise=z.to(device),
                         component=ids.to(device), backend=backend)
    assert k is not None and torch.equal(k.cpu(), ids)
    assert x.shape == shape and x.dtype == torch.float32
    assert_close(x, expected_noise(mu, s, z, ids, shape, per), atol=1e-6, rtol=1e-6, what=f"{backend} {per}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per", ["sample", "channel", "element"])
def test_noise_seeded_draws_the_contract(device, backend, per):
    """Components exactly those of philox.categorical(philox.uniform(...)), values to 1e-6 of the float64
    formula on philox.randn(..., DOMAIN_TRAIN): every backend draws the same numbers."""
    require_backend(backend, device)
    shape, step = (4, 3, 9, 7), 5  # D = 189
    D = math.prod(shape[1:])
    w, mu, s = mixture(D)
    seeds = philox.sample_seeds(11, shape[0])
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), shape, per=per, seeds=seeds.to(device), step=step,
                         backend=backend)
    n_draws = {"sample": 1, "channel": shape[1], "element": D}[per]
    want = contract_ids(seeds, w, n_draws, ids_shape(shape, per), step)
    assert k.dtype == torch.int64 and torch.equal(k.cpu(), want), f"{backend} {per}: components differ"
    assert len(set(want.flatten().tolist())) > 1 or per == "sample"
    z = philox.randn(seeds, D, step=step, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)
    assert_close(x, expected_noise(mu, s, z, want, shape, per), atol=2e-6, rtol=2e-6, what=f"{backend} {per}")
    # an int seed means philox.sample_seeds(seed, B)
    x2, k2 = ops.gmm_noise(w, mu.to(device), s.to(device), shape, per=per, seeds=11, step=step, backend=backend)
    assert torch.equal(x2, x) and torch.equal(k2, k)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per", ["sample", "channel", "element"])
def test_noise_long_rows(device, backend, per):
    """Rows longer than a CPU task (4096) and a Triton block, channels of 4999 elements (tasks and blocks
    start inside a draw): still exactly the contract's draws."""
    require_backend(backend, device)
    shape = (2, 3, 4999)
    D = math.prod(shape[1:])
    w, mu, s = mixture(D, seed=12)
    seeds = philox.sample_seeds(13, 2)
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), shape, per=per, seeds=seeds.to(device), backend=backend)
    n_draws = {"sample": 1, "channel": 3, "element": D}[per]
    want = contract_ids(seeds, w, n_draws, ids_shape(shape, per))
    assert torch.equal(k.cpu(), want)
    z = philox.randn(seeds, D, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)
    assert_close(x, expected_noise(mu, s, z, want, shape, per), atol=2e-6, rtol=2e-6, what=f"{backend} {per}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per", ["sample", "channel", "element"])
def test_noise_ids_out_of_range(device, backend, per):
    """Given ids outside [0, K) are refused on every backend (the CPU kernel counts them as it reads)."""
    require_backend(backend, device)
    shape = (2, 3, 5)
    w, mu, s = mixture(15)
    ids = torch.zeros(ids_shape(shape, per), dtype=torch.int64)
    for bad in (K, -1):
        ids.view(-1)[-1] = bad
        with pytest.raises(ValueError, match=r"component ids must lie in \[0, 3\) \(K components\), got min"):
            ops.gmm_noise(w, mu.to(device), s.to(device), shape, per=per, noise=torch.zeros(shape, device=device),
                          component=ids.to(device), backend=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per", ["channel", "element"])
def test_noise_batch_independence(device, backend, per):
    require_backend(backend, device)
    shape = (5, 2, 33)
    w, mu, s = mixture(66)
    seeds = philox.sample_seeds(3, 5).to(device)
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), shape, per=per, seeds=seeds, backend=backend)
    x1, k1 = ops.gmm_noise(w, mu.to(device), s.to(device), (1, 2, 33), per=per, seeds=seeds[3:4], backend=backend)
    assert torch.equal(x[3:4], x1) and torch.equal(k[3:4], k1)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_noise_partial_draws(device, backend):
    """Given noise with drawn components, and given components with drawn noise."""
    require_backend(backend, device)
    shape = (3, 2, 10)
    w, mu, s = mixture(20)
    seeds = philox.sample_seeds(7, 3)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), shape, per="channel", seeds=seeds.to(device),
                         noise=z.to(device), backend=backend)
    want = contract_ids(seeds, w, 2, shape[:2])
    assert torch.equal(k.cpu(), want)
    assert_close(x, expected_noise(mu, s, z, want, shape, "channel"), atol=1e-6, rtol=1e-6, what="given noise")
    ids = torch.tensor([0, 2, 1])
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), shape, seeds=seeds.to(device), component=ids.to(device),
                         backend=backend)
    z = philox.randn(seeds, 20, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)
    assert_close(x, expected_noise(mu, s, z, ids, shape, "sample"), atol=2e-6, rtol=2e-6, what="given ids")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noise_statistics(backend):
    """Over 16384 per-element draws (K = 3, constant tables): the component counts pass a chi-square test
    against the weights (statistic < 18.42, the 1e-4 upper quantile of chi2 with 2 degrees of freedom), and
    within each component the sample mean and std match mu_k and s_k within 5 standard errors."""
    require_backend(backend)
    w, mu, s = mixture(1, constant=True)
    x, k = ops.gmm_noise(w, mu, s, (4, 4096), per="element", seeds=2024, backend=backend)
    n = k.numel()
    counts = torch.bincount(k.flatten(), minlength=K).double()
    expected = n * w.double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.42, f"{backend}: chi-square {chi2:.2f} for counts {counts.tolist()} (weights {WEIGHTS})"
    for c in range(K):
        xs = x[k == c].double()
        m = xs.numel()
        assert abs(float(xs.mean()) - float(mu[c])) < 5 * float(s[c]) / math.sqrt(m), f"mean of component {c}"
        assert abs(float(xs.std()) - float(s[c])) < 5 * float(s[c]) / math.sqrt(2 * m), f"std of component {c}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype,unit", LOW)
def test_noise_low_precision(device, backend, dtype, unit):
    """fp16/bf16 storage: x is the float64 formula rounded once (error <= 2 unit roundoffs), same ids."""
    require_backend(backend, device)
    shape = (3, 4, 11)
    w, mu, s = mixture(44)
    seeds = philox.sample_seeds(5, 3)
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), shape, per="element", seeds=seeds.to(device),
                         dtype=dtype, backend=backend)
    assert x.dtype == dtype
    want = contract_ids(seeds, w, 44, shape)
    assert torch.equal(k.cpu(), want)
    z = philox.randn(seeds, 44, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)
    assert_close(x, expected_noise(mu, s, z, want, shape, "element"), atol=1e-5, rtol=2 * unit, what=str(dtype))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_noise_empty(device, backend):
    require_backend(backend, device)
    w, mu, s = mixture(6)
    x, k = ops.gmm_noise(w, mu.to(device), s.to(device), (0, 2, 3), per="channel", seeds=1, backend=backend)
    assert x.shape == (0, 2, 3) and k.shape == (0, 2)


def test_noise_float64_and_autograd():
    """float64 runs the reference in float64; means that require grad get d x / d mu = 1 at the drawn k."""
    w, mu, s = mixture(8)
    z = torch.randn(2, 8, dtype=torch.float64)
    ids = torch.tensor([1, 2])
    x, _ = ops.gmm_noise(w, mu.double(), s.double(), (2, 8), noise=z, component=ids, dtype=torch.float64)
    assert x.dtype == torch.float64
    assert_close(x, expected_noise(mu, s, z, ids, (2, 8), "sample"), atol=1e-12, rtol=1e-12, what="float64")
    m = mu.clone().requires_grad_(True)
    x, _ = ops.gmm_noise(w, m, s, (2, 8), noise=z.float(), component=ids)
    x.sum().backward()
    assert m.grad[0].eq(0).all() and m.grad[1].eq(1).all() and m.grad[2].eq(1).all()


# ------------------------------------------------------------------------------------------- gmm_score

def log_density64(x, w, mu, s):
    """float64 log p(x) of the mixture, written from the densities (numpy, stable log-sum-exp)."""
    x, w, mu, s = (np.asarray(t.detach().cpu(), dtype=np.float64) for t in (x, w, mu, s))
    D = x.shape[1]
    mu, s = np.broadcast_to(mu.reshape(len(w), -1), (len(w), D)), np.broadcast_to(s.reshape(len(w), -1), (len(w), D))
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    lk = logw[None] + (-0.5 * (((x[:, None, :] - mu[None]) / s[None]) ** 2) - np.log(s[None])
                       - 0.5 * math.log(2 * math.pi)).sum(-1)
    m = lk.max(1, keepdims=True)
    return (m + np.log(np.exp(lk - m).sum(1, keepdims=True)))[:, 0]


def fd_score(x, w, mu, s, h=1e-5):
    """Central finite differences of log_density64: the independent oracle of the score."""
    x = np.asarray(x.detach().cpu(), dtype=np.float64)
    out = np.zeros_like(x)
    for i in range(x.shape[1]):
        e = np.zeros_like(x)
        e[:, i] = h
        t = torch.from_numpy
        out[:, i] = (log_density64(t(x + e), w, mu, s) - log_density64(t(x - e), w, mu, s)) / (2 * h)
    return torch.from_numpy(out)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("constant", [False, True])
def test_score_is_the_gradient_of_log_p(device, backend, constant):
    require_backend(backend, device)
    D = 13
    w, mu, s = mixture(D, seed=3, constant=constant)
    x = 1.5 + 2.0 * torch.randn(6, D, generator=torch.Generator().manual_seed(4))  # between the components
    score, lp = ops.gmm_score(x.to(device), w, mu.to(device), s.to(device), log_prob=True, backend=backend)
    assert score.shape == x.shape and lp.shape == (6,) and lp.dtype == torch.float32
    want = fd_score(x, w, mu, s)
    assert_close(score, want, atol=1e-4, rtol=1e-4, what=f"{backend} score")
    assert_close(lp, torch.from_numpy(log_density64(x, w, mu, s)), atol=1e-4, rtol=1e-5, what=f"{backend} log p")
    assert float(want.abs().max()) > 1.0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_score_far_from_every_component(device, backend):
    """x ~1e3 standard deviations away: every exp(l_k) underflows, the log-sum-exp must not (finite, exact)."""
    require_backend(backend, device)
    D = 24
    w, mu, s = mixture(D, seed=5)
    x = torch.full((3, D), 1.0e3)
    x[1] = -2.0e3
    x[2, ::2] = -1.5e3
    score, lp = ops.gmm_score(x.reshape(3, 4, 6).to(device), w, mu.to(device), s.to(device), log_prob=True,
                              backend=backend)
    assert score.shape == (3, 4, 6) and bool(score.isfinite().all()) and bool(lp.isfinite().all())
    assert_close(lp, torch.from_numpy(log_density64(x, w, mu, s)), atol=0, rtol=1e-5, what="log p")
    assert_close(score.reshape(3, D), fd_score(x, w, mu, s, h=1e-3), atol=1e-2, rtol=1e-4, what="score")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_score_single_component(device, backend):
    """K = 1: score = (mu - x)/s^2 and log p = the Gaussian's log-density."""
    require_backend(backend, device)
    g = torch.Generator().manual_seed(6)
    x, mu, s = torch.randn(5, 17, generator=g), torch.randn(1, 17, generator=g), 0.3 + torch.rand(1, 17, generator=g)
    score, lp = ops.gmm_score(x.to(device), torch.ones(1), mu.to(device), s.to(device), log_prob=True,
                              backend=backend)
    x64, mu64, s64 = x.double(), mu.double(), s.double()
    assert_close(score, (mu64 - x64) / s64**2, atol=1e-5, rtol=1e-5, what="score")
    gauss = (-0.5 * ((x64 - mu64) / s64) ** 2 - torch.log(s64) - 0.5 * math.log(2 * math.pi)).sum(1)
    assert_close(lp, gauss, atol=1e-4, rtol=1e-5, what="log p")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype,unit", LOW)
def test_score_low_precision(device, backend, dtype, unit):
    """fp16/bf16 x: the score of the stored x, rounded once (<= 2 unit roundoffs of the largest value)."""
    require_backend(backend, device)
    D = 20
    w, mu, s = mixture(D, seed=7)
    x = (1.5 + torch.randn(4, D, generator=torch.Generator().manual_seed(8))).to(dtype)
    score, lp = ops.gmm_score(x.to(device), w, mu.to(device), s.to(device), log_prob=True, backend=backend)
    assert score.dtype == dtype and lp.dtype == torch.float32
    want = fd_score(x.double(), w, mu, s)
    assert_close(score, want, atol=2 * unit * float(want.abs().max()), rtol=0, what=str(dtype))
    assert_close(lp, torch.from_numpy(log_density64(x.double(), w, mu, s)), atol=1e-3, rtol=1e-5, what="log p")


def test_score_float64_and_autograd():
    w, mu, s = mixture(9, seed=9)
    x = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 2.0
    score = ops.gmm_score(x, w, mu, s)
    assert score.dtype == torch.float64
    assert_close(score, fd_score(x, w, mu, s, h=1e-6), atol=1e-7, rtol=1e-7, what="float64")
    xg = x.float().requires_grad_(True)
    _, lp = ops.gmm_score(xg, w, mu, s, log_prob=True)
    (g,) = torch.autograd.grad(lp.sum(), xg)  # the reference is differentiable: grad log p = score
    assert_close(g, fd_score(x.float(), w, mu, s), atol=1e-4, rtol=1e-4, what="autograd")


# ------------------------------------------------------------------------------------ compile and errors

def test_compile_fullgraph():
    torch._dynamo.reset()
    w, mu, s = mixture(12, seed=10)
    x = torch.randn(3, 12)
    seeds = philox.sample_seeds(1, 3)

    def both(x, seeds):
        xn, k = ops.gmm_noise(w, mu, s, (3, 2, 6), per="channel", seeds=seeds)
        return ops.gmm_score(x, w, mu, s, log_prob=True), xn, k

    (score, lp), xn, k = torch.compile(both, fullgraph=True)(x, seeds)
    assert_close(score, fd_score(x, w, mu, s), atol=1e-4, rtol=1e-4, what="compiled score")
    assert_close(lp, torch.from_numpy(log_density64(x, w, mu, s)), atol=1e-4, rtol=1e-5, what="compiled log p")
    want = contract_ids(seeds, w, 2, (3, 2))
    assert torch.equal(k, want)
    z = philox.randn(seeds, 12, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)
    assert_close(xn, expected_noise(mu, s, z, want, (3, 2, 6), "channel"), atol=2e-6, rtol=2e-6, what="compiled x")


def test_custom_ops_opcheck():
    w, mu, s = mixture(8, seed=11)
    torch.library.opcheck(torch.ops.fastdiff.gmm_score.default, (torch.randn(2, 8), w, mu, s, ""))
    torch.library.opcheck(torch.ops.fastdiff.gmm_noise.default,
                          (w, mu, s, [2, 8], "element", philox.sample_seeds(0, 2), 0, None, None, torch.float32, ""))


def _bad(**kw):
    w, mu, s = mixture(6)
    args = dict(weights=w, means=mu, stds=s, shape=(2, 6), seeds=1)
    args.update(kw)
    return lambda: ops.gmm_noise(args.pop("weights"), args.pop("means"), args.pop("stds"), args.pop("shape"), **args)


@pytest.mark.parametrize("kw,err,match", [
    (dict(weights=torch.tensor([0.5, 0.3, 0.1])), ValueError, r"weights must sum to 1 .*got sum 0\.9"),
    (dict(weights=torch.tensor([1.2, -0.2, 0.0])), ValueError, "weights must be finite and non-negative"),
    (dict(weights=torch.ones(3, 1) / 3), ValueError, r"weights must be 1-D \[K\]"),
    (dict(stds=-torch.ones(3, 6)), ValueError, "stds must be > 0"),
    (dict(means=torch.zeros(2, 6)), ValueError, r"means must have shape \[K, D\] = \[3, 6\].*got \(2, 6\)"),
    (dict(stds=torch.ones(3, 5)), ValueError, r"stds must have shape \[K, D\] = \[3, 6\].*got \(3, 5\)"),
    (dict(shape=(2, 7)), ValueError, r"means must have shape \[K, D\] = \[3, 7\]"),
    (dict(per="pixel"), ValueError, r"per must be one of \('sample', 'channel', 'element'\), got 'pixel'"),
    (dict(per="channel", shape=(2,)), ValueError, r"per='channel' needs shape \(B, C, \.\.\.\)"),
    (dict(seeds=torch.arange(3)), ValueError, r"seeds: expected one seed per sample \(2\), got 3"),
    (dict(seeds=None, noise=torch.zeros(2, 6)), ValueError, "seeds are needed to draw the component"),
    (dict(seeds=None), ValueError, "seeds are needed to draw the noise and component"),
    (dict(noise=torch.zeros(2, 5)), ValueError, r"noise must have shape \(2, 6\), got \(2, 5\)"),
    (dict(component=torch.tensor([[0], [1]])), ValueError, r"component must have shape \(2,\), got \(2, 1\)"),
    (dict(component=torch.tensor([0, 3])), ValueError, r"component ids must lie in \[0, 3\).*max 3"),
    (dict(component=torch.tensor([0.0, 1.0])), TypeError, "component must be an int64 tensor, got torch.float32"),
    (dict(dtype=torch.int32), TypeError, "storage dtype must be float32, float16, bfloat16 or float64"),
])
def test_noise_bad_inputs(kw, err, match):
    with pytest.raises(err, match=match):
        _bad(**kw)()


def test_score_bad_inputs():
    w, mu, s = mixture(6)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"gmm_score: weights must sum to 1"):
        ops.gmm_score(x, torch.tensor([0.5, 0.5, 0.5]), mu, s)
    with pytest.raises(ValueError, match=r"gmm_score: means must have shape \[K, D\] = \[3, 6\].*got \(3, 4\)"):
        ops.gmm_score(x, w, mu[:, :4], s)
    with pytest.raises(ValueError, match=r"gmm_score: stds must be > 0"):
        ops.gmm_score(x, w, mu, torch.zeros(3))
    with pytest.raises(ValueError, match=r"gmm_score: x must be \[B, D\]"):
        ops.gmm_score(torch.randn(6), w, mu, s)
    with pytest.raises(TypeError, match=r"gmm_score: x must be a torch.Tensor, got list"):
        ops.gmm_score([1.0] * 6, w, mu, s)
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested but cannot run here"):
        ops.gmm_score(x, w, mu, s, backend="cuda")

