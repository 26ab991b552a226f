"""Mix-DDPM (Wang et al., "Mix-DDPM: Enhancing Diffusion Models through Fitting Mixture Noise with Global
Stochastic Offset", ACM TOMM 2024; code github.com/wd1511/Mix-DDPM, ``GaussianMixtureDiffusion``) as plans.

The forward noise is a Gaussian mixture whose component k is ``N(mu_k/sqrt(D) * 1, I)``: each sample gets
one scalar offset, the same for all of its D elements (docs/methods.md, section 3):

    x_t    = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*eps + m_n(t)
    m_n(t) = sum_{i<=t} sqrt(beta_i*abar_t/abar_i) * mu_{k(n,i)}/sqrt(D),     k(n,i) ~ Cat(w) per sample and step

(``sum_{i<=t} beta_i*abar_t/abar_i = 1 - abar_t``, so Var m_n(t) = (1 - abar_t)*E[mu^2]/D). The draws are per
sample (a ``[B, T]`` categorical draw, a masked weighted sum: ``global_offset``); the noising itself is one
fused pass, the q_sample plan plus the kernel's per-sample ``offset[n]`` term (``q_sample_plan``).

Sampling strategies (the code's ``sample_mode``):

- ``original``: x_T ~ N(0, I), plain steps;
- ``removal_mu`` (the code's default): x_T = eps + c*u/sqrt(D), c = (1 - abar_T)*sum_k w_k mu_k^2, u ~ U[0, 1)
  one scalar for the batch (``initial_sample``), plain steps;
- ``standard``: the same x_T, then each ancestral step subtracts ``sqrt(beta_t/alpha_t)*mu_{k_n}/sqrt(D)``
  (alpha_t = 1 - beta_t, k_n ~ Cat(w) fresh per sample and step) from DDPM's posterior mean, the noise added
  as usual. The code subtracts it at every step, t = 0 included, and runs only the full T-step chain; on a
  strided grid we use the strided step's one-step beta and alpha (alpha_t = r = abar_t/abar_prev, as
  improved-diffusion's respacing rebuilds them), so the offset weight is ``-sqrt((1 - r)/r)``.
  ``with_offset`` adds it to any plan as the COFF coefficient; the per-sample ``offset[n]`` the kernel reads
  is ``mu_{k_n}/sqrt(D)``.

**Derived** (no source runs ``standard`` with DDIM): ``mixddpm_ddim_plan`` is DDIM_eta plus the same
offset term ``-sqrt((1 - r)/r)*mu_{k_n}/sqrt(D)``, r = abar_t/abar_prev. Reason: the forward offsets added
between prev and t sum to a scalar of mean 0 and variance (1 - r)*E[mu^2]/D (the identity above with abar_t
relative to abar_prev), the two moments of one draw of sqrt(1 - r)*mu_k/sqrt(D); undoing
x_t = sqrt(r)*x_prev + ... divides it by sqrt(r). At stride 1 and eta = 1, DDIM is DDPM's posterior step
(fixed_small) and r = 1 - beta_t, so this is exactly the ``standard`` DDPM step (tests/test_mixddpm.py).

Categorical draws follow the shared contract: per-sample ``seeds`` -> ``philox.categorical(philox.uniform(
seeds, n, step=..., domain=DOMAIN_CATEGORICAL), weights)``; a ``generator`` -> ``torch.rand`` uniforms through
the same inverse CDF.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import layout as L
from fastdiff import ops, philox
from fastdiff.plan import Plan
from fastdiff.samplers.ddim import ddim_plan
from fastdiff.samplers.kit import OFFSET, X, Z, plan

MEANS = (0.0, 1.0, -1.0, math.sqrt(2.0), -math.sqrt(2.0), math.sqrt(3.0), -math.sqrt(3.0))
WEIGHTS = (0.4, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05)
STRATEGIES = ("original", "removal_mu", "standard")


def check_weights(weights, n: int | None = None, name: str = "weights") -> np.ndarray:
    """`weights` as float64: 1-D, finite, >= 0, summing to 1 (within 1e-6), of length `n` when given."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not len(w):
        raise ValueError(f"{name}: expected a non-empty 1-D sequence, got shape {w.shape}")
    if n is not None and len(w) != n:
        raise ValueError(f"{name}: expected {n} weights (one per component), got {len(w)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name}: expected finite weights >= 0, got {w.tolist()}")
    if abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"{name}: expected weights summing to 1, got sum {w.sum():.8g}")
    return w


def check_mixture(means, weights) -> tuple[np.ndarray, np.ndarray]:
    """(means, weights) as float64 arrays, checked (same length, weights a distribution)."""
    mu = np.asarray(means, np.float64)
    if mu.ndim != 1 or not len(mu) or not np.all(np.isfinite(mu)):
        raise ValueError(f"mixture_means: expected a non-empty 1-D sequence of finite values, got {mu.tolist()}")
    return mu, check_weights(weights, len(mu), "mixture_weights")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")


