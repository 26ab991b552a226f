"""Pure-torch implementations: the test oracle of every kernel, the CPU/MPS fallback, torch.compile-ready."""

from fastdiff.reference.step import step
from fastdiff.reference.threshold import dynamic_threshold

__all__ = ["dynamic_threshold", "step"]
