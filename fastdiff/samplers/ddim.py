"""DDIM (Song, Meng, Ermon, ICLR 2021, eq. 12) as a plan builder; eta = 1 is DDPM's ancestral step.

    x0     = the data prediction of the model output (``predictions``), clipped to [-r, r] or
             dynamically thresholded (then it arrives as history slot m0)
    eps    = the noise prediction (or, with ``use_clipped_model_output``, the eps the clipped x0 implies)
    sigma  = eta * sqrt((1 - abar_prev)/(1 - abar_t)) * sqrt(1 - abar_t/abar_prev)
    x_prev = sqrt(abar_prev)*x0 + sqrt(1 - abar_prev - sigma^2)*eps + sigma*z

as in diffusers' ``DDIMScheduler.step`` (docs/methods.md, section 1). Output 0 is x_prev, output 1 x0.
"""

from __future__ import annotations

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import M0, X0, Z, plan
from fastdiff.samplers.predictions import check_prediction_type, eps_from_x0, predict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' DDIM has no flow_prediction


def ddim_step(abar_t, abar_prev, *, eta: float = 0.0, prediction_type: str = "epsilon", clip=None,
              use_clipped_model_output: bool = False, x0_given: bool = False, with_x0: bool = True,
              guidance=None, row_label: str = "step") -> Plan:
    """The plan of DDIM steps from abar_t to abar_prev (float64 arrays, one entry per row).

    clip: clamp x0 to [-clip, clip] (None: no clamp). x0_given: x0 comes in as history slot m0 (dynamic
    thresholding thresholds it between two kernels), and no x0 output. with_x0: output 1 is x0.
    guidance: classifier-free guidance scale g (the model output is then uncond + g*(cond - uncond)).
    """
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    abar_t, abar_prev = np.broadcast_arrays(np.asarray(abar_t, np.float64), np.asarray(abar_prev, np.float64))
    alpha_t, sigma_t = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
    pred = predict(prediction_type, alpha_t, sigma_t)
    x0 = M0 if x0_given else X0
    eps = eps_from_x0(alpha_t, sigma_t, x0) if use_clipped_model_output else pred.eps
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    sigma = eta * np.sqrt(np.maximum(variance, 0.0))  # max: rounding can make a zero variance negative
    x_prev = np.sqrt(abar_prev) * x0 + np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps + sigma * Z
    outputs = {"x": x_prev, **({"x0": X0} if with_x0 and not x0_given else {})}
    return plan(f"ddim(eta={eta}, {prediction_type})", x0=pred.x0, outputs=outputs,
                clip=None if x0_given else clip, guidance=guidance, rows=abar_t.shape, row_label=row_label)


def ddim_x0(abar_t, *, prediction_type: str = "epsilon", guidance=None, row_label: str = "step") -> Plan:
    """Rows that output only the unclamped data prediction x0 (the first kernel of dynamic thresholding)."""
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    abar_t = np.asarray(abar_t, np.float64)
    pred = predict(prediction_type, np.sqrt(abar_t), np.sqrt(1.0 - abar_t))
    return plan(f"ddim x0 ({prediction_type})", x0=pred.x0, outputs={"x": X0}, guidance=guidance,
                rows=abar_t.shape, row_label=row_label)


def ddim_plan(alphas_cumprod, timesteps, prev_timesteps, *, final_alpha_cumprod: float = 1.0, clip_sample=False,
              clip_sample_range: float = 1.0, **step) -> Plan:
    """The plan of DDIM steps t -> prev_t over the training schedule ``alphas_cumprod``.

    ``timesteps``/``prev_timesteps``: ``[steps]`` or ``[steps, B]`` (per-sample) integer timesteps; a
    negative previous timestep means the end of the chain (``final_alpha_cumprod``). ``step``: the
    keywords of ``ddim_step``.
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
    return ddim_step(abar[t], abar_prev, clip=clip_sample_range if clip_sample else None, **step)
