"""Benchmark one DDM step and one IADB step across providers; the harness times and reports.

    DDM (stochastic, the code's step t -> t - s; x0 clamped to [-1, 1]):
        x0 = clamp(x - t*C - sqrt(t)*eps),  x_next = x + s*x0 - (s/sqrt(t))*eps + sqrt(s*(t - s)/t)*z
    IADB:  x_next = x + (alpha' - alpha)*D

Default: tensors of shape (16, 4, 256, 256) fp32 on CPU; DDM at t = 0.5, s = 0.1; IADB at alpha = 0.5,
alpha' = 0.5 + 1/128. The DDM rows get one noise tensor z (fused, eager, torch.compile), and the ``(seeds)``
rows draw it in the kernel (checked against the reference given the same Philox noise). The eager and
torch.compile rows run the paper-shaped references (``fastdiff.reference.ddm`` / ``.iadb``): the seed
code's way; their ``(own noise)`` rows draw it inside (``torch.randn_like``; compiled: inductor's RNG), and
``torch.randn + torch.compile`` draws it eagerly before the compiled step. The ``(seeds)`` rows' speed-up is
against the faster of the two compiled ways, the others' against torch.compile given the noise. Every output
is checked before timing.

    python bench/bench_ddm_iadb.py [--shape 16x4x256x256] [--dtype fp32] [--ops ddm,iadb] [--providers ...]
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
except ImportError:  # run as `python bench/bench_ddm_iadb.py`
    import harness  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip

T, S = 0.5, 0.1                 # DDM step t -> t - s
ALPHA, ALPHA_NEXT = 0.5, 0.5 + 1 / 128


def _fused(plan, inputs: dict, device, nbytes: int, backend: str, expected=None, baseline=None) -> Bench:
    """fastdiff.ops.step on row 0 of `plan`, output 0 only, into a preallocated buffer."""
    from fastdiff import backends, ops

    ok, why = backends.status(backend, device)
    if not ok:
        raise Skip(why)
    kw = plan.step_args(0, device)
    kw["n_out"] = 1
    buf = torch.empty_like(inputs["x"])
    return Bench(lambda: ops.step(out=[buf], backend=backend, **inputs, **kw)[0], nbytes, expected=expected,
                 baseline=baseline)


def _providers(plan, inputs: dict, seeded: dict | None, reference, ref_args: tuple, device, nbytes: int,
               seed_bytes: int, seed_expected) -> list:
    """The fused step per backend, eager and compiled reference given the noise (the last of `ref_args`); with
    `seeded`, also the step drawing its noise: in the kernel (``(seeds)``), against the faster torch way to draw
    and step (``harness.DRAWING``)."""
    rows = []
    for b in ("cpu", "cuda", "triton", "torch"):
        rows.append(Provider(f"fastdiff-{b}", functools.partial(_fused, plan, inputs, device, nbytes, b)))
        if seeded is not None and b != "torch":
            rows.append(Provider(f"fastdiff-{b} (seeds)", functools.partial(
                _fused, plan, seeded, device, seed_bytes, b, seed_expected, harness.DRAWING_BASELINE)))
    rows += [Provider("eager-torch", lambda: Bench(lambda: reference(*ref_args), nbytes)),
             Provider("torch.compile", lambda: harness.compile_bench(reference, ref_args, nbytes, device))]
    if seeded is not None:
        rows += [Provider(way, functools.partial(harness.drawing_bench, reference, ref_args[:-1], len(ref_args) - 1,
                                                 seed_bytes, device, way)) for way in harness.DRAWING]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = harness.add_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), (16, 4, 256, 256))
    p.add_argument("--ops", default="ddm,iadb", help="comma-separated: ddm, iadb (default %(default)s)")
    p.set_defaults(baseline="torch.compile")
    args = p.parse_args(argv)
    shape, dtype, device = harness.parse_shape(args.shape), harness.DTYPES[args.dtype], torch.device(args.device)
    from fastdiff import philox
    from fastdiff.reference import ddm as ddm_ref
    from fastdiff.reference import iadb as iadb_ref
    from fastdiff.samplers.ddm import ddm_step
    from fastdiff.samplers.iadb import iadb_plan

    g = torch.Generator().manual_seed(0)
    x, e0, e1, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    n = math.prod(shape) * x.element_size()
    seeds = philox.sample_seeds(0, shape[0]).to(device)
    rc = 0
    ops_ = [o.strip() for o in args.ops.split(",") if o.strip()]
    if "ddm" in ops_:
        def reference(x, C, eps, z):
            return ddm_ref.ddm_step(x, C, eps, T, S, z, clip=1.0)[0]

        plan = ddm_step(np.array([T]), np.array([T - S]), clip=1.0)
        expected = reference(x.double(), e0.double(), e1.double(), z.double()).to(dtype)
        pz = philox.randn(seeds, math.prod(shape[1:]), step=0).reshape(shape).to(device, torch.float64)
        seed_expected = reference(x.double(), e0.double(), e1.double(), pz).to(dtype)
        providers = _providers(plan, dict(x=x, e=[e0, e1], noise=z), dict(x=x, e=[e0, e1], seeds=seeds), reference,
                               (x, e0, e1, z), device, 5 * n, 4 * n, seed_expected)
        rc |= harness.run("ddm_step", args, providers, expected, argv)
    if "iadb" in ops_:
        def reference(x, d):
            return iadb_ref.iadb_step(x, d, ALPHA, ALPHA_NEXT)

        plan = iadb_plan(np.array([ALPHA, ALPHA_NEXT]))
        expected = reference(x.double(), e0.double()).to(dtype)
        providers = _providers(plan, dict(x=x, e=[e0]), None, reference, (x, e0), device, 3 * n, 0, None)
        rc |= harness.run("iadb_step", args, providers, expected, argv)
    return rc


if __name__ == "__main__":
    sys.exit(main())
