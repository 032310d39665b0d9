# make test   - create .venv with the pinned stack, build the extension, run the whole suite
# make demo   - the end-to-end demo: synthetic slides -> tile -> bank init -> train on CPU -> eval (demo_out/)
# make demo-ops - run every op on every available backend and print error against `reference` and time
# make build  - (re)build dre_kernels._C into the source tree (editable install)
# make bench / bench-quick / bench-step - the benchmark suite (benchmarks/bench.mk)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MAX_JOBS ?= 2
export MAX_JOBS
PYTEST_ARGS ?= -q

.PHONY: venv build test demo demo-ops clean

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

demo: build
	$(VENV)/bin/dre-slcl demo demo_out

demo-ops: build
	$(PY) -m dre_kernels.demo

clean:
	rm -rf build *.egg-info dre_kernels/_C*.so .pytest_cache demo_out

include benchmarks/bench.mk
