"""UniPC (Zhao, Bai, Rao, Zhou, Lu, NeurIPS 2023, arXiv 2302.04867) as a plan builder: one fused pass per model
call runs the corrector UniC of the previous step and the predictor UniP of the next (docs/methods.md, sec. 7).

Grid points j = 0..N with (alpha_j, sigma_j), lambda_j = log(alpha_j/sigma_j); the model call at point i gives
m_i, its output converted to a data prediction x0 (``predict_x0``) or a noise prediction eps. One update from
s0 to t with history points s_1, s_2 (older), h = lambda_t - lambda_s0, r_k = (lambda_{s_k} - lambda_s0)/h:

    data:   hh = -h    x_t = (sigma_t/sigma_s0) x - alpha_t phi_1 m_s0 - alpha_t B(h) sum_k rho_k D_k
    noise:  hh = +h    x_t = (alpha_t/alpha_s0) x - sigma_t phi_1 m_s0 - sigma_t B(h) sum_k rho_k D_k

with phi_1 = e^hh - 1, phi_{k+1} = phi_k/hh - 1/k!, B(h) = hh (bh1) or e^hh - 1 (bh2), D_k = (m_{s_k} - m_s0)/r_k,
and rho solving R rho = b, R_ik = r_k^(i-1), b_i = i! phi_{i+1}/B(h) (the paper's B_1(h) = h, B_2(h) = e^h - 1).
UniP-p (predictor) sums over the p - 1 history points (rho = 1/2 at p = 2); UniC-p (corrector) adds
D_p = m_t - m_s0 with r_p = 1 and solves the full p x p system (rho = 1/2 at p = 1); both as diffusers' and
the authors' code special-case them.

Call i of a run started at point b (the fused row i), with X = x_i, X0 = m_i (computed in the kernel), M0, M1,
M2 = m_{i-1}, m_{i-2}, m_{i-3} and X_LAST = the sample the previous predictor started from:

    x_c     = UniC-q(X_LAST: point i-1 -> i; m_{i-1}, older m, and m_i = X0)   if i > b and i-1 is not disabled
            = X                                                             otherwise      (q = p_{i-1})
    x_{i+1} = UniP-p_i(x_c: point i -> i+1; m_i = X0, older m = M0, M1)

Both are linear in the step's terms, so x_{i+1} = a*x_c + ... is one linear form (**derived**: substitution).
Outputs: x_{i+1} ("x"), m_i ("history": the next call's M0), x_c ("x_last": the next call's X_LAST).
Orders (diffusers): p_i = min(order, N - i) with ``lower_order_final``, else order; then min(p_i, i - b + 1)
(warm-up). A final sigma of 0 (lambda = inf) takes the limit on the host (**derived**): data prediction
x_N = m_{N-1}, noise prediction x_N = (x - sigma_s0 eps)/alpha_s0 (diffusers computes 0*inf = NaN there with bh1
or noise prediction); an order >= 2 step to sigma 0 diverges (r_k -> 0) and is refused. A zero-length step
(h = 0: karras/exponential/beta/flow grids ending at sigma_min repeat their last sigma) is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from fastdiff.plan import Plan
from fastdiff.samplers.kit import E0, M0, M1, M2, X0, X_LAST, Lin, X, plan
from fastdiff.samplers.predictions import check_prediction_type, predict

SOLVER_TYPES = ("bh1", "bh2")
MAX_ORDER = 3  # UniC-3 reads three history slots (m_{i-1}, m_{i-2}, m_{i-3}): all the step has


def converted(prediction_type: str, predict_x0: bool, alpha, sigma, *, flow: bool = False) -> Lin:
    """m_i: the model output as a data prediction (``predict_x0``) or a noise prediction, per row.

    diffusers' UniPC uses the VP form of v (x0 = alpha x - sigma v, eps = alpha v + sigma x) on every grid; on a
    flow grid (alpha = 1 - s, alpha^2 + sigma^2 != 1) that is not ``predict``'s, so it is written here.
    flow_prediction has no noise form in diffusers' UniPC."""
    check_prediction_type(prediction_type)
    if not predict_x0 and prediction_type == "flow_prediction":
        raise ValueError("prediction_type: 'flow_prediction' needs predict_x0=True (UniPC's noise-prediction form "
                         "has no flow conversion)")
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if flow and prediction_type == "v_prediction":
        return alpha * X - sigma * E0 if predict_x0 else alpha * E0 + sigma * X
    pred = predict(prediction_type, alpha, sigma)
    return pred.x0 if predict_x0 else pred.eps


