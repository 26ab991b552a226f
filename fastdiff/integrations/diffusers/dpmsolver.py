"""``FastDPMSolverMultistepScheduler``: diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver / DPM-Solver++,
Lu et al. 2022) with one fused kernel per step. The plan is ``fastdiff.samplers.dpmsolver``'s, one row per
step of the run (warm-up, lower-order final steps and the limit at sigma 0 are rows); rows by step index,
diffusers' ``step_index``; the history of converted outputs is the stepper's ring."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils import deprecate

from fastdiff import philox, schedules
from fastdiff.integrations.diffusers.base import MAX_PLANS, FastSchedulerMixin, output, watched
from fastdiff.noise import randn_tensor
from fastdiff.samplers.dpmsolver import (
    DATA_ALGORITHMS,
    alpha_sigma,
    dpm_solver_grid,
    dpmsolver_multistep,
    dpmsolver_x0,
    multistep_orders,
)
from fastdiff.samplers.forward import q_sample_plan
from fastdiff.samplers.predictions import check_prediction_type

_SCHEDULES = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
_GRID = dict(zip(_SCHEDULES, ("karras", "lu", "exponential", "beta", "flow")))


class FastDPMSolverMultistepScheduler(FastSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``DPMSolverMultistepScheduler``: the same arguments and defaults
    (diffusers 0.42), attributes and outputs. Beyond it: ``step(..., seeds=)`` and ``set_seeds`` for
    in-kernel noise (the SDE variants), ``guidance_scale`` for fused classifier-free guidance, ``backend``.
    Not kept: ``model_outputs`` (the history lives in the stepper's ring) and the solver's internal
    methods (``convert_model_output``, ``*_update``), which LEdits++ drives by hand."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    _tensor_sources = ("sigmas",)  # diffusers' step reads only sigmas (and the config)
    sigmas = watched("sigmas")
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
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if use_beta_sigmas + use_exponential_sigmas + use_karras_sigmas > 1:
            raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                             "`config.use_karras_sigmas` can be used.")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            deprecate("algorithm_types dpmsolver and sde-dpmsolver", "1.0.0", f"algorithm_type {algorithm_type} is "
                      "deprecated and will be removed in a future version. Choose from `dpmsolver++` or "
                      "`sde-dpmsolver++` instead")
        if algorithm_type == "deis":  # diffusers' mapping of the configs it shares (DEIS, UniPC)
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type not in ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"):
            raise ValueError(f"algorithm_type: expected one of ('dpmsolver++', 'sde-dpmsolver++', 'dpmsolver', "
                             f"'sde-dpmsolver'), got {algorithm_type!r}")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
        if algorithm_type not in DATA_ALGORITHMS and final_sigmas_type == "zero":  # "deis" too, as in diffusers
            raise ValueError(f"`final_sigmas_type` {final_sigmas_type} is not supported for `algorithm_type` "
                             f"{algorithm_type}. Please choose `sigma_min` instead.")
        if final_sigmas_type not in schedules.FINAL_SIGMAS:  # diffusers finds out in set_timesteps
            raise ValueError(f"final_sigmas_type: expected one of {schedules.FINAL_SIGMAS}, got {final_sigmas_type!r}")
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order: expected 1, 2 or 3, got {solver_order!r}")
        check_prediction_type(prediction_type)
        if prediction_type == "flow_prediction" and self.config.algorithm_type not in DATA_ALGORITHMS:
            raise ValueError(f"prediction_type: flow_prediction needs algorithm_type dpmsolver++ or sde-dpmsolver++, "
                             f"got {algorithm_type!r} (diffusers' step fails on it)")
        if timestep_spacing not in schedules.SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {schedules.SPACINGS}, got {timestep_spacing!r}")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected num_train_timesteps={num_train_timesteps} values, got "
                             f"{len(trained_betas)}")
        betas = schedules.betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        abar = schedules.alphas_cumprod(betas)
        if rescale_betas_zero_snr:
            abar[-1] = 2.0**-24  # as diffusers: close to 0 so that the first sigma is finite
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(abar).float()
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        T = num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        cfg = self.config
        self._data = cfg.algorithm_type in DATA_ALGORITHMS
        self._sde = cfg.algorithm_type.startswith("sde")
        self._learned = prediction_type == "epsilon" and variance_type in ("learned", "learned_range")
        self._schedule = next((_GRID[k] for k in _SCHEDULES if getattr(cfg, k)), None)  # diffusers' precedence
        self._start, self._n, self._device = 0, 0, torch.device("cpu")
        self._grids: dict[tuple, tuple] = {}   # set_timesteps' arguments -> (sigmas, timesteps, alphas_cumprod)
        self._kept: dict[tuple, object] = {}   # (grid, plan key) -> plan, across set_timesteps
        self._init_fast()

    # ----------------------------------------------------------------------------------------- the run
    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None):
        """The run's grid (``fastdiff.samplers.dpmsolver.dpm_solver_grid``, diffusers' values), its plans."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError(f"mu: needs use_dynamic_shifting=True and time_shift_type='exponential', got "
                                 f"{cfg.use_dynamic_shifting}, {cfg.time_shift_type!r}")
            self.config.flow_shift = np.exp(mu)  # as diffusers: an attribute of the frozen config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None and self._schedule in ("karras", "lu"):
            raise ValueError(f"Cannot use `timesteps` with `config.use_{self._schedule}_"
                             f"{'lambdas' if self._schedule == 'lu' else 'sigmas'} = True`")
        if timesteps is not None and self._schedule in ("exponential", "beta"):
            raise ValueError(f"Cannot set `timesteps` with `config.use_{self._schedule}_sigmas = True`.")
        if timesteps is not None and self._schedule == "flow":  # diffusers fails on them (a TypeError)
            raise ValueError("timesteps: custom timesteps cannot be used with `config.use_flow_sigmas = True`")
        abar = self.alphas_cumprod
        key = (num_inference_steps, None if timesteps is None else tuple(int(t) for t in timesteps),
               float(self.config.flow_shift), id(abar), abar._version)
        grid = self._grids.get(key)
        if grid is None:  # a pipeline sets the same grid every call: computed once
            sig, ts = dpm_solver_grid(
                abar.double().numpy(), num_inference_steps, timesteps=timesteps, spacing=cfg.timestep_spacing,
                steps_offset=cfg.steps_offset, sigma_schedule=self._schedule, final_sigmas_type=cfg.final_sigmas_type,
                lambda_min_clipped=cfg.lambda_min_clipped, beta_schedule=cfg.beta_schedule,
                flow_shift=self.config.flow_shift)
            if len(self._grids) >= MAX_PLANS:
                self._grids.pop(next(iter(self._grids)))
            grid = self._grids[key] = (torch.from_numpy(sig.astype(np.float32)), torch.from_numpy(ts), abar)
        self.sigmas = grid[0].clone()  # the caller's to change, as diffusers' new tensor is
        ts = grid[1].numpy()
        self.timesteps = grid[1].to(device=device, dtype=torch.int64, copy=True)
        self.num_inference_steps = len(ts)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._start = 0
        self._restart(ts)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the denoising starts (img2img): the warm-up counts from there, as diffusers' does."""
        super().set_begin_index(begin_index)
        self._start = self._begin_index
        self._prepare()

    @property
    def lower_order_nums(self) -> int:
        """Steps taken in this run, at most solver_order (diffusers' warm-up counter; read only)."""
        return min(self.config.solver_order, self._stepper.index - self._start) if self._started else 0

    # ---------------------------------------------------------------------------------------- plans
    def _prepare(self) -> None:
        """The run's plans for its start (0, or begin_index), without guidance, on the run's device."""
        if self.num_inference_steps is None:
            return
        self._grid = self.sigmas.detach().double().cpu().numpy()
        self._grid_key = self._grid.tobytes()
        self._n = len(self._grid) - 1
        for plan in self._step_plans(self._start, None):
            plan.coef(self._device)

    def _grid_plan(self, key: tuple, build):
        """``_plan`` of this grid's `key`, kept across ``set_timesteps`` calls that give the same grid (the
        base forgets its plans whenever ``sigmas`` is assigned; building one costs ~1 ms, and the kernels'
        first call of a new table ~0.3 ms more)."""
        full = (self._grid_key, *key)

        def kept():
            plan = self._kept.get(full)
            if plan is None:
                if len(self._kept) >= 2 * MAX_PLANS:
                    self._kept.pop(next(iter(self._kept)))
                plan = self._kept[full] = build()
            return plan

        return self._plan(key, kept)

    def _step_plans(self, start: int, guidance) -> tuple:
        """(update,), or (x0, update from the thresholded x0) with dynamic thresholding."""
        cfg, grid = self.config, self._grid
        kw = dict(algorithm_type=cfg.algorithm_type, prediction_type=cfg.prediction_type,
                  flow=bool(cfg.use_flow_sigmas))

        def update(x0_given, g):
            orders = multistep_orders(self._n, cfg.solver_order, begin=start, lower_order_final=cfg.lower_order_final,
                                      euler_at_final=cfg.euler_at_final, final_sigmas_type=cfg.final_sigmas_type)
            return dpmsolver_multistep(grid, orders, solver_type=cfg.solver_type, x0_given=x0_given, guidance=g, **kw)

        if not cfg.thresholding:
            return (self._grid_plan(("update", start, guidance), lambda: update(False, guidance)),)
        return (self._grid_plan(("x0", guidance), lambda: dpmsolver_x0(grid, guidance=guidance, **kw)),
                self._grid_plan(("update from x0", start), lambda: update(True, None)))

    # ------------------------------------------------------------------------------------------ rows
    def _first_row(self, timestep) -> int:
        """The first step's row (diffusers' ``_init_step_index``): a host timestep must be one of the run's
        (diffusers would silently take the last step); a device timestep is not read (no sync), nor one
        being traced: the run then starts at 0."""
        if torch.compiler.is_compiling() or (isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"):
            self._started = True
            return self._stepper.index
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep: expected one timestep, got a tensor of shape {tuple(timestep.shape)}")
            t = timestep.item()
        elif isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            t = int(timestep)
        else:
            raise TypeError(f"timestep: expected an int or an integer tensor, got {type(timestep).__name__} "
                            f"{timestep!r}")
        if t not in self._host_timesteps:
            raise ValueError(f"timestep: {t} is not one of this run's timesteps {self._host_timesteps} (diffusers "
                             f"would silently run the last step)")
        row = self._step_row(int(t))
        self._start = row
        return row

    # ----------------------------------------------------------------------------------------- noise
    def _sde_noise(self, like: torch.Tensor, dtype: torch.dtype, generator, variance_noise, seeds) -> tuple:
        """(noise, seeds): diffusers' draw (``randn_tensor`` float32, shaped like the converted output, every
        step - the last too), the given ``variance_noise`` (which wins over a generator, as in diffusers),
        or per-sample seeds for in-kernel noise."""
        if variance_noise is not None:
            return variance_noise.to(device=like.device, dtype=dtype), None
        seeds = self._seeds if seeds is None else philox.check_seeds(seeds)
        if seeds is not None:
            return None, self._seed_tensor(seeds, like.shape[0], like.device)
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=torch.float32).to(dtype), None

    def _out_dtype(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.dtype:
        """diffusers' prev_sample dtype: that of its converted output (the model output's own where the
        conversion is the identity, else the promoted one)."""
        cfg = self.config
        same = cfg.prediction_type == "sample" if self._data else \
            cfg.prediction_type == "epsilon" and not cfg.thresholding
        return model_output.dtype if same else torch.promote_types(model_output.dtype, sample.dtype)

    # ------------------------------------------------------------------------------------------ step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> SchedulerOutput | tuple:
        """One multistep DPM-Solver step; see DPMSolverMultistepScheduler.step. fastdiff's own arguments:
        ``seeds`` (in-kernel noise at the step index), ``guidance_scale`` (fused classifier-free guidance:
        ``model_output`` holds ``[uncond; cond]``, 2B rows)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                             "creating the scheduler")
        self._check_fresh()
        if self._learned:  # diffusers keeps the "mean" channels of a learned-variance model
            model_output = model_output[:, :3]
        e, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        x, dtype, out_dtype = sample, sample.dtype, None
        if e.dtype != dtype:
            out_dtype, dtype = self._out_dtype(e, x), torch.promote_types(e.dtype, dtype)
            e, x = e.to(dtype), x.to(dtype)
            e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        row = self._stepper.index if self._started else self._first_row(timestep)
        if row >= self._n:
            raise ValueError(f"step: this run has {self._n} steps and all were taken (step_index {row}); call "
                             f"set_timesteps to start another")
        noise = seed_t = None
        if self._sde:
            noise, seed_t = self._sde_noise(e, dtype, generator, variance_noise, seeds)
        key, last = (self._start, guidance_scale), self._last_plans
        plans = last[1] if last is not None and last[0] == key else self._cached_plans(
            key, self._step_plans, self._start, None if guidance_scale is None else float(guidance_scale))
        if len(plans) == 1:
            prev = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], noise=noise, seeds=seed_t)[0]
        else:  # the per-sample quantile splits the step: x0, threshold it, then the update from it
            (x0,) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plans[0], advance=False)
            prev = self._stepper.step(x, self._threshold(x0), plan=plans[1], noise=noise, seeds=seed_t)[0]
        if out_dtype is not None and out_dtype != dtype:
            prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return output(SchedulerOutput, prev)

    # ------------------------------------------------------------------------------- forward process
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x = alpha*x0 + sigma*noise at the grid point of each timestep, one fused pass. The grid point is
        diffusers': the step index (after a first step), begin_index, or each timestep's place in
        ``timesteps`` (second of two equal ones, the last when absent), found on the device."""
        self._check_fresh()
        dtype = torch.promote_types(original_samples.dtype, noise.dtype)
        device = original_samples.device
        if self.begin_index is None:
            grid = self.timesteps.to(device)
            hit = timesteps.to(device).reshape(-1, 1) == grid.reshape(1, -1)
            count = hit.sum(1)
            first, second = hit.int().argmax(1), (hit & (hit.cumsum(1) == 2)).int().argmax(1)
            rows = torch.where(count == 0, len(grid) - 1, torch.where(count > 1, second, first))
        else:
            index = self.step_index if self.step_index is not None else self.begin_index
            rows = torch.full((max(timesteps.numel(), 1),), index, dtype=torch.int64, device=device)

        def build():
            alpha, sigma, _ = alpha_sigma(self.sigmas.double().numpy(), bool(self.config.use_flow_sigmas))
            return q_sample_plan(alpha, sigma, row_label="grid point")

        plan = self._plan(("q_sample",), build)
        (out,) = self._stepper.step(original_samples.to(dtype), noise=noise.to(dtype), plan=plan,
                                    rows=rows.to(torch.int64), advance=False)
        return out
