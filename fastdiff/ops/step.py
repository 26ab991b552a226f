"""``fastdiff.ops.step``: one fused sampler step (DESIGN.md, "One step kernel, many methods").

Validates the inputs, picks a backend (``fastdiff.backends``) and runs it. Registered as the custom op
``fastdiff::step`` (and ``fastdiff::step_out``, which writes into given tensors) with fake kernels, so
``torch.compile(fullgraph=True)`` sees no graph break; eager calls skip the dispatcher.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import List, Optional

import torch

from fastdiff import backends
from fastdiff import layout as L
from fastdiff import random as fd_random

_DTYPE_CODE = {torch.float32: L.FLOAT32, torch.float16: L.FLOAT16, torch.bfloat16: L.BFLOAT16}


@dataclass
class StepArgs:
    """The validated, contiguous inputs of one step."""

    coef: torch.Tensor
    x: torch.Tensor | None
    e: list[torch.Tensor]
    e_uncond: list[torch.Tensor] | None
    m: list[torch.Tensor]
    x_last: torch.Tensor | None
    row: int
    rows: torch.Tensor | None
    offset: torch.Tensor | None
    idx: torch.Tensor | None
    row_table: torch.Tensor | None
    var_table: torch.Tensor | None
    noise: torch.Tensor | None
    seeds: torch.Tensor | None
    noise_step: int
    noise_stream: int
    clamp: bool
    n_out: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape[1:])


def _check_tensor(name, t, *, shape=None, dtype=None, device=None, dim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"step: {name} must be on {device} (like the other inputs), got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"step: {name} must have dtype {dtype}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"step: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"step: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()


_FINITE: dict[int, tuple[weakref.ref, int]] = {}  # id(coef) -> (coef, its _version when found finite)


def _check_coef_host(coef: torch.Tensor, row: int, rows: torch.Tensor | None) -> None:
    """Range of the rows used, and finiteness of a host table, where that costs no device sync. A table
    is checked again only after it changed (its version counter moved): plans are checked when built."""
    if rows is None:
        if not -coef.shape[0] <= row < coef.shape[0]:
            raise ValueError(f"step: row must be in [-{coef.shape[0]}, {coef.shape[0]}) (rows of coef; "
                             f"negative rows count from the end), got {row}")
    elif rows.device.type == "cpu" and rows.numel():
        if int(rows.min()) < -coef.shape[0] or int(rows.max()) >= coef.shape[0]:
            raise ValueError(f"step: rows must lie in [-{coef.shape[0]}, {coef.shape[0]}) (rows of coef), "
                             f"got {rows.tolist()}")
    if coef.device.type != "cpu":
        return
    seen = _FINITE.get(id(coef))
    if seen is not None and seen[0]() is coef and seen[1] == coef._version:
        return
    if not bool(torch.isfinite(coef).all()):
        r, j = (~torch.isfinite(coef)).nonzero()[0].tolist()
        raise ValueError(f"step: coef has a non-finite coefficient at row {r}: {L.names()[j]} = {coef[r, j].item()}")
    if len(_FINITE) > 256:
        _FINITE.clear()
    _FINITE[id(coef)] = (weakref.ref(coef), coef._version)


def validate(
    coef, x=None, e=(), e_uncond=None, m=(), x_last=None, row=0, rows=None, offset=None, idx=None,
    row_table=None, var_table=None, noise=None, seeds=None, noise_step=0, noise_stream=0, clamp=False,
    n_out=1, shape=None,
) -> StepArgs:
    """Check every argument (naming it, with what was expected and what came) and normalise them."""
    e, m = list(e), list(m)
    if len(e) > 2:
        raise ValueError(f"step: e takes at most 2 model outputs, got {len(e)}")
    if len(m) > 3:
        raise ValueError(f"step: m takes at most 3 history slots, got {len(m)}")
    if e_uncond is not None and len(e_uncond) != len(e):
        raise ValueError(f"step: e_uncond must pair with e ({len(e)} tensors), got {len(e_uncond)}")
    if not 1 <= n_out <= L.MAX_OUT:
        raise ValueError(f"step: n_out must be 1, 2 or 3, got {n_out}")
    if noise is not None and seeds is not None:
        raise ValueError("step: give noise or seeds, not both")
    if (row_table is not None or var_table is not None) and idx is None:
        raise ValueError("step: row_table/var_table need idx (the row of each sample)")

    big = [("x", x), *((f"e[{i}]", t) for i, t in enumerate(e)), *((f"m[{i}]", t) for i, t in enumerate(m)),
           ("x_last", x_last), ("noise", noise)]
    if e_uncond is not None:
        big += [(f"e_uncond[{i}]", t) for i, t in enumerate(e_uncond)]
    present = [(n, t) for n, t in big if t is not None]
    if present:
        ref_name, ref = present[0]
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"step: {ref_name} must be a torch.Tensor, got {type(ref).__name__}")
        if shape is not None and tuple(shape) != tuple(ref.shape):
            raise ValueError(f"step: shape {tuple(shape)} disagrees with {ref_name} {tuple(ref.shape)}")
        shape, dtype, device = tuple(ref.shape), ref.dtype, ref.device
    else:
        if shape is None:
            raise ValueError("step: no tensor input gives the batch shape; pass shape=")
        shape, dtype, device = tuple(int(s) for s in shape), torch.float32, coef.device
    if len(shape) < 1:
        raise ValueError(f"step: tensors must have a batch dimension, got shape {shape}")
    if dtype not in _DTYPE_CODE:
        raise TypeError(f"step: storage dtype must be float32, float16 or bfloat16, got {dtype} ({ref_name})")

    def big_check(name, t):
        return None if t is None else _check_tensor(name, t, shape=shape, dtype=dtype, device=device)

    B = shape[0]
    coef = _check_tensor("coef", coef, dtype=torch.float32, device=device, dim=2)
    if coef.shape[1] != L.NUM_COEF or coef.shape[0] == 0:
        raise ValueError(f"step: coef must have shape [rows >= 1, {L.NUM_COEF}], got {tuple(coef.shape)}")
    if rows is not None:
        rows = _check_tensor("rows", rows, dtype=torch.int64, device=device, dim=1)
        if rows.shape[0] not in (1, B):
            raise ValueError(f"step: rows must have 1 or {B} (batch) entries, got {rows.shape[0]}")
    if not torch.compiler.is_compiling():
        _check_coef_host(coef, row, rows)
    K = None
    tables = []
    for name, t in (("row_table", row_table), ("var_table", var_table)):
        if t is not None:
            t = _check_tensor(name, t, dtype=torch.float32, device=device)
            if tuple(t.shape[1:]) != shape[1:] and (t.dim() != 2 or t.shape[1] != math.prod(shape[1:])):
                raise ValueError(f"step: {name} must have shape [K, *{shape[1:]}] or [K, D], got {tuple(t.shape)}")
            if K is not None and t.shape[0] != K:
                raise ValueError(f"step: row_table and var_table must have the same K, got {K} and {t.shape[0]}")
            K = t.shape[0]
        tables.append(t)
    if (K is not None and isinstance(idx, torch.Tensor) and idx.device.type == "cpu" and idx.numel()
            and not torch.compiler.is_compiling() and (int(idx.min()) < 0 or int(idx.max()) >= K)):
        raise ValueError(f"step: idx must lie in [0, {K}) (rows of the tables), got {idx.tolist()}")
    return StepArgs(
        coef=coef,
        x=big_check("x", x),
        e=[big_check(f"e[{i}]", t) for i, t in enumerate(e)],
        e_uncond=None if e_uncond is None else [big_check(f"e_uncond[{i}]", t) for i, t in enumerate(e_uncond)],
        m=[big_check(f"m[{i}]", t) for i, t in enumerate(m)],
        x_last=big_check("x_last", x_last),
        row=int(row),
        rows=rows,
        offset=None if offset is None else _check_tensor("offset", offset, shape=(B,), dtype=torch.float32, device=device),
        idx=None if idx is None else _check_tensor("idx", idx, shape=(B,), dtype=torch.int64, device=device),
        row_table=tables[0],
        var_table=tables[1],
        noise=big_check("noise", noise),
        seeds=None if seeds is None else _check_tensor("seeds", seeds, shape=(B,), dtype=torch.int64, device=device),
        noise_step=int(noise_step),
        noise_stream=int(noise_stream),
        clamp=bool(clamp),
        n_out=int(n_out),
        shape=shape,
        dtype=dtype,
        device=device,
    )


def _check_out(a: StepArgs, out: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(out) != a.n_out:
        raise ValueError(f"step: out must hold n_out={a.n_out} tensors, got {len(out)}")
    for k, o in enumerate(out):
        _check_tensor(f"out[{k}]", o, shape=a.shape, dtype=a.dtype, device=a.device)
        if not o.is_contiguous():
            raise ValueError(f"step: out[{k}] must be contiguous")
    return list(out)


# ---------------------------------------------------------------------------------------------- backends

def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# The order of fastdiff._C.step_fields (csrc/bindings.cpp); tests/test_build.py checks they agree.
NATIVE_FIELDS = ("batch", "numel", "dtype", "x", "e0", "e1", "eu0", "eu1", "m0", "m1", "m2", "x_last", "offset",
                 "idx", "row_table", "var_table", "table_rows", "noise", "seeds", "noise_step", "noise_stream",
                 "coef", "coef_rows", "row", "rows", "rows_len", "clamp", "n_out", "out0", "out1", "out2")


def native_args(a: StepArgs, outs: list[torch.Tensor]) -> tuple:
    """The flat parameter tuple of the native kernels, in NATIVE_FIELDS order."""
    e = [*a.e, None, None]
    eu = [*(a.e_uncond or ()), None, None]
    m = [*a.m, None, None, None]
    o = [*outs, None, None]
    table = a.row_table if a.row_table is not None else a.var_table
    return (a.batch, a.numel, _DTYPE_CODE[a.dtype], _ptr(a.x), _ptr(e[0]), _ptr(e[1]), _ptr(eu[0]), _ptr(eu[1]),
            _ptr(m[0]), _ptr(m[1]), _ptr(m[2]), _ptr(a.x_last), _ptr(a.offset), _ptr(a.idx), _ptr(a.row_table),
            _ptr(a.var_table), 0 if table is None else table.shape[0], _ptr(a.noise), _ptr(a.seeds),
            a.noise_step & 0xFFFFFFFF, a.noise_stream & 0xFFFFFFFF, _ptr(a.coef), a.coef.shape[0], a.row,
            _ptr(a.rows), 0 if a.rows is None else a.rows.shape[0], a.clamp, a.n_out, _ptr(o[0]),
            _ptr(o[1]) if a.n_out > 1 else 0, _ptr(o[2]) if a.n_out > 2 else 0)


def _run_native(a: StepArgs, outs: list[torch.Tensor], cuda: bool) -> None:
    _C = backends.native()[0]
    p = native_args(a, outs)
    if cuda:
        dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
        _C.step_cuda(p, dev, torch.cuda.current_stream(a.device).cuda_stream)
    else:
        _C.step_cpu(p)


def reference_outputs(a: StepArgs, compute_dtype: torch.dtype = torch.float32,
                      out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The torch reference's outputs for validated arguments (tests also use float64 / storage dtype)."""
    from fastdiff import reference

    B, NC = a.batch, L.NUM_COEF
    if a.rows is None:
        c = a.coef[a.row].expand(B, NC)
    else:
        c = a.coef[a.rows.expand(B) if a.rows.shape[0] == 1 else a.rows]
    z = a.noise
    if z is None and a.seeds is not None:
        z = fd_random.randn(a.seeds, a.numel, step=a.noise_step, stream=a.noise_stream,
                            dtype=torch.float64).reshape(a.shape)
    return reference.step(c, a.x, a.e, a.e_uncond, a.m, a.x_last, a.offset, a.idx, a.row_table, a.var_table,
                          z, a.clamp, a.n_out, shape=a.shape, out_dtype=out_dtype or a.dtype,
                          compute_dtype=compute_dtype)


