"""Build the CPU emulation of csrc/cuda/*.cu (see emu.h) as a shared library with one C entry per kernel.

For every `DRE_GLOBAL void NAME(PARAMS)` in the sources, `emu_NAME(unsigned grid, unsigned smem, PARAMS)` runs the
kernel over `grid` blocks of 256 emulated threads. `load()` returns (ctypes library, {kernel name: ctypes arg types}).

DRE_CUDA_EMU_SANITIZE=address or =thread builds it with a sanitizer, for a process started with that sanitizer's
runtime preloaded (`sanitizer_env(kind)`):
- address (AddressSanitizer): every global-memory access of a kernel stays inside the tensor it reads or writes, and
  every shared-memory access inside the launch's dynamic shared memory (its exact size: no guard floats) or the static
  __shared__ arrays, or the process stops with ASan's report. A fault of that kind on a GPU loses the CUDA context.
- thread (ThreadSanitizer): no two emulated threads of a block touch one location, one of them writing, without a
  __syncthreads (or the warp barrier of a shuffle, mma or ldmatrix) between them, or the process stops with TSan's
  report. On a GPU that is a race on shared or global memory: a missing __syncthreads, or a warp assumed to run in
  lock-step (not so since Volta). TSan sees the emulator's barriers, so it checks the kernels' synchronisation,
  whatever order the threads happen to run in.
DRE_CUDA_EMU_BLOCK_ORDER=reverse runs a launch's blocks last to first: on a GPU they run in any order, or at once,
so a kernel whose block reads what another block writes gives another result (the emulator runs them one by one).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import re
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc", "cuda")

_CTYPES = {"int": ctypes.c_int, "i64": ctypes.c_int64, "float": ctypes.c_float, "double": ctypes.c_double}


def kernel_signatures(src_dir: str = SRC) -> dict[str, list[tuple[str, str]]]:
    """kernel name -> [(C type, parameter name)] for every DRE_GLOBAL kernel of the .cu files."""
    out = {}
    for path in sorted(glob.glob(os.path.join(src_dir, "*.cu"))):
        text = open(path).read()
        for m in re.finditer(r"DRE_GLOBAL\s+void\s+(?:DRE_MIN_BLOCKS\(\d+\)\s+)?(\w+)\s*\(([^)]*)\)", text):
            params = []
            for p in m.group(2).split(","):
                p = " ".join(p.split())
                typ, name = p.rsplit(" ", 1)
                if name.startswith("*"):
                    typ, name = typ + "*", name[1:]
                params.append((typ.replace(" *", "*"), name))
            out[m.group(1)] = params
    return out


def _ctype(typ: str):
    if typ.endswith("*"):
        return ctypes.c_void_p
    return _CTYPES[typ.replace("const ", "")]


# per sanitizer: its runtime library, compile flags and options (a report names the source line and stops the run)
SANITIZERS = {
    # _GLIBCXX_SANITIZE_VECTOR: the shared-memory buffer is a std::vector whose capacity may outlast a larger launch
    "address": ("libasan.so", ["-fsanitize=address", "-fno-omit-frame-pointer", "-D_GLIBCXX_SANITIZE_VECTOR"],
                # leak checks off: Python and torch keep memory to exit
                {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1:detect_container_overflow=1"}),
    "thread": ("libtsan.so", ["-fsanitize=thread"],
               # torch's OpenMP threads synchronise in uninstrumented libgomp, which TSan cannot see (reports on
               # torch's own copies): one torch thread. Signal-unsafe calls are Python's business, not the kernels'
               {"TSAN_OPTIONS": "halt_on_error=1:abort_on_error=0:report_signal_unsafe=0:exitcode=66",
                "OMP_NUM_THREADS": "1"}),
}


def sanitizer_runtime(kind: str) -> str | None:
    """The compiler's runtime of sanitizer `kind` (libasan.so, libtsan.so), or None where it has none."""
    try:
        out = subprocess.run(["g++", f"-print-file-name={SANITIZERS[kind][0]}"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def sanitizer_env(kind: str, env=None) -> dict:
    """Environment for a child process whose emulator is built and run under sanitizer `kind` (see the module
    docstring): the runtime preloaded and its options set."""
    env = dict(os.environ if env is None else env)
    env.update(DRE_CUDA_EMU_SANITIZE=kind, LD_PRELOAD=sanitizer_runtime(kind), **SANITIZERS[kind][2])
    return env


def _sanitizer_flags() -> list[str]:
    kind = os.environ.get("DRE_CUDA_EMU_SANITIZE", "")
    if kind and kind not in SANITIZERS:
        raise ValueError(f"DRE_CUDA_EMU_SANITIZE must be one of {sorted(SANITIZERS)} or unset, not {kind!r}")
    return SANITIZERS[kind][1] if kind else []


def blocks_reversed() -> bool:
    order = os.environ.get("DRE_CUDA_EMU_BLOCK_ORDER", "forward")
    if order not in ("forward", "reverse"):
        raise ValueError(f"DRE_CUDA_EMU_BLOCK_ORDER must be forward or reverse, not {order!r}")
    return order == "reverse"


def load():
    sigs = kernel_signatures()
    sources = sorted(glob.glob(os.path.join(SRC, "*.cu")) + glob.glob(os.path.join(SRC, "*.cuh")) +
                     [os.path.join(HERE, "emu.h")])
    lines = ['#include "%s"' % p for p in sorted(glob.glob(os.path.join(SRC, "*.cu")))]
    for name, params in sigs.items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        args = ", ".join(n for _, n in params)
        lines.append(f'extern "C" void emu_{name}(unsigned grid, unsigned smem, {decl}) '
                     f'{{ dre_emu::launch(grid, smem, [&] {{ {name}({args}); }}); }}')
    lines.append('extern "C" void emu_set_cp_async_immediate(int on) { dre_emu::cp_async_immediate = on != 0; }')
    lines.append('extern "C" void emu_set_blocks_reversed(int on) { dre_emu::blocks_reversed = on != 0; }')
    code = "\n".join(lines) + "\n"
    flags = _sanitizer_flags()
    h = hashlib.sha1((code + " ".join(flags)).encode())
    for p in sources:
        h.update(open(p, "rb").read())
    build = os.path.join(tempfile.gettempdir(), f"dre_cuda_emu_{h.hexdigest()[:16]}")
    so = os.path.join(build, "emu.so")
    if not os.path.exists(so):
        os.makedirs(build, exist_ok=True)
        cpp = os.path.join(build, "emu.cpp")
        with open(cpp, "w") as f:
            f.write(code)
        subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-ffp-contract=off", "-shared", "-fPIC", "-pthread",
                        *flags, "-DDRE_CUDA_EMULATE", "-include", os.path.join(HERE, "emu.h"), "-I", SRC,
                        cpp, "-o", so + ".tmp"], check=True, capture_output=False)
        os.replace(so + ".tmp", so)
    lib = ctypes.CDLL(so)
    types = {}
    for name, params in sigs.items():
        fn = getattr(lib, "emu_" + name)
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [_ctype(t) for t, _ in params]
        fn.restype = None
        types[name] = [t for t, _ in params]
    return lib, types


