"""k-diffusion-style samplers, fused: the signatures of k-diffusion's ``sample_*`` functions
(``model, x, sigmas, extra_args=None, callback=None, disable=None, ...``), one fused kernel per model call.

``model(x, sigma * s_in, **extra_args)`` is a denoiser (it returns the data prediction), as in k-diffusion;
``sigmas`` is the descending grid ending at 0. The noise of the stochastic samplers comes, in this order,
from ``noise_sampler(sigma, sigma_next)`` (k-diffusion's interface: equal outputs for equal noise), from
per-sample ``seeds`` (fastdiff's in-kernel Philox noise, no extra pass), or from ``torch.randn_like(x)``
(k-diffusion's ``default_noise_sampler``; k-diffusion's own default for the SDE samplers is a Brownian
tree from torchsde: pass ``k_diffusion.sampling.BrownianTreeNoiseSampler(...)`` as ``noise_sampler`` for
its exact numbers). ``sigmas`` are read on the host once per call to build the plan (cached).

``guidance_scale=g`` fuses classifier-free guidance: the model is called once on ``cat([x, x])`` (sigmas
likewise; the conditioning's two halves come through ``extra_args``, uncond first) and returns
``[uncond; cond]``; the step combines them as ``uncond + g*(cond - uncond)`` in its one pass.
"""

from __future__ import annotations

import functools

import torch

from fastdiff import philox
from fastdiff.samplers import dpmpp
from fastdiff.stepper import Stepper

__all__ = ["sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde"]


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
    a Brownian-tree sampler see the same numbers); default ``sigmas[i]`` and ``(sigmas[i], sigmas[i+1])``."""
    plan, steps, draws = built
    extra_args = {} if extra_args is None else extra_args
    B = x.shape[0]
    s_in = x.new_ones([B if guidance_scale is None else 2 * B])
    seeds = None if seeds is None else philox.seed_tensor(seeds, B, x.device)
    stepper = Stepper(plan, backend=backend)
    sigma_rows = rows(sigmas) if rows is not None else [(sigmas[i], (sigmas[i], sigmas[i + 1])) for i in steps]
    bar = iter(_trange(len(sigmas) - 1, disable))
    for r, (i, (sigma, pair)) in enumerate(zip(steps, sigma_rows)):
        out = model(x if guidance_scale is None else torch.cat([x, x]), sigma * s_in, **extra_args)
        denoised, uncond = (out, None) if guidance_scale is None else (out[B:], [out[:B]])
        if r == 0 or steps[r - 1] != i:  # once per step, at its first model call, as k-diffusion does
            next(bar, None)
            if callback is not None:
                shown = denoised if uncond is None else uncond[0] + guidance_scale * (denoised - uncond[0])
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": shown})
        noise = None
        if draws[r] and seeds is None:
            noise = noise_sampler(*pair) if noise_sampler is not None else torch.randn_like(x)
        x = stepper.step(x, denoised, e_uncond=uncond, noise=noise, seeds=seeds if draws[r] else None)[0]
    for _ in bar:
        pass
    return x


def _host(sigmas: torch.Tensor) -> tuple:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas: expected a 1-D tensor of N+1 >= 2 sigmas, got {sigmas!r}"[:200])
    return tuple(sigmas.detach().double().cpu().tolist())


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, seeds=None, backend=None,
                    guidance_scale=None):
    """DPM-Solver++(2M) (Lu et al. 2022), as k-diffusion's ``sample_dpmpp_2m``. Deterministic."""
    built = _plan(dpmpp.dpmpp_2m, _host(sigmas), _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, None, None, backend, guidance_scale)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", *, seeds=None, backend=None, guidance_scale=None):
    """DPM-Solver++(2M) SDE, as k-diffusion's ``sample_dpmpp_2m_sde`` (noise: see the module docstring)."""
    built = _plan(dpmpp.dpmpp_2m_sde, _host(sigmas), float(eta), float(s_noise), solver_type, _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, *, seeds=None, backend=None, guidance_scale=None):
    """DPM-Solver++(3M) SDE, as k-diffusion's ``sample_dpmpp_3m_sde`` (noise: see the module docstring)."""
    built = _plan(dpmpp.dpmpp_3m_sde, _host(sigmas), float(eta), float(s_noise), _g(guidance_scale))
    return _run(built, model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, backend, guidance_scale)


@torch.no_grad()
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
