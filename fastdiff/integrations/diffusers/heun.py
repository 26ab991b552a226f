"""``FastHeunDiscreteScheduler``: diffusers' ``HeunDiscreteScheduler`` (Karras et al. 2022, Algorithm 1: two
model calls a step), fused; what the Euler family shares is in ``sigma_space.py``."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import output
from fastdiff.integrations.diffusers.sigma_space import (
    SigmaSpaceMixin,
    check_choice,
    check_sigma_kinds,
    convert_sigmas,
    sigma_kind,
    sigmas_at,
    spaced_timesteps,
    train_betas,
    train_sigmas,
)
from fastdiff.samplers.euler import heun_first, heun_second


class FastHeunDiscreteScheduler(SigmaSpaceMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``HeunDiscreteScheduler`` (same arguments and defaults, attributes and
    outputs): two model calls per step, alternating as diffusers' ``state_in_first_order`` says. The second
    call's kernel reads the first's x0 and start sample (kept by reference, as diffusers keeps them), so
    nothing is recomputed or copied. Beyond diffusers: ``guidance_scale=`` (fused guidance), ``backend``;
    ``seeds`` is accepted for uniformity (Heun draws no noise)."""

    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,  # sensible defaults
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        check_sigma_kinds(self.config)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice("timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self.betas = train_betas(self.config, (*schedules.BETA_SCHEDULES, "exp"))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._heun_state = None
        self._init_sigma_space()
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next call is a step's first (diffusers' dt is None)."""
        return self._heun_state is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None,
                      num_train_timesteps: int | None = None, timesteps: list[int] | None = None):
        """diffusers' grid: spaced (or given) timesteps, sigmas interpolated or converted (karras /
        exponential / beta), a final 0; every sigma but the first and last twice, every timestep but the
        first twice (one entry per model call)."""
        cfg = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        kind = sigma_kind(cfg)
        if timesteps is not None and kind is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{kind}_sigmas = True`.")
        n = num_inference_steps or len(timesteps)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {n!r}")
        self.num_inference_steps = n
        T = num_train_timesteps or cfg.num_train_timesteps
        custom = None if timesteps is None else tuple(np.asarray(timesteps, np.float64).tolist())

        def grid():
            ts = spaced_timesteps(n, T, cfg.timestep_spacing, cfg.steps_offset) if timesteps is None else \
                np.array(timesteps, dtype=np.float32)
            train = train_sigmas(self.alphas_cumprod)
            sigmas = sigmas_at(ts, train)
            if kind is not None:
                sigmas = convert_sigmas(kind, sigmas, n)
                ts = schedules.sigma_to_t(sigmas, np.log(train))
            sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
            sig = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
            ts = torch.from_numpy(ts)
            return sig, torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(dtype=torch.float32)

        self._heun_state = None
        self._set_run(*self._schedule((n, T, custom), grid), device)

    def _build(self, guidance) -> tuple:
        """(first, second) rows by step index j: the first call steps sigmas[j] -> sigmas[j+1], the second
        (x at sigmas[j]) completes sigmas[j-1] -> sigmas[j] (its row 0 is never a second call: a copy of 1's, or
        for a one-step run, whose sigmas[1] is 0, a step sigmas[0] -> sigmas[0])."""
        s = self._s32.double().numpy()
        j = np.arange(len(s) - 1)
        prev = np.maximum(j - 1, 0)
        cur = np.where(j > 0, j, 1 if s[1] > 0 else 0)
        kw = dict(prediction_type=self.config.prediction_type, guidance=guidance,
                  clip=self.config.clip_sample_range if self.config.clip_sample else None)
        return heun_first(s[j], s[j + 1], **kw), heun_second(s[prev], s[cur], **kw)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> HeunDiscreteSchedulerOutput | tuple:
        """Heun's first call (an Euler step to the next sigma) or second (the trapezoidal correction from
        the step's start), alternating; see HeunDiscreteScheduler.step. ``guidance_scale``: fused guidance
        (``model_output`` holds [uncond; cond]); ``seeds``: accepted, unused (no noise)."""
        self._check_sigmas()
        i = self._stepper.index if self._started else self._start(timestep)
        if i >= self._rows:
            raise self._past_end(i)
        e, x, e_uncond, _ = self._inputs(model_output, sample, guidance_scale)
        first, second = self._run.get(guidance_scale, None) or self._plans_for(guidance_scale)
        state = self._heun_state
        if state is None:
            prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=first)
            self._heun_state = (x0, x)  # m0, m1 of the second call: by reference, as diffusers keeps them
        else:
            prev, x0 = self._stepper.step(x, e, e_uncond=e_uncond, plan=second, m=state)
            self._heun_state = None
        if not return_dict:
            return prev, x0
        return output(HeunDiscreteSchedulerOutput, prev, x0)
