"""DDPM, paper-shaped (Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020): ancestral
sampling through the posterior q(x_prev | x_t, x0) of eq. 6-7 with the model's x0 (eq. 11 in its x0 form);
learned variances as Nichol & Dhariwal 2021 (eq. 15). The oracle of ``fastdiff.samplers.ddpm``'s plans."""

import torch

from fastdiff.reference.ddim import to_x0_eps


def posterior(x, x0, abar_t, abar_prev):
    """(mean, variance, beta_t) of q(x_prev | x_t = x, x0), eq. 6-7; alpha_t = abar_t/abar_prev."""
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    mean = abar_prev**0.5 * beta_t / (1 - abar_t) * x0 + alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t) * x
    return mean, (1 - abar_prev) / (1 - abar_t) * beta_t, beta_t


def noise_std(variance_type, var, beta_t, v=None):
    """sigma_t: sqrt(beta~) ("fixed_small", also in log form), sqrt(beta_t) ("fixed_large"), from the model's
    variance output v: sqrt(v) ("learned") or exp of the interpolated log variance ("learned_range")."""
    var = max(var, 1e-20)                                                  # diffusers' clamp
    if variance_type in ("fixed_small", "fixed_small_log"):
        return var**0.5
    if variance_type == "fixed_large":
        return beta_t**0.5
    if variance_type == "learned":
        return v**0.5
    frac = (v + 1) / 2                                                     # learned_range, eq. 15
    log_beta, log_var = (torch.log(torch.as_tensor(a, dtype=v.dtype, device=v.device)) for a in (beta_t, var))
    return torch.exp(0.5 * (frac * log_beta + (1 - frac) * log_var))


def ddpm_step(x, out, abar_t, abar_prev, noise=None, variance_type="fixed_small", v=None, clip=None,
              prediction_type="epsilon"):
    """One step t -> prev; returns (x_prev, x0). `noise` None: the posterior mean (diffusers' t = 0 step)."""
    x0, _ = to_x0_eps(out, x, abar_t, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    mean, var, beta_t = posterior(x, x0, abar_t, abar_prev)
    if noise is None:
        return mean, x0
    return mean + noise_std(variance_type, var, beta_t, v) * noise, x0


@torch.no_grad()
def sample_ddpm(model, x, alphas_cumprod, timesteps, noise_sampler=None, variance_type="fixed_small", clip=None,
                prediction_type="epsilon"):
    """Ancestral sampling over descending `timesteps`: ``model(x, t)`` -> output (with the variance channels
    appended for learned variances); ``noise_sampler(i)`` -> the noise of step i (none at t = 0)."""
    learned = variance_type in ("learned", "learned_range")
    for i, t in enumerate(timesteps):
        abar_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        out, v = model(x, t), None
        if learned:
            out, v = out.split(x.shape[1], dim=1)
        noise = noise_sampler(i) if t > 0 else None
        x, _ = ddpm_step(x, out, alphas_cumprod[t], abar_prev, noise, variance_type, v, clip, prediction_type)
    return x
