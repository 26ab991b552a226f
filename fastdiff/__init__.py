"""fastdiff: fused kernels for diffusion sampling, drop-in for diffusers and k-diffusion-style code.

Layers (docs/architecture.md): ``schedules`` -> ``plan`` -> ``ops`` -> backends (``reference``, ``_C``,
``triton_kernels``) -> ``samplers`` -> ``stepper`` -> ``loop`` -> ``integrations``. Submodules load on first use, so
``import fastdiff`` stays cheap (no triton, no diffusers).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "backends", "layout", "ops", "plan", "philox", "reference", "samplers", "schedules", "oracle", "loop", "stepper",
    "integrations", "gmm", "conditioning", "training", "memory",
}


# the seed methods' schedulers and the mixture, by name (they load diffusers when first asked for)
_NAMES = {
    "MixDDPMScheduler": "fastdiff.integrations.diffusers", "MixDDIMScheduler": "fastdiff.integrations.diffusers",
    "DDIMGMMScheduler": "fastdiff.integrations.diffusers", "DDMScheduler": "fastdiff.integrations.diffusers",
    "IADBScheduler": "fastdiff.integrations.diffusers", "GaussianMixture": "fastdiff.gmm",
    "GMMConditioning": "fastdiff.conditioning",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdiff.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


__all__ = sorted(_SUBMODULES | set(_NAMES))
