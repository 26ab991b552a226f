"""DPM-Solver and DPM-Solver++ multistep (Lu et al., NeurIPS 2022, arXiv 2206.00927; Lu et al. 2022, arXiv
2211.01095) as plan builders, equal to diffusers' ``DPMSolverMultistepScheduler`` (0.42; docs/methods.md,
section 7). Step i goes from grid point s0 = i to t = i + 1, with s1 = i - 1, s2 = i - 2 and
``h = lambda_t - lambda_s0``, ``r0 = (lambda_s0 - lambda_s1)/h``, ``r1 = (lambda_s1 - lambda_s2)/h``:

    D0 = m0      D1 = (m0 - m1)/r0  (order 2)      D1_0 = (m0 - m1)/r0,  D1_1 = (m1 - m2)/r1,
    D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1)/(r0 + r1)                   (order 3)

    dpmsolver++      x_t = (sigma_t/sigma_s0) x - alpha_t (e^-h - 1) D0 + c1 D1 + c2 D2
    dpmsolver        x_t = (alpha_t/alpha_s0) x - sigma_t (e^h - 1) D0 + c1 D1 + c2 D2
    sde-dpmsolver++  x_t = (sigma_t/sigma_s0) e^-h x + alpha_t (1 - e^-2h) D0 + c1 D1 + c2 D2
                           + sigma_t sqrt(1 - e^-2h) z
    sde-dpmsolver    x_t = (alpha_t/alpha_s0) x - 2 sigma_t (e^h - 1) D0 + c1 D1 + sigma_t sqrt(e^2h - 1) z

(c1, c2 per algorithm and ``solver_type`` below; third order as the DPM-Solver authors' code and diffusers
have it, whose D2 term is half the exponential integrator's Taylor term - globally second order, see
``fastdiff.reference.dpmsolver``). The "++" algorithms keep data predictions in the history
(``m0`` is this step's x0); the noise-prediction algorithms ``dpmsolver``/``sde-dpmsolver`` keep noise
predictions: there the kernel's "x0" slot holds this step's eps - just the converted model output, a
linear form of x and the model output like any data prediction - and the history ring keeps those.

Warm-up, ``lower_order_final``/``euler_at_final`` and a final sigma of 0 are rows of the plan
(``multistep_orders``); the limits at sigma_t = 0 (lambda_t = inf: e^-h = 0, sigma_t = 0, alpha_t = 1, so the
step returns m0) and at h = 0 (the identity) are taken here, on the host, in float64.

The grids diffusers adds to ``fastdiff.schedules.dpm_sigmas`` (Lu's uniform-lambda, beta, flow, custom
timesteps) are ``dpm_solver_grid`` here; they belong in ``fastdiff.schedules``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import schedules
from fastdiff.plan import Plan
from fastdiff.samplers.kit import E0, M0, M1, X0, Lin, X, Z, plan
from fastdiff.samplers.predictions import check_prediction_type, predict

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
DATA_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")  # history of data predictions (DPM-Solver++)
SOLVER_TYPES = ("midpoint", "heun")
GRIDS = (None, "karras", "lu", "exponential", "beta", "flow")


def _choice(name, got, allowed):
    if got not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {got!r}")


# ---------------------------------------------------------------------------------------------------- grids
def dpm_solver_grid(abar, num_inference_steps=None, *, timesteps=None, spacing="linspace", steps_offset=0,
                    sigma_schedule=None, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                    beta_schedule="linear", flow_shift=1.0) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N+1], timesteps int64 [N]): ``DPMSolverMultistepScheduler.set_timesteps``' grid.

    `abar`: diffusers' ``alphas_cumprod`` (float32 values; with zero terminal SNR already ending at 2^-24).
    ``sigma_schedule``: None (the `spacing` grid), "karras", "exponential" (``schedules.dpm_sigmas``), "lu"
    (Lu et al. 2022: uniform in log sigma = -lambda between the training ends), "beta" (Lee et al. 2024,
    arXiv 2407.12173: sigma_min + Beta(0.6, 0.6).ppf(1 - u)(sigma_max - sigma_min)), "flow" (rectified flow:
    s = shift*u/(1 + (shift - 1)*u) for u = 1 - linspace(1, 1/T, N+1), t = s*T). `timesteps`: custom
    timesteps (sigma interpolated at each). Values as diffusers computes them (float32 sigmas, float64 ramps).
    """
    _choice("sigma_schedule", sigma_schedule, GRIDS)
    _choice("final_sigmas_type", final_sigmas_type, schedules.FINAL_SIGMAS)
    if timesteps is None and sigma_schedule in (None, "karras", "exponential"):
        return schedules.dpm_sigmas(abar, num_inference_steps, spacing, steps_offset, sigma_schedule,
                                    final_sigmas_type, lambda_min_clipped, beta_schedule)
    a = torch.from_numpy(np.asarray(abar, np.float64)).float()
    T = len(a)
    sig = (((1 - a) / a) ** 0.5).numpy()               # float32, ascending in t
    if timesteps is not None:
        ts = np.asarray(timesteps).astype(np.int64)
        if ts.ndim != 1 or not len(ts) or ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"timesteps: expected a non-empty list of ints in [0, {T}), got {ts.tolist()}")
        s = np.interp(ts, np.arange(T), sig)
    else:
        schedules._check_int("num_inference_steps", num_inference_steps, 1)
        n = num_inference_steps
        if sigma_schedule == "flow":
            u = 1.0 - np.linspace(1, 1 / T, n + 1)
            s = np.flip(flow_shift * u / (1 + (flow_shift - 1) * u))[:-1].copy()
            ts = (s * T).astype(np.int64)              # truncation, as torch's .to(int64)
        else:
            log_sig = np.log(sig)                      # float32, as diffusers' log_sigmas
            if sigma_schedule == "lu":                 # lambda here is log sigma (VE), max -> min
                lo, hi = float(log_sig[0]), float(log_sig[-1])
                s = np.exp(hi + np.linspace(0, 1, n) * (lo - hi))
            else:                                      # "beta"
                from scipy import stats

                lo, hi = float(sig[0]), float(sig[-1])
                s = lo + stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)
            t = schedules.sigma_to_t(s, log_sig)
            if sigma_schedule == "lu" and beta_schedule != "squaredcos_cap_v2":
                t = t.round()
            ts = t.astype(np.int64)
    last = 0.0 if final_sigmas_type == "zero" else float(sig[0])
    return np.append(s, last).astype(np.float32).astype(np.float64), ts


