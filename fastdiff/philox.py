"""Counter-based noise: Philox4x32-10 (Salmon et al., SC'11) and Box-Muller, in pure torch.

This is the reference of the numbers that every backend draws in its kernels
(``csrc/include/fastdiff/philox.cuh``, ``triton_kernels/philox.py``)::

    key     = seed of sample n (64 bits)             -> noise never depends on the batch
    counter = (g mod 2**32, g >> 32, step, domain)    g = i // 4, i = element index inside the sample
    z[4g], z[4g+1]   = Box-Muller(u(w0), u(w1))       u(w) = ((w >> 9) + 0.5) * 2**-23, in (0, 1)
    z[4g+2], z[4g+3] = Box-Muller(u(w2), u(w3))

The *domain* (counter word 3) says what the noise is for, so that two uses never share numbers: the
sampler step's noise, the initial noise, categorical draws, training noise (``DOMAIN_*`` below).

The kernels evaluate log/cos/sin with small float32 polynomials; this reference uses float64, so the
backends agree to about 1e-6 (tests/test_philox.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DOMAIN_STEP, DOMAIN_INIT, DOMAIN_CATEGORICAL, DOMAIN_TRAIN = 0, 1, 2, 3  # Philox counter word 3

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def philox4x32_10(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Ten Philox4x32 rounds. Words are int64 tensors holding uint32 values (broadcastable).

    A 32x32-bit product fits in 64 bits; int64 multiplication wraps, so its low and high words are exact.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = PHILOX_M0 * c0, PHILOX_M1 * c2
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


def uniform_open(w: torch.Tensor) -> torch.Tensor:
    """uint32 word -> ((w >> 9) + 0.5) * 2**-23: the 2**23 centres of (0, 1), exact in float32."""
    return ((w >> 9).to(torch.float64) + 0.5) * 2.0**-23


def box_muller(u0: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent N(0, 1) from two uniforms in (0, 1)."""
    r = torch.sqrt(-2.0 * torch.log(u0))
    theta = 2.0 * math.pi * u1
    return r * torch.cos(theta), r * torch.sin(theta)


def check_seeds(seeds, name: str = "seeds"):
    """Per-sample seeds as users give them: an int (per-sample keys derived from it, ``sample_seeds``),
    a sequence of ints or a 1-D integer tensor (one key per sample), or None. Returns an int, a 1-D
    int64 tensor or None; anything else is a TypeError naming `name`."""
    if seeds is None or (isinstance(seeds, int) and not isinstance(seeds, bool)):
        return seeds
    if isinstance(seeds, torch.Tensor):
        t = seeds
    elif isinstance(seeds, Sequence) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        t = torch.tensor(list(seeds), dtype=torch.int64)
    else:
        raise TypeError(f"{name}: expected an int, a sequence of ints or a 1-D int64 tensor, "
                        f"got {type(seeds).__name__} {seeds!r}"[:200])
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected a 1-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(torch.int64)


def seed_tensor(seeds, batch: int, device=None) -> torch.Tensor:
    """The ``[batch]`` int64 keys of `seeds` (see ``check_seeds``) on `device`."""
    seeds = check_seeds(seeds)
    if seeds is None:
        raise ValueError("seeds: expected seeds, got None")
    if isinstance(seeds, int):
        return sample_seeds(seeds, batch, device=device)
    if seeds.shape[0] != batch:
        raise ValueError(f"seeds: expected one seed per sample ({batch}), got {seeds.shape[0]}")
    return seeds.to(device) if device is not None else seeds


