"""The `cupy` backend compiles csrc/cuda/*.cu at run time with NVRTC, which has no host headers. This compiles every
kernel source with the NVRTC library itself (found in the nvidia-cuda-nvrtc wheel torch brings, or the toolkit), as
cupy.RawModule does, for sm_80 and sm_90, so a source that only nvcc accepts fails here, on the CPU machine.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "cuda")


def _find_nvrtc():
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p] + sys.path
    cands = []
    for r in roots:
        cands += glob.glob(os.path.join(r, "nvidia", "*", "lib", "libnvrtc.so*"))
        cands += glob.glob(os.path.join(r, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cands += glob.glob(os.path.join(home, "lib*", "libnvrtc.so*"))
    for c in sorted(set(cands)):
        if "builtins" in os.path.basename(c):
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (torch CPU build without nvidia wheels)")


def nvrtc_compile(path: str, arch: str) -> tuple[int, str, str]:
    """(nvrtcResult, log, PTX) of compiling one source as cupy.RawModule(code, ("-std=c++17", "-I<src>")) would."""
    lib = NVRTC
    prog = ctypes.c_void_p()
    code = open(path, "rb").read()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code, os.path.basename(path).encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram failed: {rc}"
    opts = [b"-std=c++17", f"-I{SRC}".encode(), f"--gpu-architecture=compute_{arch}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        ptx = ""
        if rc == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
            out = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetPTX(prog, out)
            ptx = out.value.decode(errors="replace")
        return rc, log, ptx
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", sorted(os.path.basename(p) for p in glob.glob(os.path.join(SRC, "*.cu"))))
def test_nvrtc_compiles_kernel_source(source, arch):
    from dre_kernels import cupy_kernels

    rc, log, ptx = nvrtc_compile(os.path.join(SRC, source), arch)
    assert rc == 0, f"NVRTC failed on {source} for compute_{arch}:\n{log}"
    # every kernel the cupy backend launches from this file is in the PTX under its extern "C" name
    for name, fname in cupy_kernels.KERNEL_FILES.items():
        if fname == source:
            assert f".entry {name}(" in ptx, name
    if source == "residual_encode.cu":
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx


def test_nvrtc_reports_a_broken_source(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('#include "dre_common.cuh"\nextern "C" __global__ void k(float* p) { p[0] = undefined_name; }\n')
    rc, log, _ = nvrtc_compile(str(bad), "80")
    assert rc != 0 and "undefined_name" in log
