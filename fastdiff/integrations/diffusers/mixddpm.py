"""``MixDDPMScheduler``: ``FastDDPMScheduler`` with Mix-DDPM's mixture noise (Wang et al., ACM TOMM 2024;
``fastdiff.samplers.mixddpm``, docs/methods.md section 3).

- ``add_noise(x0, noise, timesteps, generator=None, seeds=None)``: x_t with the global per-sample offset m_n(t)
  from real per-step categorical draws (one ``[B, T]`` draw and a masked weighted sum, ``[B]`` float32), then
  one fused pass: the q_sample plan plus the kernel's ``offset[n]`` term;
- ``initial_sample(shape, generator=None, seeds=None)``: x_T of the strategy (``fastdiff.samplers.mixddpm.
  initial_sample`` gives it for any scheduler: ``original``/``removal_mu`` compose with every solver). A diffusers
  pipeline draws its own N(0, I) start: give it this one, ``pipe(..., latents=scheduler.initial_sample(...))``;
- ``step``: ``original``/``removal_mu`` are DDPM's steps; ``standard`` draws k_n ~ Cat(w) per sample and step
  and subtracts sqrt(beta_t/alpha_t)*mu_{k_n}/sqrt(D) in the same fused pass (the ``offset[n]`` term).

``MixDDIMScheduler``: the same on ``FastDDIMScheduler`` - ``standard`` on DDIM is **derived**
(``fastdiff.samplers.mixddpm``; its plan builder ``mixddpm_ddim_plan``).
The categorical draw of step t uses Philox step t (the timestep) with per-sample seeds, or ``torch.rand``
from the generator (before diffusers' noise draw of the same step).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from fastdiff import ops, philox
from fastdiff.integrations.diffusers.ddim import FastDDIMScheduler
from fastdiff.integrations.diffusers.ddpm import FastDDPMScheduler
from fastdiff.integrations.diffusers.tables import draw_step_components, use_table_stepper
from fastdiff.samplers import mixddpm as mix


class _OnDevice:
    """A float64 host array with one copy per device and dtype (plans' cache keeps it)."""

    def __init__(self, a: np.ndarray):
        self.a, self._device = a, {}

    def on(self, device, dtype=torch.float64) -> torch.Tensor:
        key = (torch.device(device), dtype)
        t = self._device.get(key)
        if t is None:
            t = self._device[key] = torch.from_numpy(np.ascontiguousarray(self.a)).to(*key)
        return t


class _Mixture:
    """What both Mix-DDPM drop-ins share: the mixture's checks, ``add_noise``, ``initial_sample`` and the
    ``standard`` strategy's per-step draw (``_offset_step``)."""

    def _init_mixture(self, mixture_means, mixture_weights, strategy: str) -> None:
        mix.check_strategy(strategy)
        self._means, self._weights = mix.check_mixture(mixture_means, mixture_weights)

    def _standard(self, base, t, prev, final_alpha_cumprod: float = 1.0):
        """`base` (rows t -> prev) with the ``standard`` strategy's offset term, or `base` for the others."""
        if self.config.strategy != "standard":
            return base
        abar_prev = mix.prev_alphas_cumprod(self._abar, prev, final_alpha_cumprod)
        return mix.with_offset(base, mix.offset_coefficient(self._abar[t], abar_prev))

    def _means_on(self, device, dtype=torch.float64) -> torch.Tensor:
        """The mixture means on `device`: one copy per device and dtype, kept (no plan: a constant of the
        scheduler, so that a compiled first step finds it)."""
        if getattr(self, "_means_dev", None) is None:
            self._means_dev = _OnDevice(self._means)
        return self._means_dev.on(device, dtype)

    def _offset_step(self, step, sample, timestep, generator, seeds, *args):
        """``step(*args)`` (the parent's step), with the ``standard`` strategy's offset[n] = mu_{k_n}/sqrt(D)."""
        if self.config.strategy != "standard":
            return step(*args)
        k = draw_step_components(self, self._weights, sample, timestep, generator, seeds)
        D = math.prod(sample.shape[1:])
        self._stepper.pending = {"offset": (self._means_on(sample.device)[k] / math.sqrt(D)).float()}
        try:
            return step(*args)
        finally:
            self._stepper.pending = None

    def _global_offset(self, x: torch.Tensor, timesteps, generator, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_n(t) ``[B]`` float32, the per-sample seeds or None): the components k(n, i), i = 0..T-1, from
        per-sample `seeds` (Philox step 0) or `generator`, reduced on the device."""
        self._check_fresh()
        B, T, device = x.shape[0], self._T, x.device
        t = torch.as_tensor(timesteps, device=device).to(torch.int64).reshape(-1).expand(B)
        if seeds is not None:
            seeds = self._seed_tensor(philox.check_seeds(seeds), B, device)
        k = mix.draw_components(self._weights, B, T, generator=generator, seeds=seeds, device=device)
        G = self._plan(("mixddpm offset weights",), lambda: _OnDevice(mix.offset_weights(self._abar)))
        offset = mix.global_offset(G.on(device, torch.float32), k, t % T, self._means_on(device, torch.float32),
                                   math.prod(x.shape[1:]))
        return offset, seeds

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps, generator=None,
                  seeds=None) -> torch.Tensor:
        """x_t = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*noise + m_n(t), per-sample timesteps too; the components
        k(n, i), i = 0..T-1, from per-sample `seeds` (Philox step 0) or `generator`."""
        x = original_samples
        offset, _ = self._global_offset(x, timesteps, generator, seeds)
        dtype = torch.promote_types(x.dtype, noise.dtype)
        row, rows = self._timestep_row(timesteps, x.device)
        plan = self._plan(("mixddpm q_sample",), lambda: mix.q_sample_plan(self._abar))
        (out,) = self._stepper.step(x.to(dtype), noise=noise.to(dtype), plan=plan, row=row, rows=rows,
                                    advance=False, offset=offset)
        return out

    def add_seeded_noise(self, original_samples: torch.Tensor, timesteps, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, eps) in one fused pass: eps drawn in the kernel from per-sample `seeds` (Philox DOMAIN_TRAIN,
        step 0: ``philox.randn(seeds, D, domain=DOMAIN_TRAIN)``) and written beside x_t (the training target);
        the components from the same seeds, as ``add_noise``."""
        x = original_samples
        offset, seeds = self._global_offset(x, timesteps, None, seeds)
        row, rows = self._timestep_row(timesteps, x.device)
        plan = self._plan(("mixddpm q_sample noise",), lambda: mix.q_sample_plan(self._abar, with_noise=True))
        coef = plan.coef(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        x_t, eps = ops.step(coef, x, seeds=seeds, noise_domain=philox.DOMAIN_TRAIN, row=row, rows=rows,
                            offset=offset, n_out=2, backend=self.backend)
        return x_t, eps

    def initial_sample(self, shape, generator=None, seeds=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """x_T of this scheduler's strategy (``fastdiff.samplers.mixddpm.initial_sample``)."""
        return mix.initial_sample(self, shape, strategy=self.config.strategy, means=self._means,
                                  weights=self._weights, generator=generator,
                                  seeds=self._seeds if seeds is None else seeds, device=device, dtype=dtype)


class MixDDPMScheduler(_Mixture, FastDDPMScheduler):
    """Mix-DDPM drop-in: ``FastDDPMScheduler``'s arguments plus ``mixture_means``, ``mixture_weights`` (paper
    defaults) and ``strategy`` (``original``, ``removal_mu`` - the code's default -, ``standard``)."""

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
        mixture_means: tuple[float, ...] | list[float] = mix.MEANS,
        mixture_weights: tuple[float, ...] | list[float] = mix.WEIGHTS,
        strategy: str = "removal_mu",
    ):
        self._init_mixture(mixture_means, mixture_weights, strategy)
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, variance_type,
                         clip_sample, prediction_type, thresholding, dynamic_thresholding_ratio, clip_sample_range,
                         sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr)
        use_table_stepper(self)

    def _ddpm(self, grid, draws: bool, x0_given: bool, guidance):
        return self._standard(super()._ddpm(grid, draws, x0_given, guidance), *self._rows(grid))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, seeds=None, guidance_scale=None):
        """One ancestral step of the strategy (see the module docstring); ``FastDDPMScheduler.step``'s arguments."""
        return self._offset_step(functools.partial(super().step, seeds=seeds, guidance_scale=guidance_scale),
                                 sample, timestep, generator, seeds, model_output, timestep, sample, generator,
                                 return_dict)


