"""fastdiff.memory: the host blocks that CPU step outputs and noise draws reuse. A block goes out again only
once nothing holds it - the caller's tensor, a view of it, a numpy array over it, autograd - so reuse can
never overwrite what someone still reads; and a loop that drops its old outputs gets the same blocks back
(no fresh pages every step). The values the steps write are the subject of the other test files."""

import gc

import numpy as np
import pytest
import torch

from fastdiff import memory
from fastdiff.integrations.diffusers import FastEulerAncestralDiscreteScheduler
from fastdiff.ops import step

BIG = (4, 4, 128, 128)  # 1 MiB of float32


@pytest.fixture(autouse=True)
def own_cache(monkeypatch):
    """Each test on an empty cache of its own (blocks that earlier tests' objects still hold stay out of it);
    the process's cache comes back afterwards."""
    monkeypatch.setattr(memory, "_blocks", {})
    monkeypatch.setattr(memory, "_held", 0)
    monkeypatch.setattr(memory, "_limit", 512 << 20)


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_idle_block_comes_back_and_held_one_does_not():
    a = memory.empty(BIG, torch.float32)
    pa = ptr(a)
    b = memory.empty(BIG, torch.float32)
    assert ptr(b) != pa  # `a` is held
    a.fill_(1.0)
    del a
    c = memory.empty(BIG, torch.float32)
    assert ptr(c) == pa and c.shape == BIG and c.dtype == torch.float32 and c.is_contiguous()
    assert c._base is None and not c.requires_grad


@pytest.mark.parametrize("holder", ["view", "numpy", "storage", "autograd"])
def test_block_held_through_another_object_is_not_reused(holder):
    a = memory.empty(BIG, torch.float32)
    pa = ptr(a)
    if holder == "view":
        keep = a[1:]
    elif holder == "numpy":
        keep = a.numpy()
    elif holder == "storage":
        keep = a.untyped_storage()
    else:
        w = torch.ones(BIG, requires_grad=True)
        keep = (w * a).sum().grad_fn  # saves `a` for the backward
    del a
    gc.collect()
    for _ in range(memory.BLOCKS_PER_SIZE + 1):
        assert ptr(memory.empty(BIG, torch.float32)) != pa
    del keep
    assert ptr(memory.empty(BIG, torch.float32)) == pa


def test_a_held_output_keeps_its_values_while_the_loop_goes_on():
    """Every step's output is a fresh block while the caller holds the earlier ones, and a dropped one
    comes back: after 20 steps, the kept outputs still hold what their steps wrote."""
    import fastdiff.layout as L
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.out(0, L.CX)] = 1.0
    coef[0, L.out(0, L.CE0)] = 1.0
    x = torch.zeros(BIG)
    kept, ptrs = [], set()
    for i in range(20):
        (x,) = step(coef, x, [torch.full(BIG, 1.0)], backend="cpu")
        ptrs.add(ptr(x))
        if i % 5 == 0:
            kept.append((i + 1, x))
    for value, t in kept:
        assert torch.all(t == value)
    assert len(ptrs) <= len(kept) + memory.BLOCKS_PER_SIZE  # dropped outputs came back


def test_drop_in_loop_reuses_blocks_and_its_samples_are_distinct():
    s = FastEulerAncestralDiscreteScheduler()
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BIG) * s.init_noise_sigma
    eps = torch.randn(BIG)
    seen, before = set(), memory.cached_bytes()
    for t in s.timesteps:
        out = s.step(eps, t, x, generator=g)
        assert ptr(out.prev_sample) != ptr(x)
        x = out.prev_sample
        seen.add(ptr(x))
    assert len(seen) <= memory.BLOCKS_PER_SIZE
    assert memory.cached_bytes() - before <= memory.BLOCKS_PER_SIZE * x.numel() * 4


def test_gmm_outputs_are_reused_only_once_dropped():
    """gmm_noise's x and ids and gmm_score's score come from the cache: a held draw keeps its values while
    more are drawn (each equal to its own fresh draw), and a dropped one's blocks come back."""
    from fastdiff import philox
    from fastdiff.ops import gmm_noise, gmm_score
    K, D = 4, 4 * 128 * 128
    w = torch.full((K,), 1.0 / K, dtype=torch.float64)
    mu, sd = torch.randn(K, D), torch.rand(K, D) + 0.5
    seeds = philox.sample_seeds(3, 4)
    draw = lambda step: gmm_noise(w, mu, sd, BIG, per="element", seeds=seeds, step=step, backend="cpu")  # noqa: E731
    first = draw(1)
    want = [t.clone() for t in first]
    second = draw(2)
    assert ptr(second[0]) != ptr(first[0]) and ptr(second[1]) != ptr(first[1])
    assert torch.equal(first[0], want[0]) and torch.equal(first[1], want[1])
    assert not torch.equal(second[0], first[0])
    held = ptr(first[0]), ptr(first[1])
    del first
    gc.collect()
    again = draw(1)
    assert (ptr(again[0]), ptr(again[1])) == held
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])
    score = gmm_score(again[0], w, mu, sd, backend="cpu")
    score2 = gmm_score(second[0], w, mu, sd, backend="cpu")
    assert ptr(score) != ptr(score2) and not torch.equal(score, score2)


