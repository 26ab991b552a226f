"""Which backends run here, and which one an op uses (docs/architecture.md, "Ops").

``cuda`` and ``cpu`` are the native module ``fastdiff._C``; ``triton`` runs on CUDA tensors, and on CPU
tensors only under ``TRITON_INTERPRET=1`` (tests); ``torch`` is the reference and always works.
Automatic choice: CUDA tensors -> cuda, else triton, else torch; CPU tensors -> cpu, else torch.
``backend=`` or ``FASTDIFF_BACKEND`` forces one, and a forced backend that cannot run raises.
"""

from __future__ import annotations

import functools
import os

import torch

from fastdiff.layout import STEP_FIELDS, constants

BACKENDS = ("cuda", "triton", "cpu", "torch")
_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@functools.cache
def native():
    """(fastdiff._C or None, why not). A module built from other sources than this Python package (its
    parameter list or coefficient layout differs) is refused: it would read pointers in the wrong places."""
    try:
        from fastdiff import _C
    except ImportError as exc:  # not built, or built for another Python
        return None, f"fastdiff._C is not importable ({exc}); build it with `pip install -e .`"
    return check_native(_C)


def check_native(mod) -> tuple:
    """(mod, "") when `mod`'s step parameters and layout are this package's, else (None, why)."""
    fields, layout = tuple(getattr(mod, "step_fields", ())), dict(getattr(mod, "layout", {}))
    if fields != STEP_FIELDS or layout != constants():
        what = "step parameters" if fields != STEP_FIELDS else "coefficient layout"
        return None, (f"fastdiff._C is stale: its {what} differ from this fastdiff's (fastdiff/layout.py); "
                      f"rebuild it with `pip install -e .`")
    return mod, ""


@functools.cache
def triton_kernels():
    """(fastdiff.triton_kernels or None, why not). Imported on first use: triton is slow to import."""
    try:
        import fastdiff.triton_kernels as tk
    except ImportError as exc:
        return None, f"triton is not importable ({exc}); `pip install triton`"
    return tk, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _status(name: str, device_type: str, interpret: bool) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name in ("cpu", "cuda"):
        if device_type != name:
            return False, f"the {name} backend runs on {name} tensors, got {device_type} tensors"
        mod, why = native()
        if mod is None:
            return False, why
        if name == "cuda" and not mod.with_cuda:
            return False, "fastdiff._C was built without CUDA (nvcc not found, or FASTDIFF_NO_CUDA=1)"
        return True, ""
    if name == "triton":
        if device_type == "cpu" and not interpret:
            return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return False, f"triton runs on cuda tensors, got {device_type} tensors"
        mod, why = triton_kernels()
        return (mod is not None), why
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def status(name: str, device: torch.device | str) -> tuple[bool, str]:
    """(whether backend `name` can run on tensors of `device`, why not)."""
    return _status(name, torch.device(device).type, triton_interpret())


_CHOICES: dict[tuple, str] = {}
# os.environ.get of an unset name goes through a KeyError (~1 us); its underlying dict answers in ~50 ns.
_ENV = getattr(os.environ, "_data", None) if os.name == "posix" else None


def forced_backend() -> str | None:
    """FASTDIFF_BACKEND, read on every call (so that setting it at run time takes effect)."""
    if _ENV is not None:
        v = _ENV.get(b"FASTDIFF_BACKEND")
        return v.decode() if v else None
    return os.environ.get("FASTDIFF_BACKEND") or None


def choose(device: torch.device, backend: str | None = None) -> str:
    """The backend an op runs on for tensors on `device` (cached: this runs on every step; whether the
    Triton interpreter is on is read once, as triton itself does when it is imported)."""
    forced = backend or forced_backend()
    key = (device.type, forced)
    name = _CHOICES.get(key)
    if name is None:
        name = _CHOICES[key] = _choose(device, forced)
    return name


def _choose(device: torch.device, forced: str | None) -> str:
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {forced!r}")
        ok, why = _status(forced, device.type, triton_interpret())
        if not ok:
            raise RuntimeError(f"backend {forced!r} was requested but cannot run here: {why}")
        return forced
    for name in _AUTO.get(device.type, ("torch",)):
        if _status(name, device.type, triton_interpret())[0]:
            return name
    return "torch"
