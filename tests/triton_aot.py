"""Compile the `triton` backend's kernels for real GPUs (sm_80, sm_90) on a machine without one.

    python tests/triton_aot.py                      # every launch of the cases below, every autotune config
    python tests/triton_aot.py --first-config       # per launch, configs up to the first that fits (CI test)
    python tests/triton_aot.py --sm90-only          # residual_encode's sm_90-only configs (N_DT > 1, deep
                                                    # pipelines; CI test), which --first-config never reaches
    python tests/triton_aot.py --cases bench --arch 90 --jobs 16   # on the GPU machine, before the benchmarks:
                                                    # every config their autotuning will time, compiled in parallel
                                                    # into Triton's cache (benchmarks/gpu_session.sh precompile)

Under TRITON_INTERPRET=1 the kernels run as numpy, which accepts code the compiler would reject (a dot of the
wrong shape or dtype, an unsupported cast, too much shared memory) and never takes the 16-bit tensor-core path
(DOT_MODE 1: the interpreter's 16-bit tl.dot is wrong, so it casts to float32). This script runs the backend's
own host code on CPU tensors with the interpreter off and catches each kernel launch: instead of launching, it
compiles the kernel through Triton's full pipeline (TTIR, TTGIR, LLVM, PTX, ptxas to a cubin) for each target, with
the argument types, constexprs and alignment specialisation a GPU launch would have, and for every config the
autotuner would try (after its pruning). The kernels' outputs are left unwritten, which the host code tolerates.

What it proves: the kernels compile, with the GPU's code path, for every dtype and mode combination the cases
reach, and fit the registers and shared memory ptxas allows. What it cannot: that they compute the right thing on
a GPU (that is the op suite on CUDA) or how fast (benchmarks/).
Precompiling (--cases bench, --jobs N). Triton's autotuner compiles the configs of a new launch one after another,
on one core, the first time it meets the launch: on the GPU machine, minutes of device time before the benchmarks
time anything. triton.compile keys its cache (TRITON_CACHE_DIR, ~/.triton/cache) on the kernel's source, the
argument types, constexprs and specialisation, the options, the target and Triton's own build (its libtriton, so
the cache is good only for the Python and Triton it was made with: made on the GPU machine itself), which is what
a GPU launch asks it for: compiled here first, N at a time, every such launch later finds its kernels in the cache.
The bench cases run the benchmarks' own calls (benchmarks/bench_cuda.py: the step shape's residual_encode, soft and
hard, forward and backward, and contrastive_loss) on CPU tensors of their shapes and dtypes; the 50k shape and the
larger contrastive batch specialise alike (their sizes are multiples of 16) and hit the same entries.
Needs Triton's compiler internals (create_function_from_signature, and JITFunction._pack_args from triton 3.5 on, or
what the JITFunction.run of triton 3.2 and of 3.3-3.4 does in its place): triton 3.2..3.9. Triton 3.2's compiler
aborts the process on some configs (an assertion, not an exception); there each compile runs in a forked child
(--isolate), so an abort is reported as that launch's failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ((90, "sm_90"), (80, "sm_80"))


# Largest dynamic shared memory a block may take (cudaDevAttrMaxSharedMemoryPerBlockOptin): a kernel asking for more
# fails at load, and the autotuner skips such a config.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def cuobjdump(prefer_triton: bool = True) -> str | None:
    """A cuobjdump (reads cubins, needs no driver): the one Triton ships, matching its ptxas, or the toolkit's."""
    import shutil

    cands = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        cands = [bundled] + cands if prefer_triton else cands + [bundled]
    except ImportError:
        pass
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def kernel_resources(path: str, tool: str | None = None) -> dict[str, list[dict[str, int]]]:
    """{kernel name: [{REG, STACK, SHARED, LOCAL, ...} per cubin holding it]} for a cubin or a library of them."""
    import re
    import subprocess

    text = subprocess.run([tool or cuobjdump(), "-res-usage", path], capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for name, fields in re.findall(r"Function (\w+):\s*\n\s*(REG:.*)", text):
        out.setdefault(name, []).append({k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", fields)})
    return out


def _cubin_resources(cubin: bytes) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        (usage,) = kernel_resources(f.name).values()
    return usage[0]


def fits(info) -> bool:
    """Compiled, and within the largest shared memory a block may take on its arch."""
    return info is not None and info["shared"] <= MAX_SHARED.get(info["arch"], 101376)


def keeps_to_registers(info) -> bool:
    """No local memory: no spills, no stack frame."""
    return info is not None and not (info.get("STACK") or info.get("LOCAL"))


def _constexprs(fn, args) -> dict:
    return {fn.arg_names[i]: a for i, a in enumerate(args) if i < len(fn.params) and fn.params[i].is_constexpr}


# Triton's layout names: #ttg / ttng from triton 3.3 on, #triton_gpu / triton_nvidia_gpu before
_MMA_LAYOUT = re.compile(r"^(#mma\d*) = #(?:ttg|triton_gpu)\.nvidia_mma<\{(.*)\}>", re.M)
_DOT = re.compile(r"(?:tt\.dot|(?:ttng|triton_nvidia_gpu)\.warp_group_dot) [^\n]*"
                  r"-> tensor<(\d+)x(\d+)xf\d+, (#mma\d*)>")
_CONVERT = re.compile(r"(?:ttg|triton_gpu)\.convert_layout [^\n]*: tensor<(\d+)x(\d+)x\w+, (#\w+)[^\n]*-> "
                      r"tensor<\d+x\d+x\w+, (#\w+)")


def layout_findings(ttgir: str) -> dict:
    """Two things the tensor-core layouts Triton chose cost, read from a kernel's TTGIR:
    DOT_REP, the largest replication of a dot's result over the warps (a dot layout's warps cover more rows or columns
    than the tile has, and each copy computes the same MMAs: on sm_90 Triton puts every warp along M for a dot whose
    result feeds another dot, so 8 warps on a 64-row tile compute it twice); MMA_CVT, the convert_layouts of 2-D
    tensors into or out of an MMA layout inside a loop's body (an accumulator crossing shared memory each step)."""
    mma = {m.group(1): m.group(2) for m in _MMA_LAYOUT.finditer(ttgir)}
    rep = 1
    for m in _DOT.finditer(ttgir):
        rows, cols, attrs = int(m.group(1)), int(m.group(2)), mma.get(m.group(3), "")
        warps = re.search(r"warpsPerCTA = \[(\d+), (\d+)\]", attrs)
        instr = re.search(r"instrShape = \[(\d+), (\d+)", attrs)
        if warps and instr:
            version = int(re.search(r"versionMajor = (\d)", attrs).group(1))
            cover_n = int(instr.group(2)) if version == 3 else 8  # mma.sync: n8 tiles; wgmma: its instruction's N
            rep = max(rep, max(1, int(warps.group(1)) * 16 // rows) * max(1, int(warps.group(2)) * cover_n // cols))
    loops, converts = [], 0
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        if loops and indent == loops[-1] and line.lstrip().startswith("}"):
            loops.pop()
        if re.search(r"\bscf\.for\b", line) and line.rstrip().endswith("{"):
            loops.append(indent)
        elif loops and (m := _CONVERT.search(line)):
            if int(m.group(1)) > 1 and int(m.group(2)) > 1 and "#mma" in (m.group(3) + m.group(4)):
                converts += 1
    return dict(DOT_REP=rep, MMA_CVT=converts)


def _compile_one(triton_compile, source, target, options) -> dict:
    kernel = triton_compile(source, target=target, options=options.__dict__)
    return dict(shared=kernel.metadata.shared, **_cubin_resources(kernel.asm["cubin"]),
                **layout_findings(kernel.asm["ttgir"]))


def describe(info) -> str:
    """A compiled kernel's resources and layout findings, as -v prints them."""
    return (f"{info['label']}: shared={info['shared']} REG={info.get('REG')} STACK={info.get('STACK')} "
            f"LOCAL={info.get('LOCAL')} DOT_REP={info.get('DOT_REP')} MMA_CVT={info.get('MMA_CVT')}")


class CompilerCrash(RuntimeError):
    pass


_QUEUED: list = []  # Compiler.queued, read by the forked workers of run_queued
_QUEUE_ISOLATE = False  # Compiler.isolate: each worker compiles in a forked child of its own


def _compile_queued(i):
    """(resources, None) or (None, error) of queued compile i, in a worker process."""
    from triton.compiler import compile as triton_compile

    _, _, source, target, options = _QUEUED[i]
    try:
        work = lambda: _compile_one(triton_compile, source, target, options)  # noqa: E731
        return dict(arch=target.arch, **(_in_child(work) if _QUEUE_ISOLATE else work())), None
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {str(exc).strip()[:2000]}"


def _in_child(work):
    """work() in a forked child, its result (JSON) or its exception back here: a compiler that aborts (an LLVM or
    MLIR assertion; triton 3.2 has some) kills the child, which becomes a failure of that launch, not of the survey."""
    import json
    import signal
    import traceback

    if not hasattr(os, "fork"):
        return work()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            msg = {"ok": work()}
        except BaseException as exc:  # noqa: BLE001
            msg = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        try:
            with os.fdopen(w, "w") as f:
                json.dump(msg, f)
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise CompilerCrash(f"the compiler killed its process with {signal.Signals(sig).name} (an assertion in "
                            f"Triton's C++ passes; stderr above)")
    msg = json.loads(data) if data else {"error": f"child exited with status {os.WEXITSTATUS(status)}"}
    if "error" in msg:
        raise RuntimeError(msg["error"] + ("\n" + msg["trace"] if "trace" in msg else ""))
    return msg["ok"]


def _pack_args_triton33(backend, kwargs, bound, specialization, options):
    """JITFunction._pack_args (triton >= 3.5) as triton 3.3 and 3.4's JITFunction.run computes it inline: options,
    signature {name: type}, constexprs and attrs keyed by argument path."""
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    signature = dict(zip(bound.keys(), (x[0] for x in specialization)))
    for k in kwargs:
        if k not in options.__dict__ and k not in signature:
            raise KeyError(f"Keyword argument {k} was specified but unrecognised")
    sigvals = list(signature.values())
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k))
             for k in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    return options, signature, constexprs, attrs


def _pack_args_triton32(fn, backend, binder, args, kwargs):
    """(options, signature, constants, attrs) of a launch as triton 3.2's JITFunction.run builds them (it has no
    _pack_args): signature {name: type} of the non-constexpr arguments, constants {name: value} (constexprs, None
    and the arguments specialised to 1), attrs the divisibility descriptor."""
    bound, sig_and_spec, _, _, excess = binder(*args, **kwargs)
    options = backend.parse_options(kwargs)
    for k in excess:
        if k not in options.__dict__:
            raise KeyError(f"Keyword argument {k} was specified but unrecognised")
    names = [p.name for p in fn.params if not p.is_constexpr]
    signature = {k: ("*i8" if v == "none" else v) for k, v in zip(names, sig_and_spec[:len(names)])}
    values = tuple(bound.values())
    attrs = backend.get_attrs_descriptor(fn.params, values)
    specialised = attrs.get_constants()
    constants = {p.name: v for v, p in zip(values, fn.params) if p.is_constexpr or p.num in specialised or v is None}
    return options, signature, constants, attrs


class Compiler:
    """Catches JITFunction / Autotuner launches and compiles them for each target instead of running them."""

    def __init__(self, archs, first_config: bool, verbose: bool = False, isolate: bool = False,
                 sm90_only: bool = False, jobs: int = 1, queue: bool = False):
        from triton.backends.compiler import GPUTarget

        self.targets = [GPUTarget("cuda", a, 32) for a in archs]
        self.first_config = first_config
        self.sm90_only = sm90_only
        self.verbose = verbose
        self.isolate = isolate
        # queue (or jobs > 1): launches only queue their compiles (every config of an autotuned one); run_queued
        # compiles them, jobs at a time
        self.jobs = jobs
        self.queue = queue or jobs > 1
        self.queued = []  # (key, label, source, target, options)
        self.compiled = {}  # specialisation key -> dict(label, arch, shared, REG, STACK, LOCAL) or None (failed)
        self.failures = []
        self.spilling_launches = []  # autotuned launches none of whose (compiled) configs keep to registers

    def compile(self, fn, args, kwargs) -> dict:
        """Compile fn for every target: {arch: its entry in self.compiled (None if it failed)}."""
        from triton.compiler import ASTSource, make_backend
        from triton.compiler import compile as triton_compile
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        out = {}
        for target in self.targets:
            backend = make_backend(target)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            three_values = not hasattr(backend, "get_attrs_descriptor")  # triton >= 3.3: the binder's result
            if three_values:  # constexprs keyed by argument path
                bound, specialization, options = binder(*args, **kwargs)
                pack = fn._pack_args if hasattr(fn, "_pack_args") else _pack_args_triton33
                options, signature, constexprs, attrs = pack(backend, kwargs, bound, specialization, options)
                named = {fn.arg_names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
                attrs_key = repr(sorted(attrs.items()))
            else:
                options, signature, constexprs, attrs = _pack_args_triton32(fn, backend, binder, args, kwargs)
                named = {k: v for k, v in constexprs.items() if fn.params[fn.arg_names.index(k)].is_constexpr}
                attrs_key = repr(attrs.hash())
            key = (fn.__name__, target.arch, repr(signature), repr(sorted(constexprs.items())), attrs_key,
                   repr(sorted(options.__dict__.items())))
            if key not in self.compiled:
                # constexprs (passed by position or name) and launch options; then the pointer dtypes in order
                meta = dict(named)
                meta.update((k, v) for k, v in kwargs.items() if k in ("num_warps", "num_stages"))
                types = ",".join(v[1:] for v in signature.values() if v.startswith("*"))
                label = f"{fn.__name__} sm_{target.arch} {meta} [{types}]"
                if self.queue:
                    self.compiled[key] = None
                    self.queued.append((key, label, ASTSource(fn, signature, constexprs, attrs), target, options))
                    continue
                try:
                    source = ASTSource(fn, signature, constexprs, attrs)
                    info = (_in_child(lambda: _compile_one(triton_compile, source, target, options)) if self.isolate
                            else _compile_one(triton_compile, source, target, options))
                    self.compiled[key] = info = dict(label=label, arch=target.arch, **info)
                    if self.verbose:
                        print(describe(info), flush=True)
                except Exception as exc:  # noqa: BLE001  (every compiler error is a finding)
                    self.compiled[key] = None
                    self.failures.append(f"{label}\n    {type(exc).__name__}: {str(exc).strip()[:2000]}"
                                         + (f"\n    caused by {exc.__cause__!r}"[:1000] if exc.__cause__ else ""))
                    print("FAILED", self.failures[-1], flush=True)
            out[target.arch] = self.compiled[key]
        return out

    def run_queued(self) -> None:
        """Compile the queued kernels, self.jobs forked processes at a time (each writes Triton's cache)."""
        import multiprocessing

        global _QUEUED, _QUEUE_ISOLATE
        _QUEUED, _QUEUE_ISOLATE = self.queued, self.isolate  # a compiler abort must not kill a pool worker
        with multiprocessing.get_context("fork").Pool(self.jobs) as pool:
            results = pool.map(_compile_queued, range(len(self.queued)), chunksize=1)
        for (key, label, *_), (info, error) in zip(self.queued, results):
            if error is None:
                self.compiled[key] = info = dict(label=label, **info)
                if self.verbose:
                    print(describe(info), flush=True)
            else:
                self.failures.append(f"{label}\n    {error}")
                print("FAILED", self.failures[-1], flush=True)
        self.queued = []

    def install(self):
        """Replace launching by compiling: a plain launch must fit; an autotuned one needs one config that fits."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        compiler = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            if compiler.queue:
                compiler.compile(fn, args, kwargs)
                return
            for arch, info in compiler.compile(fn, args, kwargs).items():
                if not fits(info):
                    compiler.failures.append(f"{fn.__name__} sm_{arch} {kwargs}: does not fit (shared memory)")

        def autotune_run(tuner, *args, grid=None, warmup=False, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            if compiler.sm90_only:
                from dre_kernels.triton_kernels.residual_encode import sm90_only

                configs = [c for c in configs if "N_DT" in c.kwargs and sm90_only(c)]
                if not configs:
                    tuner.nargs = None
                    return
            if compiler.queue:  # every config, as the autotuner will time every one
                for config in configs:
                    compiler.compile(tuner.fn, args, {**kwargs, **config.all_kwargs()})
                tuner.nargs = None
                return
            fitting = {t.arch: False for t in compiler.targets}
            spill_free = {t.arch: False for t in compiler.targets}
            for config in configs:
                for arch, info in compiler.compile(tuner.fn, args, {**kwargs, **config.all_kwargs()}).items():
                    fitting[arch] |= fits(info)
                    spill_free[arch] |= fits(info) and keeps_to_registers(info)
                if compiler.first_config and all(fitting.values()):
                    break
            launch = f"{tuner.fn.__name__} {_constexprs(tuner.fn, args)}"
            for arch, ok in fitting.items():
                if not ok:
                    compiler.failures.append(f"{launch} sm_{arch}: no config fits the block's shared memory")
                elif not spill_free[arch] and not compiler.first_config:
                    compiler.spilling_launches.append(f"{launch} sm_{arch}")
            tuner.nargs = None

        self._launchers = (JITFunction.run, Autotuner.run)
        JITFunction.run = jit_run
        Autotuner.run = autotune_run
        # triton < 3.3 asks the GPU driver for a benchmarker when an autotuner is built, and there is none here
        build_tuner = Autotuner.__init__

        def tuner_init(tuner, *args, **kwargs):
            if kwargs.get("do_bench") is None:
                kwargs["do_bench"] = lambda *a, **k: None
            build_tuner(tuner, *args, **kwargs)

        Autotuner.__init__ = tuner_init


class _StubDriver:
    """Triton's active driver as its JIT path asks it before a launch, for a target without a GPU."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def replay_through_jit(compiler, thunks) -> tuple[int, int]:
    """Run the calls again through Triton's own launch path (JITFunction.run with warmup=True: bind, specialise,
    compile or take from the cache, no launch; the autotuner's pruned configs each so), for the compiler's single
    target, and return (kernels, misses): the kernels it asked for, and how many of them were not in
    TRITON_CACHE_DIR (a miss writes a new entry there). Zero misses: a GPU launch of these calls finds what this
    script compiled."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs  # triton >= 3.4

        cache_dir = knobs.cache.dir
    except ImportError:
        from triton.runtime.cache import default_cache_dir

        cache_dir = os.environ.get("TRITON_CACHE_DIR") or default_cache_dir()
    (target,) = compiler.targets
    jit_run, _ = compiler._launchers
    before = set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()
    asked = set()

    def warm(fn, *args, grid, warmup=False, **kwargs):
        kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
        asked.add(kernel.hash)

    def tune(tuner, *args, grid=None, warmup=False, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        for config in tuner.prune_configs(kwargs):
            tuner.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
        tuner.nargs = None

    driver.set_active(_StubDriver(target))
    JITFunction.run, Autotuner.run = warm, tune
    for _, thunk in thunks:
        thunk()
    misses = len(set(os.listdir(cache_dir)) - before)
    return len(asked), misses


def cases(first_config: bool, sm90_only: bool = False):
    """Host-side calls that reach every kernel with each mode: (name, thunk); `sm90_only`: the residual_encode
    calls whose launches may take its sm_90-only configs (bf16 and float32 rows, K=64, D=384)."""
    import torch

    from dre_kernels.triton_kernels import bank, contrastive_loss, residual_encode

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    out = []
    offsets = torch.tensor([0, 3, 3, 10])
    bank_offsets = torch.tensor([0, 5, 6, 20])
    row_dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                  (torch.bfloat16, torch.float16)]
    shapes = [(64, 384), (7, 33), (200, 16)] + ([] if first_config else [(1, 1)])
    if sm90_only:  # float32 rows take the one-warpgroup ones
        row_dtypes, shapes = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)], [(64, 384)]
    for (xd, bd), (K, D), hard in [(d, s, h) for d in row_dtypes for s in shapes for h in (False, True)]:
        if first_config and K > 64 and xd != bd:
            continue  # large codebooks (the slow compiles) once per dot mode

        x = rand(10, D, dtype=xd)
        bank_rows = rand(30, D, dtype=bd)
        index = torch.randint(0, 30, (20,), generator=g)
        cw, scale = rand(K, D), rand(K).abs()
        grad_E = rand(3, K, D)
        name = f"residual_encode K={K} D={D} x={xd} bank={bd} hard={hard}"
        out.append((name + " fwd", lambda x=x, b=bank_rows, i=index, c=cw, s=scale, h=hard:
                    residual_encode.residual_encode_fwd(x, offsets, c, s, b, i, bank_offsets, h)))
        out.append((name + " bwd", lambda x=x, b=bank_rows, i=index, c=cw, s=scale, h=hard, G=grad_E:
                    residual_encode.residual_encode_bwd(G, x, offsets, c, s, b, i, bank_offsets, h,
                                                        True, True, True)))
        if hard:  # the hard backward without the forward's mass: an argmin pass over the bank rows
            out.append((name + " bwd (no mass)", lambda x=x, b=bank_rows, i=index, c=cw, s=scale, G=grad_E:
                        residual_encode.residual_encode_bwd(G, x, offsets, c, s, b, i, bank_offsets, True,
                                                            True, True, True, mass=None)))
    if sm90_only:
        return out
    cl_dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                 (torch.bfloat16, torch.float32)]
    if contrastive_loss.F64_DOT:  # before triton 3.3 the raw ops refuse float64 (no float64 tl.dot)
        cl_dtypes.append((torch.float64, torch.float64))
    for (ad, bd), P, labelled, normalize in [(d, P, lab, nrm) for d in cl_dtypes for P in (512, 33)
                                             for lab in (False, True) for nrm in (True, False)
                                             if not first_config or (lab == nrm)]:
        B = 40
        a, b = rand(B, P, dtype=ad), rand(B, P, dtype=bd)
        s = torch.tensor(14.3)
        labels = torch.randint(0, 5, (B,), generator=g) if labelled else None
        name = f"contrastive_loss P={P} a={ad} b={bd} labels={labelled} normalize={normalize}"
        out.append((name + " fwd", lambda a=a, b=b, lab=labels, n=normalize:
                    contrastive_loss.contrastive_loss_fwd(a, b, s, lab, n)))
        out.append((name + " bwd", lambda a=a, b=b, lab=labels, n=normalize:
                    contrastive_loss.contrastive_loss_bwd(torch.ones(B, dtype=torch.float64 if a.dtype ==
                                                                     torch.float64 else torch.float32),
                                                          a, b, s, lab, n, *[torch.zeros(B)] * 4)))
    for dtype, D in [(d, D) for d in (torch.float32, torch.bfloat16, torch.float16) for D in (384, 33, 4096)]:
        bank_rows = rand(50, D, dtype=dtype)
        index = torch.randperm(50, generator=g)[:9]
        values = rand(9, D)
        out.append((f"bank_gather D={D} {dtype}", lambda b=bank_rows, i=index: bank.bank_gather(b, i)))
        for normalize in (False, True):
            out.append((f"bank_update_ D={D} {dtype} normalize={normalize}",
                        lambda b=bank_rows, i=index, v=values, n=normalize: bank.bank_update_(b, i, v, 0.9, n)))
    return out


def bench_cases():
    """The benchmarks' own triton calls (benchmarks/bench_cuda.py) at the step shape, on CPU tensors: (name, thunk).
    The public API takes triton on CPU only under the interpreter; its gate is opened here, so that the calls take
    the GPU's host path (autograd, the forward's mass into the hard backward) with the interpreter off."""
    import torch

    from benchmarks.bench_cuda import _contrastive_fn, _residual_fn, shape_inputs
    from dre_kernels import _backend

    _backend._triton_interpret = lambda: True
    cpu = torch.device("cpu")
    inputs, _ = shape_inputs("step", cpu)
    out = [(f"bench residual_encode {'hard' if hard else 'soft'} {mode}", _residual_fn("triton", inputs, mode, hard))
           for hard in (False, True) for mode in ("fwd", "fwd+bwd")]
    out += [(f"bench contrastive_loss {mode}", _contrastive_fn("triton", 16384, 512, mode, cpu))
            for mode in ("fwd", "fwd+bwd")]
    out.append(("bench training step (benchmarks/bench_step.py)", lambda: _training_step_calls(inputs)))
    return out


def _training_step_calls(inputs):
    """The dre calls of benchmarks/bench_step.py's step (its dtypes: float32 tile features, codewords and
    embeddings, the bf16 bank), at its default shape, which is bench_cuda's step shape."""
    import torch

    import dre_kernels

    x, x_off, c, s, bank, bank_index, bank_offsets = inputs
    B, (K, D), P = x_off.numel() - 1, c.shape, 512
    x, c, s = (t.float().detach().requires_grad_() for t in (x, c, s))
    E = dre_kernels.residual_encode(x, x_off, c, s, bank=bank, bank_index=bank_index, bank_offsets=bank_offsets,
                                    backend="triton")
    slide = E.flatten(1) @ torch.randn(K * D, P)
    loss = dre_kernels.contrastive_loss(slide, torch.randn(B, P), torch.tensor(14.3, requires_grad=True),
                                        normalize=True, backend="triton")
    loss.backward()
    dre_kernels.bank_update_(bank, bank_index[:x.shape[0]], x.detach(), momentum=0.0, backend="triton")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-config", action="store_true",
                        help="per autotuned launch, compile configs only up to the first that fits every target")
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each compiled kernel")
    parser.add_argument("--sm90-only", action="store_true",
                        help="only residual_encode's configs for 16-bit rows on sm_90 (N_DT > 1 column tiles per "
                             "program, or num_stages > DEEP_STAGES)")
    parser.add_argument("--isolate", action="store_true",
                        help="compile each kernel in a forked process, so that a compiler abort is reported as that "
                             "launch's failure (on by default for triton < 3.3, whose compiler aborts on some configs; "
                             "~1.5x slower)")
    parser.add_argument("--cases", choices=["tiny", "bench"], default="tiny",
                        help="tiny: every kernel in every mode on small shapes (the default); bench: the benchmarks' "
                             "calls (precompiling them on the GPU machine, with --jobs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compile this many kernels at a time, in forked processes, after the calls have run")
    parser.add_argument("--verify-cache", action="store_true",
                        help="after compiling, run the calls again through Triton's own launch path (a stub driver for "
                             "the one --arch) and count the kernels it does not find in Triton's cache (exit status)")
    parser.add_argument("--only", help="only the cases whose name contains this")
    parser.add_argument("--list", action="store_true",
                        help="print the kernels (one line each) that the calls would compile, and compile none")
    args = parser.parse_args(argv)
    if args.verify_cache and (args.first_config or args.sm90_only or len(args.arch or []) != 1):
        parser.error("--verify-cache compiles what the autotuner times (no --first-config or --sm90-only), for one "
                     "--arch")
    os.environ["TRITON_INTERPRET"] = "0"  # before dre_kernels is imported: its kernels must be JITFunctions
    # launches must go through the autotuner, which this script replaces by compiling its configs (with autotuning
    # off each launch would compile its first config only, and --sm90-only nothing)
    os.environ["DRE_KERNELS_TRITON_AUTOTUNE"] = "1"
    sys.path.insert(0, os.path.dirname(HERE))
    from dre_kernels.triton_kernels._common import TRITON_VERSION

    compiler = Compiler(args.arch or [a for a, _ in TARGETS], args.first_config, args.verbose,
                        args.isolate or TRITON_VERSION < (3, 3), args.sm90_only, max(1, args.jobs), args.list)
    compiler.install()
    t0 = time.time()
    host_errors = []
    calls = bench_cases() if args.cases == "bench" else cases(args.first_config, args.sm90_only)
    calls = [(name, thunk) for name, thunk in calls if args.only is None or args.only in name]
    for name, thunk in calls:
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001
            host_errors.append(f"{name}: {type(exc).__name__}: {exc}")
    if args.list:
        for _, label, *_ in compiler.queued:
            print("would compile", label)
        print(f"{len(compiler.queued)} kernels to compile; {len(host_errors)} host errors")
        for f in host_errors:
            print("FAILED", f)
        return min(100, len(host_errors))
    if compiler.queued:
        compiler.run_queued()
    done = [c for c in compiler.compiled.values() if c]
    spilling = [c for c in done if not keeps_to_registers(c)]
    too_big = [c for c in done if not fits(c)]
    replicated = [c for c in done if c.get("DOT_REP", 1) > 1]
    converting = [c for c in done if c.get("MMA_CVT", 0) > 0]
    print(f"compiled {len(done)} kernel specialisations in {time.time() - t0:.0f} s; {len(compiler.failures)} "
          f"failures; {len(host_errors)} host errors; {len(spilling)} spill to local memory; {len(too_big)} "
          f"autotune configs over the block's shared memory (skipped by the autotuner); {len(replicated)} with a "
          f"dot replicated over warps (DOT_REP > 1), {len(converting)} with MMA-layout conversions in a loop")
    for c in spilling:
        print(f"  spills LOCAL={c.get('LOCAL')} STACK={c.get('STACK')} REG={c.get('REG')}: {c['label']}")
    if not args.first_config:
        print(f"{len(compiler.spilling_launches)} autotuned launches with no config that keeps to registers:")
        for launch in compiler.spilling_launches:
            print("  ", launch)
    for f in compiler.failures + host_errors:
        print("FAILED", f)
    misses = 0
    if args.verify_cache and not host_errors:
        kernels, misses = replay_through_jit(compiler, calls)
        print(f"verify-cache: Triton's launch path asked for {kernels} kernels, {misses} not in its cache")
    return min(100, len(compiler.failures) + len(host_errors) + misses)


if __name__ == "__main__":
    sys.exit(main())
