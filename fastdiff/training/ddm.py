"""DDM training (Huang et al., arXiv 2306.13720; the authors' ``ddm_const.py``): the forward process
``x_t = (1 - t)*x0 + sqrt(t)*noise`` as one fused pass (per-sample t), and the code's loss.

Loss (``p_losses`` with ``weighting_loss``), per sample, then averaged over the batch:

    simple = w1(t)*mean((C_pred + x0)^2) + w2(t)*mean((eps_pred - noise)^2),  w1 = 1/t, w2 = 1/(1 - t + 1e-4)
    rec    = (1 - t)^2 * mean(|x_rec - x0|),  x_rec = x_t - t*C_pred - sqrt(t)*eps_pred
    loss   = mean_n(simple) + mean_n(rec)

(means over the non-batch dimensions; the targets are C = -x0 and the noise). Included: the two weighted
MSE terms and the L1 reconstruction term with its weight (1 - t)^2, as the code has them; not included: the
code's optional LPIPS term on x_rec (a network) and its optional extra L1 terms (``use_l1``).
"""

from __future__ import annotations

import numpy as np
import torch

from fastdiff import ops
from fastdiff.philox import DOMAIN_TRAIN
from fastdiff.samplers.ddm import add_noise_plan


def per_sample(name: str, values, batch: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """A float64 host copy of one value or one per sample (a float, a sequence or a tensor; a device tensor
    is read, a sync), checked to lie in [lo, hi]."""
    if isinstance(values, torch.Tensor):
        if values.dtype in (torch.bool, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name}: expected float values in [{lo}, {hi}], got a {values.dtype} tensor")
        v = values.detach().double().cpu().numpy().reshape(-1)
    elif isinstance(values, bool):
        raise TypeError(f"{name}: expected a float in [{lo}, {hi}], got {values!r}")
    else:
        v = np.asarray(values, np.float64).reshape(-1)
    if v.size not in (1, batch):
        raise ValueError(f"{name}: expected one value or {batch} (one per sample), got {v.size}")
    if not np.all((v >= lo) & (v <= hi)):
        raise ValueError(f"{name}: expected values in [{lo}, {hi}], got {v[:8].tolist()}")
    return v


def run_forward(build, name: str, x: torch.Tensor, values, noise: torch.Tensor | None = None,
                seeds: torch.Tensor | None = None, backend: str | None = None, return_noise: bool = False):
    """One fused forward pass ``build(values)`` (a plan whose rows read X and Z), a row per sample: noise
    given, or drawn in the kernel from per-sample ``seeds`` (Philox domain DOMAIN_TRAIN, step 0).
    `return_noise` (seeds only): ``(x_t, noise)``, the noise written by the same pass (the loss's target)."""
    if (noise is None) == (seeds is None):
        raise ValueError("noise, seeds: pass exactly one (a noise tensor like x, or [B] int64 seeds)")
    if return_noise and seeds is None:
        raise ValueError("return_noise: only with seeds (given noise is already the caller's)")
    v = per_sample(name, values, x.shape[0])
    plan = build(v, with_noise=return_noise)
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise: expected shape {tuple(x.shape)} (like x), got {tuple(noise.shape)}")
        dtype = torch.promote_types(x.dtype, noise.dtype)
        x, noise = x.to(dtype), noise.to(dtype)
    coef = plan.coef(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
    rows = torch.arange(x.shape[0], device=x.device) if v.size > 1 else None
    outs = ops.step(coef, x, noise=noise, seeds=seeds, noise_domain=DOMAIN_TRAIN, rows=rows,
                    n_out=len(plan.outputs), backend=backend)
    return tuple(outs) if return_noise else outs[0]


def add_noise(x0: torch.Tensor, t, noise: torch.Tensor | None = None, *, seeds: torch.Tensor | None = None,
              backend: str | None = None, return_noise: bool = False):
    """x_t = (1 - t)*x0 + sqrt(t)*noise, t one float in [0, 1] or one per sample; one fused pass. With per-sample
    ``seeds`` instead of `noise` the noise is drawn in the kernel: ``philox.randn(seeds, D, domain=DOMAIN_TRAIN)``
    (step 0); give fresh seeds at every training iteration. ``return_noise=True`` (with seeds): ``(x_t, noise)``,
    both written by the one pass - the loss's target without a second draw."""
    return run_forward(add_noise_plan, "t", x0, t, noise, seeds, backend, return_noise)


def sample_t(batch: int, generator: torch.Generator | None = None, t_min: float = 1e-4) -> torch.Tensor:
    """The code's training times t ~ U(t_min, 1), float32 [batch]."""
    return torch.rand(batch, generator=generator) * (1.0 - t_min) + t_min


def ddm_loss(C_pred: torch.Tensor, eps_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t,
             *, weighting: bool = True, reconstruction: bool = True, t_min: float = 1e-4) -> torch.Tensor:
    """The code's loss (module docstring) of the heads (C_pred, eps_pred) at x_t = (1 - t)*x0 + sqrt(t)*noise;
    t: a float or a [B] tensor. weighting: w1 = 1/t, w2 = 1/(1 - t + t_min) (else 1); reconstruction: add the
    L1 term on x_rec."""
    B = x0.shape[0]
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).reshape(-1)
    t = t.expand(B) if t.numel() == 1 else t
    dims = tuple(range(1, x0.dim()))
    tb = t.reshape(B, *([1] * (x0.dim() - 1)))
    w1, w2 = (1 / t, 1 / (1 - t + t_min)) if weighting else (1.0, 1.0)
    simple = w1 * ((C_pred + x0) ** 2).mean(dims) + w2 * ((eps_pred - noise) ** 2).mean(dims)
    loss = simple.mean()
    if reconstruction:
        x_t = (1 - tb) * x0 + tb.sqrt() * noise
        x_rec = x_t - tb * C_pred - tb.sqrt() * eps_pred
        loss = loss + ((x_rec - x0).abs().mean(dims) * (1 - t) ** 2).mean()
    return loss
