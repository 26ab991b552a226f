"""Plans: the per-step coefficient table of one sampling run (layer 2).

A plan builder (``fastdiff.samplers.*``, written with ``fastdiff.samplers.kit``) computes every row's
coefficients on the host in float64; ``Plan`` checks them, keeps the float64 table, says which inputs its
rows read (``Terms``, derived from the table) and what each output is (its *roles*), and uploads one
float32 copy per device (``[rows, NUM_COEF]``, or ``[rows * B, NUM_COEF]`` when rows differ per sample).
Kernels read the current row from that device copy, so ``refill`` changes a captured graph's coefficients
in place. What each column multiplies: the glossary in docs/architecture.md ("The step's terms").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastdiff import layout as L

# What an output is for the code that runs the plan (``fastdiff.stepper``):
#   x        the next sample (always output 0)
#   x0       a data prediction handed back to the caller (diffusers' pred_original_sample)
#   history  a data prediction kept for later rows: it becomes history slot m0 of the next step
#   x_last   a sample kept for the next step's x_last (UniPC's corrected sample)
ROLES = ("x", "x0", "history", "x_last", "noise")


@dataclass(frozen=True)
class Terms:
    """Which inputs a plan's rows read (any non-zero weight in any row) and how its steps run."""

    x: bool = True
    n_e: int = 1           # model outputs per step (DDM has 2)
    guided: bool = False   # classifier-free guidance pairs (cond, uncond)
    n_m: int = 0           # history slots
    x_last: bool = False
    offset: bool = False   # per-sample scalar offset
    delta: bool = False    # gathered per-element offset rows (delta_table)
    var: bool = False      # gathered variance rows (var_table)
    noise: bool = False
    clamp: bool = False
    n_out: int = 1


def new_table(*lead: int) -> np.ndarray:
    """A float64 coefficient table of shape ``[*lead, NUM_COEF]``: all zero but the x0 scale AS = 1."""
    t = np.zeros((*lead, L.NUM_COEF), dtype=np.float64)
    t[..., L.AS] = 1.0
    return t


def check_finite(table: np.ndarray, what: str = "plan", row_label: str = "step") -> None:
    """Refuse NaN anywhere, and +-inf outside the columns that may hold it (``layout.MAY_BE_INF``), naming
    the column and the row (``row_label`` says what a row is: a step, a timestep, ...)."""
    bad = ~np.isfinite(table)
    bad[..., list(L.MAY_BE_INF)] = np.isnan(table[..., list(L.MAY_BE_INF)])
    where = np.argwhere(bad)
    if len(where):
        w = tuple(int(i) for i in where[0])
        row = f"{row_label} {w[0]}" + (f", sample {w[1]}" if table.ndim == 3 else "")
        raise ValueError(f"{what}: non-finite coefficient {L.names()[w[-1]]} = {table[w]} at {row}")