class MixDDIMScheduler(_Mixture, FastDDIMScheduler):
    """Mix-DDPM on DDIM: ``FastDDIMScheduler``'s arguments plus ``mixture_means``, ``mixture_weights`` and
    ``strategy``. ``original``/``removal_mu``: DDIM's steps (and ``initial_sample``); ``standard``: DDIM_eta
    plus ``-sqrt((1 - r)/r)*mu_{k_n}/sqrt(D)``, r = abar_t/abar_prev (**derived**:
    ``fastdiff.samplers.mixddpm``), which at stride 1 and eta = 1 is ``MixDDPMScheduler``'s standard step."""

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
        mixture_means: tuple[float, ...] | list[float] = mix.MEANS,
        mixture_weights: tuple[float, ...] | list[float] = mix.WEIGHTS,
        strategy: str = "removal_mu",
    ):
        self._init_mixture(mixture_means, mixture_weights, strategy)
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, clip_sample,
                         set_alpha_to_one, steps_offset, prediction_type, thresholding, dynamic_thresholding_ratio,
                         clip_sample_range, sample_max_value, timestep_spacing, rescale_betas_zero_snr)
        use_table_stepper(self)

    def _ddim(self, N: int, eta: float, use_clipped: bool, x0_given: bool, guidance):
        T = self._T
        t = np.arange(T)
        return self._standard(super()._ddim(N, eta, use_clipped, x0_given, guidance), np.append(t, T - 1),
                              np.append(t - T // N, -1), float(self.final_alpha_cumprod))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             seeds=None, guidance_scale=None):
        """One DDIM step of the strategy; ``FastDDIMScheduler.step``'s arguments."""
        return self._offset_step(super().step, sample, timestep, generator, seeds, model_output, timestep, sample,
                                 eta, use_clipped_model_output, generator, variance_noise, return_dict, seeds,
                                 guidance_scale)
