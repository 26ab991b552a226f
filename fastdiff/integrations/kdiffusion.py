"""k-diffusion-style samplers, fused: the signatures of k-diffusion's ``sample_*`` functions
(``model, x, sigmas, extra_args=None, callback=None, disable=None, ...``), one fused kernel per model call.

``model(x, sigma * s_in, **extra_args)`` is a denoiser (it returns the data prediction), as in k-diffusion;
``sigmas`` is the descending grid ending at 0. The noise of the stochastic samplers comes, in this order,
from ``noise_sampler(sigma, sigma_next)`` (k-diffusion's interface: equal outputs for equal noise), from
per-sample ``seeds`` (fastdiff's in-kernel Philox noise, no extra pass), or from ``torch.randn_like(x)``
(k-diffusion's ``default_noise_sampler``, drawn by ``fastdiff.noise.randn_like``: the same values and
generator state, faster on the CPU; k-diffusion's own default for the SDE samplers is a Brownian
tree from torchsde: pass ``k_diffusion.sampling.BrownianTreeNoiseSampler(...)`` as ``noise_sampler`` for
its exact numbers). ``sigmas`` are read on the host once per call to build the plan (cached).

``guidance_scale=g`` fuses classifier-free guidance: the model is called once on ``cat([x, x])`` (sigmas
likewise; the conditioning's two halves come through ``extra_args``, uncond first) and returns
``[uncond; cond]``; the step combines them as ``uncond + g*(cond - uncond)`` in its one pass.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fastdiff import philox
from fastdiff.noise import randn_like
from fastdiff.samplers import dpmpp, euler
from fastdiff.stepper import Stepper

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_dpmpp_3m_sde", "sample_dpmpp_sde"]


@functools.lru_cache(maxsize=16)
def _plan(builder, sigmas: tuple, *args):
    return builder(sigmas, *args)


def _g(guidance_scale):
    return None if guidance_scale is None else float(guidance_scale)


def _trange(n: int, disable):
    try:
        from tqdm.auto import trange
    except ImportError:  # no progress bar without tqdm
        return range(n)
    return trange(n, disable=disable)


def _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale,
         rows=None):
    """Drive a plan of ``dpmpp`` (or its kind): per row, the model at its sigma, then the fused step.
    ``rows(sigmas)`` gives, per plan row, the model's sigma and the (sigma, sigma_next) its noise sampler
    is called with, computed as k-diffusion computes them (0-d tensors on the device, so that the model and
    a Brownian-tree sampler see the same numbers); default ``sigmas[i]`` and ``(sigmas[i], sigmas[i+1])``.
    ``draws[r]``: whether row r calls the noise source (it may, as k-diffusion does, when the row reads
    no noise). ``built`` may name two plans, ``((first, second), steps, draws, calls)`` with ``calls[r] = (which,
    row)``: a ``second`` row reads the ``first`` call's x0 and start sample as its history (Heun)."""
    plan, steps, draws = built[:3]
    plans, calls = (plan, built[3]) if len(built) > 3 else ((plan,), None)
    extra_args = {} if extra_args is None else extra_args
    B = x.shape[0]
    s_in = x.new_ones([B if guidance_scale is None else 2 * B])
    seeds = None if seeds is None else philox.seed_tensor(seeds, B, x.device)
    stepper = Stepper(plans[0], backend=backend)
    sigma_rows = rows(sigmas) if rows is not None else [(sigmas[i], (sigmas[i], sigmas[i + 1])) for i in steps]
    bar = iter(_trange(len(sigmas) - 1, disable))
    saved = None
    for r, (i, (sigma, pair)) in enumerate(zip(steps, sigma_rows)):
        out = model(x if guidance_scale is None else torch.cat([x, x]), sigma * s_in, **extra_args)
        denoised, uncond = (out, None) if guidance_scale is None else (out[B:], [out[:B]])
        if r == 0 or steps[r - 1] != i:  # once per step, at its first model call, as k-diffusion does
            next(bar, None)
            if callback is not None:
                shown = denoised if uncond is None else uncond[0] + guidance_scale * (denoised - uncond[0])
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": shown})
        noise = None
        if draws[r] and seeds is None:
            noise = noise_sampler(*pair) if noise_sampler is not None else randn_like(x)
        which, row = calls[r] if calls is not None else (0, r)
        reads = plans[which].noise_rows[row]  # else drawn only to keep the caller's generator in k-diffusion's step
        outs = stepper.step(x, denoised, e_uncond=uncond, noise=noise if reads else None,
                            seeds=seeds if reads else None, plan=plans[which], row=row, m=saved if which else None)
        saved = [outs[1], x] if calls is not None and not which else None
        x = outs[0]
    for _ in bar:
        pass
    return x


