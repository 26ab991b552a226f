"""The stepper (history ring, x_last, noise counter, checks of a plan against its arguments) and the loop
built on it: against hand-written recurrences, the Philox reference, and diffusers' DDIM (CPU); the whole
loop in a CUDA graph equal to the eager loop (cuda)."""

import numpy as np
import pytest
import torch
from conftest import DEVICES, assert_close, require_backend

from fastdiff import layout as L
from fastdiff import philox, schedules
from fastdiff.loop import CapturedSampler, sample
from fastdiff.plan import Plan
from fastdiff.samplers import kit
from fastdiff.samplers.ddim import ddim_plan
from fastdiff.samplers.kit import E0, M0, M1, X0, X_LAST, X, Z
from fastdiff.stepper import Stepper


def adams_plan(steps: int):
    """x_{s+1} = x_s + 0.5 e_s + 0.25 e_{s-1} + 0.125 e_{s-2}: a history of two earlier outputs, warm-up
    rows without them; the data prediction x0 = e is kept as history."""
    s = np.arange(steps)
    c1, c2 = np.where(s >= 1, 0.25, 0.0), np.where(s >= 2, 0.125, 0.0)
    return kit.plan("adams", x0=E0, outputs={"x": X + 0.5 * X0 + c1 * M0 + c2 * M1, "history": X0})


@pytest.mark.parametrize("device,backend", DEVICES)
def test_history_ring_rotates_without_copies(device, backend):
    require_backend(backend, device)
    steps = 6
    g = torch.Generator().manual_seed(0)
    es = [torch.randn(2, 9, generator=g).to(device) for _ in range(steps)]
    x = want = torch.randn(2, 9, generator=g).to(device)
    stepper = Stepper(adams_plan(steps), backend=backend)
    buffers = set()
    for s in range(steps):
        x, hist = stepper.step(x, es[s])
        buffers.add(hist.data_ptr())
        want = want + 0.5 * es[s] + (0.25 * es[s - 1] if s >= 1 else 0) + (0.125 * es[s - 2] if s >= 2 else 0)
        assert_close(x, want, atol=1e-5, rtol=1e-5, what=f"step {s}")
    assert len(buffers) == 3  # two slots + the one being written, reused in turn
    assert stepper.index == steps


def test_history_rows_are_checked_against_the_history_that_exists():
    plan = adams_plan(4)
    stepper = Stepper(plan)
    stepper.reset(2)  # row 2 reads two slots, none exist after a reset
    with pytest.raises(ValueError, match=r"step 2 reads 2 history slot\(s\) but 0 exist"):
        stepper.step(torch.zeros(1, 3), torch.zeros(1, 3))


def test_x_last_output_feeds_the_next_step():
    s = np.arange(3)
    plan = kit.plan("last", outputs={"x": X + np.where(s >= 1, 0.5, 0.0) * X_LAST, "x_last": 2.0 * X})
    stepper, x = Stepper(plan), torch.ones(1, 4)
    x1, last1 = stepper.step(x)
    x2, last2 = stepper.step(x1)
    assert torch.equal(x1, x) and torch.equal(last1, 2 * x)
    assert torch.equal(x2, x1 + 0.5 * last1) and torch.equal(last2, 2 * x1)
    assert last2.data_ptr() != last1.data_ptr()  # x_last is read while the new one is written


def test_plan_terms_are_checked_against_the_arguments():
    noisy = kit.plan("noisy", outputs={"x": X + 0.3 * Z})
    with pytest.raises(ValueError, match="noise: noisy draws noise at step 0; pass noise"):
        Stepper(noisy).step(torch.zeros(2, 3))
    two = kit.plan("two outputs", x0=E0 + kit.E1, outputs={"x": X0})
    with pytest.raises(ValueError, match=r"e: two outputs reads 2 model output\(s\) per step, got 1"):
        Stepper(two).step(torch.zeros(2, 3), torch.zeros(2, 3))
    guided = kit.plan("guided", x0=E0, outputs={"x": X0}, guidance=3.0)
    with pytest.raises(ValueError, match="e_uncond: guided is guided"):
        Stepper(guided).step(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="has no guidance scale"):
        Stepper(two).step(torch.zeros(2, 3), [torch.zeros(2, 3)] * 2, e_uncond=[torch.zeros(2, 3)] * 2)
    u, c = torch.zeros(2, 3), torch.ones(2, 3)  # e = u + 3*(c - u) = 3
    assert torch.equal(Stepper(guided).step(u, c, e_uncond=[u])[0], torch.full((2, 3), 3.0))


