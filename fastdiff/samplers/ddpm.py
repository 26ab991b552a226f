"""DDPM ancestral sampling (Ho, Jain, Abbeel, NeurIPS 2020, eq. 6-7 and 11) as a plan builder, with the
variances of diffusers' ``DDPMScheduler`` (learned ones: Nichol & Dhariwal 2021, eq. 15).

A step from timestep t to the previous grid point ("prev"; at stride 1 prev = t - 1) draws from the posterior
q(x_prev | x_t, x0) with x0 predicted by the model:

    alpha_t = abar_t/abar_prev,  beta_t = 1 - alpha_t                       (the strided step's one-step alpha)
    x0      = the data prediction (``predictions``), clipped to [-r, r] or dynamically thresholded
              (then it arrives as history slot m0)
    x_prev  = sqrt(abar_prev)*beta_t/(1 - abar_t) * x0 + sqrt(alpha_t)*(1 - abar_prev)/(1 - abar_t) * x
              + std_t * z                                                  (eq. 7: the posterior mean mu~)
    beta~_t = max((1 - abar_prev)/(1 - abar_t) * beta_t, 1e-20)          (eq. 7: the posterior variance)

``std_t`` by ``variance_type``: fixed_small sqrt(beta~_t); fixed_small_log exp(log(beta~_t)/2); fixed_large
sqrt(beta_t); learned sqrt(v) and learned_range exp((f log beta_t + (1 - f) log beta~_t)/2), f = (v + 1)/2,
per element from the model's variance output v. The learned ones reach the kernel as the gathered variance
row of each sample (component n = sample n): s = sqrt(VAR - var_table[n]) with ``var_table[n] = -s_n^2``
(computed by the caller in one small op from v; ``learned_range_bounds`` gives its per-row constants) and
VAR the smallest normal float32, which is non-zero (so the plan reads the row) and adds nothing in float32
to any s^2 above 2e-31 (diffusers clamps beta~ at 1e-20). A noise tensor pre-scaled by s would do too,
but would need the noise drawn outside the kernel (seeds lose their in-kernel draw) and one more pass.
No noise where t <= 0, as diffusers. Output 0 is x_prev, output 1 x0.
"""

from __future__ import annotations

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import M0, X0, X, Z, plan
from fastdiff.samplers.predictions import check_prediction_type, predict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' "fixed_large_log" is not here: its noise scale is sqrt(log(beta_t)), NaN for every t > 0.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED = ("learned", "learned_range")
LEARNED_VAR = float(np.finfo(np.float32).tiny)  # VAR of learned rows: see the module docstring


def check_variance_type(variance_type: str) -> None:
    if variance_type == "fixed_large_log":
        raise ValueError("variance_type: 'fixed_large_log' is not supported: diffusers 0.42.1 scales its noise by "
                         "sqrt(log(beta_t)), which is NaN at every step with t > 0; use 'fixed_large'")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type: expected one of {VARIANCE_TYPES}, got {variance_type!r}")


def posterior(abar_t, abar_prev) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha_t, beta_t, beta~_t) of steps abar_t -> abar_prev (float64 arrays; beta~ clamped at 1e-20)."""
    abar_t, abar_prev = np.asarray(abar_t, np.float64), np.asarray(abar_prev, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = abar_t / abar_prev
        beta = 1.0 - alpha
        var = np.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)
    return alpha, beta, var


def fixed_std(abar_t, abar_prev, variance_type: str) -> np.ndarray:
    """std_t of a fixed variance type (float64); 1.0 for the learned ones (their scale is the variance row)."""
    _, beta, var = posterior(abar_t, abar_prev)
    if variance_type in LEARNED:
        return np.ones_like(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"fixed_small": np.sqrt(var), "fixed_small_log": np.exp(0.5 * np.log(var)),
                "fixed_large": np.sqrt(np.maximum(beta, 0.0))}[variance_type]


def learned_range_bounds(abar_t, abar_prev) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with learned_range's s^2 = exp(a + b*v): a = (log beta_t + log beta~_t)/2, b = (log beta_t -
    log beta~_t)/2 (the interpolation f log beta_t + (1 - f) log beta~_t with f = (v + 1)/2)."""
    _, beta, var = posterior(abar_t, abar_prev)
    with np.errstate(divide="ignore"):
        hi, lo = np.log(beta), np.log(var)
    a, b = 0.5 * (hi + lo), 0.5 * (hi - lo)
    return np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)  # beta_t = 0 only at t <= 0 rows


def ddpm_step(abar_t, abar_prev, noise, *, variance_type: str = "fixed_small", prediction_type: str = "epsilon",
              clip=None, x0_given: bool = False, guidance=None, row_label: str = "timestep") -> Plan:
    """The plan of DDPM steps abar_t -> abar_prev (float64 arrays, one entry per row).

    noise: per row (or one bool), whether the step adds noise (diffusers: t > 0). clip: clamp x0 to
    [-clip, clip]. x0_given: x0 comes in as history slot m0 (dynamic thresholding), one output. guidance:
    classifier-free guidance scale g. Learned variance types read ``var_table``/``component`` (see the module
    docstring).
    """
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    check_variance_type(variance_type)
    abar_t, abar_prev = np.broadcast_arrays(np.asarray(abar_t, np.float64), np.asarray(abar_prev, np.float64))
    noise = np.broadcast_to(np.asarray(noise, bool), abar_t.shape)
    pred = predict(prediction_type, np.sqrt(abar_t), np.sqrt(1.0 - abar_t))
    alpha, beta, _ = posterior(abar_t, abar_prev)
    x0 = M0 if x0_given else X0
    mean = np.sqrt(abar_prev) * beta / (1.0 - abar_t) * x0 + np.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t) * X
    std = np.where(noise, fixed_std(abar_t, abar_prev, variance_type), 0.0)
    var = LEARNED_VAR if variance_type in LEARNED and noise.any() else None
    outputs = {"x": mean + std * Z, **({} if x0_given else {"x0": X0})}
    return plan(f"ddpm({variance_type}, {prediction_type})", x0=pred.x0, outputs=outputs,
                clip=None if x0_given else clip, guidance=guidance, var=var, rows=abar_t.shape, row_label=row_label)


def ddpm_plan(alphas_cumprod, timesteps, prev_timesteps, *, noise=None, clip_sample=False,
              clip_sample_range: float = 1.0, **step) -> Plan:
    """The plan of DDPM steps t -> prev_t over the training schedule ``alphas_cumprod``: ``timesteps`` and
    ``prev_timesteps`` int arrays (one entry per row); t = -1 indexes the last entry, as diffusers does; a
    negative prev_t is the end of the chain (abar = 1). ``noise`` (default t > 0) and ``step``: as in
    ``ddpm_step``."""
    abar = np.asarray(alphas_cumprod, np.float64)
    t, prev = np.asarray(timesteps), np.asarray(prev_timesteps)
    if t.shape != prev.shape:
        raise ValueError(f"prev_timesteps: expected shape {t.shape} (like timesteps), got {prev.shape}")
    if t.size and (t.min() < -1 or t.max() >= len(abar)):
        raise ValueError(f"timesteps: expected values in [-1, {len(abar)}), got {t.min()}..{t.max()}")
    if prev.size and prev.max() >= len(abar):
        raise ValueError(f"prev_timesteps: expected values < {len(abar)}, got {prev.max()}")
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], 1.0)
    noise = t > 0 if noise is None else noise
    return ddpm_step(abar[t], abar_prev, noise, clip=clip_sample_range if clip_sample else None, **step)

