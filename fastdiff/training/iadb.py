"""IADB training (Heitz, Belcour, Chambon, "Iterative alpha-(de)Blending", SIGGRAPH 2023, arXiv 2305.03486):
the blend ``x_a = a*x1 + (1 - a)*x0`` (x1 data, x0 noise) as one fused pass with per-sample alpha, and the
loss ``sum((D(x_a, a) - (x1 - x0))^2)``."""

from __future__ import annotations

import torch

from fastdiff.samplers.iadb import add_noise_plan
from fastdiff.training.ddm import run_forward

REDUCTIONS = ("sum", "mean")


def add_noise(x1: torch.Tensor, alpha, x0: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None,
              backend: str | None = None, return_noise: bool = False):
    """x_a = alpha*x1 + (1 - alpha)*x0: data x1, noise x0 given or drawn in the kernel from per-sample
    ``seeds`` (``philox.randn(seeds, D, domain=DOMAIN_TRAIN)``, step 0: fresh seeds at every training iteration);
    alpha one float in [0, 1] or one per sample. One fused pass; ``return_noise=True`` (with seeds) gives
    ``(x_a, x0)``, the noise written by the same pass (the loss's target x1 - x0 needs it)."""
    return run_forward(add_noise_plan, "alpha", x1, alpha, x0, seeds, backend, return_noise)


def iadb_loss(D: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """||D - (x1 - x0)||^2: summed over every element (the paper's and the code's ``torch.sum``), or with
    ``reduction="mean"`` averaged over them (the same gradient direction, scaled by 1/numel)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    err = (D - (x1 - x0)) ** 2
    return err.sum() if reduction == "sum" else err.mean()
