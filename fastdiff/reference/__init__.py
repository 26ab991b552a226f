"""Pure-torch implementations: the step kernel family (``step``), the paper-shaped sampler of each method
(``ddim``, ``ddpm``, ``dpmsolver``, ``unipc``, ``euler``, ``lcm``, ``flow``; the seed methods ``ddim_gmm``,
``mixddpm``, ``ddm``, ``iadb``), the GMM ops (``gmm``), dynamic thresholding. The test
oracle of every kernel and plan builder, the CPU/MPS fallback, torch.compile-ready."""

from fastdiff.reference import ddim, ddim_gmm, ddm, ddpm, dpmsolver, euler, flow, gmm, iadb, lcm, mixddpm, unipc
from fastdiff.reference.step import step
from fastdiff.reference.threshold import dynamic_threshold

__all__ = ["ddim", "ddim_gmm", "ddm", "ddpm", "dpmsolver", "dynamic_threshold", "euler", "flow", "gmm", "iadb", "lcm",
           "mixddpm", "step", "unipc"]
