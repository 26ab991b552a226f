"""DPM-Solver++ in sigma space, as k-diffusion formulates it (Lu et al., "DPM-Solver++", arXiv 2211.01095;
k-diffusion ``sampling.py``): plan builders for ``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``,
``sample_dpmpp_3m_sde`` and ``sample_dpmpp_sde``.

The sample is in k-diffusion's coordinates, ``x = x0 + sigma*eps``, and the model is a denoiser: its output
is the data prediction itself (``x0 = E0``). With ``t = -log sigma`` and ``h = t_next - t``, a step is

    2M:      x_next = (s_next/s) x - expm1(-h) (D + (D - D_prev)/(2r)),    r = h_prev/h
    2M SDE:  x_next = (s_next/s) e^{-eta h} x + b D + c (D - D_prev)/r + s_next sqrt(1 - e^{-2 eta h}) s_noise z
             b = 1 - e^{-h - eta h};  c = b/2 (midpoint), or 1 - b/(h + eta h) (heun)
    3M SDE:  a third-order correction from the last two denoised outputs (phi_2, phi_3 in h (1 + eta))

and a step to sigma = 0 returns the denoised output (the limit h -> inf, taken here). ``D`` is this step's
denoised output, the history slots hold the previous ones (role "history"). Each builder returns the
plan and, per row, the step it belongs to and whether it draws noise. ``guidance=g``: the model outputs
come as (uncond, cond) pairs, combined as uncond + g*(cond - uncond) in the step.
"""

from __future__ import annotations

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import E0, M0, M1, X0, X_LAST, X, Z, plan


def _grid(sigmas):
    """(s, s_next, h, last) per step: sigmas [N+1] float64, h = log(s/s_next) (inf at the last step to 0)."""
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or np.any(sigmas[:-1] <= 0) or sigmas[-1] < 0:
        raise ValueError(f"sigmas: expected N+1 >= 2 positive sigmas (the last may be 0), got {sigmas.tolist()}")
    s, s_next = sigmas[:-1], sigmas[1:]
    last = s_next == 0
    with np.errstate(divide="ignore"):
        h = np.log(s) - np.log(s_next)
    return s, s_next, h, last


def _prev(a, steps_back: int, fill=np.nan):
    """a shifted so that row i holds a[i - steps_back] (fill before the start)."""
    return np.concatenate([np.full(steps_back, fill), a[:-steps_back]]) if steps_back else a


def dpmpp_2m(sigmas, guidance=None) -> tuple[Plan, list, list]:
    """DPM-Solver++(2M): k-diffusion's ``sample_dpmpp_2m``."""
    s, s_next, h, last = _grid(sigmas)
    use = (np.arange(len(s)) > 0) & ~last  # the previous denoised output exists and the step is not the last
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(use, _prev(h, 1) / np.where(last, 1.0, h), 1.0)
        ratio, phi = np.where(last, 0.0, s_next / s), np.where(last, -1.0, np.expm1(-h))
    c = np.where(use, 1.0 / (2 * r), 0.0)
    x_next = ratio * X - phi * (X0 + c * (X0 - M0))
    steps = list(range(len(s)))
    return plan("dpmpp_2m", x0=E0, outputs={"x": x_next, "history": X0}, guidance=guidance), steps, [False] * len(s)


