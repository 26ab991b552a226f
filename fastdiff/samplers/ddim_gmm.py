"""DDIM-GMM (Gabbur, "Improved DDIM Sampling with Moment Matching Gaussian Mixtures", arXiv 2311.04938, TMLR)
as a plan builder and its offset tables.

DDIM's reverse kernel N(mu_t, sigma_t^2 I) becomes ``sum_k pi_k N(mu_t + delta_k, sigma_t^2 I - Delta_k)`` with
the same first two central moments (docs/methods.md, section 2):

    sum_k pi_k delta_k = 0,    Delta_k = (1/(K pi_k)) sum_l pi_l delta_l delta_l^T

Offsets (``build_offsets``, once per run from a seed): O ~ N(0, I) in R^{D x K};
RAND: C_k = O_k - sum_l pi_l O_l, delta_k = s*C_k/rms, rms^2 = sum_l pi_l ||C_l||^2; ORTHO: U = the first K
left singular vectors of O (float64 SVD), C_k = U_k - sum_l pi_l U_l, delta_k = s*C_k. (RAND's per-offset
normalisation s*C_k/||C_k||, as docs/methods.md first stated it, breaks sum_k pi_k delta_k = 0 - the norms
differ - so one common normaliser is used: the constraint holds exactly, the pi-weighted mean of ||delta_k||^2 is
s^2, and each ||delta_k|| is s within O(1/sqrt(D)).) Sampling keeps the diagonal of Delta_k
(``var_table``) and clips negative variances to 0 (paper, appendix A.5). One step, per sample n:

    k_n ~ Cat(pi);   x_prev = DDIM mean + f_t*delta_{k_n} + f_t*sqrt(max(sigma_t^2/f_t^2 - diag Delta_{k_n}, 0))*z

with f_t = 1 for RAND and ORTHO: the DDIM plan (``ddim_plan``) plus the kernel's DELTA term, VAR = sigma_t^2
and the gathered variance row. At eta = 0 (sigma_t = 0) the draw stays and there is no noise: mu_t + delta_k.

ORTHO_VUB (**derived**: we could not read the paper's definition of its "variance upper bound" variant; the
authors' code exposes an ``upper_bound_vars`` switch): the offsets of each step are scaled by
f_t = min(1, sigma_t/sqrt(max_{k,d} diag Delta_k[d])), the largest scale <= 1 at which no variance is clipped,
so the step keeps DDIM's per-element variance sigma_t^2 exactly at every step. Scaling delta by f scales
Delta by f^2, and ``f*sqrt(max(sigma^2/f^2 - v, 0)) = sqrt(max(sigma^2 - f^2*v, 0))``, so one table serves
every step: the row carries CDELTA = CZ = f_t and VAR = sigma_t^2/f_t^2. Where sigma_t = 0 (eta = 0) f_t = 0:
the step is DDIM's.
"""

from __future__ import annotations

import numpy as np
import torch

from fastdiff import layout as L
from fastdiff.plan import Plan
from fastdiff.samplers.ddim import ddim_plan
from fastdiff.samplers.mixddpm import check_weights

OFFSET_KINDS = ("rand", "ortho", "ortho_vub")


def check_offsets_config(n_components: int, offset_scale: float, offset_kind: str, weights) -> np.ndarray:
    """The mixture weights pi (uniform when None) as float64, after checking every offset argument."""
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ValueError(f"n_components: expected an int >= 1, got {n_components!r}")
    if not np.isfinite(offset_scale) or offset_scale < 0:
        raise ValueError(f"offset_scale: expected a finite value >= 0, got {offset_scale!r}")
    if offset_kind not in OFFSET_KINDS:
        raise ValueError(f"offset_kind: expected one of {OFFSET_KINDS}, got {offset_kind!r}")
    if weights is None:
        return np.full(n_components, 1.0 / n_components)
    return check_weights(weights, n_components)


def build_offsets(numel: int, n_components: int = 8, offset_scale: float = 1.0, offset_kind: str = "ortho",
                  weights=None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta_table, var_table)``, float64 ``[K, D]``: the offsets delta_k and diag(Delta_k), from
    O ~ N(0, I) in R^{D x K} drawn by a CPU generator seeded with `seed` (the same tables on every machine)."""
    pi = torch.from_numpy(check_offsets_config(n_components, offset_scale, offset_kind, weights))
    if numel < n_components and offset_kind != "rand":
        raise ValueError(f"numel: ORTHO offsets need D >= K = {n_components} orthonormal directions, got D = {numel}")
    O_ = torch.randn((numel, n_components), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    if offset_kind == "rand":
        C = O_ - O_ @ pi[:, None]
        delta = offset_scale * C / torch.sqrt((pi * (C**2).sum(0)).sum())  # one normaliser: sum pi delta = 0
    else:
        U = torch.linalg.svd(O_, full_matrices=False).U                  # [D, K], orthonormal columns
        delta = offset_scale * (U - U @ pi[:, None])
    delta = delta.T.contiguous()                                         # [K, D]
    second = (pi[:, None] * delta**2).sum(0)                             # diag of sum_l pi_l delta_l delta_l^T
    var = second[None, :] / (n_components * pi[:, None])
    return delta, var


def vub_factor(sigma, var_table_max: float) -> np.ndarray:
    """ORTHO_VUB's per-row offset scale f_t = min(1, sigma_t/sqrt(max diag Delta)) (**derived**, module docstring)."""
    sigma = np.asarray(sigma, np.float64)
    if var_table_max <= 0:
        return np.ones_like(sigma)
    return np.minimum(1.0, sigma / np.sqrt(var_table_max))


def with_mixture(base: Plan, vub_var_max: float | None = None) -> Plan:
    """A DDIM plan (``ddim_plan``) made DDIM-GMM's: output 0 gains the offset row delta_{k_n} (CDELTA = f_t), and
    its noise std becomes sqrt(max(VAR - diag Delta_{k_n}, 0)) times CZ = f_t, VAR = sigma_t^2/f_t^2 (sigma_t:
    DDIM's noise weight, read from the base plan). f_t = 1, or ORTHO_VUB's ``vub_factor`` when `vub_var_max`
    (the largest entry of ``var_table``) is given."""
    table = base.table.copy()
    sigma = table[..., L.out(0, L.CZ)].copy()
    f = np.ones_like(sigma) if vub_var_max is None else vub_factor(sigma, vub_var_max)
    noisy = (sigma > 0) & (f > 0)
    f_safe = np.where(noisy, f, 1.0)
    table[..., L.out(0, L.CDELTA)] = f
    table[..., L.out(0, L.CZ)] = np.where(noisy, f, 0.0)
    table[..., L.VAR] = np.where(noisy, sigma**2 / f_safe**2, 0.0)
    return Plan(table, outputs=base.outputs, clamp=base.clamp, guided=base.guided, name=f"ddim-gmm {base.name}",
                row_label=base.row_label)


def ddim_gmm_plan(alphas_cumprod, timesteps, prev_timesteps, *, vub_var_max: float | None = None, **ddim) -> Plan:
    """DDIM-GMM steps t -> prev: ``with_mixture(ddim_plan(alphas_cumprod, timesteps, prev_timesteps, **ddim))``."""
    return with_mixture(ddim_plan(alphas_cumprod, timesteps, prev_timesteps, **ddim), vub_var_max)
