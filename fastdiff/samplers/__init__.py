"""Sampling methods as plan builders: each computes its per-step coefficients (``fastdiff.plan``)."""

from fastdiff.samplers.ddim import ddim_coefficients, ddim_plan, q_sample_coefficients, velocity_coefficients

__all__ = ["ddim_coefficients", "ddim_plan", "q_sample_coefficients", "velocity_coefficients"]
