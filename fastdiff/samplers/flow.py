"""Rectified-flow Euler sampling (Liu et al., ICLR 2023; SD3: Esser et al. 2024, "Scaling Rectified Flow
Transformers", arXiv 2403.03206) as a plan builder, and the sigma grids of diffusers'
``FlowMatchEulerDiscreteScheduler``.

The sample is ``x = (1 - s)*x0 + s*eps`` and the model predicts the velocity ``u = eps - x0 = dx/ds``
(``predictions``' flow form: x0 = x - s*u). A step from s to s_next is

    Euler:       x_next = x + (s_next - s)*u
    stochastic:  x_next = (1 - s_next)*x0 + s_next*z,     x0 = x - s*u      (re-noised to s_next)

Grids (``flow_sigmas``): the training grid s_i = i/T shifted (Esser et al. 2024, eq. 23: s' = shift*s/(1 +
(shift - 1)*s)), or resolution-dependent ("dynamic") shifting with mu: exponential e^mu/(e^mu + (1/s - 1)),
linear mu/(mu + (1/s - 1)); optional stretch so the last sigma is ``shift_terminal``; optional Karras,
exponential or beta(0.6, 0.6) respacing between the first and last sigma. Computed with diffusers'
float32/float64 arithmetic so that the grids are equal. (These grid functions belong in
``fastdiff.schedules``.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import schedules
from fastdiff.plan import Plan
from fastdiff.samplers.forward import q_sample_plan
from fastdiff.samplers.kit import E0, X0, X, Z, plan
from fastdiff.samplers.predictions import predict

TIME_SHIFT_TYPES = ("exponential", "linear")


def shift_sigmas(sigmas, shift: float):
    """SD3's timestep shift s' = shift*s/(1 + (shift - 1)*s) (Esser et al. 2024, eq. 23), in the dtype of
    `sigmas` (a float32 torch tensor, or a float32/float64 numpy array)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Resolution-dependent shifting: e^mu/(e^mu + (1/s - 1)) or mu/(mu + (1/s - 1)) (Flux, SD3)."""
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type: expected one of {TIME_SHIFT_TYPES}, got {kind!r}")
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1) ** 1.0)


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Scale 1 - s so that the last sigma becomes `shift_terminal` (LTX-Video)."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - one_minus / scale


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """sigma_max..sigma_min at the beta(alpha, beta) quantiles of 1 - linspace(0, 1, n) (Lee et al. 2024,
    "Beta Sampling is All You Need"); needs scipy, as diffusers does."""
    import scipy.stats

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def train_sigmas(num_train_timesteps: int, shift: float = 1.0, dynamic: bool = False) -> torch.Tensor:
    """The training grid, float32 [T] descending: s_i = i/T, i = T..1, shifted unless shifting is dynamic."""
    T = num_train_timesteps
    s = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
    return s if dynamic else shift_sigmas(s, shift)


def flow_sigmas(num_inference_steps: int | None, sigma_min: float, sigma_max: float, num_train_timesteps: int,
                *, shift: float = 1.0, mu: float | None = None, sigmas=None, timesteps=None,
                use_dynamic_shifting: bool = False, time_shift_type: str = "exponential", shift_terminal=None,
                spacing: str | None = None, config_sigma_min=None, config_sigma_max=None,
                invert_sigmas: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas float32 [N+1] with the final 0, or 1 when inverted; timesteps float32 [N]) as
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes them. Default grid: linspace(sigma_max*T,
    sigma_min*T, N)/T (float64), or the given `sigmas` (float32) / `timesteps` (float32, /T); then shifting,
    terminal stretch and respacing (`spacing`: None, "karras", "exponential", "beta"; its bounds
    ``config_sigma_min``/``config_sigma_max`` default to the grid's ends)."""
    T = num_train_timesteps
    if timesteps is not None:
        timesteps = np.array(timesteps).astype(np.float32)
    if sigmas is None:
        grid = np.linspace(sigma_max * T, sigma_min * T, num_inference_steps) if timesteps is None else timesteps
        s = grid / T
    else:
        s = np.array(sigmas).astype(np.float32)
    n = len(s)
    s = time_shift(mu, s, time_shift_type) if use_dynamic_shifting else shift_sigmas(s, shift)
    if shift_terminal:
        s = stretch_to_terminal(s, shift_terminal)
    if spacing is not None:
        lo = config_sigma_min if config_sigma_min is not None else s[-1].item()
        hi = config_sigma_max if config_sigma_max is not None else s[0].item()
        s = {"karras": schedules.karras_sigmas, "exponential": schedules.exponential_sigmas,
             "beta": beta_sigmas}[spacing](lo, hi, n)
    s = torch.from_numpy(np.asarray(s)).to(torch.float32)
    t = torch.from_numpy(timesteps) if timesteps is not None else s * T
    if invert_sigmas:
        s = 1.0 - s
        t = s * T
    return torch.cat([s, torch.full((1,), 1.0 if invert_sigmas else 0.0)]), t


def flow_euler_step(sigma, sigma_next, *, stochastic: bool = False, guidance=None, row_label: str = "step") -> Plan:
    """The plan of flow-matching Euler steps sigma -> sigma_next (float64 arrays, one entry per row); the
    model output E0 is the velocity. stochastic: re-noise the data prediction to sigma_next instead."""
    sigma, sigma_next = np.broadcast_arrays(np.asarray(sigma, np.float64), np.asarray(sigma_next, np.float64))
    if stochastic:
        pred = predict("flow_prediction", 1.0 - sigma, sigma)
        return plan("flow euler (stochastic)", x0=pred.x0, outputs={"x": (1.0 - sigma_next) * X0 + sigma_next * Z},
                    guidance=guidance, rows=sigma.shape, row_label=row_label)
    return plan("flow euler", outputs={"x": X + (sigma_next - sigma) * E0}, guidance=guidance, rows=sigma.shape,
                row_label=row_label)


def flow_euler_plan(sigmas, **step) -> Plan:
    """The plan of a run over the grid ``sigmas`` [N+1] (step i: sigmas[i] -> sigmas[i+1])."""
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or len(s) < 2 or not np.isfinite(s).all():
        raise ValueError(f"sigmas: expected a 1-D grid of N+1 >= 2 finite sigmas, got {s.tolist()}"[:300])
    return flow_euler_step(s[:-1], s[1:], **step)


def scale_noise_plan(sigmas) -> Plan:
    """The forward process x_s = (1 - s)*x0 + s*noise, one row per entry of the grid (diffusers' scale_noise)."""
    s = np.asarray(sigmas, np.float64)
    return q_sample_plan(1.0 - s, s, row_label="step")
