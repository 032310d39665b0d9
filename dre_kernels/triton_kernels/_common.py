"""Helpers shared by the Triton kernels: interpreter detection, autotune bypass, split-precision dots.

Precision of tl.dot. Rows stored in bf16/fp16 go to the tensor cores as they are (exact in their own dtype); the
fp32 operand they meet (codewords, assignments, gradients) is split into hi + lo parts of the same 16-bit dtype,
so that  p @ q  ~=  p @ q_hi + p @ q_lo  with ~16 mantissa bits for q and float32 accumulation: two MMAs instead
of float32 FMA loops, and accurate enough that hard (argmin) assignments agree with the float32 reference except
on genuine near-ties. Rows stored in float32 use tl.dot with input_precision="tf32x3" (three TF32 MMAs, ~fp32).

Under TRITON_INTERPRET=1 a 16-bit tl.dot gives garbage (triton 3.9), so there every operand is cast to float32
first (DOT_MODE 0), and autotuning is bypassed for one fixed config per shape (autotune in the interpreter is slow).
"""

from __future__ import annotations

import functools
import inspect
import os
import re

import torch
import triton
import triton.language as tl

from dre_kernels._gpu_host import next_pow2  # noqa: F401  (shared with the cupy backend)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_VERSION = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
# tl.dot takes float64 operands from triton 3.3 on
F64_DOT = TRITON_VERSION >= (3, 3)


# The interpreter multiplies with numpy, which has no bfloat16 (its bfloat16 tl.dot is wrong), so it takes float32
# dots for every dtype. Its float16 tl.dot is exact (float32 accumulation), so tests can set this to run float16
# rows through the GPU's 16-bit mode (MODE 1: the hi/lo splits, exact 16-bit products) on CPU.
INTERPRET_FLOAT16_DOTS = False


def dot_mode(dtype: torch.dtype) -> int:
    """0: float32 dots (tf32x3 on GPU); 1: 16-bit rows, fp32 operand split into hi + lo."""
    if dtype == torch.float32 or (INTERPRET and not (INTERPRET_FLOAT16_DOTS and dtype == torch.float16)):
        return 0
    return 1


def dot_mode_backward(dtype: torch.dtype, hard: bool = False) -> int:
    """dot_mode for the backward's products with G = dL/dE and h: float16 rows take float32 dots (tf32x3) there,
    since gradients far below float16's normal range (6e-5) would lose their bits when split into float16 parts;
    bfloat16 has float32's range. A hard backward has no such products, only the distances of its argmin, which
    must be the forward's: the forward's mode."""
    return 0 if dtype == torch.float16 and not hard else dot_mode(dtype)


def launch_arg(named_args: dict, kwargs: dict, name: str, default=None):
    """An argument of the launch being autotuned, as an early_config_prune sees it (positional or keyword)."""
    return kwargs.get(name, named_args.get(name, default))


class LazyAutotune:
    """triton.autotune(configs, **kwargs)(kernel), built at the first GPU launch. Built at import, the autotuner of
    triton < 3.3 asks for the active GPU driver and raises where there is none ("0 active drivers"), which made
    `import dre_kernels` fail on a CPU machine; triton >= 3.3 asks later."""

    def __init__(self, kernel, configs, **kwargs):
        self.kernel, self.configs, self.kwargs = kernel, configs, kwargs
        self._tuned = None

    def get(self):
        if self._tuned is None:
            tuned = triton.autotune(self.configs, **self.kwargs)(self.kernel)
            # the version's benchmarker, looked up when it first times a config (from triton 3.4 a cached_property
            # that asks the active driver; up to 3.3 an attribute): not here, where a stub driver may stand in
            lookup = inspect.getattr_static(type(tuned), "do_bench", None)
            if isinstance(lookup, functools.cached_property):
                resolve = functools.partial(lookup.func, tuned)
            else:  # set by the autotuner's __init__
                bench = tuned.do_bench
                resolve = lambda: bench  # noqa: E731
            tuned.do_bench = compile_failures_lose(resolve, self.kernel.__name__)
            self._tuned = tuned
        return self._tuned


def is_compile_failure(exc: BaseException) -> bool:
    """Whether exc is Triton failing to compile a kernel: a front-end error, or one of its MLIR passes failing
    (RuntimeError "PassManager::run failed": triton 3.3, on sm_90, for configs that 3.2 and 3.4 compile)."""
    from triton.compiler.errors import CompilationError

    return isinstance(exc, CompilationError) or (isinstance(exc, RuntimeError)
                                                 and "PassManager::run failed" in str(exc))


