"""The sampling loop (DESIGN.md layer 6): model call, fused step, callbacks, CUDA-graph capture.

``sample`` runs a plan eagerly; ``CapturedSampler`` records the whole loop (model calls included) into
one CUDA graph and replays it: possible because no step syncs with the host and every coefficient is
read from the plan's device table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff import ops
from fastdiff.plan import Plan

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample(
    model: Model,
    x: torch.Tensor,
    plan: Plan,
    timesteps: torch.Tensor,
    *,
    seeds: torch.Tensor | None = None,
    backend: str | None = None,
    callback: Callable[[int, torch.Tensor, tuple[torch.Tensor, ...]], None] | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Run every step of `plan`: ``e = model(x, timesteps[s])``, then the fused step.

    Args:
        model: ``model(x, t) -> output`` (what the plan's prediction type expects).
        x: ``[B, ...]`` starting sample (noise). Updated in place when ``inplace``.
        plan: one row per step (``fastdiff.samplers``); its ``terms`` say what the step reads.
        timesteps: ``[steps]`` (or ``[steps, B]``) model timesteps, on x's device.
        seeds: ``[B]`` int64 per-sample seeds when the plan draws noise (step s uses counter s).
        callback: ``callback(s, x_next, extra_outputs)`` after each step.
    """
    t = plan.terms
    if t.n_e != 1 or t.guided or t.n_m or t.x_last or t.offset or t.row or t.var:
        raise ValueError(f"plan: sample() feeds one model output and no history, offsets or tables; "
                         f"{plan.name} needs {t}")
    if plan.terms.noise and seeds is None:
        raise ValueError(f"seeds: {plan.name} draws noise; pass [B] int64 per-sample seeds")
    if len(timesteps) != plan.steps:
        raise ValueError(f"timesteps: expected {plan.steps} (one per plan step), got {len(timesteps)}")
    x = x if inplace else x.clone()
    noise = {"seeds": seeds} if plan.terms.noise else {}
    extra = [torch.empty_like(x) for _ in range(plan.terms.n_out - 1)]
    for s in range(plan.steps):
        e = model(x, timesteps[s])
        outs = ops.step(x=x, e=[e], out=[x, *extra], noise_step=s, backend=backend, **noise,
                        **plan.step_args(s, x.device))
        if callback is not None:
            callback(s, x, outs[1:])
    return x


class CapturedSampler:
    """The whole sampling loop of `plan` recorded once into a CUDA graph, replayed per call.

    The graph reads the plan's device table, so ``plan.refill`` (same shape) changes the coefficients of
    later replays without a new capture. Inputs must keep the example's shape, dtype and device.
    """

    def __init__(self, model: Model, plan: Plan, timesteps: torch.Tensor, example: torch.Tensor, *,
                 seeds: torch.Tensor | None = None, backend: str | None = None, warmup: int = 2):
        if example.device.type != "cuda":
            raise ValueError(f"example: CUDA graphs need a cuda tensor, got {example.device}")
        self.x = example.clone()
        run = lambda: sample(model, self.x, plan, timesteps, seeds=seeds, backend=backend, inplace=True)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, autotuning, allocations
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            run()

    def __call__(self, x_T: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x_T)
        self.graph.replay()
        return self.x.clone()
