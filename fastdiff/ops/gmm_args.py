"""Argument checks of the GMM ops (``fastdiff.ops.gmm``): the mixture tables, the component ids, one
``gmm_noise`` call (``NoiseArgs``) and one ``gmm_score`` call, each error naming the argument, expected and got.
Prepared tables are kept per unchanged mixture tensors (same object, same version)."""

from __future__ import annotations

import math
import weakref

import torch

from fastdiff import philox
from fastdiff.ops.common import check_storage_dtype, check_tensor
from fastdiff.reference import gmm as ref

PER = ref.PER
SUM_TOL = 1e-5  # |sum(weights) - 1| allowed


# ---------------------------------------------------------------------------------------------- checks

class _Derived:
    """Values derived from tensors (checked, converted, prepared tables), kept while those tensors live
    unchanged - the same objects at the same version - so that repeated calls with one mixture check and
    prepare its K x D tables once. Tensors that require grad, or have no version counter, are not kept."""

    def __init__(self, size: int = 16):
        self.size, self.entries = size, {}

    def get(self, tensors, extra, make):
        if not all(isinstance(t, torch.Tensor) and not t.requires_grad and not t.is_inference() for t in tensors) \
                or torch.compiler.is_compiling():
            return make()
        key, versions = (tuple(id(t) for t in tensors), extra), tuple(t._version for t in tensors)
        hit = self.entries.get(key)
        if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors)):
            return hit[2]
        value = make()
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[key] = ([weakref.ref(t) for t in tensors], versions, value)
        return value


_MIXTURES, PREPARED = _Derived(), _Derived()


def float_tensor(op: str, name: str, t, device) -> torch.Tensor:
    if isinstance(t, (list, tuple)):
        t = torch.tensor(t, dtype=torch.float64)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t.to(device)


def check_mixture(op: str, weights, means, stds, D: int, device, dtype: torch.dtype, values: bool = True):
    """(weights ``[K]``, means, stds ``[K, D]`` or ``[K, 1]``) in `dtype` on `device`, each checked: 1-D
    weights, non-negative and summing to 1; ``[K, D]``, ``[K]`` or ``[K, 1]`` tables of the same K; stds > 0.
    `values`: also the checks that read values (not while tracing). Checked once per unchanged mixture."""
    if not values:
        return _check_mixture(op, weights, means, stds, D, device, dtype, values)
    return _MIXTURES.get((weights, means, stds), (op, D, device, dtype),
                         lambda: _check_mixture(op, weights, means, stds, D, device, dtype, values))


def _check_mixture(op: str, weights, means, stds, D: int, device, dtype: torch.dtype, values: bool):
    w = float_tensor(op, "weights", weights, device)
    if w.dim() != 1 or w.shape[0] == 0:
        raise ValueError(f"{op}: weights must be 1-D [K] with K >= 1, got shape {tuple(w.shape)}")
    K = w.shape[0]
    tables = []
    for name, t in (("means", means), ("stds", stds)):
        t = float_tensor(op, name, t, device)
        if t.dim() == 1:
            t = t[:, None]
        if t.dim() != 2 or t.shape[0] != K or t.shape[1] not in (1, D):
            raise ValueError(f"{op}: {name} must have shape [K, D] = [{K}, {D}] (or [{K}] / [{K}, 1]: constant "
                             f"over D), K from weights; got {tuple(t.shape)}")
        tables.append(t.to(dtype).contiguous())
    if values:
        if bool((w < 0).any()) or not bool(w.isfinite().all()):
            raise ValueError(f"{op}: weights must be finite and non-negative, got {w.tolist()[:16]}")
        total = float(w.double().sum())
        if abs(total - 1.0) > SUM_TOL:
            raise ValueError(f"{op}: weights must sum to 1 (within {SUM_TOL:g}), got sum {total!r}")
        if not bool((tables[1] > 0).all()):
            raise ValueError(f"{op}: stds must be > 0, got min {float(tables[1].min())!r}")
    return w.to(dtype).contiguous(), tables[0], tables[1]


