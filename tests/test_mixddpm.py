"""Mix-DDPM (Wang et al., ACM TOMM 2024): the noising against the paper-shaped reference with the same draws
(every CPU backend), the offset's defining statistics (one scalar per sample, mean 0, variance
(1 - abar_t) E[mu^2]/D), the categorical draws against the weights (chi-square), the strategies' steps against
diffusers and the reference, the derived DDIM form at stride 1 against the DDPM step, x_T, seeds, the loss
helper and bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, assert_close, require_backend
from diffusers import DDIMScheduler, DDPMScheduler
from scipy import stats

from fastdiff import philox
from fastdiff.integrations.diffusers.mixddpm import MixDDIMScheduler, MixDDPMScheduler
from fastdiff.reference import mixddpm as paper
from fastdiff.samplers import mixddpm as mix
from fastdiff.stepper import Stepper
from fastdiff.training.mixddpm import mixddpm_loss, mixddpm_noising

MEANS = torch.tensor(mix.MEANS, dtype=torch.float64)
WEIGHTS = torch.tensor(mix.WEIGHTS, dtype=torch.float64)


def model(x, t):
    return 0.9 * torch.tanh(x * (1.0 + float(t) / 1000.0)) + 0.05


def contract_components(seeds, n, step):
    """The shared categorical contract, written out: inverse CDF of Philox uniforms of (step, CATEGORICAL)."""
    return philox.categorical(philox.uniform(seeds, n, step=step, domain=philox.DOMAIN_CATEGORICAL), WEIGHTS)


def chi_square_p(components, weights):
    counts = np.bincount(np.asarray(components).reshape(-1), minlength=len(weights))
    return stats.chisquare(counts, counts.sum() * np.asarray(weights)).pvalue


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_noise_equals_the_reference_with_the_same_draws(backend):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps + m_n(t), per-sample timesteps, with m_n(t) of the
    reference (sum over i <= t) from the components the seeds draw by the shared contract."""
    require_backend(backend)
    s = MixDDPMScheduler()
    s.backend = backend
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t, seeds = torch.tensor([0, 1, 250, 998, 999]), philox.sample_seeds(3, 5)
    got = s.add_noise(x0, eps, t, seeds=seeds)
    k = contract_components(seeds, 1000, 0)
    m = paper.mixture_offset(k, t, s.betas.double(), MEANS, 48)
    want = paper.q_sample(x0.double(), t, eps.double(), s.alphas_cumprod.double(), m)
    assert_close(got, want, atol=2e-6, rtol=1e-5, what=f"add_noise ({backend})")


