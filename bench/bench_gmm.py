"""Benchmark the fused Gaussian-mixture ops (``fastdiff.ops.gmm_noise``, ``fastdiff.ops.gmm_score``) across
providers; the harness times and reports.

    gmm_noise: x = mu_k + s_k * z, k drawn per sample / channel / element (inverse CDF on Philox uniforms)
    gmm_score: score = sum_k r_k (mu_k - x)/s_k^2, r = softmax_k(log w_k + log N(x; mu_k, s_k^2))

``--op noise`` (default shape 16x4x256x256, ``--per element``): the fused op drawing in the kernel
(``(seeds)``) and given the draws (``(given draws)``); eager torch the seed code's way (torch.multinomial +
gather + torch.randn); torch.compile of the reference given the draws, and of the reference drawing with
Philox in torch (``(seeds)``: the fused seeded rows' speed-up is against that one, the other rows' against
``torch.compile (given draws)``). Seeded rows are checked against the float64 formula on the Philox contract's
draws, the other rows against it on the given draws; the eager row's own random draws are checked through
the same code on the given draws, then timed with its own.

``--op score`` (default B=4096, D=512: a batch of 512-d conditioning feature vectors under a K=16 fit, the
GMM-conditioning use; ``--shape 16x4x256x256`` gives one row per image): the fused op, the reference eager
(the explicit formula), eager torch autograd of log p, and torch.compile of the reference. Checked against
the float64 reference.

    python bench/bench_gmm.py [--op noise|score|all] [--per element|sample|channel] [--k 8] [--shape ...]
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as `python bench/bench_gmm.py`
    import harness  # type: ignore[no-redef]
Bench, Provider, Skip = harness.Bench, harness.Provider, harness.Skip

NOISE_SHAPE, SCORE_SHAPE = (16, 4, 256, 256), (4096, 512)
BACKENDS = ("cpu", "cuda", "triton", "torch")
EAGER_PHILOX_MAX = 1 << 20  # the torch backend's seeded row is skipped above this many elements


def mixture(k: int, D: int, device):
    """Weights (uneven), per-element means and stds: a fixed random mixture."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(k, generator=g) + 0.5
    w = w / w.sum()
    mu = (torch.randn(k, 1, generator=g) * 2 + 0.3 * torch.randn(k, D, generator=g)).to(device)
    s = (0.5 + torch.rand(k, D, generator=g)).to(device)
    return w.to(device), mu, s


def fused_status(backend: str, device) -> None:
    from fastdiff import backends

    ok, why = backends.status(backend, device)
    if not ok:
        raise Skip(why)


