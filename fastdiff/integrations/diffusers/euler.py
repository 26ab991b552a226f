"""``FastEulerDiscreteScheduler``: diffusers' ``EulerDiscreteScheduler`` (Karras et al. 2022, Algorithm 2 with
churn), fused; what the Euler family shares is in ``sigma_space.py``."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
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
    check_sigma_kinds,
    convert_sigmas,
    int_timestep_error,
    sigma_kind,
    sigmas_at,
    spaced_timesteps,
    train_betas,
    train_sigmas,
)
from fastdiff.samplers.euler import euler_step
from fastdiff.samplers.forward import velocity_plan

logger = logging.get_logger("diffusers.schedulers." + __name__)  # diffusers' verbosity applies

class FastEulerDiscreteScheduler(SigmaSpaceMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``EulerDiscreteScheduler`` (same arguments and defaults, attributes and
    outputs). Beyond it: ``step(..., seeds=)`` / ``set_seeds`` for in-kernel churn noise,
    ``guidance_scale=`` for fused classifier-free guidance, ``backend`` to pick the kernels."""

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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        check_sigma_kinds(self.config)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_spacing", timestep_spacing, schedules.SPACINGS)
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, schedules.FINAL_SIGMAS)
        self.betas = train_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # as diffusers: close to 0, so that the first sigma is finite
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                 dtype=float)[::-1].copy()).to(torch.float32)
        if self._continuous_v:
            timesteps = self._continuous_timesteps(sigmas)
        self.num_inference_steps = None
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._grid, self._grid_dtype = timesteps.tolist(), timesteps.dtype
        self.timesteps = timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._init_sigma_space()

    @property
    def _continuous_v(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
        """EDM's c_noise = log(sigma)/4, one 0-d op per sigma as diffusers computes it."""
        return torch.Tensor([0.25 * sigma.log() for sigma in sigmas])

    def set_timesteps(self, num_inference_steps: int = None, device: str | torch.device = None,
                      timesteps: list[int] | None = None, sigmas: list[float] | None = None):
        """diffusers' grid: spaced (or given) timesteps, sigmas interpolated (linear or log-linear), or
        converted (karras / exponential / beta), a final sigma (0 or sigma_min); or given sigmas."""
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        kind = sigma_kind(cfg)
        if timesteps is not None and kind is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{kind}_sigmas = True`.")
        if timesteps is not None and self._continuous_v:
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < (0 if sigmas is not None else 1):  # one given sigma: a run of no step
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = n = num_inference_steps
        args = (n, None if timesteps is None else tuple(np.asarray(timesteps, np.float64).tolist()),
                None if sigmas is None else tuple(np.asarray(sigmas, np.float64).tolist()))
        self._set_run(*self._schedule(args, lambda: self._grid_of(n, timesteps, sigmas)), device)

    def _grid_of(self, n: int, timesteps, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [N+1] float32, timesteps [N]) of set_timesteps' arguments, as diffusers computes them."""
        cfg, kind = self.config, sigma_kind(self.config)
        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = schedules.sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            timesteps = spaced_timesteps(n, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset) \
                if timesteps is None else np.array(timesteps).astype(np.float32)
            if cfg.interpolation_type == "linear":
                sigmas = sigmas_at(timesteps, train)
            else:  # log_linear: N + 1 sigmas from the largest to the smallest, in float32 torch
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), n + 1).exp().numpy()
            if kind is not None:
                sigmas = convert_sigmas(kind, sigmas, n, cfg.sigma_min, cfg.sigma_max)
                timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
            last = 0.0 if cfg.final_sigmas_type == "zero" else \
                float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        sig = torch.from_numpy(sigmas).to(dtype=torch.float32)
        ts = self._continuous_timesteps(sig[:-1]) if self._continuous_v else \
            torch.from_numpy(timesteps.astype(np.float32))
        return sig, ts

    def _build(self, guidance, churn=None):
        """Euler rows over the sigmas, with churn (s_churn, s_tmin, s_tmax, s_noise) lifting the rows whose
        sigma is in [s_tmin, s_tmax] (diffusers' placement: inside the step). Returns (plan,) or, with
        churn, (plan, which rows draw noise)."""
        s = self._s32
        sigma, sigma_next = s[:-1], s[1:]
        sigma_hat, lift, draws = sigma, 0.0, None
        if churn is not None:
            s_churn, s_tmin, s_tmax, s_noise = churn
            gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1)
            draws = ((s_tmin <= sigma) & (sigma <= s_tmax)).numpy() & (gamma > 0)
            sigma_hat = torch.where(torch.from_numpy(draws), sigma * (gamma + 1), sigma)  # float32, as diffusers
            lift = s_noise * np.sqrt(sigma_hat.double().numpy() ** 2 - sigma.double().numpy() ** 2)
        pt = "sample" if self.config.prediction_type == "original_sample" else self.config.prediction_type
        x0_sigma = sigma if pt == "v_prediction" else sigma_hat  # diffusers reads v at the un-churned sigma
        plan = euler_step(sigma.double().numpy(), sigma_hat.double().numpy(), sigma_next.double().numpy(), lift=lift,
                          x0_sigma=x0_sigma.double().numpy(), prediction_type=pt, guidance=guidance)
        return (plan,) if churn is None else (plan, draws.tolist())

    def _churn_plan(self, churn: tuple, guidance) -> tuple:
        # the floats keyed as hex strings: torch.compile cannot write a guard on a key holding inf (s_tmax)
        key = ("euler churn", self._key, tuple(v.hex() for v in churn), guidance)
        return self._plan(key, lambda: self._build(guidance, churn))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> EulerDiscreteSchedulerOutput | tuple:
        """One Euler step from this step's sigma to the next (with churn when s_churn > 0); see
        EulerDiscreteScheduler.step. fastdiff's own: ``seeds`` (in-kernel churn noise at noise step = the
        step index), ``guidance_scale`` (``model_output`` holds [uncond; cond], 2B rows)."""
        if type(timestep) is not torch.Tensor or timestep.dtype in INT_DTYPES:
            check_int_timestep(timestep)
        if not self.is_scale_input_called and not torch.compiler.is_compiling():
            logger.warning(NOT_SCALED)
        self._check_sigmas()
        i = self._stepper.index if self._started else self._start(timestep)
        if i >= self._rows:
            raise self._past_end(i)
        e, x, e_uncond, model_output = self._inputs(model_output, sample, guidance_scale)
        plan, noise = None, None
        if s_churn > 0:
            churned, draws = self._churn_plan((float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)),
                                              guidance_scale)
            if draws[i]:  # diffusers draws only where gamma > 0
                plan = churned
                noise, seeds = self._noise(True, model_output, x.dtype, generator, None, seeds)
        if plan is None:
            plan, seeds = (self._run.get(guidance_scale, None) or self._plans_for(guidance_scale))[0], None
        prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=plan, noise=noise, seeds=seeds)
        if prev.dtype != model_output.dtype:
            prev = prev.to(model_output.dtype)  # diffusers casts the sample back to the model's dtype
        if not return_dict:
            return prev, x0
        return output(EulerDiscreteSchedulerOutput, prev, x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' EulerDiscreteScheduler.get_velocity: sqrt(abar[i])*noise - sqrt(1 - abar[i])*sample, with
        i each timestep's place in the run's timesteps (used as a training-timestep index, as diffusers does)."""
        if isinstance(timesteps, (int, torch.IntTensor, torch.LongTensor)):
            raise int_timestep_error("EulerDiscreteScheduler.get_velocity()")
        self._check_fresh()
        begin = self._begin_index
        self._begin_index = None  # diffusers looks every timestep up here, whatever begin_index says
        try:
            row, rows = self._indices(timesteps, sample.device)
        finally:
            self._begin_index = begin
        alpha, sigma = np.sqrt(self._abar), np.sqrt(1.0 - self._abar)
        plan = self._plan(("velocity",), lambda: velocity_plan(alpha, sigma))
        dtype = torch.promote_types(sample.dtype, noise.dtype)
        (out,) = self._stepper.step(sample.to(dtype), noise=noise.to(dtype), plan=plan, row=row, rows=rows,
                                    advance=False)
        return out
