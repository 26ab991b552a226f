"""fastdiff.schedules against diffusers 0.42 (DDIMScheduler, DPMSolverMultistepScheduler) as the oracle,
plus closed forms. diffusers keeps betas, abar and DPM-Solver's sigmas in float32, and ours are float64
arrays holding those float32 values, so all comparisons with diffusers are exact."""

import math

import numpy as np
import pytest
from diffusers import DDIMScheduler
from diffusers import DPMSolverMultistepScheduler as DPM

from fastdiff import schedules as S

# diffusers' DPM-Solver calls np.array on a tensor, which numpy 2 flags (copy keyword); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NS = [1, 2, 3, 5, 7, 10, 13, 20, 25, 50, 61, 99, 100, 250, 999, 1000]  # 61: trailing gives 62 steps
TRAIN = [  # (num_train_timesteps, beta_start, beta_end)
    (1000, 1e-4, 0.02),
    (1000, 0.00085, 0.012),  # Stable Diffusion
    (37, 1e-3, 0.05),
]


def f64(t):
    """float32 torch tensor -> float64 numpy (exact)."""
    return t.double().numpy()


def equal(actual, expected, what):
    """assert_array_equal that says where the first mismatch is."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != diffusers' {expected.shape}"
    bad = np.flatnonzero(actual != expected)
    assert bad.size == 0, (f"{what}: {bad.size} of {actual.size} differ, first at {bad[0]}: "
                           f"{actual.flat[bad[0]]!r} vs diffusers' {expected.flat[bad[0]]!r}")


# ------------------------------------------------------------------------------------------ betas, abar
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", S.BETA_SCHEDULES)
@pytest.mark.parametrize("T,beta_start,beta_end", TRAIN)
def test_betas_and_alphas_cumprod_equal_diffusers(T, beta_start, beta_end, schedule, rescale):
    d = DDIMScheduler(T, beta_start, beta_end, schedule, rescale_betas_zero_snr=rescale)
    b = S.betas(T, beta_start, beta_end, schedule, None, rescale)
    abar = S.alphas_cumprod(b)
    assert b.dtype == abar.dtype == np.float64
    equal(b, f64(d.betas), "betas")
    equal(abar, f64(d.alphas_cumprod), "alphas_cumprod")


@pytest.mark.parametrize("rescale", [False, True])
def test_trained_betas_are_rounded_to_float32_like_diffusers(rescale):
    trained = np.random.default_rng(0).uniform(1e-4, 0.03, 53)  # float64, not float32-representable
    d = DDIMScheduler(trained_betas=trained, rescale_betas_zero_snr=rescale)
    for given in (trained, trained.tolist()):
        b = S.betas(trained_betas=given, rescale_betas_zero_snr=rescale)
        equal(b, f64(d.betas), "trained betas")
        equal(S.alphas_cumprod(b), f64(d.alphas_cumprod), "alphas_cumprod")


def test_betas_closed_forms():
    # 1 - abar_T = sum_i beta_i abar_T/abar_i (each step's noise, decayed to T). abar holds float32 values
    # (relative error <= 2^-24 each), so the identity holds to ~1e-7, not to float64 rounding.
    for schedule in S.BETA_SCHEDULES:
        b = S.betas(beta_schedule=schedule)
        abar = S.alphas_cumprod(b)
        np.testing.assert_allclose(np.sum(b * abar[-1] / abar), 1 - abar[-1], rtol=0, atol=1e-6)
        assert np.all(np.diff(abar) < 0)
    np.testing.assert_allclose(S.betas(beta_schedule="squaredcos_cap_v2").max(), 0.999, rtol=1e-7)
    # zero terminal SNR (Lin et al. 2023, Alg. 1): abar_T = 0 exactly, abar_1 kept (to float32 rounding)
    z = S.alphas_cumprod(S.betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 rescale_betas_zero_snr=True))
    assert z[-1] == 0.0
    np.testing.assert_allclose(z[0], 1 - 0.00085, rtol=2e-7)


# ------------------------------------------------------------------------------------- DDIM timesteps
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("T", [1000, 37])
def test_ddim_timesteps_equal_diffusers_for_every_step_count(T, spacing, offset):
    d = DDIMScheduler(T, timestep_spacing=spacing, steps_offset=offset)
    for n in range(1, T + 1):
        d.set_timesteps(n)
        ts = S.timesteps(n, T, spacing, offset)
        assert ts.dtype == np.int64
        equal(ts, d.timesteps.numpy(), f"timesteps(n={n})")


def test_trailing_keeps_diffusers_extra_step():
    # diffusers' float arange(T, 0, -T/N) yields N+1 points for 62 of N in 1..1000 (61 the first),
    # the last rounding to 0, i.e. timestep -1. We keep it so the drop-ins match diffusers.
    ts = S.timesteps(61, 1000, "trailing")
    assert len(ts) == 62 and ts[0] == 999 and ts[-1] == -1
    assert sum(len(S.timesteps(n, 1000, "trailing")) != n for n in range(1, 1001)) == 62


# ---------------------------------------------------------------------------------- DPM-Solver grids
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_dpm_timesteps_equal_diffusers_for_every_step_count(spacing):
    offset = 1 if spacing == "leading" else 0
    d = DPM(timestep_spacing=spacing, steps_offset=offset)
    for n in range(1, 1001):
        d.set_timesteps(n)
        equal(S.dpm_timesteps(n, 1000, spacing, offset), d.timesteps.numpy(), f"dpm_timesteps(n={n})")


@pytest.mark.parametrize("final", S.FINAL_SIGMAS)
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("sigma_schedule", S.SIGMA_SCHEDULES)
def test_dpm_sigmas_equal_diffusers(sigma_schedule, spacing, final):
    for schedule in S.BETA_SCHEDULES:
        for rescale in (False, True):
            offset = 1 if spacing == "leading" else 0
            d = DPM(beta_schedule=schedule, rescale_betas_zero_snr=rescale, timestep_spacing=spacing,
                    steps_offset=offset, final_sigmas_type=final, use_karras_sigmas=sigma_schedule == "karras",
                    use_exponential_sigmas=sigma_schedule == "exponential")
            abar = S.alphas_cumprod(S.betas(beta_schedule=schedule, rescale_betas_zero_snr=rescale))
            for n in NS if sigma_schedule is None else NS[:11]:
                d.set_timesteps(n)
                sigmas, ts = S.dpm_sigmas(abar, n, spacing, offset, sigma_schedule, final,
                                          beta_schedule=schedule, rescale_betas_zero_snr=rescale)
                what = f"{schedule}, rescale={rescale}, n={n}"
                equal(sigmas, f64(d.sigmas), f"sigmas ({what})")
                equal(ts, d.timesteps.numpy(), f"timesteps ({what})")


@pytest.mark.parametrize("sigma_schedule", S.SIGMA_SCHEDULES)
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_dpm_lambda_min_clipped_equals_diffusers(spacing, sigma_schedule):
    for schedule, lam_min in [("squaredcos_cap_v2", -5.1), ("linear", -3.0)]:
        abar = S.alphas_cumprod(S.betas(beta_schedule=schedule))
        assert S.dpm_last_timestep(abar, lam_min) < 1000  # the clip is active
        d = DPM(beta_schedule=schedule, lambda_min_clipped=lam_min, timestep_spacing=spacing,
                use_karras_sigmas=sigma_schedule == "karras", use_exponential_sigmas=sigma_schedule == "exponential")
        for n in (1, 7, 25, 100):
            d.set_timesteps(n)
            sigmas, ts = S.dpm_sigmas(abar, n, spacing, 0, sigma_schedule, lambda_min_clipped=lam_min,
                                      beta_schedule=schedule)
            equal(sigmas, f64(d.sigmas), f"sigmas ({schedule}, n={n})")
            equal(ts, d.timesteps.numpy(), f"timesteps ({schedule}, n={n})")


def test_karras_exponential_and_sigma_to_t_equal_diffusers_helpers():
    d = DPM()
    sig = (((1 - d.alphas_cumprod) / d.alphas_cumprod) ** 0.5).numpy()  # float32, as diffusers keeps it
    for n in (1, 2, 9, 50):
        equal(S.karras_sigmas(sig[0], sig[-1], n), d._convert_to_karras(sig[::-1].copy(), n), "karras")
        equal(S.exponential_sigmas(sig[0], sig[-1], n), d._convert_to_exponential(sig[::-1].copy(), n), "exp")
    probe = np.concatenate([np.exp(np.random.default_rng(1).uniform(-6, 6, 40)), [1e-12, sig[0], sig[-1], 1e3]])
    expected = np.array([d._sigma_to_t(s, np.log(sig)) for s in probe])
    equal(S.sigma_to_t(probe, np.log(sig)), expected, "sigma_to_t")


NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


@pytest.mark.parametrize("scalar,array", [(np.float64, np.float32), (np.float32, np.float64), (np.float64, np.float64),
                                          (np.float32, np.float32), (np.float64, np.float16)])
def test_scalar_array_dtype_is_the_installed_numpys_promotion(scalar, array):
    # diffusers' _sigma_to_t mixes a float64 scalar with float32 arrays: float64 under numpy 2 (NEP 50),
    # float32 under numpy 1.x (value-based casting). The helper must say what this numpy does.
    x, grid = scalar(np.log(4096.0)), np.linspace(-3, 9, 5).astype(array)
    got = S._scalar_array_dtype(np.dtype(scalar), np.dtype(array))
    assert got == (x - grid).dtype == (grid - x).dtype == (np.asarray(x) - grid).dtype
    if (scalar, array) == (np.float64, np.float32):
        assert got == (np.float64 if NUMPY2 else np.float32)


def test_sigma_to_t_at_grid_points_equals_diffusers():
    # Sigmas within float32 rounding of a grid point, on the zero-SNR grid (not monotone at its end): under
    # numpy 1.x diffusers compares float32(log sigma) with the grid, so these land on other intervals.
    d = DPM(rescale_betas_zero_snr=True)
    sig = (((1 - d.alphas_cumprod) / d.alphas_cumprod) ** 0.5).numpy()
    assert sig[-1] == 4096 and sig[-2] > sig[-1]
    probe = np.concatenate([sig.astype(np.float64) * f for f in (1 - 1e-9, 1, 1 + 1e-9)])
    expected = np.array([d._sigma_to_t(s, np.log(sig)) for s in probe])
    equal(S.sigma_to_t(probe, np.log(sig)), expected, "sigma_to_t")
    # one karras step: sigma_max = 4096 - 3e-12 (the (x^(1/7))^7 round trip), whose float32 log is sigma_999's
    _, ts = S.dpm_sigmas(S.alphas_cumprod(S.betas(rescale_betas_zero_snr=True)), 1, sigma_schedule="karras",
                         rescale_betas_zero_snr=True)
    assert ts.tolist() == ([995] if NUMPY2 else [999])


# --------------------------------------------------------------------------------------- closed forms
def test_karras_and_exponential_closed_forms():
    for n in (2, 10, 33):
        k = S.karras_sigmas(0.03, 14.6, n)
        # (x^(1/7))^7 is not exact in floating point: endpoints to a few float64 ulps
        np.testing.assert_allclose([k[0], k[-1]], [14.6, 0.03], rtol=1e-14)
        assert np.all(np.diff(k) < 0)
        e = S.exponential_sigmas(0.03, 14.6, n)
        np.testing.assert_allclose([e[0], e[-1]], [14.6, 0.03], rtol=1e-14)
        np.testing.assert_allclose(np.diff(np.log(e)), math.log(0.03 / 14.6) / (n - 1), rtol=1e-12)
    np.testing.assert_allclose(S.karras_sigmas(0.03, 14.6, 1), [14.6], rtol=1e-14)


@pytest.mark.parametrize("schedule", S.BETA_SCHEDULES)
def test_vp_quantities(schedule):
    abar = S.alphas_cumprod(S.betas(beta_schedule=schedule))
    alpha, sigma = S.alpha_sigma(abar)
    lam = S.log_snr(abar)
    assert np.all(np.diff(lam) < 0)  # log-SNR strictly decreasing in t
    # float64 throughout: equal to the direct formulas up to float64 rounding
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-15)
    np.testing.assert_allclose(lam, np.log(alpha / sigma), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(S.sigmas_from_alphas_cumprod(abar), sigma / alpha, rtol=1e-12)
    # sigma_to_t inverts the grid: every training sigma maps back to its own timestep
    s = S.sigmas_from_alphas_cumprod(abar)
    np.testing.assert_allclose(S.sigma_to_t(s, np.log(s)), np.arange(len(s)), rtol=0, atol=1e-9)
    assert S.log_snr(np.array([1.0, 0.0])).tolist() == [math.inf, -math.inf]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,name", [
    (lambda: S.betas(beta_schedule="cosine"), "beta_schedule"),
    (lambda: S.betas(num_train_timesteps=0), "num_train_timesteps"),
    (lambda: S.betas(trained_betas=[]), "trained_betas"),
    (lambda: S.timesteps(0, 1000), "num_inference_steps"),
    (lambda: S.timesteps(1001, 1000), "num_inference_steps"),
    (lambda: S.timesteps(10, 1000, "uniform"), "spacing"),
    (lambda: S.dpm_timesteps(1001, 1000), "num_inference_steps"),
    (lambda: S.dpm_timesteps(10, 1000, "even"), "spacing"),
    (lambda: S.dpm_sigmas(np.full(10, 0.5), 3, sigma_schedule="beta"), "sigma_schedule"),
    (lambda: S.dpm_sigmas(np.full(10, 0.5), 3, final_sigmas_type="one"), "final_sigmas_type"),
    (lambda: S.karras_sigmas(1.0, 0.1, 5), "sigma_min"),
    (lambda: S.karras_sigmas(0.1, 1.0, 0), "n"),
    (lambda: S.exponential_sigmas(0.0, 1.0, 5), "sigma_min"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


def test_unknown_schedule_message_lists_the_choices():
    with pytest.raises(ValueError, match=r"beta_schedule: expected one of \('linear', 'scaled_linear', "
                                         r"'squaredcos_cap_v2'\), got 'cosine'"):
        S.betas(beta_schedule="cosine")
    with pytest.raises(TypeError, match="num_inference_steps: expected an int, got float"):
        S.timesteps(10.0)