def check_table(table: np.ndarray, name: str = "plan", row_label: str = "step") -> np.ndarray:
    """Validate a coefficient table: float, ``[rows, (B,) NUM_COEF]``, non-empty, finite (``check_finite``)."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim not in (2, 3) or table.shape[-1] != L.NUM_COEF:
        raise ValueError(f"{name}: table must have shape [rows, {L.NUM_COEF}] or [rows, B, {L.NUM_COEF}], "
                         f"got {table.shape}")
    if table.shape[0] == 0 or table.size == 0:
        raise ValueError(f"{name}: table is empty (shape {table.shape})")
    check_finite(table, name, row_label)
    return table


def _reads(table: np.ndarray, n_out: int, term: int) -> np.ndarray:
    """Per row: whether some output < n_out weighs `term`."""
    cols = [L.out(k, term) for k in range(n_out)]
    return (table[..., cols] != 0).any(axis=-1).reshape(table.shape[0], -1).any(axis=1)


def history_reads(table: np.ndarray, n_out: int) -> np.ndarray:
    """Per row: how many history slots it reads (1 + the last j with a non-zero CMj)."""
    n = np.zeros(table.shape[0], dtype=np.int64)
    for j, term in enumerate((L.CM0, L.CM1, L.CM2)):
        n = np.where(_reads(table, n_out, term), j + 1, n)
    return n


def terms_of(table: np.ndarray, n_out: int, clamp: bool, guided: bool) -> Terms:
    """The inputs the rows of `table` read, ``n_out`` outputs (columns of later outputs are ignored)."""
    def any_(term):
        return bool(_reads(table, n_out, term).any())

    x0_rows = _reads(table, n_out, L.CX0)  # a row's x0 weights count only where some output reads x0
    flat = table.reshape(table.shape[0], -1, L.NUM_COEF)

    def in_x0(col):
        return bool(((flat[..., col] != 0).any(axis=1) & x0_rows).any())

    n_e = 2 if any_(L.CE1) or in_x0(L.AE1) else 1 if any_(L.CE0) or in_x0(L.AE0) else 0
    return Terms(x=any_(L.CX) or in_x0(L.AX), n_e=n_e, guided=guided, n_m=int(history_reads(table, n_out).max()),
                 x_last=any_(L.CLAST), offset=any_(L.COFF), delta=any_(L.CDELTA),
                 var=any_(L.CZ) and bool((table[..., L.VAR] != 0).any()), noise=any_(L.CZ), clamp=clamp,
                 n_out=n_out)


class Plan:
    """A checked coefficient table, the inputs its rows read and the roles of its outputs.

    Args:
        table: float64 ``[rows, NUM_COEF]`` or ``[rows, B, NUM_COEF]`` (per-sample rows).
        outputs: the role of each output (``ROLES``), output 0 first; ``("x",)`` by default.
        clamp: whether x0 is clamped to ``[-R, R]``. guided: whether the steps take guidance pairs.
        name: for error messages; row_label: what a row is ("step", "timestep"), for error messages.
    """

    def __init__(self, table: np.ndarray, *, outputs: tuple[str, ...] = ("x",), clamp: bool = False,
                 guided: bool = False, name: str = "plan", row_label: str = "step"):
        outputs = tuple(outputs)
        if not 1 <= len(outputs) <= L.MAX_OUT or outputs[0] != "x" or any(r not in ROLES for r in outputs) \
                or len(set(outputs)) != len(outputs):
            raise ValueError(f"{name}: outputs must be 1-{L.MAX_OUT} distinct roles of {ROLES}, 'x' first, "
                             f"got {outputs}")
        self.name, self.row_label, self.outputs = name, row_label, outputs
        self.keeps = "history" in outputs or "x_last" in outputs  # outputs a stepper keeps for later steps
        self.clamp, self.guided = bool(clamp), bool(guided)
        self._set(check_table(table, name, row_label))
        self._device: dict[tuple, torch.Tensor] = {}
        self._rows: dict[torch.device, torch.Tensor] = {}

    def _set(self, table: np.ndarray) -> None:
        self.table = table
        self.per_sample = table.ndim == 3  # rows differ per sample: [rows, B, NUM_COEF]
        self.terms = terms_of(table, len(self.outputs), self.clamp, self.guided)
        # per row (Python ints and bools: the stepper reads them every step, torch.compile traces them as constants)
        self.history_reads = tuple(int(n) for n in history_reads(table, len(self.outputs)))
        self.noise_rows = tuple(bool(b) for b in _reads(table, len(self.outputs), L.CZ))  # whether it draws noise

    @property
    def steps(self) -> int:
        """Rows of the table (steps of a run, or timesteps for a table indexed by timestep)."""
        return self.table.shape[0]

    def coef(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The device copy ``[rows, NUM_COEF]`` (float32; float64 for float64 inputs), uploaded once."""
        t = self._device.get((device, dtype))
        if t is None:
            key = (torch.device(device), dtype)
            t = self._device.get(key)
            if t is None:
                t = self._device[key] = torch.from_numpy(self.table.reshape(-1, L.NUM_COEF)).to(key[0], dtype)
        return t

    def step_args(self, step: int, device: torch.device | str = "cpu") -> dict:
        """The ``fastdiff.ops.step`` arguments that select row `step` on `device` (coef, row or rows,
        clamp, n_out); the inputs are the caller's (``fastdiff.stepper.Stepper`` passes them)."""
        if not 0 <= step < self.steps:
            raise ValueError(f"{self.name}: step must be in [0, {self.steps}), got {step}")
        device = torch.device(device)
        args = {"coef": self.coef(device), "clamp": self.clamp, "n_out": len(self.outputs)}
        if self.per_sample:
            rows = self._rows.get(device)
            if rows is None:
                B = self.table.shape[1]
                rows = torch.arange(self.steps * B, dtype=torch.int64, device=device).reshape(self.steps, B)
                self._rows[device] = rows
            args["rows"] = rows[step]
        else:
            args["row"] = step
        return args

    def refill(self, table: np.ndarray) -> None:
        """Replace the coefficients in place (same shape), on the host and every device copy."""
        table = check_table(table, self.name, self.row_label)
        if table.shape != self.table.shape:
            raise ValueError(f"{self.name}: refill needs shape {self.table.shape}, got {table.shape}")
        self._set(table)
        flat = torch.from_numpy(table.reshape(-1, L.NUM_COEF))
        for t in self._device.values():
            t.copy_(flat)

    def __repr__(self) -> str:
        return f"Plan({self.name!r}, {self.steps} {self.row_label}s, outputs={self.outputs}, {self.terms})"
