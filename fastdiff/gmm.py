"""``fastdiff.gmm``: diagonal Gaussian mixtures - EM fit, density, score and sampling.

    p(x) = sum_k pi_k N(x; mu_k, diag(sigma_k^2))                    x, mu_k, sigma_k in R^D, k = 1..K
    log N(x; mu_k, sigma_k) = -1/2 sum_d [((x_d - mu_kd)/sigma_kd)^2 + 2 log sigma_kd + log 2 pi]
    r_k(x) = pi_k N(x; mu_k, sigma_k) / p(x)                         (responsibilities, a softmax over k)
    grad_x log p(x) = sum_k r_k(x) (mu_k - x) / sigma_k^2            (the score, by the chain rule)

The density and the fit run in float64 torch (the log-sum-exp over k keeps far-away points finite); the
score over B x K x D and the sampling ``mu_k + sigma_k z`` are the fused ops ``fastdiff.ops.gmm_score`` and
``fastdiff.ops.gmm_noise``.

``GaussianMixture.fit`` is the standard EM for a diagonal mixture (Dempster, Laird, Rubin 1977; Bishop,
"Pattern Recognition and Machine Learning", sec. 9.2.2) started by k-means++ seeding (Arthur, Vassilvitskii,
SODA 2007). Derived here, not from a source: the variance floor ``min_std**2`` is the maximiser of the
M-step's objective under that bound (the objective is unimodal in each variance), so the floored EM still
never lowers the likelihood; an empty component keeps weight ~0 instead of producing 0/0.
"""

from __future__ import annotations

import math

import torch

from fastdiff import philox

WEIGHT_SUM_TOL = 1e-5  # |sum(weights) - 1| accepted by GaussianMixture (float32 weights of K <= ~100 components)
_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 1 << 24  # B x K x D float64 elements per chunk of the density (128 MiB)


def _as_float64(name: str, value, dim: int) -> torch.Tensor:
    """`value` (a tensor or array-like) as a float64 tensor of `dim` dimensions with finite entries."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: expected a real tensor, got dtype {t.dtype}")
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name}: expected a tensor or an array-like of numbers, got "
                            f"{type(value).__name__}") from err
    if t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got {int((~torch.isfinite(t)).sum())} NaN/inf entries")
    return t


def _check_points(name: str, x, dim: int) -> torch.Tensor:
    """Query points ``[B, D]`` (any float dtype) for a mixture of dimension `dim`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [B, {dim}], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name}: expected shape [B, {dim}], got {tuple(x.shape)}")
    return x


