"""``python -m fastdiff info``: versions, which backends run here (and why not), the CUDA archs compiled
into ``fastdiff._C``, and the GPU (through nvidia-ml-py) when there is one."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from fastdiff import __version__, backends


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return ["(nvidia-ml-py not installed: `pip install nvidia-ml-py`)"]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [f"none (NVML: {exc})"]
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        rows = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            rows.append(f"{i}: {pynvml.nvmlDeviceGetName(h)}, sm_{major}{minor}, "
                        f"{mem.total / 2**30:.1f} GiB, driver {driver}")
        return rows or ["none"]
    finally:
        pynvml.nvmlShutdown()


def report() -> str:
    lines = [f"fastdiff {__version__}",
             f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, "
             f"triton {_version('triton')}, diffusers {_version('diffusers')}, numpy {_version('numpy')}"]
    _C, why = backends.native()
    if _C is None:
        lines.append(f"native module: unavailable: {why}")
    else:
        archs = _C.cuda_archs or "none"
        lines.append(f"native module: fastdiff._C, CPU kernels for {_C.cpu_isa()} "
                     f"({'OpenMP, ' + str(_C.num_threads()) + ' threads' if _C.openmp else 'no OpenMP'}), "
                     f"CUDA archs compiled: {archs if _C.with_cuda else 'none (built without nvcc)'}")
    lines.append("backends:")
    for dev in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            ok, reason = backends.status(name, dev)
            if dev == "cuda" and ok and not torch.cuda.is_available():
                ok, reason = False, "no CUDA device visible to torch"
            lines.append(f"  {dev:4s} tensors  {name:6s}  {'yes' if ok else 'no: ' + reason}")
        lines.append(f"  {dev:4s} tensors  automatic choice: "
                     + (backends.choose(torch.device(dev)) if dev == "cpu" or torch.cuda.is_available() else "-"))
    lines.append("GPUs: " + "; ".join(_gpus()))
    return "\n".join(lines)
