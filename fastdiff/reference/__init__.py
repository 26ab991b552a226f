"""Pure-torch implementations: the step kernel family (``step``), the paper-shaped sampler of each method
(``ddim``, ...), dynamic thresholding. The test oracle of every kernel and plan builder, the CPU/MPS
fallback, torch.compile-ready."""

from fastdiff.reference import ddim
from fastdiff.reference.step import step
from fastdiff.reference.threshold import dynamic_threshold

__all__ = ["ddim", "dynamic_threshold", "step"]
