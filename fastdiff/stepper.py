"""The stepper: the one place where a plan's rows become fused steps (``fastdiff.ops.step`` calls).

``fastdiff.loop``, ``CapturedSampler`` and every drop-in drive their plan through a ``Stepper``. It keeps
what a run carries from step to step, without copies:

- the **step index**: the next row of a plan indexed by step, and the counter of the in-kernel noise
  (step s draws Philox step s; ``reset(begin)`` starts a run at row ``begin``, as img2img does);
- the **history ring**: an output with role "history" (a data prediction) becomes slot m0 of the next
  step, the previous m0 becomes m1, ...; the buffers rotate (the oldest slot's buffer takes the next
  write), nothing is copied;
- **x_last**: an output with role "x_last" becomes the next step's x_last (two buffers, alternating).

It checks the plan's terms against the arguments once per kind of call, and each row against what it
reads: a row that draws noise run without noise or seeds is an error, not a silent deterministic step;
a row that reads slot m1 right after ``reset`` is an error (its warm-up rows were built for another start).
"""

from __future__ import annotations

import torch

from fastdiff import memory
from fastdiff.backends import forced_backend
from fastdiff.ops.step import kind_call, step_positional
from fastdiff.philox import DOMAIN_STEP
from fastdiff.plan import Plan

_TABLE_ORDER = ("offset", "component", "delta_table", "var_table")
_TABLES, _NO_TABLES = frozenset(_TABLE_ORDER), (None, None, None, None)
_RINGS = (type(None), list, tuple)  # m: the ring's slots (None) or the caller's