def test_offset_is_one_scalar_per_sample_with_the_stated_moments():
    """x_t minus its Gaussian part is constant over each sample's D elements; over B = 8000 samples its mean
    is 0 within 5 standard errors and its variance (1 - abar_t) E[mu^2]/D within 5 standard errors
    (SE of a variance ~ var*sqrt(2/B): 8%)."""
    B, D, t = 8000, 16, 600
    s = MixDDPMScheduler()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(B, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(B, 1, 4, 4, generator=g,
                                                                                       dtype=torch.float64)
    x_t = s.add_noise(x0, eps, torch.full((B,), t), generator=g)
    abar = float(s.alphas_cumprod[t])
    m = (x_t - math.sqrt(abar) * x0 - math.sqrt(1 - abar) * eps).reshape(B, D)
    assert float((m - m[:, :1]).abs().max()) < 1e-12, "the offset differs within a sample"
    var = (1 - abar) * float((WEIGHTS * MEANS**2).sum()) / D
    mean, v = float(m[:, 0].mean()), float(m[:, 0].var())
    assert abs(mean) < 5 * math.sqrt(var / B), (mean, var)
    assert abs(v / var - 1) < 5 * math.sqrt(2 / B), (v, var)


@pytest.mark.parametrize("draw", ["seeds", "generator"])
def test_component_frequencies_match_the_weights(draw):
    """200k categorical draws: chi-square against the weights (p > 1e-4), with seeds and with a generator."""
    kw = {"seeds": philox.sample_seeds(7, 200)} if draw == "seeds" else {"generator": torch.Generator().manual_seed(7)}
    k = mix.draw_components(mix.WEIGHTS, 200, 1000, **kw)
    assert chi_square_p(k, mix.WEIGHTS) > 1e-4


def test_seeded_component_draws_are_philox_inverse_cdf_draws():
    """The fast native draw (the op's checks skipped) equals the inverse CDF of the Philox uniforms of
    DOMAIN_CATEGORICAL, per sample and step; a list of seeds (not a tensor) and a strided seed tensor take the
    checked ways and draw the same; weights that are not a distribution are refused by name."""
    seeds = philox.sample_seeds(11, 6)
    u = philox.uniform(seeds, 40, step=9, domain=philox.DOMAIN_CATEGORICAL)
    want = philox.categorical(u, torch.tensor(mix.WEIGHTS, dtype=torch.float32))
    assert torch.equal(mix.draw_components(mix.WEIGHTS, 6, 40, seeds=seeds, step=9), want)
    strided = torch.stack([seeds, seeds], 1)[:, 0]
    assert not strided.is_contiguous()
    assert torch.equal(mix.draw_components(mix.WEIGHTS, 6, 40, seeds=strided, step=9), want)
    assert torch.equal(mix.draw_components(mix.WEIGHTS, 6, 40, seeds=seeds.tolist(), step=9), want)
    with pytest.raises(ValueError, match="weights.*summing to 1"):
        mix.draw_components([0.5, 0.6], 6, 1, seeds=seeds)


@pytest.mark.parametrize("strategy", ["original", "removal_mu"])
def test_plain_strategies_step_as_diffusers_ddpm(strategy):
    """original and removal_mu change only x_T: their steps are diffusers' DDPM steps (same generator noise)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for s in (DDPMScheduler(), MixDDPMScheduler(strategy=strategy)):
        s.set_timesteps(10)
        g, y = torch.Generator().manual_seed(1), x
        for t in s.timesteps:
            y = s.step(model(y, t), t, y, generator=g).prev_sample
        runs.append(y)
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5, what=strategy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_standard_step_equals_the_reference_with_the_same_draws(backend, dtype):
    """standard, 10 strided steps: each equals the paper-shaped step given the same component (torch.rand
    from the generator, then the inverse CDF) and noise (randn after it), offset subtracted at t = 0 too."""
    require_backend(backend)
    s = MixDDPMScheduler(strategy="standard")
    s.backend = backend
    s.set_timesteps(10)
    abar = s.alphas_cumprod.double()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)
    g, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ts = [int(t) for t in s.timesteps]
    for i, t in enumerate(ts):
        got = s.step(model(x, t), t, x, generator=g).prev_sample
        k = philox.categorical(torch.rand((3, 1), generator=g_ref), WEIGHTS)[:, 0]
        z = torch.randn(x.shape, generator=g_ref, dtype=dtype) if t > 0 else None
        prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        want = paper.p_sample_standard(x.double(), model(x, t).double(), abar[t], prev, MEANS[k],
                                       None if z is None else z.double(), clip=1.0)
        tol = 1e-5 if dtype == torch.float32 else 1e-7  # offset[n] is float32 in every dtype (the kernel's term)
        assert_close(got, want, atol=tol, rtol=tol, what=f"standard step t={t} ({backend}, {dtype})")
        x = got


def test_standard_ddim_at_stride_1_and_eta_1_is_the_standard_ddpm_step():
    """The derived DDIM form (offset -sqrt((1-r)/r) mu_k/sqrt(D), r = abar_t/abar_prev) at stride 1, eta 1,
    equals the scheduler's standard DDPM step for the same component and noise (with clip_sample, DDIM's eps is
    the one the clipped x0 implies, use_clipped_model_output: DDPM's posterior mean reads x, not the model's eps)."""
    s = MixDDPMScheduler(strategy="standard")
    s.set_timesteps(1000)
    abar = s.alphas_cumprod.double().numpy()
    ts = np.array([999, 500, 37, 1])
    ddim = mix.mixddpm_ddim_plan(abar, ts, ts - 1, eta=1.0, clip_sample=True,
                                 use_clipped_model_output=True)
    stepper = Stepper(ddim)
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(ts):
        g, g_ref = torch.Generator().manual_seed(10 + i), torch.Generator().manual_seed(10 + i)
        want = s.step(model(x, t), int(t), x, generator=g).prev_sample
        k = philox.categorical(torch.rand((4, 1), generator=g_ref), WEIGHTS)[:, 0]
        z = torch.randn(x.shape, generator=g_ref)
        got, _ = stepper.step(x, model(x, t), row=i, noise=z, offset=(MEANS[k] / math.sqrt(32)).float())
        assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"DDIM vs DDPM standard at t={t}")


def test_mix_ddim_scheduler():
    """MixDDIMScheduler: original/removal_mu step as diffusers' DDIM (eta 0.5, same generator); standard at
    stride 1 and eta 1 (use_clipped_model_output) equals MixDDPMScheduler's standard step, same draws."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = []
    for s in (DDIMScheduler(), MixDDIMScheduler(strategy="original"), MixDDIMScheduler()):
        s.set_timesteps(10)
        g, y = torch.Generator().manual_seed(1), x
        for t in s.timesteps:
            y = s.step(model(y, t), t, y, eta=0.5, generator=g).prev_sample
        runs.append(y)
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5, what="original")
    assert_close(runs[2], runs[0], atol=1e-5, rtol=1e-5, what="removal_mu")
    ddim, ddpm = MixDDIMScheduler(strategy="standard"), MixDDPMScheduler(strategy="standard")
    ddim.set_timesteps(1000)
    ddpm.set_timesteps(1000)
    for t in (999, 400, 1, 0):
        got = ddim.step(model(x, t), t, x, eta=1.0, use_clipped_model_output=True,
                        generator=torch.Generator().manual_seed(t)).prev_sample
        want = ddpm.step(model(x, t), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"standard DDIM vs DDPM at t={t}")


