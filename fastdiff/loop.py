"""The sampling loop (layer 6): model call, fused step, callbacks, CUDA-graph capture.

``sample`` runs a plan through a ``fastdiff.stepper.Stepper``; ``CapturedSampler`` records the whole loop
(model calls included) into one CUDA graph and replays it: possible because no step syncs with the host,
every coefficient is read from the plan's device table and the stepper's buffers stay put.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff.plan import Plan
from fastdiff.stepper import Stepper

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
    """Run every row of `plan`: ``e = model(x, timesteps[s])``, then the fused step s.

    Args:
        model: ``model(x, t) -> output`` (what the plan's prediction type expects), or a tuple of two
            outputs for plans that read two (DDM's (C, eps)).
        x: ``[B, ...]`` starting sample (noise), any memory layout. Updated in place when ``inplace``.
        plan: one row per step (``fastdiff.samplers``); history slots and x_last are carried along.
        timesteps: ``[steps]`` (or ``[steps, B]``) model timesteps, on x's device.
        seeds: ``[B]`` int64 per-sample seeds when the plan draws noise (step s draws Philox step s).
        callback: ``callback(s, x_next, other_outputs)`` after each step.
    """
    if plan.terms.guided:
        raise ValueError(f"plan: {plan.name} is guided; sample() feeds one model call per step, so drive "
                         f"guided plans with fastdiff.stepper.Stepper (e_uncond=)")
    if len(timesteps) != plan.steps:
        raise ValueError(f"timesteps: expected {plan.steps} (one per plan step), got {len(timesteps)}")
    target = x
    x = x.clone(memory_format=torch.contiguous_format) if not (inplace and x.is_contiguous()) else x
    stepper = Stepper(plan, backend=backend)
    for s in range(plan.steps):
        e = model(x, timesteps[s])
        outs = stepper.step(x, e, seeds=seeds, out=x)  # in place: each element is read before it is written
        if callback is not None:
            callback(s, x, outs[1:])
    if inplace and x is not target:
        target.copy_(x)
        return target
    return x.contiguous(memory_format=_memory_format(target))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout a result should keep: channels_last stays channels_last (the steps run contiguous)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CapturedSampler:
    """The whole sampling loop of `plan` recorded once into a CUDA graph, replayed per call.

    The graph reads the plan's device table, so ``plan.refill`` (same shape) changes the coefficients of
    later replays without a new capture. Inputs must keep the example's shape, dtype and device.
    """

    def __init__(self, model: Model, plan: Plan, timesteps: torch.Tensor, example: torch.Tensor, *,
                 seeds: torch.Tensor | None = None, backend: str | None = None, warmup: int = 2):
        if example.device.type != "cuda":
            raise ValueError(f"example: CUDA graphs need a cuda tensor, got {example.device}")
        self.x = example.clone(memory_format=torch.contiguous_format)
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
