"""The step kernel family in Triton (the terms: the glossary in docs/architecture.md; the contract:
fastdiff/reference/step.py; the CPU/CUDA twin: csrc/include/fastdiff/step.cuh). One program = BLOCK
elements of one sample; every term is a constexpr, so each combination of terms compiles to a kernel
without dead loads. A zero weight contributes exactly 0 (``_acc``), so an inf or NaN in an unused input
never leaks, as in the other backends."""

import triton
import triton.language as tl

from fastdiff import layout as L
from fastdiff.triton_kernels.philox import normal_block

_BLOCK = 1024
_MAX_GRID_Y = 65535


@triton.jit
def _coef(row_ptr, j: tl.constexpr, valid):
    """Coefficient j of the sample's row; NaN for a row outside the table (loud, never a silent clamp)."""
    return tl.load(row_ptr + j, mask=valid, other=float("nan"))


@triton.jit
def _acc(o, w, v):
    """o + w*v, where a zero weight adds exactly 0 (not 0*v, which is NaN for an infinite v)."""
    return o + tl.where(w != 0.0, w * v, 0.0)


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, v, mask):
    """Store fp32 v in ptr's dtype, rounding to nearest even. bfloat16 is rounded by hand, as in
    csrc/include/fastdiff/common.cuh: the Triton interpreter's own cast truncates."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)  # NaN stays NaN
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _output(k: tl.constexpr, row_ptr, valid, g, x, e0, e1, u0, u1, x0, m0, m1, m2, last, off, delta, z, base,
            HAS_X: tl.constexpr, N_E: tl.constexpr, GUIDED: tl.constexpr, N_M: tl.constexpr,
            HAS_LAST: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_NOISE: tl.constexpr):
    """out_k = CX*x + CE0*e0 + CE1*e1 + CX0*x0 + CMj*m_j + CLAST*x_last + COFF*offset + CDELTA*delta + CZ*s*z,
    with e_i = (1 - g)*u_i + g*cond_i when guided (each input weighted on its own)."""
    col: tl.constexpr = L.OUT + k * L.PER_OUT
    o = _acc(base, _coef(row_ptr, col + L.CX0, valid), x0)
    if HAS_X:
        o = _acc(o, _coef(row_ptr, col + L.CX, valid), x)
    if N_E > 0:
        ce0 = _coef(row_ptr, col + L.CE0, valid)
        if GUIDED:
            o = _acc(_acc(o, g * ce0, e0), (1.0 - g) * ce0, u0)
        else:
            o = _acc(o, ce0, e0)
    if N_E > 1:
        ce1 = _coef(row_ptr, col + L.CE1, valid)
        if GUIDED:
            o = _acc(_acc(o, g * ce1, e1), (1.0 - g) * ce1, u1)
        else:
            o = _acc(o, ce1, e1)
    if N_M > 0:
        o = _acc(o, _coef(row_ptr, col + L.CM0, valid), m0)
    if N_M > 1:
        o = _acc(o, _coef(row_ptr, col + L.CM1, valid), m1)
    if N_M > 2:
        o = _acc(o, _coef(row_ptr, col + L.CM2, valid), m2)
    if HAS_LAST:
        o = _acc(o, _coef(row_ptr, col + L.CLAST, valid), last)
    if HAS_OFFSET:
        o = _acc(o, _coef(row_ptr, col + L.COFF, valid), off)
    if HAS_DELTA:
        o = _acc(o, _coef(row_ptr, col + L.CDELTA, valid), delta)
    if HAS_NOISE:
        o = _acc(o, _coef(row_ptr, col + L.CZ, valid), z)
    return o


@triton.jit
def _step_kernel(
    coef_ptr, coef_rows, row, rows_ptr, rows_len,
    x_ptr, e0_ptr, e1_ptr, eu0_ptr, eu1_ptr, m0_ptr, m1_ptr, m2_ptr, last_ptr,
    offset_ptr, component_ptr, delta_ptr, var_ptr, table_rows,
    noise_ptr, seeds_ptr, noise_step, noise_domain,
    out0_ptr, out1_ptr, out2_ptr,
    D,
    HAS_ROWS: tl.constexpr, HAS_X: tl.constexpr, N_E: tl.constexpr, GUIDED: tl.constexpr, N_M: tl.constexpr,
    HAS_LAST: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_VAR: tl.constexpr,
    NOISE: tl.constexpr, CLAMP: tl.constexpr, N_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    at = n * D + offs

    # the sample's plan row
    if HAS_ROWS:
        r = tl.load(rows_ptr + tl.where(rows_len == 1, 0, n))
    else:
        r = row + n * 0
    r = tl.where(r < 0, r + coef_rows, r)  # negative rows count from the end, as in Python
    valid = (r >= 0) & (r < coef_rows)
    row_ptr = coef_ptr + tl.where(valid, r, 0) * L.NUM_COEF

    g = _coef(row_ptr, L.G, valid)
    x = _load(x_ptr, at, mask) if HAS_X else 0.0
    e0 = _load(e0_ptr, at, mask) if N_E > 0 else 0.0
    e1 = _load(e1_ptr, at, mask) if N_E > 1 else 0.0
    u0 = _load(eu0_ptr, at, mask) if GUIDED and N_E > 0 else 0.0
    u1 = _load(eu1_ptr, at, mask) if GUIDED and N_E > 1 else 0.0
    # data prediction x0 = clamp(AS*(AX*x + AE0*e0 + AE1*e1), -R, R)
    x0 = tl.zeros([BLOCK], tl.float32)
    if HAS_X:
        x0 = _acc(x0, _coef(row_ptr, L.AX, valid), x)
    if N_E > 0:
        ae0 = _coef(row_ptr, L.AE0, valid)
        x0 = _acc(_acc(x0, g * ae0, e0), (1.0 - g) * ae0, u0) if GUIDED else _acc(x0, ae0, e0)
    if N_E > 1:
        ae1 = _coef(row_ptr, L.AE1, valid)
        x0 = _acc(_acc(x0, g * ae1, e1), (1.0 - g) * ae1, u1) if GUIDED else _acc(x0, ae1, e1)
    x0 = x0 * _coef(row_ptr, L.AS, valid)
    if CLAMP:  # by comparisons, as the C++ clampf: NaN stays NaN (tl.minimum/maximum may drop it)
        rr = _coef(row_ptr, L.R, valid)
        x0 = tl.where(x0 < -rr, -rr, x0)
        x0 = tl.where(x0 > rr, rr, x0)

    m0 = _load(m0_ptr, at, mask) if N_M > 0 else 0.0
    m1 = _load(m1_ptr, at, mask) if N_M > 1 else 0.0
    m2 = _load(m2_ptr, at, mask) if N_M > 2 else 0.0
    last = _load(last_ptr, at, mask) if HAS_LAST else 0.0
    off = tl.load(offset_ptr + n) if HAS_OFFSET else 0.0

    delta = 0.0
    base = tl.zeros([BLOCK], tl.float32)
    if HAS_DELTA or HAS_VAR:
        k = tl.load(component_ptr + n)
        kvalid = (k >= 0) & (k < table_rows)
        base = tl.where(kvalid, base, float("nan"))  # a component outside the tables: NaN, loud
        tab_at = tl.where(kvalid, k, 0) * D + offs
        if HAS_DELTA:
            delta = _load(delta_ptr, tab_at, mask)
    z = 0.0
    if NOISE == 1:
        z = _load(noise_ptr, at, mask)
    if NOISE == 2:
        z = normal_block(tl.load(seeds_ptr + n), pid.to(tl.int64) * (BLOCK // 4), noise_step, noise_domain, BLOCK)
    if NOISE > 0 and HAS_VAR:  # gathered std sqrt(max(VAR - var, 0)) (DDIM-GMM, clipped at 0)
        var = _load(var_ptr, tab_at, mask)
        s2 = _coef(row_ptr, L.VAR, valid) - var
        z = z * tl.sqrt_rn(tl.where(s2 < 0.0, 0.0, s2))  # by comparison, as the C++ clampf: NaN stays NaN

    HAS_NOISE: tl.constexpr = NOISE > 0
    o = _output(0, row_ptr, valid, g, x, e0, e1, u0, u1, x0, m0, m1, m2, last, off, delta, z, base,
                HAS_X, N_E, GUIDED, N_M, HAS_LAST, HAS_OFFSET, HAS_DELTA, HAS_NOISE)
    _store(out0_ptr, at, o, mask)
    if N_OUT > 1:
        o = _output(1, row_ptr, valid, g, x, e0, e1, u0, u1, x0, m0, m1, m2, last, off, delta, z, base,
                    HAS_X, N_E, GUIDED, N_M, HAS_LAST, HAS_OFFSET, HAS_DELTA, HAS_NOISE)
        _store(out1_ptr, at, o, mask)
    if N_OUT > 2:
        o = _output(2, row_ptr, valid, g, x, e0, e1, u0, u1, x0, m0, m1, m2, last, off, delta, z, base,
                    HAS_X, N_E, GUIDED, N_M, HAS_LAST, HAS_OFFSET, HAS_DELTA, HAS_NOISE)
        _store(out2_ptr, at, o, mask)


def launch(a, outs) -> None:
    """Run validated ``fastdiff.ops.step.StepArgs`` writing ``outs`` (one launch per 65535 samples)."""
    D = a.numel
    e = list(a.e) + [None] * (2 - len(a.e))
    eu = list(a.e_uncond or []) + [None] * (2 - len(a.e_uncond or []))
    m = list(a.m) + [None] * (3 - len(a.m))
    o = list(outs) + [None] * (3 - len(outs))
    table = a.delta_table if a.delta_table is not None else a.var_table
    noise_kind = 1 if a.noise is not None else 2 if a.seeds is not None else 0
    dummy = a.coef
    for b0 in range(0, a.batch, _MAX_GRID_Y):
        b1 = min(a.batch, b0 + _MAX_GRID_Y)

        def per_sample(t, b0=b0, b1=b1):  # this launch's samples, or a placeholder the kernel never reads
            return dummy if t is None else t[b0:b1]

        rows = a.rows if a.rows is None or a.rows.shape[0] == 1 else a.rows[b0:b1]
        grid = (triton.cdiv(D, _BLOCK), b1 - b0)
        _step_kernel[grid](
            a.coef, a.coef.shape[0], a.row, dummy if rows is None else rows, 0 if rows is None else rows.shape[0],
            per_sample(a.x), per_sample(e[0]), per_sample(e[1]), per_sample(eu[0]), per_sample(eu[1]),
            per_sample(m[0]), per_sample(m[1]), per_sample(m[2]), per_sample(a.x_last),
            per_sample(a.offset), per_sample(a.component),
            dummy if a.delta_table is None else a.delta_table, dummy if a.var_table is None else a.var_table,
            0 if table is None else table.shape[0],
            per_sample(a.noise), per_sample(a.seeds), a.noise_step & 0xFFFFFFFF, a.noise_domain & 0xFFFFFFFF,
            per_sample(o[0]), per_sample(o[1]), per_sample(o[2]),
            D,
            HAS_ROWS=rows is not None, HAS_X=a.x is not None, N_E=len(a.e), GUIDED=a.e_uncond is not None,
            N_M=len(a.m), HAS_LAST=a.x_last is not None, HAS_OFFSET=a.offset is not None,
            HAS_DELTA=a.delta_table is not None, HAS_VAR=a.var_table is not None, NOISE=noise_kind,
            CLAMP=a.clamp, N_OUT=a.n_out, BLOCK=_BLOCK, num_warps=4,
        )