def test_config_round_trip(tmp_path):
    s = MixDDPMScheduler(strategy="standard", mixture_means=[0.0, 2.0, -2.0], mixture_weights=[0.5, 0.25, 0.25])
    s.save_pretrained(tmp_path)
    r = MixDDPMScheduler.from_pretrained(tmp_path)
    assert r.config.strategy == "standard" and list(r.config.mixture_means) == [0.0, 2.0, -2.0]
    assert MixDDPMScheduler.from_config(DDPMScheduler().config).config.strategy == "removal_mu"


def test_initial_sample_of_each_strategy():
    """original: randn (as diffusers draws it); removal_mu/standard: eps + c*u/sqrt(D), c = (1 - abar_T) E[mu^2],
    u the generator's next uniform after eps - one scalar for the batch."""
    shape = (3, 2, 4, 4)
    for strategy in mix.STRATEGIES:
        s = MixDDPMScheduler(strategy=strategy)
        got = s.initial_sample(shape, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        eps = torch.randn(shape, generator=g)
        c = (1 - float(s.alphas_cumprod[-1])) * float((WEIGHTS * MEANS**2).sum())
        want = eps if strategy == "original" else eps + c * float(torch.rand(1, generator=g)) / math.sqrt(32)
        assert_close(got, want, atol=1e-6, rtol=1e-6, what=strategy)
    assert_close(mix.initial_sample(DDPMScheduler(), shape, generator=torch.Generator().manual_seed(5)),
                 MixDDPMScheduler().initial_sample(shape, generator=torch.Generator().manual_seed(5)),
                 atol=0, rtol=0, what="any scheduler")


def test_seeds_reproduce_each_sample_across_batch_sizes():
    """x_T, add_noise and a standard run with per-sample seeds: sample b is the same alone and in a batch."""
    seeds = philox.sample_seeds(9, 3)
    s = MixDDPMScheduler(strategy="standard")

    def run(sd):
        s.set_timesteps(5)
        x = s.initial_sample((len(sd), 2, 4, 4), seeds=sd)
        x0 = torch.linspace(-1, 1, 32).reshape(1, 2, 4, 4).expand(len(sd), -1, -1, -1)
        noised = s.add_noise(x0, x0.flip(-1), torch.full((len(sd),), 700), seeds=sd)
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, seeds=sd).prev_sample
        return x, noised

    full, alone = run(seeds), run(seeds[1:2])
    for a, b in zip(full, alone):
        assert_close(a[1:2], b, atol=1e-6, rtol=1e-6, what="per-sample seeds")
    assert not torch.allclose(full[0][0], full[0][1])


