"""The stepper (history ring, x_last, noise counter, checks of a plan against its arguments) and the loop
built on it: against hand-written recurrences, the Philox reference, and diffusers' DDIM (CPU); the whole
loop in a CUDA graph equal to the eager loop (cuda)."""

import numpy as np
import pytest
import torch
from conftest import DEVICES, assert_close, require_backend

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