def noise_providers(args, shape, dtype, device):
    from fastdiff import ops, philox
    from fastdiff.reference import gmm as ref

    B, D = shape[0], math.prod(shape[1:])
    w, mu, s = mixture(args.k, D, device)
    n_draws = ref.draws_per_sample(args.per, shape)
    seeds = philox.sample_seeds(0, B).to(device)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, D, generator=g).to(device, dtype)
    ids = torch.multinomial(w.cpu(), B * n_draws, replacement=True, generator=g).view(B, n_draws).to(device)
    ids_shape = {"sample": shape[:1], "channel": shape[:2], "element": shape}[args.per]

    def formula(z, ids):
        return ref.gmm_noise(mu.double(), s.double(), z.double(), ids).reshape(shape).to(dtype)

    expected_given = formula(z, ids)
    seeded_ids = ref.draw_components(seeds.cpu(), w, n_draws).to(device)
    expected_seeds = formula(ref.draw_normals(seeds.cpu(), D).to(device), seeded_ids)
    x_bytes, ids_bytes = B * D * z.element_size(), B * n_draws * 8
    out_bytes = x_bytes + ids_bytes  # x and the drawn ids; given draws add reading z and the ids

    def fused(backend: str, given: bool) -> Bench:
        fused_status(backend, device)
        if backend == "torch" and not given and B * D > EAGER_PHILOX_MAX:
            raise Skip(f"eager Philox in torch takes seconds a call above {EAGER_PHILOX_MAX} elements")
        kw = dict(noise=z.view(shape), component=ids.view(ids_shape)) if given else dict(seeds=seeds)
        return Bench(lambda: ops.gmm_noise(w, mu, s, shape, per=args.per, dtype=dtype, backend=backend, **kw)[0],
                     out_bytes + (x_bytes + ids_bytes if given else 0),
                     expected=expected_given if given else expected_seeds,
                     baseline=None if given else "torch.compile (seeds)")

    def eager_way(z, ids):
        """The seed code's way after its draws: gather the component rows, then mu + s*z."""
        k = ids.repeat_interleave(D // n_draws, dim=1)
        return (mu.gather(0, k) + s.gather(0, k) * z).view(shape)

    def eager() -> Bench:
        got = eager_way(z.float(), ids).to(dtype)
        err = float((got.double() - expected_given.double()).abs().max() / expected_given.double().abs().max())
        if not err <= harness.TOL[dtype]:
            raise Skip(f"WRONG: eager formula on the given draws, max rel err {err:.2e}")

        def run():
            k = torch.multinomial(w, B * n_draws, replacement=True).view(B, n_draws)
            eager_way(torch.randn(B, D, device=device), k).to(dtype)  # x and k: its two outputs
        return Bench(run, out_bytes, note="own draws: checked on the given draws")

    def compiled_given() -> Bench:
        def f(z, ids):
            return ref.gmm_noise(mu, s, z.float(), ids).to(dtype)

        cfn, t = harness.compile_fn(f, (z, ids), device)
        return Bench(lambda: cfn(z, ids).view(shape), out_bytes + x_bytes + ids_bytes, expected=expected_given,
                     compile_s=t)

    def compiled_seeds() -> Bench:
        def f(seeds):
            k = ref.draw_components(seeds, w, n_draws)
            return ref.gmm_noise(mu, s, ref.draw_normals(seeds, D).float(), k).to(dtype), k

        cfn, t = harness.compile_fn(f, (seeds,), device)
        return Bench(lambda: cfn(seeds)[0].view(shape), out_bytes, expected=expected_seeds, compile_s=t)

    providers = []
    for b in BACKENDS:
        providers.append(Provider(f"fastdiff-{b} (seeds)", functools.partial(fused, b, False)))
        providers.append(Provider(f"fastdiff-{b} (given draws)", functools.partial(fused, b, True)))
    providers += [Provider("eager-torch", eager), Provider("torch.compile (given draws)", compiled_given),
                  Provider("torch.compile (seeds)", compiled_seeds)]
    return providers, expected_given


def score_providers(args, shape, dtype, device):
    from fastdiff import ops
    from fastdiff.reference import gmm as ref

    B, D = shape[0], math.prod(shape[1:])
    w, mu, s = mixture(args.k, D, device)
    x = (mu[torch.arange(B, device=device) % args.k] + 1.5 * s[0] * torch.randn(B, D, device=device,
         generator=torch.Generator(device).manual_seed(2))).to(dtype).view(shape)
    x2 = x.view(B, D)
    expected = ref.gmm_score(x2.double(), w.double(), mu.double(), s.double())[0].view(shape).to(dtype)
    nbytes = 2 * x.numel() * x.element_size() + 2 * mu.numel() * 4
    # The float32 log-densities are sums of D terms of size ~D: their rounding (~|l_k| 2^-24) reaches the
    # responsibilities through exp, so any float32 evaluation - the reference's included - is ~2e-5 off.
    tol = max(harness.TOL[dtype], 1e-4)

    def fused(backend: str) -> Bench:
        fused_status(backend, device)
        return Bench(lambda: ops.gmm_score(x, w, mu, s, backend=backend), nbytes, tol=tol)

    def autograd():
        xg = x2.float().requires_grad_(True)
        lp = torch.logsumexp(ref.log_terms(xg, w, mu, s), dim=-1)
        return torch.autograd.grad(lp.sum(), xg)[0].to(dtype).view(shape)

    def compiled() -> Bench:
        def f(x2):
            return ref.gmm_score(x2.float(), w, mu, s)[0].to(dtype)

        cfn, t = harness.compile_fn(f, (x2,), device)
        return Bench(lambda: cfn(x2).view(shape), nbytes, compile_s=t, tol=tol)

    providers = [Provider(f"fastdiff-{b}", functools.partial(fused, b)) for b in BACKENDS]
    providers += [
        Provider("eager-torch", lambda: Bench(lambda: ref.gmm_score(x2.float(), w, mu, s)[0].to(dtype).view(shape),
                                              nbytes, note="explicit formula", tol=tol)),
        Provider("eager-torch (autograd)", lambda: Bench(autograd, nbytes, note="grad of logsumexp", tol=tol)),
        Provider("torch.compile", compiled),
    ]
    return providers, expected


def main(argv: list[str] | None = None) -> int:
    p = harness.add_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), NOISE_SHAPE)
    p.add_argument("--op", default="noise", choices=("noise", "score", "all"))
    p.add_argument("--per", default="element", choices=("sample", "channel", "element"))
    p.add_argument("--k", type=int, default=None, help="components (default 8 for noise, 16 for score)")
    p.set_defaults(shape=None, baseline=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), harness.DTYPES[args.dtype]
    failed = 0
    for op in (("noise", "score") if args.op == "all" else (args.op,)):
        a = copy.copy(args)
        a.shape = args.shape or "x".join(map(str, NOISE_SHAPE if op == "noise" else SCORE_SHAPE))
        a.k = args.k or (8 if op == "noise" else 16)
        a.baseline = args.baseline or ("torch.compile (given draws)" if op == "noise" else "torch.compile")
        shape = harness.parse_shape(a.shape)
        build = noise_providers if op == "noise" else score_providers
        providers, expected = build(a, shape, dtype, device)
        name = f"gmm_noise_{a.per}_k{a.k}" if op == "noise" else f"gmm_score_k{a.k}"
        failed |= harness.run(name, a, providers, expected, argv)
    return failed


if __name__ == "__main__":
    sys.exit(main())