def component_log_density(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """``log N(x_b; mu_k, diag(sigma_k^2))`` for every point and component: ``[B, K]`` in float64.

    The direct per-element form (no ``|x|^2 - 2 x.mu + |mu|^2`` expansion, which cancels far from the
    means), chunked over B so that memory stays bounded for large B x K x D."""
    x, means, stds = x.to(torch.float64), means.to(torch.float64), stds.to(torch.float64)
    const = -0.5 * means.shape[1] * _LOG_2PI - torch.log(stds).sum(1)  # [K]
    inv = 1.0 / stds
    chunk = max(1, _CHUNK_ELEMENTS // max(1, means.numel()))
    parts = [const - 0.5 * (((xb[:, None, :] - means) * inv) ** 2).sum(-1) for xb in x.split(chunk)]
    return torch.cat(parts) if parts else x.new_zeros(0, means.shape[0])


def _joint_log(x, log_weights, means, stds) -> torch.Tensor:
    """``log pi_k + log N(x_b; mu_k, sigma_k)``: ``[B, K]`` float64."""
    return component_log_density(x, means, stds) + log_weights


def _joint_log_em(x: torch.Tensor, log_weights: torch.Tensor, means: torch.Tensor, var: torch.Tensor):
    """The E-step's ``[n, K]`` joint log-densities with the squared distance expanded into three matrix
    products, ``sum_d x^2/s^2 - 2 x.(mu/s^2) + sum_d mu^2/s^2`` (no n x K x D temporary). Its rounding is
    ~1e-16 of ``|x|^2/s^2``: small on the centred data the fit works on; ``log_prob`` keeps the direct form."""
    inv = 1.0 / var  # [K, D]
    sq = (x * x) @ inv.T - 2.0 * x @ (means * inv).T + (means * means * inv).sum(1)
    const = -0.5 * means.shape[1] * _LOG_2PI - 0.5 * torch.log(var).sum(1)
    return log_weights + const - 0.5 * sq.clamp_min(0.0)


class GaussianMixture:
    """A mixture of K diagonal Gaussians in D dimensions.

    ``weights [K]`` (non-negative, summing to 1 within ``WEIGHT_SUM_TOL``; divided by their sum),
    ``means [K, D]``, ``stds [K, D]`` (> 0): tensors or array-likes, all finite. Kept as float32 (what
    the fused ops read: ``weights``, ``means``, ``stds``) and as float64 (what ``log_prob``,
    ``responsibilities`` and the fit use). After ``fit``: ``log_likelihood_`` (mean log-likelihood of
    the features under the returned mixture), ``n_iter_`` (EM iterations run), ``converged_``,
    ``log_likelihood_history_`` (one value per E-step).
    """

    def __init__(self, weights, means, stds):
        device = next((t.device for t in (weights, means, stds) if isinstance(t, torch.Tensor)), None)
        w = _as_float64("weights", weights, 1)
        mu = _as_float64("means", means, 2)
        sd = _as_float64("stds", stds, 2)
        if w.shape[0] < 1:
            raise ValueError("weights: expected at least one component, got shape (0,)")
        if mu.shape[0] != w.shape[0]:
            raise ValueError(f"means: expected K = {w.shape[0]} rows (one per weight), got shape {tuple(mu.shape)}")
        if mu.shape[1] < 1:
            raise ValueError(f"means: expected D >= 1 columns, got shape {tuple(mu.shape)}")
        if sd.shape != mu.shape:
            raise ValueError(f"stds: expected shape {tuple(mu.shape)} (K x D, like means), got {tuple(sd.shape)}")
        if bool((w < 0).any()):
            raise ValueError(f"weights: expected non-negative values, got min {w.min().item():.6g}")
        total = w.sum().item()
        if abs(total - 1.0) > WEIGHT_SUM_TOL:
            raise ValueError(f"weights: expected a sum of 1 (within {WEIGHT_SUM_TOL:g}), got {total:.8g}")
        if bool((sd <= 0).any()):
            raise ValueError(f"stds: expected values > 0, got min {sd.min().item():.6g}")
        device = torch.device("cpu") if device is None else device
        self._weights64 = (w / total).to(device)
        self._means64, self._stds64 = mu.to(device), sd.to(device)
        self._set_float32()
        self.log_likelihood_ = None
        self.n_iter_ = 0
        self.converged_ = None
        self.log_likelihood_history_: list[float] = []

    def _set_float32(self) -> None:
        self.weights = self._weights64.to(torch.float32)
        self.means = self._means64.to(torch.float32)
        self.stds = self._stds64.to(torch.float32)

    @property
    def k(self) -> int:
        return self._means64.shape[0]

    @property
    def dim(self) -> int:
        return self._means64.shape[1]

    @property
    def device(self) -> torch.device:
        return self._means64.device

    def to(self, device) -> GaussianMixture:
        """A copy on `device` (the fit's attributes carried over)."""
        out = GaussianMixture.__new__(GaussianMixture)
        out.__dict__.update(self.__dict__)
        out._weights64, out._means64, out._stds64 = (t.to(device) for t in
                                                     (self._weights64, self._means64, self._stds64))
        out._set_float32()
        out.log_likelihood_history_ = list(self.log_likelihood_history_)
        return out

    def __repr__(self) -> str:
        fitted = "" if self.log_likelihood_ is None else (
            f", log_likelihood_={self.log_likelihood_:.6g}, n_iter_={self.n_iter_}")
        w = ", ".join(f"{v:.4g}" for v in self._weights64.tolist()[:8]) + (", ..." if self.k > 8 else "")
        return f"GaussianMixture(k={self.k}, dim={self.dim}, weights=[{w}], device={self.device}{fitted})"

    # ---- density -------------------------------------------------------------------------------------

    def _joint(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points("x", x, self.dim).to(self.device)
        return _joint_log(x, torch.log(self._weights64), self._means64, self._stds64)

    def _tables(self, dtype: torch.dtype):
        """The parameters the ops read: float64 for float64 work, else float32."""
        if dtype == torch.float64:
            return self._weights64, self._means64, self._stds64
        return self.weights, self.means, self.stds

    @staticmethod
    def _out_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x_b)`` for ``x [B, D]``: ``[B]``, computed in float64 (log-sum-exp over k), returned in
        x's dtype promoted to at least float32. Finite wherever the float64 terms are."""
        return torch.logsumexp(self._joint(x), dim=1).to(self._out_dtype(x))

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """``r_k(x_b) = pi_k N(x_b; mu_k, sigma_k) / p(x_b)``: ``[B, K]``, rows summing to 1."""
        return torch.softmax(self._joint(x), dim=1).to(self._out_dtype(x))

    def score(self, x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """``grad_x log p(x) = sum_k r_k(x) (mu_k - x) / sigma_k^2``: ``[B, D]``, the fused
        ``ops.gmm_score`` (one pass over B x K x D, stable log-sum-exp)."""
        from fastdiff.ops import gmm_score

        x = _check_points("x", x, self.dim)
        return gmm_score(x, *self._tables(x.dtype), backend=backend)

    # ---- sampling ------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None, seeds=None, *,
               return_components: bool = False, step: int = 0, dtype: torch.dtype = torch.float32,
               backend: str | None = None):
        """`n` draws ``x = mu_k + sigma_k z``, ``k ~ Categorical(pi)``, ``z ~ N(0, I)``: ``[n, D]`` (and the
        components ``[n]`` int64 with ``return_components``), on the mixture's device.

        ``seeds`` (an int or one key per sample): the fused in-kernel draw of ``ops.gmm_noise`` (Philox
        keyed per sample, so draw b does not depend on n). Otherwise the components come from
        ``torch.multinomial`` and the normals from ``torch.randn`` with `generator` (torch's default one
        when None), and ``ops.gmm_noise`` forms ``mu_k + sigma_k z``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        if seeds is not None and generator is not None:
            raise ValueError("seeds, generator: expected at most one of them, got both")
        from fastdiff.ops import gmm_noise

        shape = (n, self.dim)
        if n == 0:  # torch.multinomial and the Philox reference refuse empty draws
            x, comp = torch.empty(shape, dtype=dtype, device=self.device), torch.empty(0, dtype=torch.int64,
                                                                                       device=self.device)
        elif seeds is not None:
            keys = philox.seed_tensor(seeds, n, device=self.device)
            x, comp = gmm_noise(*self._tables(dtype), shape, per="sample", seeds=keys, step=step, dtype=dtype,
                                device=self.device, backend=backend)
        else:
            gen_device = generator.device if generator is not None else self.device
            comp = torch.multinomial(self._weights64.to(gen_device), n, replacement=True, generator=generator)
            z = torch.randn(shape, generator=generator, device=gen_device,
                            dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            x, comp = gmm_noise(*self._tables(dtype), shape, per="sample", noise=z.to(self.device),
                                component=comp.to(self.device), dtype=dtype, device=self.device, backend=backend)
        return (x, comp) if return_components else x

    # ---- EM fit --------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, features, k: int, *, iters: int = 200, tol: float = 1e-6, seed: int = 0,
            min_std: float = 1e-4) -> GaussianMixture:
        """EM for a K-component diagonal mixture of ``features [n, D]`` (float64 internally).

        Start: k-means++ seeding (a ``torch.Generator`` seeded with `seed` picks the first centre uniformly,
        each next one with probability proportional to the squared distance to the nearest centre), then
        one hard assignment: weights = cluster shares, means = centres, variances = the cluster's
        per-dimension variance about its centre (the data's variance for clusters of fewer than 2 points).
        Each iteration: E-step ``r = softmax_k(log pi_k + log N(x; mu_k, sigma_k))``; M-step
        ``N_k = sum_b r_bk``, ``pi_k = N_k / n``, ``mu_k = sum_b r_bk x_b / N_k``,
        ``sigma_k^2 = max(sum_b r_bk (x_b - mu_k)^2 / N_k, min_std^2)``. Stops when the mean
        log-likelihood improves by less than `tol`, or after `iters` M-steps."""
        x = _as_float64("features", features, 2)
        device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
        n, d = x.shape
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        if k > n:
            raise ValueError(f"k: expected at most the number of features ({n}), got {k}")
        if d < 1:
            raise ValueError(f"features: expected at least one column, got shape {tuple(x.shape)}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters: expected an int >= 0, got {iters!r}")
        if not tol >= 0:
            raise ValueError(f"tol: expected >= 0, got {tol!r}")
        if not min_std > 0:
            raise ValueError(f"min_std: expected > 0, got {min_std!r}")
        centre = x.mean(0)
        x = (x - centre).to(device)  # EM is translation-equivariant; centring keeps _joint_log_em accurate
        var_floor = float(min_std) ** 2
        log_w, mu, var = _kmeans_pp_start(x, k, seed, var_floor)
        history: list[float] = []
        converged = False
        n_iter = 0
        while True:
            joint = _joint_log_em(x, log_w, mu, var)
            ll_b = torch.logsumexp(joint, dim=1)
            history.append(ll_b.mean().item())
            if len(history) > 1 and history[-1] - history[-2] < tol:
                converged = True
                break
            if n_iter == iters:
                break
            r = torch.exp(joint - ll_b[:, None])  # responsibilities [n, K]
            log_w, mu, var = _m_step(x, r, var_floor)
            n_iter += 1
        gm = cls(log_w.exp(), mu + centre.to(device), var.sqrt())
        gm.log_likelihood_, gm.n_iter_, gm.converged_ = history[-1], n_iter, converged
        gm.log_likelihood_history_ = history
        return gm


def _m_step(x: torch.Tensor, r: torch.Tensor, var_floor: float):
    """The M-step of a diagonal mixture: ``(log pi [K], mu [K, D], sigma^2 [K, D])`` from responsibilities.
    ``N_k`` gets 10 machine epsilons so that an empty component keeps finite (zero-weight) parameters."""
    nk = r.sum(0) + 10 * torch.finfo(torch.float64).eps  # [K]
    mu = (r.T @ x) / nk[:, None]
    var = torch.stack([(r[:, j:j + 1] * (x - mu[j]) ** 2).sum(0) for j in range(r.shape[1])]) / nk[:, None]
    return torch.log(nk / nk.sum()), mu, var.clamp_min(var_floor)


def _kmeans_pp_start(x: torch.Tensor, k: int, seed: int, var_floor: float):
    """k-means++ seeding (Arthur, Vassilvitskii 2007), then one hard assignment -> ``(log pi, mu, sigma^2)``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2.cpu()
        # All remaining points coincide with a centre: any choice is as good; take one uniformly.
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=gen)) if p.sum() > 0 else \
            int(torch.randint(n, (1,), generator=gen))
        idx.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    centres = x[idx]
    assign = torch.stack([((x - c) ** 2).sum(1) for c in centres], dim=1).argmin(1)  # [n]
    hard = torch.nn.functional.one_hot(assign, k).to(torch.float64)
    counts = hard.sum(0)
    var = torch.stack([(hard[:, j:j + 1] * (x - centres[j]) ** 2).sum(0) for j in range(k)])
    var = var / counts.clamp_min(1)[:, None]
    var = torch.where((counts >= 2)[:, None], var, x.var(0, unbiased=False).expand_as(var))
    counts = counts.clamp_min(1)  # a duplicated centre (all points equal) keeps a small weight
    return torch.log(counts / counts.sum()), centres, var.clamp_min(var_floor)
