"""fastdiff: fused kernels for diffusion sampling, drop-in for diffusers and k-diffusion-style code.

Layers (docs/architecture.md): ``schedules`` -> ``plan`` -> ``ops`` -> backends (``reference``, ``_C``,
``triton_kernels``) -> ``samplers`` -> ``stepper`` -> ``loop`` -> ``integrations``. Submodules load on first use, so
``import fastdiff`` stays cheap (no triton, no diffusers).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "backends", "layout", "ops", "plan", "philox", "reference", "samplers", "schedules", "oracle", "loop", "stepper",
    "integrations",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdiff.{name}")
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = sorted(_SUBMODULES)
