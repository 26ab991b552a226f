"""``FastFlowMatchEulerDiscreteScheduler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` (rectified flow,
SD3 / Flux) with one fused kernel per step. The plan is ``fastdiff.samplers.flow``'s, one row per step of
the run's sigma grid (diffusers steps by step index: sigmas[i] -> sigmas[i+1]); ``scale_noise`` (img2img's
forward process) is a forward plan over the same grid. The schedule has no ``alphas_cumprod``, so the
VP-only parts of the shared base (``add_noise``, ``get_velocity``) are absent, as in diffusers."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging

from fastdiff.integrations.diffusers.base import FastSchedulerMixin, output, watched
from fastdiff.noise import randn_tensor
from fastdiff.samplers.flow import TIME_SHIFT_TYPES, flow_euler_plan, flow_sigmas, scale_noise_plan, train_sigmas

logger = logging.get_logger("diffusers.schedulers." + __name__)  # diffusers' verbosity applies
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _Absent:
    """An attribute diffusers' class does not have: reading it raises AttributeError (so hasattr is False)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        raise AttributeError(f"{owner.__name__} has no {self.name} (a flow-matching schedule has no alphas_cumprod)")


class FastFlowMatchEulerDiscreteScheduler(FastSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Fused drop-in for diffusers' ``FlowMatchEulerDiscreteScheduler``: the same arguments and defaults
    (diffusers 0.42), attributes and outputs. Beyond it: ``step(..., seeds=)`` and ``set_seeds`` for
    in-kernel noise (``stochastic_sampling``), ``guidance_scale`` for fused classifier-free guidance,
    ``backend`` to pick the kernels. ``step``'s ``per_token_timesteps`` (per-token sigmas) is refused: its
    step size varies per element, which the fused step's per-sample rows cannot express."""

    _compatibles: list = []
    _tensor_sources = ("sigmas",)
    sigmas = watched("sigmas")
    alphas_cumprod, add_noise, get_velocity = _Absent(), _Absent(), _Absent()
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        if use_beta_sigmas:
            import scipy  # noqa: F401  (ImportError without scipy, as diffusers)
        if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
            raise ValueError("use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: only one of them can be "
                             "used")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type: expected one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        sigmas = train_sigmas(num_train_timesteps, shift, use_dynamic_shifting)
        self.timesteps = sigmas * num_train_timesteps
        self._shift = shift
        self.sigmas = sigmas
        self.sigma_min, self.sigma_max = sigmas[-1].item(), sigmas[0].item()
        self._grid = self.timesteps.numpy()
        self._stochastic = stochastic_sampling
        self._init_fast()

    @property
    def shift(self) -> float:
        """The shift of the next ``set_timesteps`` (``set_shift`` changes it)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None):
        """The run's sigmas [N+1] (the final 0, or 1 with ``invert_sigmas``) and timesteps [N] = sigmas*T:
        ``num_inference_steps`` evenly between sigma_max and sigma_min, or custom ``sigmas``/``timesteps``;
        shifted by ``shift`` or, with ``use_dynamic_shifting``, by ``mu``; see ``fastdiff.samplers.flow``."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu: `mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas, timesteps: `sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                    timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("num_inference_steps: `sigmas` and `timesteps` should have the same length as "
                                 "num_inference_steps, if `num_inference_steps` is provided")
        elif sigmas is None and timesteps is None:
            raise ValueError("num_inference_steps: pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        if timesteps is not None and sigmas is None:
            logger.warning("`timesteps` were passed without `sigmas`: the timesteps are used as given, the sigmas "
                           "derived from them are shifted, so the two may disagree.")
        spacing = "karras" if cfg.use_karras_sigmas else "exponential" if cfg.use_exponential_sigmas else \
            "beta" if cfg.use_beta_sigmas else None
        s, t = flow_sigmas(num_inference_steps, self.sigma_min, self.sigma_max, cfg.num_train_timesteps,
                           shift=self.shift, mu=mu, sigmas=sigmas, timesteps=timesteps,
                           use_dynamic_shifting=cfg.use_dynamic_shifting, time_shift_type=cfg.time_shift_type,
                           shift_terminal=cfg.shift_terminal, spacing=spacing,
                           config_sigma_min=getattr(cfg, "sigma_min", None),
                           config_sigma_max=getattr(cfg, "sigma_max", None), invert_sigmas=cfg.invert_sigmas)
        self.num_inference_steps = num_inference_steps
        self._grid = t.numpy()
        self.timesteps, self.sigmas = t.to(device), s.to(device)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._restart()

    # ---------------------------------------------------------------------------------------- plans
    def _refresh(self) -> None:
        """The base's, for a grid of sigmas instead of alphas_cumprod: read the grid again when ``sigmas`` is
        assigned (set_timesteps does) or changed in place. Plans are keyed by the grid's values, so the
        cached ones stay valid: a run with the grid of an earlier one builds nothing."""
        state = self._state()
        if self._built is None or state[0] != self._built[0] or state[2] != self._built[2]:
            self._last_plans = None
            self._sig = self.sigmas.detach().double().cpu().numpy()
            self._sig_key = tuple(self._sig.tolist())
            self._built = state
        self._prepare()

    def _prepare(self) -> None:
        """The run's plan (no guidance), on the run's device; guided ones are built at their first step."""
        device = getattr(self, "_device", torch.device("cpu"))
        self._step_plan(None).coef(device)

    def _step_plan(self, guidance):
        stochastic = self._stochastic
        return self._plan(("euler", self._sig_key, stochastic, guidance),
                          lambda: flow_euler_plan(self._sig, stochastic=stochastic, guidance=guidance))

    # ----------------------------------------------------------------------------------------- step
    def _find(self, timestep) -> int:
        """diffusers' index_for_timestep on the host: where the timestep (compared in float32) is in the run's
        timesteps, the second of two equal ones."""
        t = np.float32(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        where = np.flatnonzero(self._grid == t)
        if not len(where):
            raise ValueError(f"timestep: {float(t)} is not one of this run's timesteps {self._grid.tolist()}"[:300])
        return int(where[1] if len(where) > 1 else where[0])

    def _index(self, timestep) -> int:
        """The step index: begin_index, else found from a host timestep at the first step (0 for a device
        one, which is not read), then counted on."""
        if not self._started:
            self._started = True
            if not torch.compiler.is_compiling() and (
                    not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu"):
                self._stepper.reset(self._find(timestep))
        return self._stepper.index

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        seeds: int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One Euler step sigmas[i] -> sigmas[i+1] of the velocity ``model_output`` (or, with
        ``stochastic_sampling``, x0 = x - sigma*u re-noised to sigmas[i+1]); see
        FlowMatchEulerDiscreteScheduler (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` are unused there
        too). fastdiff's own arguments: ``seeds`` (in-kernel noise), ``guidance_scale`` (fused
        classifier-free guidance: ``model_output`` holds ``[uncond; cond]``, 2B rows)."""
        if isinstance(timestep, (int, np.integer)) or (isinstance(timestep, torch.Tensor)
                                                        and timestep.dtype not in _FLOAT_DTYPES):
            raise ValueError("timestep: passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps "
                             "is not supported; pass one of `scheduler.timesteps`")
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps: per-token sigmas step each token by its own size, which the "
                             "fused step (per-sample coefficients) cannot; use diffusers' scheduler for them")
        self._check_fresh()
        row = self._index(timestep)
        plan = self._step_plan(None if guidance_scale is None else float(guidance_scale)) \
            if guidance_scale is not None or self._last_plans is None else self._last_plans[1]
        if guidance_scale is None:
            self._last_plans = (None, plan)
        if row >= plan.steps:
            raise ValueError(f"step: the run has {plan.steps} steps and all were taken (step index {row}); call "
                             f"set_timesteps for a new run")
        model_output, e_uncond = self._guidance_inputs(model_output, sample, guidance_scale)
        out_dtype, e, x = model_output.dtype, model_output, sample
        if out_dtype != sample.dtype:  # diffusers computes in float32 (or the promoted dtype) ...
            dtype = torch.promote_types(out_dtype, sample.dtype)
            e, x = model_output.to(dtype), sample.to(dtype)
            e_uncond = None if e_uncond is None else [e_uncond[0].to(dtype)]
        noise = None
        if self._stochastic:  # diffusers draws float32 noise shaped like the sample
            seeds = self._seeds if seeds is None else seeds
            if seeds is not None:
                noise, seeds = self._noise(True, x, x.dtype, None, None, seeds)
            else:
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        else:
            seeds = None
        (prev,) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plan, row=row, noise=noise, seeds=seeds)
        if prev.dtype != out_dtype:  # ... and returns the model output's dtype
            prev = prev.to(out_dtype)
        if not return_dict:
            return (prev,)
        return output(FlowMatchEulerDiscreteSchedulerOutput, prev)

    def scale_noise(self, sample: torch.FloatTensor, timestep: float | torch.FloatTensor,
                    noise: torch.FloatTensor | None = None) -> torch.FloatTensor:
        """The forward process x_s = (1 - s)*sample + s*noise (img2img's start), s = sigmas[i] at the step
        index of each timestep (begin_index, or the step index, when set; as diffusers' scale_noise). The
        timesteps are read on the host, as diffusers reads them."""
        if noise is None:
            raise ValueError("noise: scale_noise needs the noise tensor")
        self._check_fresh()
        ts = timestep.reshape(-1) if isinstance(timestep, torch.Tensor) else torch.tensor([timestep]).reshape(-1)
        if self.begin_index is None:
            idx = [self._find(t) for t in ts.cpu()]
        else:
            idx = [self.step_index if self.step_index is not None else self.begin_index] * len(ts)
        plan = self._plan(("scale_noise", self._sig_key), lambda: scale_noise_plan(self._sig))
        dtype = torch.promote_types(sample.dtype, noise.dtype)
        rows = torch.tensor(idx, dtype=torch.int64).to(sample.device)
        (out,) = self._stepper.step(sample.to(dtype), noise=noise.to(dtype), plan=plan, rows=rows, advance=False)
        return out
