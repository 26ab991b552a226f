"""Mix-DDPM training (Wang et al., ACM TOMM 2024): the mixture noising and the eps loss.

    x_t  = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*eps + m_n(t)       (``MixDDPMScheduler.add_noise``: one fused pass)
    loss = mean((eps - eps_theta(x_t, t))^2)                       (the target is eps alone, not the offset)
"""

from __future__ import annotations

import math

import torch

from fastdiff import philox


def mixddpm_noising(scheduler, x0: torch.Tensor, timesteps, *, generator=None, seeds=None):
    """(x_t, eps) for a ``MixDDPMScheduler``: eps from `generator` (``randn_tensor``, as diffusers) or from
    per-sample `seeds` (Philox DOMAIN_TRAIN, step 0), then the fused Mix-DDPM noising (its categorical draws
    from the same generator or seeds)."""
    if seeds is not None:
        s = philox.seed_tensor(philox.check_seeds(seeds), x0.shape[0], x0.device)
        eps = philox.randn(s, math.prod(x0.shape[1:]), domain=philox.DOMAIN_TRAIN).reshape(x0.shape).to(x0.dtype)
    else:
        from diffusers.utils.torch_utils import randn_tensor

        eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return scheduler.add_noise(x0, eps, timesteps, generator=generator, seeds=seeds), eps


def mixddpm_loss(model, scheduler, x0: torch.Tensor, timesteps, *, generator=None, seeds=None) -> torch.Tensor:
    """mean((eps - model(x_t, t))^2) with the Mix-DDPM noising (``mixddpm_noising``)."""
    x_t, eps = mixddpm_noising(scheduler, x0, timesteps, generator=generator, seeds=seeds)
    return torch.mean((eps - model(x_t, timesteps)) ** 2)
