"""Public ops: validation, backend dispatch, and registration as torch.library custom ops."""

from fastdiff.ops.step import step

__all__ = ["step"]
