"""The per-solver halves of ``bench_multistep.py``: for each solver, its trajectory over diffusers' grid as
the fused plans' calls and as the paper-shaped reference's steps (eager, and in the form torch.compile gets:
the per-step scalars as 0-d tensors, so one graph serves every step). ``METHODS[solver](scheduler, n)``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Method:
    """One trajectory of a solver over diffusers' grid, per model call: ``fused`` (plan, row, whether the call
    reads the previous call's x0 and start sample: Heun's second), ``eager`` and ``compiled`` (the reference's
    step, its arguments, whether it draws noise); k-diffusion's grid and the factor to its coordinates."""

    fused: list[tuple]
    eager: list[tuple]
    compiled: list[tuple] | None = None  # default: ``eager``'s with the floats as 0-d tensors
    k_sigmas: torch.Tensor | None = None
    k_scale: float = 1.0


def trim(plan):
    """The plan without its x0 output (diffusers' pred_original_sample), which a trajectory does not need."""
    from fastdiff.plan import Plan

    keep = plan.outputs.index("x0") if "x0" in plan.outputs else len(plan.outputs)
    return Plan(plan.table, outputs=plan.outputs[:keep], clamp=plan.clamp, guided=plan.guided, name=plan.name,
                row_label=plan.row_label)


def unit_weights(f, k: int) -> tuple[float, ...]:
    """The weight of each input of `f`, a function linear in its k inputs: f at the unit vectors (floats)."""
    return tuple(float(f(*(float(j == i) for j in range(k)))) for i in range(k))


def affine(w, inputs):
    """sum_k w_k * inputs_k: one elementwise loop under inductor."""
    return sum(wk * t for wk, t in zip(w, inputs))


def ddim_method(d, n: int) -> Method:
    from fastdiff.reference.ddim import ddim_step
    from fastdiff.samplers.ddim import ddim_plan

    abar, ts = d.alphas_cumprod.double().numpy(), d.timesteps.cpu().numpy()
    prev, final = ts - d.config.num_train_timesteps // n, float(d.final_alpha_cumprod)
    a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], final)
    plan = ddim_plan(abar, ts, prev, final_alpha_cumprod=final, clip_sample=d.config.clip_sample, with_x0=False)
    clip = d.config.clip_sample_range if d.config.clip_sample else None

    def step(x, e, state, z, a_t, a_p):
        return ddim_step(x, e, a_t, a_p, clip=clip)[0], ()

    return Method([(plan, i, False) for i in range(n)], [(step, (abar[t], a_prev[i]), False) for i, t in enumerate(ts)])


def ddpm_method(d, n: int) -> Method:
    from fastdiff.reference.ddpm import ddpm_step
    from fastdiff.samplers.ddpm import ddpm_plan

    abar, ts = d.alphas_cumprod.double().numpy(), d.timesteps.cpu().numpy()
    prev = np.append(ts[1:], -1)  # diffusers' previous_timestep over a run
    a_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], 1.0)
    cfg = d.config
    plan = trim(ddpm_plan(abar, ts, prev, clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range,
                          variance_type=cfg.variance_type))
    clip = cfg.clip_sample_range if cfg.clip_sample else None

    def step(x, e, state, z, a_t, a_p):
        return ddpm_step(x, e, a_t, a_p, z, cfg.variance_type, clip=clip)[0], ()

    return Method([(plan, i, False) for i in range(n)],
                  [(step, (abar[t], a_prev[i]), bool(t > 0)) for i, t in enumerate(ts)])


def lcm_method(d, n: int) -> Method:
    from fastdiff.reference.lcm import lcm_step
    from fastdiff.samplers.lcm import lcm_plan

    cfg, abar, ts = d.config, d.alphas_cumprod.double().numpy(), d.timesteps.cpu().numpy()
    final = float(d.final_alpha_cumprod)
    plan = trim(lcm_plan(abar, ts, num_inference_steps=n, final_alpha_cumprod=final, clip_sample=cfg.clip_sample,
                         clip_sample_range=cfg.clip_sample_range, timestep_scaling=cfg.timestep_scaling))
    clip = cfg.clip_sample_range if cfg.clip_sample else None

    def step(x, e, state, z, t, a_t, a_next):
        return lcm_step(x, e, t, a_t, a_next, z, cfg.timestep_scaling, clip)[0], ()

    calls = []
    for i, t in enumerate(ts):
        last = i == n - 1
        calls.append((step, (float(t), abar[t], 1.0 if last else abar[ts[i + 1]]), not last))
    return Method([(plan, i, False) for i in range(n)], calls)


def flow_method(d, n: int) -> Method:
    from fastdiff.reference.flow import euler_step
    from fastdiff.samplers.flow import flow_euler_plan

    s = d.sigmas.double().numpy()

    def step(x, e, state, z, s, s_next):
        return euler_step(x, e, s, s_next), ()

    plan = flow_euler_plan(s)
    return Method([(plan, i, False) for i in range(n)], [(step, (s[i], s[i + 1]), False) for i in range(n)])


