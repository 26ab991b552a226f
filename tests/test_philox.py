"""The Philox4x32-10 + Box-Muller noise: known-answer vectors, Triton's own Philox as a second
implementation, the same numbers from every backend and device, N(0, 1) statistics, batch independence,
and the seeds users may give."""

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, DEVICE_BACKENDS, require_backend
from scipy import stats

from fastdiff import layout as L
from fastdiff import ops
from fastdiff import philox as R

# Random123's kat_vectors (Salmon et al.): counter[4], key[2] -> output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    out = R.philox4x32_10([t(c) for c in counter], [t(k) for k in key])
    assert tuple(int(w) for w in out) == expected


def test_philox_matches_tritons_implementation():
    require_backend("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(c_ptr, out_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(c_ptr + 4 * i).to(tl.uint32)
        c1 = tl.load(c_ptr + 4 * i + 1).to(tl.uint32)
        c2 = tl.load(c_ptr + 4 * i + 2).to(tl.uint32)
        c3 = tl.load(c_ptr + 4 * i + 3).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(out_ptr + 4 * i, w0.to(tl.int64))
        tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64))
        tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64))
        tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64))

    g = torch.Generator().manual_seed(3)
    counters = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    seed = 0x1234_5678_9ABC_DEF0
    out = torch.empty_like(counters)
    kernel[(1,)](counters, out, seed, N=64)
    ref = R.philox4x32_10(list(counters.T), [torch.tensor(seed & 0xFFFFFFFF), torch.tensor(seed >> 32)])
    assert torch.equal(out, torch.stack(ref, dim=1))


def noise_coef():
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.out(0, L.CZ)] = 1.0
    return coef


def kernel_noise(backend, seeds, numel, step=0, domain=0):
    (z,) = ops.step(noise_coef().to(seeds.device), seeds=seeds, shape=(len(seeds), numel), noise_step=step,
                    noise_domain=domain, backend=backend)
    return z


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("numel,step,domain", [(4099, 0, 0), (37, 12345, 1), (1, 2**32 - 1, 3)])
def test_backends_draw_the_same_numbers(device, backend, numel, step, domain):
    require_backend(backend, device)
    seeds = torch.tensor([0, 1, -1, 2**62 + 7, -(2**40)], dtype=torch.int64)
    want = R.randn(seeds, numel, step=step, domain=domain, dtype=torch.float64)
    got = kernel_noise(backend, seeds.to(device), numel, step, domain).cpu()
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-6, f"{backend}: noise differs from the reference by {err:.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_million_draws_are_standard_normal(backend):
    require_backend(backend)
    z = kernel_noise(backend, R.sample_seeds(2024, 4), 250_000).double().flatten().numpy()
    n = z.size
    assert n == 10**6
    # 5-sigma bounds of the sample moments of N(0, 1) for n = 1e6
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    ks = stats.kstest(z, "norm")
    assert ks.statistic < 1.95 / np.sqrt(n), f"KS statistic {ks.statistic:.3g} (p = {ks.pvalue:.3g})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sample_noise_does_not_depend_on_the_batch(backend):
    require_backend(backend)
    seeds7 = R.sample_seeds(99, 7)
    assert torch.equal(R.sample_seeds(99, 1), seeds7[:1])
    z7 = kernel_noise(backend, seeds7, 1030, step=3)
    for b in (0, 4, 6):
        z1 = kernel_noise(backend, seeds7[b : b + 1], 1030, step=3)
        assert torch.equal(z1[0], z7[b]), f"{backend}: sample {b} differs between batches of 1 and 7"


def test_steps_and_domains_are_independent():
    seeds = R.sample_seeds(5, 2)
    a = R.randn(seeds, 100_000, step=0).flatten()
    for other in (R.randn(seeds, 100_000, step=1), R.randn(seeds, 100_000, domain=R.DOMAIN_INIT)):
        corr = torch.corrcoef(torch.stack([a, other.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / np.sqrt(a.numel())


def test_seeds_users_give_are_checked_when_given():
    """An int, a sequence of ints or a 1-D integer tensor; anything else is refused at once, naming the
    argument (not later, deep in a step)."""
    assert R.check_seeds(3) == 3 and R.check_seeds(None) is None
    assert torch.equal(R.check_seeds([1, 2]), torch.tensor([1, 2]))
    assert R.check_seeds(torch.tensor([5], dtype=torch.int32)).dtype == torch.int64
    for bad in (1.5, [1, 2.5], "7", True, torch.tensor([[1, 2]]), torch.tensor([1.0])):
        with pytest.raises(TypeError, match="seeds: expected"):
            R.check_seeds(bad)
    assert torch.equal(R.seed_tensor(9, 3), R.sample_seeds(9, 3))
    with pytest.raises(ValueError, match=r"seeds: expected one seed per sample \(3\), got 2"):
        R.seed_tensor([1, 2], 3)


def test_uniforms_are_the_philox_words_of_the_counter():
    """Element i is word i % 4 of group i // 4 as a uniform: Random123's known answer for key 0, counter 0."""
    _, _, words = KAT[0]
    u = R.uniform(torch.tensor([0]), 4, step=0, domain=0)[0]
    assert torch.equal(u, torch.tensor([((w >> 9) + 0.5) * 2.0**-23 for w in words], dtype=torch.float64))
    many = R.uniform(R.sample_seeds(1, 2), 100_003, step=2).flatten()
    assert float(many.min()) > 0 and float(many.max()) < 1
    assert stats.kstest(many.numpy(), "uniform").pvalue > 1e-4  # a correct generator fails 1 run in 10^4


def test_categorical_is_the_inverse_cdf():
    w = [0.4, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05]
    cdf = np.cumsum(w)
    u = torch.tensor([0.0, 0.3999, 0.4001, 0.54, 0.56, 0.9499, 0.9501, 0.99999], dtype=torch.float64)
    expected = [int(np.searchsorted(cdf[:-1], v, side="right")) for v in u.tolist()]
    assert R.categorical(u, w).tolist() == expected == [0, 0, 1, 1, 2, 5, 6, 6]
    k = R.categorical(R.uniform(R.sample_seeds(4, 1), 200_000)[0], w)
    counts = torch.bincount(k, minlength=len(w)).numpy()
    assert stats.chisquare(counts, np.array(w) * k.numel()).pvalue > 1e-4


def test_an_empty_batch_draws_nothing():
    none = torch.empty(0, dtype=torch.int64)
    assert R.randn(none, 5).shape == (0, 5) and R.uniform(none, 5).shape == (0, 5)
    assert R.randn([1], 0).shape == (1, 0)