class Stepper:
    """Runs `plan` one step per ``step`` call.

    Args:
        plan: the run's rows (``fastdiff.samplers``), one per step, or one per timestep when the caller
            picks rows itself (``row=``/``rows=``).
        backend: ``cuda``, ``triton``, ``cpu``, ``torch`` or None (automatic).
    """

    def __init__(self, plan: Plan, *, backend: str | None = None):
        self.plan, self.backend = plan, backend
        self._checked: dict = {}
        self._lanes: dict = {}
        self.reset()

    def reset(self, index: int = 0) -> None:
        """Start a run at row `index`: no history, no x_last; the noise counter restarts at `index`."""
        self.index = int(index)
        self._history: list[torch.Tensor] = []   # m0, m1, ...: newest first
        self._spare: list[torch.Tensor] = []     # buffers free for the next history write
        self._x_last: torch.Tensor | None = None
        self._x_last_spare: torch.Tensor | None = None

    def _check(self, key, plan, x, e, e_uncond, noise, seeds, tables) -> None:
        """The plan's terms against the arguments, once per plan and kind of call (`key`)."""
        t, name = plan.terms, plan.name
        if t.x and x is None:
            raise ValueError(f"x: {name} reads the current sample; pass x")
        if len(e) != t.n_e and not (t.n_e == 0 and len(e) <= 1):
            raise ValueError(f"e: {name} reads {t.n_e} model output(s) per step, got {len(e)}")
        if t.guided != (e_uncond is not None):
            raise ValueError(f"e_uncond: {name} " + ("is guided; pass the unconditional outputs" if t.guided else
                                                     "has no guidance scale; build it with guidance= to pass them"))
        for term, args in (("offset", ("offset",)), ("delta", ("delta_table", "component")),
                           ("var", ("var_table", "component"))):
            missing = [a for a in args if tables.get(a) is None]
            if getattr(t, term) and missing:
                raise ValueError(f"{missing[0]}: {name} reads {term} terms; pass {', '.join(args)}")
        if len(self._checked) > 64:
            self._checked.clear()
        self._checked[key] = plan  # the plan is kept alive with its key, so its id is not reused

    def _check_row(self, plan: Plan, r: int) -> None:
        need = plan.history_reads[r]
        if need > len(self._history):
            raise ValueError(f"{plan.name}: {plan.row_label} {r} reads {need} history slot(s) but "
                             f"{len(self._history)} exist(s) ({self.index - len(self._history)} is where the run "
                             f"started); build the plan's warm-up rows for this start")

    def _buffer(self, spare: list[torch.Tensor] | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if isinstance(spare, list):
            spare = spare.pop() if spare else None
        if spare is None or spare.shape != like.shape or spare.dtype != like.dtype or spare.device != like.device:
            return memory.empty_like(like)
        return spare

    def step(self, x: torch.Tensor | None, e=(), *, e_uncond=None, noise=None, seeds=None, noise_step=None,
             row: int | None = None, rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
             shape=None, plan: Plan | None = None, m=None, advance: bool = True,
             **tables) -> tuple[torch.Tensor, ...]:
        """One fused step; returns the plan's outputs (``plan.outputs`` says what each one is).

        Args:
            x: the current sample; e: the model output(s) (the conditional ones when guided), e_uncond
                the unconditional ones.
            noise / seeds: a standard-normal tensor like x, or ``[B]`` int64 keys for in-kernel noise
                drawn at ``noise_step`` (default: the step index).
            row / rows: the plan row (host int), or ``[B]``/``[1]`` int64 device rows; default: the row of
                the step index.
            out: where output 0 (the next sample) goes (x itself: in place); default a new tensor.
            plan: run this plan's row instead of ``self.plan``'s (a plan of the same run: another eta, the
                x0 pass of dynamic thresholding).
            m: history slots given by the caller for this call, instead of the ring (dynamic
                thresholding feeds its thresholded x0 as m0).
            advance: False for an auxiliary pass: the step index, history and x_last stay as they are.
            tables: ``offset``, ``component``, ``delta_table``, ``var_table`` when the plan reads them.
        """
        plan = self.plan if plan is None else plan
        lane_key = None
        if (row is None or type(row) is int) and rows is None and out is None and advance and noise_step is None \
                and not tables and type(m) in _RINGS and not torch.compiler.is_compiling():  # a step of a run
            e = e if type(e) is list else list(e) if isinstance(e, tuple) else [e]
            lane_key = (id(plan), len(e), e_uncond is not None, noise is not None, seeds is not None,
                        len(self._history) if m is None else -1 - len(m), self._x_last is not None)
            lane = self._lanes.get(lane_key)
            if lane is not None:
                results = self._run_lane(lane, plan, x, e, e_uncond, noise, seeds, row, m)
                if results is not None:
                    return results
        if tables and not _TABLES.issuperset(tables):
            raise TypeError(f"step() got unexpected arguments {sorted(set(tables) - _TABLES)}; tables are "
                            f"{sorted(_TABLES)}")
        e = e if type(e) is list else list(e) if isinstance(e, tuple) else [e]
        key = (id(plan), x is not None, len(e), e_uncond is not None, noise is not None, seeds is not None,
               tuple(k for k, v in tables.items() if v is not None) if tables else ())
        if self._checked.get(key) is not plan:
            self._check(key, plan, x, e, e_uncond, noise, seeds, tables)
        ref = x if x is not None else (e[0] if e else noise)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else seeds.device
        coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        coef = plan._device.get((device, coef_dtype))
        if coef is None:
            coef = plan.coef(device, coef_dtype)
        if rows is None:
            r = self.index if row is None else row
            if not -plan.steps <= r < plan.steps:
                raise ValueError(f"{plan.name}: {plan.row_label} {r} is past the end of the plan ({plan.steps} "
                                 f"{plan.row_label}s{', from the step index' if row is None else ''})")
            if plan.per_sample:
                B = plan.table.shape[1]
                if ref is not None and ref.shape[0] != B:
                    raise ValueError(f"x: {plan.name} has rows for a batch of {B} (per-sample rows), got a batch "
                                     f"of {ref.shape[0]}")
                rows = torch.arange(r * B, (r + 1) * B, device=device)
                r = 0
            elif m is None and plan.terms.n_m:
                self._check_row(plan, r if r >= 0 else r + plan.steps)
        else:
            r = 0
        if plan.terms.noise and noise is None and seeds is None and (rows is not None or plan.noise_rows[r]):
            raise ValueError(f"noise: {plan.name} draws noise" + ("" if rows is not None else f" at {plan.row_label} "
                             f"{r}") + "; pass noise (a tensor like x) or seeds ([B] int64)")
        outs = None
        if out is not None or plan.keeps:
            outs = self._outs(plan, ref if ref is not None else torch.empty(shape, dtype=dtype, device=device), out)
        offset, component, delta_table, var_table = (tables.get(k) for k in _TABLE_ORDER) if tables else _NO_TABLES
        results = step_positional(
            coef, x, e, e_uncond, self._history if m is None else list(m), self._x_last, r, rows, offset, component,
            delta_table, var_table, noise, seeds, self.index if noise_step is None else noise_step, DOMAIN_STEP,
            plan.clamp, len(plan.outputs), shape, outs, self.backend)
        if not advance:
            return results
        if lane_key is not None and x is not None and not plan.per_sample:
            self._add_lane(lane_key, plan, coef, e, e_uncond, noise, seeds, self._history if m is None else list(m))
        return self._advance(plan, results)

    def _outs(self, plan: Plan, like: torch.Tensor, out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The outputs of a step: output 0 (`out`, or new), the kept ones in the ring's spare buffers."""
        outs = [out if out is not None else memory.empty_like(like)]
        for role in plan.outputs[1:]:
            if role == "history":
                outs.append(self._buffer(self._spare, like))
            elif role == "x_last":
                outs.append(self._buffer(self._x_last_spare, like))
            else:
                outs.append(memory.empty_like(like))
        return outs

    def _advance(self, plan: Plan, results: tuple) -> tuple:
        """The step is taken: its kept outputs enter the history ring / x_last, the index moves on."""
        if plan.keeps:
            for role, t in zip(plan.outputs[1:], results[1:]):
                if role == "history":
                    self._history.insert(0, t)
                    if len(self._history) > plan.terms.n_m:
                        self._spare.append(self._history.pop())
                elif role == "x_last":
                    self._x_last_spare, self._x_last = self._x_last, t
        self.index += 1
        return results

    # ---------------------------------------------------------------------------------------- lanes
    # A lane is the shortest way through a kind of step of a run - the plan, which inputs come, the ring's
    # fill - once a step of that kind went the checked way: the native call generated for the kind
    # (ops.step.kind_call), which checks the tensors itself, with the plan's table on the inputs' device.
    # What the checked way checks per step stays: the row exists, its history slots are there, noise comes
    # where it draws noise, the backend is the one the kind was made for. Anything else takes the checked way.

    def _add_lane(self, key: tuple, plan: Plan, coef, e, e_uncond, noise, seeds, ring: list) -> None:
        backend = self.backend or forced_backend()
        call = kind_call(coef, e, e_uncond, ring, self._x_last, noise, seeds, plan.clamp, len(plan.outputs), backend)
        if call is not None:
            if len(self._lanes) >= 64:
                self._lanes.clear()
            self._lanes[key] = (plan, call, coef, backend)  # the plan kept with its key: its id is no other plan's

    def _run_lane(self, lane: tuple, plan: Plan, x, e: list, e_uncond, noise, seeds, row, m) -> tuple | None:
        _, call, coef, backend = lane
        r = self.index if row is None else row
        if (not -plan.steps <= r < plan.steps or (noise is None and seeds is None and plan.noise_rows[r])
                or backend != (self.backend or forced_backend())):
            return None
        if m is not None:
            ring = list(m)  # the caller's slots (as the checked way: their reads are the caller's to provide)
        else:
            ring = self._history
            if plan.history_reads[r] > len(ring):
                return None
        outs = self._outs(plan, x) if plan.keeps else None
        results = call(coef, x, e, e_uncond, ring, self._x_last, r, noise, seeds, self.index, DOMAIN_STEP,
                       outs, None, None, None, None, None, torch.is_grad_enabled())
        return None if results is None else self._advance(plan, results)
