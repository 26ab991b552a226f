"""What every fastdiff drop-in for a diffusers scheduler shares (``FastSchedulerMixin``):

- **noise**: given a ``generator`` (or neither generator nor seeds) it is drawn exactly as diffusers draws
  it, so images match diffusers'; given ``seeds`` (``step(..., seeds=)`` or ``set_seeds``) it comes from
  the in-kernel Philox stream keyed per sample, with no extra pass;
- **the run**: a ``fastdiff.stepper.Stepper`` (step index = noise counter, history ring), restarted by
  ``set_timesteps`` and ``set_begin_index`` as diffusers' schedulers restart theirs;
- **plans**: built in ``set_timesteps`` and cached (a bounded number, keyed by everything they depend on
  that may change between calls: ``num_inference_steps``, eta, ...); all rebuilt when a tensor they come
  from (``alphas_cumprod``, ...) is assigned or changed in place;
- **rows**: a timestep selects its row in a table indexed by timestep (``_timestep_row``: host values
  checked, device tensors stay on the device - no sync), or the step index selects it (``_step_row``,
  diffusers' ``step_index`` of multistep schedulers);
- ``add_noise`` / ``get_velocity`` as fused forward-process plans, and dynamic thresholding as an op.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import torch

from fastdiff import ops, philox
from fastdiff.noise import cpu_generator, randn_like, randn_tensor
from fastdiff.plan import Plan
from fastdiff.samplers.forward import q_sample_plan, velocity_plan
from fastdiff.stepper import Stepper

MAX_PLANS = 8  # plans kept per scheduler (eta and use_clipped_model_output may change every call)
_INTEGER_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}


def output(cls, *values):
    """``cls(*values)`` for a diffusers ``BaseOutput`` class, built the way its ``__post_init__`` leaves
    it (each field an attribute, each non-None field an item) in ~1 us instead of ~3.5: the one
    per-step cost that was diffusers' own. tests/test_ddim_user.py checks the two are indistinguishable."""
    if torch.compiler.is_compiling():  # dynamo traces the ordinary construction, not this one
        return cls(*values)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    if not issubclass(cls, OrderedDict) or len(values) > len(names):  # a BaseOutput built otherwise
        return cls(*values)
    o = cls.__new__(cls)
    fields = o.__dict__
    for name, value in zip(names, values):
        if value is not None:
            OrderedDict.__setitem__(o, name, value)
        fields[name] = value
    for name in names[len(values):]:
        fields[name] = None
    return o


_FIELDS: dict[type, tuple[str, ...]] = {}


def watched(name: str, doc: str = "") -> property:
    """A public attribute that plans are built from: assigning it makes them be rebuilt."""
    def get(self):
        try:
            return self.__dict__[name]
        except KeyError:  # not set (yet): hasattr() says False, as for any attribute
            raise AttributeError(name) from None

    def set(self, value):
        self.__dict__[name] = value
        self.__dict__["_generation"] = self.__dict__.get("_generation", 0) + 1

    return property(get, set, doc=doc or f"diffusers' ``{name}``; assigning it rebuilds the plans")


