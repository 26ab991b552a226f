"""``fastdiff.ops.step``: one fused sampler step (the terms: the glossary in docs/architecture.md).

Validates the inputs, picks a backend (``fastdiff.backends``) and runs it. Registered as the custom op
``fastdiff::step`` (and ``fastdiff::step_out``, which writes into given tensors) with fake kernels, so
``torch.compile(fullgraph=True)`` sees no graph break; eager calls skip the dispatcher. Eager, compiled
and fake calls check their arguments with the same ``validate``. float64 inputs, and inputs that
require grad, run on the torch reference (differentiable; float64 arithmetic for float64).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import List, Optional

import torch

from fastdiff import backends, memory, philox
from fastdiff import layout as L
from fastdiff.backends import forced_backend
from fastdiff.ops.common import DTYPE_CODE, native_step, needs_reference
from fastdiff.ops.step_args import StepArgs, check_out, validate

__all__ = ["StepArgs", "kind_call", "native_args", "reference_outputs", "run", "step", "step_positional", "validate"]


class _Signature:
    """What one kind of call fixes, found valid by ``validate`` once (the kind - which terms come - is its
    key in ``_SIGNATURES``): its plan table (at that version), the inputs' size, dtype and device, the
    shapes of the per-sample vectors and tables, and the backend's launcher. ``call`` (generated for the
    kind) then checks a later call's tensors against it and launches, with everything else baked in."""

    __slots__ = ("coef", "version", "rows", "size", "dtype", "device", "rows_len", "tables", "table_rows", "pooled",
                 "call")

    def __init__(self, a: StepArgs, backend: str):
        self.coef, self.version, self.rows = weakref.ref(a.coef), a.coef._version, a.coef.shape[0]
        self.size, self.dtype, self.device = torch.Size(a.shape), a.dtype, a.device
        self.pooled = a.device.type == "cpu" and a.batch * a.numel * a.dtype.itemsize >= memory.MIN_BYTES
        self.rows_len = None if a.rows is None else a.rows.shape[0]
        self.tables = tuple(None if t is None else t.shape for t in (a.delta_table, a.var_table))
        self.table_rows = next((shape[0] for shape in self.tables if shape is not None), None)  # K
        self.call = None
        if backend in ("cpu", "cuda") and a.batch and a.numel:
            launch = backends.native()[0].step_cpu if backend == "cpu" else \
                (lambda args, device=a.device: native_step(args, device))
            self.call = _make_call(self, native_args(a, [None] * a.n_out), a, launch)

    def vectors_match(self, rows, offset, component, delta_table, var_table) -> bool:
        """Whether the per-sample vectors and the tables (those the flags say come) have this kind's shapes,
        dtypes and device, contiguous; on the CPU also that the row and component numbers are in range (a
        read of a few host ints; on a device the kernel reads them, as ``validate`` leaves them)."""
        B, device, T = self.size[0], self.device, torch.Tensor
        for t, n, dtype in ((rows, self.rows_len, torch.int64), (offset, B, torch.float32),
                            (component, B, torch.int64)):
            if t is not None and (type(t) is not T or t.shape != (n,) or t.dtype != dtype or t.device != device
                                  or not t.is_contiguous()):
                return False
        for t, shape in zip((delta_table, var_table), self.tables):
            if t is not None and (type(t) is not T or t.shape != shape or t.dtype != torch.float32
                                  or t.device != device or not t.is_contiguous()):
                return False
        if device.type == "cpu":
            if rows is not None and any_outside(rows.tolist(), -self.rows, self.rows):
                return False
            K = self.table_rows
            if component is not None and K is not None and any_outside(component.tolist(), 0, K):
                return False
        return True


def any_outside(values: list, lo: int, hi: int) -> bool:
    """Whether any of `values` lies outside [lo, hi) (the call then goes to ``validate``, which names it)."""
    return bool(values) and (min(values) < lo or max(values) >= hi)


