"""Noise schedules (docs/architecture.md, "Layers"): betas, abar, sigmas, timestep grids, log-SNR. Host-side numpy.

Every grid equals diffusers 0.42.1 (``scheduling_ddim.py``, ``scheduling_dpmsolver_multistep.py``) exactly:
- betas: ``linear`` (Ho et al. 2020), ``scaled_linear`` (latent diffusion, Rombach et al. 2022),
  ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, eq. 17, beta capped at 0.999), or trained betas;
  zero terminal SNR rescale: Lin et al. 2023, "Common diffusion noise schedules and sample steps are
  flawed", Algorithm 1; timestep spacings ``linspace``/``leading``/``trailing``: same paper, Table 2.
- Karras sigmas: Karras et al. 2022, eq. 5; DPM-Solver's lambda clipping: Lu et al. 2022.

Precision: diffusers computes betas, abar and DPM-Solver's sigmas in float32 torch. These functions do the
same float32 arithmetic (torch on CPU, where bit-equality needs it) and return float64 arrays holding
exactly those float32 values; everything downstream (sqrt, ratios, lambda) callers compute in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
SIGMA_SCHEDULES = (None, "karras", "exponential")
FINAL_SIGMAS = ("zero", "sigma_min")


def _check_choice(name, got, allowed):
    if got not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {got!r}")


def _check_int(name, got, lo, hi=None):
    if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(got).__name__}")
    if got < lo or (hi is not None and got > hi):
        raise ValueError(f"{name}: expected an int in [{lo}, {hi if hi is not None else 'inf'}], got {got}")


def _f32(x) -> torch.Tensor:
    """float32 CPU tensor of x (exact for values that are float32 already, as all betas/abar here are)."""
    return torch.from_numpy(np.asarray(x, dtype=np.float64)).float()


def _cosine_alpha_bar(t: float) -> float:
    """abar(t) = cos((t + 0.008)/1.008 * pi/2)^2, t in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(abar) so sqrt(abar_T) = 0 with sqrt(abar_1) kept (float32)."""
    root = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def betas(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
          trained_betas=None, rescale_betas_zero_snr=False) -> np.ndarray:
    """beta_t, float64 [T] holding diffusers' float32 values.

    linear: linspace(beta_start, beta_end, T); scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T)^2;
    squaredcos_cap_v2: beta_i = min(1 - abar((i+1)/T)/abar(i/T), 0.999); `trained_betas` (rounded to
    float32) override the schedule. Then optionally the zero terminal SNR rescale (abar_T = 0).
    """
    if trained_betas is not None:
        b = _f32(trained_betas)
        if b.ndim != 1 or b.numel() == 0:
            raise ValueError(f"trained_betas: expected a non-empty 1-D sequence, got shape {tuple(b.shape)}")
    else:
        _check_int("num_train_timesteps", num_train_timesteps, 1)
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        T = num_train_timesteps
        if beta_schedule == "linear":
            b = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            b = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        else:  # float64 host math, then one rounding to float32, as diffusers' betas_for_alpha_bar
            b = _f32([min(1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T), 0.999) for i in range(T)])
    if rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b.double().numpy()


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float64 [T] holding diffusers' float32 torch.cumprod values."""
    return torch.cumprod(1.0 - _f32(betas), dim=0).double().numpy()


def timesteps(num_inference_steps, num_train_timesteps=1000, spacing="leading", steps_offset=0) -> np.ndarray:
    """DDIM's timesteps, int64 [N], descending (DDIMScheduler.set_timesteps).

    linspace: round(linspace(0, T-1, N)); leading: i*(T//N) + steps_offset;
    trailing: round(arange(T, 0, -T/N)) - 1. That float arange gives N+1 points for some N (62 of
    N in 1..1000, e.g. 61), the last one timestep -1; kept, since diffusers does the same.
    """
    _check_int("num_train_timesteps", num_train_timesteps, 1)
    _check_int("num_inference_steps", num_inference_steps, 1, num_train_timesteps)
    _check_choice("spacing", spacing, SPACINGS)
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def dpm_last_timestep(abar, lambda_min_clipped=-math.inf) -> int:
    """T - #{t : lambda_t < lambda_min_clipped}: DPM-Solver's clipping of low log-SNRs (lambda in float32)."""
    a = _f32(abar)
    lam = torch.log(torch.sqrt(a)) - torch.log(torch.sqrt(1 - a))
    return len(a) - int(torch.searchsorted(torch.flip(lam, [0]), lambda_min_clipped))


def dpm_timesteps(num_inference_steps, num_train_timesteps=1000, spacing="linspace", steps_offset=0,
                  last_timestep=None) -> np.ndarray:
    """DPM-Solver's timesteps, int64 [N] (DPMSolverMultistepScheduler.set_timesteps, no karras/exponential).

    With L = last_timestep (default T; see `dpm_last_timestep`), N+1 points drop their last (t=0):
    linspace: round(linspace(0, L-1, N+1))[:-1]; leading: i*(L//(N+1)) + steps_offset, i = N..1;
    trailing: round(arange(L, 0, -T/N)) - 1. (diffusers does not check N <= T; we do.)
    """
    _check_int("num_train_timesteps", num_train_timesteps, 1)
    _check_int("num_inference_steps", num_inference_steps, 1, num_train_timesteps)
    _check_choice("spacing", spacing, SPACINGS)
    T, n = num_train_timesteps, num_inference_steps
    L = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, L - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n + 1) * (L // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.arange(L, 0, -T / n).round().astype(np.int64) - 1


def sigmas_from_alphas_cumprod(abar) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t)/abar_t), the VE noise level of a VP schedule (float64)."""
    abar = np.asarray(abar, dtype=np.float64)
    return np.sqrt((1 - abar) / abar)


def alpha_sigma(abar) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)), VP (float64)."""
    abar = np.asarray(abar, dtype=np.float64)
    return np.sqrt(abar), np.sqrt(1 - abar)


