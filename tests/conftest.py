import os

import torch

# The Triton kernels run on CPU tensors under the interpreter; it must be on before triton is imported.
# With a GPU the tests use compiled Triton on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdiff import backends  # noqa: E402

CPU_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("cuda", "triton", "torch")


def require_backend(name: str, device: str = "cpu") -> None:
    ok, why = backends.status(name, device)
    if not ok:
        pytest.skip(f"backend {name} unavailable on {device}: {why}")


def assert_close(actual, expected, *, atol, rtol, what=""):
    """assert_allclose that says where the worst mismatch is and by how much."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    if not bool((err <= tol).all()):
        i = int((err - tol).flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(f"{what}: mismatch at {idx}: got {a[idx].item():.8g}, expected {e[idx].item():.8g} "
                             f"(|diff| {err[idx].item():.3g} > tol {tol[idx].item():.3g}); "
                             f"max |diff| {err.max().item():.3g}, {int((err > tol).sum())} of {err.numel()} off")
