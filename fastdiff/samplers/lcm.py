"""Latent consistency models' multistep sampling (Luo et al. 2023, arXiv 2310.04378, eq. 9-10 and Algorithm 3;
consistency models: Song et al. 2023) as a plan builder, as diffusers' ``LCMScheduler`` steps it.

The consistency function's boundary conditions c_skip(0) = 1, c_out(0) = 0 come from the scalings of the
discrete timestep t (sigma_data = 0.5, ``timestep_scaling`` = 10 in diffusers):

    s      = t * timestep_scaling
    c_skip = sigma_data^2/(s^2 + sigma_data^2),   c_out = s/sqrt(s^2 + sigma_data^2)
    x0     = the data prediction (``predictions``), clipped or dynamically thresholded (then slot m0)
    f      = c_skip*x + c_out*x0                                  (the denoised output, "denoised")
    x_prev = sqrt(abar_prev)*f + sqrt(1 - abar_prev)*z            (re-noised to the next timestep)

and x_prev = f on rows without noise (diffusers: the step with index num_inference_steps - 1). Output 0 is
x_prev, output 1 the denoised f.
"""

from __future__ import annotations

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import M0, X0, X, Z, plan
from fastdiff.samplers.predictions import check_prediction_type, predict

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SIGMA_DATA = 0.5


def boundary_scalings(timesteps, timestep_scaling: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) of discrete timesteps (float64): c_skip(0) = 1, c_out(0) = 0."""
    s = np.asarray(timesteps, np.float64) * float(timestep_scaling)
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / np.sqrt(s**2 + SIGMA_DATA**2)
    return c_skip, c_out


def lcm_step(abar_t, abar_prev, timesteps, noise, *, timestep_scaling: float = 10.0,
             prediction_type: str = "epsilon", clip=None, x0_given: bool = False, guidance=None,
             row_label: str = "step") -> Plan:
    """The plan of LCM steps at `timesteps` (abar_t = abar at them) re-noised to abar_prev (float64 arrays,
    one entry per row). noise: per row (or one bool), whether the step re-noises. clip: clamp x0 to
    [-clip, clip]. x0_given: x0 comes in as history slot m0 (dynamic thresholding). guidance: classifier-free
    guidance scale g."""
    check_prediction_type(prediction_type, PREDICTION_TYPES)
    abar_t, abar_prev, t = np.broadcast_arrays(np.asarray(abar_t, np.float64), np.asarray(abar_prev, np.float64),
                                               np.asarray(timesteps, np.float64))
    noise = np.broadcast_to(np.asarray(noise, bool), abar_t.shape)
    pred = predict(prediction_type, np.sqrt(abar_t), np.sqrt(1.0 - abar_t))
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    denoised = c_skip * X + c_out * (M0 if x0_given else X0)
    x_prev = np.where(noise, np.sqrt(abar_prev), 1.0) * denoised + np.where(noise, np.sqrt(1.0 - abar_prev), 0.0) * Z
    return plan(f"lcm({prediction_type})", x0=pred.x0, outputs={"x": x_prev, "x0": denoised},
                clip=None if x0_given else clip, guidance=guidance, rows=abar_t.shape, row_label=row_label)


def lcm_plan(alphas_cumprod, timesteps, *, num_inference_steps: int | None = None, final_alpha_cumprod: float = 1.0,
             clip_sample=False, clip_sample_range: float = 1.0, **step) -> Plan:
    """The plan of a run over descending ``timesteps`` (int array, one row per step), as diffusers' LCM
    steps it: step i re-noises to timesteps[i+1] (the last step to its own timestep; a negative one to
    ``final_alpha_cumprod``) unless i == num_inference_steps - 1 (default: the last step). ``step``: the
    keywords of ``lcm_step``."""
    abar = np.asarray(alphas_cumprod, np.float64)
    t = np.asarray(timesteps, np.int64)
    if t.ndim != 1 or not len(t) or t.max() >= len(abar) or t.min() < -len(abar):
        raise ValueError(f"timesteps: expected a non-empty 1-D array of values < {len(abar)}, got {t.tolist()}")
    prev = np.append(t[1:], t[-1])
    abar_prev = np.where(prev >= 0, abar[prev], final_alpha_cumprod)
    n = len(t) if num_inference_steps is None else num_inference_steps
    noise = np.arange(len(t)) != n - 1
    return lcm_step(abar[t], abar_prev, t, noise, clip=clip_sample_range if clip_sample else None, **step)