def _make_call(sig: _Signature, template: tuple, a: StepArgs, launch):
    """``call(coef, x, e, eu, m, x_last, row, noise, seeds, noise_step, noise_domain, out, rows, offset,
    component, delta_table, var_table, grad)`` for calls of `sig`'s kind (the caller found the kind by its
    flags: which inputs come and how many): the outputs, or None where a tensor differs from the kind (the
    caller then validates). The checks and the native parameters are written out for exactly the tensors
    the kind has - each a contiguous tensor of the kind's size, dtype and device, none requiring grad
    when `grad` - with everything else the template's: at small sizes the Python around a launch is most
    of a step, and this is its shortest form."""
    batch_like = ["x"] + [f"e{i}" for i in range(len(a.e))] + [f"eu{i}" for i in range(len(a.e_uncond or ()))]
    batch_like += [f"m{i}" for i in range(len(a.m))]
    batch_like += [n for n in ("x_last", "noise") if getattr(a, n) is not None]
    lines = ["if coef is not ref() or coef._version != version or not -R <= row < R:", "    return None"]
    if a.e:
        lines.append(f"{''.join(f'e{i}, ' for i in range(len(a.e)))}= e")
    if a.e_uncond:
        lines += ["if type(eu) not in (list, tuple) or len(eu) != len(e):", "    return None",
                  f"{''.join(f'eu{i}, ' for i in range(len(a.e_uncond)))}= eu"]
    if a.m:
        lines.append(f"{''.join(f'm{i}, ' for i in range(len(a.m)))}= m")
    for n in batch_like:
        lines += [f"if type({n}) is not T or {n}.shape != size or {n}.dtype != dtype or {n}.device != device "
                  f"or not {n}.is_contiguous():", "    return None"]
    lines += [f"if grad and ({' or '.join(f'{n}.requires_grad' for n in batch_like)}):", "    return None"]
    if a.seeds is not None:
        lines += ["if type(seeds) is not T or seeds.shape != B or seeds.dtype != int64 or seeds.device != device "
                  "or not seeds.is_contiguous():", "    return None"]
    if any(t is not None for t in (a.rows, a.offset, a.component, a.delta_table, a.var_table)):
        lines += ["if not sig.vectors_match(rows, offset, component, delta_table, var_table):", "    return None"]
    outs = [f"out{k}" for k in range(a.n_out)]
    new = "empty(size, dtype)" if sig.pooled else "empty_like(x)"
    lines += ["if out is None:", f"    {', '.join(outs)} = {', '.join([new] * a.n_out)}",
              f"elif not plain_out(out, {a.n_out}, x, ({''.join(f'{n}, ' for n in batch_like)})):",
              "    return None", "else:", f"    {''.join(f'{o}, ' for o in outs)}= out"]
    per_call = {n: f"{n}.data_ptr()" for n in batch_like + outs}
    per_call.update(row="row", noise_step="noise_step & 0xFFFFFFFF", noise_domain="noise_domain & 0xFFFFFFFF")
    for name in ("seeds", "rows", "offset", "component", "delta_table", "var_table"):
        if getattr(a, name) is not None:
            per_call[name] = f"{name}.data_ptr()"
    fields = ", ".join(per_call.get(f, repr(v)) for f, v in zip(L.STEP_FIELDS, template))
    lines += [f"launch(({fields},))", f"return ({''.join(f'{o}, ' for o in outs)})"]
    src = ("def call(coef, x, e, eu, m, x_last, row, noise, seeds, noise_step, noise_domain, out, rows, offset, "
           "component, delta_table, var_table, grad):\n" + "".join(f"    {line}\n" for line in lines))
    scope = dict(ref=sig.coef, version=sig.version, R=sig.rows, T=torch.Tensor, size=sig.size, dtype=sig.dtype,
                 device=sig.device, B=sig.size[:1], int64=torch.int64, sig=sig, plain_out=_plain_out,
                 empty=memory.empty, empty_like=torch.empty_like, launch=launch)
    exec(compile(src, "<fastdiff step call>", "exec"), scope)
    return scope["call"]


