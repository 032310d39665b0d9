"""The `triton` backend's kernels compile for sm_80 and sm_90, with the GPU's code path, on a machine with no GPU.

The op suite runs the kernels under TRITON_INTERPRET=1 here, which never compiles them and never takes the 16-bit
tensor-core path (DOT_MODE 1); tests/triton_aot.py runs the backend's host code with the interpreter off and
compiles every launch it reaches (each dtype and mode combination, autotuned configs up to the first that fits the
block's shared memory) through Triton's whole pipeline down to a cubin, and checks the shared memory a block takes.
One subprocess per arch, side by side (CI has two cores).
"""

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiler_available() -> str | None:
    """None when this Triton can compile for NVIDIA targets without a GPU the way triton_aot.py does, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"triton's compiler internals differ from those triton_aot.py uses: {exc}"
    if not hasattr(JITFunction, "_pack_args"):  # triton < 3.5: triton_aot.py packs the arguments as its run() does
        try:
            from triton._utils import find_paths_if, get_iterable_path  # noqa: F401  (3.3, 3.4)
        except ImportError:
            from triton.backends.nvidia.compiler import CUDABackend
            if not hasattr(CUDABackend, "get_attrs_descriptor"):  # 3.2
                return f"triton {triton.__version__} has neither JITFunction._pack_args nor get_attrs_descriptor"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "triton ships no ptxas here"
    return None


def _aot_env(**extra) -> dict:
    """The environment of a triton_aot.py run: the interpreter off, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run_aot(*args, **extra_env) -> tuple[str, int]:
    """(output, exit status) of tests/triton_aot.py with args; skips where Triton cannot compile that way here."""
    reason = _compiler_available()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py"), *args], capture_output=True,
                          text=True, env=_aot_env(**extra_env))
    return proc.stdout + proc.stderr, proc.returncode


def _launches(out: str, pattern: str):
    """(line, groups) for each compiled launch that triton_aot.py -v printed and `pattern` matches."""
    return [(line, m.groups()) for line in out.splitlines() if (m := re.match(pattern, line))]


