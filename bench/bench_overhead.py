"""Per-step host cost: a whole 20-step trajectory (``set_timesteps`` included, the model's output a fixed
tensor so that only the sampler is timed) per provider, reported per step, at the SD-latent shape
(1, 4, 64, 64) and at (2, 4, 128, 128), where the Python around a kernel decides - not memory. One run per
scheduler (``--schedulers``, the solvers of ``bench/solvers.py``; default all) and shape, op
``overhead_<name>_<steps>_steps``.

DDIM (``ddim``) has the providers below. Every other scheduler: diffusers' class and fastdiff's drop-in, called
as diffusers' docs call it (``.prev_sample``) and with ``return_dict=False`` as its pipelines call it; the
stochastic ones get a generator seeded alike at every trajectory, so the drop-in draws diffusers' noise.

DDIM providers: diffusers' ``DDIMScheduler``; fastdiff's drop-in ``FastDDIMScheduler`` (as diffusers' docs call
it, and with ``return_dict=False`` as diffusers' pipelines call it); the fused op ``ops.step`` with a
plan (two outputs, as the drop-in); the fused loop ``fastdiff.loop.sample`` (in place, one output); the
paper-shaped reference eager and under ``torch.compile`` (inductor; the abar values as 0-d tensors so one
graph serves every step). Every provider's final sample is checked against diffusers' first (to 1e-3
relative in fp32: twenty steps of float32 rounding).

    python bench/bench_overhead.py [--schedulers 'ddim,dpmpp_*'] [--shapes 1x4x64x64,2x4x128x128] [--steps 20]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

try:
    from bench import harness, solvers
except ImportError:  # run as `python bench/bench_overhead.py`
    import harness  # type: ignore[no-redef]
    import solvers  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip


def main(argv: list[str] | None = None) -> int:
    args = solvers.parser(__doc__, "schedulers", "1x4x64x64,2x4x128x128").parse_args(argv)
    return solvers.run_each(args.schedulers, args, lambda solver: run_shape(args, argv) if solver.name == "ddim"
                            else run_scheduler(solver, args, argv))


def run_scheduler(solver, args, argv) -> int:
    """diffusers' scheduler and the drop-in (return_dict True and False) over an n-step trajectory."""
    from fastdiff import backends

    shape, dtype, device = harness.parse_shape(args.shape), harness.DTYPES[args.dtype], torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x_T, eps = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    n, tol, native = args.steps, 100 * harness.TOL[dtype], backends.choose(device)
    nbytes = int(x_T.numel() * x_T.element_size() * (solver.tensors + solver.stochastic))  # bench/README.md
    expected = solvers.trajectory(solvers.new_scheduler(solver), solver, x_T, eps, n)()

    def bench(**kw) -> Bench:
        return solvers.scheduler_bench(solver, x_T, eps, n, nbytes, tol, **kw)

    providers = [
        Provider("diffusers", bench),
        Provider(f"fastdiff-{native} {solver.fast}", lambda: bench(fast=True, backend=native)),
        Provider(f"fastdiff-{native} {solver.fast} (return_dict=False)",
                 lambda: bench(fast=True, backend=native, return_dict=False)),
    ]
    return harness.run(f"overhead_{solver.name}_{n}_steps", args, providers, expected, argv)


def run_shape(args, argv) -> int:
    from diffusers import DDIMScheduler

    from fastdiff import backends, ops
    from fastdiff.integrations.diffusers import FastDDIMScheduler
    from fastdiff.loop import sample
    from fastdiff.reference.ddim import ddim_step
    from fastdiff.samplers.ddim import ddim_plan

    shape, dtype, device = harness.parse_shape(args.shape), harness.DTYPES[args.dtype], torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x_T, eps = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    n, nbytes = args.steps, x_T.numel() * x_T.element_size()  # a step reads x, eps and writes x_prev (, x0)

    tol = 100 * harness.TOL[dtype]  # a trajectory's rounding, not one step's

    def trajectory(scheduler, return_dict=True):
        def fn():
            scheduler.set_timesteps(n, device=device)
            x = x_T
            for t in scheduler.timesteps:
                x = scheduler.step(eps, t, x).prev_sample if return_dict else \
                    scheduler.step(eps, t, x, return_dict=False)[0]
            return x
        return fn

    expected = trajectory(DDIMScheduler())()
    ref = DDIMScheduler()
    ref.set_timesteps(n)
    ts = ref.timesteps.numpy()
    abar = ref.alphas_cumprod.double().numpy()
    prev = np.append(ts[1:], -1)
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], 1.0)
    native = backends.choose(device)

    def scheduler(return_dict: bool) -> Bench:
        s = FastDDIMScheduler()
        s.backend = native
        return Bench(trajectory(s, return_dict), 4 * nbytes, steps=n, tol=tol)

    def fused_op() -> Bench:
        plan = ddim_plan(abar, ts, prev, clip_sample=True)  # x_prev and x0, as the drop-in
        coef = plan.coef(device)

        def fn():
            x = x_T
            for s in range(n):
                x, _ = ops.step(coef, x, [eps], row=s, clamp=True, n_out=2, backend=native)
            return x
        return Bench(fn, 4 * nbytes, steps=n, tol=tol)

    def fused_loop() -> Bench:
        plan = ddim_plan(abar, ts, prev, clip_sample=True, with_x0=False)
        timesteps = torch.from_numpy(ts).to(device)
        return Bench(lambda: sample(lambda x, t: eps, x_T, plan, timesteps, backend=native), 3 * nbytes,
                     steps=n, tol=tol)

    at = [torch.tensor(float(abar[t]), dtype=torch.float64, device=device) for t in ts]
    ap = [torch.tensor(float(v), dtype=torch.float64, device=device) for v in abar_prev]

    def reference(step):
        def fn():
            x = x_T
            for s in range(n):
                x, _ = step(x, eps, at[s], ap[s])
            return x
        return fn

    def eager() -> Bench:
        return Bench(reference(lambda x, e, a, b: ddim_step(x, e, a, b, clip=1.0)), 4 * nbytes, steps=n, tol=tol)

    def compiled() -> Bench:
        """The step compiled, the loop eager: what torch.compile gives a sampler written in torch."""
        step, compile_s = harness.compile_fn(lambda x, e, a, b: ddim_step(x, e, a, b, clip=1.0),
                                             (x_T, eps, at[0], ap[0]), device)
        return Bench(reference(step), 4 * nbytes, compile_s=compile_s, steps=n, tol=tol)

    providers = [
        Provider("diffusers", lambda: Bench(trajectory(DDIMScheduler()), 4 * nbytes, steps=n, tol=tol)),
        Provider(f"fastdiff-{native} FastDDIMScheduler", lambda: scheduler(True)),
        Provider(f"fastdiff-{native} FastDDIMScheduler (return_dict=False)", lambda: scheduler(False)),
        Provider(f"fastdiff-{native} ops.step", fused_op),
        Provider(f"fastdiff-{native} loop.sample", fused_loop),
        Provider("eager-torch", eager),
        Provider("torch.compile", compiled),
    ]
    return harness.run("overhead_ddim_20_steps", args, providers, expected, argv)


if __name__ == "__main__":
    sys.exit(main())
