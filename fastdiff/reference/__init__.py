"""Pure-torch implementations: the test oracle of every kernel, the CPU/MPS fallback, torch.compile-ready."""

from fastdiff.reference.step import step

__all__ = ["step"]
