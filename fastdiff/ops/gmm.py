"""``fastdiff.ops.gmm_noise`` and ``fastdiff.ops.gmm_score``: the fused ops of a diagonal Gaussian mixture
``p(x) = sum_k w_k N(x; mu_k, diag s_k^2)`` over a sample of D elements (the math: ``fastdiff.reference.gmm``).

- ``gmm_noise`` draws the component per sample, per channel or per element (inverse CDF on in-kernel Philox
  uniforms, ``philox.categorical``'s comparisons) and writes ``x = mu_k + s_k * z`` and the ids, in one pass.
- ``gmm_score`` computes, one sample row per program, the K log-densities (a reduction over D), their
  stable log-sum-exp and the score ``sum_k r_k (mu_k - x)/s_k^2``.

Both validate their arguments (naming argument, expected and got), pick a backend (``fastdiff.backends``),
and are registered as ``torch.library`` custom ops with fake kernels for ``torch.compile(fullgraph=True)``.
float64 storage, and inputs that require grad, run on the torch reference (differentiable).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from fastdiff import backends, memory, philox
from fastdiff.ops.common import DTYPE_CODE, needs_reference, ptr
from fastdiff.ops.gmm_args import PREPARED, NoiseArgs, check_range, float_tensor, validate_noise, validate_score
from fastdiff.reference import gmm as ref

__all__ = ["gmm_noise", "gmm_score"]

# ------------------------------------------------------------------------------------------- gmm_noise

def _noise_reference(a: NoiseArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ``[B, D]``, ids ``[B, n_draws]``) by the torch reference (float64 arithmetic for float64)."""
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    if a.batch == 0:  # philox.uniform / randn cannot reshape an empty batch
        return (torch.empty(0, a.numel, dtype=a.dtype, device=a.device),
                torch.empty(0, a.n_draws, dtype=torch.int64, device=a.device))
    ids = a.component
    if ids is None:
        ids = ref.draw_components(a.seeds, a.weights, a.n_draws, a.step).to(a.device)
    z = a.noise if a.noise is not None else ref.draw_normals(a.seeds, a.numel, a.step).to(a.device)
    x = ref.gmm_noise(a.means.to(compute), a.stds.to(compute), z.to(compute), ids)
    return x.to(a.dtype), ids


def _noise_native(a: NoiseArgs, x: torch.Tensor, ids: torch.Tensor | None, name: str) -> None:
    cdf = PREPARED.get((a.weights,), "cdf",  # philox.categorical's float32 thresholds
                        lambda: torch.cumsum(a.weights.double(), 0)[:-1].float())
    fields = dict(
        batch=a.batch, numel=a.numel, n_draws=a.n_draws, group=a.numel // max(a.n_draws, 1),
        n_comp=a.weights.shape[0], dtype=DTYPE_CODE[a.dtype], cdf=ptr(cdf), means=ptr(a.means),
        means_d=a.means.shape[1], stds=ptr(a.stds), stds_d=a.stds.shape[1], noise=ptr(a.noise), seeds=ptr(a.seeds),
        step=a.step & 0xFFFFFFFF, component_in=ptr(a.component), out=ptr(x), component_out=ptr(ids),
    )
    if a.component is not None and name != "cpu":
        check_range("gmm_noise", a.component, a.weights.shape[0])
    if name == "triton":
        _triton().noise(a, cdf, x, ids)
        return
    bad = _launch(name, "gmm_noise", fields, a.device)
    if a.component is not None and name == "cpu":
        check_range("gmm_noise", a.component, a.weights.shape[0], bad)


