"""``FastEulerDiscreteScheduler``, ``FastEulerAncestralDiscreteScheduler``, ``FastHeunDiscreteScheduler``:
diffusers' Euler-family schedulers (sigma space, Karras et al. 2022) with one fused kernel per model call.

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
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import is_scipy_available, logging

from fastdiff import schedules
from fastdiff.integrations.diffusers.base import FastSchedulerMixin, output
from fastdiff.samplers.euler import euler_ancestral_step, euler_step, heun_first, heun_second
from fastdiff.samplers.forward import q_sample_plan, velocity_plan

logger = logging.get_logger(__name__)

_INT_DTYPES = (torch.int32, torch.int64)
_NOT_SCALED = ("The `scale_model_input` function should be called before `step` to ensure correct denoising. "
               "See `StableDiffusionPipeline` for a usage example.")


def _int_timestep_error(what: str) -> ValueError:
    return ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `{what}` is not "
                      f"supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")


def _check_int_timestep(timestep, what: str = "EulerDiscreteScheduler.step()") -> None:
    """diffusers' Euler schedulers refuse an int, or an int32/int64 CPU tensor, as a timestep (a step index)."""
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and timestep.dtype in _INT_DTYPES
                                     and timestep.device.type == "cpu"):
        raise _int_timestep_error(what)


def _check_choice(name: str, got, allowed: tuple) -> None:
    if got not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {got!r}")


# ----------------------------------------------------------------------------- schedules, as diffusers'

def _betas(cfg, schedules_allowed: tuple = schedules.BETA_SCHEDULES) -> torch.Tensor:
    """float32 betas of the config: ``schedules.betas``, plus HeunDiscreteScheduler's "exp" schedule
    (diffusers' betas_for_alpha_bar with alpha_bar(t) = exp(-12 t), beta capped at 0.999)."""
    if cfg.trained_betas is None:
        _check_choice("beta_schedule", cfg.beta_schedule, schedules_allowed)
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


def _spaced(n: int, T: int, spacing: str, steps_offset: int) -> np.ndarray:
    """The Euler family's float32 timesteps (descending): linspace / leading / trailing (Lin et al. 2023,
    Table 2), as their set_timesteps compute them."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + np.float32(steps_offset)
    return np.arange(T, 0, -T / n).round().copy().astype(np.float32) - np.float32(1)


def _convert(kind: str, in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
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


def _sigma_kind(cfg) -> str | None:
    return "karras" if cfg.use_karras_sigmas else "exponential" if cfg.use_exponential_sigmas else \
        "beta" if cfg.use_beta_sigmas else None


def _check_sigma_kinds(cfg) -> None:
    if cfg.use_beta_sigmas and not is_scipy_available():
        raise ImportError("Make sure to install scipy if you want to use beta sigmas.")
    if sum([bool(cfg.use_beta_sigmas), bool(cfg.use_exponential_sigmas), bool(cfg.use_karras_sigmas)]) > 1:
        raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                         "`config.use_karras_sigmas` can be used.")


def _train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t)/abar_t), float32, ascending in t."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).detach().numpy()


# ------------------------------------------------------------------------------------ the shared part

class _SigmaSpace(FastSchedulerMixin):
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
        for plan in self._plans_for(None):
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


def _sigmas_at(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """sigma at (fractional) timesteps: linear interpolation of the training sigmas (float64)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


# ------------------------------------------------------------------------------------------- Euler

