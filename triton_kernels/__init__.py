"""Triton kernels of fastdiff (installed as ``fastdiff.triton_kernels``), one file per op family.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) they run on CPU tensors, which is how CI
tests them.
"""

from fastdiff.triton_kernels import gmm, philox, step

__all__ = ["gmm", "philox", "step"]