def _run_noise(a: NoiseArgs, backend: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x shaped like ``a.shape``, the drawn ids shaped per ``a.per``, or None when they were given)."""
    if needs_reference(a.dtype, (a.weights, a.means, a.stds, a.noise)):
        backends.choose(a.device, backend)  # a forced backend that cannot run still raises
        if a.component is not None:
            check_range("gmm_noise", a.component, a.weights.shape[0])
        x, ids = _noise_reference(a)
    else:
        name = _native_or_torch(a.device, backend, "gmm_noise")
        if name == "torch" or a.batch == 0 or a.numel == 0:
            if a.component is not None:
                check_range("gmm_noise", a.component, a.weights.shape[0])
            x, ids = _noise_reference(a)
        else:
            x = memory.empty((a.batch, a.numel), a.dtype, a.device)  # reused blocks: no fresh pages
            ids = None if a.component is not None else memory.empty((a.batch, a.n_draws), torch.int64, a.device)
            _noise_native(a, x, ids, name)
    return x.reshape(a.shape), None if a.component is not None else ids.reshape(a.ids_shape())


def draw_ids(weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, seeds: torch.Tensor, n_draws: int,
             step: int, backend: str | None = None) -> torch.Tensor:
    """``[B, n_draws]`` int64 component ids, as ``gmm_noise(weights, means, stds, (B, n_draws), per="element",
    seeds=seeds, step=step)[1]`` draws them, for arguments the caller made valid: `weights` ``[K]`` float64 a
    distribution, `means`/`stds` ``[K, 1]`` float32 (stds > 0), `seeds` ``[B]`` int64, all contiguous on one
    device. The op's checks are skipped (~100 us of Python against a ~5 us kernel): a sampler drawing one
    component per sample and step (Mix-DDPM ``standard``, DDIM-GMM) calls this with its own cached mixture."""
    a = NoiseArgs(weights=weights, means=means, stds=stds, shape=(seeds.shape[0], n_draws), per="element",
                  n_draws=n_draws, seeds=seeds, step=step, noise=None, component=None, dtype=torch.float32,
                  device=seeds.device)
    return _run_noise(a, backend)[1]


@torch.library.custom_op("fastdiff::gmm_noise", mutates_args=())
def _noise_op(weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, shape: List[int], per: str,
              seeds: Optional[torch.Tensor], step: int, noise: Optional[torch.Tensor],
              component: Optional[torch.Tensor], dtype: torch.dtype, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    a = validate_noise(weights, means, stds, shape, per, seeds, step, noise, component, dtype, means.device)
    x, ids = _run_noise(a, backend or None)
    return x, ids if ids is not None else torch.empty(0, dtype=torch.int64, device=a.device)


@_noise_op.register_fake
def _noise_fake(weights, means, stds, shape, per, seeds, step, noise, component, dtype, backend):
    a = validate_noise(weights, means, stds, shape, per, seeds, step, noise, component, dtype, means.device,
                       values=False)
    ids_shape = (0,) if component is not None else a.ids_shape()
    return (torch.empty(a.shape, dtype=dtype, device=a.device),
            torch.empty(ids_shape, dtype=torch.int64, device=a.device))


def gmm_noise(weights, means, stds, shape, *, per: str = "sample", seeds=None, step: int = 0, noise=None,
              component=None, dtype: torch.dtype = torch.float32, device=None, backend: str | None = None):
    """Draw ``x ~ sum_k w_k N(mu_k, diag s_k^2)`` with a component per sample, channel or element.

    Args:
        weights: ``[K]`` mixture weights (non-negative, summing to 1).
        means, stds: ``[K, D]`` per-element tables (or ``[K]`` / ``[K, 1]``: constant over D), D = prod(S).
        shape: the output's shape ``(B, *S)``.
        per: ``"sample"`` (ids ``[B]``), ``"channel"`` (ids ``[B, S[0]]``: a channel's elements share k) or
            ``"element"`` (ids ``shape``).
        seeds: an int (per-sample keys ``philox.sample_seeds``) or ``[B]`` int64 keys: components by inverse
            CDF on ``philox.uniform(seed, n_draws, step=step, domain=DOMAIN_CATEGORICAL)``, normals
            ``philox.randn(seed, D, step=step, domain=DOMAIN_TRAIN)``. Sample n depends only on its seed.
        noise: standard normals z shaped like x; component: the ids. Given ones are used, missing ones drawn
            from seeds (without seeds both must be given).
        dtype: storage dtype of x (arithmetic in float32; float64 runs the reference in float64).
        device: where x goes (default: the means' device). backend: ``cpu``, ``cuda``, ``triton``, ``torch``.

    Returns:
        ``(x, component)``: ``x[n, i] = mu[k, i] + s[k, i] * z[n, i]`` and the int64 ids used.
    """
    if torch.compiler.is_compiling():
        dev = torch.device(device) if device is not None else means.device
        refd = dtype == torch.float64 or any(isinstance(t, torch.Tensor) and t.requires_grad
                                             for t in (weights, means, stds, noise))
        if not refd:
            key = philox.seed_tensor(seeds, shape[0], device=dev) if seeds is not None else None
            x, ids = torch.ops.fastdiff.gmm_noise(
                float_tensor("gmm_noise", "weights", weights, dev), float_tensor("gmm_noise", "means", means, dev),
                float_tensor("gmm_noise", "stds", stds, dev), list(shape), per, key, step, noise, component, dtype,
                backend or "")
            return x, component if component is not None else ids
    a = validate_noise(weights, means, stds, shape, per, seeds, step, noise, component, dtype, device,
                       values=not torch.compiler.is_compiling())
    x, ids = _run_noise(a, backend)
    return x, component if component is not None else ids


# ------------------------------------------------------------------------------------------- gmm_score

def _score_reference(x2, w, mu, s, dtype):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    score, lp = ref.gmm_score(x2.to(compute), w, mu, s)
    return score.to(dtype), lp


def _score_tables(w, mu, s, D: int):
    """The kernels' tables (K x D work, once per mixture: the kernel's is B x K x D): dense [K, D] float32
    ``mu`` and ``1/s``, and ``c_k = log w_k - sum_i log s_ki - D/2 log 2 pi`` in float64, rounded."""
    K = w.shape[0]
    log_coef = torch.log(w.double()) - torch.log(s.double()).expand(K, D).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return mu.expand(K, D).contiguous(), (1.0 / s).expand(K, D).contiguous(), log_coef.float()


def _score_native(x2, w, mu, s, name: str):
    B, D = x2.shape
    K = w.shape[0]
    mu_d, inv_std, log_coef = PREPARED.get((w, mu, s), D, lambda: _score_tables(w, mu, s, D))
    score = memory.empty(x2.shape, x2.dtype, x2.device)
    lp = torch.empty(B, dtype=torch.float32, device=x2.device)
    if name == "triton":
        _triton().score(x2, mu_d, inv_std, log_coef, score, lp)
    else:
        fields = dict(batch=B, numel=D, n_comp=K, dtype=DTYPE_CODE[x2.dtype], x=ptr(x2), means=ptr(mu_d),
                      inv_std=ptr(inv_std), log_coef=ptr(log_coef), score=ptr(score), log_prob=ptr(lp))
        _launch(name, "gmm_score", fields, x2.device)
    return score, lp


def _run_score(x2, w, mu, s, backend):
    if needs_reference(x2.dtype, (x2, w, mu, s)):
        backends.choose(x2.device, backend)
        return _score_reference(x2, w, mu, s, x2.dtype)
    name = _native_or_torch(x2.device, backend, "gmm_score")
    if name == "torch" or x2.numel() == 0:
        return _score_reference(x2, w, mu, s, x2.dtype)
    return _score_native(x2, w, mu, s, name)


@torch.library.custom_op("fastdiff::gmm_score", mutates_args=())
def _score_op(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
              backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    x2, w, mu, s = validate_score(x, weights, means, stds)
    score, lp = _run_score(x2, w, mu, s, backend or None)
    return score.reshape(x.shape), lp


@_score_op.register_fake
def _score_fake(x, weights, means, stds, backend):
    validate_score(x, weights, means, stds, values=False)
    lp_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:1], dtype=lp_dtype)


def gmm_score(x, weights, means, stds, *, log_prob: bool = False, backend: str | None = None):
    """The score ``grad_x log p(x) = sum_k r_k (mu_k - x)/s_k^2`` of a diagonal mixture, fused.

    Args:
        x: ``[B, D]`` (or ``[B, *S]``, flattened per sample), fp32/fp16/bf16 storage (float32 arithmetic) or
            float64 (the reference). weights ``[K]``; means, stds ``[K, D]`` (or ``[K]`` / ``[K, 1]``).
        log_prob: also return ``log p(x)`` ``[B]`` (float32; float64 for float64 x).
        backend: ``cpu``, ``cuda``, ``triton`` or ``torch``; default automatic.

    Returns:
        score shaped like x in x's dtype, or ``(score, log_prob)``. The responsibilities
        ``r = softmax_k(log w_k + log N(x; mu_k, diag s_k^2))`` come from a stable log-sum-exp, so x far from
        every component gives finite values. Differentiable (torch reference) when an input requires grad.
    """
    grads = (x, weights, means, stds)
    if torch.compiler.is_compiling() and not needs_reference(
            getattr(x, "dtype", torch.float32), [t for t in grads if isinstance(t, torch.Tensor)]):
        dev = x.device
        score, lp = torch.ops.fastdiff.gmm_score(
            x, float_tensor("gmm_score", "weights", weights, dev), float_tensor("gmm_score", "means", means, dev),
            float_tensor("gmm_score", "stds", stds, dev), backend or "")
    else:
        x2, w, mu, s = validate_score(x, weights, means, stds, values=not torch.compiler.is_compiling())
        score, lp = _run_score(x2, w, mu, s, backend)
        score = score.reshape(x.shape)
    return (score, lp) if log_prob else score


# ------------------------------------------------------------------------------------------- backends

def _has_native(fn: str, device_type: str) -> bool:
    mod = backends.native()[0]
    return mod is not None and hasattr(mod, f"{fn}_{device_type}")


def _native_or_torch(device: torch.device, backend: str | None, fn: str) -> str:
    """``backends.choose``, where a native module built before the GMM kernels existed counts as unable to
    run them: the automatic choice falls back to torch, a forced native backend raises."""
    name = backends.choose(device, backend)
    if name in ("cpu", "cuda") and not _has_native(fn, name):
        if backend or backends.forced_backend():
            raise RuntimeError(f"backend {name!r} was requested but fastdiff._C has no {fn} kernels (built before "
                               f"they existed): rebuild it with `pip install -e .`")
        return "torch"
    return name


def _launch(name: str, fn: str, fields: dict, device: torch.device):
    """Run native `fn` with `fields` packed in the module's own order (``<fn>_fields``), so a module whose
    parameter names differ is refused instead of reading pointers in the wrong places."""
    _C = backends.native()[0]
    order = tuple(getattr(_C, f"{fn}_fields", ()))
    if set(order) != set(fields):
        raise RuntimeError(f"fastdiff._C is stale: its {fn} parameters {order} differ from {tuple(fields)}; "
                           f"rebuild it with `pip install -e .`")
    args = tuple(fields[f] for f in order)
    if name == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return getattr(_C, f"{fn}_cuda")(args, index, torch.cuda.current_stream(device).cuda_stream)
    return getattr(_C, f"{fn}_cpu")(args)


def _triton():
    return backends.triton_kernels()[0].gmm
