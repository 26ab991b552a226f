"""Backend choice and the defensive load of fastdiff._C: without it the package imports, the torch
backend runs, a forced native backend raises with the reason, and `python -m fastdiff info` says why."""

import subprocess
import sys

import pytest
import torch
from cases import CONFIGS, make_case, oracle
from conftest import assert_close

from fastdiff import backends, ops


@pytest.fixture
def no_native(monkeypatch):
    """The package as it is when fastdiff._C failed to build or load."""
    monkeypatch.setattr(backends, "native", lambda: (None, "fastdiff._C is not importable (simulated)"))
    signatures = sys.modules["fastdiff.ops.step"]._SIGNATURES  # calls seen before, bound to the module
    for cache in (backends._status.cache_clear, backends._CHOICES.clear, signatures.clear):
        cache()
    yield
    for cache in (backends._status.cache_clear, backends._CHOICES.clear, signatures.clear):
        cache()


def test_without_native_module_the_torch_backend_serves(no_native):
    kw = make_case(CONFIGS["gmm"], (2, 3, 4, 4))
    assert backends.choose(torch.device("cpu")) == "torch"
    for a, b in zip(ops.step(**kw), oracle(kw)):
        assert_close(a, b, atol=2e-5, rtol=2e-5, what="fallback")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' was requested .*\(simulated\)"):
        ops.step(**kw, backend="cpu")


def test_info_says_why_a_backend_is_missing(no_native):
    from fastdiff.info import report

    text = report()
    assert "native module: unavailable: fastdiff._C is not importable (simulated)" in text
    assert "cpu  tensors  automatic choice: torch" in text


def test_automatic_choice_prefers_native_on_cpu():
    if backends.native()[0] is None:
        pytest.skip("fastdiff._C not built")
    assert backends.choose(torch.device("cpu")) == "cpu"


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, check=True).stdout
    for name in backends.BACKENDS:
        assert f"  {name}" in out
    assert "CUDA archs compiled" in out or "native module: unavailable" in out


@pytest.mark.parametrize("args,message", [
    (["demo", "--batch", "0"], "--batch: expected an int >= 1, got 0"),
    (["demo", "--device", "cuda:7"] if torch.cuda.is_available() else ["demo", "--device", "cuda"],
     "--device: "),
    (["demo", "--device", "tpu"], "--device: "),
])
def test_cli_errors_are_messages_not_tracebacks(args, message):
    run = subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("name", ["FastDDIMScheduler", "FastDPMSolverMultistepScheduler", "FastEulerDiscreteScheduler"])
def test_a_drop_ins_backend_reaches_its_kernels(no_native, name):
    """``scheduler.backend = "cpu"`` is the backend ``step`` runs: without the native module it raises with
    the reason (the automatic choice, torch, would have run); a name that is no backend is refused."""
    pytest.importorskip("diffusers")
    import fastdiff.integrations.diffusers as fd

    s = getattr(fd, name)()
    s.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    s.step(x, s.timesteps[0], x)  # automatic: torch serves
    s.backend = "cpu"
    assert s.backend == "cpu"
    with pytest.raises(RuntimeError, match=r"backend 'cpu' was requested .*\(simulated\)"):
        s.step(x, s.timesteps[1], x)
    with pytest.raises(ValueError, match="backend: expected None, 'cuda', 'triton', 'cpu' or 'torch', got 'gpu'"):
        s.backend = "gpu"