@pytest.mark.parametrize("device,backend", DEVICES)
def test_noise_counter_is_the_step_index(device, backend):
    """Step s draws Philox step s of each sample's seed; reset(k) (img2img's begin_index) starts at k; an
    auxiliary pass (advance=False) does not move it."""
    require_backend(backend, device)
    plan = kit.plan("noise", outputs={"x": Z}, rows=(5,))
    seeds = philox.sample_seeds(4, 3).to(device)
    stepper = Stepper(plan, backend=backend)
    stepper.reset(2)
    stepper.step(None, seeds=seeds, shape=(3, 33), advance=False)
    for s in (2, 3):
        (z,) = stepper.step(None, seeds=seeds, shape=(3, 33))
        want = philox.randn(seeds.cpu(), 33, step=s, dtype=torch.float64)
        assert_close(z, want, atol=1e-6, rtol=0, what=f"step {s}")


def diffusers_ddim(eta, steps, x, model, noises):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(steps)
    for i, t in enumerate(ref.timesteps):
        x = ref.step(model(x, t), t, x, eta=eta, variance_noise=noises[i] if eta else None).prev_sample
    return x


def ddim_run(steps, eta):
    abar = schedules.alphas_cumprod(schedules.betas())
    ts = schedules.timesteps(steps, spacing="trailing")
    return ddim_plan(abar, ts, np.append(ts[1:], -1), eta=eta, with_x0=False), torch.from_numpy(ts)


def model(x, t):
    return 0.9 * torch.tanh(x) + 1e-4 * float(t)


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_loop_sample_equals_diffusers(device, backend, eta):
    """fastdiff.loop.sample with per-sample seeds = diffusers' DDIM given that same Philox noise."""
    require_backend(backend, device)
    plan, ts = ddim_run(10, eta)
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    seeds = philox.sample_seeds(8, 3)
    noises = [philox.randn(seeds, 128, step=s).reshape(3, 2, 8, 8) for s in range(10)]
    want = diffusers_ddim(eta, 10, x_T, model, noises)
    got = sample(model, x_T.to(device), plan, ts.to(device), seeds=seeds.to(device) if eta else None,
                 backend=backend)
    assert_close(got, want, atol=2e-5, rtol=2e-5, what=f"loop eta={eta}")


def test_loop_keeps_the_layout_and_works_in_place():
    plan, ts = ddim_run(5, 1.0)
    x_T = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(2))
    seeds = philox.sample_seeds(1, 2)
    want = sample(model, x_T, plan, ts, seeds=seeds)
    cl = x_T.contiguous(memory_format=torch.channels_last)
    got = sample(model, cl, plan, ts, seeds=seeds)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, want, atol=1e-6, rtol=1e-6, what="channels_last")
    sample(model, cl, plan, ts, seeds=seeds, inplace=True)
    assert_close(cl, want, atol=1e-6, rtol=1e-6, what="channels_last in place")
    with pytest.raises(ValueError, match="noise: ddim.* draws noise"):
        sample(model, x_T, plan, ts)
    with pytest.raises(ValueError, match="timesteps: expected 5"):
        sample(model, x_T, plan, ts[:3], seeds=seeds)


def test_loop_refuses_guided_plans():
    guided = kit.plan("guided", x0=E0, outputs={"x": X0}, guidance=3.0)
    with pytest.raises(ValueError, match="guided is guided"):
        sample(model, torch.zeros(1, 4), guided, torch.arange(1))


