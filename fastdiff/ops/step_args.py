"""The arguments of ``fastdiff.ops.step``: their validated form (``StepArgs``) and ``validate``, which
names any argument that is wrong - with what was expected and what came - before a kernel reads it."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

from fastdiff import layout as L
from fastdiff.ops.common import check_out_aliasing, check_storage_dtype, check_tensor
from fastdiff.plan import check_finite

OP = "step"


class StepArgs:
    """The validated, contiguous inputs of one step."""

    __slots__ = ("coef", "x", "e", "e_uncond", "m", "x_last", "row", "rows", "offset", "component", "delta_table",
                 "var_table", "noise", "seeds", "noise_step", "noise_domain", "clamp", "n_out", "shape", "dtype",
                 "device", "numel")

    def __init__(self, coef, x, e, e_uncond, m, x_last, row, rows, offset, component, delta_table, var_table, noise,
                 seeds, noise_step, noise_domain, clamp, n_out, shape, dtype, device):
        self.coef, self.x, self.e, self.e_uncond, self.m, self.x_last = coef, x, e, e_uncond, m, x_last
        self.row, self.rows, self.offset, self.component = row, rows, offset, component
        self.delta_table, self.var_table, self.noise, self.seeds = delta_table, var_table, noise, seeds
        self.noise_step, self.noise_domain, self.clamp, self.n_out = noise_step, noise_domain, clamp, n_out
        self.shape, self.dtype, self.device = shape, dtype, device
        self.numel = math.prod(shape[1:])

    @property
    def batch(self) -> int:
        return self.shape[0]

    def tensors(self) -> list[torch.Tensor | None]:
        """Every input of the batch's shape (for aliasing and autograd checks)."""
        return [self.x, *self.e, *(self.e_uncond or ()), *self.m, self.x_last, self.noise]


_CHECKED: dict[int, tuple[weakref.ref, int]] = {}  # id(coef) -> (coef, its _version when found finite)


def _check_coef_host(coef: torch.Tensor, row: int, rows: torch.Tensor | None) -> None:
    """Range of the rows used, and finiteness of a host table, where that costs no device sync. A table
    is checked again only after it changed (its version counter moved): plans are checked when built."""
    if rows is None:
        if not -coef.shape[0] <= row < coef.shape[0]:
            raise ValueError(f"{OP}: row must be in [-{coef.shape[0]}, {coef.shape[0]}) (rows of coef; "
                             f"negative rows count from the end), got {row}")
    elif rows.device.type == "cpu" and rows.numel():
        if int(rows.min()) < -coef.shape[0] or int(rows.max()) >= coef.shape[0]:
            raise ValueError(f"{OP}: rows must lie in [-{coef.shape[0]}, {coef.shape[0]}) (rows of coef), "
                             f"got {rows.tolist()}")
    if coef.device.type != "cpu":
        return
    seen = _CHECKED.get(id(coef))
    if seen is not None and seen[0]() is coef and seen[1] == coef._version:
        return
    check_finite(coef.numpy(), f"{OP}: coef", "row")
    if len(_CHECKED) > 256:
        _CHECKED.clear()
    _CHECKED[id(coef)] = (weakref.ref(coef), coef._version)


