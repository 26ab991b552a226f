"""Build fastdiff._C with its CUDA kernels emulated on the host (tests/cuda_emul/cuda_runtime.h), for CI
without a GPU: ``build()`` returns the path of the module, built once per source content under
build/cuda_emul/. The CUDA sources are compiled unchanged but for three rewrites, done here:

- ``kernel<<<grid, block[, smem[, stream]]>>>(args);`` -> ``fd_emul::launch([&] { kernel(args); }, grid, ...);``
- ``extern __shared__ T name[];`` -> ``T* name = fd_emul::dynamic_shared<T>();``
- ``__shared__ T name[n];`` -> ``auto& name = fd_emul::block_shared<T[n], id>();`` (poisoned per block)

The module is the real ``_C`` in every other respect (bindings.cpp, the CPU kernels): its ``step_cuda``,
``gmm_noise_cuda`` and ``gmm_score_cuda`` take host pointers and run the CUDA kernels' code.
Run as a script, it builds and prints the path. FASTDIFF_EMUL_EXTRA adds compiler and linker flags, e.g.
``-fsanitize=undefined -fno-sanitize-recover=all`` to run the suite with the kernels under UBSan.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CUDA_SOURCES = ("step.cu", "gmm.cu")
# bindings.cpp and the CPU kernels, as CMakeLists.txt lists them (FASTDIFF_CPU_SOURCES)
CPU_SOURCES = ("bindings.cpp", *(path.removeprefix("csrc/") for path in re.search(
    r"set\(FASTDIFF_CPU_SOURCES([^)]*)\)", (ROOT / "CMakeLists.txt").read_text()).group(1).split()))
# The CUDA units take the shared headers' device paths (__CUDA_ARCH__: the toolkit's fp16/bf16 conversions and
# integer intrinsics, stood in for by this folder's headers), inside namespace fastdiff_device so that those
# definitions of the shared inline functions stay apart from the CPU units' host ones (adapter.cpp forwards).
DEVICE_FLAGS = ("-D__CUDACC__", "-D__CUDA_ARCH__=900", "-Dfastdiff=fastdiff_device", "-Wno-unknown-pragmas")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*(\[[^\]]*\])?\s*;")


def rewrite(src: str) -> str:
    """The CUDA source `src` as C++ for the emulation (the three rewrites of the module docstring); a launch or a
    shared variable the rewrites do not understand is an error (it would compile, unchecked or unpoisoned)."""
    src = _EXTERN_SHARED.sub(r"\1* \2 = fd_emul::dynamic_shared<\1>();", src)
    src = _SHARED.sub(r"auto& \2 = fd_emul::block_shared<\1\3, __COUNTER__>();", src)
    src = _LAUNCH.sub(lambda m: f"fd_emul::launch([&] {{ {m[1]}({m[3]}); }}, {m[2]});", src)
    for left, what in (("<<<", "kernel launch"), ("__shared__", "shared variable")):
        if left in src:
            raise RuntimeError(f"cuda_emul: a {what} the rewrite does not understand is left")
    return src


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _flags() -> list[str]:
    import pybind11

    # -O2 -march=native: GCC contracts a*b + c into FMAs where this CPU has them, as nvcc does by default
    return ["-std=c++17", "-O2", "-g0", "-march=native", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
            "-Wno-psabi",
            f"-I{HERE}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            "-DFASTDIFF_WITH_CUDA=1", "-DFASTDIFF_WITH_OPENMP=1", '-DFASTDIFF_CUDA_ARCHS="emulated"',
            # grids of at most 2 sample rows: batches above 2 take the path a GPU takes past 65535 samples
            "-DFASTDIFF_CUDA_GRID_CAP=2", *_extra()]


def _extra() -> list[str]:
    return os.environ.get("FASTDIFF_EMUL_EXTRA", "").split()


def build(out_root: Path | None = None) -> Path:
    """Path of the emulated module, compiled if its sources changed since the last build."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda_emul: no C++ compiler (g++) on PATH")
    sources = {name: (ROOT / "csrc" / "cuda" / name).read_text() for name in CUDA_SOURCES}
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "csrc").rglob("*"), *HERE.glob("*.h"), HERE / "adapter.cpp", Path(__file__)]):
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    digest.update(" ".join([cxx, sys.version, *_flags()]).encode())
    out_dir = (out_root or ROOT / "build" / "cuda_emul") / digest.hexdigest()[:16]
    module = out_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if module.exists():
        return module
    out_dir.mkdir(parents=True, exist_ok=True)
    units = [ROOT / "csrc" / name for name in CPU_SOURCES] + [HERE / "adapter.cpp"]
    for name, src in sources.items():
        unit = out_dir / (Path(name).stem + "_emulated.cpp")
        unit.write_text(f'// Generated by tests/cuda_emul/build.py from csrc/cuda/{name}\n#line 1 "csrc/cuda/{name}"\n'
                        + rewrite(src))
        units.append(unit)

    def compile_unit(unit: Path) -> Path:
        obj = out_dir / (unit.stem + ".o")
        device = DEVICE_FLAGS if unit.name.endswith("_emulated.cpp") else ()
        run([cxx, *_flags(), *device, "-c", str(unit), "-o", str(obj)])
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objs = list(pool.map(compile_unit, units))
    tmp = module.with_suffix(".tmp")
    run([cxx, "-shared", "-fopenmp", *_extra(), *map(str, objs), "-o", str(tmp)])
    tmp.rename(module)
    return module


def run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"cuda_emul: `{' '.join(cmd)}` failed:\n{res.stderr[-4000:]}")


def load(path: Path):
    """The module at `path` (named _C, like the real one, which its init function requires)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



def install() -> None:
    """Route every native call of the ``cpu`` backend to the emulated CUDA kernels: the tests of the cpu
    backend then test the CUDA kernels' code (tests/conftest.py calls this under FASTDIFF_EMULATED_CUDA=1)."""
    import types

    from fastdiff import backends

    mod = load(build())
    shim = types.SimpleNamespace(**{k: getattr(mod, k) for k in dir(mod) if not k.startswith("__")})
    shim.step_cpu = lambda args: mod.step_cuda(args, 0, 0)
    shim.gmm_noise_cpu = lambda args: mod.gmm_noise_cuda(args, 0, 0)  # None: ids are range-checked on the host
    shim.gmm_score_cpu = lambda args: mod.gmm_score_cuda(args, 0, 0)
    checked, why = backends.check_native(shim)
    if checked is None:
        raise RuntimeError(f"cuda_emul: {why}")
    backends.native = lambda: (checked, "")


if __name__ == "__main__":
    print(build())