def run(a: StepArgs, outs: list[torch.Tensor], backend: str | None) -> None:
    """Run validated arguments on the chosen backend, writing `outs`."""
    if a.batch == 0 or a.numel == 0:
        return
    name = backends.choose(a.device, backend)
    if name in ("cpu", "cuda"):
        _run_native(a, outs, cuda=name == "cuda")
    elif name == "triton":
        backends.triton_kernels()[0].step.launch(a, outs)
    else:
        for o, r in zip(outs, reference_outputs(a)):
            o.copy_(r)


# ------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("fastdiff::step", mutates_args=())
def _step_op(
    coef: torch.Tensor, x: Optional[torch.Tensor], e: List[torch.Tensor], e_uncond: List[torch.Tensor],
    m: List[torch.Tensor], x_last: Optional[torch.Tensor], row: int, rows: Optional[torch.Tensor],
    offset: Optional[torch.Tensor], idx: Optional[torch.Tensor], row_table: Optional[torch.Tensor],
    var_table: Optional[torch.Tensor], noise: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
    noise_step: int, noise_stream: int, clamp: bool, n_out: int, shape: List[int], backend: str,
) -> List[torch.Tensor]:
    a = validate(coef, x, e, e_uncond if e_uncond else None, m, x_last, row, rows, offset, idx, row_table,
                 var_table, noise, seeds, noise_step, noise_stream, clamp, n_out, shape or None)
    outs = [torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(a.n_out)]
    run(a, outs, backend or None)
    return outs


