"""The plan-builder kit: write a sampler's step as its formula, get its plan.

A step is linear in its inputs once the per-step scalars are fixed, so a builder writes it with linear
forms of the step's terms (the glossary in docs/architecture.md)::

    x_prev = np.sqrt(abar_prev) * X0 + np.sqrt(1 - abar_prev - sigma**2) * eps + sigma * Z
    plan("ddim", x0=pred.x0, outputs={"x": x_prev, "x0": X0}, clip=1.0)

where ``X, E0, E1, X0, M0, M1, M2, X_LAST, OFFSET, DELTA, Z`` are the terms and the coefficients are
float64 scalars or arrays (one value per row, or per row and sample), broadcast together into the rows
of the table. No column index appears in a builder: ``table`` places every coefficient.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fastdiff import layout as L
from fastdiff.plan import Plan, new_table

# term name -> its column in an output row; x, e0 and e1 also feed the data prediction x0
_OUT_COLUMN = {"x": L.CX, "e0": L.CE0, "e1": L.CE1, "x0": L.CX0, "m0": L.CM0, "m1": L.CM1, "m2": L.CM2,
               "x_last": L.CLAST, "offset": L.COFF, "delta": L.CDELTA, "z": L.CZ}
_X0_COLUMN = {"x": L.AX, "e0": L.AE0, "e1": L.AE1}


class Lin:
    """``scale * sum_term c[term] * term``: a linear form of the step's terms with float64 coefficients
    (scalars or arrays over rows). The scale is kept apart so that a data prediction such as
    ``(X - sigma*E0)/alpha`` reaches the kernel as AS = 1/alpha times (x - sigma*e), subtracting before
    scaling as diffusers does (at alpha -> 0 the two differ in float32)."""

    __slots__ = ("c", "scale")
    __array_ufunc__ = None  # numpy array * Lin -> Lin.__rmul__, not an object array

    def __init__(self, c: Mapping[str, object] | None = None, scale=1.0):
        self.c, self.scale = dict(c or {}), scale

    def expanded(self) -> dict[str, object]:
        """The coefficients with the scale multiplied in."""
        return {k: v * self.scale for k, v in self.c.items()}

    def __getitem__(self, term: str):
        return self.c.get(term, 0.0) * self.scale

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        if not isinstance(other, Lin):
            raise TypeError(f"a linear form adds only linear forms (terms), got {type(other).__name__}")
        c = self.expanded()
        for k, v in other.expanded().items():
            c[k] = c[k] + v if k in c else v
        return Lin(c)

    __radd__ = __add__

    def __neg__(self):
        return Lin(self.c, -self.scale)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, k):
        if isinstance(k, Lin):
            raise TypeError("a product of two terms is not linear")
        return Lin(self.c, self.scale * np.asarray(k, dtype=np.float64) if np.ndim(k) else self.scale * float(k))

    __rmul__ = __mul__

    def __truediv__(self, k):
        with np.errstate(divide="ignore"):  # 1/0 = inf is allowed for the x0 scale (zero terminal SNR)
            return self * (np.float64(1.0) / np.asarray(k, dtype=np.float64))

    def __repr__(self) -> str:
        inner = " + ".join(f"{v!r}*{k}" for k, v in self.c.items()) or "0"
        return f"Lin({inner})" if np.ndim(self.scale) == 0 and self.scale == 1.0 else f"Lin({self.scale!r}*({inner}))"


X, E0, E1, X0, M0, M1, M2, X_LAST, OFFSET, DELTA, Z = (Lin({t: 1.0}) for t in _OUT_COLUMN)


def table(*, x0: Lin | None = None, outputs: list[Lin], clip=None, guidance=None, var=None,
          rows: tuple[int, ...] = ()) -> np.ndarray:
    """The float64 rows ``[*lead, NUM_COEF]`` of a step: the data prediction ``x0`` (a form of X, E0, E1:
    the kernel's x0, clamped to ``[-clip, clip]`` when clip is given), outputs ``outputs[k]`` (forms of any
    term, X0 included), guidance scale G and total variance VAR (DDIM-GMM's noise std). ``lead`` is the
    broadcast shape of `rows` and every coefficient: ``[rows]`` or ``[rows, B]`` (one row if all are
    scalars)."""
    forms = ([x0] if x0 is not None else []) + list(outputs)
    coefs = [v for f in forms for v in f.expanded().values()] + [v for v in (clip, guidance, var) if v is not None]
    coefs += [x0.scale] if x0 is not None else []
    lead = np.broadcast_shapes(tuple(rows), *(np.shape(v) for v in coefs))
    t = new_table(*(lead or (1,)))
    if x0 is not None:
        if set(x0.c) - set(_X0_COLUMN):
            raise ValueError(f"x0: the data prediction is a form of x, e0 and e1 only, got {sorted(x0.c)}")
        t[..., L.AS] = x0.scale
        for k, v in x0.c.items():
            t[..., _X0_COLUMN[k]] = v
    for col, v in ((L.R, clip), (L.G, guidance), (L.VAR, var)):
        if v is not None:
            t[..., col] = v
    if not 1 <= len(outputs) <= L.MAX_OUT:
        raise ValueError(f"outputs: expected 1 to {L.MAX_OUT} forms, got {len(outputs)}")
    for k, form in enumerate(outputs):
        for term, v in form.expanded().items():
            t[..., L.out(k, _OUT_COLUMN[term])] = v
    return t


def plan(name: str, *, outputs: Mapping[str, Lin], x0: Lin | None = None, clip=None, guidance=None, var=None,
         rows: tuple[int, ...] = (), row_label: str = "step") -> Plan:
    """A ``Plan`` of the step ``outputs`` (role -> form, "x" first; roles in ``fastdiff.plan.ROLES``);
    the rest as in ``table``."""
    rows = table(x0=x0, outputs=list(outputs.values()), clip=clip, guidance=guidance, var=var, rows=rows)
    return Plan(rows, outputs=tuple(outputs), clamp=clip is not None, guided=guidance is not None, name=name,
                row_label=row_label)
