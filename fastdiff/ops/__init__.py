"""Public ops: validation, backend dispatch, and registration as torch.library custom ops
(``common`` holds what every op shares)."""

from fastdiff.ops.step import step
from fastdiff.ops.threshold import dynamic_threshold

__all__ = ["dynamic_threshold", "step"]