def log_snr(abar) -> np.ndarray:
    """lambda_t = log(alpha_t/sigma_t) = (log abar_t - log(1 - abar_t))/2 (float64; +-inf at abar 1/0)."""
    abar = np.asarray(abar, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(abar) - np.log1p(-abar))


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0) -> np.ndarray:
    """sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..n-1 (Karras 2022, eq. 5)."""
    _check_int("n", n, 1)
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)  # Python floats: float64 pow, as diffusers
    if not 0 <= sigma_min <= sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 <= sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min, sigma_max, n) -> np.ndarray:
    """sigma_i = exp(linspace(log smax, log smin, n)_i): uniform in log sigma (float64)."""
    _check_int("n", n, 1)
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


# numpy >= 2 promotes by dtype (NEP 50); numpy 1.x by value, which changes diffusers' `_sigma_to_t` (below).
_NEP50 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def _scalar_array_dtype(scalar_dtype, array_dtype) -> np.dtype:
    """dtype the installed numpy computes `float scalar (op) float array` in (a 0-d operand counts as a scalar).

    numpy >= 2 (NEP 50): the usual promotion, e.g. float64 scalar - float32 array -> float64. numpy 1.x
    (value-based casting): a scalar of the array's kind takes the array's dtype when its value fits there
    (every log sigma does: |log x| < 710 for any float64 x), so float64 scalar - float32 array -> float32.
    """
    return np.result_type(scalar_dtype, array_dtype) if _NEP50 else np.dtype(array_dtype)


def sigma_to_t(sigma, log_sigmas) -> np.ndarray:
    """Continuous timestep of `sigma`: linear interpolation in log sigma over the grid `log_sigmas` [T]
    (ascending), clamped to [0, T-1]; t = i + w with i the last grid point with log s_i <= log sigma and
    w = (log s_i - log sigma)/(log s_i - log s_{i+1}).

    dtypes follow diffusers' ``_sigma_to_t`` (pass its float32 ``log_sigmas`` for equal results), which
    takes one sigma at a time, a numpy scalar: log sigma (op) log_sigmas is computed in
    `_scalar_array_dtype` (float64 under numpy 2, float32 under numpy 1.x, which then picks other i at
    grid points and rounds w to float32), log s_i - log s_{i+1} in log_sigmas' dtype, t in float64.
    """
    sigma, log_sigmas = np.asarray(sigma), np.asarray(log_sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)  # 1-D: all promotions below are array-array
    log_sigma = log_sigma.astype(_scalar_array_dtype(log_sigma.dtype, log_sigmas.dtype))
    above = log_sigma - log_sigmas[:, None].astype(log_sigma.dtype) >= 0
    i = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[i], log_sigmas[i + 1]
    w = np.clip((lo.astype(log_sigma.dtype) - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * i + w * (i + 1)).reshape(sigma.shape)


def dpm_sigmas(abar, num_inference_steps, spacing="linspace", steps_offset=0, sigma_schedule=None,
               final_sigmas_type="zero", lambda_min_clipped=-math.inf, beta_schedule="linear",
               rescale_betas_zero_snr=False) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N+1], timesteps int64 [N]): DPMSolverMultistepScheduler's grid after set_timesteps.

    `abar` from `alphas_cumprod` (with `rescale_betas_zero_snr` diffusers first sets abar_T = 2^-24 so
    sigma_T is finite; this does it here). sigma_t = sqrt((1-abar_t)/abar_t) in float32. Default: sigma at
    the `dpm_timesteps` grid. `sigma_schedule` "karras"/"exponential": N sigmas from sigma_min = sigma_0 to
    sigma_max = sigma_{T-1} (float64) and t = sigma_to_t (float32 log-sigmas); karras rounds t (except
    for `beta_schedule` "squaredcos_cap_v2"), exponential does not, and t is then truncated to int64.
    Appended final sigma: 0 ("zero") or sigma_0 ("sigma_min"). The returned sigmas are rounded to float32
    like diffusers' (float64 array of float32 values).
    """
    _check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
    a = _f32(abar)
    if rescale_betas_zero_snr:
        a[-1] = 2**-24
    T = len(a)
    ts = dpm_timesteps(num_inference_steps, T, spacing, steps_offset,
                       dpm_last_timestep(a.double().numpy(), lambda_min_clipped))
    sig = (((1 - a) / a) ** 0.5).numpy()  # float32, ascending in t
    if sigma_schedule is None:
        s = np.interp(ts, np.arange(T), sig)
    else:
        convert = karras_sigmas if sigma_schedule == "karras" else exponential_sigmas
        s = convert(sig[0], sig[-1], num_inference_steps)
        t = sigma_to_t(s, np.log(sig))
        if sigma_schedule == "karras" and beta_schedule != "squaredcos_cap_v2":
            t = t.round()
        ts = t.astype(np.int64)  # truncation toward zero, as torch's .to(int64)
    last = 0.0 if final_sigmas_type == "zero" else float(((1 - a[0]) / a[0]) ** 0.5)
    return np.append(s, last).astype(np.float32).astype(np.float64), ts
