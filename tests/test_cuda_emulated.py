"""The CUDA kernels' code, run on the host (tests/cuda_emul: csrc/cuda compiled as C++ against an execution
model of blocks, fiber threads, __syncthreads and warp shuffles), where CI has no GPU:

- the step kernel (grids capped at 2 sample rows: batches of 3 and 5 take the blocks-walk-samples path)
  against the float64 oracle of tests/cases.py, with every tensor 16-byte aligned (the
  vector loads) or one element off (the scalar path), odd sizes (a sample's tail inside a vector) and
  partial blocks; each output sits between guard elements that must come back untouched;
- the harness itself: a barrier some threads skip, a shuffle some lanes skip and a grid past the hardware's
  limits are reported, so a kernel that would hang or fail to launch on a GPU fails here.

``.ci/cuda_emulated`` also runs every cpu-backend test with the cpu backend's native calls routed to these
kernels (FASTDIFF_EMULATED_CUDA=1, tests/conftest.py)."""

import subprocess

import pytest
import torch
from cases import CONFIGS, make_case, oracle
from cuda_emul import build as emul_build

from fastdiff.ops.step import native_args, reference_outputs, validate

pytestmark = pytest.mark.skipif(emul_build.compiler() is None, reason="needs a C++ compiler (g++)")

GUARD = 37  # elements after each tensor (and `lead` before it) that the kernel must not touch


@pytest.fixture(scope="module")
def emulated():
    return emul_build.load(emul_build.build())


def placed(t: torch.Tensor, lead: int):
    """(buffer, view): a copy of `t` starting `lead` elements into a NaN-filled buffer with GUARD after."""
    buf = torch.full((lead + t.numel() + GUARD,), float("nan"), dtype=t.dtype)
    view = buf[lead:lead + t.numel()].view(t.shape)
    view.copy_(t)
    return buf, view


def place_inputs(kw: dict, at) -> dict:
    """The case with every batch-shaped tensor moved ``at()`` elements off its buffer's (aligned) start."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and k in ("x", "x_last", "noise"):
            v = placed(v, at())[1]
        elif isinstance(v, list) and k in ("e", "e_uncond", "m"):
            v = [placed(t, at())[1] for t in v]
        out[k] = v
    return out


def check_launch(emulated, kw: dict, lead, what: str) -> None:
    """Step case `kw` on the emulated kernel, every tensor `lead` elements off a 16-byte boundary (a callable:
    each its own); the guards must stay NaN, and the outputs equal the float64 oracle (fp32 storage) or meet
    the accuracy rule against it (fp16/bf16: at most 2x the error of the reference run in that dtype)."""
    at = lead if callable(lead) else (lambda: lead)
    a = validate(**place_inputs(kw, at))  # a.dtype: the inputs' (float32 where no tensor input comes: noise-only)
    bufs = [placed(torch.empty(a.shape, dtype=a.dtype), at()) for _ in range(a.n_out)]
    emulated.step_cuda(native_args(a, [v for _, v in bufs]), 0, 0)
    naive = None if a.dtype == torch.float32 else reference_outputs(validate(**kw), compute_dtype=a.dtype)
    for k, ((buf, got), want) in enumerate(zip(bufs, oracle(kw))):
        n = (got.data_ptr() - buf.data_ptr()) // got.element_size()
        assert torch.isnan(buf[:n].float()).all() and torch.isnan(buf[n + got.numel():].float()).all(), \
            f"{what} out{k}: guard written"
        want = want.reshape(got.shape)
        if naive is None:
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=f"{what} out{k}")
        else:
            err, err_naive = ((t.double() - want).abs().max().item() for t in (got, naive[k]))
            assert err <= 2 * err_naive + 1e-6, f"{what} out{k}: error {err:.3g} vs naive {err_naive:.3g}"


SHAPES = [(3, 5, 17, 19), (2, 4, 8, 8), (1, 7), (2, 4, 16, 33), (1, 1, 3, 1031)]


@pytest.mark.parametrize("lead", [0, 1], ids=["vector", "scalar"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_kernel_matches_oracle(emulated, name, shape, lead):
    check_launch(emulated, make_case(CONFIGS[name], shape, rows="per-sample" if shape[0] > 2 else "one"), lead, name)


@pytest.mark.parametrize("lead", [0, 3], ids=["vector", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ddim", "everything"])
def test_step_kernel_low_precision(emulated, name, dtype, lead):
    """16-bit storage (8 elements a vector): the accuracy rule of docs/architecture.md against the oracle."""
    check_launch(emulated, make_case(CONFIGS[name], (3, 8, 16, 17), dtype, rows="per-sample"), lead, f"{name} {dtype}")


@pytest.mark.parametrize("case", range(40))
def test_step_kernel_random_cases(emulated, case):
    """Seeded random cases: a configuration, 1-7 samples of 1-3000 elements, a storage dtype, each tensor's
    own offset from a 16-byte boundary (0-3 elements: vector and scalar paths mixed in one launch), plan rows
    one or per sample; against the float64 oracle (fp32) or the accuracy rule (fp16/bf16)."""
    g = torch.Generator().manual_seed(1000 + case)

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=g))

    name = list(CONFIGS)[pick(len(CONFIGS))]
    shape = (1 + pick(7), 1 + pick(3000))
    dtype = (torch.float32, torch.float16, torch.bfloat16)[pick(3)]
    kw = make_case(CONFIGS[name], shape, dtype, rows=("one", "per-sample", "broadcast")[pick(3)], seed=case)
    check_launch(emulated, kw, lambda: pick(4), f"{name} {shape} {dtype}")


BAD_KERNELS = r"""
#include <cuda_runtime.h>
#include <cstdio>
__global__ void skips_barrier(int* out) {
  if (threadIdx.x < 7) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void skips_shuffle(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 != 5) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
__global__ void warp_sum(float* out) {
  float v = float(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}
int main() {
  static int i[1024];
  static float f[1024];
  skips_barrier<<<2, 64>>>(i);
  std::printf("barrier: %s\n", cudaGetErrorString(cudaGetLastError()));
  skips_shuffle<<<1, 64>>>(f);
  std::printf("shuffle: %s\n", cudaGetErrorString(cudaGetLastError()));
  warp_sum<<<dim3(1, 70000), 32>>>(f);
  std::printf("grid: %s\n", cudaGetErrorString(cudaGetLastError()));
  warp_sum<<<1, 64>>>(f);
  std::printf("sum: %s %g %g\n", cudaGetErrorString(cudaGetLastError()), f[0], f[1]);
}
"""


def test_the_harness_reports_what_would_fail_on_a_gpu(tmp_path):
    """Its own oracle: a barrier skipped by 7 threads, a shuffle skipped by one lane and a grid.y of 70000
    are reported; two warps' shuffle sums are 0+..+31 = 496 and 32+..+63 = 1520."""
    src = tmp_path / "bad.cpp"
    src.write_text(emul_build.rewrite(BAD_KERNELS))
    exe = tmp_path / "bad"
    emul_build.run([emul_build.compiler(), "-std=c++17", "-O1", f"-I{emul_build.HERE}", str(src), "-o", str(exe)])
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout
    assert "barrier: emulated CUDA: block (0, 0, 0): __syncthreads() not reached by 7 exited threads" in out, out
    assert "shuffle: emulated CUDA: block (0, 0, 0): deadlock" in out, out
    assert "grid: emulated CUDA: grid (1, 70000, 1)" in out, out
    assert "sum: no error 496 1520" in out, out
