"""``fastdiff.ops.dynamic_threshold``: the one per-sample reduction of a step (Saharia et al., "Imagen",
2022, sec. 2.3), as an op so that integrations need not reach into ``fastdiff.reference``.

    s  = clamp(quantile(|x0_n|, ratio), 1, max_value)     per sample n
    x0 = clamp(x0, -s, s) / s

The quantile is a sort, which no fused kernel does better than torch; every backend runs the torch
implementation (differentiable, torch.compile-ready). Arguments are checked as every op's are.
"""

from __future__ import annotations

import torch

from fastdiff.ops.common import check_storage_dtype, check_tensor


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Threshold each sample of ``x0`` ``[B, ...]`` at its ``ratio`` quantile of |x0| (at least 1)."""
    from fastdiff.reference.threshold import dynamic_threshold as reference

    x0 = check_tensor("dynamic_threshold", "x0", x0)
    check_storage_dtype("dynamic_threshold", "x0", x0.dtype)
    if x0.dim() < 1:
        raise ValueError(f"dynamic_threshold: x0 must have a batch dimension, got shape {tuple(x0.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"dynamic_threshold: ratio must be in [0, 1], got {ratio}")
    if x0.numel() == 0:
        return x0.clone()
    return reference(x0, ratio, max_value)
