"""What diffusers' Euler-family schedulers (sigma space, Karras et al. 2022) share, for the drop-ins
``FastEulerDiscreteScheduler`` (``euler.py``), ``FastEulerAncestralDiscreteScheduler``
(``euler_ancestral.py``) and ``FastHeunDiscreteScheduler`` (``heun.py``): one fused kernel per model call.

Their plans are ``fastdiff.samplers.euler``'s, one row per step index (diffusers' ``step_index``), built in
``set_timesteps`` from ``sigmas`` - the attribute diffusers' ``step`` reads, so an assigned or in-place
changed ``sigmas`` is honoured too. The schedule itself (timesteps, sigmas: spacing, interpolation,
karras / exponential / beta sigmas, final sigma) is computed exactly as diffusers 0.42 computes it, its
float32 scalars (sigma_hat, sigma_up, sigma_down, the input scale) with torch as diffusers does; the plans
take those float32 numbers and combine them in float64.

Where they differ from diffusers, on purpose: arithmetic is float32 from fp16/bf16 storage (diffusers' Euler
steps upcast the sample to fp32 and return ``pred_original_sample`` in fp32; here it comes in the storage
dtype, as the sample does), and float64 inputs stay float64 (diffusers rounds the sample to fp32 first).
Bad configurations are refused when constructed (diffusers finds some only in ``set_timesteps`` or
``step``), naming the argument.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import is_scipy_available, logging

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import FastSchedulerMixin
from fastdiff.samplers.forward import q_sample_plan

logger = logging.get_logger("diffusers.schedulers." + __name__)  # diffusers' verbosity applies

INT_DTYPES = (torch.int32, torch.int64)
NOT_SCALED = ("The `scale_model_input` function should be called before `step` to ensure correct denoising. "
               "See `StableDiffusionPipeline` for a usage example.")


def int_timestep_error(what: str) -> ValueError:
    return ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{what}` is not "
                      f"supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def check_int_timestep(timestep, what: str = "EulerDiscreteScheduler.step()") -> None:
    """diffusers' Euler schedulers refuse an int, or an int32/int64 CPU tensor, as a timestep (a step index)."""
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and timestep.dtype in INT_DTYPES
                                     and timestep.device.type == "cpu"):
        raise int_timestep_error(what)


def check_choice(name: str, got, allowed: tuple) -> None:
    if got not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {got!r}")


# ----------------------------------------------------------------------------- schedules, as diffusers'

def train_betas(cfg, schedules_allowed: tuple = schedules.BETA_SCHEDULES) -> torch.Tensor:
    """float32 betas of the config: ``schedules.betas``, plus HeunDiscreteScheduler's "exp" schedule
    (diffusers' betas_for_alpha_bar with alpha_bar(t) = exp(-12 t), beta capped at 0.999)."""
    if cfg.trained_betas is None:
        check_choice("beta_schedule", cfg.beta_schedule, schedules_allowed)
    if cfg.trained_betas is not None and len(cfg.trained_betas) != cfg.num_train_timesteps:
        raise ValueError(f"trained_betas: expected num_train_timesteps={cfg.num_train_timesteps} values, got "
                         f"{len(cfg.trained_betas)}")
    if cfg.trained_betas is None and cfg.beta_schedule == "exp":
        T = cfg.num_train_timesteps
        return torch.tensor([min(1 - math.exp((i + 1) / T * -12.0) / math.exp(i / T * -12.0), 0.999)
                             for i in range(T)], dtype=torch.float32)
    betas = schedules.betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                            cfg.trained_betas, cfg.get("rescale_betas_zero_snr", False))
    return torch.from_numpy(betas).float()


def spaced_timesteps(n: int, T: int, spacing: str, steps_offset: int) -> np.ndarray:
    """The Euler family's float32 timesteps (descending): linspace / leading / trailing (Lin et al. 2023,
    Table 2), as their set_timesteps compute them."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + np.float32(steps_offset)
    return np.arange(T, 0, -T / n).round().copy().astype(np.float32) - np.float32(1)


def convert_sigmas(kind: str, in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """karras (Karras et al. 2022, eq. 5), exponential, or beta (Lee et al. 2024, "Beta Sampling is All You
    Need": alpha = beta = 0.6) sigmas between the config's bounds or the grid's ends."""
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    if kind == "karras":
        return schedules.karras_sigmas(lo, hi, n)
    if kind == "exponential":
        return schedules.exponential_sigmas(lo, hi, n)
    import scipy.stats

    return lo + scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)


