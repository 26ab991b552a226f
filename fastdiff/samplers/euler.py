"""Euler (with churn), Euler ancestral and Heun in sigma space as plan builders (Karras et al., "Elucidating
the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, arXiv 2206.00364, Algorithms 1-2;
k-diffusion's ``sample_euler``/``sample_euler_ancestral``/``sample_heun``; diffusers'
``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``).

Coordinates are VE: ``x = x0 + sigma*eps`` (alpha = 1), and the data prediction D(x; sigma) of each
prediction type is ``predict(prediction_type, 1, sigma)`` (for v: x0 = x/(1+s^2) - s*v/sqrt(1+s^2),
docs/methods.md 0.1). With d = (x - D)/sigma the probability-flow ODE's derivative (Karras eq. 4):

    Euler      x_hat  = x + lift*z                       churn: lift = s_noise*sqrt(sigma_hat^2 - sigma^2)
               x0     = D(x_hat; sigma_hat),  d = (x_hat - x0)/sigma_hat
               x_next = x_hat + (sigma_next - sigma_hat)*d  (+ lift_next*z)
    ancestral  x0 = D(x; sigma),  x_next = x + (sigma_down - sigma)*(x - x0)/sigma + s_noise*sigma_up*z
    Heun       call 1 at (x, sigma):       x0 = D(x; sigma),  x_2 = x + (sigma_next - sigma)*(x - x0)/sigma
               call 2 at (x_2, sigma_next): x0_2 = D(x_2; sigma_next),
                     x_next = x_s + (sigma_next - sigma)*((x_s - m0)/sigma + (x_2 - x0_2)/sigma_next)/2

Every row is linear in the step's terms, so each model call is one fused step (docs/methods.md, section 7).
Heun's second call reads what the first left: its x0 (history slot m0) and its start sample x_s. The
start arrives as history slot m1 (``X_START``; docs/methods.md, sections 7.4 and 8): a caller hands
both saved tensors by reference (``Stepper.step(..., m=[x0, x_s])``), so the first call writes no copy of
its input and the x0 it hands back is never a reused ring buffer.

Churn comes in two placements, since the model must see the sample its output is read at:
``churn="diffusers"`` lifts inside the step, after the model saw x (diffusers' EulerDiscreteScheduler:
model_output comes from x, is read at x_hat); ``churn="karras"`` adds the next step's lift to this step's
output (``lift_next``), so the model sees x_hat (Algorithm 2; the first lift is the caller's: draw x_T
with std sigma_hat_0).
"""

from __future__ import annotations

import math

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import M0, M1, X0, X, Z, plan
from fastdiff.samplers.predictions import check_prediction_type, predict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
X_START = M1  # Heun's second call: the sample its step started from (given by the caller, by reference)


def _f64(*values) -> list[np.ndarray]:
    return np.broadcast_arrays(*(np.asarray(v, np.float64) for v in values))


def _check_positive(name: str, v: np.ndarray) -> None:
    bad = np.flatnonzero(~(v > 0))
    if len(bad):
        raise ValueError(f"{name}: expected > 0 (it divides: d = (x - x0)/{name}), got {v.flat[bad[0]]} at row "
                         f"{bad[0]}")


def _denoised(pred, clip):
    """D in an update: the kernel's x0 when clamped, else its form of x and e - so that d = (x - D)/sigma is
    combined on the host in float64 (for eps, d = e exactly), not as x/sigma - x0/sigma in float32."""
    return X0 if clip is not None else pred.x0


def churn_sigmas(sigmas, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf) -> np.ndarray:
    """sigma_hat_i = sigma_i*(1 + gamma_i), gamma_i = min(S_churn/N, sqrt2 - 1) for sigma_i in [S_tmin, S_tmax]
    else 0 (Algorithm 2; N = len(sigmas) - 1 steps): float64 [N]."""
    sigmas = np.asarray(sigmas, np.float64)
    n = len(sigmas) - 1
    sigma = sigmas[:-1]
    gamma = np.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / n, 2**0.5 - 1), 0.0)
    return sigma * (gamma + 1)


