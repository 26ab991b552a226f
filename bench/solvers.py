"""The solvers that ``bench_multistep.py`` and ``bench_overhead.py`` run (bench/README.md), and what both do
with them: a diffusers scheduler (or its fastdiff drop-in) run over a whole trajectory whose model output is
a fixed tensor, ``set_timesteps`` included, so that only the sampler is timed.

Each ``Solver`` is one diffusers scheduler class at one configuration (its defaults unless ``config`` says
otherwise), its fastdiff drop-in, whether its ``step`` draws noise, and the tensors one fused step must
move (``tensors``: the sample, model output, history and kept samples it reads plus what it writes; the
noise tensor of stochastic solvers is counted apart). Noise: the stochastic schedulers get a
``torch.Generator`` seeded the same for every trajectory, which draws diffusers' noise in both diffusers and
the drop-ins; ``noise`` pre-draws that same sequence once (step i's noise is the i-th draw: every solver
here draws at consecutive steps from the first), for the providers that take noise tensors.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

try:
    from bench import harness
except ImportError:  # run as `python bench/<script>.py`
    import harness  # type: ignore[no-redef]

SEED = 0  # of every trajectory's generator (and of the pre-drawn noise)


@dataclass(frozen=True)
class Solver:
    name: str
    diffusers: str                     # the diffusers scheduler class
    fast: str                          # its drop-in in fastdiff.integrations.diffusers
    tensors: float                     # tensors one fused step reads + writes, noise aside (README: bytes)
    config: dict = field(default_factory=dict)
    stochastic: bool = False           # step() draws noise: it takes generator=
    steps: int | None = None           # num_inference_steps when fixed for the solver (else --steps)
    noise_fp32: bool = False           # diffusers draws float32 noise (else in the model output's dtype)
    kdiffusion: str | None = None      # k-diffusion's sampler of the same method (same grid, same noise)
    kdiffusion_skip: str = ""          # why there is no k-diffusion row, where k-diffusion has a relative


SOLVERS = {s.name: s for s in (
    Solver("dpmpp_2m", "DPMSolverMultistepScheduler", "FastDPMSolverMultistepScheduler", 5,
           kdiffusion="sample_dpmpp_2m"),
    Solver("dpmpp_3m", "DPMSolverMultistepScheduler", "FastDPMSolverMultistepScheduler", 6, {"solver_order": 3},
           kdiffusion_skip="k-diffusion has no DPM-Solver++(3M) ODE sampler; sample_dpmpp_3m_sde at eta=0 takes "
                           "the exponential integrator's D2 weight, not diffusers' (fastdiff/reference/dpmsolver.py)"),
    Solver("sde_dpmpp_2m", "DPMSolverMultistepScheduler", "FastDPMSolverMultistepScheduler", 5,
           {"algorithm_type": "sde-dpmsolver++"}, stochastic=True, noise_fp32=True, kdiffusion="sample_dpmpp_2m_sde"),
    Solver("unipc", "UniPCMultistepScheduler", "FastUniPCMultistepScheduler", 8),
    Solver("euler", "EulerDiscreteScheduler", "FastEulerDiscreteScheduler", 3, kdiffusion="sample_euler"),
    Solver("euler_ancestral", "EulerAncestralDiscreteScheduler", "FastEulerAncestralDiscreteScheduler", 3,
           stochastic=True, kdiffusion="sample_euler_ancestral"),
    Solver("heun", "HeunDiscreteScheduler", "FastHeunDiscreteScheduler", 4.5, kdiffusion="sample_heun"),
    Solver("ddpm", "DDPMScheduler", "FastDDPMScheduler", 3, stochastic=True),
    Solver("lcm", "LCMScheduler", "FastLCMScheduler", 3, stochastic=True, steps=4),
    Solver("flow_euler", "FlowMatchEulerDiscreteScheduler", "FastFlowMatchEulerDiscreteScheduler", 3),
    Solver("ddim", "DDIMScheduler", "FastDDIMScheduler", 3),
)}


def select(spec: str) -> list[Solver]:
    """The solvers named by `spec`: comma-separated names or globs, or "all"."""
    pats = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [s for s in SOLVERS.values() if any(p == "all" or fnmatch.fnmatchcase(s.name, p) for p in pats)]
    if not chosen:
        raise SystemExit(f"{spec!r} matches none of {list(SOLVERS)}")
    return chosen


def parser(doc: str, names: str, shapes: str) -> argparse.ArgumentParser:
    """The harness's flags, ``--<names>`` (which solvers), ``--steps`` and ``--shapes`` (one run each)."""
    p = harness.add_args(argparse.ArgumentParser(description=doc.split("\n")[0]), (1, 4, 64, 64))
    p.add_argument(f"--{names}", default="all", help="comma-separated solver names or globs (default: all)")
    p.add_argument("--steps", type=int, default=20, help="num_inference_steps (default %(default)s)")
    p.add_argument("--shapes", default=shapes, help="comma-separated shapes, one run each (default %(default)s)")
    return p