def alpha_sigma(sigmas, flow: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha, sigma, lambda) of grid sigmas s, float64: a VP model driven by the VE sigma s = sigma/alpha
    (alpha = 1/sqrt(1 + s^2), sigma = s*alpha), or rectified flow (alpha = 1 - s, sigma = s);
    lambda = log alpha - log sigma, +inf at s = 0."""
    s = np.asarray(sigmas, np.float64)
    if flow:
        alpha, sigma = 1.0 - s, s
    else:
        alpha = 1.0 / np.sqrt(1.0 + s * s)
        sigma = s * alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # flow coordinates of a VE sigma > 1: alpha < 0
        return alpha, sigma, np.log(alpha) - np.log(sigma)


def multistep_orders(n: int, solver_order: int, *, begin: int = 0, lower_order_final: bool = True,
                     euler_at_final: bool = False, final_sigmas_type: str = "zero") -> np.ndarray:
    """The order of each of the n steps of a run that starts at step `begin` (diffusers' rules):
    warm-up ``min(solver_order, k + 1)`` at the run's k-th step (no history before it); the last step first
    order with ``euler_at_final``, with ``lower_order_final`` and n < 15, or towards sigma 0; the one before
    it at most second order with ``lower_order_final`` and n < 15. Steps before `begin` are first order
    (never run, kept valid)."""
    order = np.clip(np.arange(n) - begin + 1, 1, solver_order)
    lower = lower_order_final and n < 15
    if n and (euler_at_final or lower or final_sigmas_type == "zero"):
        order[-1] = 1
    if lower and n >= 2:
        order[-2] = min(order[-2], 2)
    return order


# -------------------------------------------------------------------------------------------- conversion
def converted_output(prediction_type: str, algorithm_type: str, alpha, sigma, s, flow: bool = False) -> Lin:
    """diffusers' ``convert_model_output`` as a form of X and E0 (thresholding aside): the data prediction x0
    (DPM-Solver++) or the noise prediction eps (DPM-Solver), per row, from ``predictions.predict`` where
    diffusers' algebra is the general one. Two places where it is not (kept, to match it):
    flow_prediction is ``x0 = x - s*out`` with s the grid's sigma whatever the coordinates (predict's flow
    form with alpha = 1 - s, sigma = s), and v_prediction on a flow grid is the VP formula
    ``x0 = alpha*x - sigma*out``, ``eps = alpha*out + sigma*x`` (alpha^2 + sigma^2 != 1 there)."""
    data = algorithm_type in DATA_ALGORITHMS
    if prediction_type == "flow_prediction":
        pred = predict("flow_prediction", 1.0 - np.asarray(s, np.float64), s)
    elif prediction_type == "v_prediction" and flow:
        return alpha * X - sigma * E0 if data else alpha * E0 + sigma * X
    else:
        pred = predict(prediction_type, alpha, sigma)
    return pred.x0 if data else pred.eps


def _x0_forms(sigmas, algorithm_type, prediction_type, flow):
    s = np.asarray(sigmas, np.float64)[:-1]
    alpha, sigma, _ = alpha_sigma(s, flow)
    conv = converted_output(prediction_type, algorithm_type, alpha, sigma, s, flow)
    return alpha, sigma, conv


def _check(algorithm_type, solver_type, prediction_type):
    _choice("algorithm_type", algorithm_type, ALGORITHMS)
    _choice("solver_type", solver_type, SOLVER_TYPES)
    check_prediction_type(prediction_type)
    if prediction_type == "flow_prediction" and algorithm_type not in DATA_ALGORITHMS:
        raise ValueError(f"prediction_type: flow_prediction needs algorithm_type dpmsolver++ or sde-dpmsolver++, "
                         f"got {algorithm_type!r}")


def dpmsolver_x0(sigmas, *, algorithm_type: str = "dpmsolver++", prediction_type: str = "epsilon",
                 flow: bool = False, guidance=None) -> Plan:
    """Rows (one per step) whose one output is the unthresholded data prediction x0 of the model output:
    the first kernel of dynamic thresholding (noise-prediction algorithms: x0 = (x - sigma*eps)/alpha)."""
    _check(algorithm_type, "midpoint", prediction_type)
    alpha, sigma, conv = _x0_forms(sigmas, algorithm_type, prediction_type, flow)
    x0 = conv if algorithm_type in DATA_ALGORITHMS else (X - sigma * conv) / alpha
    return plan(f"{algorithm_type} x0 ({prediction_type})", x0=x0, outputs={"x": X0}, guidance=guidance,
                rows=alpha.shape)


# -------------------------------------------------------------------------------------------- the update
def _weights(algorithm_type, solver_type, a_t, sg_t, h, hs):
    """(c_x, c_D0, c_z, c1 of order 2, c1 and c2 of order 3) per row. h may be inf (sigma_t = 0): only c_x,
    c_D0, c_z use it there, and their values are the limits (e^-h = 0, sigma_t = 0); the higher-order
    weights use the finite `hs` (they are masked out on rows that do not use them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if algorithm_type == "dpmsolver++":
            phi = np.expm1(-hs)                                           # e^-h - 1
            mid, heun = -0.5 * a_t * phi, a_t * (phi / hs + 1.0)
            c2 = -a_t * ((phi + hs) / hs**2 - 0.5)
            return -a_t * np.expm1(-h), heun if solver_type == "heun" else mid, heun, c2, 0.0
        if algorithm_type == "dpmsolver":
            psi = np.expm1(hs)                                            # e^h - 1
            mid, heun = -0.5 * sg_t * psi, -sg_t * (psi / hs - 1.0)
            c2 = -sg_t * ((psi - hs) / hs**2 - 0.5)
            return -sg_t * np.expm1(h), heun if solver_type == "heun" else mid, heun, c2, 0.0
        if algorithm_type == "sde-dpmsolver++":
            em = -np.expm1(-2.0 * hs)                                     # 1 - e^-2h
            mid, heun = 0.5 * a_t * em, a_t * (em / (-2.0 * hs) + 1.0)
            # diffusers' D2 weight. The exponential-integrator value (k-diffusion's phi_3) has +0.5, not -0.5:
            # diffusers' is that minus alpha_t, which costs the third order; kept, to match its images.
            c2 = a_t * ((em - 2.0 * hs) / (2.0 * hs) ** 2 - 0.5)
            e2 = -np.expm1(-2.0 * h)
            return a_t * e2, heun if solver_type == "heun" else mid, heun, c2, sg_t * _noise_scale(e2, h)
        psi = np.expm1(hs)                                                # sde-dpmsolver
        mid, heun = -sg_t * psi, -2.0 * sg_t * (psi / hs - 1.0)
        return -2.0 * sg_t * np.expm1(h), heun if solver_type == "heun" else mid, 0.0, 0.0, \
            sg_t * _noise_scale(np.expm1(2.0 * h), h)


H_ROUNDING = 1e-6  # |h| below which a step that rises (h < 0) is a float32 rounding of a repeated sigma


def _noise_scale(var, h):
    """sqrt(var) of an SDE step's noise, var of h's sign. A grid whose last two float32 sigmas differ by an ulp
    (sigma_min reached two ways, e.g. Lu lambdas ending at sigma_min) can rise by that ulp: h ~ -1e-7, which
    diffusers' float32 arithmetic rounds to 0 (no noise). Such a step takes no noise here too; a step that
    truly rises keeps its NaN, which the plan refuses."""
    return np.sqrt(np.where(h > -H_ROUNDING, np.maximum(var, 0.0), var))


def dpmsolver_multistep(sigmas, orders, *, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                        prediction_type: str = "epsilon", flow: bool = False, x0_given: bool = False,
                        guidance=None) -> Plan:
    """The plan of a multistep run over the grid `sigmas` ([N+1], the last one may be 0), step i of order
    ``orders[i]`` (1-3, ``multistep_orders``). Outputs: x_next, and (when some step is of order >= 2) the
    new history entry, this step's converted output (role "history": the next step's m1 is slot M0, its m2
    slot M1). ``x0_given``: the converted output arrives as the model output, already thresholded as a data
    prediction x0 (the noise-prediction algorithms then take eps = (x - alpha*x0)/sigma from it). ``flow``:
    rectified-flow coordinates. ``guidance``: classifier-free guidance scale.

    Limits taken here: towards sigma_t = 0 a first-order step returns m0 (DPM-Solver++ only: diffusers
    refuses a final sigma of 0 for the noise-prediction algorithms, and so does this builder); a step of
    length h = 0 (a grid that ends at sigma_min with final sigma sigma_min) is the identity at every order
    (its first-order row; diffusers' heun weight (e^-h - 1)/h is 0/0 there, its result NaN).
    """
    _check(algorithm_type, solver_type, prediction_type)
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    order = np.asarray(orders, np.int64)
    if s.ndim != 1 or n < 1 or np.any(s[:-1] <= 0) or s[-1] < 0:
        raise ValueError(f"sigmas: expected N+1 >= 2 values, positive but the last (>= 0), got {s.tolist()}")
    if order.shape != (n,) or np.any((order < 1) | (order > 3)) or np.any(order > np.arange(n) + 1):
        raise ValueError(f"orders: expected {n} orders in 1..3, step i of order <= i + 1, got {order.tolist()}")
    if algorithm_type == "sde-dpmsolver" and np.any(order == 3):
        raise ValueError("solver_order: sde-dpmsolver has no third-order update (diffusers has none either; its "
                         "step fails there); use solver_order <= 2 or fewer steps")
    alpha, sigma, lam = alpha_sigma(s, flow)
    i = np.arange(n)
    a_t, sg_t = alpha[i + 1], sigma[i + 1]
    h = lam[i + 1] - lam[i]
    to_zero = sg_t == 0
    if np.any(to_zero) and algorithm_type not in DATA_ALGORITHMS:
        raise ValueError(f"sigmas: a step to sigma 0 needs dpmsolver++ or sde-dpmsolver++, got {algorithm_type!r} "
                         f"(diffusers refuses final_sigmas_type 'zero' for it)")
    if np.any(to_zero & (order > 1)):
        raise ValueError("orders: a step to sigma 0 (lambda = inf) must be first order")
    order = np.where(h == 0, 1, order)                                    # h = 0: the identity
    hs = np.where(np.isfinite(h) & (h != 0), h, 1.0)
    lam1, lam2 = lam[np.maximum(i - 1, 0)], lam[np.maximum(i - 2, 0)]
    r0 = np.where(order >= 2, (lam[i] - lam1) / hs, 1.0)
    r1 = np.where(order >= 3, (lam1 - lam2) / hs, 1.0)
    c_d0, c1, c1_3, c2_3, c_z = _weights(algorithm_type, solver_type, a_t, sg_t, h, hs)
    if algorithm_type in DATA_ALGORITHMS:
        with np.errstate(invalid="ignore"):
            c_x = np.where(to_zero, 0.0, sg_t / sigma[i])
        if algorithm_type == "sde-dpmsolver++":
            c_x = c_x * np.exp(-h)
    else:
        c_x = a_t / alpha[i]
    d1_0, d1_1 = (X0 - M0) / r0, (M0 - M1) / r1                           # m0 = X0, m1 = M0, m2 = M1
    d1_3 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    o2, o3 = (order == 2).astype(np.float64), (order == 3).astype(np.float64)
    x_next = c_x * X + c_d0 * X0 + (o2 * c1) * d1_0 + (o3 * c1_3) * d1_3 + (o3 * c2_3) * d2
    if algorithm_type.startswith("sde"):
        x_next = x_next + c_z * Z
    a_s, sg_s, conv = _x0_forms(s, algorithm_type, prediction_type, flow)
    if x0_given:
        conv = E0 if algorithm_type in DATA_ALGORITHMS else (X - a_s * E0) / sg_s
    outputs = {"x": x_next, **({"history": X0} if order.max() >= 2 else {})}
    return plan(f"{algorithm_type}({int(order.max())}M, {solver_type}, {prediction_type})", x0=conv,
                outputs=outputs, guidance=guidance, rows=(n,))
