"""Latent consistency models' multistep sampling, paper-shaped (Luo et al., "Latent Consistency Models",
arXiv 2310.04378, eq. 9-10 and Algorithm 3): the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t)
with the boundary condition f(x, 0) = x, then re-noising to the next timestep. The oracle of
``fastdiff.samplers.lcm``'s plans."""

import torch

from fastdiff.reference.ddim import to_x0_eps


def scalings(t, timestep_scaling=10.0, sigma_data=0.5):
    """(c_skip, c_out) at discrete timestep t: c_skip(0) = 1, c_out(0) = 0."""
    s = t * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2) ** 0.5


def lcm_step(x, out, t, abar_t, abar_next, noise=None, timestep_scaling=10.0, clip=None, prediction_type="epsilon"):
    """One step: (x_next, f) with f the consistency function's output; `noise` None: x_next = f (last step)."""
    x0, _ = to_x0_eps(out, x, abar_t, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    c_skip, c_out = scalings(t, timestep_scaling)
    f = c_skip * x + c_out * x0
    if noise is None:
        return f, f
    return abar_next**0.5 * f + (1 - abar_next) ** 0.5 * noise, f


@torch.no_grad()
def sample_lcm(model, x, alphas_cumprod, timesteps, noise_sampler=None, timestep_scaling=10.0, clip=None,
               prediction_type="epsilon"):
    """Multistep consistency sampling over descending `timesteps` (Algorithm 3): ``model(x, t)`` -> output;
    ``noise_sampler(i)`` -> the noise that re-noises step i's output to timesteps[i+1]."""
    for i, t in enumerate(timesteps):
        last = i + 1 == len(timesteps)
        abar_next = alphas_cumprod[timesteps[i + 1]] if not last else 1.0
        noise = None if last else noise_sampler(i)
        x, _ = lcm_step(x, model(x, t), t, alphas_cumprod[t], abar_next, noise, timestep_scaling, clip,
                        prediction_type)
    return x