def euler_method(d, n: int) -> Method:
    from fastdiff.reference.euler import to_d
    from fastdiff.samplers.euler import euler_plan

    s = d.sigmas.double().numpy()

    def step(x, e, state, z, s, s_next):  # epsilon prediction in VE coordinates: D(x; s) = x - s*e
        return x + to_d(x, s, x - s * e) * (s_next - s), ()

    return Method([(trim(euler_plan(s)), i, False) for i in range(n)],
                  [(step, (s[i], s[i + 1]), False) for i in range(n)], k_sigmas=d.sigmas)


def euler_ancestral_method(d, n: int) -> Method:
    from fastdiff.reference.euler import get_ancestral_step, to_d
    from fastdiff.samplers.euler import euler_ancestral_plan

    s = d.sigmas.double().numpy()

    def step(x, e, state, z, s, s_down, s_up):
        x = x + to_d(x, s, x - s * e) * (s_down - s)
        return (x if z is None else x + z * s_up), ()

    plan = trim(euler_ancestral_plan(s))
    return Method([(plan, i, False) for i in range(n)],
                  [(step, (s[i], *get_ancestral_step(s[i], s[i + 1])), bool(s[i + 1] > 0)) for i in range(n)],
                  k_sigmas=d.sigmas)


def heun_method(d, n: int) -> Method:
    """Two model calls a step (one into sigma 0), on the step grid: diffusers' sigmas without their repeats."""
    from fastdiff.reference.euler import to_d
    from fastdiff.samplers.euler import heun_plans

    sig = torch.cat([d.sigmas[:1], d.sigmas[1:-1:2], d.sigmas[-1:]])
    s = sig.double().numpy()
    first, second = heun_plans(s)
    second = trim(second)

    def euler_call(x, e, state, z, s, s_next):
        d = to_d(x, s, x - s * e)
        return x + d * (s_next - s), (x, d)

    def correction(x, e, state, z, s, s_next):
        x_s, d = state
        return x_s + (d + to_d(x, s_next, x - s_next * e)) / 2 * (s_next - s), ()

    fused, eager = [], []
    for i in range(n):
        fused.append((first, i, False))
        eager.append((euler_call, (s[i], s[i + 1]), False))
        if s[i + 1] > 0:
            fused.append((second, i, True))
            eager.append((correction, (s[i], s[i + 1]), False))
    return Method(fused, eager, k_sigmas=sig)


def dpm_method(d, n: int) -> Method:
    """DPM-Solver(++) multistep. Eager: the reference's ``dpm_solver_step``. Its weights are Python floats
    (math.expm1 of h, ...), which torch.compile would specialize on (a recompile per step), so the compiled
    step takes them as 0-d tensors: the reference evaluated on the host on unit inputs (it is linear in x, the
    history and the noise), combined in one elementwise graph."""
    from fastdiff.reference.ddim import to_x0_eps
    from fastdiff.reference.dpmsolver import dpm_solver_step, vp_alpha_sigma
    from fastdiff.samplers.dpmsolver import dpmsolver_multistep, multistep_orders

    cfg = d.config
    s = d.sigmas.double().numpy()
    orders = multistep_orders(n, cfg.solver_order, lower_order_final=cfg.lower_order_final,
                              euler_at_final=cfg.euler_at_final, final_sigmas_type=cfg.final_sigmas_type)
    plan = dpmsolver_multistep(s, orders, algorithm_type=cfg.algorithm_type, solver_type=cfg.solver_type)
    algo, solver_type, keep, sde = cfg.algorithm_type, cfg.solver_type, cfg.solver_order - 1, \
        cfg.algorithm_type.startswith("sde")
    grid = [vp_alpha_sigma(v) for v in s]

    def eager_step(x, e, hist, z, abar, order, lam, al, sg):
        m = [to_x0_eps(e, x, abar)[0], *hist]
        return dpm_solver_step(x, m, lam, al, sg, order, algo, solver_type, z), tuple(m[:keep])

    def compiled_step(x, e, hist, z, abar, w):
        m0 = to_x0_eps(e, x, abar)[0]
        return affine(w, (x, m0, *hist, *(() if z is None else (z,)))), (m0, *hist)[:keep]

    def weights(h, order, lam, al, sg):  # of x, m0, the h history entries (and z)
        def f(*v):
            return dpm_solver_step(v[0], [*v[1:2 + h], 0.0, 0.0], lam, al, sg, order, algo, solver_type,
                                   v[-1] if sde else None)
        return unit_weights(f, 2 + h + sde)

    eager, compiled = [], []
    for i, order in enumerate(orders):
        pts = [grid[i + 1]] + [grid[max(i - j, 0)] for j in range(3)]
        lam, al, sg = ([q[c] for q in pts] for c in (2, 0, 1))
        eager.append((eager_step, (al[1] ** 2, int(order), lam, al, sg), sde))
        compiled.append((compiled_step, (al[1] ** 2, weights(min(i, keep), int(order), lam, al, sg)), sde))
    return Method([(plan, i, False) for i in range(n)], eager, compiled, k_sigmas=d.sigmas,
                  k_scale=1.0 / grid[0][0])


