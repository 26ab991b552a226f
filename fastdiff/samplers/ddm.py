"""DDM, decoupled diffusion (Huang et al., "Decoupled Diffusion Models: Simultaneous Image to Zero and Zero to
Noise", arXiv 2306.13720; the authors' code ``ddm/ddm_const.py``) as plan builders (docs/methods.md, section 4).

The forward process with constant attenuation ``h = -x0`` is ``x_t = (1 - t)*x0 + sqrt(t)*eps``, t in (0, 1].
The model has two heads: C (the image part, ``C = -x0``; the kernel's e0) and eps (the noise; e1). With the
code's EDM-style preconditioning the heads are the raw outputs F_x, F_y of a network fed ``x/sqrt(1 + t)``:

    C   = (t - 1)*x + t/sqrt(1 + t)*F_x          eps = sqrt(t)*x + sqrt((1 - t)/(1 + t))*F_y

both linear in x and the raw heads, so they are forms of X, E0, E1 like any prediction type. A step from t
to t_next = t - s, with the data prediction ``x0 = clamp(x - t*C - sqrt(t)*eps)``:

    stochastic  x_next = x + s*x0 - (s/sqrt(t))*eps + sqrt(s*t_next/t)*z        (the code's Brownian bridge)
    eta         x_next = (1 - t_next)*x0 + sqrt(t_next - sig^2)*eps + sig*z,   sig^2 = eta^2*s*t_next/t
    heun        call 1 at (x, t):        d   = x0 - eps/sqrt(t),       x_h = x + s*d
                call 2 at (x_h, t_next): d_2 = x0_2 - eps_2/sqrt(t_next)
                x_next = x + s*(d + d_2)/2 + sqrt(s*t_next/t)*z = (x + x_h)/2 + (s/2)*d_2 + sqrt(s*t_next/t)*z

The eta family is **derived** (not in the paper or the code): it keeps the forward marginal (variance t_next
of the noise part) for every eta, and equals the stochastic step at eta = 1 whenever x = (1 - t)*x0 +
sqrt(t)*eps: then x + s*x0 - (s/sqrt t)*eps = (1 - t_next)*x0 + ((t - s)/sqrt t)*eps and
sqrt(t_next - s*t_next/t) = t_next/sqrt(t). The Heun form of the last line is **derived** by substituting
x_h = x + s*d: call 2 reads only x_h (its X), its own heads and the step's start x (history slot m0, handed
by reference by the caller), so neither call 1's eps nor its x0 is kept. The code's ``sample_fn_2order``
adds the noise after the corrected step, as here; a step without a second call (``second=False``: the
code's remainder and denoising steps, and any step into t = 0, where eps/sqrt(t_next) is undefined) adds
it to x_h.
"""

from __future__ import annotations

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.forward import q_sample_plan
from fastdiff.samplers.kit import E0, E1, M0, X0, Lin, X, Z, plan

SAMPLERS = ("stochastic", "eta", "heun")
PRECONDITIONINGS = (None, "edm")
X_START = M0  # Heun's second call: the sample the step started from (given by the caller, by reference)


def _f64(*values) -> list[np.ndarray]:
    return np.broadcast_arrays(*(np.asarray(v, np.float64) for v in values))


def check_choice(name: str, got, allowed) -> None:
    if got not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {got!r}")


def _check_times(t: np.ndarray, t_next: np.ndarray, row_label: str) -> None:
    bad = np.flatnonzero(~((t > 0) & (t <= 1)))
    if len(bad):
        raise ValueError(f"t: expected values in (0, 1], got {t.flat[bad[0]]} at {row_label} {bad[0]}")
    bad = np.flatnonzero(~((t_next >= 0) & (t_next < t)))
    if len(bad):
        raise ValueError(f"t_next: expected 0 <= t_next < t, got {t_next.flat[bad[0]]} (t = {t.flat[bad[0]]}) at "
                         f"{row_label} {bad[0]}")


def heads(t, preconditioning: str | None = None) -> tuple[Lin, Lin]:
    """(C, eps): the two heads as forms of X and the model outputs E0, E1 at time t (float64 array)."""
    check_choice("preconditioning", preconditioning, PRECONDITIONINGS)
    if preconditioning is None:
        return E0, E1
    t = np.asarray(t, np.float64)
    return (t - 1.0) * X + t / np.sqrt(1.0 + t) * E0, np.sqrt(t) * X + np.sqrt((1.0 - t) / (1.0 + t)) * E1


def data_prediction(t, C: Lin, eps: Lin) -> Lin:
    """x0 = x - t*C - sqrt(t)*eps (the code's ``pred_x0_from_xt``)."""
    t = np.asarray(t, np.float64)
    return X - t * C - np.sqrt(t) * eps


