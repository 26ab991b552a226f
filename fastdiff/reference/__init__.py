"""Pure-torch implementations: the step kernel family (``step``), the paper-shaped sampler of each method
(``ddim``, ``ddpm``, ``dpmsolver``, ``unipc``, ``euler``, ``lcm``, ``flow``), dynamic thresholding. The test
oracle of every kernel and plan builder, the CPU/MPS fallback, torch.compile-ready."""

from fastdiff.reference import ddim, ddpm, dpmsolver, euler, flow, lcm, unipc
from fastdiff.reference.step import step
from fastdiff.reference.threshold import dynamic_threshold

__all__ = ["ddim", "ddpm", "dpmsolver", "dynamic_threshold", "euler", "flow", "lcm", "step", "unipc"]
