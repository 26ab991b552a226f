"""Noise from torch generators, drawn as torch draws it, only faster: ``randn`` is ``torch.randn`` and
``randn_tensor`` is diffusers' ``randn_tensor`` - the same values (to float32 rounding: torch's log, sin and
cos are its own) and the same generator state afterwards, so a seeded pipeline gives the same images.

Where it is faster: a float32 draw of 16 elements or more on the CPU from a CPU generator (the default one
too) - what diffusers does for a CPU ``generator`` whatever the model's device, and the only draw of a
stochastic scheduler on the CPU. torch makes those normals on one thread; ``fastdiff._C`` copies and twists
the MT19937 words on one and makes the normals on all (csrc/cpu/generator_randn.cpp, docs/architecture.md).
Everything else - other dtypes and devices, fewer elements, a strided ``like``, tracing under
``torch.compile``, or a torch whose CPU generator is not the one checked at first use - is ``torch.randn``
itself. A draw reads the generator's state, advances it in the kernel and sets it back: like torch's own, a
generator must not be drawn from by two threads at once.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from fastdiff import memory

PROBE_SEED, PROBE_NUMEL = 20240521, 37  # the first-use check: a draw with a tail, and the state after it


@functools.cache
def _kernel():
    """fastdiff._C's generator_randn_cpu when it reproduces this torch's CPU generator, else None."""
    try:  # the module itself: this kernel shares no parameter layout with the ops (backends.native)
        from fastdiff import _C as mod
    except ImportError:
        return None
    if not hasattr(mod, "generator_randn_cpu"):
        return None
    g, mine = torch.Generator().manual_seed(PROBE_SEED), torch.Generator().manual_seed(PROBE_SEED)
    torch.rand(5, generator=g)
    torch.rand(5, generator=mine)  # a state part way through its words
    want = torch.randn(PROBE_NUMEL, generator=g)
    state = mine.get_state()
    if state.numel() < mod.generator_state_bytes:
        return _refuse(f"its generator state has {state.numel()} bytes, not {mod.generator_state_bytes}")
    got = torch.empty(PROBE_NUMEL)
    mod.generator_randn_cpu(state.data_ptr(), got.data_ptr(), PROBE_NUMEL)
    mine.set_state(state)
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5) or not torch.equal(mine.get_state(), g.get_state()):
        return _refuse("its torch.randn is not the MT19937 Box-Muller draw that fastdiff reproduces")
    return mod.generator_randn_cpu


def _refuse(why: str):
    warnings.warn(f"fastdiff.noise: this torch {torch.__version__} CPU generator is not the one fastdiff "
                  f"reproduces ({why}); noise from CPU generators is drawn by torch.randn", RuntimeWarning,
                  stacklevel=3)
    return None


def cpu_generator(generator) -> bool:
    """Whether `generator` draws on the CPU: None (torch's default generator) or a CPU torch.Generator."""
    return generator is None or isinstance(generator, torch.Generator) and generator.device.type == "cpu"


def _fast(numel: int, generator, dtype, device, layout) -> bool:
    return (not torch.compiler.is_compiling()
            and numel >= 16
            and (dtype or torch.get_default_dtype()) == torch.float32
            and (device is None or torch.device(device).type == "cpu")
            and layout in (None, torch.strided)
            and cpu_generator(generator)
            and _kernel() is not None)


def _draw_into(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill the contiguous float32 CPU tensor `out` (>= 16 elements) as torch.randn would from `generator`."""
    gen = torch.default_generator if generator is None else generator
    state = gen.get_state()
    _kernel()(state.data_ptr(), out.data_ptr(), out.numel())
    gen.set_state(state)
    return out


def randn(*size, generator=None, dtype=None, device=None, layout=None) -> torch.Tensor:
    """``torch.randn(*size, generator=, dtype=, device=, layout=)``: the same values and generator state."""
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    if not _fast(math.prod(shape), generator, dtype, device, layout):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device, layout=layout)
    return _draw_into(memory.empty(shape, torch.float32), generator)


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """``torch.randn_like(x)`` (drawn from `generator` where given, as k-diffusion's noise samplers do); for
    a contiguous CPU `x` and a CPU generator also diffusers' ``randn_tensor(x.shape, generator, x.device,
    x.dtype)`` (the drop-ins' per-step draw; `x` being on the CPU is read off the tensor, not a device)."""
    if x.is_cpu and x.is_contiguous() and _fast(x.numel(), generator, x.dtype, None, x.layout):
        return _draw_into(memory.empty(x.shape, torch.float32), generator)
    return torch.randn_like(x) if generator is None else \
        torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device, layout=x.layout)


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    """diffusers' ``randn_tensor`` (``diffusers.utils.torch_utils``): a CPU generator draws on the CPU whatever
    `device` is (then the tensor moves there), a CUDA generator for another device is an error, and a list
    of generators draws each sample from its own."""
    if isinstance(device, str):
        device = torch.device(device)
    rand_device = device
    layout = layout or torch.strided
    device = device or torch.device("cpu")
    if device.type == "neuron":
        rand_device = torch.device("cpu")
    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, list) else generator.device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type and gen_type == "cuda":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if not isinstance(generator, list):
        return randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype, layout=layout).to(device)
    row = (1, *tuple(shape)[1:])
    if all(_fast(math.prod(row), g, dtype, rand_device, layout) for g in generator):  # each sample drawn in place
        out = memory.empty((shape[0], *row[1:]), torch.float32)
        for i in range(shape[0]):
            _draw_into(out[i], generator[i])
        return out.to(device)
    latents = [torch.randn(row, generator=generator[i], device=rand_device, dtype=dtype, layout=layout)
               for i in range(shape[0])]
    return torch.cat(latents, dim=0).to(device)
