"""``FastLCMScheduler``: diffusers' ``LCMScheduler`` (latent consistency models, Luo et al. 2023) with one fused
kernel per step. The plan is ``fastdiff.samplers.lcm``'s, one row per step of the run (diffusers' LCM steps
by step index: step i re-noises to timesteps[i+1]); the last step (index num_inference_steps - 1) adds no
noise, and its row says so."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import FastSchedulerMixin, output, watched
from fastdiff.samplers.ddim import ddim_x0
from fastdiff.samplers.lcm import PREDICTION_TYPES, lcm_plan
from fastdiff.samplers.predictions import check_prediction_type

logger = logging.get_logger("diffusers.schedulers." + __name__)  # diffusers' verbosity applies


class FastLCMScheduler(FastSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``LCMScheduler``: the same arguments and defaults (diffusers 0.42),
    attributes and outputs. Beyond it: ``step(..., seeds=)`` and ``set_seeds`` for in-kernel noise,
    ``guidance_scale`` for fused classifier-free guidance, ``backend`` to pick the kernels. Misuse that
    diffusers lets through is refused: a step past the end of the run, a host timestep other than
    ``timesteps[step_index]`` (diffusers would mix that timestep's scalings with the run's next timestep)."""

    _compatibles: list = []
    _tensor_sources = ("alphas_cumprod", "final_alpha_cumprod")
    final_alpha_cumprod = watched("final_alpha_cumprod")
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_prediction_type(prediction_type, PREDICTION_TYPES)
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected num_train_timesteps={num_train_timesteps} values, got "
                             f"{len(trained_betas)}")
        betas = schedules.betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        abar = schedules.alphas_cumprod(betas)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(abar).float()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.custom_timesteps = False
        self._grid_key = None
        self._init_fast()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      original_inference_steps: int | None = None, timesteps: list[int] | None = None,
                      strength: float = 1.0) -> None:
        """LCM's timesteps: ``num_inference_steps`` evenly picked from the ``original_inference_steps``
        distillation timesteps k*i - 1 (k = T // original steps, i <= original steps * strength), or custom
        descending ``timesteps`` (the last ``num_inference_steps * strength`` of them)."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        original = original_inference_steps if original_inference_steps is not None \
            else self.config.original_inference_steps
        if original > T:
            raise ValueError(f"original_inference_steps: {original} cannot be larger than num_train_timesteps ({T})")
        origin = np.arange(1, int(original * strength) + 1) * (T // original) - 1  # the distillation timesteps
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.int64)
            if ts.ndim != 1 or not len(ts) or np.any(ts[1:] >= ts[:-1]):
                raise ValueError(f"timesteps: expected a non-empty descending list (`custom_timesteps` must be in "
                                 f"descending order), got {list(timesteps)}"[:300])
            if ts[0] >= T:
                raise ValueError(f"timesteps: `timesteps` must start before `self.config.train_timesteps`: {T}, "
                                 f"got {ts[0]}")
            if strength == 1.0 and ts[0] != T - 1:
                logger.warning(f"The first custom timestep is {ts[0]}, not {T - 1}: results may be unexpected.")
            off = [int(t) for t in ts[1:] if t not in set(origin.tolist())]
            if off:
                logger.warning(f"Custom timesteps {off} are not on the distillation schedule: results may be "
                               f"unexpected.")
            if len(ts) > original:
                logger.warning(f"{len(ts)} custom timesteps exceed the {original} of the distillation schedule: "
                               f"results may be unexpected.")
            self.num_inference_steps = len(ts)
            self.custom_timesteps = True
            kept = min(int(len(ts) * strength), len(ts))
            ts = ts[max(len(ts) - kept, 0) * self.order:]
        else:
            if num_inference_steps > T:
                raise ValueError(f"num_inference_steps: {num_inference_steps} cannot be larger than "
                                 f"num_train_timesteps ({T})")
            if len(origin) // num_inference_steps < 1:
                raise ValueError(f"num_inference_steps: {num_inference_steps} is larger than original_inference_steps "
                                 f"x strength = {original} x {strength}; lower it or raise strength")
            if num_inference_steps > original:
                raise ValueError(f"num_inference_steps: {num_inference_steps} cannot be larger than "
                                 f"original_inference_steps ({original})")
            self.num_inference_steps = num_inference_steps
            picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            ts = origin[::-1][picks]
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.long)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._grid_key = tuple(int(t) for t in ts)
        self._restart(ts)

    # ---------------------------------------------------------------------------------------- plans
    def _prepare(self) -> None:
        """The plans of this run, on the run's device."""
        if self.num_inference_steps is not None:
            for plan in self._step_plans(self.num_inference_steps, None):
                plan.coef(getattr(self, "_device", torch.device("cpu")))

    def _step_plans(self, n: int, guidance) -> tuple:
        """(update,), or (x0, update from m0) with dynamic thresholding; one row per step of the run."""
        cfg, ts = self.config, self._host_timesteps
        key = (self._grid_key, n)
        if not cfg.thresholding:
            return (self._plan(("lcm", *key, guidance), lambda: self._lcm(n, False, guidance)),)
        return (self._plan(("lcm x0", *key, guidance), lambda: ddim_x0(
                    self._abar[np.asarray(ts)], prediction_type=cfg.prediction_type, guidance=guidance)),
                self._plan(("lcm from m0", *key), lambda: self._lcm(n, True, None)))

    def _lcm(self, n: int, x0_given: bool, guidance):
        cfg = self.config
        return lcm_plan(self._abar, self._host_timesteps, num_inference_steps=n,
                        final_alpha_cumprod=float(self.final_alpha_cumprod), clip_sample=cfg.clip_sample,
                        clip_sample_range=cfg.clip_sample_range, timestep_scaling=cfg.timestep_scaling,
                        prediction_type=cfg.prediction_type, x0_given=x0_given, guidance=guidance)

    # ----------------------------------------------------------------------------------------- step
    def _index(self, timestep) -> int:
        """diffusers' step index: at the first step begin_index, else the place of the timestep in the run
        (the second of two equal ones; a device timestep is not read: step 0), then counted on. A host
        timestep must be the run's timestep at that index."""
        grid = self._host_timesteps
        host = not torch.compiler.is_compiling() and (
            not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu")
        if host:
            if isinstance(timestep, torch.Tensor):
                if timestep.numel() != 1 or timestep.dtype.is_floating_point:
                    raise ValueError(f"timestep: expected one integer timestep, got {timestep!r}"[:200])
            elif isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
                raise TypeError(f"timestep: expected an int or an integer tensor, got {type(timestep).__name__}")
            t = int(timestep)
        if not self._started:
            self._started = True
            if host:
                where = [i for i, v in enumerate(grid) if v == t]
                if not where:
                    raise ValueError(f"timestep: {t} is not one of this run's timesteps {grid}"[:300])
                self._stepper.reset(where[1] if len(where) > 1 else where[0])
        i = self._stepper.index
        if i >= len(grid):
            raise ValueError(f"step: the run has {len(grid)} steps and all were taken (step index {i}); call "
                             f"set_timesteps for a new run")
        if host and t != grid[i]:
            raise ValueError(f"timestep: expected timesteps[{i}] = {grid[i]} (the step index's), got {t}")
        return i

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> LCMSchedulerOutput | tuple:
        """One multistep consistency step: the denoised f = c_skip*x + c_out*x0 and, but at the last step,
        f re-noised to the next timestep; see LCMScheduler. fastdiff's own arguments: ``seeds`` (in-kernel
        noise), ``guidance_scale`` (fused classifier-free guidance: ``model_output`` holds ``[uncond; cond]``)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        self._check_fresh()
        row = self._index(timestep)
        model_output, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        dtype, e, x = sample.dtype, model_output, sample
        if model_output.dtype != dtype:  # diffusers computes in the promoted dtype
            dtype = torch.promote_types(model_output.dtype, dtype)
            e, x = model_output.to(dtype), sample.to(dtype)
            e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        n = self.num_inference_steps
        noise, seeds = self._noise(row != n - 1, e, dtype, generator, None, seeds)
        key, last = (self._grid_key, n, guidance_scale), self._last_plans
        plans = last[1] if last is not None and last[0] == key else self._cached_plans(
            key, self._step_plans, n, None if guidance_scale is None else float(guidance_scale))
        if len(plans) == 1:
            prev, denoised = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], row=row, noise=noise,
                                                seeds=seeds)
        else:  # the per-sample quantile splits the step: x0, threshold it, then the update from it
            (x0,) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], row=row, advance=False)
            prev, denoised = self._stepper.step(x, plan=plans[1], row=row, m=[self._threshold(x0)], noise=noise,
                                                seeds=seeds)
        if not return_dict:
            return prev, denoised
        return output(LCMSchedulerOutput, prev, denoised)
