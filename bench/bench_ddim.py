"""Benchmark one DDIM step (Song et al. 2021, eq. 12) across providers; the harness times and reports.

    x0     = clamp((x - sqrt(1 - abar_t)*eps)/sqrt(abar_t), -1, 1)         (diffusers' clip_sample=True)
    x_prev = sqrt(abar_prev)*x0 + sqrt(1 - abar_prev - std^2)*eps + std*z,  std = eta*sigma_t

Default: x, eps of shape (16, 4, 256, 256) fp32 on CPU; DDIMScheduler() config, set_timesteps(50), the
middle timestep (480 -> 460); eta = 0. With --eta > 0 every provider gets the same noise tensor z
(diffusers via ``variance_noise``, so it does no RNG work), and the ``(seeds)`` rows use fastdiff's
in-kernel Philox noise (checked against diffusers given that same Philox noise). The eager and
torch.compile rows run the paper-shaped reference (``fastdiff.reference.ddim.ddim_step``). Every output is
checked against diffusers' ``prev_sample`` before timing.

    python bench/bench_ddim.py [--shape 16x4x256x256] [--dtype fp32] [--eta 0] [--providers 'fastdiff-*']
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import numpy as np
import torch

try:
    from bench import harness
except ImportError:  # run as `python bench/bench_ddim.py`
    import harness  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip

T_TRAIN = 1000


def main(argv: list[str] | None = None) -> int:
    p = harness.add_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), (16, 4, 256, 256))
    p.add_argument("--eta", type=float, default=0.0, help="0: deterministic DDIM; 1: DDPM-like (noise)")
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps (default %(default)s)")
    args = p.parse_args(argv)
    shape, dtype, device = harness.parse_shape(args.shape), harness.DTYPES[args.dtype], torch.device(args.device)
    from fastdiff import backends, ops, philox, schedules
    from fastdiff.reference.ddim import ddim_step
    from fastdiff.samplers.ddim import ddim_plan

    abar = schedules.alphas_cumprod(schedules.betas(T_TRAIN))
    grid = schedules.timesteps(args.steps, T_TRAIN, "leading", 0)
    k = len(grid) // 2
    t, t_prev = int(grid[k]), int(grid[k]) - T_TRAIN // args.steps
    plan = ddim_plan(abar, np.array([t]), np.array([t_prev]), eta=args.eta, clip_sample=True, with_x0=False)
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    noisy = args.eta > 0
    z = torch.randn(shape, generator=g).to(device, dtype) if noisy else None
    seeds = philox.sample_seeds(0, shape[0]).to(device)
    n = math.prod(shape) * x.element_size()  # bytes of one tensor

    def diffusers_step(noise: torch.Tensor | None, **kw) -> torch.Tensor:
        """diffusers' prev_sample for noise z: the expected output of the checks."""
        from diffusers import DDIMScheduler

        s = DDIMScheduler()
        s.set_timesteps(args.steps, device=device)
        return s.step(eps, s.timesteps[k], x, eta=args.eta, variance_noise=noise, **kw).prev_sample

    def reference(x, eps, z):
        """The paper-shaped step, with this step's abar values as Python floats."""
        return ddim_step(x, eps, float(abar[t]), float(abar[t_prev]), args.eta, z, clip=1.0)[0]

    try:
        expected = diffusers_step(z)
    except ImportError:  # no diffusers: the float64 reference of the same math
        expected = reference(x.double(), eps.double(), None if z is None else z.double()).to(dtype)

    def fused(backend: str, noise: str = "tensor", inplace: bool = False) -> Bench:
        """fastdiff.ops.step with a plan row, x_next only: into a preallocated buffer, or in place over x
        as ``fastdiff.loop.sample`` steps (the first call's output is the one checked)."""
        ok, why = backends.status(backend, device)
        if not ok:
            raise Skip(why)
        kw = plan.step_args(0, device)
        xs = x.clone() if inplace else x
        buf = xs if inplace else torch.empty_like(x)
        expect = None
        if noisy and noise == "seeds":
            kw.update(seeds=seeds, noise_step=0)
            expect = diffusers_step(philox.randn(seeds, math.prod(shape[1:]), step=0).reshape(shape).to(dtype))
        elif noisy:
            kw.update(noise=z)
        return Bench(lambda: ops.step(x=xs, e=[eps], out=[buf], backend=backend, **kw)[0],
                     n * (3 + (noisy and noise != "seeds")), expected=expect)

    def scheduler() -> Bench:
        """FastDDIMScheduler.step: the diffusers drop-in (allocates prev_sample and x0 every call)."""
        from fastdiff.integrations.diffusers import FastDDIMScheduler

        s = FastDDIMScheduler()
        s.set_timesteps(args.steps, device=device)
        ts = s.timesteps[k]
        return Bench(lambda: s.step(eps, ts, x, eta=args.eta, variance_noise=z).prev_sample, n * (4 + noisy))

    def diffusers() -> Bench:
        from diffusers import DDIMScheduler  # ImportError: the harness reports a skipped row

        s = DDIMScheduler()
        s.set_timesteps(args.steps, device=device)
        ts = s.timesteps[k]
        return Bench(lambda: s.step(eps, ts, x, eta=args.eta, variance_noise=z).prev_sample, n * (4 + noisy))

    def k_diffusion() -> Bench:
        """Euler (eta=0) / Euler-ancestral step in k-diffusion's x/sqrt(abar) coordinates with a
        CompVisDenoiser-style denoiser (x0 = x - sigma*eps, clamped). Clamping the denoiser output equals
        diffusers' use_clipped_model_output=True, so that is the expected output here."""
        from fastdiff.kdiffusion_oracle import sampling as load

        try:
            sampling = load()
        except ImportError as exc:
            raise Skip(f"k_diffusion.sampling not importable ({exc})") from None
        a_t, a_p = float(abar[t]), float(abar[t_prev])
        sigmas = torch.tensor([((1 - a_t) / a_t) ** 0.5, ((1 - a_p) / a_p) ** 0.5], device=device)
        x_ve = x / a_t**0.5

        def model(v, sigma):
            return (v - sigma.view(-1, *[1] * (v.dim() - 1)) * eps).clamp(-1, 1)

        def step():
            if noisy:
                return sampling.sample_euler_ancestral(model, x_ve, sigmas, disable=True, eta=args.eta,
                                                       noise_sampler=lambda *_: z)
            return sampling.sample_euler(model, x_ve, sigmas, disable=True)

        try:
            step()
        except TypeError as exc:  # an old k-diffusion without eta/noise_sampler
            raise Skip(f"k_diffusion API: {exc}") from None
        return Bench(step, n * (3 + noisy), expected=diffusers_step(z, use_clipped_model_output=True) / a_p**0.5)

    native = backends.choose(device) if device.type in ("cpu", "cuda") else "torch"
    providers = [Provider("diffusers", diffusers)]
    for b in ("cpu", "cuda", "triton", "torch"):
        providers.append(Provider(f"fastdiff-{b}", functools.partial(fused, b)))
        if b != "torch":
            providers.append(Provider(f"fastdiff-{b} (in place)", functools.partial(fused, b, inplace=True)))
        if noisy and b != "torch":
            providers.append(Provider(f"fastdiff-{b} (seeds)", functools.partial(fused, b, "seeds")))
    providers += [
        Provider(f"fastdiff-{native} (scheduler)", scheduler),
        Provider("eager-torch", lambda: Bench(lambda: reference(x, eps, z), n * (3 + noisy))),
        Provider("torch.compile", lambda: harness.compile_bench(reference, (x, eps, z), n * (3 + noisy), device)),
        Provider("k-diffusion", k_diffusion),
    ]
    return harness.run("ddim_step", args, providers, expected, argv)


if __name__ == "__main__":
    sys.exit(main())