def test_loss_helper():
    """mixddpm_loss = mean((eps - model(x_t, t))^2) with eps from Philox DOMAIN_TRAIN and x_t the reference
    noising with the contract's components."""
    s = MixDDPMScheduler()
    seeds, t = philox.sample_seeds(11, 4), torch.tensor([3, 300, 600, 999])
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(6))

    def net(x, t):
        return 0.9 * torch.tanh(x) + t.view(-1, 1, 1, 1) / 1000

    got = mixddpm_loss(net, s, x0, t, seeds=seeds)
    eps = philox.randn(seeds, 32, domain=philox.DOMAIN_TRAIN).reshape(x0.shape)
    m = paper.mixture_offset(contract_components(seeds, 1000, 0), t, s.betas.double(), MEANS, 32)
    x_t = paper.q_sample(x0.double(), t, eps.double(), s.alphas_cumprod.double(), m).float()
    assert abs(float(got) - float(torch.mean((eps - net(x_t, t)) ** 2))) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_noising_writes_x_t_and_its_noise_in_one_pass(backend):
    """With seeds, the kernel draws eps (Philox DOMAIN_TRAIN, the torch reference's numbers) and writes it beside
    x_t, which equals the reference noising with that eps and the contract's components."""
    require_backend(backend)
    s = MixDDPMScheduler()
    s.backend = backend
    seeds, t = philox.sample_seeds(12, 3), torch.tensor([0, 420, 999])
    x0 = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(8))
    x_t, eps = mixddpm_noising(s, x0, t, seeds=seeds)
    want_eps = philox.randn(seeds, 70, domain=philox.DOMAIN_TRAIN, dtype=torch.float64).reshape(x0.shape)
    assert_close(eps, want_eps, atol=2e-6, rtol=2e-6, what="in-kernel eps")
    m = paper.mixture_offset(contract_components(seeds, 1000, 0), t, s.betas.double(), MEANS, 70)
    want = paper.q_sample(x0.double(), t, want_eps, s.alphas_cumprod.double(), m)
    assert_close(x_t, want, atol=4e-6, rtol=4e-6, what="x_t")


@pytest.mark.parametrize("kw,match", [
    (dict(mixture_weights=[0.5, 0.4, 0.05, 0.05, 0.0, 0.0, 0.01]), "mixture_weights: expected weights summing to 1"),
    (dict(mixture_means=[0.0, 1.0], mixture_weights=[0.5, 0.25, 0.25]), "mixture_weights: expected 2 weights"),
    (dict(mixture_weights=[1.2, -0.2, 0, 0, 0, 0, 0]), "mixture_weights: expected finite weights >= 0"),
    (dict(strategy="mu"), "strategy: expected one of"),
])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        MixDDPMScheduler(**kw)
