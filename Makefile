# make test   - create .venv with the pinned stack, build the extension, run the whole suite
# make demo   - the end-to-end demo: synthetic slides -> tile -> bank init -> train on CPU -> eval (demo_out/)
# make demo-ops - run every op on every available backend and print error against `reference` and time
# make build  - (re)build dre_kernels._C into the source tree (editable install)
# make test-gpu-stack - the kernel suite against the GPU image's torch/triton (requirements/gpu-image.txt), in a
#                copy of the working tree (build/gpu-stack/) so that the editable build here is left alone
# make test-floor-stack - the same against the oldest supported stack (requirements/floor.txt: torch 2.6, triton 3.2)
# make bench / bench-quick / bench-step - the benchmark suite (benchmarks/bench.mk)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MAX_JOBS ?= 2
export MAX_JOBS
PYTEST_ARGS ?= -q

.PHONY: venv build test test-gpu-stack test-floor-stack demo demo-ops clean

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
FLOOR_STACK_VENV ?= .venv-floor-stack
# the op suite and the kernel tests; the dre_slcl tests need timm and OpenSlide, absent from the GPU image too
STACK_TESTS := tests/test_ops_residual_encode.py tests/test_ops_contrastive_loss.py tests/test_ops_bank.py \
	tests/test_ops_kmeans.py tests/test_library.py tests/test_errors.py tests/test_runtime_checks.py \
	tests/test_native_cpu.py tests/test_native_value_checks.py tests/test_cuda.py tests/test_triton.py \
	tests/test_triton_compile.py tests/test_triton_memcheck.py tests/test_fuzz_ops.py

$(GPU_STACK_VENV)/.installed: requirements/gpu-image.txt
$(FLOOR_STACK_VENV)/.installed: requirements/floor.txt
$(GPU_STACK_VENV)/.installed: STACK_PYTHON := $(PYTHON)
# the oldest Python too where there is one: FLOOR_PYTHON=python3.10
$(FLOOR_STACK_VENV)/.installed: STACK_PYTHON := $(or $(FLOOR_PYTHON),$(PYTHON))
$(GPU_STACK_VENV)/.installed $(FLOOR_STACK_VENV)/.installed:
	$(STACK_PYTHON) -m venv $(dir $@)
	$(dir $@)bin/pip install -q --upgrade pip
	$(dir $@)bin/pip install -q -r $<
	touch $@

# $(call test_stack,VENV,SRC,BUILD_ENV): copy the working tree to SRC, build it there with VENV's torch, run the
# kernel suite
define test_stack
	rm -rf $(2) && mkdir -p $(2)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(2)
	cd $(2) && $(3) $(abspath $(1))/bin/pip install -q --no-build-isolation --no-deps -e .
	cd $(2) && PYTHONPATH=python $(abspath $(1))/bin/python -m pytest $(STACK_TESTS) \
		-W ignore::DeprecationWarning $(PYTEST_ARGS)
endef

test-gpu-stack: $(GPU_STACK_VENV)/.installed
	$(call test_stack,$(GPU_STACK_VENV),build/gpu-stack,DRE_KERNELS_CUDA_ARCHS=$${DRE_KERNELS_CUDA_ARCHS:-90})

# torch 2.6's CUDA 12 build refuses this machine's nvcc 13: the CPU extension only (the Triton kernels still
# compile for sm_80/sm_90 in tests/test_triton_compile.py)
test-floor-stack: $(FLOOR_STACK_VENV)/.installed
	$(call test_stack,$(FLOOR_STACK_VENV),build/floor-stack,DRE_KERNELS_SKIP_CUDA=1)

demo: build
	$(VENV)/bin/dre-slcl demo demo_out

demo-ops: build
	$(PY) -m dre_kernels.demo

clean:
	rm -rf build *.egg-info dre_kernels/_C*.so .pytest_cache demo_out

include benchmarks/bench.mk
