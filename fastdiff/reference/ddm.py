"""DDM, paper-shaped (Huang et al., "Decoupled Diffusion Models", arXiv 2306.13720; the authors'
``ddm_const.py``): x_t = (1 - t)*x0 + sqrt(t)*eps, heads C = -x0 and eps. The oracle of
``fastdiff.samplers.ddm`` and the eager / torch.compile rows of its benchmark. t and s are floats or
tensors broadcastable to x (per-sample times)."""

import torch


def precondition(x, f_x, f_y, t):
    """The code's EDM-style heads from the raw outputs (the network saw x/sqrt(1 + t))."""
    return (t - 1) * x + t / (1 + t) ** 0.5 * f_x, t**0.5 * x + ((1 - t) / (1 + t)) ** 0.5 * f_y


def pred_x0(x, C, eps, t, clip=None):
    x0 = x - C * t - t**0.5 * eps
    return x0 if clip is None else x0.clamp(-clip, clip)


def ddm_step(x, C, eps, t, s, noise=None, clip=None):
    """One step t -> t - s (``pred_xtms_from_xt`` with C = -x0_hat): returns (x_next, x0_hat)."""
    x0 = pred_x0(x, C, eps, t, clip)
    x_next = x + s * x0 - s / t**0.5 * eps
    return (x_next if noise is None else x_next + (s * (t - s) / t) ** 0.5 * noise), x0


def ddm_eta_step(x, C, eps, t, s, eta=0.0, noise=None, clip=None):
    """The eta family: (1 - t + s)*x0 + sqrt(t - s - sig^2)*eps + sig*z, sig^2 = eta^2*s*(t - s)/t."""
    x0 = pred_x0(x, C, eps, t, clip)
    sig2 = eta**2 * s * (t - s) / t
    x_next = (1 - t + s) * x0 + (t - s - sig2) ** 0.5 * eps
    return (x_next if noise is None else x_next + sig2**0.5 * noise), x0


@torch.no_grad()
def sample_ddm(model, x, steps, noise_sampler=None, clip=None, order=1, second=None):
    """The code's ``sample_fn`` (order 1) or ``sample_fn_2order`` (order 2) over the step lengths `steps`
    from t = 1: ``model(x, t)`` -> (C, eps); ``noise_sampler(i)`` -> the noise of step i; second[i]: step i
    takes Heun's second call (order 2). The code's final clamp of the image to [-1, 1] is the caller's."""
    t = 1.0
    for i, s in enumerate(steps):
        C, eps = model(x, t)
        x0 = pred_x0(x, C, eps, t, clip)
        d = x0 - eps / t**0.5
        x_h = x + s * d
        if order == 2 and second[i]:
            C2, eps2 = model(x_h, t - s)
            x_h = x + s * (d + pred_x0(x_h, C2, eps2, t - s, clip) - eps2 / (t - s) ** 0.5) / 2
        sigma = (s * (t - s) / t) ** 0.5
        x = x_h + sigma * noise_sampler(i) if sigma > 0 else x_h
        t = t - s
    return x
