"""The Gaussian-mixture kernels in Triton (the contract: fastdiff/reference/gmm.py; the CPU/CUDA twin:
csrc/include/fastdiff/gmm.cuh).

- ``_noise_kernel``: one program = BLOCK elements of one sample. Components given, or drawn by inverse CDF on
  Philox uniforms (``DOMAIN_CATEGORICAL``: draw j takes word j % 4 of group j // 4), normals given or
  ``normal_block`` (``DOMAIN_TRAIN``); writes ``x = mu_k + s_k * z`` and the drawn ids.
- ``_score_kernel``: one program = one sample row: the K squared distances as a [BLOCK_K, BLOCK_D] tile sum
  over D, the stable log-sum-exp, then the score ``sum_k r_k (mu_k - x)/s_k^2`` chunk by chunk.
"""

import triton
import triton.language as tl

from fastdiff import philox
from fastdiff.triton_kernels.philox import normal_block, uniform_open
from fastdiff.triton_kernels.step import _store

_BLOCK = 1024
_MAX_GRID_Y = 65535


@triton.jit
def _categorical(u, cdf_ptr, n_comp):
    """#{j < K-1 : u >= cdf[j]}: inverse CDF against the float32 cumulative weights (philox.categorical)."""
    k = tl.zeros(u.shape, dtype=tl.int64)
    for j in range(n_comp - 1):
        k += (u >= tl.load(cdf_ptr + j)).to(tl.int64)
    return k


@triton.jit
def _words(seed, g, step, domain):
    """The four Philox words of groups g (int64) under key seed, counter (g, step, domain)."""
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(seed, c0, (g >> 32).to(tl.uint32), (tl.zeros_like(c0) + step).to(tl.uint32),
                     (tl.zeros_like(c0) + domain).to(tl.uint32))