class FastEulerDiscreteScheduler(_SigmaSpace, SchedulerMixin, ConfigMixin):
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
        _check_sigma_kinds(self.config)
        _check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"))
        _check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        _check_choice("timestep_spacing", timestep_spacing, schedules.SPACINGS)
        _check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        _check_choice("final_sigmas_type", final_sigmas_type, schedules.FINAL_SIGMAS)
        self.betas = _betas(self.config)
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
        kind = _sigma_kind(cfg)
        if timesteps is not None and kind is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{kind}_sigmas = True`.")
        if timesteps is not None and self._continuous_v:
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = n = num_inference_steps
        args = (n, None if timesteps is None else tuple(np.asarray(timesteps, np.float64).tolist()),
                None if sigmas is None else tuple(np.asarray(sigmas, np.float64).tolist()))
        self._set_run(*self._schedule(args, lambda: self._grid_of(n, timesteps, sigmas)), device)

    def _grid_of(self, n: int, timesteps, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [N+1] float32, timesteps [N]) of set_timesteps' arguments, as diffusers computes them."""
        cfg, kind = self.config, _sigma_kind(self.config)
        train = _train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = schedules.sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            timesteps = _spaced(n, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset) \
                if timesteps is None else np.array(timesteps).astype(np.float32)
            if cfg.interpolation_type == "linear":
                sigmas = _sigmas_at(timesteps, train)
            else:  # log_linear: N + 1 sigmas from the largest to the smallest, in float32 torch
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), n + 1).exp().numpy()
            if kind is not None:
                sigmas = _convert(kind, sigmas, n, cfg.sigma_min, cfg.sigma_max)
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
        if type(timestep) is not torch.Tensor or timestep.dtype in _INT_DTYPES:
            _check_int_timestep(timestep)
        if not self.is_scale_input_called and not torch.compiler.is_compiling():
            logger.warning(_NOT_SCALED)
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
            raise _int_timestep_error("EulerDiscreteScheduler.get_velocity()")
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


# ------------------------------------------------------------------------------------ Euler ancestral

class FastEulerAncestralDiscreteScheduler(_SigmaSpace, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``EulerAncestralDiscreteScheduler`` (same arguments and defaults,
    attributes and outputs). Beyond it: ``step(..., seeds=)`` / ``set_seeds`` for in-kernel noise,
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
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if prediction_type == "sample":  # diffusers constructs it, then refuses every step
            raise ValueError("prediction_type: EulerAncestralDiscreteScheduler has no 'sample' prediction "
                             "(diffusers: NotImplementedError); expected 'epsilon' or 'v_prediction'")
        _check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        _check_choice("timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self.betas = _betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = np.concatenate([_train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
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
            timesteps = _spaced(n, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset)
            sigmas = _sigmas_at(timesteps, _train_sigmas(self.alphas_cumprod))
            return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), torch.from_numpy(timesteps)

        self._set_run(*self._schedule((n,), grid), device)

    def _build(self, guidance) -> tuple:
        """Ancestral rows: sigma_up, sigma_down in float32 torch, as diffusers computes them per step."""
        s = self._s32
        sigma_from, sigma_to = s[:-1], s[1:]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        f64 = [t.double().numpy() for t in (sigma_from, sigma_down, sigma_up)]
        return (euler_ancestral_step(*f64, prediction_type=self.config.prediction_type, guidance=guidance),)

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
        if type(timestep) is not torch.Tensor or timestep.dtype in _INT_DTYPES:
            _check_int_timestep(timestep)
        if not self.is_scale_input_called and not torch.compiler.is_compiling():
            logger.warning(_NOT_SCALED)
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


# ------------------------------------------------------------------------------------------------ Heun

class FastHeunDiscreteScheduler(_SigmaSpace, SchedulerMixin, ConfigMixin):
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
        _check_sigma_kinds(self.config)
        _check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        _check_choice("timestep_spacing", timestep_spacing, schedules.SPACINGS)
        self.betas = _betas(self.config, (*schedules.BETA_SCHEDULES, "exp"))
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
        kind = _sigma_kind(cfg)
        if timesteps is not None and kind is not None:
            raise ValueError(f"Cannot set `timesteps` with `config.use_{kind}_sigmas = True`.")
        n = num_inference_steps or len(timesteps)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {n!r}")
        self.num_inference_steps = n
        T = num_train_timesteps or cfg.num_train_timesteps
        custom = None if timesteps is None else tuple(np.asarray(timesteps, np.float64).tolist())

        def grid():
            ts = _spaced(n, T, cfg.timestep_spacing, cfg.steps_offset) if timesteps is None else \
                np.array(timesteps, dtype=np.float32)
            train = _train_sigmas(self.alphas_cumprod)
            sigmas = _sigmas_at(ts, train)
            if kind is not None:
                sigmas = _convert(kind, sigmas, n)
                ts = schedules.sigma_to_t(sigmas, np.log(train))
            sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
            sig = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
            ts = torch.from_numpy(ts)
            return sig, torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(dtype=torch.float32)

        self._heun_state = None
        self._set_run(*self._schedule((n, T, custom), grid), device)

    def _build(self, guidance) -> tuple:
        """(first, second) rows by step index j: the first call steps sigmas[j] -> sigmas[j+1], the second
        (x at sigmas[j]) completes sigmas[j-1] -> sigmas[j] (its row 0 is never a second call: a copy of 1's)."""
        s = self._s32.double().numpy()
        j = np.arange(len(s) - 1)
        prev = np.maximum(j - 1, 0)
        cur = np.where(j > 0, j, 1)
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
