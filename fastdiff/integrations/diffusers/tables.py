"""Per-step draws of the mixture drop-ins (Mix-DDPM's ``standard`` strategy, DDIM-GMM): each step draws one
component per sample (``draw_step_components``) and hands the gathered tables - ``offset``, ``component``,
``delta_table``, ``var_table`` - to the shared base's ``step`` code through a ``TableStepper``, which adds them to
the stepper calls whose plan reads them (the base calls the stepper without tables)."""

from __future__ import annotations

import torch

from fastdiff import philox
from fastdiff.samplers import mixddpm as mix
from fastdiff.stepper import Stepper


class TableStepper(Stepper):
    """A ``Stepper`` that adds the per-call tables in ``pending`` (``offset``, ``component``, ``delta_table``,
    ``var_table``) to the steps whose plan reads them: how a drop-in feeds its per-step draws into the shared
    base's ``step`` code, which calls the stepper without tables."""

    pending: dict | None = None

    def step(self, x, e=(), *, plan=None, **kw):
        pending = self.pending
        if pending:
            t = (self.plan if plan is None else plan).terms
            wanted = {"offset": t.offset, "component": t.delta or t.var, "delta_table": t.delta, "var_table": t.var}
            for name, value in pending.items():
                if wanted[name] and kw.get(name) is None:
                    kw[name] = value
        return super().step(x, e, plan=plan, **kw)


def use_table_stepper(scheduler) -> None:
    """Replace a drop-in's stepper by a ``TableStepper`` (same backend)."""
    scheduler._stepper = TableStepper(scheduler._stepper.plan, backend=scheduler._stepper.backend)


def draw_step_components(scheduler, weights, sample: torch.Tensor, timestep, generator=None, seeds=None):
    """``[B]`` components of one step: Philox (step = the timestep, else the step index) with per-sample seeds
    (the call's or ``set_seeds``'), else ``torch.rand`` uniforms from `generator`."""
    seeds = scheduler._seeds if seeds is None else philox.check_seeds(seeds)
    B = sample.shape[0]
    if seeds is not None:
        seeds = scheduler._seed_tensor(seeds, B, sample.device)
        if isinstance(timestep, torch.Tensor) and (timestep.numel() != 1 or timestep.device.type != "cpu"):
            n = scheduler._stepper.index
        else:
            n = int(timestep)
        return mix.draw_components(weights, B, 1, seeds=seeds, step=n % 2**31, device=sample.device)[:, 0]
    return mix.draw_components(weights, B, 1, generator=generator, device=sample.device)[:, 0]
