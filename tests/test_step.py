"""The step kernel family on every backend and device, against the independent float64 oracle
(tests/cases.py): random plans exercising every term, low precision under the accuracy rule, zero
weights that must not read their input, NaN semantics, out= (in place, strided, refused aliasing), the
CPU streaming-store path, float64 and autograd through the torch reference; bad input; the custom op
under opcheck and torch.compile."""

import pytest
import torch
from cases import CONFIGS, SHAPES, make_case, oracle, to_device
from conftest import DEVICE_BACKENDS, DEVICES, assert_close, require_backend

from fastdiff import layout as L
from fastdiff import ops
from fastdiff.ops.step import reference_outputs, run, validate
from fastdiff.philox import sample_seeds


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle_fp32(device, backend, name, shape):
    require_backend(backend, device)
    kw = make_case(CONFIGS[name], shape, rows="per-sample" if shape[0] > 2 else "one", device=device)
    got = ops.step(**kw, backend=backend)
    assert len(got) == kw["n_out"]
    for k, (a, b) in enumerate(zip(got, oracle(kw))):
        assert a.dtype == torch.float32 and a.shape == shape and a.device.type == device
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} {name} out{k}")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["ddim", "everything"])
def test_low_precision_accuracy_rule(device, backend, dtype, name):
    """Error vs the float64 oracle at most 2x that of the same computation in the storage dtype."""
    require_backend(backend, device)
    kw = make_case(CONFIGS[name], (3, 5, 17, 19), dtype, rows="per-sample", device=device)
    got = ops.step(**kw, backend=backend)
    want = oracle(kw)
    naive = reference_outputs(validate(**to_device(kw, "cpu")), compute_dtype=dtype)
    for k in range(len(got)):
        err = (got[k].double().cpu() - want[k]).abs().max().item()
        err_naive = (naive[k].double() - want[k]).abs().max().item()
        assert got[k].dtype == dtype
        assert err <= 2 * err_naive + 1e-6, f"{backend} {dtype} out{k}: error {err:.3g} vs naive {err_naive:.3g}"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_weights_do_not_read_their_input(device, backend):
    """inf and NaN in inputs whose weights are 0 leave the outputs finite (0*inf would be NaN): per output,
    in x0, and for inputs no output reads; a weighted inf still gives inf, a clamped one the bound."""
    require_backend(backend, device)
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, inf, -inf, 2.0]], device=device)
    e = torch.tensor([[0.5, 0.5, nan, inf]], device=device)
    m0 = torch.full((1, 4), nan, device=device)
    coef = torch.zeros(1, L.NUM_COEF, device=device)
    coef[0, L.AS], coef[0, L.AX], coef[0, L.R] = 1.0, 1.0, 3.0          # x0 = clamp(x, -3, 3): e not in x0
    coef[0, L.out(0, L.CX0)], coef[0, L.out(0, L.CE0)] = 2.0, 0.0        # out0 = 2*x0
    coef[0, L.out(1, L.CX)] = 1.0                                       # out1 = x
    coef[0, L.out(2, L.CM0)] = 0.0                                      # out2 = 0 (m0 not read)
    o0, o1, o2 = ops.step(coef, x, [e], m=[m0], clamp=True, n_out=3, backend=backend)
    assert o0.cpu().tolist() == [[2.0, 6.0, -6.0, 4.0]]
    assert o1.cpu().tolist() == [[1.0, inf, -inf, 2.0]]
    assert o2.cpu().tolist() == [[0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("repeat", [1, 16], ids=["row4", "row64"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_one_output_with_x0_skips_what_each_sum_does_not_read(device, backend, repeat):
    """One output that reads x0, as a DDIM-type step: x enters x0 only and e the output only, both holding
    inf; neither may reach the sum it has no weight in (0*inf is NaN). Rows of 4 take the per-element path,
    rows of 64 the vector loops (the CPU's one-output loop with its masks)."""
    require_backend(backend, device)
    inf = float("inf")
    x = torch.tensor([[1.0, inf, -inf, 2.0] * repeat], device=device)
    e = torch.tensor([[0.5, 0.25, inf, -0.5] * repeat], device=device)
    coef = torch.zeros(1, L.NUM_COEF, device=device)
    coef[0, L.AS], coef[0, L.AX], coef[0, L.R] = 1.0, 1.0, 3.0            # x0 = clamp(x, -3, 3)
    coef[0, L.out(0, L.CX0)], coef[0, L.out(0, L.CE0)] = 2.0, 1.0         # out = 2*x0 + e
    (o,) = ops.step(coef, x, [e], clamp=True, backend=backend)
    assert o.cpu().tolist() == [[2.5, 6.25, inf, 3.5] * repeat]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_semantics_are_the_same_everywhere(device, backend):
    """A NaN input stays NaN through the clamp (clamp(NaN) is NaN, as torch.clamp), on every backend; the
    guided pair with G = 1 does not read the unconditional output."""
    require_backend(backend, device)
    nan = float("nan")
    x = torch.tensor([[nan, 5.0, -5.0, 0.25]], device=device)
    u = torch.tensor([[nan, nan, 1.0, 1.0]], device=device)
    coef = torch.zeros(1, L.NUM_COEF, device=device)
    coef[0, L.G], coef[0, L.AS], coef[0, L.AX], coef[0, L.R] = 1.0, 1.0, 1.0, 1.0
    coef[0, L.out(0, L.CX0)], coef[0, L.out(0, L.CE0)] = 1.0, 1.0
    (o,) = ops.step(coef, x, [x * 0], e_uncond=[u], clamp=True, backend=backend)
    got = o.cpu()
    assert torch.isnan(got[0, 0]) and got[0, 1:].tolist() == [1.0, -1.0, 0.25]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_noncontiguous_inputs_and_out(device, backend):
    require_backend(backend, device)
    kw = make_case(CONFIGS["everything"], (3, 5, 17, 19), noncontig=True, rows="broadcast", device=device)
    assert not kw["x"].is_contiguous()
    for a, b in zip(ops.step(**kw, backend=backend), oracle(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} strided")
    outs = [torch.empty(3, 19, 17, 5, device=device).permute(0, 3, 2, 1) for _ in range(3)]  # strided out=
    got = ops.step(**kw, out=outs, backend=backend)
    assert all(g is o for g, o in zip(got, outs))
    for a, b in zip(got, oracle(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} strided out")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_out_in_place_and_aliasing(device, backend):
    """out= exactly an input is in place; an out that partly overlaps an input or another out is refused
    (as torch refuses it), never silently wrong - also for a kind of call seen before."""
    require_backend(backend, device)
    kw = make_case(CONFIGS["multistep"], (2, 4, 8, 8), device=device)
    want = oracle(kw)
    x = kw["x"].clone()
    extra = [torch.empty_like(x), torch.empty_like(x)]
    outs = ops.step(**{**kw, "x": x}, out=[x, *extra], backend=backend)  # x_next overwrites x
    assert outs[0] is x
    for a, b in zip(outs, want):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"{backend} in place")
    buf = torch.empty(2 * 256 + 1, device=device)
    shifted = buf[1:].reshape(2, 256)  # overlaps `base` shifted by one element
    base = buf[:-1].reshape(2, 256).copy_(torch.randn(2, 256))
    coef = torch.zeros(1, L.NUM_COEF, device=device)
    coef[0, L.out(0, L.CX)] = 1.0
    for _ in range(3):  # the kind validated twice first: its later calls are checked by the call generated for it
        ops.step(coef, base, out=[torch.empty_like(base)], backend=backend)
    with pytest.raises(ValueError, match=r"out\[0\] overlaps x"):
        ops.step(coef, base, out=[shifted], backend=backend)
    two = torch.empty(2, 256, device=device)
    with pytest.raises(ValueError, match=r"out\[0\] overlaps out\[1\]"):
        ops.step(coef, base, n_out=2, out=[two, two], backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_large_outputs_take_the_streaming_store_path(backend):
    """Outputs of >= 16 MiB in all use non-temporal stores on the CPU; in place they must not (each x is
    written where it was read). Sample 0 against the oracle of a batch of one (a sample's step does not
    depend on the others, noise included)."""
    require_backend(backend)
    kw = make_case(CONFIGS["gmm"], (4, 4, 512, 256), rows="per-sample")  # 8 MiB per tensor, 2 outputs
    first = {k: v[:1] if k in ("x", "rows", "component", "seeds") else v for k, v in kw.items()}
    first["e"] = [kw["e"][0][:1]]
    want = oracle(first)
    for a, b in zip(ops.step(**kw, backend=backend), want):
        assert_close(a[:1], b, atol=2e-5, rtol=2e-5, what=f"{backend} streaming stores")
    x = kw["x"].clone()
    ops.step(**{**kw, "x": x}, out=[x, torch.empty_like(x)], backend=backend)
    assert_close(x[:1], want[0], atol=2e-5, rtol=2e-5, what=f"{backend} in place, large")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_float64_runs_in_float64(device, backend):
    """float64 inputs (diffusers computes in them) take the torch reference in float64 on every backend,
    with a float64 plan table: within 1e-12 of the oracle."""
    require_backend(backend, device)
    kw = make_case(CONFIGS["ddim"], (2, 3, 5, 5), torch.float64, device=device)
    kw["coef"] = kw["coef"].double()
    got = ops.step(**kw, backend=backend)
    for a, b in zip(got, oracle(kw)):
        assert a.dtype == torch.float64
        assert_close(a, b, atol=1e-12, rtol=1e-12, what=f"{backend} float64")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_autograd_flows_through_the_step(device, backend):
    """With inputs that require grad the step is differentiable: d sum(out0)/dx equals the closed form
    CX + CX0*AS*AX where x0 is not clamped (0 where it is), and d/de likewise."""
    require_backend(backend, device)
    x = torch.linspace(-2, 2, 40, device=device).reshape(2, 20).requires_grad_()
    e = torch.linspace(1, -1, 40, device=device).reshape(2, 20).requires_grad_()
    coef = torch.zeros(1, L.NUM_COEF, device=device)
    coef[0, L.AS], coef[0, L.AX], coef[0, L.AE0], coef[0, L.R] = 0.5, 2.0, -1.0, 0.8
    coef[0, L.out(0, L.CX)], coef[0, L.out(0, L.CE0)], coef[0, L.out(0, L.CX0)] = 0.3, 0.7, 1.5
    (out,) = ops.step(coef, x, [e], clamp=True, backend=backend)
    assert out.requires_grad
    out.sum().backward()
    inside = ((0.5 * (2.0 * x - e)).abs() < 0.8).double()
    assert_close(x.grad, 0.3 + 1.5 * 0.5 * 2.0 * inside, atol=1e-6, rtol=1e-6, what="d/dx")
    assert_close(e.grad, 0.7 - 1.5 * 0.5 * inside, atol=1e-6, rtol=1e-6, what="d/de")


def test_closed_form_terms():
    """Unit coefficient rows pick single terms out exactly: out = x, x0 = clamp(...), out = offset."""
    x, e = torch.linspace(-3, 3, 24).reshape(2, 12), torch.linspace(1, 2, 24).reshape(2, 12)
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.AS], coef[0, L.AX], coef[0, L.AE0], coef[0, L.R] = 1.0, 2.0, -1.0, 1.5
    coef[0, L.out(0, L.CX)] = 1.0
    coef[0, L.out(1, L.CX0)] = 1.0
    coef[0, L.out(2, L.COFF)] = 1.0
    offset = torch.tensor([0.25, -4.0])
    for backend in ("torch", "cpu", "triton"):
        require_backend(backend)
        o0, o1, o2 = ops.step(coef, x, [e], offset=offset, clamp=True, n_out=3, backend=backend)
        assert torch.equal(o0, x)
        assert torch.equal(o1, (2 * x - e).clamp(-1.5, 1.5))
        assert torch.equal(o2, offset[:, None].expand(2, 12))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs_round_to_nearest_even(device, backend, dtype):
    """out = c*x with c = 1 + 5/1024: the product is exact in fp32, so each output must equal torch's
    own round-to-nearest-even conversion of the exact value."""
    require_backend(backend, device)
    x = (torch.randn(4, 999, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.out(0, L.CX)] = 1 + 5 / 1024
    (out,) = ops.step(coef.to(device), x.to(device), backend=backend)
    assert torch.equal(out.cpu(), (x.double() * (1 + 5 / 1024)).to(dtype))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [1.0, 1 + 5 / 1024, 3.0, 2.0**-13])
@pytest.mark.parametrize("row", [4099, 15])
def test_low_precision_every_bit_pattern(device, backend, dtype, c, row):
    """out = c*x over all 65536 bit patterns of the dtype (zeros, subnormals, the largest finite values, inf,
    NaN): c*x is exact in fp32 for these c, so each output must be torch's round-to-nearest-even conversion of
    the exact product - overflow to inf, rounding into the subnormals, NaN staying NaN - in the CPU kernel's
    vector conversions (rows of 4099: all but 3 elements a row in vectors of 16) and in its per-element ones
    (rows of 15: no vector fits)."""
    require_backend(backend, device)
    if row == 15 and backend == "triton" and device == "cpu":
        pytest.skip("rows of 15 test the CPU kernel's per-element path; Triton's interpreter has none and would "
                    "take ~40 s for its 4370 programs (its conversions are checked in rows of 4099)")
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    rows = -(-(2**16) // row)
    x = torch.cat([bits.view(dtype), torch.zeros(rows * row - 2**16, dtype=dtype)]).reshape(rows, row)
    coef = torch.zeros(1, L.NUM_COEF)
    coef[0, L.out(0, L.CX)] = c
    (out,) = ops.step(coef.to(device), x.to(device), backend=backend)
    want = (x.double() * c).to(dtype)
    got = out.cpu()
    assert torch.equal(got.isnan(), want.isnan())
    checked = ~want.isnan()
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter emulates bf16 on numpy and garbles its subnormals (a GPU converts them in
        # hardware): those inputs are left to the GPU run.
        checked &= (x.float().abs() >= torch.finfo(torch.bfloat16).tiny) | (x == 0)
    assert torch.equal(got[checked], want[checked]), (got[checked] != want[checked]).sum().item()


def test_bad_input_is_named():
    kw = make_case(CONFIGS["ddim"], (2, 3, 4, 4))
    cases = [
        (dict(e=[torch.randn(2, 3, 4, 5)]), ValueError, "e[0] must have shape"),
        (dict(e=[kw["e"][0].half()]), TypeError, "e[0] must have dtype"),
        (dict(x=kw["x"].int(), e=[kw["e"][0].int()]), TypeError, "storage dtype"),
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
        (dict(delta_table=torch.zeros(2, 3, 4, 4)), ValueError, "need component"),
        (dict(component=torch.tensor([0, 5]), delta_table=torch.zeros(2, 3, 4, 4)), ValueError,
         "component must lie in"),
        (dict(out=[torch.empty(2, 3, 4, 4)]), ValueError, "out must hold n_out=2"),
        (dict(out=[torch.empty(2, 3, 4, 4), torch.empty(2, 3, 4)]), ValueError, r"out[1] must be (2, 3, 4, 4)"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            ops.step(**{**kw, **change}, backend="torch")
    nan = kw["coef"].clone()
    nan[3, L.out(0, L.CE0)] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite coefficient out0\.CE0 = nan at row 3"):
        ops.step(**{**kw, "coef": nan})
    good = kw["coef"].clone()
    ops.step(**{**kw, "coef": good})
    good[0, L.AX] = float("inf")  # changed in place after a check: checked again
    with pytest.raises(ValueError, match="non-finite coefficient AX = inf at row 0"):
        ops.step(**{**kw, "coef": good})
    inf_scale = kw["coef"].clone()
    inf_scale[:, L.AS] = float("inf")  # 1/alpha at alpha = 0 (zero terminal SNR): allowed
    ops.step(**{**kw, "coef": inf_scale})
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.step(**kw, backend="metal")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested"):
            ops.step(**kw, backend="cuda")


def test_forced_backend_from_environment(monkeypatch):
    kw = make_case(CONFIGS["ddim"], (2, 3, 4, 4))
    monkeypatch.setenv("FASTDIFF_BACKEND", "metal")
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.step(**kw)
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    for a, b in zip(ops.step(**kw), oracle(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what="FASTDIFF_BACKEND=torch")


def test_device_rows_outside_table_give_nan():
    """A row index or component id that lives on the device cannot be checked without a sync: the kernels
    write NaN."""
    require_backend("cpu")
    kw = make_case(CONFIGS["ddim"], (2, 3, 4, 4))
    # Present the rows as if they were on the device: bypass the host check by calling the backend.
    a = validate(**{**kw, "rows": torch.tensor([0, 1])})
    a.rows = torch.tensor([1, 99])
    outs = [torch.empty(a.shape) for _ in range(a.n_out)]
    run(a, outs, "cpu")
    assert torch.isfinite(outs[0][0]).all() and torch.isnan(outs[0][1]).all()
    # so do device component ids outside the tables (DDIM-GMM's k_n), in every output of that sample
    a = validate(**make_case(CONFIGS["gmm"], (3, 3, 4, 4)))
    a.component = torch.tensor([0, 3, -1])
    outs = [torch.empty(a.shape) for _ in range(a.n_out)]
    run(a, outs, "cpu")
    for out in outs:
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


def test_opcheck():
    kw = make_case(CONFIGS["everything"], (2, 3, 4, 4))
    args = (kw["coef"], kw["x"], kw["e"], kw["e_uncond"], kw["m"], kw["x_last"], kw["row"], None, kw["offset"],
            kw["component"], kw["delta_table"], kw["var_table"], None, kw["seeds"], 7, 1, True, 3, [], "")
    torch.library.opcheck(torch.ops.fastdiff.step.default, args)
    outs = [torch.empty_like(kw["x"]) for _ in range(3)]
    torch.library.opcheck(torch.ops.fastdiff.step_out.default, (*args, outs))


def test_torch_compile_fullgraph_validates_as_eager():
    require_backend("cpu")
    kw = make_case(CONFIGS["gmm"], (2, 3, 4, 4))
    coef, x, e = kw.pop("coef"), kw.pop("x"), kw.pop("e")

    def f(coef, x, e0):
        x_next, x0 = ops.step(coef, x, [e0], **kw)
        return x_next * 2 + x0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(coef, x, e[0]), f(coef, x, e[0]), atol=1e-6, rtol=1e-6, what="compiled")
    with pytest.raises(Exception, match=r"e\[0\] must have shape"):  # the fake kernel checks as eager does
        compiled(coef, x, e[0][:, :2])


@pytest.mark.parametrize("device,backend", DEVICES)
def test_a_kind_of_call_seen_before_is_still_checked(device, backend):
    """The native backends remember a validated kind of call (which terms, shapes, the plan) and then only
    check each call's tensors. Every per-call tensor is read anew (new values of x, the guided outputs,
    rows, offset, component and tables give the oracle's outputs), and what the first call would have
    refused is still refused, with validate's message."""
    require_backend(backend, device)
    first = make_case(CONFIGS["everything"], (3, 2, 5, 7), rows="per-sample", device=device)
    ops.step(**first, backend=backend)
    for seed in (1, 2):
        kw = {**make_case(CONFIGS["everything"], (3, 2, 5, 7), rows="per-sample", seed=seed, device=device),
              "coef": first["coef"]}
        for k, (a, b) in enumerate(zip(ops.step(**kw, backend=backend), oracle(kw))):
            assert_close(a, b, atol=2e-5, rtol=2e-5, what=f"seed {seed} out{k}")
    kw = first
    B, K = 3, kw["delta_table"].shape[0]
    on = dict(device=device)
    cases = [
        (dict(component=torch.tensor([0, K, 1], **on)), "component must lie in"),
        (dict(component=torch.tensor([0, 1], **on)), "component must have shape"),
        (dict(component=kw["component"].int()), "component must have dtype"),
        (dict(rows=torch.tensor([0, 1, 9], **on)), "rows must lie in"),
        (dict(rows=torch.tensor([0, 1], **on)), "rows must have 1 or 3"),
        (dict(offset=kw["offset"].double()), "offset must have dtype"),
        (dict(offset=torch.zeros(B + 1, **on)), "offset must have shape"),
        (dict(var_table=kw["var_table"][:2]), "must have the same K"),
        (dict(delta_table=kw["delta_table"][..., :4]), "delta_table must have shape"),
        (dict(e_uncond=kw["e_uncond"][:1]), "e_uncond must pair"),
        (dict(e_uncond=[kw["e_uncond"][0][:, :1], kw["e_uncond"][1]]), r"e_uncond\[0\] must have shape"),
    ]
    if device != "cpu":  # on a device the kernel reads the row and component numbers (no host sync)
        cases = [c for c in cases if "must lie in" not in c[1]]
    for change, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            ops.step(**{**kw, **change}, backend=backend)
    strided = torch.stack([kw["component"], kw["component"]], 1)[:, 0]  # same values, not contiguous
    for a, b in zip(ops.step(**{**kw, "component": strided}, backend=backend), oracle(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what="strided component")
