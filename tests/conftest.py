import os

import torch

# The Triton kernels run on CPU tensors under the interpreter; it must be on before triton is imported.
# With a GPU the tests use compiled Triton on CUDA tensors instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastdiff import backends

# FASTDIFF_EMULATED_CUDA=1: the cpu backend's native calls run the CUDA kernels' code, emulated on the host
# (tests/cuda_emul), so the cpu-backend tests test the CUDA kernels without a GPU (.ci/cuda_emulated).
if os.environ.get("FASTDIFF_EMULATED_CUDA", "0") not in ("", "0"):
    from cuda_emul.build import install

    install()

HAS_CUDA = torch.cuda.is_available()


def _device_params(pairs):
    return [pytest.param(dev, name, id=f"{dev}-{name}", marks=[pytest.mark.cuda] if dev == "cuda" else [])
            for dev, name in pairs]


# Every backend on every device: the parameters of a test that takes (device, backend). The cuda ones carry
# the `cuda` marker and are skipped without a CUDA device; triton on cpu runs under the interpreter.
DEVICE_BACKENDS = _device_params([("cpu", "torch"), ("cpu", "cpu"), ("cpu", "triton"),
                                  ("cuda", "cuda"), ("cuda", "triton"), ("cuda", "torch")])
# The same, for tests that build on diffusers or take long: one backend per kernel family on each device.
DEVICES = _device_params([("cpu", "cpu"), ("cuda", "cuda")])
CPU_BACKENDS = ("torch", "cpu", "triton")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def require_backend(name: str, device: str = "cpu") -> None:
    ok, why = backends.status(name, device)
    if not ok:
        pytest.skip(f"backend {name} unavailable on {device}: {why}")


def assert_close(actual, expected, *, atol, rtol, what="", equal_nan=False, guided=False):
    """assert_allclose that says where the worst mismatch is and by how much. `guided`: `actual` is a
    fused-guidance step and `expected` the step of the combined output; the fused step folds g*cond +
    (1 - g)*uncond into its sums, so its float32 rounding scales with the terms (g times the output's scale),
    not with each element: atol is taken relative to the largest |expected| (where terms cancel, an element
    is off by more than its own rtol, by how much depending on whether the compiler contracted to FMA; a
    guidance scale off by 0.1% is still ~50x that tolerance)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if guided and e.numel():
        atol *= max(1.0, float(e.abs().nan_to_num(posinf=0.0, neginf=0.0).max()))
    if equal_nan:
        same = torch.isnan(a) == torch.isnan(e)
        assert bool(same.all()), f"{what}: NaN at different places ({int((~same).sum())} elements)"
        a, e = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(e, nan=0.0)
    inf = torch.isinf(e) | torch.isinf(a)
    assert bool((a[inf] == e[inf]).all()), f"{what}: infinities differ"
    a, e = a.masked_fill(inf, 0.0), e.masked_fill(inf, 0.0)
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    if not bool((err <= tol).all()):
        i = int((err - tol).flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(f"{what}: mismatch at {idx}: got {a[idx].item():.8g}, expected {e[idx].item():.8g} "
                             f"(|diff| {err[idx].item():.3g} > tol {tol[idx].item():.3g}); "
                             f"max |diff| {err.max().item():.3g}, {int((err > tol).sum())} of {err.numel()} off")


def assert_accuracy_rule(got, naive, want, what=""):
    """The low-precision accuracy rule (docs/architecture.md, Contracts): the error of `got` against the
    higher-precision oracle `want` is at most 2x that of `naive`, the same computation run in the storage dtype."""
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    err_naive = (naive.double().cpu() - want.double().cpu()).abs().max().item()
    assert err <= 2 * err_naive, f"{what}: error {err:.3g} vs the same computation in the storage dtype {err_naive:.3g}"
