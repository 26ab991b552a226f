"""DDIM, paper-shaped (Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12):
the oracle of ``fastdiff.samplers.ddim``'s plans and the eager / torch.compile row of its benchmark."""

import torch


def to_x0_eps(out, x, abar, prediction_type="epsilon"):
    """(x0, eps) from the model output for x = sqrt(abar)*x0 + sqrt(1 - abar)*eps."""
    a, s = abar**0.5, (1 - abar) ** 0.5
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - s * out, a * out + s * x
    return out, (x - a * out) / s  # "sample"


def ddim_step(x, out, abar_t, abar_prev, eta=0.0, noise=None, clip=None, prediction_type="epsilon"):
    """One step t -> prev (eq. 12); returns (x_prev, x0). eta = 1 is DDPM's posterior variance."""
    x0, eps = to_x0_eps(out, x, abar_t, prediction_type)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
    return (x_prev if noise is None else x_prev + sigma * noise), x0


@torch.no_grad()
def sample_ddim(model, x, alphas_cumprod, timesteps, eta=0.0, noise_sampler=None, clip=None,
                prediction_type="epsilon", final_alpha_cumprod=1.0):
    """DDIM sampling over descending `timesteps`: ``model(x, t)`` -> output; ``noise_sampler(i)`` -> the
    noise of step i (needed when eta > 0). The last step lands on `final_alpha_cumprod`."""
    for i, t in enumerate(timesteps):
        abar_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else final_alpha_cumprod
        noise = noise_sampler(i) if eta > 0 else None
        x, _ = ddim_step(x, model(x, t), alphas_cumprod[t], abar_prev, eta, noise, clip, prediction_type)
    return x
