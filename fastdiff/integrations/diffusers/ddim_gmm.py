"""``DDIMGMMScheduler``: ``FastDDIMScheduler`` with DDIM-GMM's moment-matched mixture kernel (Gabbur, arXiv
2311.04938; ``fastdiff.samplers.ddim_gmm``, docs/methods.md section 2).

The offsets (``delta_table``, ``var_table``: ``[K, D]``) are built once from ``offset_seed`` for the sample size
D - at the first step, or by ``set_offsets`` - and kept while D stays the same. Each step draws k_n ~ Cat(pi)
per sample (eta = 0 too: the step is then mu_t + delta_{k_n}) - Philox step = the timestep with per-sample
seeds, else ``torch.rand`` from the generator, before diffusers' noise draw - and runs one fused pass that
gathers row k_n of both tables. ``offset_scale = 0`` is DDIM.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from fastdiff.integrations.diffusers.ddim import FastDDIMScheduler
from fastdiff.integrations.diffusers.tables import draw_step_components, use_table_stepper
from fastdiff.samplers import ddim_gmm as gmm


class DDIMGMMScheduler(FastDDIMScheduler):
    """DDIM-GMM drop-in: ``FastDDIMScheduler``'s arguments plus ``n_components`` (K), ``offset_scale`` (s),
    ``offset_kind`` (``rand``, ``ortho``, ``ortho_vub``), ``weights`` (pi; None = uniform) and ``offset_seed``."""

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
        n_components: int = 8,
        offset_scale: float = 1.0,
        offset_kind: str = "ortho",
        weights: list[float] | None = None,
        offset_seed: int = 0,
    ):
        self._pi = gmm.check_offsets_config(n_components, offset_scale, offset_kind, weights)
        self._offsets = None  # (D, delta_table, var_table, {device: float32 copies})
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, clip_sample,
                         set_alpha_to_one, steps_offset, prediction_type, thresholding, dynamic_thresholding_ratio,
                         clip_sample_range, sample_max_value, timestep_spacing, rescale_betas_zero_snr)
        use_table_stepper(self)

    # -------------------------------------------------------------------------------------- offsets
    def set_offsets(self, shape_or_numel, seed: int | None = None) -> None:
        """Build the offset tables for samples of `shape_or_numel` (a batch's shape ``[B, ...]``, or D) from
        `seed` (default: ``offset_seed``)."""
        if isinstance(shape_or_numel, (int, np.integer)) and not isinstance(shape_or_numel, bool):
            D = int(shape_or_numel)
        elif isinstance(shape_or_numel, (tuple, list, torch.Size)) and len(shape_or_numel) >= 2:
            D = math.prod(int(s) for s in shape_or_numel[1:])
        else:
            raise ValueError(f"shape_or_numel: expected D (an int) or a batch shape [B, ...], got {shape_or_numel!r}")
        cfg = self.config
        delta, var = gmm.build_offsets(D, cfg.n_components, cfg.offset_scale, cfg.offset_kind, self._pi,
                                       cfg.offset_seed if seed is None else seed)
        self._offsets = (D, delta, var, {})
        self._plans.clear()  # ORTHO_VUB's rows depend on the tables
        self._last_plans = None
        self._prepare()

    @property
    def delta_table(self) -> torch.Tensor | None:
        """The offsets delta_k, float64 ``[K, D]`` (None before the first step or ``set_offsets``)."""
        return None if self._offsets is None else self._offsets[1]

    @property
    def var_table(self) -> torch.Tensor | None:
        """diag(Delta_k), float64 ``[K, D]`` (None before the first step or ``set_offsets``)."""
        return None if self._offsets is None else self._offsets[2]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        copies = self._offsets[3]
        t = copies.get(device)
        if t is None:
            t = copies[device] = tuple(a.to(device, torch.float32).contiguous() for a in self._offsets[1:3])
        return t

    # ---------------------------------------------------------------------------------------- plans
    def _vub(self) -> bool:
        return self.config.offset_kind == "ortho_vub"

    def _prepare(self) -> None:
        if not self._vub() or self._offsets is not None:  # ORTHO_VUB's rows need the tables
            super()._prepare()

    def _ddim(self, N: int, eta: float, use_clipped: bool, x0_given: bool, guidance):
        base = super()._ddim(N, eta, use_clipped, x0_given, guidance)
        if self.config.offset_scale == 0:
            return base
        return gmm.with_mixture(base, float(self._offsets[2].max()) if self._vub() else None)

    # ----------------------------------------------------------------------------------------- step
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             seeds=None, guidance_scale=None):
        """One DDIM-GMM step (``FastDDIMScheduler.step``'s arguments): k_n ~ Cat(pi) per sample, then
        x_prev = mu_t + delta_{k_n} + sqrt(max(sigma_t^2 - diag Delta_{k_n}, 0))*z in one fused pass."""
        if self.config.offset_scale == 0:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict, seeds, guidance_scale)
        if self._offsets is None or self._offsets[0] != math.prod(sample.shape[1:]):
            if torch.compiler.is_compiling():  # a seeded SVD on the host: not traceable
                raise RuntimeError(f"DDIMGMMScheduler: call set_offsets({tuple(sample.shape)}) before compiling "
                                   f"step (the offset tables are built on the host, once per run)")
            self.set_offsets(sample.shape)
        k = draw_step_components(self, self._pi, sample, timestep, generator, seeds)
        delta, var = self._tables(sample.device)
        self._stepper.pending = {"component": k, "delta_table": delta, "var_table": var}
        try:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict, seeds, guidance_scale)
        finally:
            self._stepper.pending = None
