"""IADB, iterative alpha-(de)blending (Heitz, Belcour, Chambon, SIGGRAPH 2023, arXiv 2305.03486; the authors'
code ``tchambon/IADB``) as plan builders (docs/methods.md, section 5).

x0 is noise, x1 data, ``x_a = a*x1 + (1 - a)*x0``; the model D(x_a, a) estimates x1 - x0 and sampling runs
the alpha grid up from 0 (noise):

    x_{a'} = x_a + (a' - a)*D(x_a, a)

Read as rectified flow (``fastdiff.samplers.flow``: x = (1 - s)*data + s*noise, velocity u = noise - data)
with s = 1 - a, the model's velocity is u = -D and the data prediction x + (1 - a)*D; the step above is
the flow Euler step, so the flow-form multistep solvers apply unchanged: DPM-Solver++ and UniPC with
flow sigmas s = 1 - a, the model output read as ``-D`` (``solver_plans``).

The grid starts at s = 1 (a = 0) where the flow log-SNR log((1 - s)/s) is -inf: a multistep solver's
first-order step from there is the Euler step (both are x + (s' - s)*u from s = 1), and an earlier point
at lambda = -inf contributes nothing to a higher-order step (its r_k is infinite: the step's limit is the
step of one order less). So, **derived**: the first step is Euler and the solver starts, with its own
warm-up, at the grid's second point. For DPM-Solver++ that is the limit of running it from s = 1. For UniPC it
also leaves out the corrector of the first step (UniC from s = 1, whose bh1 weight B(h) = h is infinite
there): a choice, not a limit.
"""

from __future__ import annotations

import numpy as np

from fastdiff import layout as L
from fastdiff.plan import Plan
from fastdiff.samplers.dpmsolver import dpmsolver_multistep, multistep_orders
from fastdiff.samplers.forward import q_sample_plan
from fastdiff.samplers.kit import E0, X, plan
from fastdiff.samplers.predictions import predict
from fastdiff.samplers.unipc import unipc_plan

SOLVERS = ("euler", "dpmsolver++", "unipc")


def alpha_grid(num_inference_steps: int) -> np.ndarray:
    """The uniform alpha grid [N+1] from 0 to 1 (float64): the code's ``i/T``."""
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {n!r}")
    return np.arange(n + 1, dtype=np.float64) / n


def _check_grid(alphas) -> np.ndarray:
    a = np.asarray(alphas, np.float64)
    if a.ndim != 1 or len(a) < 2 or not np.all(np.diff(a) > 0) or a[0] < 0 or a[-1] > 1:
        raise ValueError(f"alphas: expected an increasing grid of N+1 >= 2 values in [0, 1], got {a.tolist()}"[:300])
    return a


def iadb_plan(alphas, guidance=None) -> Plan:
    """The deterministic sampler over the grid ``alphas`` [N+1]: row i is x + (alphas[i+1] - alphas[i])*D."""
    a = _check_grid(alphas)
    return plan("iadb", outputs={"x": X + (a[1:] - a[:-1]) * E0}, guidance=guidance, rows=(len(a) - 1,))


def add_noise_plan(alpha, row_label: str = "timestep", with_noise: bool = False) -> Plan:
    """The blend x_a = alpha*x1 + (1 - alpha)*x0 (x: data x1, z: noise x0), one row per alpha (`with_noise`: the
    noise x0 is a second output)."""
    a = np.asarray(alpha, np.float64)
    return q_sample_plan(a, 1.0 - a, row_label=row_label, with_noise=with_noise)


def negate_output(p: Plan) -> Plan:
    """The same plan for the model output -e0: every weight of e0 (in x0 and in each output) negated."""
    t = p.table.copy()
    for col in [L.AE0] + [L.out(k, L.CE0) for k in range(len(p.outputs))]:
        t[..., col] = -t[..., col]
    return Plan(t, outputs=p.outputs, clamp=p.clamp, guided=p.guided, name=p.name + " (out = -D)",
                row_label=p.row_label)


def solver_plans(alphas, solver: str = "dpmsolver++", solver_order: int = 2, guidance=None) -> tuple[Plan, Plan | None]:
    """(first, rest): the Euler step alphas[0] -> alphas[1] (a plan of one row), then the solver over
    s = 1 - alphas[1:] (None for a grid of one step), run row i for step i + 1. The solver's plan reads the
    model output D as a flow velocity -D: DPM-Solver++ (``dpmsolver_multistep``, flow prediction, diffusers'
    orders with ``lower_order_final``) or UniPC (``unipc_plan``, bh2, data prediction x + s*D)."""
    if solver not in SOLVERS[1:]:
        raise ValueError(f"solver: expected one of {SOLVERS[1:]}, got {solver!r}")
    if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order: expected 1, 2 or 3, got {solver_order!r}")
    a = _check_grid(alphas)
    first = iadb_plan(a[:2], guidance)
    if len(a) == 2:
        return first, None
    s = 1.0 - a[1:]
    n = len(s) - 1
    if solver == "dpmsolver++":
        orders = multistep_orders(n, solver_order, final_sigmas_type="zero" if s[-1] == 0 else "sigma_min")
        rest = negate_output(dpmsolver_multistep(s, orders, algorithm_type="dpmsolver++",
                                                 prediction_type="flow_prediction", flow=True, guidance=guidance))
    else:
        m = predict("flow_prediction", 1.0 - s[:-1], s[:-1], out=-E0).x0  # x + s*D
        rest = unipc_plan(1.0 - s, s, m, order=solver_order, solver_type="bh2", predict_x0=True,
                          lower_order_final=True, guidance=guidance)
    return first, rest
