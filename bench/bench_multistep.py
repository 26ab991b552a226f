"""Benchmark every solver as a whole sampling trajectory (the model's output a fixed tensor, so that only the
sampler is timed), per step, across providers; the harness checks, then times and reports.

Solvers (``bench/solvers.py``; diffusers' default configuration unless said): dpmpp_2m (DPM-Solver++ 2M),
dpmpp_3m (solver_order=3), sde_dpmpp_2m (sde-dpmsolver++), unipc (bh2, order 2), euler, euler_ancestral,
heun (its steps are model calls: 2N - 1 for N steps), ddpm, lcm (4 steps, its usual count, whatever --steps
says), flow_euler, ddim. One harness run per (solver, shape), op ``multistep_<solver>``.

Providers: ``diffusers`` (the scheduler: set_timesteps and the loop of step); ``fastdiff-<auto> (scheduler)``
(the drop-in, called the same way; stochastic solvers also ``(scheduler, seeds)``, in-kernel Philox noise);
``fastdiff-{cpu,cuda,triton,torch}``: the fused step alone, a ``Stepper`` driving the plans of the solver's
builder in ``fastdiff.samplers`` over diffusers' grid, writing only what the trajectory needs (the next
sample, the history and kept samples; no x0) into preallocated buffers; ``eager-torch`` and
``torch.compile``: the paper-shaped reference (``fastdiff.reference``) step by step, compiled per step with
its scalars as 0-d tensors and the loop eager (one graph per kind of step, never across steps);
``k-diffusion`` and ``fastdiff-<auto> (k-diffusion API)`` where k-diffusion has the sampler. Noise: the
schedulers draw it from a generator seeded alike (so the drop-in's equals diffusers'); the other providers
get that same sequence as tensors; the ``(seeds)`` rows draw Philox noise in the kernel and are checked
against the reference run on that noise. Every output is checked before timing (1e-3 relative in fp32:
a trajectory's rounding).

    python bench/bench_multistep.py [--solvers 'dpmpp_*,unipc'] [--steps 20] [--shapes 1x4x64x64,16x4x256x256]
"""

from __future__ import annotations

import functools
import math
import sys
import time

import torch

try:
    from bench import harness, solvers
    from bench.methods import METHODS, reference_loop, tensorize
except ImportError:  # run as `python bench/bench_multistep.py`
    import harness  # type: ignore[no-redef]
    import solvers  # type: ignore[no-redef]
    from methods import METHODS, reference_loop, tensorize  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip


def main(argv: list[str] | None = None) -> int:
    args = solvers.parser(__doc__, "solvers", "1x4x64x64,4x4x128x128,16x4x256x256").parse_args(argv)

    def run(solver) -> int:
        torch._dynamo.reset()  # a step compiled at another shape would be recompiled with dynamic shapes
        return run_solver(solver, args, argv)

    return solvers.run_each(args.solvers, args, run)


