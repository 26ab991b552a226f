"""Drop-in diffusers schedulers: the same ``__init__`` arguments and defaults as the class they replace,
``from_config``/``save_pretrained``, the same outputs, and one fused kernel per ``step``::

    pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)

Noise: given a ``generator`` (or neither generator nor seeds) the noise is drawn exactly as diffusers
draws it, so images match diffusers'; given ``seeds`` (``step(..., seeds=)`` or ``set_seeds``) it comes
from the in-kernel Philox stream keyed per sample (``fastdiff.random``), with no extra pass. ``step``
never syncs with the host: a device ``timestep`` selects its coefficient row on the device.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from fastdiff import ops, schedules
from fastdiff import random as fd_random
from fastdiff.plan import Plan, Terms, x0_table
from fastdiff.reference.threshold import dynamic_threshold
from fastdiff.samplers.ddim import (
    check_prediction_type,
    ddim_plan,
    q_sample_coefficients,
    velocity_coefficients,
)


def timestep_rows(timestep, num_train_timesteps: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """(row, rows) selecting the coefficient row of `timestep` in a table indexed by timestep.

    A host value (int, numpy or CPU tensor) is checked and becomes `row`; a device tensor stays on the
    device as `rows` (one per sample, or one for all), so nothing waits for the GPU. Timestep -1 (which
    diffusers' "trailing" spacing yields for some step counts) selects the table's last row, as
    diffusers' ``alphas_cumprod[-1]`` does.
    """
    T = num_train_timesteps
    if isinstance(timestep, torch.Tensor) and (timestep.device.type != "cpu" or timestep.numel() > 1):
        if timestep.device.type == "cpu":
            t = timestep.reshape(-1).to(torch.int64)
            if int(t.min()) < -1 or int(t.max()) >= T:
                raise ValueError(f"timestep: expected values in [-1, {T}), got {t.tolist()}")
        return 0, timestep.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
    t = int(timestep)
    if not -1 <= t < T:
        raise ValueError(f"timestep: expected a value in [-1, {T}), got {t}")
    return t, None


class FastDDIMScheduler(SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``DDIMScheduler`` (DDIM, Song et al. 2021; eta = 1 is DDPM).

    Arguments and defaults are exactly ``DDIMScheduler``'s (diffusers 0.42). Beyond it: ``step`` takes
    ``seeds`` for in-kernel noise, ``set_seeds`` sets them for every step, and ``backend``
    (attribute: None = automatic, or "cuda", "triton", "cpu", "torch") picks the kernel.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
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
        check_prediction_type(prediction_type)
        if timestep_spacing not in schedules.SPACINGS:  # diffusers finds out only in set_timesteps
            raise ValueError(f"timestep_spacing: expected one of {schedules.SPACINGS}, got {timestep_spacing!r}")
        betas = schedules.betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        self._abar = schedules.alphas_cumprod(betas)  # float64 holding diffusers' float32 values
        self._final_abar = 1.0 if set_alpha_to_one else float(self._abar[0])
        # diffusers' public attributes
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(self._abar).float()
        self.final_alpha_cumprod = torch.tensor(self._final_abar, dtype=torch.float32)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.backend: str | None = None
        self._seeds = None
        self._cache: dict[tuple, object] = {}  # device tables and seeds, per (kind, ..., device)
        self._begin_index = None
        self._step_count = 0

    # -------------------------------------------------------------------------------- diffusers API
    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Where the denoising starts (img2img); also restarts the noise-step counter of ``seeds``."""
        self._begin_index = begin_index
        self._step_count = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        T = self.config.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps: {num_inference_steps} cannot be larger than "
                             f"num_train_timesteps ({T})")
        self.num_inference_steps = num_inference_steps
        ts = schedules.timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
        self.timesteps = torch.from_numpy(ts).to(device)
        self._cache.clear()
        self._step_count = self._begin_index or 0

    def set_seeds(self, seeds: int | torch.Tensor | None) -> None:
        """In-kernel noise for every following step: an int (per-sample seeds derived from it), a ``[B]``
        int64 tensor of per-sample seeds, or None for diffusers' own noise again."""
        self._seeds = seeds

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
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM step from ``timestep`` to ``timestep - T // num_inference_steps``; see DDIMScheduler."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        model_output, sample = model_output.to(dtype), sample.to(dtype)
        row, rows = timestep_rows(timestep, self.config.num_train_timesteps, sample.device)
        common = dict(row=row, rows=rows, backend=self.backend,
                      **self._noise(eta, model_output, generator, variance_noise, seeds))
        key = (float(eta), bool(use_clipped_model_output), sample.device)
        if not self.config.thresholding:
            prev, x0 = ops.step(self._coef("fused", *key), sample, [model_output], n_out=2,
                                clamp=self.config.clip_sample, **common)
        else:  # the per-sample quantile splits the step: x0, threshold it, then the update from it
            (x0,) = ops.step(self._coef("x0", *key), sample, [model_output], row=row, rows=rows,
                             backend=self.backend)
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            (prev,) = ops.step(self._coef("slot", *key), sample, [model_output], m=[x0], **common)
        self._step_count += 1
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """x_t = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*noise, one fused pass, per-sample timesteps."""
        return self._forward("q_sample", original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """v_t = sqrt(abar_t)*noise - sqrt(1 - abar_t)*sample, one fused pass."""
        return self._forward("velocity", sample, noise, timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------------------------- internals
    def _coef(self, kind: str, eta: float, use_clipped: bool, device: torch.device) -> torch.Tensor:
        """The float32 table of `kind`, one row per training timestep t (step t -> t - T//N), and a last
        row for t = -1 (abar[-1] -> the end of the chain, as diffusers computes it)."""
        key = (kind, eta, use_clipped, device)
        coef = self._cache.get(key)
        if coef is not None:
            return coef
        T, cfg = self.config.num_train_timesteps, self.config
        if kind in ("q_sample", "velocity"):
            table = q_sample_coefficients(self._abar) if kind == "q_sample" else velocity_coefficients(self._abar)
            plan = Plan(table, Terms(n_e=0, noise=True), name=kind)
        else:
            t = np.arange(T)
            plan = ddim_plan(self._abar, np.append(t, T - 1), np.append(t - T // self.num_inference_steps, -1),
                             final_alpha_cumprod=self._final_abar, eta=eta, prediction_type=cfg.prediction_type,
                             clip_sample=cfg.clip_sample and not cfg.thresholding,
                             clip_sample_range=cfg.clip_sample_range, use_clipped_model_output=use_clipped,
                             x0_in_slot=kind == "slot")
            if kind == "x0":
                plan = Plan(x0_table(plan.table), Terms(), name="ddim x0")
        coef = self._cache[key] = plan.coef(device)
        return coef

    def _noise(self, eta, model_output, generator, variance_noise, seeds) -> dict:
        if not eta > 0:
            return {}
        if variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        if variance_noise is not None:
            return {"noise": variance_noise.to(model_output.dtype)}
        seeds = self._seeds if seeds is None else seeds
        if seeds is not None:
            return {"seeds": self._seed_tensor(seeds, model_output.shape[0], model_output.device),
                    "noise_step": self._step_count}
        return {"noise": randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                      dtype=model_output.dtype)}

    def _seed_tensor(self, seeds, batch: int, device: torch.device) -> torch.Tensor:
        """The [B] int64 seeds on `device`: derived or copied once, not every step."""
        if isinstance(seeds, torch.Tensor) and seeds.device == device:
            return seeds
        key = ("seeds", seeds if isinstance(seeds, int) else id(seeds), batch, device)
        cached = self._cache.get(key)
        if cached is None or not (isinstance(seeds, int) or cached[1] is seeds):
            t = fd_random.sample_seeds(seeds, batch) if isinstance(seeds, int) else seeds
            cached = self._cache[key] = (t.to(device), seeds)
        return cached[0]

    def _forward(self, kind: str, x: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, noise.dtype)
        row, rows = timestep_rows(timesteps, self.config.num_train_timesteps, x.device)
        (out,) = ops.step(self._coef(kind, 0.0, False, x.device), x.to(dtype), noise=noise.to(dtype),
                          row=row, rows=rows, backend=self.backend)
        return out