def sigma_kind(cfg) -> str | None:
    return "karras" if cfg.use_karras_sigmas else "exponential" if cfg.use_exponential_sigmas else \
        "beta" if cfg.use_beta_sigmas else None


def check_sigma_kinds(cfg) -> None:
    if cfg.use_beta_sigmas and not is_scipy_available():
        raise ImportError("Make sure to install scipy if you want to use beta sigmas.")
    if sum([bool(cfg.use_beta_sigmas), bool(cfg.use_exponential_sigmas), bool(cfg.use_karras_sigmas)]) > 1:
        raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                         "`config.use_karras_sigmas` can be used.")


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t)/abar_t), float32, ascending in t."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).detach().numpy()


# ------------------------------------------------------------------------------------ the shared part

class SigmaSpaceMixin(FastSchedulerMixin):
    """What the three share: the run from ``sigmas`` (rows by step index), diffusers' step-index rules
    for float timesteps, ``scale_model_input``, ``init_noise_sigma``, ``add_noise`` in sigma space."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    def _init_sigma_space(self) -> None:
        self.is_scale_input_called = False
        self._device = torch.device("cpu")
        self._init_fast()

    def _schedule(self, args: tuple, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps) of set_timesteps' arguments `args`: ``compute()`` once per arguments and
        alphas_cumprod (assigned or changed in place recomputes), then fresh copies (a caller may change
        the attributes in place, as some pipelines do)."""
        state = self._state()
        key = (args, state[0], state[2])
        cache = self.__dict__.setdefault("_schedules", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            hit = cache[key] = compute()
        return hit[0].clone(), hit[1].clone()

    def _set_run(self, sigmas: torch.Tensor, timesteps: torch.Tensor, device) -> None:
        """A new run: diffusers' sigmas (float32, on the CPU) and timesteps (moved to `device`)."""
        self._grid = timesteps.tolist()   # host copy for diffusers' index_for_timestep, before any move
        self._grid_dtype = timesteps.dtype
        self.timesteps = timesteps.to(device=device)
        self.sigmas = sigmas.to("cpu")
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._restart()

    @property
    def init_noise_sigma(self):
        """The std of the initial noise: the largest sigma, or sqrt(sigma_max^2 + 1) for "leading" spacing."""
        max_sigma = max(self.sigmas) if isinstance(self.sigmas, list) else self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    # ------------------------------------------------------------------------------ plans of the run
    def _prepare(self) -> None:
        """The run's plans from ``sigmas`` (the default step's; others on first use), uploaded to the run's
        device, and the input scales 1/sqrt(sigma^2 + 1)."""
        sig = self.__dict__.get("sigmas")
        if sig is None:
            return
        self._sig_ref, self._sig_version = sig, sig._version
        s32 = sig.detach().to("cpu", torch.float32)
        key = s32.numpy().tobytes()
        if key == self.__dict__.get("_key") and self._plans.get((type(self).__name__, key, None)) is not None:
            for plan in self._run[None]:  # the same sigmas as the last run (and its plans still cached)
                plan.coef(self._device)
            return
        self._s32, self._key = s32, key
        self._scales = ((s32**2 + 1) ** 0.5).unbind()  # diffusers' divisors, float32 0-d tensors
        self._rows = len(s32) - 1  # diffusers' step indices: each row reads sigmas[i] and sigmas[i + 1]
        self._run: dict = {}
        try:
            plans = self._plans_for(None)
        except ValueError:  # a grid the step cannot take (zero-SNR's training grid, whose sigma rises at its
            return          # end, for an ancestral step): refused by the step that reads it, with this message
        for plan in plans:
            plan.coef(self._device)

    def _check_sigmas(self) -> None:
        """Rebuild the plans if ``sigmas`` was assigned or changed in place (not under torch.compile)."""
        if torch.compiler.is_compiling():
            return
        s = self.__dict__.get("sigmas")
        if s is not self._sig_ref or s._version != self._sig_version:
            self._prepare()

    def _plans_for(self, guidance) -> tuple:
        """The default step's plans for a guidance scale (None: unguided), built on first use."""
        plans = self._run.get(guidance)
        if plans is None:
            plans = self._run[guidance] = tuple(self._plan((type(self).__name__, self._key, guidance),
                                                           lambda: self._build(guidance)))
        return plans

    # ------------------------------------------------------------------------------------ step index
    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """diffusers' rule: the place of `timestep` in the timesteps (the second of two equal ones), compared
        in the schedule's dtype; a timestep not in the schedule is a ValueError."""
        grid, dtype = (self._grid, self._grid_dtype) if schedule_timesteps is None else \
            (schedule_timesteps.tolist(), schedule_timesteps.dtype)
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep: expected one timestep, got a tensor of shape {tuple(timestep.shape)}")
            t = timestep.item()
        elif isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
            t = timestep
        else:
            raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__} {timestep!r}")
        t = torch.tensor(t, dtype=dtype).item()  # torch compares a float32 schedule in float32
        where = [i for i, v in enumerate(grid) if v == t]
        if not where:
            raise ValueError(f"timestep: {timestep!r} is not one of this run's timesteps (scheduler.timesteps); "
                             f"pass one of them, or call set_begin_index")
        return where[1] if len(where) > 1 else where[0]

    def _start(self, timestep) -> int:
        """diffusers' _init_step_index on the first call of a run (begin_index is handled by the base). A
        device timestep is not read (that would wait for the GPU), nor one being traced: the run starts
        at step 0, where pipelines start it."""
        if torch.compiler.is_compiling() or (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"):
            index = 0
        else:
            index = self.index_for_timestep(timestep)
        self._stepper.reset(index)
        self._started = True
        return index

    def _step_row(self, timestep) -> int:
        return self._stepper.index if self._started else self._start(timestep)

    def _past_end(self, i: int) -> ValueError:
        return ValueError(f"step: this run has {self._rows} steps and step index {i} is past its end; call "
                          f"set_timesteps to start a new run")

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The model's input x/sqrt(sigma^2 + 1) (VE to VP coordinates) at this step's sigma."""
        self._check_sigmas()
        i = self._stepper.index if self._started else self._start(timestep)
        if i >= len(self._scales):
            raise self._past_end(i)
        self.is_scale_input_called = True
        return sample / self._scales[i]

    # ------------------------------------------------------------------------------- the step's inputs
    def _inputs(self, model_output, sample, guidance_scale):
        """(e, x, e_uncond, the model output's dtype): guidance pairs split, dtypes promoted as diffusers."""
        e_uncond = None
        if guidance_scale is not None:
            model_output, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        if model_output.dtype == sample.dtype:
            return model_output, sample, e_uncond, model_output
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        return model_output.to(dtype), sample.to(dtype), e_uncond, model_output

    # ------------------------------------------------------------------------------- forward process
    def _indices(self, timesteps, device) -> tuple:
        """(row, rows) of the step indices diffusers' add_noise uses for `timesteps`: each one's place in the
        schedule (host timesteps; device ones are looked up on the device, with no sync: a timestep not in
        the schedule gets a row past the table, hence NaN), or begin_index / step_index when set."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if self.begin_index is not None:
            return (self.step_index if self.step_index is not None else self.begin_index), None
        ts = timesteps.reshape(-1)
        if ts.device.type == "cpu":
            idx = [self.index_for_timestep(t) for t in ts]
            if len(set(idx)) <= 1:
                return (idx[0] if idx else 0), None
            return 0, torch.tensor(idx, dtype=torch.int64, device=device)
        grid = self.timesteps.to(ts.device)
        eq = grid[None, :] == ts[:, None].to(grid.dtype)
        count, seen = eq.sum(1), eq.cumsum(1)
        pick = (eq & (seen == torch.where(count > 1, 2, 1)[:, None])).int().argmax(1)
        return 0, torch.where(count > 0, pick, len(self._s32)).to(device=device, dtype=torch.int64)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x0 + sigma*noise, sigma of each timestep's step index (diffusers' rules), one fused pass."""
        self._check_sigmas()
        dtype = torch.promote_types(original_samples.dtype, noise.dtype)
        row, rows = self._indices(timesteps, original_samples.device)
        s = self._s32.double().numpy()
        plan = self._plan(("sigma q_sample", self._key), lambda: q_sample_plan(np.ones_like(s), s, row_label="step"))
        (out,) = self._stepper.step(original_samples.to(dtype), noise=noise.to(dtype), plan=plan, row=row,
                                    rows=rows, advance=False)
        return out


def sigmas_at(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """sigma at (fractional) timesteps: linear interpolation of the training sigmas (float64)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