@pytest.mark.cuda
def test_loop_captured_in_a_cuda_graph_equals_eager():
    plan, ts = ddim_run(10, 1.0)
    timesteps, seeds = ts.cuda(), philox.sample_seeds(3, 4).cuda()
    x_T = torch.randn(4, 4, 32, 32, device="cuda")
    eager = sample(model, x_T, plan, timesteps, seeds=seeds)
    graph = CapturedSampler(model, plan, timesteps, x_T, seeds=seeds)
    assert torch.equal(graph(x_T), eager)
    assert torch.equal(graph(x_T), eager)  # replays are repeatable
    table = plan.table.copy()
    table[:, :] = plan.table  # refill with the same values: a captured graph reads the device table
    plan.refill(table)
    assert torch.equal(graph(x_T), eager)


def test_captured_sampler_needs_cuda():
    plan, ts = ddim_run(3, 0.0)
    with pytest.raises(ValueError, match="CUDA graphs need a cuda tensor"):
        CapturedSampler(model, plan, ts, torch.zeros(1, 4))


def test_per_sample_plans_check_the_batch():
    table = kit.table(outputs=[X], rows=(2, 3))  # 2 steps, 3 samples
    stepper = Stepper(Plan(table))
    with pytest.raises(ValueError, match="rows for a batch of 3 .* got a batch of 2"):
        stepper.step(torch.zeros(2, 4))
    assert torch.equal(stepper.step(torch.ones(3, 4))[0], torch.ones(3, 4))


def test_rows_past_the_end_and_rows_without_noise():
    """A step past the end of the plan is an error naming it; a plan whose last row draws no noise runs
    that row without noise (the check is per row)."""
    s = np.arange(3)
    plan = kit.plan("noisy but the last", outputs={"x": X + np.where(s < 2, 0.5, 0.0) * Z})
    stepper, x = Stepper(plan), torch.zeros(1, 4)
    noise = torch.ones(1, 4)
    stepper.step(x, noise=noise)
    with pytest.raises(ValueError, match="draws noise at step 1; pass noise"):
        stepper.step(x)
    stepper.step(x, noise=noise)
    assert torch.equal(stepper.step(x)[0], x)  # row 2: no noise needed
    with pytest.raises(ValueError, match="step 3 is past the end of the plan \\(3 steps, from the step index\\)"):
        stepper.step(x)


def counting_validate(monkeypatch) -> list:
    """Count the checked calls (``validate``): a step that takes its lane - the generated call of its kind
    - is not one of them."""
    import sys

    step_module = sys.modules["fastdiff.ops.step"]
    calls, validate = [], step_module.validate

    def counted(*args, **kw):
        calls.append(1)
        return validate(*args, **kw)

    monkeypatch.setattr(step_module, "validate", counted)
    return calls


def test_lanes_take_the_steps_of_a_run_and_leave_every_change_to_the_checked_way(monkeypatch):
    """A run's steps after the first few skip the checks (the lane of their kind), each equal to the
    hand-written recurrence; then every change between steps is seen - checked again, or refused by name -
    and computed as asked: the plan's table refilled, float64 inputs (refused: the ring is float32), an
    input requiring grad, a non-contiguous input, another backend, FASTDIFF_BACKEND, a wrong shape."""
    require_backend("cpu")
    calls = counting_validate(monkeypatch)
    steps = 14
    plan = adams_plan(steps)
    g = torch.Generator().manual_seed(0)
    es = [torch.randn(2, 40, generator=g) for _ in range(steps)]
    x = want = torch.randn(2, 40, generator=g)
    stepper = Stepper(plan, backend="cpu")
    half = 1.0  # the refilled table halves every weight of output 0 but x's

    def advance(s, x, e):
        nonlocal want
        want = want + half * (0.5 * es[s] + (0.25 * es[s - 1] if s >= 1 else 0)
                              + (0.125 * es[s - 2] if s >= 2 else 0))
        return stepper.step(x, e)

    def checked(s, x, e) -> tuple:
        before = len(calls)
        out = advance(s, x, e)
        return out, len(calls) - before

    for s in range(5):  # warm-up rows (no history, one slot, two) and the kind validated twice
        (x, _), n = checked(s, x, es[s])
    for s in range(5, 7):
        (x, _), n = checked(s, x, es[s])
        assert n == 0, f"step {s} was checked: no lane"
        assert_close(x, want, atol=1e-5, rtol=1e-5, what=f"step {s}")
    table = plan.table.copy()
    table[:, L.out(0, L.CX0)] *= 0.5
    table[:, L.out(0, L.CM0)] *= 0.5
    table[:, L.out(0, L.CM1)] *= 0.5
    plan.refill(table)
    half = 0.5
    (x, _), n = checked(7, x, es[7])
    assert n == 1, "a refilled table was not checked again"
    assert_close(x, want, atol=1e-5, rtol=1e-5, what="after refill")
    with pytest.raises(TypeError, match="m\\[0\\] must have dtype torch.float64, got torch.float32"):
        stepper.step(x.double(), es[8].double())  # float64 inputs, the ring float32
    (x, _), n = checked(8, x, es[8])
    leaf = x.clone().requires_grad_()
    (y, _), n = checked(9, leaf, es[9])
    assert n == 1 and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(leaf))  # d x_next / d x = 1 in this plan
    x = y.detach()
    wide = torch.empty(2, 80)
    wide[:, ::2] = es[10]
    (x, _), n = checked(10, x, wide[:, ::2])
    assert n == 1
    assert_close(x, want, atol=1e-5, rtol=1e-5, what="non-contiguous e")
    stepper.backend = "torch"
    (x, _), n = checked(11, x, es[11])
    assert n == 1, "another backend took the lane of the cpu one"
    stepper.backend = "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    stepper.backend = None
    (x, _), n = checked(12, x, es[12])
    assert n == 1, "FASTDIFF_BACKEND did not take the checked way"
    monkeypatch.delenv("FASTDIFF_BACKEND")
    assert_close(x, want, atol=1e-5, rtol=1e-5, what="after the backend changes")
    with pytest.raises(ValueError, match="e"):
        stepper.step(x, es[13][:, :20])
    assert stepper.index == 13


