"""Plans and the plan-builder kit: table validation with named errors, the terms a table reads, device
copies refilled in place, per-sample rows; linear forms placed in the right columns (checked through the
kernel against hand-written formulas); prediction types against their definitions (closed form); the
forward process; and the DDIM builder against the paper-shaped reference (fastdiff/reference/ddim.py) and
its defining property (the forward marginal is kept)."""

import numpy as np
import pytest
import torch
from conftest import assert_close

from fastdiff import layout as L
from fastdiff import ops
from fastdiff.philox import sample_seeds
from fastdiff.plan import Plan, check_table, new_table
from fastdiff.reference.ddim import ddim_step, sample_ddim
from fastdiff.samplers import kit
from fastdiff.samplers.ddim import ddim_plan, ddim_x0
from fastdiff.samplers.forward import q_sample_plan, velocity_plan
from fastdiff.samplers.kit import E0, E1, M0, M1, X0, X_LAST, Lin, X, Z
from fastdiff.samplers.predictions import PREDICTION_TYPES, eps_from_x0, predict
from fastdiff.stepper import Stepper


def test_check_table_names_the_bad_coefficient():
    t = new_table(4)
    t[2, L.out(1, L.CM0)] = np.inf
    with pytest.raises(ValueError, match=r"non-finite coefficient out1.CM0 = inf at step 2"):
        check_table(t, "demo")
    t = new_table(4)
    t[3, L.AS] = np.nan
    with pytest.raises(ValueError, match=r"AS = nan at timestep 3"):
        check_table(t, "demo", "timestep")
    t[3, L.AS] = np.inf  # 1/alpha at alpha = 0 (zero terminal SNR) is allowed, in AS only
    check_table(t)
    with pytest.raises(ValueError, match="must have shape"):
        check_table(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="is empty"):
        check_table(new_table(0))
    per_sample = new_table(2, 3)
    per_sample[1, 2, L.AX] = np.nan
    with pytest.raises(ValueError, match="AX = nan at step 1, sample 2"):
        Plan(per_sample)
    with pytest.raises(ValueError, match="outputs must be"):
        Plan(new_table(1), outputs=("x0", "x"))


def test_refill_updates_device_copies_in_place():
    t = new_table(3)
    t[:, L.out(0, L.CX)] = 2.0
    plan = Plan(t)
    coef = plan.coef("cpu")
    t2 = t.copy()
    t2[:, L.out(0, L.CX)] = 3.0
    t2[:, L.out(0, L.CZ)] = 1.0
    plan.refill(t2)
    assert plan.coef("cpu") is coef and float(coef[1, L.out(0, L.CX)]) == 3.0
    assert plan.terms.noise  # the terms follow the table
    with pytest.raises(ValueError, match="refill needs shape"):
        plan.refill(new_table(4))


def test_per_sample_plan_selects_each_samples_row():
    t = new_table(2, 3)
    for s in range(2):
        for b in range(3):
            t[s, b, L.out(0, L.CX)] = 10 * s + b
    plan = Plan(t)
    x = torch.ones(3, 5)
    (out,) = ops.step(x=x, **plan.step_args(1, "cpu"))
    assert torch.equal(out, torch.tensor([10.0, 11.0, 12.0])[:, None].expand(3, 5))
    stepper = Stepper(plan)
    stepper.reset(1)
    assert torch.equal(stepper.step(x)[0], out)
    with pytest.raises(ValueError, match=r"step must be in \[0, 2\)"):
        plan.step_args(2)


# ------------------------------------------------------------------------------------------------- kit
def evaluate(form: Lin, **values) -> np.ndarray:
    """A linear form evaluated at given term values (numpy), the scale applied last."""
    return form.scale * sum(c * values[t] for t, c in form.c.items())


