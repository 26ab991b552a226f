"""DDIM-GMM, paper-shaped (Gabbur, "Improved DDIM Sampling with Moment Matching Gaussian Mixtures", arXiv
2311.04938): the oracle of ``fastdiff.samplers.ddim_gmm`` and the eager / torch.compile rows of its benchmark."""

import torch


def gmm_offsets(noise, pi, scale, ortho=True):
    """(delta [K, D], diag Delta [K, D]) from noise O [D, K]: C_k = B_k - sum_l pi_l B_l with B = the left singular
    vectors of O (ORTHO, delta_k = s*C_k) or B = O (RAND, delta_k = s*C_k/sqrt(sum_l pi_l ||C_l||^2))."""
    B = torch.linalg.svd(noise, full_matrices=False).U if ortho else noise
    C = B - (B * pi).sum(1, keepdim=True)
    delta = (scale * C if ortho else scale * C / (pi * C.norm(dim=0) ** 2).sum() ** 0.5).T
    K = len(pi)
    Delta_diag = (pi[:, None] * delta**2).sum(0) / (K * pi[:, None])
    return delta, Delta_diag


def ddim_gmm_step(x, eps, abar_t, abar_prev, k, delta, Delta_diag, eta=0.0, noise=None, clip=None):
    """One step t -> prev with components k [B]: x_prev = mu_t + delta_k + sqrt(max(sigma_t^2 - diag Delta_k, 0))*z,
    mu_t = sqrt(abar_prev)*x0 + sqrt(1 - abar_prev - sigma_t^2)*eps (DDIM, eq. 12)."""
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    sigma2 = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    mu = abar_prev**0.5 * x0 + (1 - abar_prev - sigma2) ** 0.5 * eps
    out = mu + delta[k].view(x.shape)
    if noise is not None and sigma2 > 0:
        out = out + (sigma2 - Delta_diag[k]).clamp(min=0).sqrt().view(x.shape) * noise
    return out