# (id(plan table), flags) -> the signature of the last plain call of that kind (calls that alternate between
# kinds - noise given one step, seeds the next - keep one each, instead of re-deriving every call)
_SIGNATURES: dict[tuple, _Signature] = {}
_VALIDATED: set[tuple] = set()  # kinds validated once


def _plain_inputs(x, e, eu, m, x_last, noise, seeds, grad: bool) -> bool:
    """Whether x and every batch-shaped input are contiguous tensors of one shape, dtype and device, none
    requiring grad (and seeds a [B] int64 tensor there): the inputs of a plain call."""
    T = torch.Tensor
    if type(x) is not T or not x.is_contiguous() or (grad and x.requires_grad):
        return False
    size, dtype, device = x.shape, x.dtype, x.device
    if eu is not None and (type(eu) not in (list, tuple) or len(eu) != len(e)):
        return False
    for t in (*e, *(eu or ()), *m, x_last, noise):
        if t is not None and (type(t) is not T or t.shape != size or t.dtype != dtype or t.device != device
                              or not t.is_contiguous() or (grad and t.requires_grad)):
            return False
    return seeds is None or (type(seeds) is T and seeds.shape == size[:1] and seeds.dtype == torch.int64
                             and seeds.device == device and seeds.is_contiguous())


def _plain_out(out, n_out: int, x: torch.Tensor, inputs) -> bool:
    """Whether `out` holds n_out contiguous tensors like x, each exactly an input (in place) or apart from
    every input and from each other. Anything else goes to ``check_out`` (which names it, or computes
    into a contiguous buffer and copies)."""
    if type(out) not in (list, tuple) or len(out) != n_out:
        return False
    size, dtype, device, T = x.shape, x.dtype, x.device, torch.Tensor
    nbytes = x.numel() * x.element_size()
    starts = []
    for o in out:
        if type(o) is not T or o.shape != size or o.dtype != dtype or o.device != device or not o.is_contiguous():
            return False
        lo = o.data_ptr()
        for other in starts:
            if abs(other - lo) < nbytes:
                return False
        for t in inputs:
            if t is not None and t is not o and abs(t.data_ptr() - lo) < nbytes:
                return False
        starts.append(lo)
    return True


# ---------------------------------------------------------------------------------------------- backends

def native_args(a: StepArgs, outs) -> tuple:
    """The native kernels' parameters for validated arguments `a` writing `outs` (None: an address to fill
    in later), by name, in fastdiff/layout.py's STEP_FIELDS order (``backends.native`` checked that the
    module reads them in that order)."""
    def P(t):  # an address, 0 for an absent term
        return 0 if t is None else t.data_ptr()

    e, eu, m, o = a.e + _NONE3, (a.e_uncond or []) + _NONE3, a.m + _NONE3, list(outs) + _NONE3
    table = a.delta_table if a.delta_table is not None else a.var_table
    fields = dict(
        batch=a.batch, numel=a.numel, dtype=DTYPE_CODE[a.dtype], x=P(a.x), e0=P(e[0]), e1=P(e[1]), eu0=P(eu[0]),
        eu1=P(eu[1]), m0=P(m[0]), m1=P(m[1]), m2=P(m[2]), x_last=P(a.x_last), offset=P(a.offset),
        component=P(a.component), delta_table=P(a.delta_table), var_table=P(a.var_table),
        table_rows=0 if table is None else table.shape[0], noise=P(a.noise), seeds=P(a.seeds),
        noise_step=a.noise_step & 0xFFFFFFFF, noise_domain=a.noise_domain & 0xFFFFFFFF, coef=P(a.coef),
        coef_rows=a.coef.shape[0], row=a.row, rows=P(a.rows), rows_len=0 if a.rows is None else a.rows.shape[0],
        clamp=a.clamp, n_out=a.n_out, out0=P(o[0]), out1=P(o[1]), out2=P(o[2]),
    )
    return tuple(fields[f] for f in L.STEP_FIELDS)


