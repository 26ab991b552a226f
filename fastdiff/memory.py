"""Host memory that fastdiff's CPU outputs reuse: a small cache of blocks, as torch's CUDA allocator keeps
for the GPU.

A fresh CPU tensor of a megabyte or more often comes from new pages: the allocator maps them on
allocation and hands them back to the system on free once enough is free at the top of its heap, so a
sampling loop that allocates the next sample, the data prediction and the noise every step pays a page
fault and a zeroing for every 4 KiB it writes - at 16x4x256x256 more time than the step itself.

fastdiff's CPU steps, noise draws and GMM ops take their outputs from here instead. Per shape and dtype up to
``BLOCKS_PER_SIZE`` blocks are kept (when all are held, the longest-held is forgotten: its holder keeps
it), and a block is handed out again only once nothing holds it: no tensor or view (its storage's
reference count is the cache's own) and no Python object of its storage (torch keeps one per storage,
which someone may hold: Python's reference count tells). So a returned tensor is never written behind its
holder's back, whether kept by the user, a view, a numpy array or autograd. What the two counts read for
an idle block is measured at import; where a holder would read the same, there is no cache. Small tensors,
other devices and traced code use ``torch.empty``.

``empty_cache()`` gives the idle blocks back; ``set_limit(mb)`` bounds what the cache holds (default
``FASTDIFF_CPU_CACHE_MB`` or 512; 0 turns it off).
"""

from __future__ import annotations

import math
import os
import sys
import threading

import torch

MIN_BYTES = 1 << 20     # below, finding a block (~2.5 us) gains as much as it costs (1x4x64x64: +-5%)
BLOCKS_PER_SIZE = 8     # a step's outputs and noise, the last step's that the caller still holds, history

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: no cache
_lock = threading.Lock()
_blocks: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype, inference mode): a tensor over each block
_held = 0               # bytes in _blocks
_limit = 0


def set_limit(mb: float) -> None:
    """Keep at most `mb` MiB of blocks (0: no cache). Idle blocks beyond it are let go now; blocks in use
    beyond it stay the cache's until a later ``empty_cache()`` finds them idle."""
    global _limit
    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or not mb >= 0:
        raise ValueError(f"mb: expected a number of MiB >= 0, got {mb!r}")
    _limit = int(mb * (1 << 20))
    if _held > _limit:
        empty_cache()


def empty_cache() -> int:
    """Let go of every idle block (one no tensor holds); returns the bytes let go."""
    global _held
    freed = 0
    with _lock:
        for key, blocks in list(_blocks.items()):
            keep = [b for b in blocks if _idle(b) is None]
            freed += (len(blocks) - len(keep)) * blocks[0].numel() * blocks[0].element_size()
            if keep:
                _blocks[key] = keep
            else:
                del _blocks[key]
        _held -= freed
    return freed


def cached_bytes() -> int:
    """Bytes the cache holds, idle or in use."""
    return _held


def _state(block: torch.Tensor) -> tuple[tuple[int, int], torch.UntypedStorage]:
    """(the storage's use count, its Python object's refcount) of `block`, and that storage object (the one
    torch keeps for the storage: made now, or the one someone holds)."""
    storage = block.untyped_storage()
    return (_use_count(storage._cdata), sys.getrefcount(storage)), storage


def _idle(block: torch.Tensor):
    """The storage of `block` when only the cache holds it, else None."""
    counts, storage = _state(block)
    return storage if counts == _IDLE else None


def _calibrate():
    """What _state counts for a block only the cache holds, on this torch and Python; None (no cache) if a
    block held by a tensor, a view or its storage's Python object would count the same."""
    if _use_count is None:
        return None
    t = torch.empty(16)
    block = t.detach()
    by_tensor = _state(block)[0]
    del t
    idle = _state(block)[0]
    storage = block.untyped_storage()
    by_storage = _state(block)[0]
    del storage
    view = torch.empty(0).set_(block.untyped_storage(), 0, (16,))[1:]
    by_view = _state(block)[0]
    del view
    if idle in (by_tensor, by_storage, by_view) or _state(block)[0] != idle:
        return None
    return idle


_IDLE = _calibrate()


def empty(shape, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, contiguous: on the CPU an idle cached block of that
    shape and dtype where there is one (a new alias of it, ``detach()``: no view, its own autograd state)."""
    global _held
    if device is not None and device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or _limit == 0 or _IDLE is None or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype)
    key = (tuple(shape), dtype, torch.is_inference_mode_enabled())  # inference tensors only where they may be
    with _lock:
        blocks = _blocks.get(key)
        if blocks:
            for b in blocks:
                storage = _idle(b)
                if storage is not None:
                    if storage.nbytes() == nbytes:
                        return b.detach()
                    blocks.remove(b)  # resized by its last holder: let it go
                    _held -= nbytes
                    break
        t = torch.empty(shape, dtype=dtype)
        if blocks is None:
            blocks = _blocks[key] = []
        if len(blocks) == BLOCKS_PER_SIZE:  # every one held: the longest-held is someone's for good, forget it
            del blocks[0]
            _held -= nbytes
        if _held + nbytes <= _limit:
            blocks.append(t.detach())
            _held += nbytes
        return t


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``torch.empty_like(x)``: from the cache for a CPU tensor."""
    return empty(x.shape, x.dtype, x.device)


def _env_limit() -> float:
    value = os.environ.get("FASTDIFF_CPU_CACHE_MB", "512")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"FASTDIFF_CPU_CACHE_MB: expected a number of MiB >= 0, got {value!r}") from None


set_limit(_env_limit())
