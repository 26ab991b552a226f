"""Plans: the per-step coefficient table of one sampling run (DESIGN.md, layer 2).

A plan builder (``fastdiff.samplers.*``) computes every step's coefficients on the host in float64;
``Plan`` checks them, keeps the float64 table and uploads one float32 copy per device
(``[steps, NUM_COEF]``, or ``[steps * B, NUM_COEF]`` when timesteps differ per sample). Kernels read the
row of the current step from that device copy, so ``refill`` can change a captured graph's coefficients
in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastdiff import layout as L


@dataclass(frozen=True)
class Terms:
    """Which terms a plan's steps use: what the caller passes to ``fastdiff.ops.step``."""

    n_e: int = 1          # model outputs per step (DDM has 2)
    guided: bool = False  # classifier-free guidance pairs
    n_m: int = 0          # history slots
    x_last: bool = False
    offset: bool = False
    row: bool = False
    var: bool = False
    noise: bool = False
    clamp: bool = False
    n_out: int = 1


def new_table(*lead: int) -> np.ndarray:
    """A float64 coefficient table of shape ``[*lead, NUM_COEF]``: all zero but the x0 scale AS = 1."""
    t = np.zeros((*lead, L.NUM_COEF), dtype=np.float64)
    t[..., L.AS] = 1.0
    return t


def check_table(table: np.ndarray, name: str = "plan") -> np.ndarray:
    """Validate a coefficient table: float, ``[steps, (B,) NUM_COEF]``, non-empty and finite."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim not in (2, 3) or table.shape[-1] != L.NUM_COEF:
        raise ValueError(f"{name}: table must have shape [steps, {L.NUM_COEF}] or [steps, B, {L.NUM_COEF}], "
                         f"got {table.shape}")
    if table.shape[0] == 0 or table.size == 0:
        raise ValueError(f"{name}: table is empty (shape {table.shape})")
    bad = np.argwhere(~np.isfinite(table))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"{name}: non-finite coefficient {L.names()[where[-1]]} = {table[where]} at step "
                         f"{where[0]}" + (f", sample {where[1]}" if table.ndim == 3 else ""))
    return table


def x0_table(table: np.ndarray) -> np.ndarray:
    """Rows that output only the unclamped data prediction x0 = AS*(AX*x + AE0*e0 + AE1*e1) (keeps G)."""
    t = new_table(*table.shape[:-1])
    for j in (L.G, L.AS, L.AX, L.AE0, L.AE1):
        t[..., j] = table[..., j]
    t[..., L.out(0, L.CX0)] = 1.0
    return t


class Plan:
    """A checked coefficient table plus the terms its steps use.

    Args:
        table: float64 ``[steps, NUM_COEF]`` or ``[steps, B, NUM_COEF]`` (per-sample timesteps).
        terms: which inputs the steps read (``Terms``).
        name: for error messages.
    """

    def __init__(self, table: np.ndarray, terms: Terms, name: str = "plan"):
        self.name = name
        self.table = check_table(table, name)
        self.terms = terms
        self._device: dict[torch.device, torch.Tensor] = {}
        self._rows: dict[torch.device, torch.Tensor] = {}

    @property
    def steps(self) -> int:
        return self.table.shape[0]

    @property
    def per_sample(self) -> bool:
        return self.table.ndim == 3

    def _rows32(self) -> torch.Tensor:
        return torch.from_numpy(self.table.reshape(-1, L.NUM_COEF).astype(np.float32))

    def coef(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 device copy ``[rows, NUM_COEF]`` (uploaded once per device)."""
        device = torch.device(device)
        t = self._device.get(device)
        if t is None:
            t = self._device[device] = self._rows32().to(device)
        return t

    def step_args(self, step: int, device: torch.device | str = "cpu") -> dict:
        """The ``fastdiff.ops.step`` arguments that select step `step`'s row(s) on `device`."""
        if not 0 <= step < self.steps:
            raise ValueError(f"{self.name}: step must be in [0, {self.steps}), got {step}")
        device = torch.device(device)
        args = {"coef": self.coef(device), "clamp": self.terms.clamp, "n_out": self.terms.n_out}
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
        table = check_table(table, self.name)
        if table.shape != self.table.shape:
            raise ValueError(f"{self.name}: refill needs shape {self.table.shape}, got {table.shape}")
        self.table = table
        for t in self._device.values():
            t.copy_(self._rows32())