def test_lanes_refuse_what_the_checked_way_refuses():
    """Past the end of the plan, a row that draws noise without noise: the same errors as the checked way,
    after steps that went by the lane; per-sample rows named by the caller take a lane of their own."""
    require_backend("cpu")
    plan = kit.plan("noisy late", outputs={"x": X + np.array([0.0, 0.0, 0.0, 0.5]) * Z})
    stepper, x = Stepper(plan, backend="cpu"), torch.ones(2, 40)
    for _ in range(3):
        x = stepper.step(x)[0]
    assert torch.equal(x, torch.ones(2, 40))
    with pytest.raises(ValueError, match="noise: noisy late draws noise at step 3; pass noise"):
        stepper.step(x)
    noise = torch.full((2, 40), 2.0)
    assert torch.equal(stepper.step(x, noise=noise)[0], torch.full((2, 40), 2.0))
    with pytest.raises(ValueError, match="past the end of the plan"):
        stepper.step(x, noise=noise)
    stepper.reset(0)
    for r in (3, 3, 3, 1):  # rows named by the caller (a table indexed by timestep): the lane runs them too
        (y,) = stepper.step(x, noise=noise, row=r)
        assert torch.equal(y, x + (0.5 if r == 3 else 0.0) * noise)
    with pytest.raises(ValueError, match=r"step 4 is past the end of the plan \(4 steps\)"):
        stepper.step(x, noise=noise, row=4)


def test_slots_given_by_the_caller_take_a_lane_too(monkeypatch):
    """Heun's second call names its slots (``m=``): after the kind is validated its steps skip the checks,
    each equal to the recurrence; a slot of another dtype is refused by name, as the checked way refuses it."""
    require_backend("cpu")
    calls = counting_validate(monkeypatch)
    plan = kit.plan("two slots", outputs={"x": X + 0.5 * M0 - 0.25 * M1}, rows=(6,))
    stepper, g = Stepper(plan, backend="cpu"), torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, generator=g)
    for s in range(6):
        m = [torch.randn(3, 40, generator=g) for _ in range(2)]
        before = len(calls)
        (y,) = stepper.step(x, m=m)
        assert (len(calls) > before) == (s < 2), f"step {s}"
        assert_close(y, x + 0.5 * m[0] - 0.25 * m[1], atol=1e-6, rtol=1e-6, what=f"step {s}")
    stepper.reset(0)
    with pytest.raises(TypeError, match=r"m\[1\] must have dtype torch.float32, got torch.float64"):
        stepper.step(x, m=[m[0], m[1].double()])