def test_linear_forms_keep_the_scale_apart():
    a, s = 0.3, 0.8
    x0 = (X - s * E0) / a
    assert x0.c == {"x": 1.0, "e0": -s} and np.isclose(x0.scale, 1 / a)
    both = 2 * x0 + E1 - 0.5 * M0
    assert np.allclose([both["x"], both["e0"], both["e1"], both["m0"]], [2 / a, -2 * s / a, 1.0, -0.5])
    assert (X - X)["x"] == 0.0 and sum([X, X, E0])["x"] == 2.0
    with pytest.raises(TypeError, match="not linear"):
        X * E0
    with pytest.raises(TypeError, match="adds only linear forms"):
        X + 1.0
    arr = np.array([1.0, 2.0]) * X  # numpy arrays multiply forms, not the other way round
    assert isinstance(arr, Lin) and np.array_equal(arr["x"], [1.0, 2.0])


def test_table_places_every_term_where_the_kernel_reads_it():
    """A step written with the kit, run by the kernel on random inputs, equals the same formula written
    out in torch."""
    g = torch.Generator().manual_seed(0)
    x, e0, e1, m0, m1, last, z = (torch.randn(2, 6, generator=g) for _ in range(7))
    x0 = (X - 0.5 * E0 + 0.25 * E1) / 0.8
    out0 = 0.3 * X + 0.2 * E0 - 0.1 * E1 + 0.7 * X0 + 0.6 * M0 - 0.4 * M1 + 0.9 * X_LAST + 0.05 * Z
    out1 = X0 - 2.0 * M1
    plan = kit.plan("demo", x0=x0, outputs={"x": out0, "x0": out1}, clip=1.5)
    assert plan.terms == plan.terms.__class__(x=True, n_e=2, n_m=2, x_last=True, noise=True, clamp=True, n_out=2)
    o0, o1 = ops.step(plan.coef(), x, [e0, e1], m=[m0, m1], x_last=last, noise=z, clamp=True, n_out=2)
    want_x0 = ((x - 0.5 * e0 + 0.25 * e1) / 0.8).clamp(-1.5, 1.5)
    want0 = 0.3 * x + 0.2 * e0 - 0.1 * e1 + 0.7 * want_x0 + 0.6 * m0 - 0.4 * m1 + 0.9 * last + 0.05 * z
    assert_close(o0, want0, atol=1e-6, rtol=1e-6, what="out0")
    assert_close(o1, want_x0 - 2.0 * m1, atol=1e-6, rtol=1e-6, what="out1")