def _check_ids(op: str, component, shape: tuple, device) -> torch.Tensor:
    """Shape and dtype of given component ids; their range is checked where they are read (``_check_range``)."""
    t = check_tensor(op, "component", component, device=device)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: component must be an int64 tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: component must have shape {shape}, got {tuple(t.shape)}")
    return t.to(torch.int64)


def check_range(op: str, ids: torch.Tensor, K: int, bad: int | None = None) -> None:
    """Given ids must lie in [0, K). `bad`: how many do not, as the CPU kernel counted them while reading
    (no pass of its own over the ids); None: found here by one aminmax pass."""
    if ids.numel() == 0 or bad == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= K:
        raise ValueError(f"{op}: component ids must lie in [0, {K}) (K components), got min {lo}, max {hi}")


# ------------------------------------------------------------------------------------------- gmm_noise

class NoiseArgs:
    """The validated inputs of one ``gmm_noise`` call (flat ``[B, D]`` views, contiguous)."""

    __slots__ = ("weights", "means", "stds", "shape", "per", "n_draws", "seeds", "step", "noise", "component",
                 "dtype", "device")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape[1:])

    def ids_shape(self) -> tuple:
        return tuple(self.shape[:1]) if self.per == "sample" else tuple(self.shape[:2]) \
            if self.per == "channel" else tuple(self.shape)


def validate_noise(weights, means, stds, shape, per, seeds, step, noise, component, dtype, device,
                   values: bool = True) -> NoiseArgs:
    op = "gmm_noise"
    if not isinstance(shape, (list, tuple, torch.Size)) or len(shape) < 1 or \
            not all(isinstance(v, int) and v >= 0 for v in shape):
        raise ValueError(f"{op}: shape must be (B, *S) non-negative ints, got {shape!r}")
    shape = tuple(int(v) for v in shape)
    if per not in PER:
        raise ValueError(f"{op}: per must be one of {PER}, got {per!r}")
    if per == "channel" and len(shape) < 2:
        raise ValueError(f"{op}: per='channel' needs shape (B, C, ...), got {shape}")
    check_storage_dtype(op, "dtype", dtype)
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"{op}: step must be an int, got {type(step).__name__}")
    device = torch.device(device) if device is not None else (
        means.device if isinstance(means, torch.Tensor) else torch.device("cpu"))
    B, D = shape[0], math.prod(shape[1:])
    w, mu, s = check_mixture(op, weights, means, stds, D, device, torch.float64 if dtype == torch.float64
                             else torch.float32, values)
    a = NoiseArgs(weights=w, means=mu, stds=s, shape=shape, per=per, n_draws=ref.draws_per_sample(per, shape),
                  seeds=None, step=step, noise=None, component=None, dtype=dtype, device=device)
    if noise is not None:
        noise = check_tensor(op, "noise", noise, shape=torch.Size(shape), device=device)
        if not noise.is_floating_point():
            raise TypeError(f"{op}: noise must be a floating-point tensor, got {noise.dtype}")
        a.noise = noise.reshape(B, D).to(dtype)
    if component is not None:
        a.component = _check_ids(op, component, a.ids_shape(), device).reshape(B, a.n_draws)
    if seeds is not None:
        a.seeds = philox.seed_tensor(seeds, B, device=device)
    elif a.noise is None or a.component is None:
        missing = " and ".join(n for n, t in (("noise", a.noise), ("component", a.component)) if t is None)
        raise ValueError(f"{op}: seeds are needed to draw the {missing} (give seeds, or both noise and component)")
    return a


# ------------------------------------------------------------------------------------------- gmm_score

def validate_score(x, weights, means, stds, values: bool = True):
    """(x ``[B, D]``, weights, means, stds) checked; tables moved to x's device in the compute dtype."""
    op = "gmm_score"
    x = check_tensor(op, "x", x)
    check_storage_dtype(op, "x", x.dtype)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, D] (or [B, *S]), got shape {tuple(x.shape)}")
    D = math.prod(x.shape[1:])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w, mu, s = check_mixture(op, weights, means, stds, D, x.device, compute, values)
    return x.reshape(x.shape[0], D), w, mu, s
