"""``IADBScheduler``: iterative alpha-(de)blending (Heitz, Belcour, Chambon, SIGGRAPH 2023) in the diffusers
style, one fused kernel per step (``fastdiff.samplers.iadb``): Euler, or DPM-Solver++ / UniPC through the
flow-form plan builders (s = 1 - alpha, velocity -D)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fastdiff.integrations.diffusers.base import output
from fastdiff.integrations.diffusers.ddm import FloatGridRun
from fastdiff.samplers.ddm import check_choice
from fastdiff.samplers.iadb import SOLVERS, alpha_grid, iadb_plan, solver_plans
from fastdiff.training import iadb as training


@dataclass
class IADBSchedulerOutput(BaseOutput):
    """prev_sample: the sample at the next alpha."""

    prev_sample: torch.Tensor


class IADBScheduler(FloatGridRun, SchedulerMixin, ConfigMixin):
    """Deblending from noise (alpha = 0) to data (alpha = 1): ``timesteps`` are the alpha grid's first N
    points, ``step(D, alpha, x)`` moves to the next one.

    Args:
        solver: "euler" (the paper's x + (alpha' - alpha)*D), "dpmsolver++" or "unipc" (multistep, orders
            ``solver_order`` 1-3; their history is the stepper's ring).
        num_inference_steps: the default of ``set_timesteps`` (the code's T = 128).
    """

    order = 1

    @register_to_config
    def __init__(self, solver: str = "euler", solver_order: int = 2, num_inference_steps: int = 128):
        check_choice("solver", solver, SOLVERS)
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order: expected 1, 2 or 3, got {solver_order!r}")
        self.init_noise_sigma = 1.0
        self._init_run()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The uniform alpha grid of N steps; ``timesteps`` = its first N points (0 first)."""
        n = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        self._alphas = alpha_grid(n)
        self.num_inference_steps = n
        self._set_grid(self._alphas[:-1], device)
        self._plans_for(None)

    def _plans_for(self, guidance) -> tuple:
        cfg = self.config
        key = (len(self._alphas), cfg.solver, cfg.solver_order, guidance)
        if cfg.solver == "euler":
            return self._plan(key, lambda: (iadb_plan(self._alphas, guidance), None))
        return self._plan(key, lambda: solver_plans(self._alphas, cfg.solver, cfg.solver_order, guidance))

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, *, seeds=None,
             guidance_scale: float | None = None) -> IADBSchedulerOutput | tuple:
        """x at the next alpha from D = ``model_output`` at alpha = ``timestep`` (the next entry of
        ``timesteps``). ``guidance_scale``: fused classifier-free guidance (``model_output`` holds
        [uncond; cond]); ``seeds``: accepted for uniformity (no noise)."""
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output: expected a tensor D (the estimate of x1 - x0), got "
                            f"{type(model_output).__name__}")
        i = self._call_index(timestep)
        (e,), e_uncond, x = self._inputs([model_output], sample, guidance_scale)
        first, rest = self._plans_for(None if guidance_scale is None else float(guidance_scale))
        plan, row = (first, i) if rest is None or i == 0 else (rest, i - 1)
        (prev, *_) = self._stepper.step(x, e, e_uncond=e_uncond, plan=plan, row=row)
        self._next = i + 1
        if not return_dict:
            return (prev,)
        return output(IADBSchedulerOutput, prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_alpha = alpha*data + (1 - alpha)*noise: alpha a float in [0, 1] or one per sample; one fused pass."""
        return training.add_noise(original_samples, timesteps, noise, backend=self.backend)
