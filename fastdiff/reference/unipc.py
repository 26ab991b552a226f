"""UniPC, paper-shaped (Zhao, Bai, Rao, Zhou, Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", NeurIPS 2023, arXiv 2302.04867: the multistep predictor UniP-p and corrector UniC-p
with B_1(h) = h ("bh1") or B_2(h) = e^h - 1 ("bh2"), orders 1-3), one update after the other as the paper runs
them: the oracle of ``fastdiff.samplers.unipc``'s fused plans."""

import math

import torch


def log_snr(alpha, sigma):
    """lambda = log(alpha/sigma); +inf at sigma = 0 (the clean end)."""
    return math.inf if sigma == 0 else math.log(alpha / sigma)


def uni_bh(x, m0, older, s0, t, older_points, *, m_t=None, predict_x0=True, variant="bh2"):
    """One UniP-p update (``m_t`` None) or UniC-p update (``m_t``: the model's output at t) from point s0 to t.

    x: the sample at s0; m0: the model's (converted) output there; older: earlier outputs, newest first, at
    older_points; points are (alpha, sigma). p = len(older) + 1. With h = lambda_t - lambda_s0, r_k =
    (lambda_k - lambda_s0)/h, D_k = (m_k - m0)/r_k (and D_p = m_t - m0, r_p = 1 for UniC):
    data prediction  x_t = sigma_t/sigma_s0 x - alpha_t (e^-h - 1) m0 - alpha_t B(h) sum rho_k D_k  (hh = -h),
    noise prediction x_t = alpha_t/alpha_s0 x - sigma_t (e^h - 1) m0 - sigma_t B(h) sum rho_k D_k   (hh = +h),
    rho solving R rho = phi/B: R_ik = r_k^(i-1), phi_i = i! phi_{i+1}(hh), phi_{k+1} = phi_k/hh - 1/k!."""
    (alpha_s, sigma_s), (alpha_t, sigma_t) = s0, t
    h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
    hh = -h if predict_x0 else h
    r = [(log_snr(a, s) - log_snr(alpha_s, sigma_s)) / h for a, s in older_points]
    D = [(m - m0) / rk for m, rk in zip(older, r)]
    if m_t is not None:
        r, D = r + [1.0], D + [m_t - m0]
    if predict_x0:
        x_t = sigma_t / sigma_s * x - alpha_t * math.expm1(hh) * m0
        scale = alpha_t
    else:  # sigma_t (e^h - 1) -> alpha_t sigma_s/alpha_s at sigma_t = 0 (e^h = alpha_t sigma_s/(sigma_t alpha_s))
        x_t = alpha_t / alpha_s * x - (sigma_t * math.expm1(hh) if sigma_t else alpha_t * sigma_s / alpha_s) * m0
        scale = sigma_t
    if not D:
        return x_t
    B = hh if variant == "bh1" else math.expm1(hh)
    if len(D) == 1:  # UniP-2 and UniC-1: rho = 1/2 (the authors' simplification)
        rho = [0.5]
    else:
        phi, fact, b = math.expm1(hh), 1.0, []
        for i in range(1, len(D) + 1):
            phi = phi / hh - 1.0 / fact
            b.append(fact * phi / B)
            fact *= i + 1
        R = torch.tensor([[rk**i for rk in r] for i in range(len(D))], dtype=torch.float64)
        rho = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
    return x_t - scale * B * sum(rk * d for rk, d in zip(rho, D))


@torch.no_grad()
def sample_unipc(model, x, alphas, sigmas, *, order=2, variant="bh2", predict_x0=True, lower_order_final=True,
                 disable_corrector=(), begin=0, callback=None):
    """UniPC-p over the grid (alphas[j], sigmas[j]), j = begin..N: ``model(x, j)`` -> the converted output at
    point j (x0 or eps); the corrector of step j runs with the output at j, before the predictor of step j
    (unless j - 1 is in ``disable_corrector``). ``callback(j, x)`` sees the predictor's x_{j+1}."""
    N, points = len(alphas) - 1, list(zip(alphas, sigmas))
    ms, x_last, p_prev = [], None, 0
    for j in range(begin, N):
        m = model(x, j)
        if j > begin and j - 1 not in disable_corrector:     # UniC-p_{j-1}: correct x_j with m
            q = p_prev
            x = uni_bh(x_last, ms[0], ms[1:q], points[j - 1], points[j], [points[j - 1 - k] for k in range(1, q)],
                       m_t=m, predict_x0=predict_x0, variant=variant)
        ms.insert(0, m)
        p = min(order, N - j) if lower_order_final else order
        p = min(p, j - begin + 1)                             # warm-up: no more history than steps taken
        x_last = x
        x = uni_bh(x, m, ms[1:p], points[j], points[j + 1], [points[j - k] for k in range(1, p)],
                   predict_x0=predict_x0, variant=variant)
        p_prev = p
        if callback is not None:
            callback(j, x)
    return x
