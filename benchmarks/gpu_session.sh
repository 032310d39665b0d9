#!/usr/bin/env bash
# GPU validation in as few device minutes as possible, on a machine with a CUDA GPU and torch already installed
# (the device tool's image: Python 3.12, torch 2.11, triton 3.6, cupy-cuda13x, nvcc 13.0, no network).
#
#   bash benchmarks/gpu_session.sh build    # compile the extension for this GPU's arch only (~1-2 min on 16 cores)
#   bash benchmarks/gpu_session.sh tests    # build + the op suite on CUDA (native, triton, cupy) + test_cuda.py
#   bash benchmarks/gpu_session.sh fuzz     # build + tests/fuzz_ops.py for native, triton, cupy (FUZZ_SECONDS each)
#   bash benchmarks/gpu_session.sh sanitize # build + compute-sanitizer memcheck, then racecheck, over test_cuda.py's
#                                           #   CUDA tests (SANITIZE_TESTS to change): on the hardware, what the
#                                           #   interpreter's memcheck and the emulator's ASan and TSan check on CPU
#   bash benchmarks/gpu_session.sh bench    # build + bench_cuda.py (torch, torch.compile, triton, native, cupy,
#                                           #   native_simt, cupy_simt, native_tiled, cupy_tiled) + the training
#                                           #   step; CSVs to $OUT, with cuda_autotune.csv and
#                                           #   step/step_autotune.csv: every Triton config the autotuner timed
#   bash benchmarks/gpu_session.sh bench-cuda | bench-step   # one part of bench, where one call cannot hold both
#                                           #   (BENCH_ARGS="--quick" or "--providers torch native" for less)
#   bash benchmarks/gpu_session.sh profile  # build + profile_kernels.py: each call's kernels, host time and syncs
#                                           #   (PROFILE_ARGS="--shape 50k" or "--providers triton" to narrow it)
#   bash benchmarks/gpu_session.sh ncu      # build + ncu_kernels.py: Nsight Compute's counters of each case's kernels
#                                           #   (DRAM, occupancy, tensor pipes, stall reasons, most sampled SASS
#                                           #   lines) to $OUT/ncu/ncu.md; NCU_ARGS="--cases triton:soft:fwd" for less
#   bash benchmarks/gpu_session.sh all      # tests, then bench
# bench*, profile, ncu and all first precompile the benchmarks' Triton kernels on every core (precompile below).
#
# Before spending device time: `make test-gpu-stack` on a CPU machine runs the kernel tests against this image's
# torch 2.11 / triton 3.6 (interpreter, emulator, the CUDA build and Triton's sm_80/sm_90 compile).
#
# Everything it prints also goes to $OUT (default gpu_out/): build.log, tests.log, bench_*.log and the CSVs, so a
# run cut off at its time limit still returns what it had. Each stage must fit one 10-minute device call; run
# `tests` and `bench` as separate calls if needed (the build is cached in build/ only within one machine).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# the repository root too: without an editable install (PREBUILT) the scripts under tests/ find the package there
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:python${PYTHONPATH:+:$PYTHONPATH}"
# Triton's compiled kernels under build/ (ignored), which a warm machine keeps from one call to the next
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
stage=${1:-all}

build() {
  if [ -z "${DRE_KERNELS_CUDA_ARCHS:-}" ]; then
    DRE_KERNELS_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
    export DRE_KERNELS_CUDA_ARCHS
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/build.log"
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/build.log"
  # PREBUILT=path/to/_C.abi3.so: an extension built elsewhere against this image's torch (make test-gpu-stack builds
  # one for sm_90 in build/gpu-stack/; carry it with the call) saves the build's minute or two of device time; it is
  # used only if the CUDA impls load from it, else the sources are built here as usual.
  if [ -n "${PREBUILT:-}" ] && [ -f "$PREBUILT" ] && cp "$PREBUILT" dre_kernels/_C.abi3.so \
    && $PY -c "import sys, dre_kernels as d; sys.exit('native' not in d.available_backends('cuda'))" >>"$OUT/build.log" 2>&1; then
    echo "using the prebuilt extension $PREBUILT" | tee -a "$OUT/build.log"
  else
    rm -f dre_kernels/_C.abi3.so
    MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . -q >>"$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; exit 1; }
  fi
  $PY -c "import dre_kernels as d; print('available', d.available_backends('cuda')); print('unavailable', d.unavailable_backends('cuda'))" \
    | tee -a "$OUT/build.log"
}

