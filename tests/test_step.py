"""The step kernel family: every backend against the torch reference (computed in float64), on random
plans that exercise every term; low precision under DESIGN.md's rule; out=, odd shapes, strides,
per-sample rows; bad input; the custom op under opcheck and torch.compile."""

import pytest
import torch
from cases import CONFIGS, SHAPES, make_case, reference64
from conftest import CPU_BACKENDS, assert_close, require_backend

from fastdiff import layout as L
from fastdiff import ops
from fastdiff.ops.step import reference_outputs, run, validate
from fastdiff.random import sample_seeds

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_fp32(backend, name, shape):
    require_backend(backend)
    kw = make_case(CONFIGS[name], shape, rows="per-sample" if shape[0] > 2 else "one")
    got = ops.step(**kw, backend=backend)
    want = reference64(kw)
    assert len(got) == kw["n_out"]
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and a.shape == shape
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} {name} out{k}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ddim", "everything"])
def test_low_precision_accuracy_rule(backend, dtype, name):
    """Error vs the float64 reference at most 2x that of the same-dtype torch computation."""
    require_backend(backend)
    kw = make_case(CONFIGS[name], (3, 5, 17, 19), dtype, rows="per-sample")
    got = ops.step(**kw, backend=backend)
    want = reference64(kw)
    naive = reference_outputs(validate(**kw), compute_dtype=dtype)
    for k in range(len(got)):
        err = (got[k].double() - want[k]).abs().max().item()
        err_naive = (naive[k].double() - want[k]).abs().max().item()
        assert got[k].dtype == dtype
        assert err <= 2 * err_naive + 1e-6, f"{backend} {dtype} out{k}: error {err:.3g} vs naive {err_naive:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs(backend):
    require_backend(backend)
    kw = make_case(CONFIGS["everything"], (3, 5, 17, 19), noncontig=True, rows="broadcast")
    assert not kw["x"].is_contiguous()
    for a, b in zip(ops.step(**kw, backend=backend), reference64(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} strided")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_and_in_place(backend):
    require_backend(backend)
    kw = make_case(CONFIGS["multistep"], (2, 4, 8, 8))
    want = reference64(kw)
    x = kw["x"].clone()
    extra = [torch.empty_like(x), torch.empty_like(x)]
    outs = ops.step(**{**kw, "x": x}, out=[x, *extra], backend=backend)  # x_next overwrites x
    assert outs[0] is x
    for a, b in zip(outs, want):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} in place")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_closed_form_terms(backend):
    """Unit coefficient rows pick single terms out exactly: out = x, x0 = clamp(...), out = offset."""
    require_backend(backend)
    x, e = torch.linspace(-3, 3, 24).reshape(2, 12), torch.linspace(1, 2, 24).reshape(2, 12)
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.AS], coef[0, L.AX], coef[0, L.AE0], coef[0, L.R] = 1.0, 2.0, -1.0, 1.5
    coef[0, L.out(0, L.CX)] = 1.0
    coef[0, L.out(1, L.CX0)] = 1.0
    coef[0, L.out(2, L.COFF)] = 1.0
    offset = torch.tensor([0.25, -4.0])
    o0, o1, o2 = ops.step(coef, x, [e], offset=offset, clamp=True, n_out=3, backend=backend)
    assert torch.equal(o0, x)
    assert torch.equal(o1, (2 * x - e).clamp(-1.5, 1.5))
    assert torch.equal(o2, offset[:, None].expand(2, 12))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs_round_to_nearest_even(backend, dtype):
    """out = c*x with c = 1 + 5/1024: the product is exact in fp32, so each output must equal torch's
    own round-to-nearest-even conversion of the exact value."""
    require_backend(backend)
    x = (torch.randn(4, 999, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.out(0, L.CX)] = 1 + 5 / 1024
    (out,) = ops.step(coef, x, backend=backend)
    assert torch.equal(out, (x.double() * (1 + 5 / 1024)).to(dtype))


def test_bad_input_is_named():
    kw = make_case(CONFIGS["ddim"], (2, 3, 4, 4))
    cases = [
        (dict(e=[torch.randn(2, 3, 4, 5)]), ValueError, "e[0] must have shape"),
        (dict(e=[kw["e"][0].half()]), TypeError, "e[0] must have dtype"),
        (dict(x=kw["x"].double(), e=[kw["e"][0].double()]), TypeError, "storage dtype"),
        (dict(x=torch.empty(2, 3, 4, 4, device="meta")), ValueError, "coef must be on meta"),
        (dict(m=[kw["x"]] * 4), ValueError, "at most 3 history"),
        (dict(coef=kw["coef"][:, :10]), ValueError, "coef must have shape"),
        (dict(coef=kw["coef"].double()), TypeError, "coef must have dtype"),
        (dict(row=9), ValueError, "row must be in"),
        (dict(rows=torch.tensor([0, 1, 2])), ValueError, "rows must have 1 or 2"),
        (dict(rows=torch.tensor([0, 9])), ValueError, "rows must lie in"),
        (dict(noise=kw["x"], seeds=sample_seeds(0, 2)), ValueError, "noise or seeds"),
        (dict(seeds=torch.zeros(2, dtype=torch.int32)), TypeError, "seeds must have dtype"),
        (dict(n_out=4), ValueError, "n_out must be"),
        (dict(e_uncond=[]), ValueError, "e_uncond must pair"),
        (dict(row_table=torch.zeros(2, 3, 4, 4)), ValueError, "need idx"),
        (dict(idx=torch.tensor([0, 5]), row_table=torch.zeros(2, 3, 4, 4)), ValueError, "idx must lie in"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
            ops.step(**{**kw, **change}, backend="torch")
    nan = kw["coef"].clone()
    nan[3, L.out(0, L.CE0)] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite coefficient at row 3: out0\.CE0 = nan"):
        ops.step(**{**kw, "coef": nan})
    good = kw["coef"].clone()
    ops.step(**{**kw, "coef": good})
    good[0, L.AX] = float("inf")  # changed in place after a check: checked again
    with pytest.raises(ValueError, match="non-finite coefficient at row 0: AX = inf"):
        ops.step(**{**kw, "coef": good})
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.step(**kw, backend="metal")
    with pytest.raises(RuntimeError, match="backend 'cuda' was requested"):
        ops.step(**kw, backend="cuda")


def test_forced_backend_from_environment(monkeypatch):
    kw = make_case(CONFIGS["ddim"], (2, 3, 4, 4))
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run here"):
        ops.step(**kw)
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    for a, b in zip(ops.step(**kw), reference64(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what="FASTDIFF_BACKEND=torch")


def test_device_rows_outside_table_give_nan():
    """A row index that lives on the device cannot be checked without a sync: the kernels write NaN."""
    require_backend("cpu")
    kw = make_case(CONFIGS["ddim"], (2, 3, 4, 4))
    # Present the rows as if they were on the device: bypass the host check by calling the backend.
    a = validate(**{**kw, "rows": torch.tensor([0, 1])})
    a.rows = torch.tensor([1, 99])
    outs = [torch.empty(a.shape) for _ in range(a.n_out)]
    run(a, outs, "cpu")
    assert torch.isfinite(outs[0][0]).all() and torch.isnan(outs[0][1]).all()


def test_opcheck():
    kw = make_case(CONFIGS["everything"], (2, 3, 4, 4))
    args = (kw["coef"], kw["x"], kw["e"], kw["e_uncond"], kw["m"], kw["x_last"], kw["row"], None, kw["offset"],
            kw["idx"], kw["row_table"], kw["var_table"], None, kw["seeds"], 7, 1, True, 3, [], "")
    torch.library.opcheck(torch.ops.fastdiff.step.default, args)
    outs = [torch.empty_like(kw["x"]) for _ in range(3)]
    torch.library.opcheck(torch.ops.fastdiff.step_out.default, (*args, outs))


def test_torch_compile_fullgraph():
    require_backend("cpu")
    kw = make_case(CONFIGS["gmm"], (2, 3, 4, 4))
    coef, x, e = kw.pop("coef"), kw.pop("x"), kw.pop("e")

    def f(coef, x, e0):
        x_next, x0 = ops.step(coef, x, [e0], **kw)
        return x_next * 2 + x0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(coef, x, e[0]), f(coef, x, e[0]), atol=1e-6, rtol=1e-6, what="compiled")