def draw_components(weights, batch: int, n: int, *, generator=None, seeds=None, step: int = 0,
                    device=None) -> torch.Tensor:
    """``[batch, n]`` int64 categorical draws from `weights` (rounded to float32): inverse CDF
    (``philox.categorical``) of per-sample Philox uniforms of (step, DOMAIN_CATEGORICAL) when `seeds` (``[batch]``
    int64) are given - in one native draw where it can take them (``ops.gmm.draw_ids``, gmm_noise's) -, else of
    ``torch.rand`` uniforms from `generator` (the default generator when None)."""
    if seeds is not None:
        unit = _unit_mixture(weights, seeds, batch, device)
        if unit is not None:  # the draws alone, in one native call: gmm_noise's ids (the same contract)
            return ops.gmm.draw_ids(*unit, seeds, n, step)
        u = philox.uniform(seeds, n, step=step, domain=philox.DOMAIN_CATEGORICAL, device=device)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        u = torch.rand((batch, n), generator=generator, device=gen_device, dtype=torch.float32).to(device)
    return philox.categorical(u, torch.as_tensor(weights, dtype=torch.float32))  # as gmm_noise rounds them


_UNITS: dict = {}  # (weights, device) -> gmm_noise's (weights, means 0, stds 1) on the device


def _unit_mixture(weights, seeds, batch: int, device):
    """``ops.gmm.draw_ids``' mixture arguments for drawing components from host `weights` with `seeds` on
    `device`: the weights checked once (a distribution), then kept. None where that op cannot take them
    (weights on a device, seeds not a contiguous ``[batch]`` int64 tensor there, or while torch.compile
    traces: inductor fuses that path), and the caller draws through ``philox.uniform`` +
    ``philox.categorical`` instead."""
    if torch.compiler.is_compiling():
        return None
    device = torch.device(device) if device is not None else getattr(seeds, "device", None)
    if (not isinstance(seeds, torch.Tensor) or seeds.device != device or seeds.dtype != torch.int64
            or seeds.shape != (batch,) or not seeds.is_contiguous()
            or (isinstance(weights, torch.Tensor) and weights.device.type != "cpu")):
        return None
    key = (philox.host_weights(weights), device)
    unit = _UNITS.get(key)
    if unit is None:
        w = check_weights(key[0], None, "weights")
        if len(_UNITS) > 64:
            _UNITS.clear()
        K = len(w)
        unit = _UNITS[key] = (torch.tensor(w, dtype=torch.float64, device=device),
                              torch.zeros(K, 1, device=device), torch.ones(K, 1, device=device))
    return unit


def offset_weights(alphas_cumprod) -> np.ndarray:
    """``G[t, i] = sqrt(beta_i*abar_t/abar_i)`` for i <= t, else 0 (float64 ``[T, T]``): m_n(t) = G[t] . mu_k/sqrt(D).
    beta_i = 1 - abar_i/abar_{i-1} (abar_{-1} = 1), so the schedule enters through abar only."""
    abar = np.asarray(alphas_cumprod, np.float64)
    beta = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.sqrt(np.maximum(beta[None, :] * abar[:, None] / abar[None, :], 0.0))
    return np.tril(np.nan_to_num(g))


def global_offset(weights_table: torch.Tensor, components: torch.Tensor, t: torch.Tensor, means: torch.Tensor,
                  numel: int) -> torch.Tensor:
    """m_n(t) = sum_i G[t_n, i] * mu_{k(n,i)}/sqrt(D) as ``[B]`` float32 (``weights_table`` = ``offset_weights``
    on the device; ``components`` ``[B, T]``; ``t`` ``[B]``; ``means`` ``[K]``; float32 tables suffice: the
    kernel's offset term is float32, and a float32 dot product of T terms errs by ~T*2^-24 relative at most)."""
    return (torch.linalg.vecdot(weights_table[t], means[components]) / math.sqrt(numel)).to(torch.float32)


