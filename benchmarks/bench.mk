# Benchmark targets, included from the Makefile (which defines PY and build).
#   make bench        the default sweep for the device present (GPU: full sizes; CPU: reduced, ~15-25 min on 2 cores)
#                     plus the end-to-end training-step benchmark; results in benchmarks/results/<device>/
#   make bench-quick  the one-minute subset (small shapes) of the op sweep
#   make bench-step   only the training-step benchmark
# BENCH_ARGS is passed to benchmarks/run.py (e.g. BENCH_ARGS="--ops residual_encode_soft --threads 1").
BENCH_ARGS ?=
STEP_ARGS ?=

.PHONY: bench bench-quick bench-step

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.bench_step $(STEP_ARGS)

bench-quick: build
	$(PY) -m benchmarks.run --quick $(BENCH_ARGS)

bench-step: build
	$(PY) -m benchmarks.bench_step $(STEP_ARGS)