class FastSchedulerMixin:
    """The shared part of the drop-ins (see the module docstring). A subclass sets the diffusers
    attributes in ``__init__``, calls ``_init_fast()``, and implements ``_prepare()`` (build the plans of
    the current run) and ``step``. ``backend`` (None = automatic, or "cuda", "triton", "cpu", "torch")
    picks the kernels."""

    _tensor_sources = ("alphas_cumprod",)  # tensors plans are built from (in-place changes are seen too)
    alphas_cumprod = watched("alphas_cumprod")

    def _init_fast(self) -> None:
        self._T = self.config.num_train_timesteps
        self._seeds = None
        self._plans: dict[tuple, Plan] = {}
        self._seed_cache: dict[tuple, tuple] = {}
        self._begin_index = None
        self._built = None
        self._last_plans = None
        self._host_timesteps, self._started = None, False
        self._stepper = Stepper(q_sample_plan(1.0, 0.0))  # the run's state; each call names its plan
        self._refresh()

    @property
    def backend(self) -> str | None:
        """The kernels ``step`` runs: None (automatic), "cuda", "triton", "cpu" or "torch"."""
        return self._stepper.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value not in (None, "cuda", "triton", "cpu", "torch"):
            raise ValueError(f"backend: expected None, 'cuda', 'triton', 'cpu' or 'torch', got {value!r}")
        self._stepper.backend = value

    # ---------------------------------------------------------------------------------- the run's state
    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the denoising starts (img2img); the noise counter of ``seeds`` starts there too."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index: expected an int >= 0, got {begin_index!r}")
        self._begin_index = int(begin_index)
        self._started = True
        self._stepper.reset(self._begin_index)

    def _restart(self, timesteps=None) -> None:
        """A new run (``set_timesteps``, given the run's timesteps on the host): begin_index forgotten, as
        diffusers does; the step index unknown until the first step; plans brought up to date."""
        self._begin_index = None
        self._host_timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self._started = False
        self._stepper.reset(0)
        self._refresh()

    def set_seeds(self, seeds) -> None:
        """In-kernel noise for every following step: an int (per-sample seeds derived from it), a sequence
        of ints or a ``[B]`` int64 tensor (one seed per sample), or None for diffusers' own noise again."""
        self._seeds = philox.check_seeds(seeds)

    # ---------------------------------------------------------------------------------------- plans
    def _state(self) -> tuple:
        """What the plans are built from: assignments (generation), and the tensors with their versions
        (in-place changes)."""
        sources = tuple(self.__dict__[n] for n in self._tensor_sources)
        return self.__dict__.get("_generation", 0), sources, tuple(t._version for t in sources)

    def _refresh(self) -> None:
        """Rebuild the plans if what they are built from changed since they were built."""
        state = self._state()
        if self._built is None or state[0] != self._built[0] or state[2] != self._built[2]:
            self._plans.clear()
            self._last_plans = None
            if "alphas_cumprod" in self._tensor_sources:  # (flow-matching schedulers have none)
                self._abar = self.alphas_cumprod.detach().double().cpu().numpy()
            self._built = state
        self._prepare()

    def _prepare(self) -> None:
        """Build (or find) the plans the current run needs; called by set_timesteps and after changes."""

    def _cached_plans(self, key: tuple, build, *args) -> tuple:
        """The plans of one kind of step (``build(*args)`` when `key` differs from the last call's): a step
        repeats the last call's arguments almost always, and comparing one tuple is the cheapest check."""
        last = self._last_plans
        if last is not None and last[0] == key:
            return last[1]
        plans = build(*args)
        self._last_plans = (key, plans)
        return plans

    def _plan(self, key: tuple, build) -> Plan:
        """The cached plan of `key`, built by ``build()`` when missing (at most MAX_PLANS are kept)."""
        plan = self._plans.get(key)
        if plan is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"plan {key} was not built before torch.compile traced step: call "
                                   f"set_timesteps (and one eager step with these arguments) first")
            if len(self._plans) >= MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = build()
        return plan

    def _check_fresh(self) -> None:
        """Rebuild the plans if a source changed (cheap: a few version counters; not under torch.compile)."""
        if torch.compiler.is_compiling():
            return
        generation, sources, versions = self._built
        stale = self.__dict__.get("_generation", 0) != generation
        for t, v in zip(sources, versions):
            stale = stale or t._version != v
        if stale:
            self._refresh()

    # ----------------------------------------------------------------------------------------- rows
    def _timestep_row(self, timestep, device: torch.device) -> tuple[int, torch.Tensor | None]:
        """(row, rows) of `timestep` in a table with one row per training timestep and a last row for
        timestep -1 (which diffusers' "trailing" spacing yields for some step counts; row -1 counts from
        the end). A host value (int, numpy integer, CPU tensor) is checked and becomes `row`; a device
        tensor, or several timesteps (one per sample), stays a tensor `rows` - no sync with the GPU."""
        T = self._T
        if type(timestep) is torch.Tensor and not timestep.dim() and timestep.device.type == "cpu" \
                and timestep.dtype in _INTEGER_DTYPES and not torch.compiler.is_compiling():
            t = int(timestep)  # the common case first: an element of `timesteps` on the host
            if -1 <= t < T:
                return t, None
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype not in _INTEGER_DTYPES:
                raise TypeError(f"timestep: expected an integer timestep (as in timesteps), got a "
                                f"{timestep.dtype} tensor")
            host = timestep.device.type == "cpu"
            if host and timestep.numel() == 1 and not torch.compiler.is_compiling():
                timestep = int(timestep)
            else:
                if host and timestep.numel() and not torch.compiler.is_compiling():
                    lo, hi = int(timestep.min()), int(timestep.max())
                    if lo < -1 or hi >= T:
                        raise ValueError(f"timestep: expected values in [-1, {T}), got {lo}..{hi}")
                return 0, timestep.reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
        elif isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
            raise TypeError(f"timestep: expected an int or an integer tensor, got {type(timestep).__name__} "
                            f"{timestep!r}")
        t = int(timestep)
        if not -1 <= t < T:
            raise ValueError(f"timestep: expected a value in [-1, {T}), got {t}")
        return t, None

    def _step_row(self, timestep) -> int:
        """The row of a plan indexed by step (multistep schedulers): diffusers' ``step_index``. The first
        step of a run finds it - ``begin_index`` when set, else the place of `timestep` in the run's
        timesteps (the second of two equal ones, the last step when absent, as diffusers' index_for_timestep
        does) - and later steps count on (the stepper's index). A device timestep is not read (that would
        wait for the GPU): a run without begin_index then starts at step 0, where pipelines start it."""
        if not self._started:
            self._started = True
            grid = self._host_timesteps
            if grid is not None and not torch.compiler.is_compiling() and not (
                    isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"):
                t = int(timestep)
                where = [i for i, v in enumerate(grid) if v == t]
                self._stepper.reset(where[1] if len(where) > 1 else where[0] if where else len(grid) - 1)
        return self._stepper.index

    @property
    def step_index(self):
        """The index of the next step (None before the first step of a run), as diffusers' multistep
        schedulers report it."""
        return self._stepper.index if self._started else None

    # ---------------------------------------------------------------------------------------- noise
    def _noise(self, needed: bool, like: torch.Tensor, dtype: torch.dtype, generator=None, variance_noise=None,
               seeds=None) -> tuple:
        """(noise, seeds) of a step that draws noise: diffusers' draw (``randn_tensor`` shaped and typed like
        `like`, the model output), the given tensor, or per-sample seeds; (None, None) for no noise."""
        if not needed:
            return None, None
        if variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        if variance_noise is not None:
            return variance_noise.to(dtype), None
        seeds = self._seeds if seeds is None else philox.check_seeds(seeds)
        if seeds is not None:
            return None, self._seed_tensor(seeds, like.shape[0], like.device)
        if like.dtype == torch.float32 and like.is_cpu and like.is_contiguous() and cpu_generator(generator):
            z = randn_like(like, generator)  # = randn_tensor(like.shape, generator, like.device, like.dtype) here
        else:
            z = randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (z if z.dtype == dtype else z.to(dtype)), None

    def _seed_tensor(self, seeds, batch: int, device: torch.device) -> torch.Tensor:
        """The [B] int64 seeds on `device`: derived or copied once, not every step."""
        if isinstance(seeds, torch.Tensor) and seeds.device == device:
            return philox.seed_tensor(seeds, batch)
        key = (seeds if isinstance(seeds, int) else id(seeds), batch, device)
        cached = self._seed_cache.get(key)
        if cached is None or cached[1] is not seeds and not isinstance(seeds, int):
            if len(self._seed_cache) >= MAX_PLANS:
                self._seed_cache.clear()
            cached = self._seed_cache[key] = (philox.seed_tensor(seeds, batch, device), seeds)
        return cached[0]

    # ------------------------------------------------------------------------------ forward process
    def _forward(self, kind: str, x: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        self._check_fresh()
        dtype = torch.promote_types(x.dtype, noise.dtype)
        row, rows = self._timestep_row(timesteps, x.device)
        alpha, sigma = np.sqrt(self._abar), np.sqrt(1.0 - self._abar)
        build = q_sample_plan if kind == "q_sample" else velocity_plan
        plan = self._plan((kind,), lambda: build(alpha, sigma))
        (out,) = self._stepper.step(x.to(dtype), noise=noise.to(dtype), plan=plan, row=row, rows=rows,
                                    advance=False)
        return out

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*noise, one fused pass, per-sample timesteps."""
        return self._forward("q_sample", original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v_t = sqrt(abar_t)*noise - sqrt(1 - abar_t)*sample (Salimans & Ho 2022), one fused pass."""
        return self._forward("velocity", sample, noise, timesteps)

    @staticmethod
    def _guidance_inputs(model_output: torch.Tensor, sample: torch.Tensor, guidance_scale) -> tuple:
        """(e, e_uncond) of a step: the model output as it is, or - with fused classifier-free guidance
        (``guidance_scale`` given) - its halves: ``model_output`` holds ``[uncond; cond]``, 2B rows for a
        batch of B, combined as ``uncond + g*(cond - uncond)`` inside the step's one pass."""
        if guidance_scale is None:
            return model_output, None
        B = sample.shape[0]
        if model_output.shape[0] != 2 * B or model_output.shape[1:] != sample.shape[1:]:
            raise ValueError(f"model_output: with guidance_scale it holds [uncond; cond], shape "
                             f"{(2 * B, *sample.shape[1:])} for sample {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        return model_output[B:], [model_output[:B]]

    def _threshold(self, x0: torch.Tensor) -> torch.Tensor:
        return ops.dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