def orders(steps: int, order: int, lower_order_final: bool, begin: int = 0) -> np.ndarray:
    """p_i, the predictor order of each step i of a run started at `begin` (rows before it: as if started there)."""
    i = np.arange(steps)
    p = np.minimum(order, steps - i) if lower_order_final else np.full(steps, order)
    return np.minimum(p, np.maximum(i - begin, 0) + 1)


def _solve_rho(r: list[float], hh: float, B: float) -> np.ndarray:
    """rho of R rho = b: R_ik = r_k^(i-1), b_i = i! phi_{i+1}(hh)/B, i = 1..len(r) (float64)."""
    n, phi, fact, b = len(r), math.expm1(hh), 1.0, []
    for i in range(1, n + 1):
        phi = phi / hh - 1.0 / fact      # phi_{i+1} = phi_i/hh - 1/i!
        b.append(fact * phi / B)         # i! phi_{i+1}/B
        fact *= i + 1
    R = np.array([[rk**i for rk in r] for i in range(n)])
    return np.linalg.solve(R, np.array(b))


def uni_update(s0: tuple, t: tuple, hist: list[tuple], *, corrector: bool, predict_x0: bool, solver_type: str):
    """Weights of one UniP (corrector False) or UniC update from s0 to t: (a, c0, w) such that
    ``x_t = a*x + c0*m_s0 + sum_k w_k*(m_k - m_s0)``, the m_k being the history points `hist` (newest first) and,
    for the corrector, the new output at t last. Points are (alpha, sigma, lambda) floats. The order is
    len(hist) + 1."""
    (a_s, s_s, l_s), (a_t, s_t, l_t) = s0, t
    if s_t == 0.0:  # lambda_t = inf: the limit, first order only (e^-h = 0; sigma_t e^h = alpha_t sigma_s/alpha_s)
        if hist or corrector:
            raise ValueError(f"an order-{len(hist) + 1 + corrector} UniPC step to sigma = 0 diverges (r_k = 0 there)")
        return (0.0, a_t, []) if predict_x0 else (a_t / a_s, -a_t * s_s / a_s, [])
    h = l_t - l_s
    a = s_t / s_s if predict_x0 else a_t / a_s
    if h == 0:  # a zero-length step (a final sigma_min equal to the last sigma): the identity, as in diffusers
        return a, 0.0, [0.0] * (len(hist) + corrector)
    r = [(l_k - l_s) / h for (_, _, l_k) in hist] + ([1.0] if corrector else [])
    if 0.0 in r:
        raise ValueError("an earlier grid point has the log-SNR of this step's start (r_k = 0; the grid repeats "
                         "a sigma, where diffusers' multistep update gives inf/NaN): use distinct sigmas")
    hh, scale = (-h, a_t) if predict_x0 else (h, s_t)
    phi_1 = math.expm1(hh)
    c0 = -scale * phi_1
    if not r:
        return a, c0, []
    B = hh if solver_type == "bh1" else phi_1
    # the simplified low orders of the authors' code (and diffusers'): UniP-2 and UniC-1 take rho = 1/2
    rho = np.array([0.5]) if len(r) == 1 else _solve_rho(r, hh, B)
    return a, c0, [-scale * B * float(rk_rho) / rk for rk_rho, rk in zip(rho, r)]


