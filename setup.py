"""Builds fastdiff._C with CMake + Ninja (pybind11, no libtorch), in the spirit of pybind11's cmake_example.

Environment:
  FASTDIFF_NO_CUDA=1        skip the CUDA kernels even when nvcc is found
  FASTDIFF_CUDA_ARCHS=80;90 CUDA architectures to compile (CMake syntax)
  FASTDIFF_BUILD_TYPE       CMake build type (default Release)
  MAX_JOBS                  parallel build jobs
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("FASTDIFF_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DFASTDIFF_CUDA_ARCHS={os.environ.get('FASTDIFF_CUDA_ARCHS', '80;90')}",
            f"-DFASTDIFF_NO_CUDA={'ON' if os.environ.get('FASTDIFF_NO_CUDA', '0') not in ('', '0') else 'OFF'}",
            "-G",
            "Ninja",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_temp, check=True)


setup(
    packages=[
        "fastdiff",
        "fastdiff.ops",
        "fastdiff.reference",
        "fastdiff.samplers",
        "fastdiff.integrations",
        "fastdiff.integrations.diffusers",
        "fastdiff.triton_kernels",
    ],
    # The Triton kernels live at the top of the repo but install inside the package: a top-level
    # `triton_kernels` would collide with the triton project's own package of that name.
    package_dir={"fastdiff.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("fastdiff._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
