"""The step kernel family in plain torch: the readable statement of what every backend computes.

The terms are defined in the glossary of ``docs/architecture.md`` ("The step's terms"); per sample n
with plan row ``c`` (columns named in ``fastdiff.layout``)::

    x0    = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)     e_i = (1 - G)*uncond_i + G*cond_i when guided
    s     = sqrt(max(VAR - var_table[k_n], 0))  or 1
    out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + sum_j CMj*m_j + CLAST*x_last
          + COFF*offset[n] + CDELTA*delta_table[k_n] + CZ*s*z

Each input is weighted on its own (a guided e_i is two inputs, cond and uncond), and a zero weight adds
exactly 0: an input the row does not use is not read, even where it holds inf or NaN. Arithmetic runs
in ``compute_dtype`` (float32 as in every kernel, float64 for float64 inputs; the tests also run it in
the storage dtype as the "same-dtype torch" baseline of the low-precision accuracy rule). Every op is
differentiable, so this is also the path that autograd takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import layout as L


def _acc(o: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o + w*v, where a zero weight adds exactly 0 (not 0*v, which is NaN for an infinite v). Weights on
    the host are looked at first (no sync): all non-zero is one fused addcmul, all zero is nothing."""
    if w.device.type == "cpu" and not torch.compiler.is_compiling():
        nonzero = w != 0
        if bool(nonzero.all()):
            return torch.addcmul(o, w, v)
        if not bool(nonzero.any()):
            return o
    return o + torch.where(w != 0, w * v, 0)


def step(
    c: torch.Tensor,
    x: torch.Tensor | None,
    e: Sequence[torch.Tensor] = (),
    e_uncond: Sequence[torch.Tensor] | None = None,
    m: Sequence[torch.Tensor] = (),
    x_last: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    component: torch.Tensor | None = None,
    delta_table: torch.Tensor | None = None,
    var_table: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    clamp: bool = False,
    n_out: int = 1,
    shape: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """One step for a batch. ``c``: ``[B, NUM_COEF]`` rows; tensors ``[B, ...]``; tables ``[K, ...]``.

    Returns ``n_out`` tensors of the batch's shape in ``out_dtype`` (default: the inputs' dtype).
    """
    ref = next(t for t in (x, *e, *m, x_last, z) if t is not None) if shape is None else None
    shape = tuple(ref.shape) if shape is None else tuple(shape)
    out_dtype = out_dtype or (ref.dtype if ref is not None else torch.float32)
    c = c.to(compute_dtype)

    def col(j: int) -> torch.Tensor:  # one coefficient per sample, broadcast over its elements
        return c[:, j].reshape(-1, *([1] * (len(shape) - 1)))

    def f(t: torch.Tensor) -> torch.Tensor:
        return t.to(compute_dtype)

    # (input, its weight in x0, its column in the outputs, the factor on that column)
    one = torch.ones((), dtype=compute_dtype, device=c.device)
    zero = torch.zeros((), dtype=compute_dtype, device=c.device)
    inputs = [] if x is None else [(f(x), col(L.AX), L.CX, one)]
    for i, ei in enumerate(e):
        if e_uncond is None:
            inputs.append((f(ei), col(L.AE0 + i), L.CE0 + i, one))
        else:  # guidance: e = (1 - g)*uncond + g*cond, each weighted on its own
            g = col(L.G)
            inputs += [(f(ei), g * col(L.AE0 + i), L.CE0 + i, g),
                       (f(e_uncond[i]), (1 - g) * col(L.AE0 + i), L.CE0 + i, 1 - g)]
    after_x0 = [(f(mj), L.CM0 + j) for j, mj in enumerate(m)]
    if x_last is not None:
        after_x0.append((f(x_last), L.CLAST))
    if offset is not None:
        after_x0.append((f(offset).reshape(col(0).shape), L.COFF))
    if delta_table is not None:
        after_x0.append((delta_table[component].reshape(shape).to(compute_dtype), L.CDELTA))
    if z is not None:
        z = f(z)
        if var_table is not None:
            var = var_table[component].reshape(shape).to(compute_dtype)
            z = z * torch.sqrt(torch.clamp(col(L.VAR) - var, min=0))
        after_x0.append((z, L.CZ))

    x0 = zero
    for v, a, _, _ in inputs:
        x0 = _acc(x0, a, v)
    x0 = col(L.AS) * x0
    if clamp:  # torch.clamp keeps NaN, as every kernel's clamp does
        x0 = torch.clamp(x0, min=-col(L.R), max=col(L.R))
    base = zero
    if component is not None and (delta_table is not None or var_table is not None):
        k = component.reshape(col(0).shape)
        rows = (delta_table if delta_table is not None else var_table).shape[0]
        base = torch.where((k >= 0) & (k < rows), zero, torch.nan)  # a component outside the tables: NaN

    outs = []
    for k in range(n_out):
        o = _acc(base, col(L.out(k, L.CX0)), x0)
        for v, _, term, factor in inputs:
            o = _acc(o, factor * col(L.out(k, term)), v)
        for v, term in after_x0:
            o = _acc(o, col(L.out(k, term)), v)
        outs.append(o.expand(shape).to(out_dtype))
    return outs