def ddm_step(t, t_next, *, sampler: str = "stochastic", eta: float = 0.0, clip=None,
             preconditioning: str | None = None, guidance=None, row_label: str = "step") -> Plan:
    """Rows of one-call steps t -> t_next (float64 arrays over rows): sampler "stochastic" or "eta" (the
    module docstring). Outputs x_next and x0 (clamped to [-clip, clip] when clip is given)."""
    check_choice("sampler", sampler, ("stochastic", "eta"))
    if not eta >= 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    t, t_next = _f64(t, t_next)
    _check_times(t, t_next, row_label)
    C, eps = heads(t, preconditioning)
    s = t - t_next
    if sampler == "stochastic":
        x_next = X + s * X0 - (s / np.sqrt(t)) * eps + np.sqrt(s * t_next / t) * Z
    else:
        sig2 = eta**2 * s * t_next / t
        x_next = (1.0 - t_next) * X0 + np.sqrt(np.maximum(t_next - sig2, 0.0)) * eps + np.sqrt(sig2) * Z
    return plan(f"ddm {sampler}", x0=data_prediction(t, C, eps), outputs={"x": x_next, "x0": X0}, clip=clip,
                guidance=guidance, rows=t.shape, row_label=row_label)


def ddm_heun(t, t_next, second, *, clip=None, preconditioning: str | None = None, guidance=None) -> tuple[Plan, Plan]:
    """(first, second) of the second-order sampler over steps t -> t_next (arrays over steps); ``second``
    (bool per step) says which steps take a second call. Step i runs first's row i, then - where second[i]
    - second's row ``cumsum(second)[i] - 1`` at x_h, t_next with ``m=[x_start]``. Outputs x (x_h, or the
    step's end) and x0."""
    t, t_next, second = _f64(t, t_next, second)
    _check_times(t, t_next, "step")
    two = second != 0
    bad = np.flatnonzero(two & (t_next == 0))
    if len(bad):
        raise ValueError(f"second: a second call into t = 0 divides by sqrt(0) (step {bad[0]}); end with a "
                         f"one-call step")
    s, lift = t - t_next, np.sqrt((t - t_next) * t_next / t)
    C, eps = heads(t, preconditioning)
    x_h = X + s * (X0 - eps / np.sqrt(t)) + np.where(two, 0.0, lift) * Z
    first = plan("ddm heun 1", x0=data_prediction(t, C, eps), outputs={"x": x_h, "x0": X0}, clip=clip,
                 guidance=guidance, rows=t.shape)
    tc, sc, lc = t_next[two], s[two], lift[two]
    if not len(tc):  # no step takes a second call: a plan that is never run, kept so the pair is uniform
        tc, sc, lc = np.ones(1), np.zeros(1), np.zeros(1)
    C2, eps2 = heads(tc, preconditioning)
    x_next = 0.5 * (X_START + X) + (0.5 * sc) * (X0 - eps2 / np.sqrt(tc)) + lc * Z
    return first, plan("ddm heun 2", x0=data_prediction(tc, C2, eps2), outputs={"x": x_next, "x0": X0}, clip=clip,
                       guidance=guidance, rows=tc.shape)


def ddm_grid(num_inference_steps: int, *, sampler: str = "stochastic", denoise: bool = True,
             denoise_step: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(t [K+1] from 1 down to 0, second [K] bool) of the code's samplers, float64.

    One-call samplers (``sample_fn``): N steps of 1/N. Heun (``sample_fn_2order``, N counts model calls):
    N//2 steps of 2/N with a second call, and for odd N a last one-call step of 1/N. With ``denoise`` the
    last step is split into (its length - denoise_step) and denoise_step, both one-call. The last step
    always lands on t = 0 (the code sets its length to the time left), and never takes a second call."""
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < (2 if sampler == "heun" else 1):
        raise ValueError(f"num_inference_steps: expected an int >= {2 if sampler == 'heun' else 1}, got {n!r}")
    if sampler == "heun":
        steps = [2.0 / n] * (n // 2) + ([1.0 - (n // 2) * 2.0 / n] if n % 2 else [])
        second = [True] * (n // 2) + ([False] if n % 2 else [])
    else:
        steps, second = [1.0 / n] * n, [False] * n
    if denoise:
        if not 0 < denoise_step < steps[-1]:
            raise ValueError(f"denoise_step: expected a value in (0, {steps[-1]}) (the last step), got {denoise_step}")
        steps[-1:] = [steps[-1] - denoise_step, denoise_step]
        second[-1:] = [False, False]
    t = np.concatenate([[1.0], 1.0 - np.cumsum(steps)])
    t[-1] = 0.0
    second = np.array(second)
    second[-1] = False
    return t, second


def add_noise_plan(t, row_label: str = "timestep", with_noise: bool = False) -> Plan:
    """The forward process x_t = (1 - t)*x0 + sqrt(t)*noise, one row per entry of t (`with_noise`: the noise
    is a second output)."""
    t = np.asarray(t, np.float64)
    if np.any(~((t >= 0) & (t <= 1))):
        raise ValueError(f"t: expected values in [0, 1], got {t.ravel()[:8].tolist()}")
    return q_sample_plan(1.0 - t, np.sqrt(t), row_label=row_label, with_noise=with_noise)
