"""Public ops: validation, backend dispatch, and registration as torch.library custom ops
(``common`` holds what every op shares)."""

from fastdiff.ops.gmm import gmm_noise, gmm_score
from fastdiff.ops.step import step
from fastdiff.ops.threshold import dynamic_threshold

__all__ = ["dynamic_threshold", "gmm_noise", "gmm_score", "step"]
