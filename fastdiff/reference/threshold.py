"""Dynamic thresholding (Saharia et al., "Imagen", 2022, sec. 2.3): the one per-sample reduction of a step.

    s  = clamp(quantile(|x0_n|, ratio), 1, max_value)     per sample n
    x0 = clamp(x0, -s, s) / s

As in diffusers' ``_threshold_sample``: the quantile is taken in float32 or float64.
"""

import torch


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Threshold each sample of ``x0`` ``[B, ...]`` at its ``ratio`` quantile of |x0| (at least 1)."""
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    return (torch.minimum(torch.maximum(flat, -s), s) / s).reshape(x0.shape).to(x0.dtype)
