"""``FastDDIMScheduler``: diffusers' ``DDIMScheduler`` (DDIM, Song et al. 2021; eta = 1 is DDPM) with one
fused kernel per step. The plan is ``fastdiff.samplers.ddim``'s, one row per training timestep (diffusers'
DDIM steps from any timestep t to t - T//N, per sample too), so a device timestep selects its row on
the device."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import FastSchedulerMixin, output, watched
from fastdiff.samplers.ddim import PREDICTION_TYPES, ddim_plan, ddim_x0
from fastdiff.samplers.predictions import check_prediction_type


class FastDDIMScheduler(FastSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``DDIMScheduler``: the same arguments and defaults (diffusers 0.42),
    attributes and outputs. Beyond it: ``step(..., seeds=)`` and ``set_seeds`` for in-kernel noise,
    ``set_begin_index`` for the noise counter, ``backend`` to pick the kernels. Where float32
    rounding makes diffusers' direction weight sqrt(1 - abar_prev - sigma^2) the square root of a negative
    number (NaN images; eta = 1 on a step from abar_t ~ 0, e.g. squaredcos_cap_v2 with trailing spacing), the
    weight is computed in float64 as every plan coefficient is: its true, small positive value."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    _tensor_sources = ("alphas_cumprod", "final_alpha_cumprod")
    final_alpha_cumprod = watched("final_alpha_cumprod")
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        check_prediction_type(prediction_type, PREDICTION_TYPES)
        if timestep_spacing not in schedules.SPACINGS:  # diffusers finds out only in set_timesteps
            raise ValueError(f"timestep_spacing: expected one of {schedules.SPACINGS}, got {timestep_spacing!r}")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected num_train_timesteps={num_train_timesteps} values, got "
                             f"{len(trained_betas)}")
        betas = schedules.betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        abar = schedules.alphas_cumprod(betas)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(abar).float()
        self.final_alpha_cumprod = torch.tensor(1.0 if set_alpha_to_one else float(abar[0]))
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self._init_fast()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        T = self.config.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps: {num_inference_steps} cannot be larger than "
                             f"num_train_timesteps ({T})")
        ts = schedules.timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._restart(ts)

    def _prepare(self) -> None:
        """The eta = 0 plans of this run, on the run's device (other etas are built on first use)."""
        if self.num_inference_steps is not None:
            for plan in self._step_plans(0.0, False):
                plan.coef(getattr(self, "_device", torch.device("cpu")))

    def _step_plans(self, eta: float, use_clipped: bool, guidance=None) -> tuple:
        """The plans of one step: (update,), or (x0, update from m0) with dynamic thresholding. One row per
        training timestep t (t -> t - T//N) and a last one for timestep -1 (abar[-1] -> the chain's end)."""
        cfg, N = self.config, self.num_inference_steps
        if not cfg.thresholding:
            return (self._plan(("ddim", N, eta, use_clipped, guidance),
                               lambda: self._ddim(N, eta, use_clipped, False, guidance)),)
        t = np.append(np.arange(cfg.num_train_timesteps), cfg.num_train_timesteps - 1)  # [0, ..., T-1, T-1]
        return (self._plan(("ddim x0", guidance), lambda: ddim_x0(self._abar[t], prediction_type=cfg.prediction_type,
                                                                  guidance=guidance, row_label="timestep")),
                self._plan(("ddim from m0", N, eta, use_clipped),
                           lambda: self._ddim(N, eta, use_clipped, True, None)))

    def _ddim(self, N: int, eta: float, use_clipped: bool, x0_given: bool, guidance):
        cfg, T = self.config, self.config.num_train_timesteps
        t = np.arange(T)
        return ddim_plan(self._abar, np.append(t, T - 1), np.append(t - T // N, -1),
                         final_alpha_cumprod=float(self.final_alpha_cumprod), eta=eta, clip_sample=cfg.clip_sample,
                         clip_sample_range=cfg.clip_sample_range, prediction_type=cfg.prediction_type,
                         use_clipped_model_output=use_clipped, x0_given=x0_given, guidance=guidance,
                         row_label="timestep")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM step from ``timestep`` to ``timestep - T // num_inference_steps``; see DDIMScheduler.
        fastdiff's own arguments: ``seeds`` (in-kernel noise), ``guidance_scale`` (fused classifier-free
        guidance: ``model_output`` holds ``[uncond; cond]``, 2B rows)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        self._check_fresh()
        model_output, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        dtype, e, x = sample.dtype, model_output, sample
        if model_output.dtype != dtype:  # diffusers computes in the promoted dtype
            dtype = torch.promote_types(model_output.dtype, dtype)
            e, x = model_output.to(dtype), sample.to(dtype)
            e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        row, rows = self._timestep_row(timestep, x.device)
        noise, seeds = self._noise(eta > 0, model_output, dtype, generator, variance_noise, seeds) if eta else \
            (None, None)
        key, last = (self.num_inference_steps, eta, use_clipped_model_output, guidance_scale), self._last_plans
        plans = last[1] if last is not None and last[0] == key else self._cached_plans(
            key, self._step_plans, float(eta), bool(use_clipped_model_output),
            None if guidance_scale is None else float(guidance_scale))
        if len(plans) == 1:
            prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], row=row, rows=rows, noise=noise,
                                          seeds=seeds)
        else:  # the per-sample quantile splits the step: x0, threshold it, then the update from it
            (x0,) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], row=row, rows=rows, advance=False)
            x0 = self._threshold(x0)
            if e_uncond is not None:  # the update reads eps, which guidance mixes: mix it once, outside
                e, e_uncond = e_uncond[0] + guidance_scale * (e - e_uncond[0]), None
            (prev,) = self._stepper.step(x, e, plan=plans[1], row=row, rows=rows, m=[x0], noise=noise, seeds=seeds)
        if not return_dict:
            return prev, x0
        return output(DDIMSchedulerOutput, prev, x0)