@_step_op.register_fake
def _step_fake(coef, x, e, e_uncond, m, x_last, row, rows, offset, idx, row_table, var_table, noise, seeds,
               noise_step, noise_stream, clamp, n_out, shape, backend):
    ref = next((t for t in (x, *e, *m, x_last, noise) if t is not None), None)
    if ref is not None:
        return [torch.empty_like(ref, memory_format=torch.contiguous_format) for _ in range(n_out)]
    return [coef.new_empty(shape) for _ in range(n_out)]


@torch.library.custom_op("fastdiff::step_out", mutates_args=("out",))
def _step_out_op(
    coef: torch.Tensor, x: Optional[torch.Tensor], e: List[torch.Tensor], e_uncond: List[torch.Tensor],
    m: List[torch.Tensor], x_last: Optional[torch.Tensor], row: int, rows: Optional[torch.Tensor],
    offset: Optional[torch.Tensor], idx: Optional[torch.Tensor], row_table: Optional[torch.Tensor],
    var_table: Optional[torch.Tensor], noise: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
    noise_step: int, noise_stream: int, clamp: bool, n_out: int, shape: List[int], backend: str,
    out: List[torch.Tensor],
) -> None:
    a = validate(coef, x, e, e_uncond if e_uncond else None, m, x_last, row, rows, offset, idx, row_table,
                 var_table, noise, seeds, noise_step, noise_stream, clamp, n_out, shape or None)
    run(a, _check_out(a, out), backend or None)


