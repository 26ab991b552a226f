"""``FastEulerAncestralDiscreteScheduler``: diffusers' ``EulerAncestralDiscreteScheduler``, fused; what the
Euler family shares is in ``sigma_space.py``."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import output
from fastdiff.integrations.diffusers.sigma_space import (
    INT_DTYPES,
    NOT_SCALED,
    SigmaSpaceMixin,
    check_choice,
    check_int_timestep,
    sigmas_at,
    spaced_timesteps,
    train_betas,
    train_sigmas,
)
from fastdiff.samplers.euler import ancestral_sigmas, euler_ancestral_step

logger = logging.get_logger("diffusers.schedulers." + __name__)  # diffusers' verbosity applies

class FastEulerAncestralDiscreteScheduler(SigmaSpaceMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``EulerAncestralDiscreteScheduler`` (same arguments and defaults,
    attributes and outputs). Beyond it: ``step(..., seeds=)`` / ``set_seeds`` for in-kernel noise,
    ``guidance_scale=`` for fused classifier-free guidance, ``backend`` to pick the kernels. sigma_down is
    computed in float64 (sigma_to^2/sigma_from), where diffusers' float32 difference cancels on a step from a
    large sigma (the first step from squaredcos_cap_v2's sigma_max ~ 2e4: NaN images there)."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if prediction_type == "sample":  # diffusers constructs it, then refuses every step
            raise ValueError("prediction_type: EulerAncestralDiscreteScheduler has no 'sample' prediction "
                             "(diffusers: NotImplementedError); expected 'epsilon' or 'v_prediction'")
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self.betas = train_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.num_inference_steps = None
        timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                 dtype=float)[::-1].copy())
        self._grid, self._grid_dtype = timesteps.tolist(), timesteps.dtype
        self.timesteps = timesteps
        self.sigmas = torch.from_numpy(sigmas)
        self._init_sigma_space()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device = None):
        """diffusers' grid: spaced timesteps, sigmas interpolated linearly, a final sigma of 0."""
        cfg = self.config
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = n = num_inference_steps

        def grid():
            timesteps = spaced_timesteps(n, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset)
            sigmas = sigmas_at(timesteps, train_sigmas(self.alphas_cumprod))
            return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), torch.from_numpy(timesteps)

        self._set_run(*self._schedule((n,), grid), device)

    def _build(self, guidance) -> tuple:
        """Ancestral rows from the run's float32 sigmas, in float64 as every plan coefficient
        (``ancestral_sigmas``, whose sigma_down does not cancel where diffusers' float32 difference does)."""
        f, t = (a.double().numpy() for a in (self._s32[:-1], self._s32[1:]))
        sigma_down, sigma_up = ancestral_sigmas(f, t)
        return (euler_ancestral_step(f, sigma_down, sigma_up, prediction_type=self.config.prediction_type,
                                     guidance=guidance),)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """One ancestral step: Euler down to sigma_down, then noise of std sigma_up (drawn every step, as
        diffusers draws it, also the last where sigma_up = 0); see EulerAncestralDiscreteScheduler.step.
        fastdiff's own: ``seeds`` (in-kernel noise at noise step = the step index), ``guidance_scale``."""
        if type(timestep) is not torch.Tensor or timestep.dtype in INT_DTYPES:
            check_int_timestep(timestep)
        if not self.is_scale_input_called and not torch.compiler.is_compiling():
            logger.warning(NOT_SCALED)
        self._check_sigmas()
        i = self._stepper.index if self._started else self._start(timestep)
        if i >= self._rows:
            raise self._past_end(i)
        e, x, e_uncond, model_output = self._inputs(model_output, sample, guidance_scale)
        plans = self._run.get(guidance_scale, None) or self._plans_for(guidance_scale)
        noise, seeds = self._noise(True, model_output, x.dtype, generator, None, seeds)
        prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], noise=noise, seeds=seeds)
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)
        if not return_dict:
            return prev, x0
        return output(EulerAncestralDiscreteSchedulerOutput, prev, x0)
