"""DPM-Solver (Lu et al., NeurIPS 2022, arXiv 2206.00927) and DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095),
multistep, paper-shaped: the oracle of ``fastdiff.samplers.dpmsolver``'s plans.

Both solve the diffusion ODE/SDE in lambda = log(alpha/sigma) with an exponential integrator: the model
term is expanded in lambda around s0 (``D0 = m0``, ``D1 ~ h dm/dlambda``, ``D2 ~ h^2/2 d2m/dlambda^2`` from
the history by divided differences) and each power integrated exactly against the linear part's kernel:

    DPM-Solver++ (data prediction m = x0), kernel alpha_t e^-(lambda_t - l), rate k = 1 (ODE) or 2 (SDE):
        x_t = (sigma_t/sigma_s0) e^-(k-1)h x + alpha_t [phi_0 D0 + phi_1 D1 + phi_2 D2] (+ sigma_t sqrt(1 - e^-2h) z)
        phi_0 = 1 - e^-kh,  phi_1 = 1 - phi_0/(kh),  phi_2 = 1/2 - 1/(kh) + phi_0/(kh)^2
    DPM-Solver (noise prediction m = eps), kernel sigma_t e^(lambda_t - l), weight k = 1 (ODE) or 2 (SDE):
        x_t = (alpha_t/alpha_s0) x - k sigma_t [psi_0 D0 + psi_1 D1 + psi_2 D2] (+ sigma_t sqrt(e^2h - 1) z)
        psi_0 = e^h - 1,  psi_1 = psi_0/h - 1,  psi_2 = (psi_0 - h)/h^2 - 1/2

"midpoint" (Lu et al.'s second-order multistep) replaces the exact phi_1 by phi_0/2 (psi_1 by psi_0/2).
The third-order D1, D2 and their weights are the authors' (github.com/LuChengTHU/dpm-solver, diffusers):
there ``D2 = (D1_0 - D1_1)/(r0 + r1)`` is ~ h^2/2 d2m/dlambda^2 while phi_2 (psi_2) is the Taylor weight of
h^2 d2m/dlambda^2, so the D2 term is half the exponential integrator's and 3M is globally second order
(measured in tests/test_dpmsolver.py). sde-dpmsolver has no third order (nor in diffusers).
"""

import math

import torch


def divided_differences(m, lambdas, order):
    """(D0, D1, D2) of the history m = [m0, m1, m2] (newest first) at lambdas (t, s0, s1, s2)."""
    h = lambdas[0] - lambdas[1]
    if order == 1:
        return m[0], 0.0, 0.0
    r0 = (lambdas[1] - lambdas[2]) / h
    d1_0 = (m[0] - m[1]) / r0
    if order == 2:
        return m[0], d1_0, 0.0
    r1 = (lambdas[2] - lambdas[3]) / h
    d1_1 = (m[1] - m[2]) / r1
    return m[0], d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def dpm_solver_step(x, m, lambdas, alphas, sigmas, order, algorithm_type="dpmsolver++", solver_type="midpoint",
                    noise=None):
    """One multistep update s0 -> t. m: converted model outputs (newest first); lambdas, alphas, sigmas:
    floats at (t, s0, s1, s2); noise: z for the SDE variants. sigma_t = 0 (lambda_t = inf, DPM-Solver++
    only) gives alpha_t*m0, the limit of the formulas (e^-inf = 0)."""
    h = lambdas[0] - lambdas[1]
    a_t, s_t = alphas[0], sigmas[0]
    D0, D1, D2 = divided_differences(m, lambdas, order)
    sde = algorithm_type.startswith("sde")
    k = 2.0 if sde else 1.0
    if algorithm_type.endswith("++"):
        phi0 = -math.expm1(-k * h)
        phi1 = phi0 / 2 if solver_type == "midpoint" and order == 2 else 1 - phi0 / (k * h)
        phi2 = 0.5 - 1 / (k * h) + phi0 / (k * h) ** 2 if order == 3 else 0.0
        x_t = (s_t / sigmas[1] * math.exp(-(k - 1) * h) if s_t else 0.0) * x + a_t * (phi0 * D0 + phi1 * D1 + phi2 * D2)
        return x_t + s_t * math.sqrt(-math.expm1(-2 * h)) * noise if sde else x_t
    psi0 = math.expm1(h)
    psi1 = psi0 / 2 if solver_type == "midpoint" and order == 2 else psi0 / h - 1
    psi2 = (psi0 - h) / h**2 - 0.5 if order == 3 else 0.0
    x_t = a_t / alphas[1] * x - k * s_t * (psi0 * D0 + psi1 * D1 + psi2 * D2)
    return x_t + s_t * math.sqrt(math.expm1(2 * h)) * noise if sde else x_t


def vp_alpha_sigma(sigma_ve, flow=False):
    """(alpha, sigma, lambda) of a grid sigma: VP from the VE sigma s (alpha = (1 + s^2)^-1/2) or flow."""
    s = float(sigma_ve)
    a, sg = (1 - s, s) if flow else (1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s))
    return a, sg, (math.log(a / sg) if sg > 0 else math.inf)


@torch.no_grad()
def sample_dpm_solver(model, x, sigmas, orders, algorithm_type="dpmsolver++", solver_type="midpoint", flow=False,
                      noise_sampler=None, step=None):
    """Multistep DPM-Solver(++) over the grid `sigmas` [N+1]: ``model(x, i)`` -> the converted output at grid
    point i (x0 for "++", eps otherwise); step i of order ``orders[i]``; ``noise_sampler(i)`` -> z; ``step``:
    the update (default ``dpm_solver_step``)."""
    step = step or dpm_solver_step
    grid = [vp_alpha_sigma(s, flow) for s in sigmas]
    history = []
    for i, p in enumerate(orders):
        history.insert(0, model(x, i))
        pts = [grid[i + 1]] + [grid[max(i - j, 0)] for j in range(3)]
        lam, a, sg = ([q[c] for q in pts] for c in (2, 0, 1))
        noise = noise_sampler(i) if algorithm_type.startswith("sde") else None
        x = step(x, history, lam, a, sg, p, algorithm_type, solver_type, noise)
    return x