@triton.jit
def _noise_kernel(cdf_ptr, n_comp, means_ptr, means_d, stds_ptr, stds_d, noise_ptr, seeds_ptr, step, dom_cat,
                  dom_train, ids_in_ptr, out_ptr, ids_out_ptr, D, n_draws, group,
                  HAS_NOISE: tl.constexpr, HAS_IDS: tl.constexpr, PER_ELEMENT: tl.constexpr,
                  MEANS_ROW: tl.constexpr, STDS_ROW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    if HAS_NOISE:
        z = tl.load(noise_ptr + n * D + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = normal_block(tl.load(seeds_ptr + n), pid.to(tl.int64) * (BLOCK // 4), step, dom_train, BLOCK)
    if HAS_IDS:
        k = tl.load(ids_in_ptr + n * n_draws + offs // group, mask=mask, other=0)
    elif PER_ELEMENT:  # the block's own groups, one word per element (interleaved as in normal_block)
        g = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
        w0, w1, w2, w3 = _words(tl.load(seeds_ptr + n), g, step, dom_cat)
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])
        k = _categorical(uniform_open(w), cdf_ptr, n_comp)
        tl.store(ids_out_ptr + n * D + offs, k, mask=mask)
    else:  # per channel / sample: word d % 4 of group d // 4 of each element's draw d
        d = offs // group
        w0, w1, w2, w3 = _words(tl.load(seeds_ptr + n), d // 4, step, dom_cat)
        r = d % 4
        w = tl.where(r == 0, w0, tl.where(r == 1, w1, tl.where(r == 2, w2, w3)))
        k = _categorical(uniform_open(w), cdf_ptr, n_comp)
        tl.store(ids_out_ptr + n * n_draws + d, k, mask=mask & (offs % group == 0))
    mu_at = k * means_d
    s_at = k * stds_d
    if MEANS_ROW:  # [K, D] rows; else one value per component
        mu_at += offs
    if STDS_ROW:
        s_at += offs
    mu = tl.load(means_ptr + mu_at, mask=mask, other=0.0)
    s = tl.load(stds_ptr + s_at, mask=mask, other=0.0)
    _store(out_ptr, n * D + offs, mu + s * z, mask)


@triton.jit
def _score_tile(x_ptr, means_ptr, inv_std_ptr, n, D, d0, ks, kmask, BLOCK_D: tl.constexpr):
    """Columns [d0, d0 + BLOCK_D) of row n: offsets, masks, x and the K x BLOCK_D tiles of mu and 1/s."""
    offs = d0 + tl.arange(0, BLOCK_D)
    m = offs < D
    x = tl.load(x_ptr + n * D + offs, mask=m, other=0.0).to(tl.float32)
    tile = ks[:, None] * D + offs[None, :]
    tm = kmask[:, None] & m[None, :]
    mu = tl.load(means_ptr + tile, mask=tm, other=0.0)
    iv = tl.load(inv_std_ptr + tile, mask=tm, other=0.0)
    return offs, m, tm, x, mu, iv


@triton.jit
def _score_kernel(x_ptr, means_ptr, inv_std_ptr, log_coef_ptr, score_ptr, lp_ptr, D, n_comp,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < n_comp
    sq = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs, m, tm, x, mu, iv = _score_tile(x_ptr, means_ptr, inv_std_ptr, n, D, d0, ks, kmask, BLOCK_D)
        dist = (x[None, :] - mu) * iv
        sq += tl.where(tm, dist * dist, 0.0)
    l = tl.load(log_coef_ptr + ks, mask=kmask, other=float("-inf")) - 0.5 * tl.sum(sq, axis=1)  # noqa: E741
    l = tl.where(kmask, l, float("-inf"))  # noqa: E741
    top = tl.max(l, axis=0)
    e = tl.where(kmask, tl.exp(l - top), 0.0)
    total = tl.sum(e, axis=0)
    r = e / total
    tl.store(lp_ptr + n, top + tl.log(total))
    for d0 in range(0, D, BLOCK_D):
        offs, m, tm, x, mu, iv = _score_tile(x_ptr, means_ptr, inv_std_ptr, n, D, d0, ks, kmask, BLOCK_D)
        s = tl.sum(tl.where(tm, r[:, None] * (mu - x[None, :]) * iv * iv, 0.0), axis=0)
        _store(score_ptr, n * D + offs, s, m)


def noise(a, cdf, x, ids) -> None:
    """Run validated ``fastdiff.ops.gmm_args.NoiseArgs`` writing x ``[B, D]`` and the drawn ids (or None)."""
    D, dummy = a.numel, a.means
    for b0 in range(0, a.batch, _MAX_GRID_Y):
        b1 = min(a.batch, b0 + _MAX_GRID_Y)

        def rows(t, b0=b0, b1=b1):  # this launch's samples, or a placeholder the kernel never reads
            return dummy if t is None else t[b0:b1]

        _noise_kernel[(triton.cdiv(D, _BLOCK), b1 - b0)](
            cdf if cdf.numel() else dummy, a.weights.shape[0], a.means, a.means.shape[1], a.stds, a.stds.shape[1],
            rows(a.noise), rows(a.seeds), a.step & 0xFFFFFFFF, philox.DOMAIN_CATEGORICAL, philox.DOMAIN_TRAIN,
            rows(a.component), x[b0:b1], rows(ids), D, a.n_draws, D // a.n_draws,
            HAS_NOISE=a.noise is not None, HAS_IDS=a.component is not None, PER_ELEMENT=a.per == "element",
            MEANS_ROW=a.means.shape[1] != 1, STDS_ROW=a.stds.shape[1] != 1, BLOCK=_BLOCK, num_warps=4,
        )


def score(x, means, inv_std, log_coef, out, lp) -> None:
    """score ``[B, D]`` and log p ``[B]`` of rows x ``[B, D]`` from the host-prepared dense tables."""
    B, D = x.shape
    K = means.shape[0]
    block_k = triton.next_power_of_2(K)
    block_d = max(16, min(triton.next_power_of_2(D), max(16, 4096 // block_k)))
    _score_kernel[(B,)](x, means, inv_std, log_coef, out, lp, D, K, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
