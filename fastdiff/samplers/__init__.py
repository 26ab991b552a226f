"""Sampling methods as plan builders (each computes its per-step coefficients: ``fastdiff.plan``), one
module per family (``ddim``, ``ddpm``, ``dpmsolver``, ``dpmpp`` (k-diffusion's DPM-Solver++ forms), ``unipc``,
``euler`` (Euler, ancestral, Heun), ``lcm``, ``flow``; the seed methods ``ddim_gmm``, ``mixddpm``, ``ddm``,
``iadb``), written
with the kit (``kit``: linear forms of the step's terms; ``predictions``: prediction types;
``forward``: the forward process)."""

from fastdiff.samplers import ddim, ddim_gmm, ddm, ddpm, dpmpp, dpmsolver, euler, flow, iadb, lcm, mixddpm, unipc
from fastdiff.samplers.ddim import ddim_plan, ddim_step, ddim_x0
from fastdiff.samplers.forward import q_sample_plan, velocity_plan
from fastdiff.samplers.predictions import PREDICTION_TYPES, eps_from_x0, predict

__all__ = ["PREDICTION_TYPES", "ddim", "ddim_gmm", "ddim_plan", "ddim_step", "ddim_x0", "ddm", "ddpm", "dpmpp",
           "dpmsolver", "eps_from_x0", "euler", "flow", "iadb", "lcm", "mixddpm", "predict", "q_sample_plan", "unipc",
           "velocity_plan"]
