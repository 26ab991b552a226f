"""``FastUniPCMultistepScheduler``: diffusers' ``UniPCMultistepScheduler`` (UniPC, Zhao et al. 2023) with one fused
kernel per step: the corrector UniC of the previous step and the predictor UniP of the next in one pass
(``fastdiff.samplers.unipc``). Rows by step index; one plan per run, start (``begin_index``) and guidance scale,
built in ``set_timesteps``/``set_begin_index`` and cached by the grid's values across runs. UniPC draws no
noise: it is deterministic, and ``seeds`` changes nothing."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from fastdiff import philox, schedules
from fastdiff.integrations.diffusers.base import MAX_PLANS, FastSchedulerMixin, output, watched
from fastdiff.samplers.forward import q_sample_plan
from fastdiff.samplers.kit import E0
from fastdiff.samplers.unipc import MAX_ORDER, SOLVER_TYPES, converted, orders, unipc_plan, unipc_x0_plan

_BH2_ALIASES = ("midpoint", "heun", "logrho")  # diffusers registers these as bh2


def flow_sigmas(n: int, T: int, *, shift: float = 1.0, mu=None, shift_type: str = "exponential",
                shift_terminal=None, sigmas=None) -> np.ndarray:
    """diffusers' UniPC flow grid [n]: linspace(1, 1/T, n+1)[:-1] (or given sigmas), shifted (``mu``: dynamic
    time shift e^mu/(e^mu + 1/s - 1) or mu/(mu + 1/s - 1); else shift*s/(1 + (shift - 1)*s)), optionally stretched
    to end at ``shift_terminal``, and a first sigma of 1 moved to 1 - 1e-6 (finite lambda)."""
    s = np.linspace(1, 1 / T, n + 1)[:-1] if sigmas is None else np.array(sigmas)
    if mu is not None:
        shifted = math.exp(mu) if shift_type == "exponential" else mu
        s = shifted / (shifted + (1 / s - 1))
    else:
        s = shift * s / (1 + (shift - 1) * s)
    if shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    if np.fabs(s[0] - 1) < 1e-6:
        s = s.copy()
        s[0] -= 1e-6
    return s


def vp_sigmas(kind: str, n: int, vp: np.ndarray, sigma_min=None, sigma_max=None) -> np.ndarray:
    """karras / exponential / beta sigmas [n] between sigma_min and sigma_max (default: the ends of the float32
    VP sigmas `vp`); beta: Lee et al. 2024 ("Beta Sampling is All You Need"), Beta(0.6, 0.6) quantiles."""
    lo = float(vp[0]) if sigma_min is None else sigma_min
    hi = float(vp[-1]) if sigma_max is None else sigma_max
    if kind == "karras":
        return schedules.karras_sigmas(lo, hi, n)
    if kind == "exponential":
        return schedules.exponential_sigmas(lo, hi, n)
    import scipy.stats

    return lo + scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)


class FastUniPCMultistepScheduler(FastSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``UniPCMultistepScheduler``: the same arguments and defaults (diffusers 0.42),
    attributes and outputs. Beyond it: ``step(..., guidance_scale=)`` (fused classifier-free guidance),
    ``backend`` to pick the kernels; ``seeds`` is accepted for a uniform signature (UniPC draws no noise).
    Refused: ``solver_p`` (another scheduler as predictor), ``solver_order`` > 3 (the step has three history
    slots), combinations diffusers runs into NaN (exponential/beta sigmas with flow sigmas, flow_prediction
    without predict_x0, an order >= 2 last step to sigma 0). A last step of order 1 to sigma 0 takes its limit,
    a data prediction, where diffusers' formula evaluates 0*inf and returns NaN (``bh1``,
    or ``predict_x0=False``, with ``final_sigmas_type="zero"``)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    _tensor_sources = ("sigmas",)  # diffusers' step reads only the sigmas set_timesteps left
    sigmas = watched("sigmas")
    predict_x0 = watched("predict_x0")
    disable_corrector = watched("disable_corrector", "step indices whose corrector is skipped (a tuple here: "
                                                     "assign a new one, the plans follow)")
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006  (diffusers' default; kept as a tuple, never mutated)
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        sigma_min: float | None = None,
        sigma_max: bool | None = None,
        shift_terminal: bool | None = None,
    ) -> None:
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                             "`config.use_karras_sigmas` can be used.")
        if use_flow_sigmas and (use_exponential_sigmas or use_beta_sigmas):
            raise ValueError("use_flow_sigmas: not with use_exponential_sigmas/use_beta_sigmas (diffusers then keeps "
                             "VP sigmas > 1 and steps with alpha = 1 - sigma < 0: NaN)")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("`shift_terminal` is only supported when `use_flow_sigmas=True`.")
        if solver_type in _BH2_ALIASES:
            self.register_to_config(solver_type="bh2")
        elif solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type: expected one of {SOLVER_TYPES + _BH2_ALIASES}, got {solver_type!r}")
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or not 1 <= solver_order <= MAX_ORDER:
            raise ValueError(f"solver_order: fastdiff's UniPC fuses orders 1 to {MAX_ORDER}, got {solver_order!r}")
        if solver_p is not None:
            raise ValueError(f"solver_p: fastdiff's UniPC fuses its own predictor UniP with UniC; another scheduler "
                             f"as predictor is not supported, got {type(solver_p).__name__}")
        converted(prediction_type, predict_x0, 1.0, 1.0)  # checks prediction_type (and flow without predict_x0)
        for name, got, allowed in (("timestep_spacing", timestep_spacing, schedules.SPACINGS),
                                   ("final_sigmas_type", final_sigmas_type, schedules.FINAL_SIGMAS),
                                   ("time_shift_type", time_shift_type, ("exponential", "linear"))):
            if got not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {got!r}")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected num_train_timesteps={num_train_timesteps} values, got "
                             f"{len(trained_betas)}")
        if use_beta_sigmas:
            import scipy.stats  # noqa: F401  (diffusers: ImportError without scipy)
        betas = schedules.betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        abar = torch.from_numpy(schedules.alphas_cumprod(betas)).float()
        if rescale_betas_zero_snr:
            abar[-1] = 2**-24  # diffusers: close to 0, so that the first sigma is finite
        self.alphas_cumprod = abar
        self.alpha_t, self.sigma_t = torch.sqrt(abar), torch.sqrt(1 - abar)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - abar) / abar) ** 0.5
        self.init_noise_sigma = 1.0
        self.predict_x0 = predict_x0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self.disable_corrector = tuple(disable_corrector)
        self.solver_p = None
        self._store: OrderedDict = OrderedDict()  # (grid, config, begin, guidance) -> plans, kept across runs
        self._run_begin, self._guidance, self._current, self._run_key, self._grid_cache = 0, None, None, None, None
        self._init_fast()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    # ------------------------------------------------------------------------------------------ the grid
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None,
                      sigmas: list[float] | None = None, mu: float | None = None):
        """diffusers' grid: N timesteps and N+1 float32 sigmas (the last 0 or sigma_min); a new run."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError("Passing `sigmas` is only supported when `use_flow_sigmas=True`. Please set "
                                 "`use_flow_sigmas=True` during scheduler initialization.")
            num_inference_steps = len(sigmas)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        n, mu = int(num_inference_steps), mu if cfg.use_dynamic_shifting else None
        abar, cached = self.alphas_cumprod, self._grid_cache
        if (sigmas is None and mu is None and cached is not None and cached[0] == n and cached[1] is abar
                and cached[2] == abar._version):
            sig, ts = cached[3:]  # a pipeline's every call: the same grid (alphas_cumprod unchanged)
        else:
            sig, ts = self._grid(n, sigmas, mu)
            if sigmas is None and mu is None:
                self._grid_cache = (n, abar, abar._version, sig, ts)
        self.sigmas = torch.from_numpy(sig.astype(np.float32))
        self.timesteps = torch.from_numpy(ts.copy()).to(device=device)  # a copy: the cached grid stays as it is
        self.num_inference_steps = len(ts)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._run_begin = 0
        self._restart(ts)

    def _grid(self, n: int, custom, mu) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas [N+1], timesteps [N]) as UniPCMultistepScheduler.set_timesteps makes them."""
        cfg, T = self.config, self.config.num_train_timesteps
        abar = self.alphas_cumprod.detach().double().cpu().numpy()
        kind = "karras" if cfg.use_karras_sigmas else "exponential" if cfg.use_exponential_sigmas else \
            "beta" if cfg.use_beta_sigmas else None
        if not cfg.use_flow_sigmas and kind != "beta" and cfg.sigma_min is None and cfg.sigma_max is None:
            # DPM-Solver's grid (schedules.dpm_sigmas) is UniPC's: spacings, interpolation, karras (always rounded
            # here: beta_schedule "linear"), exponential, the final sigma - except that UniPC's final sigma_min
            # is the converted grid's last sigma (sigma_max for a one-step karras/exponential run), not sigma_0
            s, ts = schedules.dpm_sigmas(abar, n, cfg.timestep_spacing, cfg.steps_offset, kind, cfg.final_sigmas_type)
            if kind is not None and cfg.final_sigmas_type == "sigma_min":
                s[-1] = s[-2]
            return s, ts
        vp = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).cpu().numpy()  # float32, as diffusers
        if kind is not None:
            base = vp if custom is None else np.asarray(custom)
            s = vp_sigmas(kind, n, base, cfg.sigma_min, cfg.sigma_max)
            if cfg.use_flow_sigmas:  # karras only (the others are refused with flow sigmas)
                s = s / (s + 1)
                ts = s * T
            else:
                ts = schedules.sigma_to_t(s, np.log(base))
                ts = ts.round() if kind == "karras" else ts
            last = s[-1]
        else:
            s = flow_sigmas(n, T, shift=cfg.flow_shift, mu=mu, shift_type=cfg.time_shift_type,
                            shift_terminal=cfg.shift_terminal, sigmas=custom)
            ts, last = s * T, s[-1]
        last = last if cfg.final_sigmas_type == "sigma_min" else 0.0
        return np.append(s, last).astype(np.float32).astype(np.float64), ts.astype(np.int64)

    def _points(self) -> tuple[np.ndarray, np.ndarray]:
        """(alpha_j, sigma_j) of the grid's float32 sigmas s_j, float64: flow 1 - s, s; VP 1/sqrt(1 + s^2), s*alpha."""
        s = self.sigmas.detach().double().cpu().numpy()
        if self.config.use_flow_sigmas:
            return 1 - s, s
        alpha = 1 / np.sqrt(s**2 + 1)
        return alpha, s * alpha

    # ------------------------------------------------------------------------------------------- plans
    def _prepare(self) -> None:
        """The plans of the current run (its start, the last guidance scale used), on the run's device."""
        self._current = None
        self._run_key = (self.sigmas.detach().cpu().numpy().tobytes(), bool(self.predict_x0),
                         tuple(int(d) for d in self.disable_corrector))
        if self.num_inference_steps is not None and self._run_begin < self.num_inference_steps:
            device = getattr(self, "_device", torch.device("cpu"))
            for guidance in dict.fromkeys((self._guidance, None)):  # the last guidance scale used, and none
                try:
                    plans = self._plans_for(self._run_begin, guidance)
                except ValueError:  # a run this start cannot take (an order-2 last step to sigma 0) may still
                    break           # be run from a later begin_index: the step that reads it refuses it
                for plan in plans:
                    plan.coef(device)

    def _plans_for(self, begin: int, guidance) -> tuple:
        """(fused,) or, with thresholding, (x0, fused from the thresholded x0 given as the model output)."""
        key = (self._run_key, begin, guidance)
        plans = self._store.get(key)
        if plans is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"UniPC plans for begin {begin}, guidance {guidance} were not built before "
                                   f"torch.compile traced step: call set_timesteps (and one eager step) first")
            plans = self._store[key] = self._build(begin, guidance)
            while len(self._store) > MAX_PLANS:
                self._store.popitem(last=False)
        self._current = (guidance, plans)
        return plans

    def _build(self, begin: int, guidance) -> tuple:
        cfg = self.config
        alpha, sigma = self._points()
        N = len(alpha) - 1
        if cfg.prediction_type == "flow_prediction":  # diffusers: x0 = x - s*out with the raw sigma s, any grid
            s = self.sigmas.detach().double().cpu().numpy()[:N]
            m = converted("flow_prediction", self.predict_x0, 1 - s, s)
        else:
            m = converted(cfg.prediction_type, self.predict_x0, alpha[:N], sigma[:N], flow=cfg.use_flow_sigmas)
        rows = dict(order=cfg.solver_order, solver_type=cfg.solver_type, predict_x0=bool(self.predict_x0),
                    lower_order_final=cfg.lower_order_final, disable_corrector=self.disable_corrector, begin=begin)
        if not (cfg.thresholding and self.predict_x0):
            return (unipc_plan(alpha, sigma, m, guidance=guidance, **rows),)
        return (unipc_x0_plan(m, N, guidance=guidance), unipc_plan(alpha, sigma, E0, **rows))

    # ---------------------------------------------------------------------------------------- the run
    def set_begin_index(self, begin_index: int = 0) -> None:
        super().set_begin_index(begin_index)
        self._run_begin = self._begin_index
        self._prepare()

    def _start(self, timestep) -> int:
        """The first step of a run: its row by diffusers' rules (``_step_row``); a host timestep that is not one
        of the run's timesteps is refused (diffusers would silently run its last step). A traced step cannot
        read its timestep: the run starts at begin_index or 0, as for a device timestep."""
        if torch.compiler.is_compiling():  # the plans of begin_index (or 0) were made ready outside
            self._started = True
            return self._stepper.index
        if self._host_timesteps is not None and not (isinstance(timestep, torch.Tensor)
                                                     and timestep.device.type != "cpu"):
            if isinstance(timestep, (bool, str)) or not isinstance(timestep, (int, float, np.number, torch.Tensor)) \
                    or isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
                raise TypeError(f"timestep: expected a number or a one-element tensor, got {timestep!r}")
            if float(timestep) not in self._host_timesteps:
                raise ValueError(f"timestep: {float(timestep):g} is not one of this run's timesteps "
                                 f"{self._host_timesteps}")
        row = self._step_row(timestep)
        if row != self._run_begin:
            self._run_begin, self._current = row, None
        return row

    @property
    def last_sample(self):
        """diffusers' ``last_sample``: the sample the last predictor started from (the corrected one)."""
        return self._stepper._x_last

    @property
    def model_outputs(self) -> list:
        """diffusers' ``model_outputs``: the converted outputs kept, oldest first, None-padded to solver_order."""
        kept = self._stepper._history[: self.config.solver_order][::-1]
        return [None] * (self.config.solver_order - len(kept)) + kept

    @property
    def lower_order_nums(self) -> int:
        return min(self._stepper.index - self._run_begin, self.config.solver_order) if self._started else 0

    @property
    def this_order(self):
        """The order of the last predictor step (None before the first step)."""
        i = self._stepper.index - 1
        if not self._started or i < self._run_begin or self.num_inference_steps is None:
            return None
        cfg = self.config
        return int(orders(self.num_inference_steps, cfg.solver_order, cfg.lower_order_final, self._run_begin)[i])

    # ------------------------------------------------------------------------------------------- step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> SchedulerOutput | tuple:
        """One UniPC step (see UniPCMultistepScheduler.step): the corrector of the previous step and the predictor
        of this one, one fused pass. fastdiff's own arguments: ``guidance_scale`` (fused classifier-free
        guidance: ``model_output`` holds ``[uncond; cond]``, 2B rows); ``seeds`` (accepted and checked; UniPC
        draws no noise)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        self._check_fresh()
        if seeds is not None:
            philox.check_seeds(seeds)
        e, e_uncond = model_output, None
        if guidance_scale is not None:
            e, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        x = sample
        if e.dtype != x.dtype:  # diffusers computes in the promoted dtype and returns the sample's
            dtype = torch.promote_types(e.dtype, x.dtype)
            e, x = e.to(dtype), x.to(dtype)
            e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        row = self._stepper.index if self._started else self._start(timestep)
        cur = self._current
        plans = cur[1] if cur is not None and cur[0] == guidance_scale else self._plans_for(
            self._run_begin, None if guidance_scale is None else float(guidance_scale))
        if row >= plans[-1].steps:
            raise ValueError(f"step: all {plans[-1].steps} steps of this run were taken (step index {row}); call "
                             f"set_timesteps for a new run")
        if len(plans) == 1:
            prev = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0])[0]
        else:  # dynamic thresholding: x0, its per-sample quantile, then the fused step from the thresholded x0
            (x0,) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], advance=False)
            prev = self._stepper.step(x, self._threshold(x0), plan=plans[1])[0]
        if prev.dtype != sample.dtype:
            prev = prev.to(sample.dtype)
        if guidance_scale is not None:
            self._guidance = float(guidance_scale)
        if not return_dict:
            return (prev,)
        return output(SchedulerOutput, prev)

    # ---------------------------------------------------------------------------------- forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_j*x0 + sigma_j*noise at the grid point j of each timestep (diffusers' UniPC: j by
        index_for_timestep, or step_index / begin_index once set), one fused pass."""
        self._check_fresh()
        if self.begin_index is None:
            grid = self.timesteps.tolist()
            idx = []
            for t in torch.as_tensor(timesteps).reshape(-1).tolist():
                where = [i for i, v in enumerate(grid) if v == t]
                idx.append(where[1] if len(where) > 1 else where[0] if where else len(grid) - 1)
        else:
            idx = [self.step_index if self.step_index is not None else self.begin_index] * len(timesteps)
        key = ("q_sample", self.sigmas.detach().cpu().numpy().tobytes(), self.config.use_flow_sigmas)
        plan = self._plan(key, lambda: q_sample_plan(*self._points(), row_label="grid point"))
        dtype = torch.promote_types(original_samples.dtype, noise.dtype)
        rows = torch.tensor(idx, dtype=torch.int64, device=original_samples.device)
        (out,) = self._stepper.step(original_samples.to(dtype), noise=noise.to(dtype), plan=plan, rows=rows,
                                    advance=False)
        return out