def _sampler(fn):
    """A ``sample_*`` function: without grad, and a grid of one sigma (no step) returns x as it is, as
    k-diffusion's loop over ``len(sigmas) - 1`` steps does."""
    @functools.wraps(fn)
    def sample(model, x, sigmas, *args, **kwargs):
        if isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1 and len(sigmas) == 1:
            return x
        return fn(model, x, sigmas, *args, **kwargs)
    return torch.no_grad()(sample)


def _host(sigmas: torch.Tensor) -> tuple:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas: expected a 1-D tensor of N+1 >= 2 sigmas, got {sigmas!r}"[:200])
    return tuple(sigmas.detach().double().cpu().tolist())


@_sampler
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seeds=None, backend=None,
                    guidance_scale=None):
    """DPM-Solver++(2M) (Lu et al. 2022), as k-diffusion's ``sample_dpmpp_2m``. Deterministic."""
    built = _plan(dpmpp.dpmpp_2m, _host(sigmas), _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, None, None, backend, guidance_scale)


@_sampler
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", *, seeds=None, backend=None, guidance_scale=None):
    """DPM-Solver++(2M) SDE, as k-diffusion's ``sample_dpmpp_2m_sde`` (noise: see the module docstring)."""
    built = _plan(dpmpp.dpmpp_2m_sde, _host(sigmas), float(eta), float(s_noise), solver_type, _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale)


@_sampler
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, *, seeds=None, backend=None, guidance_scale=None):
    """DPM-Solver++(3M) SDE, as k-diffusion's ``sample_dpmpp_3m_sde`` (noise: see the module docstring)."""
    built = _plan(dpmpp.dpmpp_3m_sde, _host(sigmas), float(eta), float(s_noise), _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale)


@_sampler
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2, *, seeds=None, backend=None, guidance_scale=None):
    """DPM-Solver++ (stochastic, two model calls a step), as k-diffusion's ``sample_dpmpp_sde``."""
    host = _host(sigmas)
    built = _plan(dpmpp.dpmpp_sde, host, float(eta), float(s_noise), float(r), _g(guidance_scale))

    def rows(sigmas):  # sigma_fn(t), the intermediate sigma_fn(s) and sigma_fn(t_next), as k-diffusion computes them
        out = []
        for i in range(len(sigmas) - 1):
            if host[i + 1] == 0:
                out.append((sigmas[i], (sigmas[i], sigmas[i + 1])))
                continue
            t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            s_mid = (t + (t_next - t) * r).neg().exp()
            out += [(sigmas[i], (t.neg().exp(), s_mid)), (s_mid, (t.neg().exp(), t_next.neg().exp()))]
        return out

    return _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale,
                rows)


