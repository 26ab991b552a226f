"""No native kernel touches memory outside its tensors. Each case places every tensor it passes against an
inaccessible page (PROT_NONE): once with the tensor's last byte just before the page, once with its first
byte just after one, so a read or write past either end faults at once - which guard elements would not
catch for reads, and which a vector load of a sample's tail would do. The step kernel (every term
configuration, fp32/fp16/bf16, sizes that are and are not multiples of a vector) and gmm_noise (per sample,
channel and element; drawn and given ids and normals) and gmm_score, on the cpu kernels and on the CUDA
kernels' code run on the host (tests/cuda_emul). The cases run in a child process, so a fault is a failed
test that names its case."""

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PAGE = mmap.PAGESIZE
_MAPS = []  # keeps the fenced mappings alive for the child's lifetime
_LIBC = ctypes.CDLL(None, use_errno=True)


def fenced(t: torch.Tensor, end: bool) -> torch.Tensor:
    """A copy of `t` (contiguous) whose last byte (`end`) or first byte sits against a PROT_NONE page."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    pages = max(1, -(-nbytes // PAGE))
    m = mmap.mmap(-1, (pages + 2) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for addr in (base, base + (pages + 1) * PAGE):
        if _LIBC.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE), 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
    _MAPS.append(m)
    start = PAGE + (pages * PAGE - nbytes if end else 0)
    raw = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=start)
    out = raw.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def fence_all(v, end: bool):
    if isinstance(v, torch.Tensor):
        return fenced(v, end)
    if isinstance(v, list):
        return [fence_all(t, end) for t in v]
    return v


def step_cases():
    from cases import CONFIGS, make_case

    for name, cfg in CONFIGS.items():
        for shape in [(3, 5, 17, 19), (2, 4, 8, 8), (1, 7), (2, 4, 16, 33), (5, 1030)]:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                yield f"step {name} {shape} {dtype}", make_case(cfg, shape, dtype, rows="per-sample")


def run_cases() -> None:
    """Child: every case, each with its tensors fenced at their end, then at their start."""
    from fastdiff import backends
    from fastdiff.ops import gmm_args
    from fastdiff.ops.gmm import _noise_native, _score_native
    from fastdiff.ops.step import native_args, validate

    launch = backends.native()[0].step_cpu
    n = 0
    for end in (True, False):
        for what, kw in step_cases():
            print(f"case {what} end={end}", flush=True)
            a = validate(**{k: fence_all(v, end) for k, v in kw.items()})
            outs = [fenced(torch.empty(a.shape, dtype=a.dtype), end) for _ in range(a.n_out)]
            launch(native_args(a, outs))
            n += 1
        g = torch.Generator().manual_seed(0)
        K, shape = 5, (3, 4, 5, 7)
        w = torch.rand(K, generator=g) + 0.1
        w = fenced(w / w.sum(), end)
        mu, sd = fenced(torch.randn(K, 140, generator=g), end), fenced(torch.rand(K, 1, generator=g) + 0.5, end)
        for per, ids_shape in (("sample", (3,)), ("channel", (3, 4)), ("element", shape)):
            for given in (False, True):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    print(f"case gmm_noise per={per} given={given} {dtype} end={end}", flush=True)
                    seeds = fenced(torch.tensor([1, 2, 3]), end)
                    z = fenced(torch.randn(shape, generator=g).to(dtype), end) if given else None
                    k = fenced(torch.randint(0, K, ids_shape, generator=g), end) if given else None
                    a = gmm_args.validate_noise(w, mu, sd, shape, per, None if given else seeds, 4, z, k, dtype,
                                                torch.device("cpu"))
                    x = fenced(torch.empty(a.batch, a.numel, dtype=dtype), end)
                    ids = None if given else fenced(torch.empty(a.batch, a.n_draws, dtype=torch.int64), end)
                    _noise_native(a, x, ids, "cpu")
                    n += 1
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            print(f"case gmm_score {dtype} end={end}", flush=True)
            x2 = fenced(torch.randn(3, 140, generator=g).to(dtype), end)
            _score_native(*gmm_args.validate_score(x2, w, mu, sd), "cpu")
            n += 1
    print(f"done {n}", flush=True)


@pytest.mark.parametrize("kernels", ["cpu", "cuda-emulated"])
def test_no_kernel_reads_or_writes_outside_its_tensors(kernels):
    if kernels == "cuda-emulated":
        from cuda_emul import build

        if build.compiler() is None:
            pytest.skip("needs a C++ compiler (g++)")
        build.build()  # here, so that a build error is reported as one
    from fastdiff import backends

    if backends.native()[0] is None:
        pytest.skip(f"fastdiff._C: {backends.native()[1]}")
    env_flag = "1" if kernels == "cuda-emulated" else "0"
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FASTDIFF_EMULATED_CUDA": env_flag})
    lines = res.stdout.splitlines()
    last = next((line for line in reversed(lines) if line.startswith("case ")), "before the first case")
    assert res.returncode == 0, (f"{kernels}: the child died (exit {res.returncode}) in {last[5:]}\n"
                                 f"{res.stderr[-3000:]}")
    assert lines and lines[-1].startswith("done "), res.stdout[-2000:]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest  # noqa: F401  (under FASTDIFF_EMULATED_CUDA=1 it routes the native calls, as in the suite)

    run_cases()
