"""Per-step host cost: a whole 20-step DDIM trajectory (``set_timesteps`` included, the model's output a
fixed tensor so that only the sampler is timed) per provider, reported per step, at the SD-latent shape
(1, 4, 64, 64) and at (2, 4, 128, 128), where the Python around a kernel decides - not memory.

Providers: diffusers' ``DDIMScheduler``; fastdiff's drop-in ``FastDDIMScheduler`` (as diffusers' docs call
it, and with ``return_dict=False`` as diffusers' pipelines call it); the fused op ``ops.step`` with a
plan (two outputs, as the drop-in); the fused loop ``fastdiff.loop.sample`` (in place, one output); the
paper-shaped reference eager and under ``torch.compile`` (inductor; the abar values as 0-d tensors so one
graph serves every step). Every provider's final sample is checked against diffusers' first (to 1e-4
relative in fp32: twenty steps of float32 rounding).

    python bench/bench_overhead.py [--shapes 1x4x64x64,2x4x128x128] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

try:
    from bench import harness
except ImportError:  # run as `python bench/bench_overhead.py`
    import harness  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip


def main(argv: list[str] | None = None) -> int:
    p = harness.add_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), (1, 4, 64, 64))
    p.add_argument("--shapes", default="1x4x64x64,2x4x128x128", help="comma-separated shapes, one run each")
    p.add_argument("--steps", type=int, default=20, help="steps per trajectory (default %(default)s)")
    args = p.parse_args(argv)
    failed = 0
    for shape in args.shapes.split(","):
        args.shape = shape
        failed |= run_shape(args, argv)
    return failed


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