def dpmpp_2m_sde(sigmas, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint", guidance=None):
    """DPM-Solver++(2M) SDE: k-diffusion's ``sample_dpmpp_2m_sde`` (``solver_type`` midpoint or heun)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    s, s_next, h, last = _grid(sigmas)
    use = (np.arange(len(s)) > 0) & ~last
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h_ = np.where(last, 1.0, h)  # finite stand-ins on the last row, whose coefficients are set apart
        eta_h = eta * h_
        b = -np.expm1(-h_ - eta_h)
        r = np.where(use, _prev(h, 1) / h_, 1.0)
        c = 0.5 * b / r if solver_type == "midpoint" else (b / (-h_ - eta_h) + 1) / r
        noise = s_next * np.sqrt(-np.expm1(-2 * eta_h)) * s_noise if eta else np.zeros_like(s)
    a = np.where(last, 0.0, s_next / s * np.exp(-eta_h))
    x_next = a * X + np.where(last, 1.0, b) * X0 + np.where(use, c, 0.0) * (X0 - M0) + np.where(last, 0.0, noise) * Z
    name = f"dpmpp_2m_sde(eta={eta}, {solver_type})"
    return (plan(name, x0=E0, outputs={"x": x_next, "history": X0}, guidance=guidance), list(range(len(s))),
            [bool(eta) and not lst for lst in last])


def dpmpp_3m_sde(sigmas, eta: float = 1.0, s_noise: float = 1.0, guidance=None):
    """DPM-Solver++(3M) SDE: k-diffusion's ``sample_dpmpp_3m_sde``."""
    s, s_next, h, last = _grid(sigmas)
    i = np.arange(len(s))
    two, one = (i >= 2) & ~last, (i == 1) & ~last  # third order once two earlier outputs exist
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h_ = np.where(last, 1.0, h)
        h_eta = h_ * (eta + 1)
        phi2 = np.expm1(-h_eta) / h_eta + 1
        phi3 = phi2 / h_eta - 0.5
        r0 = np.where(two | one, _prev(h, 1) / h_, 1.0)
        r1 = np.where(two, _prev(h, 2) / h_, 1.0)
        noise = s_next * np.sqrt(-np.expm1(-2 * h_ * eta)) * s_noise if eta else np.zeros_like(s)
    d1_0, d1_1 = (X0 - M0) / r0, (M0 - M1) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    x_next = (np.where(last, 0.0, np.exp(-h_eta)) * X + np.where(last, 1.0, -np.expm1(-h_eta)) * X0
              + np.where(two, phi2, 0.0) * d1 - np.where(two, phi3, 0.0) * d2
              + np.where(one, phi2, 0.0) * d1_0 + np.where(last, 0.0, noise) * Z)
    name = f"dpmpp_3m_sde(eta={eta})"
    return (plan(name, x0=E0, outputs={"x": x_next, "history": X0}, guidance=guidance), list(range(len(s))),
            [bool(eta) and not lst for lst in last])


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_to^2, the noise added
    being sigma_up (k-diffusion's ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def dpmpp_sde(sigmas, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, guidance=None):
    """DPM-Solver++ (stochastic, two model calls a step): k-diffusion's ``sample_dpmpp_sde``. Two rows per
    step: the first goes to the intermediate point s = t + r*h and keeps the step's start (x_last) and
    its denoised output (history); the second updates from them with the intermediate point's output. A
    step to sigma = 0 is one Euler row (returns the denoised output)."""
    s, s_next, h, last = _grid(sigmas)
    fac = 1 / (2 * r)
    a, xl, m0, x0, z, steps = [], [], [], [], [], []
    for i, (si, sn, hi, lst) in enumerate(zip(s, s_next, h, last)):
        if lst:  # Euler to sigma 0: x + (0 - s)(x - D)/s = D
            a.append(0.0), xl.append(0.0), m0.append(0.0), x0.append(1.0), z.append(0.0), steps.append(i)
            continue
        s_mid = float(np.exp(-(-np.log(si) + hi * r)))
        down, up = ancestral_step(si, s_mid, eta)
        a.append(down / si), xl.append(0.0), m0.append(0.0), x0.append(1.0 - down / si), z.append(up * s_noise)
        down, up = ancestral_step(si, sn, eta)
        k = 1.0 - down / si  # -expm1(t - t_next') with t_next' = -log(sigma_down)
        a.append(0.0), xl.append(down / si), m0.append(k * (1 - fac)), x0.append(k * fac), z.append(up * s_noise)
        steps += [i, i]
    a, xl, m0, x0, z = (np.array(v) for v in (a, xl, m0, x0, z))
    x_next = a * X + xl * X_LAST + m0 * M0 + x0 * X0 + z * Z
    return (plan(f"dpmpp_sde(eta={eta}, r={r})", x0=E0, outputs={"x": x_next, "history": X0, "x_last": X},
                 guidance=guidance), steps, [bool(eta) and not last[i] for i in steps])
