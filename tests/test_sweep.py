"""A seeded sweep of random diffusers configurations: every drop-in against diffusers' own class - and the
seed methods' schedulers where they reduce to one (DDIM-GMM without offsets, Mix-DDPM's "original" strategy)
-, whole runs in float64 (the per-family files test fp32 and low precision). Options are drawn together, as
users combine them; the per-family files test each one on purpose.

The oracle is diffusers' run with its schedule tensors upcast to float64 after ``set_timesteps`` ("exact":
the same code, its float32 per-step scalars - sigmas, alphas - made float64). diffusers' float64 run with
its float32 scalars is off the exact one by their rounding, which grids with sigma_max ~ 1e4 amplify; the
drop-in must equal diffusers' own run to 1e-5 of the sample's scale, or be no further from the exact run
than twice diffusers' own run is. Not tighter: several of diffusers' steps compute in float32 whatever the
sample's dtype (the Euler family, flow matching and DPM-Solver cast the sample to float32), so even the
"exact" run carries float32 rounding, which a few steps from a large sigma amplify to ~1e-6 of the scale.
A wrong coefficient is off by far more (a wrong grid point, a lost term: percents).

Each class runs its pinned cases (configurations a drop-in once got wrong) and then 40 drawn ones; the
first 16 run again with classifier-free guidance, fused in the drop-in, combined outside for diffusers.

Outcomes allowed beside agreement: both refuse the configuration; the drop-in refuses it (a ValueError)
where diffusers' run is not finite; the drop-in is finite where every element of diffusers' run is NaN (the
sigma-0 limits and rounding, documented per class). A data-dependent NaN (some elements: a negative learned
variance) must be NaN in the same elements. Anything else fails: a refusal of a run diffusers completes, an
exception where diffusers returns, a differing result.
"""

from __future__ import annotations

import functools
import inspect
import math
import random

import diffusers
import pytest
import torch
from diffusers.utils import logging

from fastdiff.integrations import diffusers as fast

logging.set_verbosity_error()

BETAS = dict(beta_schedule=["linear", "scaled_linear", "squaredcos_cap_v2"], rescale_betas_zero_snr=[False, True],
             timestep_spacing=["linspace", "leading", "trailing"], steps_offset=[0, 1])