def euler_step(sigma, sigma_hat, sigma_next, *, lift=0.0, lift_next=0.0, x0_sigma=None,
               prediction_type: str = "epsilon", guidance=None, row_label: str = "step") -> Plan:
    """Rows of Euler steps (arrays over rows): outputs x_next and x0 (both read z when lifted).

    lift: std of the churn noise added to x before the data prediction (in-step placement); lift_next:
    std of the noise added to x_next (the next step's lift, Karras' placement); a row uses at most one
    (both would read the same z). x0_sigma: the sigma of D's prediction-type algebra (default sigma_hat;
    diffusers' Euler reads v at the un-churned sigma). D is linear in x, so D(x_hat) = D(x) + dD/dx*lift*z:
    the kernel's x0 is D(x) and the lift's share is a z term of the outputs.
    """
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    sigma, sigma_hat, sigma_next, lift, lift_next = _f64(sigma, sigma_hat, sigma_next, lift, lift_next)
    _check_positive("sigma_hat", sigma_hat)
    both = np.flatnonzero((lift != 0) & (lift_next != 0))
    if len(both):
        raise ValueError(f"lift, lift_next: a row draws one z, so it cannot lift both x and x_next (row {both[0]})")
    pred = predict(prediction_type, 1.0, sigma_hat if x0_sigma is None else x0_sigma)
    x_hat = X + lift * Z
    shift = pred.x0["x"] * lift * Z  # D(x_hat) - D(x)
    d = (x_hat - (pred.x0 + shift)) / sigma_hat  # D as its form of x and e: no cancellation in the kernel
    x0 = X0 + shift
    x_next = x_hat + (sigma_next - sigma_hat) * d + lift_next * Z
    return plan(f"euler ({prediction_type})", x0=pred.x0, outputs={"x": x_next, "x0": x0}, guidance=guidance,
                rows=sigma.shape, row_label=row_label)


def euler_plan(sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
               churn: str = "karras", prediction_type: str = "epsilon", guidance=None) -> Plan:
    """The N steps of Euler over descending ``sigmas`` [N+1] (k-diffusion's ``sample_euler``), churn placed
    as the module docstring says ("karras": the caller draws x_T with std ``churn_sigmas(...)[0]``)."""
    if churn not in ("karras", "diffusers"):
        raise ValueError(f"churn: expected 'karras' or 'diffusers', got {churn!r}")
    sigmas = np.asarray(sigmas, np.float64)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_hat = churn_sigmas(sigmas, s_churn, s_tmin, s_tmax)
    lift = s_noise * np.sqrt(sigma_hat**2 - sigma**2)
    lifts = dict(lift=lift) if churn == "diffusers" else dict(lift_next=np.append(lift[1:], 0.0))
    return euler_step(sigma, sigma_hat, sigma_next, prediction_type=prediction_type, guidance=guidance, **lifts)


