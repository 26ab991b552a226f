"""Diagonal Gaussian mixtures in plain torch: the oracle of the fused GMM kernels and their fallback.

A mixture of K components over a sample of D elements, ``p(x) = sum_k w_k N(x; mu_k, diag s_k^2)``:

    gmm_noise:  x[n, i] = mu[k, i] + s[k, i] * z[n, i]      k = the component of the draw element i is in
                (one draw per sample, per channel or per element; z standard normal)
    gmm_score:  l_k   = log w_k + log N(x; mu_k, diag s_k^2)
                log p = logsumexp_k l_k,   r = softmax_k l   (the responsibilities)
                score = grad_x log p(x) = sum_k r_k (mu_k - x) / s_k^2

The score follows from ``grad_x log N(x; mu_k, s_k^2) = (mu_k - x)/s_k^2`` and the chain rule through the
log-sum-exp (derived, not from a source). Seeded draws use the counter-based Philox of ``fastdiff.philox``:
the components by inverse CDF on ``philox.uniform`` in ``DOMAIN_CATEGORICAL`` (``philox.categorical``),
the normals ``philox.randn`` in ``DOMAIN_TRAIN``; sample n's draws depend only on its seed.
"""

from __future__ import annotations

import math

import torch

from fastdiff import philox

PER = ("sample", "channel", "element")


def draws_per_sample(per: str, shape) -> int:
    """Component draws per sample: 1 (``sample``), S[0] (``channel``), D (``element``) for shape (B, *S)."""
    return {"sample": 1, "channel": shape[1] if len(shape) > 1 else 1, "element": math.prod(shape[1:])}[per]


def draw_components(seeds: torch.Tensor, weights: torch.Tensor, n_draws: int, step: int = 0) -> torch.Tensor:
    """``[B, n_draws]`` int64 components: inverse CDF of the weights on the Philox uniforms of each seed."""
    u = philox.uniform(seeds, n_draws, step=step, domain=philox.DOMAIN_CATEGORICAL)
    return philox.categorical(u, weights.detach().double().cpu())


def draw_normals(seeds: torch.Tensor, numel: int, step: int = 0) -> torch.Tensor:
    """``[B, numel]`` float64 standard normals of each seed (``DOMAIN_TRAIN``)."""
    return philox.randn(seeds, numel, step=step, domain=philox.DOMAIN_TRAIN, dtype=torch.float64)


def gmm_noise(means: torch.Tensor, stds: torch.Tensor, z: torch.Tensor, component: torch.Tensor) -> torch.Tensor:
    """``x = mu[k] + s[k] * z``. means, stds: ``[K, D]`` or ``[K, 1]`` (constant over D); z: ``[B, D]``;
    component: ``[B, n_draws]`` with n_draws dividing D - draw j covers elements ``j*D/n_draws`` onwards."""
    B, D = z.shape
    k = component.repeat_interleave(D // max(component.shape[1], 1), dim=1) if D else component[:, :0]
    K = means.shape[0]
    mu = means.expand(K, D).gather(0, k)
    s = stds.expand(K, D).gather(0, k)
    return mu + s * z


def log_terms(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` l_k = log w_k + log N(x; mu_k, diag s_k^2) for x ``[B, D]``."""
    D = x.shape[1]
    d = (x[:, None, :] - means[None]) / stds[None]
    log_det = torch.log(stds).expand(means.shape[0], D).sum(-1)
    return torch.log(weights) - 0.5 * (d * d).sum(-1) - log_det - 0.5 * D * math.log(2 * math.pi)


def gmm_score(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
    """(score ``[B, D]``, log p(x) ``[B]``) for x ``[B, D]``: the stable log-sum-exp and softmax of l_k."""
    l = log_terms(x, weights, means, stds)  # noqa: E741 (the paper's l_k)
    r = torch.softmax(l, dim=-1)
    score = (r[:, :, None] * (means[None] - x[:, None, :]) / (stds * stds)[None]).sum(1)
    return score, torch.logsumexp(l, dim=-1)
