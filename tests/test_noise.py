"""fastdiff.noise against torch and diffusers: ``randn`` gives torch.randn's values (to float32 rounding: the
log, sin and cos differ in the last bits) and leaves the generator in torch's state, bit for bit, at every
size and part-way state; what it does not reproduce is torch.randn itself; ``randn_tensor`` is diffusers'."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor

from fastdiff import noise

# torch's and fastdiff's normals differ by the rounding of log/sin/cos of float32 uniforms: a few ulps of
# values below 6 (measured: at most 1.2e-7).
ATOL = 2e-6

pytestmark = pytest.mark.skipif(noise._kernel() is None, reason="fastdiff._C not built")


def pair(seed: int, skip: int = 0):
    """Two generators in the same state, `skip` words into the stream."""
    gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
    for g in gens:
        if skip:
            torch.rand(skip, generator=g)  # one MT19937 word per float32 uniform
    return gens


def same_state(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(a.get_state(), b.get_state())


@pytest.fixture
def no_torch_randn(monkeypatch):
    """torch.randn raises: the draw under test must be fastdiff's own."""
    noise._kernel()  # its first-use check calls torch.randn

    def boom(*args, **kwargs):
        raise AssertionError("torch.randn was called")
    monkeypatch.setattr(torch, "randn", boom)


# Sizes around the 16-element Box-Muller blocks (a tail redrawn with 16 fresh words) and the 624-word
# MT19937 state; states part way through the stream, at its end and just twisted.
@pytest.mark.parametrize("n", [16, 17, 31, 32, 47, 623, 624, 625, 1249, 5003, 4 * 64 * 64 + 3, 100_000])
@pytest.mark.parametrize("skip", [0, 1, 600, 623, 624, 1000])
def test_randn_equals_torch(n, skip):
    g_torch, g_fast = pair(1234 + n, skip)
    want = torch.randn(n, generator=g_torch)
    got = noise.randn(n, generator=g_fast)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert same_state(g_fast, g_torch)
    torch.testing.assert_close(torch.randn(n, generator=g_fast), torch.randn(n, generator=g_torch), atol=0, rtol=0)


def test_fast_draws_do_not_call_torch_randn(no_torch_randn):
    g = torch.Generator().manual_seed(3)
    assert noise.randn(2, 4, 9, 7, generator=g).shape == (2, 4, 9, 7)
    assert noise.randn((3, 5, 11)).shape == (3, 5, 11)  # the default generator
    assert noise.randn_like(torch.zeros(4, 8)).shape == (4, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert noise.randn_tensor((3, 4, 4), generator=gens).shape == (3, 4, 4)  # drawn row by row in place
    with pytest.raises(AssertionError, match="torch.randn was called"):
        noise.randn(8, generator=g)  # fewer than 16: torch's


def test_default_generator_matches_torch():
    torch.manual_seed(7)
    want = (torch.randn(2, 4, 9, 7), torch.randn(3, 5, 11))
    state = torch.default_generator.get_state()
    torch.manual_seed(7)
    got = (noise.randn(2, 4, 9, 7), noise.randn((3, 5, 11)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    assert torch.equal(torch.default_generator.get_state(), state)


@pytest.mark.parametrize("n, dtype", [(15, torch.float32), (1, torch.float32), (0, torch.float32),
                                      (64, torch.float64), (64, torch.float16), (64, torch.bfloat16)])
def test_other_draws_are_torch_itself(n, dtype):
    g_torch, g_fast = pair(99)
    assert torch.equal(noise.randn(n, generator=g_fast, dtype=dtype), torch.randn(n, generator=g_torch, dtype=dtype))
    assert same_state(g_fast, g_torch)


def test_randn_like():
    x = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(5)
    want = torch.randn_like(x)
    torch.manual_seed(5)
    torch.testing.assert_close(noise.randn_like(x), want, atol=ATOL, rtol=0)
    # channels-last: torch fills it in memory order by another path; fastdiff leaves it to torch
    y = x.to(memory_format=torch.channels_last)
    torch.manual_seed(5)
    want = torch.randn_like(y)
    torch.manual_seed(5)
    got = noise.randn_like(y)
    assert torch.equal(got, want) and got.stride() == want.stride()
    g_torch, g_fast = pair(8)
    torch.testing.assert_close(noise.randn_like(x, generator=g_fast), torch.randn(x.shape, generator=g_torch),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["one", "list", "list of one", "none", "fp16", "small rows"])
def test_randn_tensor_equals_diffusers(case):
    shape, dtype = ((3, 4, 16, 16), torch.float32) if case != "small rows" else ((4, 1, 3, 3), torch.float32)
    dtype = torch.float16 if case == "fp16" else dtype
    n_gens = {"one": 1, "fp16": 1, "none": 0, "list of one": 1}.get(case, shape[0])

    def gens():
        return [torch.Generator().manual_seed(40 + i) for i in range(n_gens)]

    def arg(gs):
        if case == "none":
            torch.manual_seed(40)
            return None
        return gs if case.startswith("list") or case == "small rows" else gs[0]

    ga, gb = gens(), gens()
    want = diffusers_randn_tensor(shape, generator=arg(ga), device=torch.device("cpu"), dtype=dtype)
    state = torch.default_generator.get_state()
    got = noise.randn_tensor(shape, generator=arg(gb), device=torch.device("cpu"), dtype=dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=ATOL if dtype == torch.float32 else 0, rtol=0)
    assert all(same_state(a, b) for a, b in zip(ga, gb))
    if case == "none":
        assert torch.equal(torch.default_generator.get_state(), state)


def test_randn_tensor_refuses_like_diffusers():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA generator")
    with pytest.raises(ValueError, match="Cannot generate a cpu tensor"):
        noise.randn_tensor((2, 16), generator=torch.Generator("cuda"), device=torch.device("cpu"))


def test_kernel_refuses_a_state_that_is_not_mt19937():
    from fastdiff import _C

    state = torch.Generator().manual_seed(0).get_state()
    state[8:12] = torch.tensor([0, 0, 0, 0], dtype=torch.uint8)  # left = 0: never in a CPU generator
    with pytest.raises(ValueError, match="not a CPU generator state"):
        _C.generator_randn_cpu(state.data_ptr(), torch.empty(32).data_ptr(), 32)
    with pytest.raises(ValueError, match="n must be >= 16"):
        _C.generator_randn_cpu(state.data_ptr(), torch.empty(8).data_ptr(), 8)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_drop_in_with_one_generator_per_sample_equals_diffusers(name):
    """A pipeline's ``generator=[...]`` (one per image) reaches the scheduler's draw: the drop-in's samples
    are diffusers' and every generator ends where diffusers leaves it."""
    import diffusers

    from fastdiff.integrations import diffusers as fast_diffusers

    ref, fast = getattr(diffusers, name)(), getattr(fast_diffusers, f"Fast{name}")()
    for s in (ref, fast):
        s.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ga, gb = ([torch.Generator().manual_seed(10 + i) for i in range(2)] for _ in range(2))
    xa = xb = x
    for t in ref.timesteps:
        xa = ref.step(eps, t, xa, generator=ga).prev_sample
        xb = fast.step(eps, t, xb, generator=gb).prev_sample
    torch.testing.assert_close(xb, xa, atol=1e-5, rtol=1e-5)
    assert all(same_state(a, b) for a, b in zip(ga, gb))