def test_blocks_held_for_good_are_forgotten():
    """A shape whose blocks are all held elsewhere (a long-lived history buffer) still gets cached blocks:
    the longest-held ones drop out of the cache (their holders keep them), new ones take their place."""
    held = [memory.empty(BIG, torch.float32).fill_(i) for i in range(memory.BLOCKS_PER_SIZE)]
    x = memory.empty(BIG, torch.float32)
    px = ptr(x)
    del x
    y = memory.empty(BIG, torch.float32)
    assert ptr(y) == px
    y.fill_(-1.0)
    assert memory.cached_bytes() == memory.BLOCKS_PER_SIZE * y.numel() * 4
    assert all(torch.all(h == i) for i, h in enumerate(held))  # forgotten, never handed out again


def test_inference_mode_blocks_stay_in_inference_mode():
    """A block made under torch.inference_mode is an inference tensor: handed out outside it, autograd and
    in-place updates would refuse it. So blocks are kept apart by mode, and each mode gets its own kind."""
    with torch.inference_mode():
        a = memory.empty(BIG, torch.float32)
        assert a.is_inference()
        pa = ptr(a)
        del a
    b = memory.empty(BIG, torch.float32)
    assert not b.is_inference() and ptr(b) != pa
    b.add_(1.0)
    w = torch.ones(BIG, requires_grad=True)
    (w * b).sum().backward()  # b may be saved for backward
    assert torch.all(w.grad == b)
    with torch.inference_mode():
        c = memory.empty(BIG, torch.float32)
        assert c.is_inference() and ptr(c) == pa  # the inference block again


def test_traced_code_allocates_as_torch_does():
    """Under torch.compile(fullgraph=True) the cache is not consulted (a lock and reference counts do not
    trace): a drop-in step compiled whole on the first call, at 1 MiB, gives the eager step's sample."""
    from fastdiff.integrations.diffusers import FastEulerDiscreteScheduler

    torch._dynamo.reset()
    x, e = torch.randn(BIG), torch.randn(BIG)
    f = torch.compile(lambda x: memory.empty_like(x).fill_(1.0) + x, fullgraph=True)
    assert torch.equal(f(torch.full(BIG, 2.0)), torch.full(BIG, 3.0))
    runs = []
    for compiled in (True, False):
        s = FastEulerDiscreteScheduler()
        s.set_timesteps(4)
        step = torch.compile(s.step, fullgraph=True, backend="aot_eager") if compiled else s.step
        runs.append(step(e, s.timesteps[0], x).prev_sample)
    assert torch.equal(runs[0], runs[1])


def test_threads_never_share_a_block():
    """Threads taking and dropping blocks of one shape at once: no two tensors held at the same time share
    memory (each thread fills its own with its number and finds it unchanged)."""
    import threading

    errors = []

    def work(k):
        for _ in range(50):
            held = [memory.empty(BIG, torch.float32).fill_(k) for _ in range(3)]
            if not all(torch.all(h == k) for h in held):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_small_tensors_and_other_devices_bypass_the_cache():
    small = memory.empty((10, 10), torch.float32)
    assert small.shape == (10, 10) and memory.cached_bytes() == 0
    meta = memory.empty_like(torch.empty(BIG, device="meta"))
    assert meta.device.type == "meta" and meta.shape == BIG


def test_limit_and_empty_cache():
    memory.set_limit(0)
    a = memory.empty(BIG, torch.float32)
    del a
    assert memory.cached_bytes() == 0
    memory.set_limit(512)
    a = memory.empty(BIG, torch.float32)
    nbytes = a.numel() * 4
    assert memory.cached_bytes() == nbytes
    assert memory.empty_cache() == 0  # held: not let go
    del a
    assert memory.empty_cache() == nbytes and memory.cached_bytes() == 0


def test_resized_block_is_let_go():
    a = memory.empty(BIG, torch.float32)
    a.resize_(2 * a.numel())
    del a
    b = memory.empty(BIG, torch.float32)
    assert b.numel() * 4 == b.untyped_storage().nbytes()
    assert memory.cached_bytes() == b.numel() * 4


@pytest.mark.parametrize("bad", [-1, "512", float("nan"), True])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="mb: expected a number of MiB >= 0"):
        memory.set_limit(bad)


def test_bad_env_limit(monkeypatch):
    monkeypatch.setenv("FASTDIFF_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="FASTDIFF_CPU_CACHE_MB: expected a number of MiB >= 0, got 'lots'"):
        memory._env_limit()


def test_numpy_view_of_reused_block_is_independent():
    a = memory.empty(BIG, torch.float32)
    a.fill_(3.0)
    arr = np.asarray(a)
    del a
    b = memory.empty(BIG, torch.float32)
    b.fill_(5.0)
    assert np.all(arr == 3.0)


def test_pipeline_with_cached_latents_gives_diffusers_latents():
    """A real diffusers pipeline whose latents (256x4x16x16, 1 MiB) the cache serves - the drop-in's samples,
    data predictions and step noise - as users run one: the same final latents as with diffusers' scheduler,
    and blocks were reused (the pipeline's loop drops its old latents every step)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from conftest import assert_close
    from tiny_pipelines import GUIDANCE, SD_CONFIG, tiny_sd

    pipe, kw = tiny_sd()

    def run():
        with torch.no_grad():
            return pipe(**kw, num_inference_steps=2, guidance_scale=GUIDANCE, height=16, width=16,
                        num_images_per_prompt=128, output_type="latent",
                        generator=torch.Generator().manual_seed(2)).images

    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG)
    want = run()
    pipe.scheduler = FastEulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    got = run()
    assert got.shape == (256, 4, 16, 16) and torch.isfinite(got).all()
    assert_close(got, want, atol=2e-5, rtol=1e-4, what="EulerAncestral, cached latents")
    assert memory._blocks.get(((256, 4, 16, 16), torch.float32, False))  # the cache served this shape