def _gammas(host: tuple, s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """Karras' churn gamma_i per step, as ``euler.churn_sigmas`` (and k-diffusion) choose it."""
    n = len(host) - 1
    return [min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0 for s in host[:-1]]


def _euler(sigmas: tuple, s_churn, s_tmin, s_tmax, s_noise, guidance):
    """Euler with churn placed as in Karras' Algorithm 2: step i's output carries step i+1's lift."""
    p = euler.euler_plan(sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, churn="karras",
                         prediction_type="sample", guidance=guidance)
    churn = any(_gammas(sigmas, s_churn, s_tmin, s_tmax))  # then k-diffusion draws every step's eps
    return p, list(range(p.steps)), [churn and i < p.steps - 1 for i in range(p.steps)]


def _ancestral(sigmas: tuple, eta, s_noise, guidance):
    p = euler.euler_ancestral_plan(sigmas, eta=eta, s_noise=s_noise, prediction_type="sample", guidance=guidance)
    return p, list(range(p.steps)), list(p.noise_rows)


def _heun(sigmas: tuple, s_churn, s_tmin, s_tmax, s_noise, guidance):
    """Heun's two calls a step (one into sigma = 0), churn carried by the step's last call as in ``_euler``."""
    s = np.asarray(sigmas, np.float64)
    sigma_hat = euler.churn_sigmas(s, s_churn, s_tmin, s_tmax)
    lift_next = np.append(s_noise * np.sqrt(sigma_hat**2 - s[:-1] ** 2)[1:], 0.0)
    two = s[1:] > 0
    kw = dict(prediction_type="sample", guidance=guidance)
    first = euler.heun_first(sigma_hat, s[1:], **kw)  # into sigma = 0 the next lift is 0: none to carry
    second = euler.heun_second(sigma_hat[two], s[1:][two], lift_next=lift_next[two], **kw) if two.any() else None
    steps, calls, k = [], [], 0
    for i in range(len(s) - 1):
        steps.append(i), calls.append((0, i))
        if two[i]:
            steps.append(i), calls.append((1, k))
            k += 1
    churn = any(_gammas(sigmas, s_churn, s_tmin, s_tmax))  # then k-diffusion draws every step's eps
    last = [r == len(steps) - 1 or steps[r + 1] != i for r, i in enumerate(steps)]  # a step's last call
    return (first, second), steps, [churn and lst and i < len(s) - 2 for i, lst in zip(steps, last)], calls


def _churned(host, sigmas, x, s_churn, s_tmin, s_tmax, s_noise):
    """Per step: the model's sigma_hat as k-diffusion computes it; x lifted to sigma_hat_0 as its first step does.
    With churn anywhere the noise draws follow k-diffusion's (one ``randn_like`` a step), so that a seeded
    global generator gives its samples; without, none is drawn (k-diffusion draws and discards N)."""
    gammas = _gammas(host, s_churn, s_tmin, s_tmax)
    hats = [sigmas[i] * (g + 1) for i, g in enumerate(gammas)]
    eps = randn_like(x) * s_noise if any(gammas) else None  # k-diffusion's first eps (drawn if any churn)
    if gammas[0] > 0:
        x = x + eps * (hats[0] ** 2 - sigmas[0] ** 2) ** 0.5
    return hats, x


@_sampler
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, *, backend=None, guidance_scale=None):
    """Euler (Karras et al. 2022, Algorithm 2 with churn), as k-diffusion's ``sample_euler``; the churn noise
    is ``torch.randn_like(x)``, drawn in k-diffusion's order (one fused pass a step: the step's output takes
    the next step's lift)."""
    host = _host(sigmas)
    built = _plan(_euler, host, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise), _g(guidance_scale))
    hats, x = _churned(host, sigmas, x, s_churn, s_tmin, s_tmax, s_noise)
    return _run(built, model, x, sigmas, extra_args, callback, disable, None, None, backend, guidance_scale,
                lambda sigmas: [(h, None) for h in hats])


@_sampler
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, *, seeds=None, backend=None, guidance_scale=None):
    """Ancestral Euler, as k-diffusion's ``sample_euler_ancestral`` (noise: see the module docstring)."""
    built = _plan(_ancestral, _host(sigmas), float(eta), float(s_noise), _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale)


@_sampler
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, *, backend=None, guidance_scale=None):
    """Heun (Karras et al. 2022, Algorithm 2), as k-diffusion's ``sample_heun``: two model calls a step (one
    into sigma = 0), one fused pass each; churn as in ``sample_euler``."""
    host = _host(sigmas)
    built = _plan(_heun, host, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise), _g(guidance_scale))
    hats, x = _churned(host, sigmas, x, s_churn, s_tmin, s_tmax, s_noise)
    model_sigmas = []
    for i, hat in enumerate(hats):
        model_sigmas += [hat, sigmas[i + 1]] if host[i + 1] > 0 else [hat]
    return _run(built, model, x, sigmas, extra_args, callback, disable, None, None, backend, guidance_scale,
                lambda sigmas: [(h, None) for h in model_sigmas])