def q_sample_plan(alphas_cumprod, with_noise: bool = False) -> Plan:
    """x_t = sqrt(abar_t)*x0 + sqrt(1 - abar_t)*eps + offset[n], one row per training timestep (offset[n] is
    m_n(t) of sample n, ``global_offset``); `with_noise`: eps is a second output (drawn in the kernel)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    outputs = {"x": np.sqrt(abar) * X + np.sqrt(1.0 - abar) * Z + OFFSET, **({"noise": 1.0 * Z} if with_noise else {})}
    return plan("mixddpm q_sample", outputs=outputs, rows=abar.shape, row_label="timestep")


def offset_coefficient(abar_t, abar_prev) -> np.ndarray:
    """The ``standard`` strategy's offset weight of steps abar_t -> abar_prev: ``-sqrt((1 - r)/r)``,
    r = abar_t/abar_prev (the step's one-step alpha; at stride 1, -sqrt(beta_t/alpha_t) as in the code)."""
    r = np.asarray(abar_t, np.float64) / np.asarray(abar_prev, np.float64)
    return -np.sqrt(np.maximum(1.0 - r, 0.0) / r)


def with_offset(base: Plan, coef) -> Plan:
    """`base` with output 0 plus ``coef*offset[n]`` (coef per row): the ``standard`` strategy on any step."""
    table = base.table.copy()
    table[..., L.out(0, L.COFF)] = np.broadcast_to(np.asarray(coef, np.float64), table.shape[:-1])
    return Plan(table, outputs=base.outputs, clamp=base.clamp, guided=base.guided, name=f"mixddpm {base.name}",
                row_label=base.row_label)


def prev_alphas_cumprod(alphas_cumprod, prev_timesteps, final_alpha_cumprod: float = 1.0) -> np.ndarray:
    """abar at each previous timestep (a negative one: the chain's end, `final_alpha_cumprod`)."""
    abar, prev = np.asarray(alphas_cumprod, np.float64), np.asarray(prev_timesteps)
    return np.where(prev >= 0, abar[np.clip(prev, 0, None)], final_alpha_cumprod)


def mixddpm_ddim_plan(alphas_cumprod, timesteps, prev_timesteps, *, final_alpha_cumprod: float = 1.0,
                      **ddim) -> Plan:
    """The ``standard`` strategy on DDIM (**derived**, see the module docstring): ``ddim_plan``'s steps t -> prev
    plus ``-sqrt((1 - r)/r)*offset[n]``, offset[n] = mu_{k_n}/sqrt(D); ``ddim``: ``ddim_plan``'s keywords."""
    abar = np.asarray(alphas_cumprod, np.float64)
    base = ddim_plan(abar, timesteps, prev_timesteps, final_alpha_cumprod=final_alpha_cumprod, **ddim)
    abar_prev = prev_alphas_cumprod(abar, prev_timesteps, final_alpha_cumprod)
    return with_offset(base, offset_coefficient(abar[np.asarray(timesteps)], abar_prev))


def initial_scale(abar_T: float, means, weights) -> float:
    """c = (1 - abar_T)*sum_k w_k mu_k^2, the scale of x_T's offset in ``removal_mu`` and ``standard``."""
    mu, w = check_mixture(means, weights)
    return float((1.0 - abar_T) * np.sum(w * mu**2))


def initial_sample(scheduler_or_abar_T, shape, *, strategy: str = "removal_mu", means=MEANS, weights=WEIGHTS,
                   generator=None, seeds=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """x_T of a strategy, for any scheduler (``original``/``removal_mu`` only change x_T, so they compose with
    every solver): ``eps`` (``original``) or ``eps + c*u/sqrt(D)``, c = ``initial_scale``.

    `scheduler_or_abar_T`: a scheduler with ``alphas_cumprod`` (abar_T = its last entry) or abar_T itself.
    With a `generator` (or neither): eps by ``randn_tensor`` like diffusers, then one ``torch.rand`` u for the
    batch, as the code. With per-sample `seeds`: eps from Philox DOMAIN_INIT (step 0) and u from Philox
    (step T_u = 2**31, DOMAIN_CATEGORICAL) of each sample's own seed - one u per sample, so that a sample does
    not depend on the batch it is drawn in (the code's one u per batch would).
    """
    check_strategy(strategy)
    abar = getattr(scheduler_or_abar_T, "alphas_cumprod", None)
    abar_T = float(abar[-1]) if abar is not None else float(scheduler_or_abar_T)
    shape = tuple(shape)
    numel = math.prod(shape[1:])
    device = torch.device(device) if device is not None else torch.device("cpu")
    if seeds is not None:
        seeds = philox.seed_tensor(philox.check_seeds(seeds), shape[0], device)
        eps = philox.randn(seeds, numel, domain=philox.DOMAIN_INIT).reshape(shape).to(dtype)
        u = philox.uniform(seeds, 1, step=2**31, domain=philox.DOMAIN_CATEGORICAL).reshape(-1)
    else:
        from fastdiff.noise import randn_tensor

        eps = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        gen_device = generator.device if generator is not None else "cpu"
        u = torch.rand(1, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    if strategy == "original":
        return eps
    c = initial_scale(abar_T, means, weights)
    shift = (c * u.double() / math.sqrt(numel)).to(dtype)
    return eps + shift.view(-1, *([1] * (len(shape) - 1)))