def compile_failures_lose(resolve_bench, kernel_name: str):
    """An autotuner's benchmark function (resolve_bench() returns the one it wraps) for which a config that fails to
    compile is the slowest (inf) instead of an error: Triton's autotuner passes over configs that run out of shared
    memory or registers, not those its compiler refuses, and one such config would make every first call of its
    shape raise. Warns with the config's error."""
    import warnings

    def run(kernel_call, quantiles):
        try:
            return resolve_bench()(kernel_call, quantiles=quantiles)
        except Exception as exc:  # noqa: BLE001 - filtered below; anything else is raised as it was
            if not is_compile_failure(exc):
                raise
            warnings.warn(f"dre_kernels: a config of {kernel_name} does not compile with triton {triton.__version__} "
                          f"here ({(str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]}); the autotuner "
                          "passes over it", RuntimeWarning, stacklevel=2)
            return [float("inf")] * len(quantiles)
    return run


# DRE_KERNELS_TRITON_AUTOTUNE=0: on GPU each launch takes the first config of its table that the pruning keeps,
# without timing any (a new shape costs one compile instead of one per config: for fuzzing many shapes, or where a
# first call must be quick). Read at each launch.
AUTOTUNE_ENV = "DRE_KERNELS_TRITON_AUTOTUNE"


def autotuning() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip() not in ("0", "false", "off", "no")


def default_config(tuned: LazyAutotune, kernel, args, options):
    """The config a launch takes without autotuning: the first of its table that the autotuner's pruning keeps."""
    configs = tuned.configs
    prune = tuned.kwargs.get("prune_configs_by", {}).get("early_config_prune")
    if prune is not None:
        configs = prune(configs, dict(zip(kernel.arg_names, args)), **options)
    return configs[0]


# Each autotuning that launch() ran, in order: dict(kernel, key (the tuning key's arguments and the first tensor's
# dtype), timings {config: median ms}, best config). The benchmarks write it out: which configs win on a GPU, at
# no device time of its own. Bounded, as a process that meets many shapes tunes once per shape.
AUTOTUNE_LOG: list[dict] = []
AUTOTUNE_LOG_MAX = 1000


def _log_tuning(kernel, tuner, args, timings):
    named = dict(zip(kernel.arg_names, args))
    key = {k: named.get(k) for k in getattr(tuner, "keys", ())}
    key["dtype"] = next((str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)), None)
    ms = {c: (float(t[0]) if isinstance(t, (list, tuple)) else float(t)) for c, t in timings.items()}
    if len(AUTOTUNE_LOG) < AUTOTUNE_LOG_MAX:
        AUTOTUNE_LOG.append(dict(kernel=kernel.__name__, key=key, timings=ms, best=min(ms, key=ms.get)))


def launch(kernel, tuned: LazyAutotune, grid, args, interp_meta: dict, **options):
    """Run the autotuned kernel on GPU (its default config when autotuning is off), the plain one with a fixed
    config under the interpreter; options: compile options of the launch (enable_fp_fusion)."""
    if INTERPRET:
        g = grid(interp_meta) if callable(grid) else grid
        kernel[g](*args, **interp_meta, **options)
    elif not autotuning():
        config = default_config(tuned, kernel, args, options)
        meta = config.all_kwargs()
        kernel[grid(meta) if callable(grid) else grid](*args, **meta, **options)
    else:
        tuner = tuned.get()
        before = getattr(tuner, "configs_timings", None)
        tuner[grid](*args, **options)
        timings = getattr(tuner, "configs_timings", None)
        if timings is not None and timings is not before:  # this launch tuned (a new key, more than one config)
            _log_tuning(kernel, tuner, args, timings)


@triton.jit
def dot_pair(p1, q1, p2, q2, acc, input_precision: tl.constexpr = None):
    """acc + p1 @ q1 + p2 @ q2 as one tl.dot over the two products' K dimensions interleaved ([p1 | p2] @ [q1; q2],
    column 2k + j of the left operand meeting row 2k + j of the right). Why one dot: on sm_90 a dot whose result
    feeds another dot (two chained as acc = dot(p2, q2, dot(p1, q1, acc))) takes Triton's chained-dot warp layout,
    all warps along M, and the next one does not: with 8 warps a 64-row tile is then computed twice, once per
    warpgroup, and the accumulator crosses shared memory twice per call to change layout."""
    p = tl.reshape(tl.join(p1, p2), (p1.shape[0], 2 * p1.shape[1]))
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (2 * q1.shape[0], q1.shape[1]))
    if input_precision is None:
        return tl.dot(p, q, acc)
    return tl.dot(p, q, acc, input_precision=input_precision)


@triton.jit
def mm_fr(p, q, acc, MODE: tl.constexpr, EXACT_P: tl.constexpr):
    """acc + p @ q where p is float32 (split unless EXACT_P: representable in q's dtype, e.g. 0/1) and q rows."""
    if MODE == 1:
        p_hi = p.to(q.dtype)
        if EXACT_P:
            acc = tl.dot(p_hi, q, acc)
        else:
            acc = dot_pair(p_hi, q, (p - p_hi.to(tl.float32)).to(q.dtype), q, acc)
    else:
        acc = tl.dot(p, q.to(tl.float32), acc, input_precision="tf32x3")
    return acc