# ------------------------------------------------------------------------------------------------- the run
def run_solver(solver, args, argv) -> int:
    from fastdiff import backends, philox
    from fastdiff.stepper import Stepper

    shape, dtype, device = harness.parse_shape(args.shape), harness.DTYPES[args.dtype], torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x_T, eps = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    n, noisy = solvers.num_steps(solver, args.steps), solver.stochastic
    tol = 100 * harness.TOL[dtype]  # a trajectory's rounding, not one step's
    one = x_T.numel() * x_T.element_size()
    nbytes, seeds_nbytes = int(one * (solver.tensors + noisy)), int(one * solver.tensors)
    native = backends.choose(device)
    calls = solvers.calls(solver, n)

    expected = solvers.trajectory(solvers.new_scheduler(solver), solver, x_T, eps, n)()
    grid = solvers.new_scheduler(solver)
    grid.set_timesteps(n, device="cpu")
    method = METHODS[solver.name](grid, n)
    zs = solvers.noise(solver, n, x_T) if noisy else None
    seeds = philox.sample_seeds(solvers.SEED, shape[0], device=device)

    @functools.cache
    def seeds_expected() -> torch.Tensor:
        """The reference (float64) on the Philox noise the kernels draw at step i (noise_step = the step)."""
        per = math.prod(shape[1:])
        z = [philox.randn(seeds, per, step=i).reshape(shape).double() for i in range(calls)]
        return reference_loop(method.eager, x_T.double(), eps.double(), z)().to(dtype)

    def scheduler(**kw) -> Bench:
        return solvers.scheduler_bench(solver, x_T, eps, n, nbytes, tol, **kw)

    def scheduler_seeds() -> Bench:
        return solvers.scheduler_bench(solver, x_T, eps, n, seeds_nbytes, tol, fast=True, backend=native, seeds=seeds,
                                       expected=seeds_expected())

    def fused(backend: str, in_kernel: bool = False) -> Bench:
        """The stepper over the plans, no scheduler: x_next into one of three buffers (never one the call
        reads), history and kept samples by the stepper; noise the pre-drawn tensors, or in-kernel seeds."""
        ok, why = backends.status(backend, device)
        if not ok:
            raise Skip(why)
        st = Stepper(method.fused[0][0], backend=backend)
        bufs = [torch.empty_like(x_T) for _ in range(3)]
        kw = {"seeds": seeds} if in_kernel else {}

        def fn():
            st.reset()
            x, saved = x_T, None
            for i, (plan, row, second) in enumerate(method.fused):
                z = zs[i] if zs is not None and not in_kernel else None
                outs = st.step(x, eps, plan=plan, row=row, m=saved if second else None, out=bufs[i % 3], noise=z, **kw)
                saved = (outs[1], x) if len(outs) > 1 and not plan.keeps else None  # Heun's x0 and start sample
                x = outs[0]
            return x

        return Bench(fn, seeds_nbytes if in_kernel else nbytes, expected=seeds_expected() if in_kernel else None,
                     steps=calls, tol=tol)

    def eager() -> Bench:
        return Bench(reference_loop(method.eager, x_T, eps, zs), nbytes, steps=calls, tol=tol)

    def compiled() -> Bench:
        """Each step function compiled at its first call (torch.compile of one step, the loop eager); compile s
        is the first trajectory, every graph compiled (one per kind of step: order, noise or none)."""
        cs = [(f, tensorize(a, device), dr) for f, a, dr in method.compiled or method.eager]
        steps, t0 = {}, time.perf_counter()
        x, state = x_T, ()
        for i, (step, a, draws) in enumerate(cs):
            call = (x, eps, state, zs[i] if draws and zs is not None else None, *a)
            if step not in steps:
                steps[step] = harness.compile_fn(step, call, device)[0]
            x, state = steps[step](*call)
        return Bench(reference_loop(cs, x_T, eps, zs, steps), nbytes, compile_s=time.perf_counter() - t0,
                     steps=calls, tol=tol)

    def k_diffusion(fast: bool) -> Bench:
        """k-diffusion's sampler (or fastdiff's of the same API) on diffusers' grid in k-diffusion's
        coordinates x/alpha, with the denoiser x0 = x - sigma*eps; a grid to sigma 0 ends in diffusers'."""
        if solver.kdiffusion is None:
            raise Skip(solver.kdiffusion_skip)
        if fast:
            from fastdiff.integrations import kdiffusion as module
            kw = {"backend": native}
        else:
            from fastdiff.kdiffusion_oracle import sampling
            try:
                module, kw = sampling(), {}
            except ImportError as exc:
                raise Skip(f"k_diffusion.sampling not importable ({exc})") from None
        sample, sigmas = getattr(module, solver.kdiffusion), method.k_sigmas.to(device)
        x_ve = x_T * method.k_scale

        def model(v, sigma):
            return v - sigma.view(-1, *[1] * (v.dim() - 1)) * eps

        def fn():
            if zs is None:
                return sample(model, x_ve, sigmas, disable=True, **kw)
            drawn = iter(zs)  # k-diffusion draws step i's noise i-th (none into sigma 0)
            return sample(model, x_ve, sigmas, disable=True, noise_sampler=lambda *_: next(drawn), **kw)

        return Bench(fn, nbytes, steps=calls, tol=tol)

    providers = [Provider("diffusers", scheduler),
                 Provider(f"fastdiff-{native} (scheduler)", lambda: scheduler(fast=True, backend=native))]
    if noisy:
        providers.append(Provider(f"fastdiff-{native} (scheduler, seeds)", scheduler_seeds))
    for b in ("cpu", "cuda", "triton", "torch"):
        providers.append(Provider(f"fastdiff-{b}", functools.partial(fused, b)))
        if noisy and b != "torch":
            providers.append(Provider(f"fastdiff-{b} (seeds)", functools.partial(fused, b, True)))
    providers += [Provider("eager-torch", eager), Provider("torch.compile", compiled)]
    if solver.kdiffusion or solver.kdiffusion_skip:
        providers += [Provider("k-diffusion", lambda: k_diffusion(False)),
                      Provider(f"fastdiff-{native} (k-diffusion API)", lambda: k_diffusion(True))]
    return harness.run(f"multistep_{solver.name}", args, providers, expected, argv)


if __name__ == "__main__":
    sys.exit(main())
