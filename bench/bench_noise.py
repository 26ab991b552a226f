"""Benchmark drawing the noise of a seeded CPU generator: ``torch.randn`` against ``fastdiff.noise.randn``
(the same values and generator state; csrc/cpu/generator_randn.cpp), and diffusers' ``randn_tensor`` against
``fastdiff.noise.randn_tensor`` with one generator and with one generator per sample. That draw is every
stochastic diffusers scheduler's on the CPU, and diffusers' for a CPU ``generator`` whatever the device.
Each call re-seeds its generators, so every provider returns the same tensor; bytes: the output written.

    python bench/bench_noise.py [--shapes 16x4x256x256,1x4x64x64] [--providers ...]
"""

from __future__ import annotations

import argparse
import sys

import torch

try:
    from bench import harness
except ImportError:  # run as `python bench/bench_noise.py`
    import harness  # type: ignore[no-redef]
Bench, Provider = harness.Bench, harness.Provider


def run_shape(args, argv) -> int:
    from fastdiff import noise

    shape = harness.parse_shape(args.shape)
    nbytes = 4 * torch.Size(shape).numel()
    one = torch.Generator()
    many = [torch.Generator() for _ in range(shape[0])]

    def seeded(draw, gens, baseline=None, expected=None):
        def fn():
            for i, g in enumerate(gens):
                g.manual_seed(i)
            return draw(gens if len(gens) > 1 else gens[0])
        return lambda: Bench(fn, nbytes, baseline=baseline, expected=None if expected is None else expected())

    def diffusers_randn_tensor():
        from diffusers.utils.torch_utils import randn_tensor
        return randn_tensor

    expected = seeded(lambda g: torch.randn(shape, generator=g), [one])().fn()
    providers = [
        Provider("torch.randn", seeded(lambda g: torch.randn(shape, generator=g), [one])),
        Provider("fastdiff.noise.randn", seeded(lambda g: noise.randn(shape, generator=g), [one])),
        Provider("diffusers randn_tensor", seeded(lambda g: diffusers_randn_tensor()(shape, generator=g), [one])),
        Provider("fastdiff randn_tensor", seeded(lambda g: noise.randn_tensor(shape, generator=g), [one],
                                                 baseline="diffusers randn_tensor")),
    ]
    if shape[0] > 1:  # other draws: their own expected tensor (torch.randn per sample)
        per_sample = seeded(lambda gs: torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gs]), many)
        base = "diffusers randn_tensor (generator per sample)"
        providers += [
            Provider(base, seeded(lambda gs: diffusers_randn_tensor()(shape, generator=gs), many,
                                  expected=lambda: per_sample().fn())),
            Provider("fastdiff randn_tensor (generator per sample)",
                     seeded(lambda gs: noise.randn_tensor(shape, generator=gs), many, baseline=base,
                            expected=lambda: per_sample().fn())),
        ]
    return harness.run("generator_noise", args, providers, expected, argv)


def main(argv: list[str] | None = None) -> int:
    p = harness.add_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), (16, 4, 256, 256))
    p.add_argument("--shapes", default="16x4x256x256,1x4x64x64", help="comma-separated shapes, one run each")
    p.set_defaults(baseline="torch.randn")
    args = p.parse_args(argv)
    failed = 0
    for shape in args.shapes.split(","):
        args.shape = shape
        failed |= run_shape(args, argv)
    return failed


if __name__ == "__main__":
    sys.exit(main())
