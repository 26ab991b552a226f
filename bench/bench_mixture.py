"""Benchmark the two mixture methods across providers; the harness times and reports.

- ``mixddpm_noising`` (Mix-DDPM, Wang et al. 2024): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps + m_n(t) at
  T = 1000 training steps, per-sample t, m_n(t) = sum_{i<=t} sqrt(beta_i abar_t/abar_i) mu_{k(n,i)}/sqrt(D).
  Every provider gets the same components k [B, T] (drawn once, outside the timing) and computes m_n(t) and
  x_t from them; the ``(scheduler)`` row is ``MixDDPMScheduler.add_noise`` with seeds, which also draws k.
- ``ddim_gmm_step`` (DDIM-GMM, Gabbur, arXiv 2311.04938): one step 480 -> 460 (50 steps, eta = --eta, clip),
  K = 8 ORTHO offsets (s = 1), the same components k [B] and noise z for every provider:
  x_prev = mu_t + delta_{k_n} + sqrt(max(sigma_t^2 - diag Delta_{k_n}, 0)) z.

Providers: fastdiff-{cpu,cuda,triton,torch} (the fused step with the method's plan; DDIM-GMM also ``(seeds)``:
its noise drawn in the kernel, checked against the reference given that Philox noise), eager-torch and
torch.compile of the paper-shaped reference (``fastdiff.reference.mixddpm`` / ``ddim_gmm``; eager is the seed
code's way). Speed-ups are against torch.compile given the same draws, except for the rows that draw their
noise: the fused ``(seeds)`` step and ``MixDDPMScheduler.add_seeded_noise`` (x_t and eps, the training target,
in one pass) are against the faster of ``torch.compile (own noise)`` (the reference drawing it by
``torch.randn_like``, compiled: inductor's RNG) and ``torch.randn + torch.compile`` (drawn eagerly, the step
compiled); ``eager-torch (own noise)`` is the seed code's way. Every output is checked before timing.

    python bench/bench_mixture.py [--ops mixddpm_noising,ddim_gmm_step] [--shapes 16x4x256x256,1x4x64x64]
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
except ImportError:  # run as `python bench/bench_mixture.py`
    import harness  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip

T_TRAIN = 1000
OPS = ("mixddpm_noising", "ddim_gmm_step")


def fused_provider(backend: str, device, call, nbytes: int) -> Bench:
    from fastdiff import backends

    ok, why = backends.status(backend, device)
    if not ok:
        raise Skip(why)
    return Bench(functools.partial(call, backend), nbytes)


def noising(args, shape, dtype, device) -> int:
    from fastdiff import ops, philox, schedules
    from fastdiff.reference.mixddpm import mixture_offset, q_sample
    from fastdiff.samplers import mixddpm as mix

    betas64 = schedules.betas(T_TRAIN)
    abar64 = schedules.alphas_cumprod(betas64)
    B, D = shape[0], math.prod(shape[1:])
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    t = torch.randint(0, T_TRAIN, (B,), generator=g).to(device)
    k = mix.draw_components(mix.WEIGHTS, B, T_TRAIN, generator=g).to(device)
    betas, abar, means = (torch.from_numpy(a).to(device, torch.float32) for a in (betas64, abar64, np.array(mix.MEANS)))
    G = torch.from_numpy(mix.offset_weights(abar64)).to(device, torch.float32)
    plan = mix.q_sample_plan(abar64)
    coef = plan.coef(device)
    buf = torch.empty_like(x0)
    n = math.prod(shape) * x0.element_size()

    def reference(x0, t, eps, k):
        return q_sample(x0, t, eps, abar, mixture_offset(k, t, betas, means, D))

    expected = reference(x0.double(), t, eps.double(), k).to(dtype) if device.type == "cpu" else \
        reference(x0, t, eps, k)

    def fused(backend):
        offset = mix.global_offset(G, k, t, means, D)
        return ops.step(coef, x=x0, noise=eps, offset=offset, rows=t, out=[buf], backend=backend)[0]

    def scheduler() -> Bench:
        from fastdiff.integrations.diffusers.mixddpm import MixDDPMScheduler

        s, seeds = MixDDPMScheduler(), philox.sample_seeds(0, B).to(device)
        kk = mix.draw_components(mix.WEIGHTS, B, T_TRAIN, seeds=seeds, device=device)
        return Bench(lambda: s.add_noise(x0, eps, t, seeds=seeds), 3 * n, expected=reference(x0, t, eps, kk))

    def seeded_noise() -> Bench:
        """The training noising drawing eps too: x_t and eps written in one pass (eps drawn in the kernel)."""
        from fastdiff.integrations.diffusers.mixddpm import MixDDPMScheduler

        s, seeds = MixDDPMScheduler(), philox.sample_seeds(0, B).to(device)
        kk = mix.draw_components(mix.WEIGHTS, B, T_TRAIN, seeds=seeds, device=device)
        ee = philox.randn(seeds.cpu(), D, domain=philox.DOMAIN_TRAIN).reshape(shape).to(device, dtype)
        return Bench(lambda: s.add_seeded_noise(x0, t, seeds)[0], 3 * n, expected=reference(x0, t, ee, kk),
                     baseline=harness.DRAWING_BASELINE)

    providers = [Provider(f"fastdiff-{b}", functools.partial(fused_provider, b, device, fused, 3 * n))
                 for b in ("cpu", "cuda", "triton", "torch")]
    providers += [
        Provider("fastdiff (scheduler, seeds)", scheduler),
        Provider("eager-torch", lambda: Bench(lambda: reference(x0, t, eps, k), 3 * n)),
        Provider("torch.compile", lambda: harness.compile_bench(reference, (x0, t, eps, k), 3 * n, device)),
        # the noising drawing its eps (the training target, returned too): in the kernel, or by randn_like
        Provider("fastdiff (scheduler, add_seeded_noise)", seeded_noise),
    ]
    providers += [Provider(way, functools.partial(harness.drawing_bench, reference, (x0, t, k), 2, 3 * n, device, way,
                                                  True)) for way in harness.DRAWING]
    return harness.run("mixddpm_noising", args, providers, expected)


def gmm_step(args, shape, dtype, device) -> int:
    from fastdiff import ops, philox, schedules
    from fastdiff.reference.ddim_gmm import ddim_gmm_step
    from fastdiff.samplers.ddim_gmm import build_offsets, ddim_gmm_plan

    abar = schedules.alphas_cumprod(schedules.betas(T_TRAIN))
    t, prev = 480, 460
    plan = ddim_gmm_plan(abar, np.array([t]), np.array([prev]), eta=args.eta, clip_sample=True, with_x0=False)
    B, D = shape[0], math.prod(shape[1:])
    delta64, var64 = build_offsets(D, 8, 1.0, "ortho", None, 0)
    delta, var = delta64.to(device, torch.float32), var64.to(device, torch.float32)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    k = philox.categorical(torch.rand(B, generator=g), [1 / 8] * 8).to(device)
    a_t, a_p = float(abar[t]), float(abar[prev])
    buf = torch.empty_like(x)
    n = math.prod(shape) * x.element_size()
    noisy = args.eta > 0
    kw = plan.step_args(0, device)
    tables = dict(component=k, delta_table=delta, **({"var_table": var, "noise": z} if noisy else {}))

    def reference(x, eps, z, k, delta, var):
        return ddim_gmm_step(x, eps, a_t, a_p, k, delta, var, args.eta, z if noisy else None, clip=1.0)

    args_ref = (x, eps, z, k, delta, var)
    expected = reference(*(a.double() if a.is_floating_point() else a for a in args_ref)).to(dtype)

    def fused(backend):
        return ops.step(x=x, e=[eps], out=[buf], backend=backend, **kw, **tables)[0]

    seeds = philox.sample_seeds(0, B).to(device)
    seeded = dict(tables, noise=None, seeds=seeds, noise_step=0)

    def fused_seeds(backend):
        return ops.step(x=x, e=[eps], out=[buf], backend=backend, **kw, **seeded)[0]

    def with_seeds(backend) -> Bench:
        """In-kernel Philox noise (no z read), checked against the reference given that same noise."""
        b = fused_provider(backend, device, fused_seeds, n * 3)
        b.baseline = harness.DRAWING_BASELINE
        z_philox = philox.randn(seeds, D, step=0).reshape(shape).to(device, dtype)
        b.expected = reference(*(a.double() if a.is_floating_point() else a
                                 for a in (x, eps, z_philox, k, delta, var))).to(dtype)
        return b

    nbytes = n * (3 + noisy)
    providers = [Provider(f"fastdiff-{b}", functools.partial(fused_provider, b, device, fused, nbytes))
                 for b in ("cpu", "cuda", "triton", "torch")]
    providers += [
        Provider("eager-torch", lambda: Bench(lambda: reference(*args_ref), nbytes)),
        Provider("torch.compile", lambda: harness.compile_bench(reference, args_ref, nbytes, device)),
    ]
    if noisy:  # the step drawing its noise: in the kernel (seeds), or as the seed code does (randn_like)
        providers += [Provider(f"fastdiff-{b} (seeds)", functools.partial(with_seeds, b)) for b in ("cpu", "cuda")]
        own = (x, eps, k, delta, var)
        providers += [Provider(way, functools.partial(harness.drawing_bench, reference, own, 2, n * 3, device, way))
                      for way in harness.DRAWING]
    return harness.run("ddim_gmm_step", args, providers, expected)


def main(argv: list[str] | None = None) -> int:
    p = harness.add_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), (16, 4, 256, 256))
    p.set_defaults(baseline="torch.compile")
    p.add_argument("--shapes", default="16x4x256x256,1x4x64x64", help="comma-separated shapes (default %(default)s)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated of %(default)s")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM-GMM eta (default %(default)s: offsets and noise)")
    args = p.parse_args(argv)
    dtype, device = harness.DTYPES[args.dtype], torch.device(args.device)
    failed = 0
    for shape_s in args.shapes.split(","):
        args.shape = shape_s
        shape = harness.parse_shape(shape_s)
        for op in args.ops.split(","):
            if op not in OPS:
                raise SystemExit(f"--ops: expected names from {OPS}, got {op!r}")
            failed |= (noising if op == "mixddpm_noising" else gmm_step)(args, shape, dtype, device)
    return failed


if __name__ == "__main__":
    sys.exit(main())