@_step_out_op.register_fake
def _step_out_fake(*args, **kwargs):
    return None


# ----------------------------------------------------------------------------------------------- public

def step(
    coef: torch.Tensor,
    x: torch.Tensor | None = None,
    e: Sequence[torch.Tensor] = (),
    *,
    e_uncond: Sequence[torch.Tensor] | None = None,
    m: Sequence[torch.Tensor] = (),
    x_last: torch.Tensor | None = None,
    row: int = 0,
    rows: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    row_table: torch.Tensor | None = None,
    var_table: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    noise_step: int = 0,
    noise_stream: int = L.STREAM_STEP,
    clamp: bool = False,
    n_out: int = 1,
    shape: Sequence[int] | None = None,
    out: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """One fused step: ``n_out`` outputs of ``out_k = CX*x + CE*e + CX0*x0 + ... + CZ*s*z``.

    Args:
        coef: ``[rows, NUM_COEF]`` float32 plan table on the inputs' device (``fastdiff.plan``).
        x: ``[B, ...]`` current sample. ``e``: up to 2 model outputs like x (the conditional ones when
            ``e_uncond`` is given: guidance ``e = uncond + G*(cond - uncond)``).
        m: up to 3 history slots (previous data predictions); ``x_last``: the previous sample.
        row: the plan row every sample uses; ``rows``: ``[B]`` or ``[1]`` int64 device rows instead
            (per-sample timesteps, or a step index that lives on the device). Negative rows count from
            the end, as in Python. A device index outside the table gives NaN outputs (it cannot be
            checked without a sync).
        offset: ``[B]`` float32 per-sample scalar offset (Mix-DDPM).
        idx, row_table, var_table: ``[B]`` int64 component of each sample; ``[K, ...]`` float32 rows
            of offsets (``delta_k``) and of variances (noise std ``sqrt(max(VAR - var, 0))``): DDIM-GMM.
        noise: standard-normal noise like x; or ``seeds`` (``[B]`` int64) for in-kernel Philox noise
            keyed per sample, at counter ``(i // 4, noise_step, noise_stream)`` (``fastdiff.random``).
        clamp: clamp x0 to ``[-R, R]``. n_out: outputs to write (1-3). shape: batch shape when no
            tensor gives it (noise only). out: tensors to write (may be the inputs themselves).
        backend: ``cuda``, ``triton``, ``cpu`` or ``torch``; default ``FASTDIFF_BACKEND`` or automatic.

    Returns:
        A tuple of ``n_out`` tensors shaped like x, in the storage dtype.
    """
    e_list, m_list = list(e), list(m)
    if torch.compiler.is_compiling():
        args = (coef, x, e_list, list(e_uncond or []), m_list, x_last, row, rows, offset, idx, row_table,
                var_table, noise, seeds, noise_step, noise_stream, clamp, n_out, list(shape or []), backend or "")
        if out is None:
            return tuple(torch.ops.fastdiff.step(*args))
        torch.ops.fastdiff.step_out(*args, list(out))
        return tuple(out)
    a = validate(coef, x, e_list, e_uncond, m_list, x_last, row, rows, offset, idx, row_table, var_table,
                 noise, seeds, noise_step, noise_stream, clamp, n_out, shape)
    outs = _check_out(a, out) if out is not None else [
        torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(a.n_out)]
    run(a, outs, backend)
    return tuple(outs)
