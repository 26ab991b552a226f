"""``FastDDPMScheduler``: diffusers' ``DDPMScheduler`` (Ho et al. 2020) with one fused kernel per step. The
plan is ``fastdiff.samplers.ddpm``'s, one row per training timestep (t -> the next timestep of the run, or
t - 1 before ``set_timesteps``, as diffusers' ``previous_timestep``), so a device timestep selects its row on
the device. Learned variances ("learned", "learned_range": the model output has 2C channels, the second
half a per-element variance) take one small extra op: the gathered variance row ``-s^2`` of each sample
(``fastdiff.samplers.ddpm``), which the kernel turns into the noise scale s next to its in-kernel or given
noise - so seeds keep drawing in the kernel and no noise tensor is scaled on its own."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import FastSchedulerMixin, output
from fastdiff.samplers.ddim import ddim_x0
from fastdiff.samplers.ddpm import LEARNED, PREDICTION_TYPES, check_variance_type, ddpm_plan, learned_range_bounds
from fastdiff.samplers.predictions import check_prediction_type

BETA_SCHEDULES = (*schedules.BETA_SCHEDULES, "sigmoid", "laplace")


def _laplace_alpha_bar(t: float) -> float:
    """abar(t) of the "laplace" schedule: log-SNR -0.5*sign(0.5 - t)*log(1 - 2|0.5 - t| + 1e-6)."""
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def train_betas(T, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr) -> np.ndarray:
    """diffusers' DDPM betas (float64 holding float32 values): ``fastdiff.schedules.betas`` and the two
    schedules only DDPM has, "sigmoid" (sigmoid(linspace(-6, 6, T)) between beta_start and beta_end) and
    "laplace" (from its abar, capped at 0.999). (These two belong in ``fastdiff.schedules``.)"""
    if trained_betas is None and beta_schedule == "sigmoid":
        trained_betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    elif trained_betas is None and beta_schedule == "laplace":
        trained_betas = torch.tensor([min(1 - _laplace_alpha_bar((i + 1) / T) / _laplace_alpha_bar(i / T), 0.999)
                                      for i in range(T)], dtype=torch.float32)
    elif trained_betas is None and beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if isinstance(trained_betas, torch.Tensor):
        trained_betas = trained_betas.double().numpy()
    return schedules.betas(T, beta_start, beta_end, beta_schedule if beta_schedule in schedules.BETA_SCHEDULES
                           else "linear", trained_betas, rescale_betas_zero_snr)


class _Bounds:
    """learned_range's rows -s^2 = c*exp(b*v) with c = -exp(a) (s^2 = exp(a + b*v), ``learned_range_bounds``):
    (c, b) per row, float64 on the host, float32 [rows, 2] per device."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.c, self.b, self._device = -np.exp(a), b, {}

    def on(self, device: torch.device) -> torch.Tensor:
        t = self._device.get(device)
        if t is None:
            t = self._device[device] = torch.from_numpy(np.stack([self.c, self.b], 1)).to(device, torch.float32)
        return t


