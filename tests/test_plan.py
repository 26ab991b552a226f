"""Plans: validation with named errors, device copies refilled in place, per-sample rows; and a closed-form
property of the DDIM plan builder (it keeps the forward marginals: METHODS.md section 1)."""

import numpy as np
import pytest
import torch
from conftest import assert_close

from fastdiff import layout as L
from fastdiff import ops
from fastdiff.plan import Plan, Terms, check_table, new_table, x0_table
from fastdiff.random import sample_seeds
from fastdiff.samplers.ddim import ddim_coefficients, ddim_plan


def test_check_table_names_the_bad_coefficient():
    t = new_table(4)
    t[2, L.out(1, L.CM0)] = np.inf
    with pytest.raises(ValueError, match=r"non-finite coefficient out1.CM0 = inf at step 2"):
        check_table(t, "demo")
    with pytest.raises(ValueError, match="must have shape"):
        check_table(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="is empty"):
        check_table(new_table(0))
    per_sample = new_table(2, 3)
    per_sample[1, 2, L.AX] = np.nan
    with pytest.raises(ValueError, match="AX = nan at step 1, sample 2"):
        Plan(per_sample, Terms())


def test_refill_updates_device_copies_in_place():
    t = new_table(3)
    t[:, L.out(0, L.CX)] = 2.0
    plan = Plan(t, Terms(n_e=0))
    coef = plan.coef("cpu")
    t2 = t.copy()
    t2[:, L.out(0, L.CX)] = 3.0
    plan.refill(t2)
    assert plan.coef("cpu") is coef and float(coef[1, L.out(0, L.CX)]) == 3.0
    with pytest.raises(ValueError, match="refill needs shape"):
        plan.refill(new_table(4))


def test_per_sample_plan_selects_each_samples_row():
    t = new_table(2, 3)
    for s in range(2):
        for b in range(3):
            t[s, b, L.out(0, L.CX)] = 10 * s + b
    plan = Plan(t, Terms(n_e=0))
    x = torch.ones(3, 5)
    (out,) = ops.step(x=x, **plan.step_args(1, "cpu"))
    assert torch.equal(out, torch.tensor([10.0, 11.0, 12.0])[:, None].expand(3, 5))
    with pytest.raises(ValueError, match=r"step must be in \[0, 2\)"):
        plan.step_args(2)


def test_x0_table_outputs_the_data_prediction():
    c = ddim_coefficients(np.array([0.3]), np.array([0.5]), prediction_type="v_prediction")
    t = x0_table(c)
    x, e = torch.randn(2, 6), torch.randn(2, 6)
    (x0,) = ops.step(torch.from_numpy(t).float(), x, [e])
    a, s = np.sqrt(0.3), np.sqrt(0.7)
    assert_close(x0, a * x - s * e, atol=1e-6, rtol=1e-6, what="v-prediction x0")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_keeps_the_forward_marginal(eta):
    """With the true eps, x_prev - sqrt(abar_prev)*x0 ~ N(0, 1 - abar_prev) for every eta (Song et al.,
    eq. 7): checked on 2e5 draws of the in-kernel noise, to 5 standard errors."""
    abar = np.array([0.2, 0.6])
    plan = ddim_plan(abar, np.array([0]), np.array([1]), eta=eta, with_x0=False)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, n // 4, generator=g), torch.randn(4, n // 4, generator=g)
    x_t = np.sqrt(0.2) * x0 + np.sqrt(0.8) * eps
    (x_prev,) = ops.step(x=x_t, e=[eps], seeds=sample_seeds(1, 4), **plan.step_args(0))
    r = (x_prev - np.sqrt(0.6) * x0).double().flatten()
    assert abs(r.mean().item()) < 5 * np.sqrt(0.4 / n)
    assert abs(r.var().item() - 0.4) < 5 * 0.4 * np.sqrt(2 / n)


def test_loop_refuses_plans_it_cannot_feed():
    from fastdiff.loop import sample

    plan = Plan(new_table(2), Terms(n_m=1), name="multistep")
    with pytest.raises(ValueError, match="multistep needs"):
        sample(lambda x, t: x, torch.zeros(1, 4), plan, torch.arange(2))