class EmuRuntime:
    """A dre_kernels.cupy_kernels runtime that runs the kernels in the CPU emulation (tensors on the CPU)."""

    def __init__(self):
        self.lib, self.types = load()
        self.launches = []
        self.use_tensor_cores = False  # tests switch the mma.sync kernels on (emulated per the PTX fragment layout)

        self.optin = 232448  # the H100's dynamic shared memory opt-in limit per block (A100: 166912)
        self.lib.emu_set_cp_async_immediate.argtypes = [ctypes.c_int]
        self.set_cp_async_immediate(False)
        self.lib.emu_set_blocks_reversed.argtypes = [ctypes.c_int]
        self.lib.emu_set_blocks_reversed(int(blocks_reversed()))

    def set_cp_async_immediate(self, on: bool) -> None:
        """cp.async copies land at issue (True) or at the wait that covers them (False, the default): emu.h."""
        self.lib.emu_set_cp_async_immediate(int(on))

    @contextlib.contextmanager
    def cp_async_order(self, copies: str):
        """Within the block, cp.async copies land "at_issue" or "at_wait" (then back to at_wait, the default)."""
        assert copies in ("at_issue", "at_wait"), copies
        self.set_cp_async_immediate(copies == "at_issue")
        try:
            yield
        finally:
            self.set_cp_async_immediate(False)

    def tensor_cores(self, device) -> bool:
        return self.use_tensor_cores

    def smem_optin(self, device) -> int:
        return self.optin

    def launch(self, name, grid, smem, device, args):
        assert device.type == "cpu", device
        self.launches.append((name, int(grid), int(smem)))
        getattr(self.lib, "emu_" + name)(int(grid), int(smem), *args)
