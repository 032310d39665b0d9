# make test   - create .venv with the pinned stack, build the extension, run the whole suite
# make demo   - the end-to-end demo: synthetic slides -> tile -> bank init -> train on CPU -> eval (demo_out/)
# make demo-ops - run every op on every available backend and print error against `reference` and time
# make build  - (re)build dre_kernels._C into the source tree (editable install)
# make test-gpu-stack - the kernel suite against the GPU image's torch/triton (requirements/gpu-image.txt), in a
#                copy of the working tree (build/gpu-stack/) so that the editable build here is left alone
# make bench / bench-quick / bench-step - the benchmark suite (benchmarks/bench.mk)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MAX_JOBS ?= 2
export MAX_JOBS
PYTEST_ARGS ?= -q

.PHONY: venv build test test-gpu-stack demo demo-ops clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/ci.txt
	touch $@

build: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

GPU_STACK_VENV ?= .venv-gpu-stack
GPU_STACK_SRC := build/gpu-stack
# the op suite and the kernel tests; the dre_slcl tests need timm and OpenSlide, absent from the GPU image too
GPU_STACK_TESTS := tests/test_ops_residual_encode.py tests/test_ops_contrastive_loss.py tests/test_ops_bank.py \
	tests/test_ops_kmeans.py tests/test_library.py tests/test_errors.py tests/test_runtime_checks.py \
	tests/test_native_cpu.py tests/test_native_value_checks.py tests/test_cuda.py tests/test_triton.py \
	tests/test_triton_compile.py tests/test_fuzz_ops.py

$(GPU_STACK_VENV)/.installed: requirements/gpu-image.txt
	$(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/pip install -q --upgrade pip
	$(GPU_STACK_VENV)/bin/pip install -q -r requirements/gpu-image.txt
	touch $@

test-gpu-stack: $(GPU_STACK_VENV)/.installed
	rm -rf $(GPU_STACK_SRC) && mkdir -p $(GPU_STACK_SRC)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(GPU_STACK_SRC)
	cd $(GPU_STACK_SRC) && DRE_KERNELS_CUDA_ARCHS=$${DRE_KERNELS_CUDA_ARCHS:-90} \
		$(abspath $(GPU_STACK_VENV))/bin/pip install -q --no-build-isolation --no-deps -e .
	cd $(GPU_STACK_SRC) && PYTHONPATH=python $(abspath $(GPU_STACK_VENV))/bin/python -m pytest $(GPU_STACK_TESTS) \
		-W ignore::DeprecationWarning $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/dre-slcl demo demo_out

demo-ops: build
	$(PY) -m dre_kernels.demo

clean:
	rm -rf build *.egg-info dre_kernels/_C*.so .pytest_cache demo_out

include benchmarks/bench.mk