def ancestral_sigmas(sigma, sigma_next, eta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_down, sigma_up), sigma_up = min(sigma_next, eta*sqrt(sigma_next^2 (sigma^2 - sigma_next^2)/sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2), so sigma_down^2 + sigma_up^2 = sigma_next^2 (float64).
    sigma_down is taken in the form that does not cancel, sigma_next*sqrt((1 - eta^2) sigma^2 + eta^2
    sigma_next^2)/sigma (sigma_next^2/sigma at eta = 1): the difference keeps few digits on a step from a
    large sigma (zero-SNR or squaredcos_cap_v2 grids, sigma_max ~ 4e3-2e4)."""
    sigma, sigma_next = _f64(sigma, sigma_next)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(sigma > 0, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5, 0)
        down = np.where(sigma > 0, sigma_next * np.maximum((1 - eta**2) * sigma**2 + eta**2 * sigma_next**2, 0.0)
                        ** 0.5 / sigma, sigma_next)
    return down, np.minimum(sigma_next, up)


def euler_ancestral_step(sigma, sigma_down, sigma_up, *, s_noise: float = 1.0, prediction_type: str = "epsilon",
                         guidance=None, row_label: str = "step") -> Plan:
    """Rows of ancestral Euler steps: x_next = x + (sigma_down - sigma)*d + s_noise*sigma_up*z; outputs x_next, x0."""
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    sigma, sigma_down, sigma_up = _f64(sigma, sigma_down, sigma_up)
    _check_positive("sigma", sigma)
    pred = predict(prediction_type, 1.0, sigma)
    d = (X - pred.x0) / sigma
    x_next = X + (sigma_down - sigma) * d + s_noise * sigma_up * Z
    return plan(f"euler ancestral ({prediction_type})", x0=pred.x0, outputs={"x": x_next, "x0": X0},
                guidance=guidance, rows=sigma.shape, row_label=row_label)


def euler_ancestral_plan(sigmas, *, eta: float = 1.0, s_noise: float = 1.0, prediction_type: str = "epsilon",
                         guidance=None) -> Plan:
    """The N ancestral steps over descending ``sigmas`` [N+1] (k-diffusion's ``sample_euler_ancestral``)."""
    sigmas = np.asarray(sigmas, np.float64)
    down, up = ancestral_sigmas(sigmas[:-1], sigmas[1:], eta)
    return euler_ancestral_step(sigmas[:-1], down, up, s_noise=s_noise, prediction_type=prediction_type,
                                guidance=guidance)


def heun_first(sigma, sigma_next, *, prediction_type: str = "epsilon", clip=None, guidance=None,
               row_label: str = "step") -> Plan:
    """Rows of Heun's first call (an Euler step, sigma -> sigma_next; arrays over rows): outputs x_2, x0,
    x0 clamped to [-clip, clip] when clip is given (diffusers' clip_sample). Into sigma_next = 0 this
    Euler step is the whole step."""
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    sigma, sigma_next = _f64(sigma, sigma_next)
    _check_positive("sigma", sigma)
    pred = predict(prediction_type, 1.0, sigma)
    x_2 = X + (sigma_next - sigma) * (X - _denoised(pred, clip)) / sigma
    return plan(f"heun 1 ({prediction_type})", x0=pred.x0, outputs={"x": x_2, "x0": X0}, clip=clip,
                guidance=guidance, rows=sigma.shape, row_label=row_label)


def heun_second(sigma, sigma_next, *, lift_next=0.0, prediction_type: str = "epsilon", clip=None, guidance=None,
                row_label: str = "step") -> Plan:
    """Rows of Heun's second call, at x = x_2 and sigma_next > 0: outputs x_next, x0_2 (clamped as the
    first's). Reads m0 = the first call's x0 and m1 = ``X_START``, the first call's input sample.
    lift_next: std of the noise added to x_next (the next step's churn, Karras' placement, as in Euler)."""
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    sigma, sigma_next, lift_next = _f64(sigma, sigma_next, lift_next)
    _check_positive("sigma", sigma)
    bad = np.flatnonzero(~(sigma_next > 0))
    if len(bad):
        raise ValueError(f"sigma_next: Heun's second call runs at sigma_next > 0 (into sigma = 0 the first call's "
                         f"Euler step is the step), got {sigma_next[bad[0]]} at {row_label} {bad[0]}")
    pred_2 = predict(prediction_type, 1.0, sigma_next)
    d, d_2 = (X_START - M0) / sigma, (X - _denoised(pred_2, clip)) / sigma_next
    x_next = X_START + (sigma_next - sigma) * (d + d_2) / 2 + lift_next * Z
    return plan(f"heun 2 ({prediction_type})", x0=pred_2.x0, outputs={"x": x_next, "x0": X0}, clip=clip,
                guidance=guidance, rows=sigma.shape, row_label=row_label)


def heun_plans(sigmas, *, prediction_type: str = "epsilon", clip=None, guidance=None) -> tuple[Plan, Plan | None]:
    """(first, second) over descending ``sigmas`` [N+1] (k-diffusion's ``sample_heun`` without churn): step
    i runs first's row i, then - unless sigma_{i+1} = 0, the last step of a run to 0 - second's row i (second
    is None for a one-step run to 0: it has no second call)."""
    sigmas = np.asarray(sigmas, np.float64)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    two = sigma_next > 0
    kw = dict(prediction_type=prediction_type, clip=clip, guidance=guidance)
    return heun_first(sigma, sigma_next, **kw), heun_second(sigma[two], sigma_next[two], **kw) if two.any() else None
