"""DDIM (Song, Meng, Ermon, ICLR 2021) as a plan builder; eta = 1 is DDPM ancestral sampling.

    x0     = data prediction (linear in x and the model output for every prediction type), clipped
    sigma  = eta * sqrt((1 - abar_prev)/(1 - abar_t)) * sqrt(1 - abar_t/abar_prev)
    x_prev = sqrt(abar_prev)*x0 + sqrt(1 - abar_prev - sigma^2)*eps + sigma*z

as in diffusers' ``DDIMScheduler.step`` (METHODS.md section 1). Output 0 is x_prev, output 1 is x0.
"""

from __future__ import annotations

import numpy as np

from fastdiff import layout as L
from fastdiff.plan import Plan, Terms, new_table

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


def ddim_coefficients(
    abar_t: np.ndarray,
    abar_prev: np.ndarray,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    x0_in_slot: bool = False,
) -> np.ndarray:
    """Coefficient rows ``[..., NUM_COEF]`` (float64) of DDIM steps from abar_t to abar_prev.

    Every prediction type is linear: with alpha = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
        epsilon: x0 = (x - sigma_t*e)/alpha,  eps = e       (AS = 1/alpha: subtract, then scale)
        v:       x0 = alpha*x - sigma_t*e,    eps = alpha*e + sigma_t*x
        sample:  x0 = e,                      eps = (x - alpha*e)/sigma_t
    and with ``use_clipped_model_output`` eps = (x - alpha*x0_clipped)/sigma_t. ``x0_in_slot``: x0 comes
    in as history slot m0 instead of being computed (dynamic thresholding: x0 is thresholded between
    two kernels), and output 1 is omitted.
    """
    check_prediction_type(prediction_type)
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    abar_t, abar_prev = np.broadcast_arrays(np.asarray(abar_t, np.float64), np.asarray(abar_prev, np.float64))
    alpha, sigma_t = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 1.0
        if prediction_type == "epsilon":
            scale, ax, ae, eps_x, eps_e = 1.0 / alpha, 1.0, -sigma_t, 0.0, 1.0
        elif prediction_type == "v_prediction":
            ax, ae, eps_x, eps_e = alpha, -sigma_t, sigma_t, alpha
        else:
            ax, ae, eps_x, eps_e = 0.0, 1.0, 1.0 / sigma_t, -alpha / sigma_t
        eps_x0 = 0.0
        if use_clipped_model_output:
            eps_x, eps_e, eps_x0 = 1.0 / sigma_t, 0.0, -alpha / sigma_t
        variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = eta * np.sqrt(np.maximum(variance, 0.0))
    direction = np.sqrt(np.maximum(1.0 - abar_prev - std**2, 0.0))

    c = new_table(*abar_t.shape)
    c[..., L.AS], c[..., L.AX], c[..., L.AE0], c[..., L.R] = scale, ax, ae, clip_sample_range
    x0_col = L.out(0, L.CM0) if x0_in_slot else L.out(0, L.CX0)
    c[..., x0_col] = np.sqrt(abar_prev) + direction * eps_x0
    c[..., L.out(0, L.CX)] = direction * eps_x
    c[..., L.out(0, L.CE0)] = direction * eps_e
    c[..., L.out(0, L.CZ)] = std
    if not x0_in_slot:
        c[..., L.out(1, L.CX0)] = 1.0
    return c


def ddim_plan(
    alphas_cumprod: np.ndarray,
    timesteps: np.ndarray,
    prev_timesteps: np.ndarray,
    *,
    final_alpha_cumprod: float = 1.0,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    with_x0: bool = True,
    x0_in_slot: bool = False,
) -> Plan:
    """The plan of DDIM steps t -> prev_t over the training schedule ``alphas_cumprod``.

    ``timesteps``/``prev_timesteps``: ``[steps]`` or ``[steps, B]`` (per-sample) integer timesteps; a
    negative previous timestep means the end of the chain (``final_alpha_cumprod``).
    """
    abar = np.asarray(alphas_cumprod, np.float64)
    t, prev = np.asarray(timesteps), np.asarray(prev_timesteps)
    if t.shape != prev.shape:
        raise ValueError(f"prev_timesteps: expected shape {t.shape} (like timesteps), got {prev.shape}")
    if t.size and (t.min() < 0 or t.max() >= len(abar)):
        raise ValueError(f"timesteps: expected values in [0, {len(abar)}), got {t.min()}..{t.max()}")
    if prev.size and prev.max() >= len(abar):
        raise ValueError(f"prev_timesteps: expected values < {len(abar)}, got {prev.max()}")
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final_alpha_cumprod)
    table = ddim_coefficients(abar[t], abar_prev, eta=eta, prediction_type=prediction_type,
                              clip_sample_range=clip_sample_range,
                              use_clipped_model_output=use_clipped_model_output, x0_in_slot=x0_in_slot)
    terms = Terms(n_e=1, n_m=1 if x0_in_slot else 0, noise=bool(eta > 0),
                  clamp=clip_sample and not x0_in_slot, n_out=2 if (with_x0 and not x0_in_slot) else 1)
    return Plan(table, terms, name=f"ddim(eta={eta}, {prediction_type})")


def q_sample_coefficients(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Rows of the forward process x_t = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*eps, one per timestep
    (x = x0, noise = eps; diffusers' ``add_noise``)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    c = new_table(len(abar))
    c[:, L.out(0, L.CX)], c[:, L.out(0, L.CZ)] = np.sqrt(abar), np.sqrt(1.0 - abar)
    return c


def velocity_coefficients(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Rows of the v-prediction target v_t = sqrt(abar_t)*eps - sqrt(1 - abar_t)*x0 (Salimans & Ho 2022),
    one per timestep (x = x0, noise = eps; diffusers' ``get_velocity``)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    c = new_table(len(abar))
    c[:, L.out(0, L.CX)], c[:, L.out(0, L.CZ)] = -np.sqrt(1.0 - abar), np.sqrt(abar)
    return c
