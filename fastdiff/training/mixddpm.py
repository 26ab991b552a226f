"""Mix-DDPM training (Wang et al., ACM TOMM 2024): the mixture noising and the eps loss.

    x_t  = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*eps + m_n(t)       (``MixDDPMScheduler.add_noise``: one fused pass)
    loss = mean((eps - eps_theta(x_t, t))^2)                       (the target is eps alone, not the offset)
"""

from __future__ import annotations

import torch


def mixddpm_noising(scheduler, x0: torch.Tensor, timesteps, *, generator=None, seeds=None):
    """(x_t, eps) for a ``MixDDPMScheduler``: with per-sample `seeds`, one fused pass draws eps in the kernel
    (Philox DOMAIN_TRAIN, step 0) and writes x_t and eps (``add_seeded_noise``); with a `generator`, eps by
    ``randn_tensor`` (as diffusers), then the fused Mix-DDPM noising. The categorical draws come from the same
    seeds or generator."""
    if seeds is not None:
        return scheduler.add_seeded_noise(x0, timesteps, seeds)
    from fastdiff.noise import randn_tensor

    eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return scheduler.add_noise(x0, eps, timesteps, generator=generator), eps


def mixddpm_loss(model, scheduler, x0: torch.Tensor, timesteps, *, generator=None, seeds=None) -> torch.Tensor:
    """mean((eps - model(x_t, t))^2) with the Mix-DDPM noising (``mixddpm_noising``)."""
    x_t, eps = mixddpm_noising(scheduler, x0, timesteps, generator=generator, seeds=seeds)
    return torch.mean((eps - model(x_t, timesteps)) ** 2)