_NONE3 = [None, None, None]


def reference_outputs(a: StepArgs, compute_dtype: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The torch reference's outputs for validated arguments: float32 arithmetic (float64 for float64
    inputs) unless `compute_dtype` says otherwise (tests also use float64 / the storage dtype)."""
    from fastdiff import reference

    compute_dtype = compute_dtype or (torch.float64 if a.dtype == torch.float64 else torch.float32)
    B, NC = a.batch, L.NUM_COEF
    if a.rows is None:
        c = a.coef[a.row].expand(B, NC)
    else:
        c = a.coef[a.rows.expand(B) if a.rows.shape[0] == 1 else a.rows]
    z = a.noise
    if z is None and a.seeds is not None:
        z = philox.randn(a.seeds, a.numel, step=a.noise_step, domain=a.noise_domain,
                         dtype=torch.float64).reshape(a.shape)
    return reference.step(c, a.x, a.e, a.e_uncond, a.m, a.x_last, a.offset, a.component, a.delta_table,
                          a.var_table, z, a.clamp, a.n_out, shape=a.shape, out_dtype=out_dtype or a.dtype,
                          compute_dtype=compute_dtype)


def run(a: StepArgs, outs: list[torch.Tensor], backend: str | None) -> None:
    """Run validated arguments on the chosen backend, writing `outs` (contiguous, no autograd)."""
    if a.batch == 0 or a.numel == 0:
        return
    name = "torch" if a.dtype == torch.float64 else backends.choose(a.device, backend)
    if name in ("cpu", "cuda"):
        native_step(native_args(a, outs), a.device)
    elif name == "triton":
        backends.triton_kernels()[0].step.launch(a, outs)
    else:
        for o, r in zip(outs, reference_outputs(a)):
            o.copy_(r)


def _execute(a: StepArgs, out: Sequence[torch.Tensor] | None, backend: str | None) -> tuple[torch.Tensor, ...]:
    """Outputs of validated arguments: new tensors, or written into `out` (any layout: a non-contiguous
    out is computed contiguous and copied in). Autograd and float64 take the torch reference."""
    if needs_reference(a.dtype, a.tensors()):
        backends.choose(a.device, backend)  # a forced backend that cannot run still raises
        refs = reference_outputs(a)
        if out is None:
            return tuple(refs)
        # every output is computed before any is written, so an overlap cannot corrupt this path; it is refused
        # eagerly all the same, and not traced (dynamo has no addresses: a float64 step under torch.compile)
        for o, r in zip(check_out(a, out, aliasing=not torch.compiler.is_compiling()), refs):
            o.copy_(r)
        return tuple(out)
    if out is None:
        outs = tuple(memory.empty(a.shape, a.dtype, a.device) for _ in range(a.n_out))
        run(a, outs, backend)
        return outs
    out = check_out(a, out)
    dense = [o if o.is_contiguous() else torch.empty(a.shape, dtype=a.dtype, device=a.device) for o in out]
    run(a, dense, backend)
    for o, d in zip(out, dense):
        if d is not o:
            o.copy_(d)
    return tuple(out)


# ------------------------------------------------------------------------------------------- custom ops

def _op_validate(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                 seeds, noise_step, noise_domain, clamp, n_out, shape, values=True):
    return validate(coef, x, e, e_uncond if e_uncond else None, m, x_last, row, rows, offset, component,
                    delta_table, var_table, noise, seeds, noise_step, noise_domain, clamp, n_out, shape or None,
                    values=values)


@torch.library.custom_op("fastdiff::step", mutates_args=())
def _step_op(
    coef: torch.Tensor, x: Optional[torch.Tensor], e: List[torch.Tensor], e_uncond: List[torch.Tensor],
    m: List[torch.Tensor], x_last: Optional[torch.Tensor], row: int, rows: Optional[torch.Tensor],
    offset: Optional[torch.Tensor], component: Optional[torch.Tensor], delta_table: Optional[torch.Tensor],
    var_table: Optional[torch.Tensor], noise: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
    noise_step: int, noise_domain: int, clamp: bool, n_out: int, shape: List[int], backend: str,
) -> List[torch.Tensor]:
    a = _op_validate(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                     seeds, noise_step, noise_domain, clamp, n_out, shape)
    return list(_execute(a, None, backend or None))


@_step_op.register_fake
def _step_fake(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
               seeds, noise_step, noise_domain, clamp, n_out, shape, backend):
    a = _op_validate(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                     seeds, noise_step, noise_domain, clamp, n_out, shape, values=False)
    return [torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(a.n_out)]


@torch.library.custom_op("fastdiff::step_out", mutates_args=("out",))
def _step_out_op(
    coef: torch.Tensor, x: Optional[torch.Tensor], e: List[torch.Tensor], e_uncond: List[torch.Tensor],
    m: List[torch.Tensor], x_last: Optional[torch.Tensor], row: int, rows: Optional[torch.Tensor],
    offset: Optional[torch.Tensor], component: Optional[torch.Tensor], delta_table: Optional[torch.Tensor],
    var_table: Optional[torch.Tensor], noise: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
    noise_step: int, noise_domain: int, clamp: bool, n_out: int, shape: List[int], backend: str,
    out: List[torch.Tensor],
) -> None:
    a = _op_validate(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                     seeds, noise_step, noise_domain, clamp, n_out, shape)
    _execute(a, out, backend or None)


@_step_out_op.register_fake
def _step_out_fake(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                   seeds, noise_step, noise_domain, clamp, n_out, shape, backend, out):
    a = _op_validate(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                     seeds, noise_step, noise_domain, clamp, n_out, shape, values=False)
    check_out(a, out, aliasing=False)


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
    component: torch.Tensor | None = None,
    delta_table: torch.Tensor | None = None,
    var_table: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    noise_step: int = 0,
    noise_domain: int = philox.DOMAIN_STEP,
    clamp: bool = False,
    n_out: int = 1,
    shape: Sequence[int] | None = None,
    out: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """One fused step: ``n_out`` outputs of ``out_k = CX*x + CE*e + CX0*x0 + ... + CZ*s*z``.

    Args:
        coef: ``[rows, NUM_COEF]`` float32 plan table on the inputs' device (``fastdiff.plan``); float64
            for float64 inputs.
        x: ``[B, ...]`` current sample. ``e``: up to 2 model outputs like x (the conditional ones when
            ``e_uncond`` is given: guidance ``e = (1 - G)*uncond + G*cond``).
        m: up to 3 history slots (previous data predictions); ``x_last``: an earlier sample.
        row: the plan row every sample uses; ``rows``: ``[B]`` or ``[1]`` int64 device rows instead
            (per-sample timesteps, or a step index that lives on the device). Negative rows count from
            the end, as in Python. A device index outside the table gives NaN outputs (it cannot be
            checked without a sync).
        offset: ``[B]`` float32 per-sample scalar offset (Mix-DDPM).
        component, delta_table, var_table: ``[B]`` int64 component k_n of each sample; ``[K, ...]``
            float32 rows of per-element offsets (``delta_k``) and of variances (noise std
            ``sqrt(max(VAR - var, 0))``): DDIM-GMM.
        noise: standard-normal noise like x; or ``seeds`` (``[B]`` int64) for in-kernel Philox noise
            keyed per sample, at counter ``(i // 4, noise_step, noise_domain)`` (``fastdiff.philox``).
        clamp: clamp x0 to ``[-R, R]``. n_out: outputs to write (1-3). shape: batch shape when no
            tensor gives it (noise only). out: tensors to write: new ones, or exactly the inputs (in
            place), never partly overlapping an input.
        backend: ``cuda``, ``triton``, ``cpu`` or ``torch``; default ``FASTDIFF_BACKEND`` or automatic.

    Returns:
        A tuple of ``n_out`` tensors shaped like x, in the storage dtype. An input whose weight is 0 is
        not read. Differentiable (through the torch reference) when an input requires grad.
    """
    return step_positional(coef, x, e if type(e) is list else list(e), e_uncond, m if type(m) is list else list(m),
                           x_last, row, rows, offset, component, delta_table, var_table, noise, seeds, noise_step,
                           noise_domain, clamp, n_out, shape, out, backend)


def _flags(e: list, e_uncond, m: list, x_last, noise, seeds, clamp, n_out: int, backend, vectors) -> tuple:
    """What a kind of call is, besides its plan table: which inputs come, how many, and the backend."""
    return (len(e), len(m), x_last is not None, noise is not None, seeds is not None, bool(clamp), n_out,
            backend or forced_backend(), e_uncond is not None, vectors)


def kind_call(coef, e: list, e_uncond, m: list, x_last, noise, seeds, clamp, n_out: int, backend):
    """The generated ``call`` of plain calls of this kind with no per-sample vectors (see ``_make_call``), or
    None until such a call was validated twice: ``fastdiff.stepper`` keeps it for the steps of a run."""
    sig = _SIGNATURES.get((id(coef), _flags(e, e_uncond, m, x_last, noise, seeds, clamp, n_out, backend, None)))
    return None if sig is None else sig.call


def step_positional(coef, x, e: list, e_uncond, m: list, x_last, row, rows, offset, component, delta_table,
                    var_table, noise, seeds, noise_step, noise_domain, clamp, n_out, shape, out, backend):
    """``step`` with every argument in order, e and m as lists: what ``fastdiff.stepper`` calls every step
    (keyword passing costs ~1 us of a ~12 us step at small sizes)."""
    plain = (shape is None and type(row) is int and len(e) <= 2 and len(m) <= 3
             and not torch.compiler.is_compiling())
    if plain:
        grad = torch.is_grad_enabled()
        vectors = (None if rows is None and offset is None and component is None and delta_table is None
                   and var_table is None else (rows is not None, offset is not None, component is not None,
                                               delta_table is not None, var_table is not None))
        flags = _flags(e, e_uncond, m, x_last, noise, seeds, clamp, n_out, backend, vectors)
        sig = _SIGNATURES.get((id(coef), flags))
        if sig is not None and sig.call is not None:
            result = sig.call(coef, x, e, e_uncond, m, x_last, row, noise, seeds, noise_step, noise_domain, out, rows,
                              offset, component, delta_table, var_table, grad)
            if result is not None:
                return result
    if torch.compiler.is_compiling():
        grads = [x, *e, *(e_uncond or ()), *m, x_last, noise]
        if not needs_reference(getattr(x, "dtype", torch.float32), grads):
            args = (coef, x, e, list(e_uncond or []), m, x_last, row, rows, offset, component, delta_table, var_table,
                    noise, seeds, noise_step, noise_domain, clamp, n_out, list(shape or []), backend or "")
            if out is None:
                return tuple(torch.ops.fastdiff.step(*args))
            torch.ops.fastdiff.step_out(*args, list(out))
            return tuple(out)
    a = validate(coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise, seeds,
                 noise_step, noise_domain, clamp, n_out, shape, values=not torch.compiler.is_compiling())
    result = _execute(a, out, backend)
    if (plain and a.dtype != torch.float64 and a.coef.dtype == torch.float32
            and _plain_inputs(x, e, e_uncond, m, x_last, noise, seeds, grad)):
        key = (id(coef), flags)
        if key not in _VALIDATED:  # a kind is remembered at its second call: a one-off table (training's
            if len(_VALIDATED) >= 256:  # per-call plans) would pay for generating its packing function
                _VALIDATED.clear()
            _VALIDATED.add(key)
        else:
            if len(_SIGNATURES) >= 64:
                _SIGNATURES.clear()
            _SIGNATURES[key] = _Signature(a, backends.choose(a.device, backend))
    return result
