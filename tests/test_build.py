"""The native module: it loads, its coefficient layout is Python's, and - where nvcc is found - its CUDA
kernels compile for sm_90 and are in the module (they cannot run here)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fastdiff import backends
from fastdiff import layout as L

ROOT = Path(__file__).resolve().parents[1]


def nvcc():
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


def native():
    mod, why = backends.native()
    assert mod is not None, why
    return mod


def test_layout_agrees_with_the_native_header():
    names = dict(native().layout)
    ours = {k: getattr(L, k) for k in names if k not in ("MAX_OUT", "NUM_COEF")}
    assert ours == {k: v for k, v in names.items() if k in ours}
    assert names["MAX_OUT"] == L.MAX_OUT and names["NUM_COEF"] == L.NUM_COEF
    assert L.out(L.MAX_OUT - 1, L.CZ) < L.NUM_COEF
    assert len(L.names()) == L.NUM_COEF and len(set(L.names()) - {"pad"}) == L.out(L.MAX_OUT - 1, L.CZ) + 1


def test_native_parameter_order_agrees():
    from fastdiff.ops.step import NATIVE_FIELDS

    assert tuple(native().step_fields) == NATIVE_FIELDS


def test_native_module_reports_itself():
    mod = native()
    assert mod.cpu_isa()
    assert mod.num_threads() >= 1


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
def test_module_was_built_with_cuda_kernels():
    mod = native()
    assert mod.with_cuda, "nvcc is present, so fastdiff._C must carry its CUDA kernels"
    assert hasattr(mod, "step_cuda")
    assert "90" in mod.cuda_archs.split(",")
    count, err = mod.cuda_device_count()
    assert count >= 0 and isinstance(err, str)


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_compile_for_sm90(tmp_path):
    cubin = tmp_path / "step_sm90.cubin"
    cmd = [nvcc(), "-cubin", "-arch=sm_90", "-std=c++17", "-O3", "--expt-relaxed-constexpr",
           f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "csrc" / "cuda" / "step.cu"), "-o", str(cubin)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF"
    # one kernel per storage dtype and output count, all in the sm_90 image
    for dtype in (b"f", b"NS_6half_tE", b"NS_6bf16_tE"):
        for n_out in (1, 2, 3):
            vec = b"4" if dtype == b"f" else b"8"
            assert b"step_kernelI" + dtype + b"Li" + vec + b"ELi" + str(n_out).encode() in data, (dtype, n_out)
