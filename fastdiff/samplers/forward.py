"""The forward process as plans: noising a clean sample (``q_sample``) and the velocity target.

    q_sample:  x_t = alpha_t*x0 + sigma_t*eps           (Ho et al. 2020, eq. 4; diffusers' add_noise)
    velocity:  v_t = alpha_t*eps - sigma_t*x0           (Salimans & Ho 2022; diffusers' get_velocity)

The step's ``x`` is the clean sample x0 and its noise ``z`` is eps (given, or drawn in the kernel), one
row per timestep: VP schedules have alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
"""

from __future__ import annotations

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import X, Z, plan


def q_sample_plan(alpha, sigma, row_label: str = "timestep", with_noise: bool = False) -> Plan:
    """x_t = alpha*x0 + sigma*eps, one row per entry of alpha/sigma; `with_noise`: eps is a second output (the
    training target of noise drawn in the kernel, written by the same pass)."""
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    outputs = {"x": alpha * X + sigma * Z, **({"noise": 1.0 * Z} if with_noise else {})}
    return plan("q_sample", outputs=outputs, rows=np.broadcast_shapes(alpha.shape, sigma.shape), row_label=row_label)


def velocity_plan(alpha, sigma, row_label: str = "timestep") -> Plan:
    """v_t = alpha*eps - sigma*x0, one row per entry of alpha/sigma."""
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    return plan("velocity", outputs={"x": alpha * Z - sigma * X}, row_label=row_label)
