#!/usr/bin/env bash
# GPU validation in as few device minutes as possible, on a machine with a CUDA GPU and torch already installed
# (the device tool's image: Python 3.12, torch 2.11, triton 3.6, cupy-cuda13x, nvcc 13.0, no network).
#
#   bash benchmarks/gpu_session.sh build    # compile the extension for this GPU's arch only (~1-2 min on 16 cores)
#   bash benchmarks/gpu_session.sh tests    # build + the op suite on CUDA (native, triton, cupy) + test_cuda.py
#   bash benchmarks/gpu_session.sh bench    # build + bench_cuda.py (torch, torch.compile, triton, native, cupy,
#                                           #   native_simt) + bench_triton.py + the training step; CSVs to results/
#   bash benchmarks/gpu_session.sh all      # tests, then bench
#
# Everything it prints also goes to $OUT (default gpu_out/): build.log, tests.log, bench_*.log and the CSVs, so a
# run cut off at its time limit still returns what it had. Each stage must fit one 10-minute device call; run
# `tests` and `bench` as separate calls if needed (the build is cached in build/ only within one machine).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="python${PYTHONPATH:+:$PYTHONPATH}"
stage=${1:-all}

build() {
  if [ -z "${DRE_KERNELS_CUDA_ARCHS:-}" ]; then
    DRE_KERNELS_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    export DRE_KERNELS_CUDA_ARCHS
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/build.log"
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/build.log"
  MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . -q >>"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  $PY -c "import dre_kernels as d; print('available', d.available_backends('cuda')); print('unavailable', d.unavailable_backends('cuda'))" \
    | tee -a "$OUT/build.log"
}

tests() {
  # the op suite runs every available backend on CUDA; the data/trainer tests need OpenSlide, absent there
  $PY -m pytest tests/test_cuda.py tests/test_ops_residual_encode.py tests/test_ops_contrastive_loss.py \
    tests/test_ops_bank.py tests/test_ops_kmeans.py tests/test_library.py tests/test_errors.py \
    tests/test_runtime_checks.py tests/test_triton.py \
    -q -p no:cacheprovider -rfE --durations=15 2>&1 | tee "$OUT/tests.log" | tail -60
}

bench() {
  $PY benchmarks/bench_cuda.py --out "$OUT/cuda.csv" 2>&1 | tee "$OUT/bench_cuda.log"
  $PY benchmarks/bench_triton.py --out "$OUT/triton.csv" 2>&1 | tee "$OUT/bench_triton.log"
  $PY -m benchmarks.bench_step --out "$OUT/step" 2>&1 | tee "$OUT/bench_step.log"
}

case "$stage" in
  build) build ;;
  tests) build && tests ;;
  bench) build && bench ;;
  all) build && tests && bench ;;
  *) echo "usage: $0 build|tests|bench|all" >&2; exit 2 ;;
esac
