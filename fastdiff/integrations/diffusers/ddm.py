"""``DDMScheduler``: decoupled diffusion (Huang et al., arXiv 2306.13720) in the diffusers style, one fused kernel
per model call (``fastdiff.samplers.ddm``). diffusers has no DDM scheduler; this one follows its conventions
(``ConfigMixin``, ``from_config``, ``save_pretrained``, ``set_timesteps``, ``step`` -> ``prev_sample``,
``add_noise``). ``FloatGridRun`` is what it shares with ``IADBScheduler``: float timesteps on a run's grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fastdiff.integrations.diffusers.base import FastSchedulerMixin, output
from fastdiff.samplers.ddm import PRECONDITIONINGS, SAMPLERS, check_choice, ddm_grid, ddm_heun, ddm_step
from fastdiff.samplers.forward import q_sample_plan
from fastdiff.stepper import Stepper
from fastdiff.training import ddm as training


@dataclass
class DDMSchedulerOutput(BaseOutput):
    """prev_sample: the sample after this model call; pred_original_sample: the (clamped) data prediction."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def host_float(name: str, value) -> float:
    """One float timestep read on the host (a device tensor is read: a sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected one timestep of the run's grid (every sample steps together), got "
                             f"{value.numel()} values")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float timestep (as in timesteps), got a {value.dtype} tensor")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float timestep (as in timesteps), got {type(value).__name__} {value!r}")
    return float(value)


class FloatGridRun(FastSchedulerMixin):
    """A run over float timesteps, one model call each: ``timesteps`` (float32) and their float64 host grid.
    The first call of a run finds its timestep on the grid (``set_begin_index`` names it instead), later
    calls must bring the next one. Noise, seeds, backend and cached plans: ``FastSchedulerMixin``'s."""

    def _init_run(self) -> None:
        self._seeds, self._plans, self._seed_cache, self._last_plans = None, {}, {}, None
        self._begin_index, self._grid, self._next, self._x_start = None, None, None, None
        self._stepper = Stepper(q_sample_plan(1.0, 0.0))  # the run's state; each call names its plan
        self.num_inference_steps, self.timesteps = None, None

    def _set_grid(self, grid: np.ndarray, device) -> None:
        self._grid = np.asarray(grid, np.float64)
        self._grid_list = self._grid.tolist()
        self.timesteps = torch.from_numpy(self._grid.astype(np.float32)).to(device)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._begin_index, self._next = None, None
        self._stepper.reset(0)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at model call ``begin_index`` (img2img); the noise counter of ``seeds`` starts there."""
        super().set_begin_index(begin_index)
        self._next = self._begin_index

    @property
    def step_index(self):
        """The index of the next model call (None before the first call of a run)."""
        return self._next

    def _call_index(self, timestep) -> int:
        """The model call of `timestep`, checked against the grid. A device timestep is read once, at the first
        call of a run (to find where it starts); later calls take the run's order without reading it (no host
        sync per step), as diffusers' step-indexed schedulers do. Under ``torch.compile`` it is never read
        (a sync and a graph break): calls start at ``begin_index`` or 0."""
        if self._grid is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        grid, i = self._grid, self._next
        compiling = torch.compiler.is_compiling()
        if i is None and compiling:
            i = 0
            self._stepper.reset(i)
        elif i is None:  # the run's first call: find where it starts
            t = host_float("timestep", timestep)
            where = np.flatnonzero(np.isclose(grid, t, rtol=1e-6, atol=1e-7))
            if not len(where):
                raise ValueError(f"timestep: {t} is not on this run's grid {grid.round(6).tolist()}"[:300])
            i = self._start_index(where)
            self._stepper.reset(i)
            return i
        if i >= len(grid):
            raise ValueError(f"step: the run has {len(grid)} model calls and all were taken; call set_timesteps for "
                             f"a new run")
        on_device = isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"
        if not (compiling or on_device):
            t = host_float("timestep", timestep)
            if not abs(self._grid_list[i] - t) <= 1e-7 + 1e-6 * abs(t):  # np.isclose's rule, in Python floats
                raise ValueError(f"timestep: model call {i} of the run is at {grid[i]:.6g}, got {t}")
        return i

    def _start_index(self, where: np.ndarray) -> int:
        """The call a run starts at when its first timestep is at the grid indices `where` (the first)."""
        return int(where[0])

    def _inputs(self, outputs: list, sample: torch.Tensor, guidance_scale):
        """(e, e_uncond, x) in the promoted dtype; with guidance each output holds [uncond; cond]."""
        pairs = [self._guidance_inputs(o, sample, guidance_scale) for o in outputs]
        for k, (e, _) in enumerate(pairs):
            if e.shape != sample.shape:
                name = "model_output" if len(pairs) == 1 else f"model_output[{k}]"
                raise ValueError(f"{name}: expected shape {tuple(sample.shape)} (like sample), got {tuple(e.shape)}")
        dtype = sample.dtype
        for o in outputs:
            dtype = torch.promote_types(dtype, o.dtype)
        e = [p[0].to(dtype) for p in pairs]
        uncond = None if guidance_scale is None else [p[1][0].to(dtype) for p in pairs]
        return e, uncond, sample.to(dtype)

    def __len__(self) -> int:
        return 0 if self._grid is None else len(self._grid)


class DDMScheduler(FloatGridRun, SchedulerMixin, ConfigMixin):
    """Sampling for decoupled diffusion models: ``step`` takes the pair ``(C, eps)`` (the two heads) at float
    timesteps t from 1 down (``timesteps``, one entry per model call), one fused kernel per call.

    Args:
        sampler: "stochastic" (the code's Brownian-bridge step), "eta" (the derived family with the same
            marginals; ``step(..., eta=)``: 0 deterministic, 1 the stochastic step) or "heun" (the code's
            second-order ``sample_fn_2order``: two model calls a step, ``num_inference_steps`` counts calls).
        denoise, denoise_step: split the last step into (1/N - denoise_step, denoise_step), as the code's
            ``denoise``.
        clip_sample, clip_sample_range: clamp the data prediction to [-range, range] (the code: pixels).
        preconditioning: None (the model returns C and eps) or "edm" (it returns the raw heads F_x, F_y of
            the code's EDM-style wrapper, fed ``scale_model_input(x, t) = x/sqrt(1 + t)``).
    """

    order = 1

    @register_to_config
    def __init__(self, sampler: str = "stochastic", denoise: bool = True, denoise_step: float = 1e-4,
                 clip_sample: bool = True, clip_sample_range: float = 1.0, preconditioning: str | None = None):
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("preconditioning", preconditioning, PRECONDITIONINGS)
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range: expected > 0, got {clip_sample_range}")
        self.init_noise_sigma = 1.0
        self._init_run()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """x/sqrt(1 + t) with EDM preconditioning (the network's input), else the sample."""
        if self.config.preconditioning is None:
            return sample
        return sample / (1.0 + host_float("timestep", timestep)) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The run: ``fastdiff.samplers.ddm.ddm_grid``'s times, one ``timesteps`` entry per model call."""
        cfg = self.config
        t, second = ddm_grid(num_inference_steps, sampler=cfg.sampler, denoise=cfg.denoise,
                             denoise_step=cfg.denoise_step)
        calls, grid, j = [], [], 0
        for i in range(len(t) - 1):
            calls.append(("first" if cfg.sampler == "heun" else "step", i, bool(second[i])))
            grid.append(t[i])
            if second[i]:
                calls.append(("second", j, False))
                grid.append(t[i + 1])
                j += 1
        self.num_inference_steps = num_inference_steps
        self._t, self._second, self._calls, self._t_key = t, second, calls, tuple(t.tolist())
        self._set_grid(np.array(grid), device)
        self._plans_for(0.0, None)

    def _start_index(self, where: np.ndarray) -> int:
        """A run starts at the first call of a step: Heun's second call shares its t with the next step's first."""
        return next((int(i) for i in where if self._calls[i][0] != "second"), int(where[0]))

    def _plans_for(self, eta: float, guidance) -> dict:
        cfg = self.config
        key = (self._t_key, cfg.sampler, eta, guidance)
        clip = cfg.clip_sample_range if cfg.clip_sample else None
        kw = dict(clip=clip, preconditioning=cfg.preconditioning, guidance=guidance)
        if cfg.sampler == "heun":
            first, second = self._plan(key, lambda: ddm_heun(self._t[:-1], self._t[1:], self._second, **kw))
            return {"first": first, "second": second}
        return {"step": self._plan(key, lambda: ddm_step(self._t[:-1], self._t[1:], sampler=cfg.sampler, eta=eta,
                                                         **kw))}

    def step(self, model_output, timestep: float | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, seeds=None, return_dict: bool = True,
             guidance_scale: float | None = None) -> DDMSchedulerOutput | tuple:
        """One model call: ``model_output = (C, eps)`` at ``timestep`` (the next entry of ``timesteps``).
        Noise (none on the last step, none on Heun's first call of a two-call step) is drawn as diffusers
        draws it (``generator``), or in the kernel from per-sample ``seeds``. ``eta``: the "eta" sampler's.
        ``guidance_scale``: fused classifier-free guidance, each head holding [uncond; cond]."""
        if not isinstance(model_output, (tuple, list)) or len(model_output) != 2 or not all(
                isinstance(o, torch.Tensor) for o in model_output):
            got = f"a {type(model_output).__name__}" + (f" of {len(model_output)}" if isinstance(
                model_output, (tuple, list)) else "")
            raise TypeError(f"model_output: expected the pair (C, eps) of tensors (the two heads), got {got}")
        if eta != 0 and self.config.sampler != "eta":
            raise ValueError(f"eta: only the 'eta' sampler takes it, this scheduler's is {self.config.sampler!r} "
                             f"(got eta={eta})")
        i = self._call_index(timestep)
        kind, row, has_second = self._calls[i]
        e, e_uncond, x = self._inputs(list(model_output), sample, guidance_scale)
        plan = self._plans_for(float(eta) if self.config.sampler == "eta" else 0.0,
                               None if guidance_scale is None else float(guidance_scale))[kind]
        n_e = max(plan.terms.n_e, 1)
        if len(e) > n_e:  # the plan gives the eps head no weight in any row (EDM preconditioning, a step into t = 0):
            e, e_uncond = e[:n_e], None if e_uncond is None else e_uncond[:n_e]  # it reads C only
        noise, seeds = self._noise(plan.noise_rows[row], x, x.dtype, generator, None, seeds)
        m = [self._x_start] if kind == "second" else None
        prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=plan, row=row, m=m, noise=noise, seeds=seeds)
        self._x_start = x if has_second else None  # Heun's second call reads the step's start (by reference)
        self._next = i + 1
        if not return_dict:
            return prev, x0
        return output(DDMSchedulerOutput, prev, x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = (1 - t)*x0 + sqrt(t)*noise: t a float in [0, 1] or one per sample; one fused pass."""
        return training.add_noise(original_samples, timesteps, noise, backend=self.backend)
