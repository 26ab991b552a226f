"""The native module: it loads, its coefficient layout and parameter list are Python's (a stale module
is refused with a clear reason), and - where nvcc is found - its CUDA kernels compile for sm_90 and are in
the module (they cannot run here)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

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


def test_layout_and_parameters_agree_with_the_native_module():
    mod = native()
    assert dict(mod.layout) == L.constants()
    assert tuple(mod.step_fields) == L.STEP_FIELDS
    assert L.out(L.MAX_OUT - 1, L.CZ) < L.NUM_COEF
    assert len(L.names()) == L.NUM_COEF and len(set(L.names()) - {"pad"}) == L.out(L.MAX_OUT - 1, L.CZ) + 1


def test_a_stale_native_module_is_refused():
    """A module built from other sources (other parameter order, other layout) would read pointers in the
    wrong places: backends.check_native refuses it and says to rebuild."""
    good = native()

    class Stale:
        step_fields = list(reversed(good.step_fields))
        layout = dict(good.layout)

    mod, why = backends.check_native(Stale)
    assert mod is None and "stale: its step parameters differ" in why and "pip install -e ." in why
    Stale.step_fields, Stale.layout = list(good.step_fields), {**good.layout, "CZ": 99}
    mod, why = backends.check_native(Stale)
    assert mod is None and "coefficient layout" in why
    assert backends.check_native(good) == (good, "")


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
    assert (count > 0) == torch.cuda.is_available() or err, (count, err)


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