def unipc_rows(alpha, sigma, *, order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
               lower_order_final: bool = True, disable_corrector: Iterable[int] = (), begin: int = 0) -> dict:
    """The per-row coefficient arrays [N] of ``unipc_plan`` (see the module docstring):

    x_c = cx*X + c_last*X_LAST + c_m[0]*M0 + c_m[1]*M1 + c_m[2]*M2 + c_new*X0
    x_next = a*x_c + p_new*X0 + p_m[0]*M0 + p_m[1]*M1
    """
    alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    if alpha.shape != sigma.shape or alpha.ndim != 1 or len(alpha) < 2:
        raise ValueError(f"alpha, sigma: expected two [N+1] grids (N >= 1), got {alpha.shape} and {sigma.shape}")
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"solver_order: fastdiff's UniPC fuses orders 1 to {MAX_ORDER}, got {order}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type: expected one of {SOLVER_TYPES}, got {solver_type!r}")
    N = len(alpha) - 1
    if not 0 <= begin < N:
        raise ValueError(f"begin: expected a step in [0, {N}), got {begin}")
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    pt = [(float(a), float(s), float(la)) for a, s, la in zip(alpha, sigma, lam)]
    p = orders(N, order, lower_order_final, begin)
    disabled = set(int(d) for d in disable_corrector)
    out = {k: np.zeros(N) for k in ("cx", "c_last", "c_new", "a", "p_new")}
    out["c_m"], out["p_m"] = np.zeros((3, N)), np.zeros((2, N))
    for i in range(begin, N):
        if i > begin and i - 1 not in disabled:  # UniC-q for point i, q = p_{i-1}: from x_last at i-1
            q = int(p[i - 1])
            a, c0, w = uni_update(pt[i - 1], pt[i], [pt[i - 1 - k] for k in range(1, q)], corrector=True,
                                  predict_x0=predict_x0, solver_type=solver_type)
            out["c_last"][i], out["c_new"][i] = a, w[-1]
            out["c_m"][0, i] = c0 - sum(w)
            for k, wk in enumerate(w[:-1], start=1):  # m_{i-1-k} is slot M_k
                out["c_m"][k, i] = wk
        else:
            out["cx"][i] = 1.0
        try:
            a, c0, w = uni_update(pt[i], pt[i + 1], [pt[i - k] for k in range(1, int(p[i]))], corrector=False,
                                  predict_x0=predict_x0, solver_type=solver_type)
        except ValueError as err:
            hint = ("; lower the last order (lower_order_final=True) or end at sigma_min "
                    "(final_sigmas_type='sigma_min')") if sigma[i + 1] == 0 else ""
            raise ValueError(f"step {i} (sigma {sigma[i]:.6g} -> {sigma[i + 1]:.6g}): {err}{hint}") from None
        out["a"][i], out["p_new"][i] = a, c0 - sum(w)
        for k, wk in enumerate(w, start=1):  # m_{i-k} is slot M_{k-1}
            out["p_m"][k - 1, i] = wk
    out["orders"] = p
    return out


def unipc_plan(alpha, sigma, m: Lin, *, guidance=None, row_label: str = "step", **rows) -> Plan:
    """The fused UniPC plan of one run: N rows for the grid ``alpha, sigma`` [N+1]; ``m`` the converted output
    m_i as a form of X, E0 (``converted``; E0 itself when a thresholded x0 comes in as the model output);
    `rows`: the keywords of ``unipc_rows``. Outputs x_{i+1}, m_i (history), x_c (x_last)."""
    c = unipc_rows(alpha, sigma, **rows)
    x_c = (c["cx"] * X + c["c_last"] * X_LAST + c["c_m"][0] * M0 + c["c_m"][1] * M1 + c["c_m"][2] * M2
           + c["c_new"] * X0)
    x_next = c["a"] * x_c + c["p_new"] * X0 + c["p_m"][0] * M0 + c["p_m"][1] * M1
    name = (f"unipc({'x0' if rows.get('predict_x0', True) else 'eps'}, order {rows.get('order', 2)}, "
            f"{rows.get('solver_type', 'bh2')}, begin {rows.get('begin', 0)})")
    return plan(name, x0=m, outputs={"x": x_next, "history": X0, "x_last": x_c}, guidance=guidance,
                rows=(len(c["a"]),), row_label=row_label)


def unipc_x0_plan(m: Lin, steps: int, *, guidance=None, row_label: str = "step") -> Plan:
    """Rows that output only m_i (the first kernel of dynamic thresholding; the quantile comes between)."""
    return plan("unipc x0", x0=m, outputs={"x": X0}, guidance=guidance, rows=(steps,), row_label=row_label)
