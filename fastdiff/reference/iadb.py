"""IADB, paper-shaped (Heitz, Belcour, Chambon, "Iterative alpha-(de)Blending", SIGGRAPH 2023, Algorithms 3-4;
the authors' ``tchambon/IADB``): x0 noise, x1 data, x_a = a*x1 + (1 - a)*x0. The oracle of
``fastdiff.samplers.iadb`` and the eager / torch.compile rows of its benchmark."""

import torch


def blend(x1, x0, alpha):
    """x_a = alpha*x1 + (1 - alpha)*x0 (alpha a float or a tensor broadcastable to x)."""
    return alpha * x1 + (1 - alpha) * x0


def iadb_step(x, d, alpha, alpha_next):
    """One deblending step: x + (alpha_next - alpha)*D(x, alpha)."""
    return x + (alpha_next - alpha) * d


@torch.no_grad()
def sample_iadb(model, x0, nb_step=128):
    """Algorithm 4 on the uniform grid: ``model(x, alpha)`` -> D; returns x at alpha = 1."""
    x = x0
    for t in range(nb_step):
        alpha, alpha_next = t / nb_step, (t + 1) / nb_step
        x = iadb_step(x, model(x, alpha), alpha, alpha_next)
    return x
