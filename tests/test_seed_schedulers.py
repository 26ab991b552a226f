"""The seed methods' schedulers as a demanding user drives them: empty batches over several steps, odd and
non-contiguous shapes (equal to the same contiguous run), low-precision storage kept, and
``torch.compile(step, fullgraph=True)`` equal to eager with per-sample seeds, fused guidance equal to guidance
done outside. Each scheduler's math is tested against its oracle in its own file (test_ddim_gmm.py,
test_mixddpm.py, test_ddm.py, test_iadb.py)."""

import pytest
import torch

from fastdiff.integrations.diffusers import (
    DDIMGMMScheduler,
    DDMScheduler,
    IADBScheduler,
    MixDDIMScheduler,
    MixDDPMScheduler,
)

SCHEDULERS = {
    "ddim_gmm": (lambda: DDIMGMMScheduler(offset_scale=0.5), {"eta": 1.0}),
    "mixddpm_standard": (lambda: MixDDPMScheduler(strategy="standard"), {}),
    "mixddim_standard": (lambda: MixDDIMScheduler(strategy="standard"), {"eta": 1.0}),
    "ddm": (lambda: DDMScheduler(), {}),
    "ddm_heun": (lambda: DDMScheduler(sampler="heun"), {}),
    "iadb_dpmsolver": (lambda: IADBScheduler(solver="dpmsolver++"), {}),
}


def model_output(name, x, t):
    g = torch.Generator().manual_seed(int(float(t) * 1000) + 7)
    out = torch.randn(x.shape, generator=g).to(x.dtype)
    if name.startswith("ddm"):
        return (0.3 * out, out)
    return out


def trajectory(name, x, steps=4, step=None, eager_plans=True):
    make, kw = SCHEDULERS[name]
    kw = kw if eager_plans else {}  # a plan for eta > 0 is built at the first eager step, eta = 0 in set_timesteps
    s = make()
    s.set_timesteps(steps)
    if isinstance(s, DDIMGMMScheduler):
        s.set_offsets(x.shape)
    call = step(s) if step is not None else s.step
    seeds = list(range(1, x.shape[0] + 1))
    for t in s.timesteps:
        x = call(model_output(name, x, t), t, x, seeds=seeds, **kw).prev_sample
    return x


@pytest.mark.parametrize("name", SCHEDULERS)
def test_empty_batch_runs_every_step(name):
    out = trajectory(name, torch.randn(0, 4, 8, 8))
    assert out.shape == (0, 4, 8, 8)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_non_contiguous_odd_shape_equals_the_contiguous_run(name):
    x = torch.randn(3, 5, 7, 3).permute(0, 3, 1, 2)  # [3, 3, 5, 7], not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(trajectory(name, x), trajectory(name, x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage_is_kept(name, dtype):
    out = trajectory(name, torch.randn(2, 4, 8, 8).to(dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["ddim_gmm", "mixddpm_standard", "ddm", "iadb_dpmsolver"])
def test_compiled_step_equals_eager(name):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 8, 8)
    compiled = trajectory(name, x, steps=2, step=lambda s: torch.compile(s.step, fullgraph=True), eager_plans=False)
    torch.testing.assert_close(compiled, trajectory(name, x, steps=2, eager_plans=False), rtol=0, atol=0)


def test_ddim_gmm_offsets_must_exist_before_compiling():
    torch._dynamo.reset()
    s = DDIMGMMScheduler()
    s.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(Exception, match=r"call set_offsets\(\(2, 4, 8, 8\)\) before compiling"):
        torch.compile(s.step, fullgraph=True)(torch.randn_like(x), s.timesteps[0], x)


@pytest.mark.parametrize("make", [DDMScheduler, IADBScheduler])
def test_a_device_timestep_is_read_only_at_the_run_start(make):
    """After the first call (which finds where the run starts), a timestep on a device is not read on the host
    (no sync per step): a 'meta' tensor, which cannot be read at all, stands in for a CUDA one."""
    s = make()
    s.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8)
    out = (0.3 * x, x) if make is DDMScheduler else x
    x = s.step(out, s.timesteps[0], x, seeds=[1, 2]).prev_sample
    for t in s.timesteps[1:]:
        x = s.step(out, t.to("meta"), x, seeds=[1, 2]).prev_sample
    assert bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match="all were taken"):
        s.step(out, s.timesteps[-1].to("meta"), x)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_fused_guidance_equals_guidance_done_outside(name):
    """``guidance_scale=`` with the model output holding [uncond; cond] (2B rows) is uncond + w*(cond - uncond)
    formed outside, then the plain step: the same draws (seeds), the same trajectory within fp32 rounding."""
    w, x = 7.5, torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))

    def guided(s):
        def call(out, t, x, **kw):
            pair = tuple(torch.cat([0.5 * o, o]) for o in out) if isinstance(out, tuple) \
                else torch.cat([0.5 * out, out])
            return s.step(pair, t, x, guidance_scale=w, **kw)
        return call

    def outside(s):
        def call(out, t, x, **kw):
            combined = tuple(0.5 * o + w * (o - 0.5 * o) for o in out) if isinstance(out, tuple) \
                else 0.5 * out + w * (out - 0.5 * out)
            return s.step(combined, t, x, **kw)
        return call

    got, want = trajectory(name, x, step=guided), trajectory(name, x, step=outside)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"{name}: fused guidance off by {err:.2e} (relative)"
