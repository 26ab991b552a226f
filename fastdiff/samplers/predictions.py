"""Prediction types: what the model outputs, as linear forms of the sample and the model output.

With the sample ``x = alpha*x0 + sigma*eps`` (alpha, sigma per row: VP has alpha^2 + sigma^2 = 1,
k-diffusion's VE coordinates alpha = 1, rectified flow alpha = 1 - s, sigma = s) and model output
``out`` (the term E0 by default), the data prediction x0 and the noise prediction eps are:

    epsilon          out = eps                      x0 = (x - sigma*out)/alpha       eps = out
    v_prediction     out = (alpha*eps - sigma*x0)/n  x0 = (alpha*x - sigma*n*out)/n^2
                                                    eps = (sigma*x + alpha*n*out)/n^2
    sample           out = x0                       x0 = out                         eps = (x - alpha*out)/sigma
    flow_prediction  out = eps - x0 (velocity)      x0 = (x - sigma*out)/(alpha + sigma)
                                                    eps = (x + alpha*out)/(alpha + sigma)

with n^2 = alpha^2 + sigma^2 (Salimans & Ho 2022 define v for VP, n = 1: x0 = alpha*x - sigma*v; the
general n gives diffusers' Euler form in VE coordinates). Derivations: docs/methods.md, section 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastdiff.samplers.kit import E0, X0, Lin, X

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


class Prediction(NamedTuple):
    x0: Lin   # data prediction, a form of X and the model output (the kernel's x0, before any clamp)
    eps: Lin  # noise prediction, a form of X and the model output


def check_prediction_type(prediction_type: str, allowed=PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type: expected one of {tuple(allowed)}, got {prediction_type!r}")


def predict(prediction_type: str, alpha, sigma, out: Lin = E0) -> Prediction:
    """x0 and eps of ``prediction_type`` for ``x = alpha*x0 + sigma*eps`` (float64 scalars or arrays)."""
    check_prediction_type(prediction_type)
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction_type == "epsilon":
            return Prediction((X - sigma * out) / alpha, out)
        if prediction_type == "v_prediction":
            n2 = alpha**2 + sigma**2
            n = np.sqrt(n2)
            return Prediction((alpha * X - sigma * n * out) / n2, (sigma * X + alpha * n * out) / n2)
        if prediction_type == "sample":
            return Prediction(out, (X - alpha * out) / sigma)
        return Prediction((X - sigma * out) / (alpha + sigma), (X + alpha * out) / (alpha + sigma))


def eps_from_x0(alpha, sigma, x0: Lin = X0) -> Lin:
    """eps = (x - alpha*x0)/sigma: the noise that a (clipped or thresholded) x0 implies."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (X - np.asarray(alpha, np.float64) * x0) / np.asarray(sigma, np.float64)