class FastDDPMScheduler(FastSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``DDPMScheduler``: the same arguments and defaults (diffusers 0.42),
    attributes and outputs. Beyond it: ``step(..., seeds=)`` and ``set_seeds`` for in-kernel noise,
    ``guidance_scale`` for fused classifier-free guidance, ``backend`` to pick the kernels.
    ``variance_type="fixed_large_log"`` is refused: diffusers' step gives NaN with it at every t > 0."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @property
    def variance_type(self) -> str:
        """diffusers' public ``variance_type`` (the config's). Assigning another one is refused: diffusers'
        step would read the assigned one for the form of its noise scale and the configured one for its
        value (``_get_variance``), a mix no variance type defines."""
        return self.__dict__["variance_type"]

    @variance_type.setter
    def variance_type(self, value: str) -> None:
        if "variance_type" in self.__dict__ and value != self.config.variance_type:
            raise ValueError(f"variance_type: cannot assign {value!r} to a scheduler configured with "
                             f"{self.config.variance_type!r} (diffusers would mix the two); create one with "
                             f"from_config(scheduler.config, variance_type={value!r})")
        self.__dict__["variance_type"] = value

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_prediction_type(prediction_type, PREDICTION_TYPES)
        check_variance_type(variance_type)
        if timestep_spacing not in schedules.SPACINGS:  # diffusers finds out only in set_timesteps
            raise ValueError(f"timestep_spacing: expected one of {schedules.SPACINGS}, got {timestep_spacing!r}")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected num_train_timesteps={num_train_timesteps} values, got "
                             f"{len(trained_betas)}")
        betas = train_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                            rescale_betas_zero_snr)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(schedules.alphas_cumprod(betas)).float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self.variance_type = variance_type
        self._grid = self._grid_key = None
        self._components: dict = {}
        self._init_fast()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None):
        """The run's timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``, or custom descending
        ``timesteps``; each step then goes to the next of them, as in diffusers."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.int64)
            if ts.ndim != 1 or not len(ts) or np.any(ts[1:] >= ts[:-1]):
                raise ValueError(f"timesteps: expected a non-empty descending list (`custom_timesteps` must be in "
                                 f"descending order), got {list(timesteps)}"[:300])
            if ts[0] >= T or ts[-1] < -1:
                raise ValueError(f"timesteps: expected values in [-1, {T}) (`timesteps` must start before "
                                 f"`self.config.train_timesteps`: {T}), got {ts[0]}..{ts[-1]}")
            self.custom_timesteps = True
        elif num_inference_steps is None:
            raise ValueError("num_inference_steps: pass num_inference_steps or timesteps")
        else:
            if num_inference_steps > T:
                raise ValueError(f"num_inference_steps: {num_inference_steps} cannot be larger than "
                                 f"num_train_timesteps ({T})")
            ts = schedules.timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(ts).to(device)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._grid_key = tuple(int(t) for t in ts)
        self._grid = frozenset(self._grid_key)
        self._restart(ts)

    def previous_timestep(self, timestep: int) -> int | torch.Tensor:
        """The timestep a step from `timestep` goes to: the next of the run's timesteps (-1 after the last),
        or ``timestep - 1`` before ``set_timesteps``, as diffusers'."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        grid = list(self._grid_key or ())
        i = grid.index(int(timestep)) if int(timestep) in grid else None
        if i is None:
            raise ValueError(f"timestep: {int(timestep)} is not one of the run's timesteps")
        return torch.tensor(-1) if i == len(grid) - 1 else self.timesteps[i + 1]

    # ---------------------------------------------------------------------------------------- plans
    def _prepare(self) -> None:
        """The plans of this run (with and without noise), on the run's device."""
        device, grid = getattr(self, "_device", torch.device("cpu")), self._mode_key()
        for draws in (True, False):
            for plan in self._step_plans(grid, draws, None):
                plan.coef(device)
        if self.variance_type == "learned_range":
            self._plan(("learned_range", grid), lambda: self._learned_range(grid)).on(device)

    def _mode_key(self):
        """What the rows' previous timesteps come from: the run's grid, or t - 1 (None), as diffusers'
        previous_timestep decides at each step."""
        return self._grid_key if self.custom_timesteps or self.num_inference_steps else None

    def _step_plans(self, grid, draws: bool, guidance) -> tuple:
        """(update,), or (x0, update from m0) with dynamic thresholding. Row t (0..T-1, and a last one for
        timestep -1) steps t -> prev(t); `draws`: whether the rows with t > 0 add noise."""
        cfg, vt = self.config, self.variance_type
        if not cfg.thresholding:
            return (self._plan(("ddpm", grid, draws, vt, guidance), lambda: self._ddpm(grid, draws, False, guidance)),)
        t = np.append(np.arange(self._T), self._T - 1)  # row T is timestep -1: abar[-1], as diffusers indexes it
        return (self._plan(("ddpm x0", guidance), lambda: ddim_x0(self._abar[t], prediction_type=cfg.prediction_type,
                                                                  guidance=guidance, row_label="timestep")),
                self._plan(("ddpm from m0", grid, draws, vt), lambda: self._ddpm(grid, draws, True, None)))

    def _rows(self, grid) -> tuple[np.ndarray, np.ndarray]:
        """(t, prev) per row: t = 0..T-1 and -1 (the last row); prev from the run's grid, else t - 1."""
        T = self._T
        t = np.append(np.arange(T), -1)
        prev = t - 1                                       # diffusers' rule before set_timesteps
        if grid is not None:
            g = np.asarray(grid, np.int64)
            prev[np.where(g >= 0, g, T)] = np.append(g[1:], -1)
        return t, prev

    def _ddpm(self, grid, draws: bool, x0_given: bool, guidance):
        cfg = self.config
        t, prev = self._rows(grid)
        return ddpm_plan(self._abar, t, prev, noise=(t > 0) & draws, clip_sample=cfg.clip_sample,
                         clip_sample_range=cfg.clip_sample_range, variance_type=self.variance_type,
                         prediction_type=cfg.prediction_type, x0_given=x0_given, guidance=guidance)

    def _learned_range(self, grid) -> _Bounds:
        t, prev = self._rows(grid)
        abar_prev = np.where(prev >= 0, self._abar[np.clip(prev, 0, None)], 1.0)
        return _Bounds(*learned_range_bounds(self._abar[t], abar_prev))

    # ----------------------------------------------------------------------------------------- step
    def _first_index(self, host_t: int | None) -> int:
        """The step index (the seeds' noise counter): begin_index, else the place of a host timestep in the
        run's timesteps at the first step (0 for a device one), then counted on."""
        if not self._started:
            self._started = True
            if host_t is not None and self._grid_key is not None and host_t in self._grid:
                self._stepper.reset(self._grid_key.index(host_t))
        return self._stepper.index

    def _variance_rows(self, v, g_v, guidance_scale, row, rows, B):
        """The learned variance as the gathered rows ``-s^2`` ([B, D] float32; the kernel's noise scale is
        sqrt(VAR - row) = s) and the components selecting them: the one small op of learned variances."""
        if g_v is not None:  # guided as the rest of the output: uncond + g*(cond - uncond)
            v = torch.lerp(g_v, v, guidance_scale)
        v = v.reshape(B, -1).to(torch.float32)
        if self.variance_type == "learned":
            table = v.neg().masked_fill_(v < 0, float("nan"))      # s^2 = v; NaN as diffusers' sqrt(v < 0)
        else:                                                       # s^2 = exp(a + b*v) = -c*exp(b*v)
            grid = self._mode_key()
            bounds = self._plan(("learned_range", grid), lambda: self._learned_range(grid))
            if rows is None:
                c, b = float(bounds.c[row]), float(bounds.b[row])
            else:
                cb = bounds.on(v.device)
                c, b = cb[rows, 0:1], cb[rows, 1:2]
            table = (v * b).exp_()
            table = table * c if table.requires_grad else table.mul_(c)  # exp's output is kept for autograd
        key = (B, v.device)
        component = self._components.get(key)
        if component is None:
            component = self._components[key] = torch.arange(B, device=v.device)
        return table, component

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> DDPMSchedulerOutput | tuple:
        """One DDPM step from ``timestep`` to the previous timestep of the run; see DDPMScheduler.
        fastdiff's own arguments: ``seeds`` (in-kernel noise), ``guidance_scale`` (fused classifier-free
        guidance: ``model_output`` holds ``[uncond; cond]``, 2B rows)."""
        self._check_fresh()
        v = g_v = None
        if self.variance_type in LEARNED:
            C = sample.shape[1]
            if model_output.dim() < 2 or model_output.shape[1] != 2 * C:
                raise ValueError(f"model_output: variance_type {self.variance_type!r} expects 2*{C} channels (the "
                                 f"prediction, then the variance), got shape {tuple(model_output.shape)}")
            model_output, v = model_output[:, :C], model_output[:, C:]
            if guidance_scale is not None and v.shape[0] == 2 * sample.shape[0]:
                B = sample.shape[0]
                v, g_v = v[B:], v[:B]
        model_output, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        dtype, e, x = sample.dtype, model_output, sample
        if model_output.dtype != dtype:  # diffusers computes in the promoted dtype
            dtype = torch.promote_types(model_output.dtype, dtype)
            e, x = model_output.to(dtype), sample.to(dtype)
            e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        row, rows = self._timestep_row(timestep, x.device)
        grid = self._grid if self.custom_timesteps or self.num_inference_steps else None
        if rows is None and grid is not None and row not in grid:
            raise ValueError(f"timestep: {row} is not one of this run's timesteps (set_timesteps): "
                             f"{list(self._grid_key)}"[:300])
        index = self._first_index(row if rows is None else None)
        if rows is None:
            draws = row > 0                                   # diffusers draws noise for t > 0 only
        else:                                                 # a device timestep: the run's timestep at this index
            host = self._grid_key
            draws = host is None or index >= len(host) or host[index] > 0
        noise, seeds = self._noise(draws, model_output, dtype, generator, None, seeds)
        key, last = (self._mode_key(), draws, guidance_scale), self._last_plans
        plans = last[1] if last is not None and last[0] == key else self._cached_plans(
            key, self._step_plans, key[0], draws, None if guidance_scale is None else float(guidance_scale))
        tables = {}
        if draws and v is not None:
            tables["var_table"], tables["component"] = self._variance_rows(v, g_v, guidance_scale, row, rows,
                                                                           x.shape[0])
        if len(plans) == 1:
            prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], row=row, rows=rows, noise=noise,
                                          seeds=seeds, **tables)
        else:  # the per-sample quantile splits the step: x0, threshold it, then the update from it
            (x0,) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], row=row, rows=rows, advance=False)
            x0 = self._threshold(x0)
            (prev,) = self._stepper.step(x, plan=plans[1], row=row, rows=rows, m=[x0], noise=noise, seeds=seeds,
                                         **tables)
        if not return_dict:
            return prev, x0
        return output(DDPMSchedulerOutput, prev, x0)