def validate(
    coef, x=None, e=(), e_uncond=None, m=(), x_last=None, row=0, rows=None, offset=None, component=None,
    delta_table=None, var_table=None, noise=None, seeds=None, noise_step=0, noise_domain=0, clamp=False,
    n_out=1, shape=None, values=True,
) -> StepArgs:
    """Check every argument (naming it, with what was expected and what came) and normalise them.
    ``values=False`` skips the checks that read tensor values (the fake kernel's tracing)."""
    e, m = list(e), list(m)
    if len(e) > 2:
        raise ValueError(f"{OP}: e takes at most 2 model outputs, got {len(e)}")
    if len(m) > 3:
        raise ValueError(f"{OP}: m takes at most 3 history slots, got {len(m)}")
    if e_uncond is not None and len(e_uncond) != len(e):
        raise ValueError(f"{OP}: e_uncond must pair with e ({len(e)} tensors), got {len(e_uncond)}")
    if not 1 <= n_out <= L.MAX_OUT:
        raise ValueError(f"{OP}: n_out must be 1, 2 or 3, got {n_out}")
    if noise is not None and seeds is not None:
        raise ValueError(f"{OP}: give noise or seeds, not both")
    if (delta_table is not None or var_table is not None) and component is None:
        raise ValueError(f"{OP}: delta_table/var_table need component (the table row k_n of each sample)")

    big = [("x", x), *((f"e[{i}]", t) for i, t in enumerate(e)), *((f"m[{i}]", t) for i, t in enumerate(m)),
           ("x_last", x_last), ("noise", noise)]
    if e_uncond is not None:
        big += [(f"e_uncond[{i}]", t) for i, t in enumerate(e_uncond)]
    ref_name, ref = next(((n, t) for n, t in big if t is not None), (None, None))
    if ref is not None:
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"{OP}: {ref_name} must be a torch.Tensor, got {type(ref).__name__}")
        if shape is not None and tuple(shape) != tuple(ref.shape):
            raise ValueError(f"{OP}: shape {tuple(shape)} disagrees with {ref_name} {tuple(ref.shape)}")
        shape, dtype, device = tuple(ref.shape), ref.dtype, ref.device
    else:
        if shape is None:
            raise ValueError(f"{OP}: no tensor input gives the batch shape; pass shape=")
        shape, dtype = tuple(int(s) for s in shape), torch.float32
        device = coef.device if isinstance(coef, torch.Tensor) else torch.device("cpu")
    if len(shape) < 1:
        raise ValueError(f"{OP}: tensors must have a batch dimension, got shape {shape}")
    check_storage_dtype(OP, ref_name or "shape", dtype)

    def big_check(name, t):
        return None if t is None else check_tensor(OP, name, t, shape=shape, dtype=dtype, device=device)

    B = shape[0]
    coef_dtype = torch.float64 if dtype == torch.float64 and getattr(coef, "dtype", None) == torch.float64 \
        else torch.float32
    coef = check_tensor(OP, "coef", coef, dtype=coef_dtype, device=device, dim=2)
    if coef.shape[1] != L.NUM_COEF or coef.shape[0] == 0:
        raise ValueError(f"{OP}: coef must have shape [rows >= 1, {L.NUM_COEF}], got {tuple(coef.shape)}")
    if rows is not None:
        rows = check_tensor(OP, "rows", rows, dtype=torch.int64, device=device, dim=1)
        if rows.shape[0] not in (1, B):
            raise ValueError(f"{OP}: rows must have 1 or {B} (batch) entries, got {rows.shape[0]}")
    if values:
        _check_coef_host(coef, row, rows)
    K = None
    tables = []
    for name, t in (("delta_table", delta_table), ("var_table", var_table)):
        if t is not None:
            t = check_tensor(OP, name, t, dtype=torch.float32, device=device)
            if tuple(t.shape[1:]) != shape[1:] and (t.dim() != 2 or t.shape[1] != math.prod(shape[1:])):
                raise ValueError(f"{OP}: {name} must have shape [K, *{shape[1:]}] or [K, D], got {tuple(t.shape)}")
            if K is not None and t.shape[0] != K:
                raise ValueError(f"{OP}: delta_table and var_table must have the same K, got {K} and {t.shape[0]}")
            K = t.shape[0]
        tables.append(t)
    if component is not None:
        component = check_tensor(OP, "component", component, shape=(B,), dtype=torch.int64, device=device)
        if (values and K is not None and component.device.type == "cpu" and component.numel()
                and (int(component.min()) < 0 or int(component.max()) >= K)):
            raise ValueError(f"{OP}: component must lie in [0, {K}) (rows of the tables), got {component.tolist()}")
    return StepArgs(
        coef=coef, x=big_check("x", x), e=[big_check(f"e[{i}]", t) for i, t in enumerate(e)],
        e_uncond=None if e_uncond is None else [big_check(f"e_uncond[{i}]", t) for i, t in enumerate(e_uncond)],
        m=[big_check(f"m[{i}]", t) for i, t in enumerate(m)], x_last=big_check("x_last", x_last),
        row=int(row), rows=rows,
        offset=None if offset is None else check_tensor(OP, "offset", offset, shape=(B,), dtype=torch.float32,
                                                        device=device),
        component=component, delta_table=tables[0], var_table=tables[1], noise=big_check("noise", noise),
        seeds=None if seeds is None else check_tensor(OP, "seeds", seeds, shape=(B,), dtype=torch.int64,
                                                      device=device),
        noise_step=int(noise_step), noise_domain=int(noise_domain), clamp=bool(clamp), n_out=int(n_out),
        shape=shape, dtype=dtype, device=device,
    )


def check_out(a: StepArgs, out: Sequence[torch.Tensor], aliasing: bool = True) -> list[torch.Tensor]:
    """`out` checked against validated arguments: n_out tensors like x (any layout), none partly
    overlapping an input or another output (``aliasing``: not for fake tensors, which have no addresses)."""
    if len(out) != a.n_out:
        raise ValueError(f"{OP}: out must hold n_out={a.n_out} tensors, got {len(out)}")
    for k, o in enumerate(out):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{OP}: out[{k}] must be a torch.Tensor, got {type(o).__name__}")
        if o.shape != a.shape or o.dtype != a.dtype or o.device != a.device:
            raise ValueError(f"{OP}: out[{k}] must be {tuple(a.shape)} {a.dtype} on {a.device} like x, got "
                             f"{tuple(o.shape)} {o.dtype} on {o.device}")
    if aliasing:
        ins = [("x", a.x), *((f"e[{i}]", t) for i, t in enumerate(a.e)),
               *((f"e_uncond[{i}]", t) for i, t in enumerate(a.e_uncond or ())),
               *((f"m[{i}]", t) for i, t in enumerate(a.m)), ("x_last", a.x_last), ("noise", a.noise)]
        check_out_aliasing(OP, [(f"out[{k}]", o) for k, o in enumerate(out) if o.is_contiguous()], ins)
    return list(out)
