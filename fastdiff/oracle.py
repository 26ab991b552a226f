"""A Gaussian-mixture "dataset" with the exact model: the perfect denoiser for tests, benchmarks and the demo.

Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` (isotropic components, ``D`` elements per sample). Under VP
noising ``x_t = alpha*x0 + sigma*eps`` the marginal is ``sum_k pi_k N(alpha*mu_k, v_k I)`` with
``v_k = alpha^2 s_k^2 + sigma^2``, and with responsibilities ``r_k(x_t)`` (softmax of the component
log-densities, computed by log-sum-exp in float64):

    E[eps | x_t] = sigma * sum_k r_k (x_t - alpha*mu_k) / v_k = -sigma * grad log p_t(x_t)
    E[x0  | x_t] = sum_k r_k (alpha*s_k^2*x_t + sigma^2*mu_k) / v_k       (= (x_t - sigma*eps)/alpha)
    v            = alpha*eps - sigma*x0

``ode_solution`` integrates the probability-flow ODE to high accuracy, the reference that samplers' errors
are measured against; ``to_image_grid``/``write_png`` let the demo save samples without pillow. Compare a
scheduler with it only with x0 clipping off: diffusers' ``DDIMScheduler`` defaults to ``clip_sample=True``,
which here moves DDIM's result by up to 0.38 at any step count.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch

F64 = torch.float64


def _as_f64(value, name: str) -> torch.Tensor:
    if not isinstance(value, (torch.Tensor, int, float, np.ndarray, list, tuple)):
        raise ValueError(f"{name}: expected a tensor or number, got {type(value).__name__}")
    # Python numbers go straight to float64 (torch.as_tensor would round them to float32 first).
    t = value.detach().to("cpu", F64) if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=F64)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got {t.tolist()}")
    return t


class GaussianMixture:
    """``sum_k weights[k] * N(means[k], stds[k]^2 I)``; ``means`` is ``[K, *shape]``, stored float64."""

    def __init__(self, weights, means, stds):
        w, mu, s = _as_f64(weights, "weights"), _as_f64(means, "means"), _as_f64(stds, "stds")
        if w.dim() != 1 or bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights: expected shape [K], non-negative, summing to 1, got {w.tolist()}")
        k = w.shape[0]
        if mu.dim() < 2 or mu.shape[0] != k:
            raise ValueError(f"means: expected shape [K={k}, *shape], got {list(mu.shape)}")
        s = s.expand(k).clone() if s.dim() == 0 else s
        if s.shape != (k,) or bool((s <= 0).any()):
            raise ValueError(f"stds: expected a positive scalar or shape [{k}], got {s.tolist()}")
        self.weights, self.means, self.stds = w / w.sum(), mu, s
        self._flat = mu.reshape(k, -1)

    @property
    def shape(self) -> tuple:
        """Shape of one sample."""
        return tuple(self.means.shape[1:])

    @property
    def dim(self) -> int:
        """``D``, elements per sample."""
        return self._flat.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``[n, *shape]`` float64 (component by ``weights``, then Gaussian noise)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=F64, generator=generator)
        return (self._flat[k] + self.stds[k, None] * z).reshape(n, *self.shape)

    def _coef(self, v, name: str, n: int, device) -> torch.Tensor:
        t = _as_f64(v, name)
        t = t.expand(n) if t.dim() == 0 else t
        if t.shape != (n,) or bool((t < 0).any()):
            raise ValueError(f"{name}: expected a non-negative scalar or shape [{n}], got {list(t.shape)}")
        return t.to(device)[:, None]

    def _posterior(self, x, alpha, sigma):
        """(x [n, D], alpha [n,1], sigma [n,1], var [n,K], log(pi_k N_k(x)) [n,K]) in float64."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape[1:]) != self.shape:
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a float tensor [n, {', '.join(map(str, self.shape))}], got {got}")
        xf = x.to(F64).reshape(x.shape[0], -1)
        a, s = self._coef(alpha, "alpha", xf.shape[0], x.device), self._coef(sigma, "sigma", xf.shape[0], x.device)
        if bool(((a == 0) & (s == 0)).any()):
            raise ValueError("alpha, sigma: expected alpha > 0 or sigma > 0, got both 0")
        mu, sd, w = (t.to(x.device) for t in (self._flat, self.stds, self.weights))
        var = a**2 * sd**2 + s**2                                       # [n, K]
        # ||x - a mu_k||^2 expanded so the [n, K, D] difference is never formed.
        d2 = (xf * xf).sum(1, keepdim=True) - 2 * a * (xf @ mu.T) + a**2 * (mu * mu).sum(1)
        logj = w.log() - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return xf, a, s, var, logj

    def _predict(self, x, alpha, sigma):
        """(-score = sum_k r_k (x - a mu_k)/v_k, E[x0|x] = sum_k r_k (a s_k^2 x + sigma^2 mu_k)/v_k) as [n, D]
        float64, and the alpha, sigma columns."""
        xf, a, s, var, logj = self._posterior(x, alpha, sigma)
        rv = torch.softmax(logj, dim=1) / var                           # r_k / v_k
        rv_mu = rv @ self._flat.to(x.device)
        x0 = a * xf * (rv * self.stds.to(x.device) ** 2).sum(1, keepdim=True) + s**2 * rv_mu  # finite at a = 0
        return xf * rv.sum(1, keepdim=True) - a * rv_mu, x0, a, s

    def log_prob(self, x, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """``log p_t(x)`` of the noised marginal, ``[n]`` in x's dtype (differentiable in x)."""
        return torch.logsumexp(self._posterior(x, alpha, sigma)[4], dim=1).to(x.dtype)

    def score(self, x, alpha, sigma) -> torch.Tensor:
        """``grad_x log p_t(x)``, shaped and typed like x (alpha, sigma: floats, 0-d or [n] tensors)."""
        return (-self._predict(x, alpha, sigma)[0]).reshape(x.shape).to(x.dtype)

    def eps(self, x, alpha, sigma) -> torch.Tensor:
        """``E[eps | x_t = x]``, shaped and typed like x."""
        g, _, _, s = self._predict(x, alpha, sigma)
        return (s * g).reshape(x.shape).to(x.dtype)

    def x0(self, x, alpha, sigma) -> torch.Tensor:
        """``E[x0 | x_t = x]``, shaped and typed like x."""
        return self._predict(x, alpha, sigma)[1].reshape(x.shape).to(x.dtype)

    def v(self, x, alpha, sigma) -> torch.Tensor:
        """v-prediction ``alpha*E[eps|x] - sigma*E[x0|x]``, shaped and typed like x."""
        g, x0, a, s = self._predict(x, alpha, sigma)
        return (a * s * g - s * x0).reshape(x.shape).to(x.dtype)

    def model(self, prediction_type: str = "epsilon", alphas_cumprod=None) -> OracleModel:
        """The exact model as a diffusers-UNet-like callable ``f(x, t).sample``; see ``OracleModel``."""
        return OracleModel(self, prediction_type, alphas_cumprod)


class UNetOutput(NamedTuple):
    """Like diffusers' ``UNet2DOutput``: ``out.sample`` or ``out[0]``."""

    sample: torch.Tensor


def default_alphas_cumprod() -> torch.Tensor:
    """``DDIMScheduler()``'s table (linear betas 1e-4..0.02, 1000 steps): ``fastdiff.schedules``'."""
    from fastdiff import schedules

    return torch.from_numpy(schedules.alphas_cumprod(schedules.betas()))


class OracleModel:
    """``f(x, t, *args, **kwargs) -> UNetOutput`` predicting eps / v / x0 exactly at timestep t.

    t is an int, a 0-d tensor or a per-sample ``[n]`` tensor indexing ``alphas_cumprod`` (default: diffusers'
    ``DDIMScheduler()``); ``alpha = sqrt(abar[t])``, ``sigma = sqrt(1-abar[t])``. A fractional t (Euler-style
    schedulers) interpolates ``sqrt((1-abar)/abar)`` linearly, as diffusers' Euler schedulers do. Extra
    arguments (``encoder_hidden_states``, ``return_dict``...) are ignored.
    """

    TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, mixture: GaussianMixture, prediction_type: str = "epsilon", alphas_cumprod=None):
        if prediction_type not in self.TYPES:
            raise ValueError(f"prediction_type: expected one of {self.TYPES}, got {prediction_type!r}")
        abar = _as_f64(default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod,
                       "alphas_cumprod")
        if abar.dim() != 1 or len(abar) < 2 or bool((abar <= 0).any() | (abar > 1).any()):
            raise ValueError(f"alphas_cumprod: expected a 1-D table of >= 2 values in (0, 1], got {abar.tolist()}")
        self.mixture, self.prediction_type, self.alphas_cumprod = mixture, prediction_type, abar
        self._rho = ((1 - abar) / abar).sqrt()

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` float64 for timestep(s) t."""
        t = _as_f64(t, "timestep")
        if t.dim() > 1 or bool((t < 0).any() | (t > len(self._rho) - 1).any()):
            raise ValueError(f"timestep: expected values in [0, {len(self._rho) - 1}], got {t.tolist()}")
        lo = t.floor().long().clamp(max=len(self._rho) - 2)
        rho = torch.lerp(self._rho[lo], self._rho[lo + 1], t - lo)
        alpha = (1 + rho**2).rsqrt()
        return alpha, rho * alpha

    def __call__(self, x, t, *args, **kwargs) -> UNetOutput:
        pred = {"epsilon": self.mixture.eps, "v_prediction": self.mixture.v, "sample": self.mixture.x0}
        return UNetOutput(pred[self.prediction_type](x, *self.alpha_sigma(t)))


def default_mixture(shape=(3, 32, 32), k: int = 8, seed: int = 0) -> GaussianMixture:
    """The embedded default dataset: ``k`` procedural images (blob, stripes, gradient, ring, checker,
    cross; positions, sizes, angles and contrasting colours drawn from ``seed``) as component means in
    [-0.8, 0.8], stds in [0.05, 0.15], uniform weights. Samples are noisy versions of the means, >99% of
    pixels in [-1, 1]."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape: expected (C, H, W), got {tuple(shape)}")
    if int(k) < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=F64), torch.linspace(-1, 1, w, dtype=F64),
                            indexing="ij")
    means = []
    for i in range(k):
        cy, cx, ang, freq, rad = u(1) - 0.5, u(1) - 0.5, u(1) * math.pi, 2 + 4 * u(1), 0.3 + 0.4 * u(1)
        along = xx * torch.cos(ang) + yy * torch.sin(ang)
        r = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        mask = [torch.exp(-(r / rad) ** 2 * 3),                                  # blob
                0.5 + 0.5 * torch.sin(math.pi * freq * along),                   # stripes
                (along + 1) / 2,                                                 # gradient
                torch.exp(-((r - rad) / 0.12) ** 2),                             # ring
                ((torch.floor((xx + 1) * freq) + torch.floor((yy + 1) * freq)) % 2),  # checker
                torch.maximum(torch.exp(-((xx - cx) / 0.15) ** 2), torch.exp(-((yy - cy) / 0.15) ** 2)),  # cross
                ][i % 6].clamp(0, 1)
        bg = 1.6 * u(c, 1, 1) - 0.8
        fg = (0.4 * u(c, 1, 1) - 0.2 - bg).clamp(-0.8, 0.8)                   # near-complementary: contrast
        means.append(bg + (fg - bg) * mask)
    return GaussianMixture(torch.full((k,), 1.0 / k, dtype=F64), torch.stack(means), 0.05 + 0.1 * u(k))


def ode_solution(mixture: GaussianMixture, x_T: torch.Tensor, abar_from: float, abar_to: float = 1.0,
                 tol: float = 1e-8, steps: int | None = None) -> torch.Tensor:
    """The probability-flow ODE solution from noise level ``abar_from`` down to ``abar_to`` (1 = clean).

    ODE (DDIM's, Song et al. 2021 eq. 14): with ``y = x/alpha``, ``rho = sigma/alpha``,
    ``dy/drho = eps(x, alpha, sigma) = rho * g(y, rho)``, ``g = sum_k r_k (y - mu_k)/(s_k^2 + rho^2)`` (the
    mixture's VE form: alpha = 1, sigma = rho). **Derived** reduction: dy/drho lies in span(y, mu_1..mu_K),
    so y stays in span(y_T, mu_1..mu_K): in an orthonormal basis of it the ODE is exact in <= K+1
    coordinates per sample, its cost independent of D. Time ``w = log sqrt(s0^2 + rho^2)``, s0 = min s_k:
    ``dy/dw = e^{2w} g`` is smooth in w through rho = 0, and log-spaced in rho at high noise. Adaptive RK4
    with step doubling (dense where the responsibilities switch), local error carried to the clean end
    below ``tol`` per unit of w, Richardson-extrapolated; or, with ``steps``, RK4 on a uniform w-grid.
    Measured (max |x| error vs 8192+ uniform steps, from diffusers' t=999 to 1): default mixture, n=64:
    ~1e-11 at tol=1e-8 (~330 steps, 0.3-0.5 s on 2 cores), 3e-9 at tol=1e-6; uniform 512 steps
    3e-9..1e-8, 1024 2e-10..7e-10 (fourth order). 1-D mixture, stds 0.1-0.2: 2.7e-10 at tol=1e-8.
    Float64 throughout; returns x_T's dtype.
    """
    if not 0 < float(abar_from) <= float(abar_to) <= 1:
        raise ValueError(f"abar_from, abar_to: expected 0 < abar_from <= abar_to <= 1, got {abar_from}, {abar_to}")
    if steps is not None and int(steps) < 1:
        raise ValueError(f"steps: expected >= 1 or None, got {steps}")
    if not tol > 0:
        raise ValueError(f"tol: expected > 0, got {tol}")
    if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape[1:]) != mixture.shape or not bool(x_T.isfinite().all()):
        raise ValueError(f"x_T: expected finite values of shape [n, {', '.join(map(str, mixture.shape))}], "
                         f"got {getattr(x_T, 'shape', type(x_T).__name__)}")
    a_from, a_to = math.sqrt(float(abar_from)), math.sqrt(float(abar_to))
    rho_from, rho_to = math.sqrt(1 - float(abar_from)) / a_from, math.sqrt(1 - float(abar_to)) / a_to
    # Orthonormal basis [U | e_n] of span(mu_1..mu_K, y_T[n]); coordinates c (samples), m (means).
    mu, sd, logw, dim = mixture._flat, mixture.stds, mixture.weights.log(), mixture.dim
    u, sv, _ = torch.linalg.svd(mu.T, full_matrices=False)
    u = u[:, sv > sv.max() * 1e-12] if bool(sv.max() > 0) else u[:, :0]
    y = x_T.detach().to("cpu", F64).reshape(x_T.shape[0], -1) / a_from
    resid = y - (y @ u) @ u.T
    nrm = resid.norm(dim=1, keepdim=True)
    e = torch.where(nrm > 0, resid / nrm.clamp_min(1e-300), torch.zeros_like(resid))
    c = torch.cat([y @ u, nrm], dim=1)                                   # [n, r+1]
    m = torch.cat([mu @ u, torch.zeros(len(mu), 1, dtype=F64)], dim=1)   # [K, r+1]
    s0 = float(sd.min())

    def f(c, w):                                                          # dc/dw = e^{2w} g
        var = sd**2 + max(math.exp(2 * w) - s0**2, 0.0)                   # s_k^2 + rho^2, [K]
        d2 = ((c[:, None, :] - m[None]) ** 2).sum(-1)                     # [n, K]
        rv = torch.softmax(logw - 0.5 * d2 / var - 0.5 * dim * var.log(), dim=1) / var
        return math.exp(2 * w) * (c * rv.sum(1, keepdim=True) - rv @ m)

    w, w_end = 0.5 * math.log(s0**2 + rho_from**2), 0.5 * math.log(s0**2 + rho_to**2)
    if steps is not None:                                                 # fixed uniform w-grid
        ws = torch.linspace(w, w_end, int(steps) + 1, dtype=F64).tolist()
        for w0, w1 in zip(ws[:-1], ws[1:]):
            c = _rk4(f, c, w0, w1 - w0)
    # Adaptive: RK4 step doubling; accept when the local error, carried to the clean end by the flow's
    # contraction ~ e^{w_end - w} (exact for one Gaussian), is <= tol per unit of w; keep the
    # Richardson-extrapolated (fifth-order) value.
    span, h = w - w_end, -(w - w_end) / 32
    while steps is None and w > w_end:
        last = w + h <= w_end + 1e-12 * span
        h = w_end - w if last else h
        big, half = _rk4(f, c, w, h), _rk4(f, _rk4(f, c, w, h / 2), w + h / 2, h / 2)
        err, allowed = a_to * math.exp(w_end - w) * float((half - big).abs().max()) / 15, tol * -h / span
        if err <= allowed:
            c, w = half + (half - big) / 15, w_end if last else w + h
        elif not -h > 1e-9 * span:
            raise RuntimeError(f"ode_solution: step size underflow at w = {w} (local error {err})")
        h *= min(4.0, max(0.2, 0.9 * (allowed / err) ** 0.25)) if err > 0 else 4.0
    y = c[:, :-1] @ u.T + c[:, -1:] * e                                   # back to R^D, then x = alpha y
    return (a_to * y).reshape(x_T.shape).to(x_T.device, x_T.dtype)


def _rk4(f, c, w, h):
    """One classical Runge-Kutta step of dc/dw = f(c, w)."""
    k1 = f(c, w)
    k2 = f(c + 0.5 * h * k1, w + 0.5 * h)
    k3 = f(c + 0.5 * h * k2, w + 0.5 * h)
    return c + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(c + h * k3, w + h))


def to_image_grid(x: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """``[n, C, H, W]`` images in [-1, 1] (C = 1 or 3) -> one uint8 ``[rows*(H+p)+p, nrow*(W+p)+p, 3]`` grid."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"x: expected shape [n, 1 or 3, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    if int(nrow) < 1:
        raise ValueError(f"nrow: expected >= 1, got {nrow}")
    n, c, h, w = x.shape
    img = ((x.detach().to("cpu", F64).expand(n, 3, h, w) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    ncol, p = min(int(nrow), n), padding
    grid = torch.zeros(-(-n // ncol) * (h + p) + p, ncol * (w + p) + p, 3, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[p + r * (h + p):p + r * (h + p) + h, p + q * (w + p):p + q * (w + p) + w] = img[i].permute(1, 2, 0)
    return grid.numpy()


def write_png(path, img: np.ndarray) -> None:
    """Write a uint8 ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey) array as an 8-bit PNG (zlib + struct only)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3) or 0 in img.shape:
        raise ValueError(f"img: expected uint8 [H, W, 3] or [H, W], got {img.dtype} {list(img.shape)}")
    h, w = img.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(img).reshape(h, -1)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if img.ndim == 3 else 0, 0, 0, 0)   # filter 0 on every row
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
                 + chunk(b"IEND", b""))
