# The README's two set-up commands: `make demo` and `make test`. Both create .venv when needed (seeing an
# already installed torch through --system-site-packages; else torch==2.13.0) and install fastdiff.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BUILD_DEPS := "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.24" ninja
NATIVE := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test test-cuda-emulated info bench wheel gpu-wheels clean

demo: $(VENV)/.demo
	$(PY) -m fastdiff demo

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# The test suite again with the CUDA kernels' code run on the host (no GPU needed; docs/architecture.md).
test-cuda-emulated: $(VENV)/.test
	bash .ci/cuda_emulated

info: $(VENV)/.demo
	$(PY) -m fastdiff info

bench: $(VENV)/.test
	$(PY) bench/bench_ddim.py
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_multistep.py

wheel: $(VENV)/.tools
	$(PY) -m pip wheel --no-deps -w dist .

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first (an installed one is kept) and the build tools; then fastdiff itself, which builds fastdiff._C.
$(VENV)/.tools: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(BUILD_DEPS)
	touch $@

$(VENV)/.demo: $(VENV)/.tools $(NATIVE)
	$(PY) -m pip install -q --no-build-isolation -e ".[demo]"
	touch $@

# k-diffusion is the oracle of the k-diffusion API: installed without its dependencies (they pull
# torchvision and a CUDA torch); fastdiff/kdiffusion_oracle.py loads k_diffusion.sampling alone.
KDIFFUSION := k-diffusion==0.1.1.post1 torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2

$(VENV)/.test: $(VENV)/.tools $(NATIVE)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps $(KDIFFUSION)
	touch $@

# The pure-Python wheels the lent GPU machine lacks (it has no internet), for .ci/gpu: carry .whl.
gpu-wheels: $(VENV)/.tools
	$(PY) -m pip download -q --no-deps -d .whl diffusers==0.42.1 importlib_metadata $(KDIFFUSION)

clean:
	rm -rf build dist *.egg-info fastdiff/_C*.so demo_out