def run_each(spec: str, args, run: Callable[[Solver], int]) -> int:
    """``run(solver)`` for every solver `spec` selects at every shape of ``args.shapes`` (set as ``args.shape``,
    which the harness reads); 1 if any run found a wrong output."""
    failed = 0
    for solver in select(spec):
        for shape in args.shapes.split(","):
            args.shape = shape
            failed |= run(solver)
    return failed


def scheduler_class(solver: Solver, fast: bool) -> type:
    """The diffusers class, or fastdiff's drop-in (ImportError, a skipped row, when this fastdiff lacks it)."""
    module = importlib.import_module("fastdiff.integrations.diffusers" if fast else "diffusers")
    name = solver.fast if fast else solver.diffusers
    cls = getattr(module, name, None)
    if cls is None:
        raise ImportError(f"{module.__name__} has no {name}")
    return cls


def new_scheduler(solver: Solver, fast: bool = False, backend: str | None = None):
    """The scheduler at the solver's config; a drop-in runs on `backend`. ``is_scale_input_called`` is set
    (the Euler schedulers otherwise warn every step that no pipeline called ``scale_model_input``)."""
    s = scheduler_class(solver, fast)(**solver.config)
    if fast:
        s.backend = backend
    if hasattr(s, "is_scale_input_called"):
        s.is_scale_input_called = True
    return s


def num_steps(solver: Solver, steps: int) -> int:
    return solver.steps or steps


def trajectory(scheduler, solver: Solver, x_T: torch.Tensor, eps: torch.Tensor, n: int, return_dict: bool = True,
               generator: bool = True):
    """fn() -> the final sample: ``set_timesteps(n)``, then ``step`` at every timestep with the model output
    `eps`, as a pipeline calls it (stochastic solvers: a generator seeded ``SEED`` at every call, unless
    `generator` is False: a drop-in given seeds)."""
    device = x_T.device
    gen = torch.Generator(device) if solver.stochastic and generator else None
    kw = {"generator": gen} if gen is not None else {}

    def fn():
        if gen is not None:
            gen.manual_seed(SEED)
        scheduler.set_timesteps(n, device=device)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(eps, t, x, **kw).prev_sample if return_dict else \
                scheduler.step(eps, t, x, return_dict=False, **kw)[0]
        return x

    return fn


def calls(solver: Solver, n: int) -> int:
    """Model calls (``step`` calls) of an n-step run: Heun's steps but the last take two."""
    return 2 * n - 1 if solver.name == "heun" else n


def scheduler_bench(solver: Solver, x_T, eps, n: int, nbytes: int, tol: float, *, fast: bool = False,
                    backend: str | None = None, return_dict: bool = True, seeds=None, expected=None) -> harness.Bench:
    """The trajectory of diffusers' scheduler or the drop-in (``seeds``: the drop-in's in-kernel noise)."""
    s = new_scheduler(solver, fast, backend)
    if seeds is not None:
        s.set_seeds(seeds)
    return harness.Bench(trajectory(s, solver, x_T, eps, n, return_dict, seeds is None), nbytes, expected=expected,
                         steps=calls(solver, n), tol=tol)


def noise(solver: Solver, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    """The noise diffusers' scheduler draws in an n-step run from a generator seeded ``SEED``: the i-th draw
    is step i's (n draws; a run that draws fewer uses the first ones)."""
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator(like.device).manual_seed(SEED)
    dtype = torch.float32 if solver.noise_fp32 else like.dtype
    return [randn_tensor(like.shape, generator=gen, device=like.device, dtype=dtype).to(like.dtype)
            for _ in range(calls(solver, n))]