def test_table_rows_broadcast_and_refuse_bad_forms():
    abar = np.linspace(0.9, 0.1, 5)
    plan = kit.plan("rows", outputs={"x": np.sqrt(abar) * X + Z})
    assert plan.steps == 5 and np.allclose(plan.table[:, L.out(0, L.CX)], np.sqrt(abar))
    assert kit.plan("one", outputs={"x": X}).steps == 1
    assert kit.plan("many", outputs={"x": X}, rows=(7,)).steps == 7
    with pytest.raises(ValueError, match="data prediction is a form of x, e0 and e1 only"):
        kit.table(x0=X + M0, outputs=[X0])


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("alpha,sigma", [(0.6, 0.8), (1.0, 3.0), (0.3, 0.7)], ids=["vp", "ve", "flow"])
def test_prediction_types_recover_x0_and_eps(prediction_type, alpha, sigma):
    """For x = alpha*x0 + sigma*eps and the model output each prediction type defines (eps; v = (alpha*eps
    - sigma*x0)/n with n^2 = alpha^2 + sigma^2; x0; the velocity eps - x0), the forms give back x0 and eps."""
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=50), rng.normal(size=50)
    x = alpha * x0 + sigma * eps
    n = np.hypot(alpha, sigma)
    out = {"epsilon": eps, "v_prediction": (alpha * eps - sigma * x0) / n, "sample": x0,
           "flow_prediction": eps - x0}[prediction_type]
    pred = predict(prediction_type, alpha, sigma)
    np.testing.assert_allclose(evaluate(pred.x0, x=x, e0=out), x0, atol=1e-12)
    np.testing.assert_allclose(evaluate(pred.eps, x=x, e0=out), eps, atol=1e-12)
    np.testing.assert_allclose(evaluate(eps_from_x0(alpha, sigma), x=x, x0=x0), eps, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        predict("score", alpha, sigma)


def test_forward_process_plans():
    """q_sample: x_t = sqrt(abar)*x0 + sqrt(1 - abar)*eps; velocity: sqrt(abar)*eps - sqrt(1 - abar)*x0."""
    abar = np.array([0.9, 0.5, 0.01])
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    x0, eps = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    for plan, want in ((q_sample_plan(a, s), a[:, None] * x0.numpy() + s[:, None] * eps.numpy()),
                       (velocity_plan(a, s), a[:, None] * eps.numpy() - s[:, None] * x0.numpy())):
        got = ops.step(plan.coef("cpu", torch.float64), x0, noise=eps, rows=torch.arange(3))[0]
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
        assert plan.terms.x and plan.terms.noise and plan.terms.n_e == 0


# ------------------------------------------------------------------------------------------------ DDIM
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta,clip", [(0.0, None), (1.0, None), (0.5, 1.0)])
def test_ddim_plan_equals_the_paper_shaped_reference(prediction_type, eta, clip):
    """A whole DDIM run through the stepper equals reference.ddim.sample_ddim (float64, same noise)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ts = np.arange(999, -1, -100)
    plan = ddim_plan(abar, ts, np.append(ts[1:], -1), eta=eta, prediction_type=prediction_type,
                     clip_sample=clip is not None, clip_sample_range=clip or 1.0, with_x0=False)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    noises = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in ts]

    def model(x, t):
        return 0.8 * torch.tanh(x) + 1e-4 * float(t)

    abar_t = torch.from_numpy(abar)
    want = sample_ddim(model, x_T, abar_t, ts.tolist(), eta, lambda i: noises[i], clip, prediction_type)
    stepper, x = Stepper(plan), x_T
    for i, t in enumerate(ts):
        (x,) = stepper.step(x, model(x, t), noise=noises[i] if eta else None)
    assert_close(x, want, atol=1e-10, rtol=1e-10, what=f"ddim {prediction_type} eta={eta}")


def test_ddim_x0_plan_and_thresholding_split():
    """x0 alone (dynamic thresholding's first pass), then the update from a given x0 (m0): their
    composition equals one DDIM step (reference) with that x0."""
    abar_t = np.array([0.3])
    x, e = torch.randn(2, 10, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)
    (x0,) = ops.step(ddim_x0(abar_t, prediction_type="v_prediction").coef("cpu", torch.float64), x, [e])
    a, s = np.sqrt(0.3), np.sqrt(0.7)
    assert_close(x0, a * x - s * e, atol=1e-12, rtol=1e-12, what="v-prediction x0")
    half = x0 / 2  # any x0 the threshold returns
    update = ddim_plan(np.array([0.3, 0.6]), np.array([0]), np.array([1]), prediction_type="v_prediction",
                       x0_given=True)
    (got,) = ops.step(update.coef("cpu", torch.float64), x, [e], m=[half])
    eps = a * e + s * x
    want = np.sqrt(0.6) * half + np.sqrt(0.4) * eps
    assert_close(got, want, atol=1e-12, rtol=1e-12, what="update from m0")


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


def test_ddim_reference_step_is_eq_12():
    """reference.ddim.ddim_step against eq. 12 written out for one scalar case."""
    x, e, z = (torch.tensor([v], dtype=torch.float64) for v in (0.7, -0.2, 0.3))
    at, ap, eta = 0.4, 0.7, 0.8
    x0 = (0.7 + 0.2 * np.sqrt(0.6)) / np.sqrt(0.4)
    sig = eta * np.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
    want = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sig**2) * -0.2 + sig * 0.3
    got, got0 = ddim_step(x, e, at, ap, eta, z)
    assert abs(float(got) - want) < 1e-12 and abs(float(got0) - x0) < 1e-12
