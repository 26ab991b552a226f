"""Rectified-flow sampling, paper-shaped (Liu et al., "Flow Straight and Fast", ICLR 2023; Esser et al.,
"Scaling Rectified Flow Transformers" (SD3), arXiv 2403.03206): x_s = (1 - s) x0 + s eps, the model predicts
the velocity u = eps - x0 = dx/ds, and Euler's method integrates the ODE from s = 1 (noise) to 0. The oracle
of ``fastdiff.samplers.flow``'s plans."""

import torch


def shift(s, shift=1.0):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): more steps at high noise for shift > 1."""
    return shift * s / (1 + (shift - 1) * s)


def scale_noise(x0, noise, s):
    """The forward process (eq. 2 of SD3 with a_t = 1 - t, b_t = t): x_s = (1 - s) x0 + s noise."""
    return (1 - s) * x0 + s * noise


def euler_step(x, u, s, s_next, noise=None):
    """One Euler step s -> s_next; with `noise`, the stochastic variant re-noises x0 = x - s u to s_next."""
    if noise is None:
        return x + (s_next - s) * u
    return scale_noise(x - s * u, noise, s_next)


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, noise_sampler=None):
    """Euler over the grid `sigmas` [N+1]: ``model(x, s)`` -> velocity; ``noise_sampler(i)`` given: stochastic."""
    for i in range(len(sigmas) - 1):
        noise = None if noise_sampler is None else noise_sampler(i)
        x = euler_step(x, model(x, sigmas[i]), sigmas[i], sigmas[i + 1], noise)
    return x
