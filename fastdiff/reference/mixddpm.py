"""Mix-DDPM, paper-shaped (Wang et al., ACM TOMM 2024; github.com/wd1511/Mix-DDPM ``GaussianMixtureDiffusion``):
the oracle of ``fastdiff.samplers.mixddpm`` and the eager / torch.compile rows of its benchmark."""

import torch


def mixture_offset(components, t, betas, means, numel):
    """m_n(t) = sum_{i<=t} sqrt(beta_i*abar_t/abar_i) * mu[k(n,i)]/sqrt(D); components ``[B, T]``, t ``[B]``."""
    abar = torch.cumprod(1 - betas, 0)
    i = torch.arange(len(betas), device=t.device)
    gamma = betas[None, :] * abar[t][:, None] / abar[None, :]          # beta_i*abar_t/abar_i, [B, T]
    terms = gamma.clamp(min=0).sqrt() * means[components] * (i[None, :] <= t[:, None])
    return terms.sum(-1) / numel**0.5


def q_sample(x0, t, noise, abar, offset):
    """x_t = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*eps + m_n(t) (the offset broadcast over each sample)."""
    view = (-1,) + (1,) * (x0.dim() - 1)
    a = abar[t].view(view)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise + offset.view(view)


def p_sample_standard(x, eps, abar_t, abar_prev, mu_k, noise=None, clip=None):
    """One ``standard`` step t -> prev: DDPM's posterior mean - sqrt(beta_t/alpha_t)*mu_{k_n}/sqrt(D) + std*z,
    with alpha_t = abar_t/abar_prev, beta_t = 1 - alpha_t, std^2 the posterior variance (fixed_small);
    ``mu_k`` ``[B]`` holds mu_{k_n}."""
    alpha, beta = abar_t / abar_prev, 1 - abar_t / abar_prev
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    mean = abar_prev**0.5 * beta / (1 - abar_t) * x0 + alpha**0.5 * (1 - abar_prev) / (1 - abar_t) * x
    offset = (beta / alpha) ** 0.5 * mu_k / x[0].numel() ** 0.5
    out = mean - offset.view((-1,) + (1,) * (x.dim() - 1))
    if noise is not None:
        out = out + ((1 - abar_prev) / (1 - abar_t) * beta) ** 0.5 * noise
    return out