def unipc_method(d, n: int) -> Method:
    """UniPC: the corrector of the previous step, then the predictor, per model call. Eager: the reference's
    ``uni_bh`` twice; compiled: their weights (``unit_weights``, as for DPM-Solver) as 0-d tensors."""
    from fastdiff.reference.ddim import to_x0_eps
    from fastdiff.reference.unipc import uni_bh
    from fastdiff.samplers.unipc import converted, unipc_plan

    cfg = d.config
    s = d.sigmas.double().numpy()
    alpha = 1.0 / np.sqrt(1.0 + s * s)
    sigma = s * alpha
    kw = dict(predict_x0=cfg.predict_x0, variant=cfg.solver_type)
    plan = unipc_plan(alpha, sigma, converted(cfg.prediction_type, cfg.predict_x0, alpha[:n], sigma[:n]),
                      order=cfg.solver_order, solver_type=cfg.solver_type, predict_x0=cfg.predict_x0,
                      lower_order_final=cfg.lower_order_final)
    pts, keep = [(float(a), float(b)) for a, b in zip(alpha, sigma)], cfg.solver_order

    def eager_step(x, e, state, z, abar, corr, pred):
        m = to_x0_eps(e, x, abar)[0]
        x_last, ms = state if state else (None, ())
        if corr is not None:
            q, s0, t, older = corr
            x = uni_bh(x_last, ms[0], list(ms[1:q]), s0, t, older, m_t=m, **kw)
        ms = (m, *ms)[:keep]
        p, s0, t, older = pred
        return uni_bh(x, m, list(ms[1:p]), s0, t, older, **kw), (x, ms)

    def compiled_step(x, e, state, z, abar, cw, pw):
        m = to_x0_eps(e, x, abar)[0]
        x_last, ms = state if state else (None, ())
        if cw:  # the corrector reads x_last, the outputs m_{j-1}, ... and the new m
            x = affine(cw, (x_last, *ms[:len(cw) - 2], m))
        ms = (m, *ms)[:keep]
        return affine(pw, (x, *ms[:len(pw) - 1])), (x, ms)

    def weights(k, s0, t, older, corrector: bool):  # of (x_last or x, m0, older outputs[, the new output])
        def f(*v):
            return uni_bh(v[0], v[1], list(v[2:k - corrector]), s0, t, older, m_t=v[-1] if corrector else None, **kw)
        return unit_weights(f, k)

    eager, compiled, q = [], [], 0
    for j in range(n):
        corr, cw = None, ()
        if j > 0:
            corr = (q, pts[j - 1], pts[j], [pts[j - 1 - k] for k in range(1, q)])
            cw = weights(q + 2, *corr[1:], True)
        p = min(min(cfg.solver_order, n - j) if cfg.lower_order_final else cfg.solver_order, j + 1)
        pred = (p, pts[j], pts[j + 1], [pts[j - k] for k in range(1, p)])
        eager.append((eager_step, (alpha[j] ** 2, corr, pred), False))
        compiled.append((compiled_step, (alpha[j] ** 2, cw, weights(p + 1, *pred[1:], False)), False))
        q = p
    return Method([(plan, i, False) for i in range(n)], eager, compiled)


METHODS = {"dpmpp_2m": dpm_method, "dpmpp_3m": dpm_method, "sde_dpmpp_2m": dpm_method, "unipc": unipc_method,
           "euler": euler_method, "euler_ancestral": euler_ancestral_method, "heun": heun_method, "ddpm": ddpm_method,
           "lcm": lcm_method, "flow_euler": flow_method, "ddim": ddim_method}


def tensorize(args, device: torch.device):
    """A call's arguments for torch.compile: floats become 0-d float64 tensors (one graph for every value)."""
    if isinstance(args, float | np.floating):
        return torch.tensor(float(args), dtype=torch.float64, device=device)
    if isinstance(args, tuple):
        return tuple(tensorize(a, device) for a in args)
    return args


def reference_loop(calls, x_T: torch.Tensor, eps: torch.Tensor, zs, steps=None):
    """fn() -> the final sample: each call ``step(x, eps, state, z, *args)`` -> (x, state); ``steps`` maps a
    step function to the one to run (the compiled one)."""
    def fn():
        x, state = x_T, ()
        for i, (step, args, draws) in enumerate(calls):
            step = step if steps is None else steps[step]
            x, state = step(x, eps, state, zs[i] if draws and zs is not None else None, *args)
        return x
    return fn