# one converted sigma kind at most (diffusers refuses two): drawn as one option, set as its flag
SIGMAS = dict(sigma_kind=[None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
PRED = dict(prediction_type=["epsilon", "v_prediction", "sample"])
OPTIONS = {
    "DPMSolverMultistepScheduler": dict(
        BETAS, **SIGMAS, **PRED, solver_order=[1, 2, 3], thresholding=[False, True],
        algorithm_type=["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"],
        solver_type=["midpoint", "heun"], lower_order_final=[True, False], euler_at_final=[False, True],
        use_lu_lambdas=[False, True], final_sigmas_type=["zero", "sigma_min"], lambda_min_clipped=[-math.inf, -5.1],
        variance_type=[None, "learned_range"]),
    "UniPCMultistepScheduler": dict(
        BETAS, **SIGMAS, **PRED, solver_order=[1, 2, 3], thresholding=[False, True], predict_x0=[True, False],
        solver_type=["bh1", "bh2"], lower_order_final=[True, False], disable_corrector=[[], [0], [1, 3]],
        final_sigmas_type=["zero", "sigma_min"]),
    "EulerDiscreteScheduler": dict(
        BETAS, **SIGMAS, **PRED, interpolation_type=["linear", "log_linear"],
        timestep_type=["discrete", "continuous"], final_sigmas_type=["zero", "sigma_min"]),
    "EulerAncestralDiscreteScheduler": dict(BETAS, prediction_type=["epsilon", "v_prediction"]),
    "HeunDiscreteScheduler": dict(BETAS, **SIGMAS, **PRED, clip_sample=[False, True]),
    "DDPMScheduler": dict(BETAS, **PRED, variance_type=["fixed_small", "fixed_large", "learned_range", "learned"],
                          clip_sample=[True, False], thresholding=[False, True]),
    "LCMScheduler": dict(BETAS, **PRED, clip_sample=[False, True], thresholding=[False, True],
                         original_inference_steps=[50, 20], timestep_scaling=[10.0, 1.0]),
    "FlowMatchEulerDiscreteScheduler": dict(
        SIGMAS, shift=[1.0, 3.0], use_dynamic_shifting=[False, True], invert_sigmas=[False, True],
        shift_terminal=[None, 0.1], time_shift_type=["exponential", "linear"], stochastic_sampling=[False, True]),
    "DDIMScheduler": dict(BETAS, **PRED, clip_sample=[True, False], thresholding=[False, True],
                          set_alpha_to_one=[True, False]),
}
CASES = 40  # random ones per class, after the pinned ones
PINNED = {  # configurations a drop-in once got wrong: (config, steps, eta, start)
    "EulerAncestralDiscreteScheduler": [({"rescale_betas_zero_snr": True}, 5, 0.0, ("plain",)),
                                        ({"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, 3,
                                         0.0, ("begin", 2)),  # step 0's sigma_down lost to float32 cancellation
                                        ({"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True,
                                          "prediction_type": "v_prediction"}, 5, 0.0, ("plain",))],  # (a few digits)
    "DDPMScheduler": [({"variance_type": "learned"}, 5, 0.0, ("plain",))],  # a negative variance is NaN
    "HeunDiscreteScheduler": [({}, 1, 0.0, ("plain",))],
    "DPMSolverMultistepScheduler": [  # Lu lambdas end one float32 ulp below sigma_min: the last SDE step rises
        ({"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True, "steps_offset": 1,
          "algorithm_type": "sde-dpmsolver++", "use_lu_lambdas": True, "final_sigmas_type": "sigma_min",
          "use_beta_sigmas": True}, 13, 0.0, ("plain",))],
    "EulerDiscreteScheduler": [({}, 1, 0.0, ("sigmas", [0.92]))],  # one given sigma: a run of no step
    "UniPCMultistepScheduler": [({"lower_order_final": False}, 5, 0.0, ("begin", 4)),  # refused from step 0 only
                                ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 1, 0.0, ("plain",)),
                                ({"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, 1, 0.0,
                                 ("plain",))],
}


def draw_cases(name: str) -> list[tuple]:
    rng = random.Random(f"sweep-{name}")
    known = set(inspect.signature(getattr(diffusers, name).__init__).parameters) | {"sigma_kind"}
    options = {k: v for k, v in OPTIONS[name].items() if k in known}  # (Heun has no zero-SNR rescaling)
    cases = [(f"pinned {i}", *case) for i, case in enumerate(PINNED.get(name, []))]
    for i in range(CASES):
        config = {k: rng.choice(v) for k, v in options.items() if rng.random() < 0.5}
        kind = config.pop("sigma_kind", None)
        if kind:
            config[kind] = True
        steps, eta, u = rng.choice([1, 2, 3, 5, 8, 13]), rng.choice([0.0, 0.5, 1.0]), rng.random()
        if u < 0.15 and steps > 2:  # img2img: a run that starts at step k
            start = ("begin", rng.randrange(1, steps))
        elif u < 0.3:  # a custom grid of training timesteps (those that take one), or of sigmas
            start = ("timesteps", sorted(rng.sample(range(1, 1000), steps), reverse=True))
        elif u < 0.4:
            top = 1.0 if name.startswith("FlowMatch") else 14.6
            start = ("sigmas", sorted((rng.uniform(0.02, top) for _ in range(steps)), reverse=True))
        else:
            start = ("plain",)
        cases.append((i, config, steps, eta, start))
    return cases


def model(x: torch.Tensor, t, learned: bool) -> torch.Tensor:
    """A smooth stand-in for a network (its variance channels appended for the learned variance types)."""
    out = 0.3 * x + 0.05 * math.sin(float(t) / 100.0 + 1.0) + 0.02 * torch.cos(3 * x)
    return torch.cat([out, 0.5 * torch.tanh(x)], 1) if learned else out


def upcast(scheduler) -> None:
    """diffusers' scheduler with every float32 tensor attribute in float64 (the same values)."""
    for key, value in list(vars(scheduler).items()):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(scheduler, key, value.double())


def run(cls, config: dict, steps: int, eta: float, start: tuple, exact: bool = False,
        guidance: str | None = None) -> torch.Tensor:
    """A pipeline's loop over the run; `start`: ("plain",), ("begin", k) - set_begin_index at step k (times the
    scheduler's order) and the loop from there, as img2img runs - or ("timesteps" | "sigmas", grid) given to
    set_timesteps in place of the step count. `guidance`: classifier-free guidance (scale GUIDANCE) of two
    model outputs, done "outside" (combined in torch, as pipelines do) or "fused" (the drop-in's
    ``guidance_scale``, given [uncond; cond])."""
    s = cls(**config)
    if hasattr(s, "is_scale_input_called"):
        s.is_scale_input_called = True
    kw = {"mu": 0.8} if config.get("use_dynamic_shifting") else {}
    if start[0] in ("timesteps", "sigmas"):
        s.set_timesteps(**{start[0]: start[1]}, **kw)
    else:
        s.set_timesteps(steps, **kw)
    if exact:
        upcast(s)
    timesteps = s.timesteps
    if start[0] == "begin":
        begin = start[1] * s.order
        s.set_begin_index(begin)  # AttributeError where diffusers' class has none: the test skips the case
        timesteps = timesteps[begin:]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    x = x * float(getattr(s, "init_noise_sigma", 1.0))
    g = torch.Generator().manual_seed(1)
    params = inspect.signature(s.step).parameters
    kw = {"generator": g} if "generator" in params else {}
    if "eta" in params:
        kw["eta"] = eta
    learned = config.get("variance_type") in ("learned", "learned_range")
    flow = "FlowMatch" in getattr(cls, "__name__", "")
    for t in timesteps:
        x_in = x if flow else s.scale_model_input(x, t)
        out = model(x_in, t, learned)
        if guidance is not None:
            uncond = model(0.7 * x_in, t, learned) - 0.01
            if guidance == "fused":
                x = s.step(torch.cat([uncond, out]), t, x, guidance_scale=GUIDANCE, **kw).prev_sample
                continue
            out = uncond + GUIDANCE * (out - uncond)
        x = s.step(out, t, x, **kw).prev_sample
    return x


# the seed methods' schedulers where they reduce to diffusers' class: no offsets (DDIM-GMM with s = 0), the
# Mix-DDPM strategy that keeps the base sampler ("original")
REDUCED = {
    "DDIMGMMScheduler(offset_scale=0)": ("DDIMScheduler", functools.partial(fast.DDIMGMMScheduler, offset_scale=0.0)),
    "MixDDPMScheduler(original)": ("DDPMScheduler", functools.partial(fast.MixDDPMScheduler, strategy="original")),
    "MixDDIMScheduler(original)": ("DDIMScheduler", functools.partial(fast.MixDDIMScheduler, strategy="original")),
}


GUIDANCE = 3.0
GUIDED_CASES = 16  # the first ones of each class, again with guidance


@pytest.mark.parametrize("name", list(OPTIONS) + list(REDUCED))
def test_random_configurations_match_diffusers(name):
    check_sweep(name)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fused_guidance_matches_diffusers_with_guidance_outside(name):
    """The drop-in's ``guidance_scale`` (one fused pass over [uncond; cond]) against diffusers' class stepping
    the guided output combined in torch, as pipelines do it."""
    check_sweep(name, guided=True)


def check_sweep(name: str, guided: bool = False) -> None:
    if name in REDUCED:
        name, fast_cls = REDUCED[name]
    else:
        fast_cls = getattr(fast, "Fast" + name)
    ref_cls = getattr(diffusers, name)
    theirs, ours = ("outside", "fused") if guided else (None, None)
    for i, config, steps, eta, start in draw_cases(name)[:GUIDED_CASES if guided else None]:
        what = f"{name} case {i}: {config}, {steps} steps, eta {eta}, start {start}, guidance {ours}"
        if start[0] == "begin" and not hasattr(ref_cls, "set_begin_index"):
            continue  # DDIM and DDPM find their row by timestep: begin_index does not exist for them
        try:
            want = run(ref_cls, config, steps, eta, start, guidance=theirs)
        except Exception:  # diffusers refuses: so must the drop-in
            with pytest.raises((ValueError, TypeError, NotImplementedError, ImportError)):
                run(fast_cls, config, steps, eta, start, guidance=ours)
            continue
        want_ok = bool(torch.isfinite(want).all())
        try:
            got = run(fast_cls, config, steps, eta, start, guidance=ours)
        except ValueError as exc:
            assert not want_ok, f"{what}: refused ({exc}) where diffusers' run is finite"
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, what
        finite = torch.isfinite(want)
        if not want_ok:
            if not finite.any():  # a schedule-level NaN (every element): the drop-in may take the limit
                continue
            assert torch.equal(torch.isfinite(got), finite), f"{what}: not finite where diffusers' run is, or finite " \
                                                             f"where it is not (a data-dependent NaN must stay)"
        exact = run(ref_cls, config, steps, eta, start, exact=True, guidance=theirs)
        if not bool(torch.isfinite(exact[finite]).all()):  # where float32 rounding saved diffusers' own run (a
            exact = want                                    # grid rising by an ulp: h = 0 in float32): the oracle
        got, want, exact = got[finite], want[finite], exact[finite]
        scale = float(exact.abs().max())
        err, err_diffusers = float((got - exact).abs().max()), float((want - exact).abs().max())
        if float((got - want).abs().max()) <= 1e-5 * scale:  # diffusers' own float64 result (its float32 scalars)
            continue
        assert err <= 2 * err_diffusers, \
            f"{what}: off the exact run by {err:.3g}, diffusers' float64 run by {err_diffusers:.3g} (scale {scale:.3g})"