precompile() {
  # Every Triton kernel and config the benchmarks' autotuning will time, compiled into TRITON_CACHE_DIR on all cores
  # (tests/triton_aot.py --cases bench: the benchmarks' own calls on CPU tensors, for this GPU's arch), where the
  # autotuner would compile them one at a time on one core (~150 kernels at the step shape, ~2 s each); then
  # --verify-cache counts the kernels Triton's launch path would not find there. An optimisation only: if it fails,
  # the autotuner compiles as it goes.
  local arch rc
  arch=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())") || return 0
  mkdir -p build
  $PY tests/triton_aot.py --cases bench --arch "$arch" --jobs "$(nproc)" --verify-cache >build/precompile.log 2>&1
  rc=$?
  grep -E "^(compiled|FAILED|verify-cache)" build/precompile.log | tee -a "$OUT/build.log"
  [ "$rc" -eq 0 ] || echo "precompile: exit status $rc (whatever did not compile compiles on first use)" | tee -a "$OUT/build.log"
  return 0
}

tests() {
  # The op suite runs every available backend on CPU and CUDA; the data/trainer tests need OpenSlide, absent there.
  # Workers (pytest-xdist, in the image) compile Triton kernels and torch.compile graphs in parallel; a per-test
  # time limit (pytest-timeout) keeps one hang from eating the call. PYTEST_ARGS="-m cuda" keeps to the CUDA tests
  # of the op suite and test_cuda.py.
  local par=()
  if $PY -c "import xdist" 2>/dev/null; then par+=(-n "${PYTEST_WORKERS:-8}"); fi
  if $PY -c "import pytest_timeout" 2>/dev/null; then par+=(--timeout "${PYTEST_TIMEOUT:-300}"); fi
  $PY -m pytest tests/test_cuda.py tests/test_ops_residual_encode.py tests/test_ops_contrastive_loss.py \
    tests/test_ops_bank.py tests/test_ops_kmeans.py tests/test_library.py tests/test_errors.py \
    tests/test_runtime_checks.py tests/test_triton.py \
    ${par[@]+"${par[@]}"} -q -p no:cacheprovider -rfE --durations=15 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -60
}

fuzz() {
  # the random sweep against reference (tests/fuzz_ops.py) on the real kernels, FUZZ_SECONDS per backend
  local b
  for b in native triton cupy; do
    $PY tests/fuzz_ops.py --backend "$b" --device cuda --seconds "${FUZZ_SECONDS:-60}" 2>&1 | tee -a "$OUT/fuzz.log" | tail -20
  done
}

sanitize() {
  # memcheck: every global access in bounds, no misaligned or uninitialised read; racecheck: shared-memory hazards
  local cs tool
  cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ ! -x "$cs" ]; then echo "compute-sanitizer not found" | tee "$OUT/sanitize.log"; return 1; fi
  for tool in memcheck racecheck; do
    # shellcheck disable=SC2086  # SANITIZE_TESTS is a list of pytest arguments
    "$cs" --tool "$tool" --error-exitcode 99 --target-processes all \
      $PY -m pytest ${SANITIZE_TESTS:-tests/test_cuda.py -m cuda} -q -p no:cacheprovider -x -rfE 2>&1 \
      | tee "$OUT/sanitize_$tool.log" | tail -30
  done
}

bench_cuda() { $PY benchmarks/bench_cuda.py --out "$OUT/cuda.csv" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cuda.log"; }
bench_step() { $PY -m benchmarks.bench_step --out "$OUT/step" 2>&1 | tee "$OUT/bench_step.log"; }
profile() { $PY benchmarks/profile_kernels.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.txt"; }
# the .ncu-rep reports stay in build/ (megabytes each): $OUT gets the CSVs, the logs and ncu.md
ncu_counters() {
  $PY benchmarks/ncu_kernels.py --out "$OUT/ncu" --reports build/ncu --source ${NCU_ARGS:-} 2>&1 | tee "$OUT/ncu.log" | tail -80
}

case "$stage" in
  build) build ;;
  tests) build && tests ;;
  fuzz) build && fuzz ;;
  sanitize) build && sanitize ;;
  bench) build && precompile && bench_cuda && bench_step ;;
  bench-cuda) build && precompile && bench_cuda ;;
  bench-step) build && precompile && bench_step ;;
  profile) build && precompile && profile ;;
  ncu) build && precompile && ncu_counters ;;
  precompile) build && precompile ;;
  all) build && tests && precompile && bench_cuda && bench_step ;;
  *) echo "usage: $0 build|tests|fuzz|sanitize|bench|bench-cuda|bench-step|profile|ncu|precompile|all" >&2; exit 2 ;;
esac
