"""What every op shares: argument checks that name the argument, the storage dtypes, when a call must
take the torch reference (float64, autograd), the aliasing rule for ``out=``, and the native call
(``fastdiff._C`` takes raw pointers; its parameter tuple is built by field name)."""

from __future__ import annotations

import torch

from fastdiff import backends

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # fastdiff/layout.py FLOAT32, ...
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(op: str, name: str, t, *, shape=None, dtype=None, device=None, dim=None) -> torch.Tensor:
    """`t` checked against what is given (naming `name`, expected and got), made contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (like the other inputs), got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()


def check_storage_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        raise TypeError(f"{op}: storage dtype must be float32, float16, bfloat16 or float64, got {dtype} ({name})")


def needs_reference(dtype: torch.dtype, tensors) -> bool:
    """float64 storage, or an input that autograd must see through: the torch reference runs these (the
    kernels compute in float32 and record no graph)."""
    return dtype == torch.float64 or (torch.is_grad_enabled()
                                      and any(t is not None and t.requires_grad for t in tensors))


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + t.untyped_storage().nbytes() if t.numel() == 0 else lo + t.numel() * t.element_size()


def check_out_aliasing(op: str, outs, ins) -> None:
    """Refuse an ``out`` tensor that partly overlaps an input or another output, as torch does: a tensor
    written exactly where it is read (the same memory, shape and strides) is fine (in place), any
    other overlap would read elements already written. `outs`, `ins`: (name, tensor) pairs."""
    spans = [(n, t, *_span(t)) for n, t in outs if t.numel()]
    others = [(n, t, *_span(t)) for n, t in ins if t is not None and t.numel()]
    for i, (n, t, lo, hi) in enumerate(spans):
        for m, u, ulo, uhi in spans[i + 1:] + others:
            if lo < uhi and ulo < hi:
                same = lo == ulo and t.shape == u.shape and t.stride() == u.stride() and t.dtype == u.dtype
                if not same or any(m == name for name, *_ in spans):
                    raise ValueError(f"{op}: {n} overlaps {m} in memory; an output may only be exactly "
                                     f"one of the inputs (in place), never partly overlap one")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def native_step(args: tuple, device: torch.device) -> None:
    """Run the native step with `args` (in ``fastdiff/layout.py``'s STEP_FIELDS order: ``backends.native``
    refuses a module with another order) on `device`."""
    _C = backends.native()[0]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        _C.step_cuda(args, index, torch.cuda.current_stream(device).cuda_stream)
    else:
        _C.step_cpu(args)