def words(seeds: torch.Tensor | Sequence[int] | int, numel: int, *, step: int = 0, domain: int = DOMAIN_STEP,
          device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The four Philox words of every group covering `numel` elements, for every sample: four
    ``[len(seeds), ceil(numel/4)]`` int64 tensors (uint32 values), sample n keyed by seeds[n]."""
    if numel < 0:
        raise ValueError(f"numel: expected >= 0, got {numel}")
    seeds = check_seeds(seeds)
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds: expected one key per sample (a sequence or 1-D tensor), got {seeds!r}")
    dev = seeds.device if device is None else torch.device(device)
    seeds = seeds.to(dev)
    groups = torch.arange((numel + 3) // 4, device=dev, dtype=torch.int64)
    key = [(seeds & _MASK32)[:, None], ((seeds >> 32) & _MASK32)[:, None]]
    counter = [groups & _MASK32, groups >> 32, torch.tensor(step & _MASK32, device=dev),
               torch.tensor(domain & _MASK32, device=dev)]
    return [w.expand(seeds.shape[0], groups.shape[0]) for w in philox4x32_10(counter, key)]


def _per_element(w: torch.Tensor, numel: int) -> torch.Tensor:
    """``[B, groups, 4]`` -> ``[B, numel]``: element i is entry i % 4 of group i // 4."""
    return w.reshape(w.shape[0], w.shape[1] * 4)[:, :numel]


def randn(
    seeds: torch.Tensor | Sequence[int] | int,
    numel: int,
    *,
    step: int = 0,
    domain: int = DOMAIN_STEP,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The normals of (step, domain) for every sample: ``[len(seeds), numel]``, sample n keyed by seeds[n]."""
    w = words(seeds, numel, step=step, domain=domain, device=device)
    z0, z1 = box_muller(uniform_open(w[0]), uniform_open(w[1]))
    z2, z3 = box_muller(uniform_open(w[2]), uniform_open(w[3]))
    return _per_element(torch.stack((z0, z1, z2, z3), dim=-1), numel).to(dtype)


def uniform(
    seeds: torch.Tensor | Sequence[int] | int,
    numel: int,
    *,
    step: int = 0,
    domain: int = DOMAIN_CATEGORICAL,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The uniforms in (0, 1) of (step, domain) for every sample: ``[len(seeds), numel]`` float64 (each exact
    in float32). Element i is ``u(w[i % 4])`` of Philox group ``i // 4``: the words the normals of the same
    counter would take, used here one word per element (for categorical draws, ``categorical``)."""
    w = words(seeds, numel, step=step, domain=domain, device=device)
    return _per_element(uniform_open(torch.stack(w, dim=-1)), numel)


def categorical(u: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Inverse-CDF categorical draws: for each uniform in `u`, the component k with ``cdf[k-1] <= u < cdf[k]``
    (int64), where ``cdf`` is the cumulative sum of `weights` in float64 rounded to float32 - the values
    the kernels compare against, so every backend draws the same components. The last component takes
    everything from ``cdf[K-2]`` up (no dependence on the rounding of the total)."""
    return (u[..., None] >= _thresholds(weights, u.device)).sum(-1)


_CDFS: dict = {}  # (weights as floats, device) -> thresholds: a sampler draws from the same weights every step


def host_weights(weights) -> tuple[float, ...]:
    """Host `weights` (a sequence, array or CPU tensor) as a tuple of floats: the key of the caches of
    objects built from them (a sampler draws from the same weights every step)."""
    return tuple(float(v) for v in (weights.tolist() if hasattr(weights, "tolist") else weights))


def _thresholds(weights, device) -> torch.Tensor:
    """``categorical``'s float64 ``[K - 1]`` thresholds on `device`; cached for weights given on the host."""
    def build(w):
        w = torch.as_tensor(w, dtype=torch.float64)
        return torch.cumsum(w, 0)[:-1].to(torch.float32).to(torch.float64).to(device)

    if torch.compiler.is_compiling() or (isinstance(weights, torch.Tensor) and weights.device.type != "cpu"):
        return build(weights)
    key = (host_weights(weights), device)
    cdf = _CDFS.get(key)
    if cdf is None:
        if len(_CDFS) > 64:
            _CDFS.clear()
        cdf = _CDFS[key] = build(key[0])
    return cdf


def _splitmix64(v: int) -> int:
    v = (v + 0x9E3779B97F4A7C15) & _MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
    return v ^ (v >> 31)


def sample_seeds(seed: int, batch: int, *, start: int = 0, device=None) -> torch.Tensor:
    """Per-sample Philox keys derived from one integer seed: sample b gets splitmix64(seed, start + b).

    Sample b's key depends only on (seed, b), so a batch of 7 repeats the first samples of a batch of 1.
    """
    if batch < 0:
        raise ValueError(f"batch: expected >= 0, got {batch}")
    base = _splitmix64(int(seed) & _MASK64)
    keys = [_splitmix64(base ^ (start + b)) for b in range(batch)]
    signed = [k - (1 << 64) if k >= 1 << 63 else k for k in keys]
    return torch.tensor(signed, dtype=torch.int64, device=device)
