"""GPU tests (skipped without a CUDA device): the cuda and triton backends against the float64 reference,
the drop-in scheduler on CUDA against diffusers, no host sync inside a step, and a 10-step DDIM loop
captured in a CUDA graph equal to the eager loop."""

import numpy as np
import pytest
import torch
from cases import CONFIGS, SHAPES, make_case, reference64
from conftest import GPU_BACKENDS, assert_close, require_backend

from fastdiff import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES + [(16, 4, 64, 64)], ids=str)
def test_backends_match_reference(backend, name, shape):
    require_backend(backend, "cuda")
    kw = make_case(CONFIGS[name], shape, rows="per-sample" if shape[0] > 2 else "one", device="cuda")
    got = ops.step(**kw, backend=backend)
    for k, (a, b) in enumerate(zip(got, reference64(kw))):
        assert a.is_cuda
        assert_close(a.cpu(), b, atol=2e-5, rtol=2e-5, what=f"{backend} {name} out{k}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accuracy_rule(backend, dtype):
    from fastdiff.ops.step import reference_outputs, validate

    require_backend(backend, "cuda")
    kw = make_case(CONFIGS["everything"], (3, 5, 17, 19), dtype, rows="per-sample", device="cuda")
    want = reference64(kw)
    naive = reference_outputs(validate(**kw), compute_dtype=dtype)
    for k, a in enumerate(ops.step(**kw, backend=backend)):
        err = (a.double().cpu() - want[k]).abs().max().item()
        err_naive = (naive[k].double().cpu() - want[k]).abs().max().item()
        assert err <= 2 * err_naive + 1e-6, f"{backend} {dtype} out{k}: {err:.3g} vs {err_naive:.3g}"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_streams_agree_on_gpu(backend):
    from fastdiff import layout as L
    from fastdiff.random import randn, sample_seeds

    require_backend(backend, "cuda")
    seeds = sample_seeds(7, 5)
    coef = torch.zeros(1, L.NUM_COEF, device="cuda")
    coef[0, L.out(0, L.CZ)] = 1.0
    (z,) = ops.step(coef, seeds=seeds.cuda(), shape=(5, 4099), noise_step=3, backend=backend)
    err = (z.double().cpu() - randn(seeds, 4099, step=3, dtype=torch.float64)).abs().max().item()
    assert err <= 1e-6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_scheduler_on_cuda_matches_diffusers_without_host_sync(backend):
    from diffusers import DDIMScheduler

    from fastdiff.integrations.diffusers import FastDDIMScheduler

    require_backend(backend, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 32, 32, device="cuda", generator=g)
    noises = [torch.randn(2, 4, 32, 32, device="cuda", generator=g) for _ in range(20)]
    ref, fast = DDIMScheduler(), FastDDIMScheduler()
    fast.backend = backend
    ref.set_timesteps(20, device="cuda")
    fast.set_timesteps(20, device="cuda")
    xr = xf = x
    for i, t in enumerate(ref.timesteps):
        e = 0.9 * torch.tanh(xr)
        xr = ref.step(e, t, xr, eta=1.0, variance_noise=noises[i]).prev_sample
        ef = 0.9 * torch.tanh(xf)
        if backend != "torch":  # the fused step never waits for the GPU: t stays on the device
            torch.cuda.set_sync_debug_mode("error")
        try:
            xf = fast.step(ef, t, xf, eta=1.0, variance_noise=noises[i]).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_close(xf.cpu(), xr.cpu(), atol=1e-5, rtol=1e-5, what=f"{backend} scheduler")


def test_ddim_loop_captured_in_a_cuda_graph_equals_eager():
    from fastdiff import schedules
    from fastdiff.loop import CapturedSampler, sample
    from fastdiff.random import sample_seeds
    from fastdiff.samplers.ddim import ddim_plan

    abar = schedules.alphas_cumprod(schedules.betas())
    ts = schedules.timesteps(10, 1000, "trailing")
    plan = ddim_plan(abar, ts, np.append(ts[1:], -1), eta=1.0, with_x0=False)
    timesteps = torch.from_numpy(ts).cuda()
    seeds = sample_seeds(3, 4).cuda()

    def model(x, t):
        return 0.9 * torch.tanh(x) + 1e-4 * t.float()

    x_T = torch.randn(4, 4, 32, 32, device="cuda")
    eager = sample(model, x_T, plan, timesteps, seeds=seeds)
    graph = CapturedSampler(model, plan, timesteps, x_T, seeds=seeds)
    replayed = graph(x_T)
    assert torch.equal(replayed, eager)
    assert torch.equal(graph(x_T), eager)  # replays are repeatable
