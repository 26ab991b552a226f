"""The step kernel family in plain torch: the readable statement of what every backend computes.

Per sample n (``c`` is n's plan row, columns named in ``fastdiff.layout``)::

    e_i   = uncond_i + G*(cond_i - uncond_i)                     (classifier-free guidance, when on)
    x0    = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)          (data prediction, clamp optional)
    s     = sqrt(max(VAR - var_table[idx_n], 0))  or 1            (DDIM-GMM's clipped variances)
    out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + sum_j CMj*m_j + CLAST*x_last
          + COFF*offset[n] + CROW*row_table[idx_n] + CZ*s*z

Arithmetic runs in ``compute_dtype`` (float32, as in every kernel; the tests also run it in the storage
dtype as the "same-dtype torch" baseline of the low-precision accuracy rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import layout as L


def step(
    c: torch.Tensor,
    x: torch.Tensor | None,
    e: Sequence[torch.Tensor] = (),
    e_uncond: Sequence[torch.Tensor] | None = None,
    m: Sequence[torch.Tensor] = (),
    x_last: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    row_table: torch.Tensor | None = None,
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

    def col(j: int) -> torch.Tensor:  # one coefficient per sample, broadcast over its elements
        return c[:, j].to(compute_dtype).reshape(-1, *([1] * (len(shape) - 1)))

    def f(t: torch.Tensor) -> torch.Tensor:
        return t.to(compute_dtype)

    e = [f(t) for t in e]
    if e_uncond is not None:  # e = uncond + g*(cond - uncond)
        e = [torch.addcmul(f(u), col(L.G), cond - f(u)) for cond, u in zip(e, e_uncond)]
    x = f(x) if x is not None else None
    x0 = col(L.AX) * x if x is not None else torch.zeros((), dtype=compute_dtype, device=c.device)
    for i, ei in enumerate(e):
        x0 = torch.addcmul(x0, col(L.AE0 + i), ei)
    x0 = col(L.AS) * x0
    if clamp:
        x0 = torch.clamp(x0, min=-col(L.R), max=col(L.R))
    if z is not None:
        z = f(z)
        if var_table is not None:
            z = z * torch.sqrt(torch.clamp(col(L.VAR) - var_table[idx].reshape(shape).to(compute_dtype), min=0))
    row = row_table[idx].reshape(shape).to(compute_dtype) if row_table is not None else None
    terms = [(L.CX, x), *((L.CE0 + i, ei) for i, ei in enumerate(e)), *((L.CM0 + j, f(mj)) for j, mj in enumerate(m)),
             (L.CLAST, None if x_last is None else f(x_last)), (L.CROW, row), (L.CZ, z)]

    outs = []
    for k in range(n_out):
        o = col(L.out(k, L.CX0)) * x0
        if offset is not None:
            o = o + col(L.out(k, L.COFF)) * offset.to(compute_dtype).reshape(col(0).shape)
        for term, t in terms:
            if t is not None:
                o = torch.addcmul(o, col(L.out(k, term)), t)
        outs.append(o.expand(shape).to(out_dtype))
    return outs
