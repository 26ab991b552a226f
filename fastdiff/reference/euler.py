"""Euler, Euler ancestral and Heun in sigma space, paper-shaped: Karras, Aittala, Aila, Laine, "Elucidating
the Design Space of Diffusion-Based Generative Models" (EDM, NeurIPS 2022, arXiv 2206.00364), Algorithm 1
(deterministic Heun) and Algorithm 2 (stochastic: churn), as k-diffusion's ``sample_euler``,
``sample_euler_ancestral`` and ``sample_heun`` write them. The oracle of ``fastdiff.samplers.euler``.

Coordinates are k-diffusion's (VE): ``x = x0 + sigma*eps``; ``model(x, sigma)`` returns the denoised sample
D(x; sigma) (the data prediction); ``sigmas`` descend to the last one (0 or sigma_min). Noise is an
argument: ``noise_sampler(i)`` is the standard normal tensor of step i.
"""

import math

import torch


def to_d(x, sigma, denoised):
    """The probability-flow ODE's derivative dx/dsigma = (x - D(x; sigma))/sigma (Karras eq. 4 with s = 1)."""
    return (x - denoised) / sigma


def churn(sigma, n, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf):
    """Algorithm 2's gamma_i = min(S_churn/N, sqrt2 - 1) for sigma in [S_tmin, S_tmax], else 0; N steps."""
    return min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_to^2, with
    sigma_up = min(sigma_to, eta*sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2)/sigma_from^2)) (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _lift(x, i, sigma, sigma_hat, s_noise, noise_sampler):
    """x_hat = x + sqrt(sigma_hat^2 - sigma^2)*eps, eps ~ N(0, S_noise^2 I) (Algorithm 2, lines 5-6)."""
    if sigma_hat == sigma:
        return x
    return x + noise_sampler(i) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5


@torch.no_grad()
def sample_euler(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, noise_sampler=None):
    """Algorithm 2 with Euler steps: raise sigma to sigma_hat by churn, then x <- x_hat + (sigma_next -
    sigma_hat)*d(x_hat; sigma_hat); the model sees the churned sample."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma_hat = sigmas[i] * (churn(sigmas[i], n, s_churn, s_tmin, s_tmax) + 1)
        x = _lift(x, i, sigmas[i], sigma_hat, s_noise, noise_sampler)
        x = x + to_d(x, sigma_hat, model(x, sigma_hat)) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with Euler steps: an Euler step down to sigma_down, then fresh noise of std
    sigma_up (none into sigma = 0)."""
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(i) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, noise_sampler=None):
    """Algorithm 2 (Algorithm 1 at S_churn = 0): an Euler step to sigma_next, then the trapezoidal
    correction with d at the Euler point, except into sigma = 0 (there the Euler step is the step)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma_hat = sigmas[i] * (churn(sigmas[i], n, s_churn, s_tmin, s_tmax) + 1)
        x = _lift(x, i, sigmas[i], sigma_hat, s_noise, noise_sampler)
        d = to_d(x, sigma_hat, model(x, sigma_hat))
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x