def test_triton_kernels_compile_for_sm80_and_sm90():
    reason = _compiler_available()
    if reason:
        pytest.skip(reason)
    procs = {arch: subprocess.Popen([sys.executable, os.path.join(HERE, "triton_aot.py"), "--first-config",
                                     "-v", "--arch", str(arch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=_aot_env())
             for arch in (80, 90)}
    results = {arch: (p.communicate()[0], p.returncode) for arch, p in procs.items()}
    for arch, (out, rc) in results.items():
        summary = [line for line in out.splitlines() if line.startswith("compiled ")]
        assert rc == 0 and summary, f"sm_{arch}:\n{out[-6000:]}"
        # every kernel was reached (a launch path that raised before compiling would show as a host error)
        for kernel in ("_re_fwd_kernel", "_re_bwd_kernel", "_cl_fwd_kernel", "_cl_finish_kernel", "_cl_bwd_kernel",
                       "_cl_norms_kernel", "_cl_normalize_bwd_kernel", "_gather_kernel", "_update_kernel"):
            assert kernel in out, f"sm_{arch}: {kernel} was never compiled\n{out[-3000:]}"
        # the contrastive launches share one BLOCK_P per dot mode: a saturated loss's zero gradient needs the
        # backward's logits to be the forward's to the bit, and a tf32x3 dot rounds by where the P slices end
        from dre_kernels.triton_kernels.contrastive_loss import BLOCK_P_BY_MODE

        seen = set()
        for line, (kernel, mode, block_p) in _launches(
                out, r"(_cl_\w+_kernel) sm_\d+ .*'MODE': (\d), .*'BLOCK_P': (\d+)"):
            assert int(block_p) == BLOCK_P_BY_MODE[int(mode)], f"sm_{arch}: {line}"
            seen.add((kernel, int(mode)))
        assert {(k, mode) for k in ("_cl_fwd_kernel", "_cl_finish_kernel", "_cl_bwd_kernel")
                for mode in (0, 1)} <= seen, f"sm_{arch}: contrastive launches compiled: {sorted(seen)}"
        # hard residual_encode: the backward's argmin must be the forward's, so both take the rows' dot mode
        # (float32 rows: 0, 16-bit: 1) and one BLOCK_D
        from dre_kernels.triton_kernels.residual_encode import HARD_BLOCK_D

        seen = set()
        for line, (kernel, mode, block_d, rows) in _launches(
                out, r"(_re_\w+_kernel) sm_\d+ .*'HARD': True, .*'MODE': (\d), .*'BLOCK_D': (\d+), .*\[(\w+),"):
            assert int(block_d) == HARD_BLOCK_D and int(mode) == (0 if rows == "fp32" else 1), f"sm_{arch}: {line}"
            seen.add((kernel, rows))
        assert {(k, rows) for k in ("_re_fwd_kernel", "_re_bwd_kernel")
                for rows in ("fp32", "bf16", "fp16")} <= seen, f"sm_{arch}: hard launches compiled: {sorted(seen)}"
        if arch == 90:
            if _layouts_clean_here():
                _assert_tensor_core_layouts_clean(out, r"(_re_fwd_kernel|_re_bwd_kernel) sm_90 "
                                                       r"(?!.*'WRITE_GX': True).*'MODE': 1, 'K_PAD': 64, ")
            if _triton_version() >= (3, 5):
                # triton 3.2-3.4 convert the a-side backward's accumulator in every config (MMA_CVT 1-2; surveyed)
                _assert_tensor_core_layouts_clean(out, r"_cl_\w+_kernel sm_90 .*'MODE': 1, .*\[bf16,bf16,")


def _triton_version():
    from dre_kernels.triton_kernels._common import TRITON_VERSION

    return TRITON_VERSION


def _layouts_clean_here() -> bool:
    """Whether this Triton keeps residual_encode's tensor-core accumulators in their layout on sm_90 (3.3 on; 3.2
    converts them in every loop, MMA_CVT=1, which no config avoids: the library offers it no sm_90-only configs)."""
    from dre_kernels.triton_kernels import residual_encode as tre

    return _triton_version() >= tre.SM90_CONFIGS_MIN_TRITON


def _assert_tensor_core_layouts_clean(out: str, pattern: str) -> None:
    """Every launch -v printed that `pattern` matches (at least one) has DOT_REP=1 and MMA_CVT=0 (triton_aot's
    layout_findings): no dot computed twice by two warpgroups, no accumulator crossing shared memory each loop step.
    Both came from pairs of chained dots (the hi and lo parts of a split operand) before dot_pair made each pair one
    dot; the H100 sweep's fastest forward config was a 4-warp one, without them (0.45 ms against 1.09 for the
    autotuned 8-warp one, with them)."""
    launches = _launches(out, pattern + r".*DOT_REP=(\d+) MMA_CVT=(\d+)$")
    assert launches, f"no launch matches {pattern!r}\n{out[-3000:]}"
    bad = [line for line, groups in launches if groups[-2:] != ("1", "0")]
    assert not bad, "\n".join(bad)


def test_sm90_only_residual_encode_configs_compile_for_sm90():
    """The configs for sm_90 only, that --first-config never reaches: for 16-bit rows, N_DT > 1 (several column tiles
    per program) and deep pipelines (num_stages > DEEP_STAGES); for rows of any dtype, one warpgroup (4 warps).
    Every one compiles, for bf16 and float32 rows, for the forward (soft and hard, fresh and gathered rows) and for
    the backward's soft pass that only sums, with no dot computed twice and no accumulator changing layout in a
    loop. (The interpreter took a loop-carried name of two types that the compiler refuses.)"""
    if not _layouts_clean_here():
        pytest.skip("the library offers this Triton no sm_90-only configs (residual_encode.SM90_CONFIGS_MIN_TRITON)")
    # --jobs 2: the compiles queued and run in forked workers, as the GPU session's precompile runs them
    out, rc = _run_aot("--sm90-only", "-v", "--arch", "90", "--jobs", "2")
    assert rc == 0 and "compiled " in out, out[-6000:]
    _assert_tensor_core_layouts_clean(out, r"_re_\w+_kernel sm_90 ")
    from dre_kernels.triton_kernels import residual_encode as tre

    seen = {groups for _, groups in _launches(
        out, r"(_re_\w+_kernel) sm_90 .*'HARD': (\w+), 'GATHER': (\w+), .*'BLOCK_M': (\d+), 'BLOCK_D': (\d+), "
             r"'BLOCK_DO': (\d+), 'N_DT': (\d+), 'FLATTEN': \w+, 'num_warps': (\d+), 'num_stages': (\d+)")}

    def compiled(kernel, hard, gather=None):
        return {tuple(int(v) for v in rest) for k, h, g, *rest in seen
                if k == kernel and h == hard and (gather is None or g == gather)}

    for hard in (False, True):
        for gather in ("False", "True"):
            assert compiled("_re_fwd_kernel", str(hard), gather) == _offered_sm90_only(tre._FWD_CONFIGS, hard), \
                out[-3000:]
    assert compiled("_re_bwd_kernel", "False") == _offered_sm90_only(tre._BWD_CONFIGS), out[-3000:]
    # only the backward's soft passes that only sum take them
    assert not compiled("_re_bwd_kernel", "True"), out[-3000:]
    # and the flattened twins of those that pipeline (see _as_configs)
    flat = set(re.findall(r"(_re_\w+_kernel) sm_90 .*'FLATTEN': True", out))
    assert flat == {"_re_fwd_kernel", "_re_bwd_kernel"}, out[-3000:]


def _offered_sm90_only(table, hard=False):
    """The sm_90-only residual_encode configs of a table (small codebooks) that this Triton is offered for 16-bit
    rows: none before SM90_CONFIGS_MIN_TRITON, and not those its compiler refuses."""
    from dre_kernels.triton_kernels import residual_encode as tre

    if tre.TRITON_VERSION < tre.SM90_CONFIGS_MIN_TRITON:
        return set()
    return {tre._config_tuple(c) for c in tre._as_configs(table["small_k"])
            if tre.sm90_only(c) and (not hard or c.kwargs["BLOCK_D"] == tre.HARD_BLOCK_D)
            and not tre.refused_by_compiler(c, True, True)}


def test_bench_cases_reach_every_kernel_the_benchmarks_autotune():
    """The GPU session's precompile (tests/triton_aot.py --cases bench) runs the benchmarks' own calls on CPU tensors
    and queues every kernel and config a GPU launch of them would compile: the residual_encode forward of fresh and
    gathered rows, soft and hard, bf16 (tensor cores, with the sm_90-only configs) and float32 (the training step's
    features), its backward, contrastive_loss and bank_update_. Listed, not compiled (--list: seconds)."""
    out, rc = _run_aot("--cases", "bench", "--arch", "90", "--list")
    assert rc == 0 and "0 host errors" in out, out[-6000:]
    from dre_kernels.triton_kernels import residual_encode as tre

    fwd = {groups for _, groups in _launches(
        out, r"would compile _re_fwd_kernel sm_90 .*'HARD': (\w+), 'GATHER': (\w+), 'WITH_E': True, 'MODE': (\d), "
             r".*'BLOCK_M': (\d+), 'BLOCK_D': (\d+), 'BLOCK_DO': (\d+), 'N_DT': (\d+), 'FLATTEN': \w+, "
             r"'num_warps': (\d+), 'num_stages': (\d+)")}
    for hard in ("False", "True"):
        for gather in ("False", "True"):
            configs = {tuple(int(v) for v in rest) for h, g, mode, *rest in fwd if (h, g, mode) == (hard, gather, "1")}
            # bf16 rows at K=64, D=384 on sm_90: the sm_90-only configs among the ones the autotuner times
            assert _offered_sm90_only(tre._FWD_CONFIGS, hard == "True") <= configs
    assert any(mode == "0" and g == "False" for _, g, mode, *_ in fwd), "no float32 fresh rows (the training step)"
    kernels = set(re.findall(r"would compile (\w+) sm_90", out))
    assert {"_re_bwd_kernel", "_prep_transposed_kernel", "_finish_codeword_grads_kernel", "_cl_fwd_kernel",
            "_cl_bwd_kernel", "_update_kernel"} <= kernels, sorted(kernels)
    assert "WRITE_GX': True" in out and "WRITE_GX': False" in out


def test_precompiled_kernels_are_the_ones_a_launch_finds(tmp_path):
    """What tests/triton_aot.py compiles (the GPU session's precompile, in forked workers) is what Triton's own launch
    path then asks its cache for: the same key from the same specialisation, options and target. --verify-cache
    replays the calls through JITFunction.run (a stub driver for sm_90, warmup: no launch) and counts the kernels
    not found. Without the compile first, every one would be a miss (and the precompile would save nothing)."""
    out, rc = _run_aot("--arch", "90", "--jobs", "2", "--verify-cache", "--only",
                       "K=7 D=33 x=torch.float32 bank=torch.float32 hard=False fwd",
                       TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    m = re.search(r"verify-cache: Triton's launch path asked for (\d+) kernels, (\d+) not in its cache", out)
    assert rc == 0 and m, out[-6000:]
    # the prep kernel and the forward's autotuned launches (fresh and bank rows), each of its configs
    assert int(m.group(1)) >= 3 and int(m.group(2)) == 0, out[-3000:]
