"""The CUDA kernels (csrc/cuda): what can be checked without a GPU, and GPU-only cases.

Without a GPU: the .cu sources include no torch (nor any) header; every launcher declared in launchers.h is defined;
every kernel is launched by a launcher and known to the cupy backend; NVRTC (the compiler CuPy uses) compiles the
sources for sm_80 and sm_90; the sources are found at run time, from a checkout and from an installed package; the
extension built here registers a CUDA kernel for every dre op when it was built with CUDA and still imports and runs
on CPU. The kernels themselves run in a CPU emulation (tests/cuda_emu: 256 std::threads per block, barriers,
emulated shuffles and atomics) driven by the cupy backend's host code (dre_kernels.cupy_kernels) on CPU tensors,
against the reference backend: the indexing, the split of long slides across blocks, the atomics, the tiles.

With a GPU (marked `cuda`): long slides split across blocks, K=256, D=4096, mixed dtypes, and the contrastive loss
at a B where B x B would not fit, on `native` and `cupy` when available (the shared suite covers the rest).
"""

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import dre_kernels
from conftest import assert_close, make_offsets
from dre_kernels import _gpu_host, _library, cupy_kernels
from dre_kernels.bank import bank_update_reference_
from dre_kernels.contrastive_loss import contrastive_loss_reference
from dre_kernels.residual_encode import residual_encode_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")
sys.path.insert(0, os.path.join(ROOT, "tests", "cuda_emu"))


def _cu_files():
    return sorted(glob.glob(os.path.join(CUDA_SRC, "*.cu")))


def _kernel_sources():
    return _cu_files() + sorted(glob.glob(os.path.join(CUDA_SRC, "*.cuh")))


# ---------------------------------------------------------------------------------------------- sources, no GPU
def test_cuda_sources_exist():
    names = {os.path.basename(p) for p in _cu_files()}
    assert {"residual_encode.cu", "contrastive_loss.cu", "bank.cu"} <= names


@pytest.mark.parametrize("path", _kernel_sources(), ids=os.path.basename)
def test_kernel_sources_include_no_torch_or_system_header(path):
    text = open(path).read()
    code = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))
    assert not re.search(r"\b(torch|ATen|c10|at::|std::)\b", code), f"{path} uses torch or the C++ library"
    # NVRTC has no host headers: the only includes are our own, and launchers.h only outside NVRTC builds
    includes = re.findall(r'#include\s+[<"]([^>"]+)[>"]', text)
    assert set(includes) <= {"dre_common.cuh", "launchers.h"}, includes
    if "launchers.h" in includes:
        guard = text.index("#if !defined(__CUDACC_RTC__) && !defined(DRE_CUDA_EMULATE)")
        assert guard < text.index('#include "launchers.h"')


def _declared_launchers():
    text = open(os.path.join(CUDA_SRC, "launchers.h")).read()
    return re.findall(r"cudaError_t\s+(\w+)\s*\(", text)


def test_every_declared_launcher_is_defined_once():
    declared = _declared_launchers()
    # re_fwd, re_bwd_soft, cl_bwd and their tensor-core variants, re_fwd_tc_full, re_bwd_tc_full, cl_norms, cl_fwd,
    # cl_finish, cl_normalize_bwd, bank x2
    assert len(declared) == 14
    bodies = "".join(open(p).read() for p in _cu_files())
    for name in declared:
        defs = re.findall(r"cudaError_t\s+" + name + r"\s*\([^;{]*\)\s*\{", bodies)
        assert len(defs) == 1, f"launcher {name} is defined {len(defs)} times"


def test_every_kernel_is_launched_and_known_to_cupy():
    from build import kernel_signatures

    sigs = kernel_signatures(CUDA_SRC)
    assert set(sigs) == set(cupy_kernels.KERNEL_FILES)
    for name, file in cupy_kernels.KERNEL_FILES.items():
        text = open(os.path.join(CUDA_SRC, file)).read()
        assert re.search(rf"DRE_GLOBAL void (DRE_MIN_BLOCKS\(\d+\) )?{name}\(", text), name
        assert f"{name}<<<" in text, f"{name} has no host launcher"


def test_glue_calls_every_launcher():
    glue = "".join(open(p).read() for p in glob.glob(os.path.join(CUDA_SRC, "*.cpp")))
    assert "TORCH_LIBRARY_IMPL(dre, CUDA" in glue
    for name in _declared_launchers():
        # called, or passed to a helper that calls it (the contrastive backward's two launchers share one)
        assert re.search(rf"dre_cuda_launch::{name}\s*[(,)]", glue), f"the host glue never calls {name}"
    for op in _library.SCHEMAS:
        assert f'm.impl("{op}"' in glue, f"the host glue does not register {op}"


def _nvrtc():
    cands = []
    for site in sys.path:
        cands += glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libnvrtc.so*"))
        cands += glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands += glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))
    for c in cands:
        if "builtins" in c:
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_the_sources(arch):
    """What the cupy backend does at run time: NVRTC, with only the source directory as include path."""
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (nvidia-cuda-nvrtc wheel or CUDA_HOME/lib64)")
    src_dir = cupy_kernels.source_dir()
    for f in sorted(set(cupy_kernels.KERNEL_FILES.values())):
        prog = ctypes.c_void_p()
        code = open(os.path.join(src_dir, f), "rb").read()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, f.encode(), 0, None, None) == 0
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", f"-I{src_dir}".encode()]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(max(n.value, 1))
        lib.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if rc == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
            buf = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.value
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        assert rc == 0, f"NVRTC failed on {f}:\n{log.value.decode()}"
        for name, fname in cupy_kernels.KERNEL_FILES.items():  # every kernel cupy launches, under its C name
            if fname == f:
                assert f".entry {name}(".encode() in ptx, name
        if f == "residual_encode.cu":  # the tensor-core kernels' mma.sync, both 16-bit input types
            assert b"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
            assert b"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx


def test_launch_rules_match_the_cupy_mirror(tmp_path, monkeypatch):
    """csrc/cuda/launch_rules.h (the native glue's rules) and their Python copy for the cupy backend agree: the
    header compiled on the host prints its configs for every K and a sweep of D, and the chunk sizes."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    Ds = [1, 7, 8, 16, 33, 64, 96, 128, 200, 384, 1000, 4096]
    rows = [0, 1, 255, 1000, 40_000, 131_072, 800_000, 5_000_000]
    sms = [1, 4, 108, 132]
    (tmp_path / "rules.cpp").write_text(f"""
#include <cstdio>
#include "cuda/launch_rules.h"
using namespace dre_cuda_rules;
int main() {{
  const int Ds[] = {{{", ".join(map(str, Ds))}}};
  const long long rows[] = {{{", ".join(map(str, rows))}}};
  const int sms[] = {{{", ".join(map(str, sms))}}};
  for (int K = 1; K <= 256; ++K)
    for (int D : Ds)
      for (int bw = 0; bw < 2; ++bw) {{
        const ReConfig s = re_simt_config(K, D, bw), t = re_tc_config(K, D, bw);
        std::printf("re %d %d %d %d %d %u %d %d %d %u\\n", K, D, bw, s.R, s.DO, s.smem, t.R, t.DO, t.DT, t.smem);
      }}
  const long long optins[] = {{49152, 101376, 166912, 232448}};
  for (int K = 1; K <= 256; ++K)
    for (int D : Ds)
      for (long long o : optins)
        for (int bw = 0; bw < 2; ++bw) {{
          const ReFullConfig f = re_tc_full_config(K, D, o, bw);
          std::printf("full %d %d %lld %d %d %d %u %d\\n", K, D, o, bw, f.R, f.nbuf, f.smem, f.DTS);
        }}
  for (long long n : rows)
    for (int m : sms) {{
      std::printf("chunk %lld %d %lld\\n", n, m, (long long)chunk_rows(n, m));
      for (int R = 16; R <= 64; R += 16) std::printf("span %lld %d %d %lld\\n", n, m, R, (long long)re_full_block_rows(n, R, m));
    }}
}}
""")
    exe = tmp_path / "rules"
    res = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{os.path.join(ROOT, 'csrc')}", str(tmp_path / "rules.cpp"),
                          "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    n_re = n_full = n_span = 0
    for line in lines:
        kind, *v = line.split()
        v = [int(t) for t in v]
        if kind == "re":
            K, D, bw, sR, sDO, ssmem, tR, tDO, tDT, tsmem = v
            assert cupy_kernels.re_config(K, D, bool(bw)) == (sR, sDO, ssmem), (K, D, bw)
            tc = cupy_kernels.re_tc_config(K, D, bool(bw))
            assert tc == ((tR, tDO, tDT, tsmem) if tDT else None), (K, D, bw)
            n_re += 1
        elif kind == "full":
            K, D, optin, bw, R, nbuf, smem, dts = v
            got = cupy_kernels.re_tc_full_config(K, D, optin, bool(bw))
            assert got == ((R, nbuf, smem) if R else None), (K, D, optin, bw)
            assert dts == (cupy_kernels.re_full_slice_cols(D) if R and bw else 0), (K, D, optin, bw)
            n_full += 1
        elif kind == "span":
            n, m, R, span = v
            assert cupy_kernels.re_full_block_rows(n, R, m) == span, (n, m, R)
            assert span % R == 0 and span >= R and -(-n // span) <= m, (n, m, R, span)
            n_span += 1
        else:
            n, m, chunk = v
            monkeypatch.setattr(_gpu_host, "num_sms", lambda device, m=m: m)
            assert _gpu_host.default_chunk_rows(n, torch.device("cuda")) == chunk, (n, m)
    assert n_re == 256 * len(Ds) * 2 and n_full == 256 * len(Ds) * 4 * 2 and n_span == len(rows) * len(sms) * 4


def test_source_dir_from_checkout_and_env(tmp_path, monkeypatch):
    assert os.path.samefile(cupy_kernels.source_dir(), CUDA_SRC) or os.path.isdir(
        os.path.join(os.path.dirname(cupy_kernels.__file__), "csrc_cuda"))
    for p in _kernel_sources():
        shutil.copy(p, tmp_path)
    monkeypatch.setenv("DRE_KERNELS_CUDA_SRC", str(tmp_path))
    assert cupy_kernels.source_dir() == str(tmp_path)


def test_build_py_copies_sources_into_the_package(tmp_path):
    """`pip install .` runs build_py: the wheel must carry dre_kernels/csrc_cuda/*.cu for the cupy backend."""
    env = dict(os.environ, DRE_KERNELS_SKIP_EXTENSION="1")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    copied = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "dre_kernels" / "csrc_cuda" / "*")))
    assert {"residual_encode.cu", "contrastive_loss.cu", "bank.cu", "dre_common.cuh"} <= set(copied)
    assert os.path.isfile(tmp_path / "dre_kernels" / "cupy_kernels.py")


def test_cupy_unavailable_reason():
    why = dre_kernels.unavailable_backends("cuda").get("cupy")
    if why is None:
        assert torch.cuda.is_available()
    else:
        assert any(w in why for w in ("cupy package is not installed", "no CUDA GPU", "CUDA tensors only"))
    assert "cupy" in dre_kernels.unavailable_backends("cpu")


# ---------------------------------------------------------------------------------------------- the extension
def _has(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dre::{op}", key)


def test_extension_imports_and_native_cpu_is_available():
    if _library.native_error is not None:
        pytest.skip(f"extension not built: {_library.native_error}")
    assert "native" in dre_kernels.available_backends("cpu")


def test_cuda_dispatch_key_has_every_op_when_built_with_cuda():
    if _library.native_error is not None:
        pytest.skip(f"extension not built: {_library.native_error}")
    with_cuda = [op for op in _library.SCHEMAS if _has(op, "CUDA")]
    if not with_cuda:
        pytest.skip("dre_kernels._C was built without CUDA kernels (torch CPU-only, nvcc missing or "
                    "DRE_KERNELS_SKIP_CUDA=1)")
    assert with_cuda == list(_library.SCHEMAS), f"only {with_cuda} have CUDA kernels"
    for op in _library.SCHEMAS:
        assert _has(op, "CPU")


def _built_cuda_cuobjdump() -> str:
    """A cuobjdump for the built extension's CUDA kernels; skips the test where there are none or no cuobjdump."""
    if _library.native_error is not None:
        pytest.skip(f"extension not built: {_library.native_error}")
    if not any(_has(op, "CUDA") for op in _library.SCHEMAS):
        pytest.skip("dre_kernels._C was built without CUDA kernels")
    from triton_aot import cuobjdump

    tool = cuobjdump(prefer_triton=False)
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton)")
    return tool


def test_built_cuda_kernels_keep_to_registers():
    """ptxas's verdict on the kernels in the built extension, per arch: no local memory (spills or a stack frame
    for an array it could not keep in registers: each costs memory traffic in an inner loop) and at most 128
    registers a thread, so that two 256-thread blocks fit an SM; the full-width kernels, one block per SM by design,
    at most 255: the residual ones with their K x D accumulator (96 floats a thread; their shared memory holds whole
    rows), dre_cl_bwd_tc_wide with its 64 x 512 tile of grad u (128 floats a thread).
    Read from the cubins with cuobjdump."""
    from triton_aot import kernel_resources

    tool = _built_cuda_cuobjdump()
    so = dre_kernels._C.__file__
    elves = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    archs = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", elves)))
    assert archs, f"no cubins in {so}:\n{elves}"
    found = kernel_resources(so, tool)
    assert set(found) == set(cupy_kernels.KERNEL_FILES), sorted(found)
    bad = []
    for name, per_arch in found.items():
        assert len(per_arch) == len(archs), (name, per_arch, archs)
        for res in per_arch:
            if res["STACK"] or res["LOCAL"] or res["REG"] > (255 if name.endswith(("_tc_full", "_tc_wide")) else 128):
                bad.append(f"{name}: {res}")
    assert not bad, "kernels using local memory or too many registers:\n" + "\n".join(bad)


def test_built_full_width_kernels_do_not_divide_per_element():
    """The full-width kernels' staging loops take their rows by FastDiv (dre_common.cuh), not by / and % of a runtime
    width, which nvcc compiles to ~20 instructions (I2F.RP, MUFU.RCP, F2I, fix-ups) per element: read from the SASS
    of the built extension, each holds a few such sequences (the set-up and per-step ones: 11 and 17 on sm_90), where
    it held 358 and 282 before (nvcc 13.0)."""
    tool = _built_cuda_cuobjdump()
    sass = subprocess.run([tool, "-sass", dre_kernels._C.__file__], capture_output=True, text=True,
                          check=True).stdout
    parts = re.split(r"\n\s+Function : (\w+)\n", sass)
    divisions = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name.endswith("_tc_full"):
            divisions.setdefault(name, []).append(len(re.findall(r"\bI2F(?:\.U32)?\.RP\b", body)))
    assert set(divisions) == {"dre_re_fwd_tc_full", "dre_re_bwd_tc_full"}, divisions
    assert all(n <= 32 for counts in divisions.values() for n in counts), divisions


# ---------------------------------------------------------------------------------------------- CPU emulation
def _emu():
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++")
    import build

    return build.EmuRuntime()


@pytest.fixture(scope="module")
def emu():
    rt = _emu()
    prev = cupy_kernels.set_runtime(rt)
    yield rt
    cupy_kernels.set_runtime(prev)


def _re_inputs(lens, blens, K, D, *, x_dtype=torch.float32, bank_dtype=torch.bfloat16, c_dtype=torch.float32,
               index_dtype=torch.int64, T=50, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), D, generator=g).to(x_dtype)
    if strided:  # a column-strided view of a wider tensor, and a transposed-storage bank
        x = torch.cat([x, x], 1)[:, ::2]
    c = (0.5 * torch.randn(K, D, generator=g)).to(c_dtype)
    s = (0.02 + 0.1 * torch.rand(K, generator=g)).to(c_dtype)
    bank = torch.randn(T, D, generator=g).to(bank_dtype)
    if strided:
        bank = bank.t().contiguous().t()
    bi = torch.randint(0, T, (sum(blens),), generator=g).to(index_dtype)
    return x, make_offsets(lens, index_dtype), c, s, bank, bi, make_offsets(blens, index_dtype)


def _ref_fwd_bwd(x, xo, c, s, bank, bi, bo, hard, gE):
    x64 = x.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    s64 = None if hard else s.detach().double().requires_grad_()
    E, mass = residual_encode_reference(x64, xo, c64, s64, bank, bi, bo, hard)
    inputs = [x64, c64] + ([] if hard else [s64])
    grads = torch.autograd.grad(E, inputs, gE.double()) if E.numel() else [torch.zeros_like(t) for t in inputs]
    return E, mass, grads


def _check_re(args, hard, dtype=torch.float32, grads=True):
    x, xo, c, s, bank, bi, bo = args
    s_ = None if hard else s
    E, mass = cupy_kernels.residual_encode_fwd(x, xo, c, s_, bank, bi, bo, hard)
    B, (K, D) = xo.numel() - 1, c.shape
    gE = torch.randn(B, K, D, generator=torch.Generator().manual_seed(1))
    Er, mr, gr = _ref_fwd_bwd(x, xo, c, s, bank, bi, bo, hard, gE)
    assert E.dtype == torch.promote_types(x.dtype, c.dtype) and mass.dtype == torch.float32
    # soft: E is a float32 sum over the rows as stored (stored in E's dtype), held to that dtype's tolerance; hard: a
    # near-tie may move a row to another codeword under the split distances (see grad c below)
    assert_close(E, Er, dtype if hard else E.dtype)
    assert_close(mass, mr, torch.float32)
    if not grads:
        return
    for given_mass in ([None, mass] if hard else [None]):
        gx, gc, gs = cupy_kernels.residual_encode_bwd(gE, x, xo, c, s_, bank, bi, bo, given_mass, hard, True, True,
                                                      True)
        assert gx.dtype == x.dtype and gc.dtype == c.dtype
        assert_close(gx, gr[0], dtype, msg="grad x")
        # soft: grad c and grad s are float32 sums over the rows as stored, stored in c's dtype: held to its tolerance
        # (16-bit rows too; the split operands keep ~16 bits). Hard: a near-tie may move a row's mass to another
        # codeword under the split distances, so the rows' tolerance.
        assert_close(gc, gr[1], dtype if hard else c.dtype, scale=4, msg="grad codewords")
        if not hard:
            assert_close(gs, gr[2], c.dtype, scale=4, msg="grad scale")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_emu_residual_encode_ragged_with_bank(emu, hard):
    # empty slides, a fresh-only slide, a bank-only slide; bf16 bank under float32 rows
    _check_re(_re_inputs([3, 0, 70, 0, 5], [10, 4, 0, 0, 31], K=5, D=40), hard)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_emu_residual_encode_long_slide_split_across_blocks(emu, hard):
    # 600 fresh + 700 bank rows in one slide: several chunks (64 rows each here), partial sums added atomically
    args = _re_inputs([600, 7], [700, 0], K=3, D=20)
    assert cupy_kernels.default_chunk_rows(600, torch.device("cpu")) < 600
    n0 = len(emu.launches)
    _check_re(args, hard)
    grids = [g for _, g, _ in emu.launches[n0:]]
    assert max(grids) >= 3


def test_emu_residual_encode_column_tiles_and_k256(emu):
    # K=64, D=300: three DO=128 column tiles; K=256: DO=32, R=16 (forward) / 8 (backward)
    _check_re(_re_inputs([40, 9], [20, 30], K=64, D=300), hard=False)
    _check_re(_re_inputs([40, 9], [20, 30], K=256, D=70), hard=False)
    _check_re(_re_inputs([33], [12], K=256, D=40), hard=True)


@pytest.mark.parametrize("x_dtype,bank_dtype,c_dtype", [
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
])
def test_emu_residual_encode_mixed_dtypes_int32_strided(emu, x_dtype, bank_dtype, c_dtype):
    args = _re_inputs([30, 2], [9, 17], K=7, D=33, x_dtype=x_dtype, bank_dtype=bank_dtype, c_dtype=c_dtype,
                      index_dtype=torch.int32, strided=True)
    assert not args[0].is_contiguous() and not args[4].is_contiguous()
    out = torch.promote_types(x_dtype, c_dtype)
    _check_re(args, hard=False, dtype=out if out != torch.float32 else x_dtype)
    _check_re(args, hard=True, dtype=out if out != torch.float32 else x_dtype)


def test_emu_residual_encode_no_bank_and_no_slides(emu):
    _check_re(_re_inputs([4, 0, 9], [0, 0, 0], K=2, D=5)[:4] + (None, None, None), hard=False)
    x = torch.randn(0, 8)
    E, mass = cupy_kernels.residual_encode_fwd(x, torch.zeros(1, dtype=torch.long), torch.randn(3, 8),
                                               torch.ones(3), None, None, None, False)
    assert E.shape == (0, 3, 8) and mass.shape == (0, 3)


def test_emu_hard_backward_with_mass_reads_no_bank_rows(emu):
    x, xo, c, s, bank, bi, bo = _re_inputs([20, 5], [40, 30], K=4, D=16)
    E, mass = cupy_kernels.residual_encode_fwd(x, xo, c, None, bank, bi, bo, True)
    n0 = len(emu.launches)
    gE = torch.randn_like(E)
    cupy_kernels.residual_encode_bwd(gE, x, xo, c, None, bank, bi, bo, mass, True, True, True, False)
    assert len(emu.launches) - n0 == 1  # the fresh rows' argmin pass (grad x) only, no pass over bank rows
    bad = bank.clone().fill_(float("nan"))  # the bank may change between forward and backward
    gx1, gc1, _ = cupy_kernels.residual_encode_bwd(gE, x, xo, c, None, bad, bi, bo, mass, True, True, True, False)
    gx0, gc0, _ = cupy_kernels.residual_encode_bwd(gE, x, xo, c, None, bank, bi, bo, mass, True, True, True, False)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gc1, gc0)


def test_emu_soft_backward_precise_where_the_softmax_saturates(emu):
    """test_ops_residual_encode's saturated-softmax precision test on the SIMT backward (re_assign_bwd shifts g by
    g at each row's largest assignment). Not on the tensor cores: their split codewords resolve d to ~2^-16."""
    from test_ops_residual_encode import SATURATED_LIMITS, relative_errors, saturated_inputs

    for seed in range(2):
        x, xo, c, s, bank, bi, bo, gE = saturated_inputs(seed)
        _, _, want = _ref_fwd_bwd(x, xo, c, s, bank, bi, bo, False, gE)
        got = cupy_kernels.residual_encode_bwd(gE, x, xo, c, s, bank, bi, bo, None, False, True, True, True)
        for what, err in relative_errors(got, want).items():
            assert err < SATURATED_LIMITS[what], f"seed {seed}: grad {what}: {err:.2e} of its size"


def test_emu_residual_encode_bad_index_raises(emu):
    x, xo, c, s, bank, bi, bo = _re_inputs([3], [4], K=2, D=4, T=10)
    bi[2] = 10
    with pytest.raises(IndexError, match="bank_index"):
        cupy_kernels.residual_encode_fwd(x, xo, c, s, bank, bi, bo, False)
    with pytest.raises(ValueError, match="x_offsets"):
        cupy_kernels.residual_encode_fwd(x, torch.tensor([0, 2]), c, s, None, None, None, False)
    with pytest.raises(TypeError, match="float64"):
        cupy_kernels.residual_encode_fwd(x.double(), xo, c, s, None, None, None, False)


# ---------------------------------------------------------------------------------------------- tensor cores
@pytest.fixture(params=["full", "tiled"])
def emu_tc(emu, request, monkeypatch):
    """The emulation with the mma.sync kernels chosen for 16-bit row sources: the forward, and the soft backward's
    passes that only sum (bank rows), on the full-width kernels (dre_re_fwd_tc_full, dre_re_bwd_tc_full) where they
    fit, or (tiled) on the column-tiled ones (dre_re_fwd_tc, dre_re_bwd_tc); grad x of fresh rows on dre_re_bwd_tc."""
    full = request.param == "full"
    monkeypatch.setenv(cupy_kernels.FULL_WIDTH_ENV, "1" if full else "0")
    emu.use_tensor_cores = True
    emu.fwd_tc = "dre_re_fwd_tc_full" if full else "dre_re_fwd_tc"
    emu.bwd_tc = "dre_re_bwd_tc_full" if full else "dre_re_bwd_tc"
    yield emu
    emu.use_tensor_cores = False


def _tc_launches(emu, n0):
    return [name for name, _, _ in emu.launches[n0:] if "_tc" in name]


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_emu_tc_residual_encode_ragged_with_bank(emu_tc, hard):
    # float32 fresh rows (SIMT kernels) and a bf16 bank (tensor-core kernels); empty and one-row slides, odd K and D
    n0 = len(emu_tc.launches)
    _check_re(_re_inputs([3, 0, 70, 1, 5], [10, 4, 0, 1, 31], K=5, D=41), hard)
    names = _tc_launches(emu_tc, n0)
    assert emu_tc.fwd_tc in names and (hard or emu_tc.bwd_tc in names)


@pytest.mark.parametrize("x_dtype,bank_dtype,c_dtype", [
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
])
def test_emu_tc_residual_encode_16bit_rows_int32_strided(emu_tc, x_dtype, bank_dtype, c_dtype):
    # every source on the tensor cores: fresh rows too, so grad x comes from dre_re_bwd_tc (the float16 bank's
    # backward: SIMT)
    args = _re_inputs([30, 2, 0], [9, 17, 3], K=7, D=33, x_dtype=x_dtype, bank_dtype=bank_dtype, c_dtype=c_dtype,
                      index_dtype=torch.int32, strided=True)
    out = torch.promote_types(x_dtype, c_dtype)
    n0 = len(emu_tc.launches)
    for hard in (False, True):
        _check_re(args, hard=hard, dtype=out if out != torch.float32 else x_dtype)
    names = _tc_launches(emu_tc, n0)
    # a bf16 source's soft backward: on dre_re_bwd_tc (fresh rows: grad x) or emu_tc.bwd_tc (bank rows)
    assert {"dre_re_bwd_tc", emu_tc.bwd_tc} & set(names)
    assert not any(n == "dre_re_fwd" for n, _, _ in emu_tc.launches[n0:])


def test_emu_tc_residual_encode_tiles_and_large_k(emu_tc):
    # K=64, D=300: R=64 rows, DO=128 columns (3 column tiles); K=128: backward R=16, DT=16; K=256: forward DT=16,
    # backward falls back to the SIMT kernel (its tiles do not fit 48 KB of shared memory)
    from dre_kernels.cupy_kernels import re_tc_config
    assert re_tc_config(64, 300, False)[:3] == (64, 128, 32) and re_tc_config(256, 70, True) is None
    n0 = len(emu_tc.launches)
    _check_re(_re_inputs([40, 9], [20, 70], K=64, D=300, x_dtype=torch.bfloat16), hard=False, dtype=torch.bfloat16)
    _check_re(_re_inputs([17], [40], K=128, D=24, x_dtype=torch.bfloat16), hard=False, dtype=torch.bfloat16)
    _check_re(_re_inputs([33], [12], K=256, D=40, x_dtype=torch.float16), hard=True, dtype=torch.float16)
    _check_re(_re_inputs([5], [12], K=256, D=17, x_dtype=torch.float16), hard=False, dtype=torch.float16)
    names = [n for n, _, _ in emu_tc.launches[n0:]]
    assert "dre_re_bwd_tc" in names and "dre_re_bwd_soft" in names and "dre_re_fwd" not in names
    assert emu_tc.fwd_tc in names and emu_tc.bwd_tc in names


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_emu_tc_residual_encode_long_slide_duplicates(emu_tc, hard):
    # one 600-row bank slide split over several blocks (atomics), with repeated bank indices
    args = list(_re_inputs([3, 7], [600, 5], K=9, D=20, T=40))
    assert torch.unique(args[5]).numel() < args[5].numel()
    _check_re(tuple(args), hard)


def test_emu_tc_float16_small_gradients(emu_tc):
    # dL/dE of 1e-7: float16 parts of G would be subnormal or zero, so float16 rows' backward stays on float32 SIMT
    # (bf16 rows keep the tensor cores: bfloat16 has float32's range); grads are relative to their own size
    for dtype in (torch.float16, torch.bfloat16):
        x, xo, c, s, bank, bi, bo = _re_inputs([30, 4], [50, 9], K=8, D=40, x_dtype=dtype, bank_dtype=dtype)
        gE = 1e-7 * torch.randn(2, 8, 40, generator=torch.Generator().manual_seed(5))
        n0 = len(emu_tc.launches)
        gx, gc, gs = cupy_kernels.residual_encode_bwd(gE, x, xo, c, s, bank, bi, bo, None, False, True, True, True)
        assert (emu_tc.bwd_tc in _tc_launches(emu_tc, n0)) == (dtype == torch.bfloat16)
        _, _, (rx, rc, rs) = _ref_fwd_bwd(x, xo, c, s, bank, bi, bo, False, gE)
        # grad x is stored in x's dtype: in float16 a 1e-7 gradient is itself subnormal, whatever the kernel
        checks = [("grad c", gc, rc), ("grad s", gs, rs)] + ([("grad x", gx, rx)] if dtype == torch.bfloat16 else [])
        for name, got, want in checks:
            mag = float(want.abs().max())
            torch.testing.assert_close(got.double() / mag, want / mag, rtol=0, atol=2e-2, msg=f"{dtype} {name}")


@pytest.mark.parametrize("full", ["1", "0"], ids=["full", "tiled"])
def test_emu_tc_matches_simt_closely(emu, full, monkeypatch):
    # the split-operand MMAs keep ~16 mantissa bits of C and a: E (float32: float32 fresh rows, bf16 bank on the
    # tensor cores) agrees with the SIMT float32 kernels to ~1e-5 of its size
    x, xo, c, s, bank, bi, bo = _re_inputs([20], [300], K=16, D=64)
    E0, m0 = cupy_kernels.residual_encode_fwd(x, xo, c, s, bank, bi, bo, False)
    monkeypatch.setenv(cupy_kernels.FULL_WIDTH_ENV, full)
    emu.use_tensor_cores = True
    try:
        n0 = len(emu.launches)
        E1, m1 = cupy_kernels.residual_encode_fwd(x, xo, c, s, bank, bi, bo, False)
        assert _tc_launches(emu, n0) == ["dre_re_fwd_tc_full" if full == "1" else "dre_re_fwd_tc"]
    finally:
        emu.use_tensor_cores = False
    torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-4)
    assert E1.dtype == torch.float32
    torch.testing.assert_close(E1, E0, rtol=1e-5, atol=1e-5 * float(E0.abs().max()))


def test_full_width_launch_rule():
    # DRE-SLCL's K=64, D=384: 24 accumulator tiles per warp; H100 (227 KB opt-in) R=48 double-buffered, A100 (163 KB)
    # R=16; a 48 KB device takes one buffer. Each warp holds ceil(D/128) 16-column tiles in chunks of 3 times
    # ceil(K/8) 8-codeword tiles in 24 slots: K=64 with D=448 (2 chunks: 48 slots) and K > 64 (over 24 at any D) do
    # not fit; K=8 fits up to D=3072
    from dre_kernels.cupy_kernels import re_full_smem_bytes, re_tc_full_config
    assert re_tc_full_config(64, 384, 232448) == (48, 2, 203072)
    assert re_full_smem_bytes(64, 384, 64, 2) > 232448 and re_full_smem_bytes(64, 384, 64, 1) <= 232448
    assert re_tc_full_config(64, 384, 166912) == (16, 2, 136128)
    assert re_tc_full_config(8, 64, 48 * 1024)[:2] == (64, 2)
    assert re_tc_full_config(64, 384, 48 * 1024) is None
    assert re_tc_full_config(64, 448, 232448) is None and re_tc_full_config(256, 128, 232448) is None
    assert re_tc_full_config(72, 64, 232448) is None and re_tc_full_config(256, 64, 232448) is None
    assert re_tc_full_config(32, 768, 232448) is not None and re_tc_full_config(32, 769, 232448) is None
    assert re_tc_full_config(8, 3072, 232448) is not None and re_tc_full_config(9, 3072, 232448) is None
    # the backward stages C and G_b 64 columns at a time (two 16-bit parts each, and the next slice in float32), so
    # it has room for R = 64 rows on the H100 (R = 32 on the A100)
    assert re_tc_full_config(64, 384, 232448, backward=True) == (64, 2, 223488)
    assert re_tc_full_config(64, 384, 166912, backward=True) == (32, 2, 147968)
    assert re_tc_full_config(64, 384, 48 * 1024, backward=True) is None
    assert re_tc_full_config(64, 448, 232448, backward=True) is None
    # their assignment passes hold two codewords per lane (RE_FULL_KS = 2, residual_encode.cu): no K past 64 at any D
    assert all(re_tc_full_config(K, D, 232448, backward=bw) is None
               for K in range(65, 257) for D in (1, 8, 16, 64, 384) for bw in (False, True))


def _full_launches(emu, n0, kernel="dre_re_fwd_tc_full"):
    return [(g, smem) for name, g, smem in emu.launches[n0:] if name == kernel]


def _check_codeword_grads(args):
    """The soft backward without grad x (every source only sums: the full-width backward where it fits): grad
    codewords and grad scale against the reference."""
    x, xo, c, s, bank, bi, bo = args
    gE = torch.randn(xo.numel() - 1, *c.shape, generator=torch.Generator().manual_seed(2))
    _, gc, gs = cupy_kernels.residual_encode_bwd(gE, x, xo, c, s, bank, bi, bo, None, False, False, True, True)
    _, _, (_, rc, rs) = _ref_fwd_bwd(x, xo, c, s, bank, bi, bo, False, gE)
    assert_close(gc, rc, c.dtype, scale=4, msg="grad codewords")  # float32 sums, as in _check_re
    assert_close(gs, rs, c.dtype, scale=4, msg="grad scale")


@pytest.mark.parametrize("copies", ["at_wait", "at_issue"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("K,D", [(64, 64), (5, 40), (20, 24), (16, 136), (24, 392)])
def test_emu_full_width_16_byte_copies_and_double_buffering(emu, monkeypatch, hard, K, D, copies):
    # contiguous, aligned bf16 rows with D % 8 = 0: 16-byte cp.async copies (D = 40, 24: zero columns up to D16;
    # D = 136: the backward's C and G_b in three slices, 64 + 64 + 16 columns, each copied with a third of the next
    # step's rows while the one before it is multiplied; D = 392: 25 column tiles of the accumulator, 4 per warp in
    # two chunks (3 + 1), one on the seventh warp, none on the eighth);
    # four SMs, so four persistent blocks of 192 rows for the 720 bank rows (3 steps each at R <= 64, the next step's
    # rows loading while this one computes): three share the 700-row slide (their partial sums added atomically),
    # the fourth walks its last 124 rows, a 3-row slide, an empty one and 17 rows, flushing E_b at each segment's
    # end; the 42 fresh rows (33, empty, 1, 8) are one block's. Repeated indices. The emulated copies land at the
    # wait that covers them (a missing wait reads stale rows) or at issue (a buffer refilled while still read shows)
    monkeypatch.setenv(cupy_kernels.FULL_WIDTH_ENV, "1")
    monkeypatch.setattr(_gpu_host, "num_sms", lambda device: 4)
    emu.use_tensor_cores = True
    try:
        with emu.cp_async_order(copies):
            args = _re_inputs([33, 0, 1, 8], [700, 3, 0, 17], K=K, D=D, T=60, x_dtype=torch.bfloat16, seed=K + D)
            assert cupy_kernels._vec_rows(args[0], D) and cupy_kernels._vec_rows(args[4], D)
            n0 = len(emu.launches)
            _check_re(args, hard, dtype=torch.bfloat16, grads=False)
            assert [g for g, _ in _full_launches(emu, n0)] == [1, 4]  # fresh rows, bank rows
            if not hard:
                n0 = len(emu.launches)
                _check_codeword_grads(args)
                assert [g for g, _ in _full_launches(emu, n0, "dre_re_bwd_tc_full")] == [1, 4]
    finally:
        emu.use_tensor_cores = False


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_emu_full_width_blocks_walk_many_slides(emu, monkeypatch, hard):
    # 1100 slides, most of them empty, so that a block finds the slide of its first row in three rounds of the
    # warp's 32-ary search (re_slide_of) and its next slide past runs of empty ones; five SMs, so blocks start
    # mid-slide, at a slide's first row and after empty slides. Fresh rows and bank rows alike.
    monkeypatch.setenv(cupy_kernels.FULL_WIDTH_ENV, "1")
    monkeypatch.setattr(_gpu_host, "num_sms", lambda device: 5)
    g = torch.Generator().manual_seed(7)
    lens = [0] * 1100
    for i in torch.randperm(1100, generator=g)[:12].tolist():
        lens[i] = int(torch.randint(1, 40, (1,), generator=g))
    blens = [0] * 1100
    for i in torch.randperm(1100, generator=g)[:12].tolist():
        blens[i] = int(torch.randint(1, 70, (1,), generator=g))
    blens[-1] = 5  # the last slide's rows too
    emu.use_tensor_cores = True
    try:
        args = _re_inputs(lens, blens, K=6, D=24, T=40, x_dtype=torch.bfloat16, seed=3)
        n0 = len(emu.launches)
        _check_re(args, hard, dtype=torch.bfloat16, grads=False)
        grids = [g for g, _ in _full_launches(emu, n0)]
        assert len(grids) == 2 and min(grids) >= 3, grids  # fresh rows, bank rows: blocks of whole steps
        if not hard:
            n0 = len(emu.launches)
            _check_codeword_grads(args)
            assert [g for g, _ in _full_launches(emu, n0, "dre_re_bwd_tc_full")] == grids
    finally:
        emu.use_tensor_cores = False


def _emu_program(tmp_path, code, *flags, opt="-O1"):
    """Compile `code` (C++ that includes emu.h) into an executable with g++ and `flags`; skip without g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("the CUDA emulation needs g++")
    (tmp_path / "t.cpp").write_text(code)
    exe = tmp_path / "t"
    res = subprocess.run([cxx, "-std=c++20", opt, "-g", "-pthread", *flags,
                          f"-I{os.path.join(ROOT, 'tests', 'cuda_emu')}", f"-I{os.path.join(ROOT, 'csrc', 'cuda')}",
                          str(tmp_path / "t.cpp"), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return str(exe)


def test_emu_cp_async_lands_at_its_wait(tmp_path):
    """The emulator's cp.async (tests/cuda_emu/emu.h): a copy is not in shared memory before the wait_group that
    covers its group, wait_group(1) lands all but the newest group, and a block that never waits traps."""
    exe = _emu_program(tmp_path, r"""
#include <cstdio>
#include <csignal>
#include <cstdlib>
#include "emu.h"
alignas(16) static float src[8] = {1, 2, 3, 4, 5, 6, 7, 8};
alignas(16) static float dst[8] = {0, 0, 0, 0, 0, 0, 0, 0};
int main() {
  using namespace dre_emu;
  cp_async_16(dst, src, true);
  cp_async_commit_group();
  cp_async_16(dst + 4, src + 4, true);
  cp_async_commit_group();
  std::printf("%g %g ", dst[0], dst[4]);   // 0 0: nothing landed
  cp_async_wait_group(1);
  std::printf("%g %g ", dst[0], dst[4]);   // 1 0: the older group
  cp_async_wait_group(0);
  std::printf("%g %g\n", dst[0], dst[4]);  // 1 5
  std::fflush(stdout);
  cp_async_16(dst, src, true);
  cp_async_commit_group();
  cp_async_end_block();                    // never waited: traps
  return 0;
}
""")
    run = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["0", "0", "1", "0", "1", "5"]
    assert run.returncode != 0  # the trap


def _sanitizer_env(kind):
    """The environment of a child process whose emulator runs under sanitizer `kind` (cuda_emu/build.py)."""
    import build

    if shutil.which("g++") is None or build.sanitizer_runtime(kind) is None:
        pytest.skip(f"the emulator's {kind} sanitizer build needs g++ and its runtime")
    return build.sanitizer_env(kind)


def _sanitized_emu_program(tmp_path, code, kind):
    """_emu_program built with sanitizer `kind`, and the environment to run it in (its options; the runtime is
    linked in, not preloaded)."""
    import build

    env = _sanitizer_env(kind)
    env.pop("LD_PRELOAD")
    return _emu_program(tmp_path, code, *build.SANITIZERS[kind][1]), env


def test_emulator_under_asan_stops_a_kernel_reading_past_its_tensor(tmp_path):
    """Under AddressSanitizer an emulated kernel that reads past its tensor stops the process with a report naming
    the kernel's source line (here bank_gather through an index one row past a 6-row bank, the host checks
    bypassed); the same launch in range runs."""
    script = tmp_path / "gather.py"
    script.write_text(f"""
import ctypes, sys, torch
sys.path.insert(0, {os.path.join(ROOT, "tests", "cuda_emu")!r})
import build
lib, _ = build.load()
bank, out = torch.randn(6, 4), torch.empty(3, 4)
idx = torch.tensor([0, int(sys.argv[1]), 2])
lib.emu_dre_bank_gather(1, 0, ctypes.c_void_p(bank.data_ptr()), 0, 4, 1, ctypes.c_void_p(idx.data_ptr()), 1,
                        ctypes.c_void_p(out.data_ptr()), 3, 4)
print("gathered", torch.equal(out, bank[idx]))
""")
    env = _sanitizer_env("address")
    ok = subprocess.run([sys.executable, str(script), "5"], env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and "gathered True" in ok.stdout, ok.stderr[-3000:]
    bad = subprocess.run([sys.executable, str(script), "6"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "gathered" not in bad.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in bad.stderr and "bank.cu" in bad.stderr, bad.stderr[-3000:]


def test_emulator_under_asan_bounds_shared_memory_by_the_launch_size(tmp_path):
    """Built with AddressSanitizer, a launch's dynamic shared memory is its exact size (no guard floats): a read of
    the first float past it stops the process, where the plain build's guard catches writes only."""
    exe, env = _sanitized_emu_program(tmp_path, r"""
#include <cstdio>
#include "emu.h"
int main(int argc, char**) {
  const int at = argc == 1 ? 15 : 16;  // 64 bytes: floats 0..15
  dre_emu::launch(1, 64, [at] {
    if (threadIdx.x == 0) std::printf("read %g\n", (double)dre_emu::dyn_smem()[at]);
  });
  return 0;
}
""", "address")
    inside = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=60)
    assert inside.returncode == 0 and "read nan" in inside.stdout, inside.stderr[-2000:]  # NaN-poisoned, unset
    past = subprocess.run([exe, "past"], env=env, capture_output=True, text=True, timeout=60)
    assert past.returncode != 0 and "AddressSanitizer" in past.stderr, past.stderr[-2000:]


def test_emu_syncthreads_or_block_order_and_fresh_shared_memory(tmp_path):
    """The emulator's __syncthreads_or is any thread's predicate, call after call (its two flags alternate); blocks run
    first to last, or last to first with blocks_reversed; and every block starts on NaN-poisoned dynamic shared
    memory, not the previous block's."""
    exe = _emu_program(tmp_path, r"""
#include <cstdio>
#include <cmath>
#include "emu.h"
int main(int argc, char**) {
  dre_emu::blocks_reversed = argc > 1;
  static int order[3], n = 0, any1[3], any2[3], any3[3], fresh[3];
  dre_emu::launch(3, 64, [] {
    const unsigned b = blockIdx.x, t = threadIdx.x;
    float* smem = dre_emu::dyn_smem();
    if (t == 0) { order[n++] = b; fresh[b] = std::isnan(smem[b]); }
    __syncthreads();
    smem[t % 16] = 1.f;  // every block writes all of it (the same value from several threads: this is no TSan test)
    any1[b] = __syncthreads_or(t == 7 && b != 1);
    any2[b] = __syncthreads_or(t == 255 && b == 1);
    any3[b] = __syncthreads_or(0);
  });
  for (int* v : {order, any1, any2, any3, fresh}) std::printf("%d%d%d ", v[0], v[1], v[2]);
  std::printf("\n");
  return 0;
}
""")
    forward = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert forward.stdout.split() == ["012", "101", "010", "000", "111"], forward.stdout + forward.stderr
    reverse = subprocess.run([exe, "reverse"], capture_output=True, text=True, timeout=60)
    assert reverse.stdout.split() == ["210", "101", "010", "000", "111"], reverse.stdout + reverse.stderr


def test_emulator_under_tsan_reports_a_missing_syncthreads(tmp_path):
    """Built with ThreadSanitizer, a block whose threads read shared memory that other threads wrote with no
    __syncthreads between stops the process with TSan's report naming the line, though the emulator's threads may
    well have run in a safe order; with the barrier it runs clean."""
    exe, env = _sanitized_emu_program(tmp_path, r"""
#include <cstdio>
#include "emu.h"
float out[256];
int main(int argc, char**) {
  const bool sync = argc == 1;
  dre_emu::launch(2, 256 * 4, [sync] {
    float* smem = dre_emu::dyn_smem();
    smem[threadIdx.x] = (float)(threadIdx.x + blockIdx.x);
    if (sync) __syncthreads();
    out[threadIdx.x] = smem[(threadIdx.x + 1) % 256];  // the read of another thread's write
  });
  std::printf("out %g\n", (double)out[0]);
  return 0;
}
""", "thread")
    synced = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=120)
    assert synced.returncode == 0 and "out 2" in synced.stdout, synced.stderr[-3000:]
    racy = subprocess.run([exe, "no-sync"], env=env, capture_output=True, text=True, timeout=120)
    assert racy.returncode == 66, racy.stderr[-3000:]
    # the two accesses: the write (line 9) and the read of another thread's element (line 11)
    assert "ThreadSanitizer: data race" in racy.stderr, racy.stderr[-3000:]
    assert "t.cpp:9 " in racy.stderr and "t.cpp:11 " in racy.stderr, racy.stderr[-3000:]


# the emulator tests rerun under AddressSanitizer: every kernel family (SIMT, tensor-core column-tiled and
# full-width residual_encode, contrastive_loss's tiled and wide backward, the bank ops) on ragged, strided, int32,
# mixed-dtype and empty inputs; cp.async landing at its wait only (where a copy lands does not move what it reads)
_ASAN_TESTS = ("(ragged_with_bank or mixed_dtypes_int32 or no_bank_and_no_slides or reads_no_bank_rows or "
               "16bit_rows_int32 or walk_many_slides or full_width_fallbacks or contrastive_partial_tiles or "
               "labels_and_16bit or tc_contrastive_bf16 or wide_backward_is_the_tiled or bank_gather_and_update or "
               "16_byte_copies or normalize_backward_kernel) and emu and not at_issue")

# under ThreadSanitizer (about 10x the emulator's time), blocks last to first: each kernel family once, with the
# launches whose blocks share outputs (a slide split across blocks, full-width blocks walking many slides) and the
# contrastive finish's recompute of far columns (where TSan found a shared flag written by many threads)
_TSAN_TESTS = ("(ragged_with_bank or long_slide_split_across_blocks or walk_many_slides or "
               "unnormalised_columns_far_below or contrastive_partial_tiles or wide_backward_is_the_tiled or "
               "normalize_backward_kernel or (bank_gather_and_update and float32) or (16_byte_copies and 5-40-soft)) "
               "and emu and not at_issue")


def test_emulator_block_order_switch(monkeypatch):
    import build

    for order, reversed_ in (("forward", False), ("reverse", True)):
        monkeypatch.setenv("DRE_CUDA_EMU_BLOCK_ORDER", order)
        assert build.blocks_reversed() is reversed_
    monkeypatch.setenv("DRE_CUDA_EMU_BLOCK_ORDER", "backwards")
    with pytest.raises(ValueError, match="DRE_CUDA_EMU_BLOCK_ORDER must be forward or reverse, not 'backwards'"):
        build.blocks_reversed()


def _emulator_tests_under(kind, selection, min_passed, **env):
    """Rerun the emulator tests `selection` in a child process under sanitizer `kind`: it passes and runs at least
    min_passed tests (the selection still selects)."""
    env = {**_sanitizer_env(kind), **env}
    # --capture=sys: the sanitizer reports on file descriptor 2, which the default capture would take down with it
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), "-k", selection], env=env, capture_output=True, text=True,
                          timeout=3000, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= min_passed, out[-3000:]


def test_emulated_kernels_stay_in_bounds_under_asan():
    """Every global-memory access of the emulated kernels stays inside its tensor, and every shared-memory access
    inside the launch's shared memory (what would be an illegal address, or another allocation's data, on a GPU):
    the emulator tests of _ASAN_TESTS, in a child process under AddressSanitizer."""
    _emulator_tests_under("address", _ASAN_TESTS, 45)


def test_emulated_kernels_are_race_free_under_tsan_with_blocks_reversed():
    """No two threads of a block touch one location, one of them writing, without a barrier between (a missing
    __syncthreads, or a warp assumed to run in lock-step), and no kernel's result depends on its blocks running in
    launch order: the emulator tests of _TSAN_TESTS, in a child process under ThreadSanitizer, blocks last to first."""
    _emulator_tests_under("thread", _TSAN_TESTS, 18, DRE_CUDA_EMU_BLOCK_ORDER="reverse")


def test_fast_div_is_exact(tmp_path):
    """dre_common.cuh's FastDiv (a multiply-high and a shift for the staging loops' divisions by a runtime width)
    against / for every divisor 1..4096 and numerators 0..2^16, the divisors the kernels take (row widths,
    R, DTS) and beyond, and numerators up to 2^31 - 1, where the bound on the multiplier's error is tightest."""
    exe = _emu_program(tmp_path, r"""
#include <cstdio>
#include "dre_common.cuh"
using dre_cuda::FastDiv;
static long bad = 0, checked = 0;
static void check(const FastDiv& f, int x) {
  ++checked;
  if (f.div(x) != x / f.d) {
    if (bad++ < 5) std::printf("d=%d x=%d: %d\n", f.d, x, f.div(x));
  }
}
int main() {
  const int big[] = {4097, 12289, 65535, 65536, 65537, 1000003, 1 << 20, (1 << 30) + 1, 2147483647};
  for (int d = 1; d <= 4096 + 9; ++d) {
    const FastDiv f(d <= 4096 ? d : big[d - 4097]);
    for (int x = 0; x <= 1 << 16; ++x) check(f, x);
    for (int x = 2147483647; x > 2147483647 - 4096; --x) check(f, x);
    for (int q = 1; q < 64; ++q) {  // around multiples of d, far up
      const long long m = (long long)f.d * ((2147483647LL / f.d) / q);
      for (int o = -2; o <= 2; ++o)
        if (m + o >= 0 && m + o <= 2147483647LL) check(f, (int)(m + o));
    }
  }
  std::printf("%ld checked, %ld wrong\n", checked, bad);
  return bad != 0;
}
""", "-DDRE_CUDA_EMULATE", "-include", "emu.h", opt="-O2")
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.rstrip().endswith(" 0 wrong"), run.stdout


def _off_16_bytes(t):
    """A copy of the 16-bit 2-D tensor t whose storage starts 8 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)
    flat[4:] = t.reshape(-1)
    return flat[4:].view(t.shape)


@pytest.mark.parametrize("case", ["one_buffer", "small_r", "r48", "misaligned", "float16"])
def test_emu_full_width_fallbacks(emu, monkeypatch, case):
    # one row buffer (a device with less shared memory), R = 16, R = 48 with K = 64 (the forward's distance tiles as
    # on the H100 at the DRE-SLCL step: 3 x 8, in 4 groups of 3 x 2 tiles, each group's columns halved between two
    # warps), rows whose base is not 16-byte aligned (element copies), float16 rows
    monkeypatch.setenv(cupy_kernels.FULL_WIDTH_ENV, "1")
    K, D = (64 if case == "r48" else 24), 48
    dtype = torch.float16 if case == "float16" else torch.bfloat16
    x, xo, c, s, bank, bi, bo = _re_inputs([130, 2], [90, 200], K=K, D=D, T=30, x_dtype=dtype, bank_dtype=dtype)
    if case == "misaligned":
        bank = _off_16_bytes(bank)
        assert bank.data_ptr() % 16 != 0 and not cupy_kernels._vec_rows(bank, D)
    emu.use_tensor_cores = True
    try:
        for backward in (False, True):  # the forward, then the soft backward without grad x
            optin = {"one_buffer": cupy_kernels.re_full_smem_bytes(K, D, 16, 1, backward),
                     "small_r": cupy_kernels.re_full_smem_bytes(K, D, 16, 2, backward),
                     "r48": cupy_kernels.re_full_smem_bytes(K, D, 48, 2, backward)}.get(case, 232448)
            want = cupy_kernels.re_tc_full_config(K, D, optin, backward)
            assert want[:2] == {"one_buffer": (16, 1), "small_r": (16, 2), "r48": (48, 2)}.get(case, (64, 2))
            emu.optin = optin
            n0 = len(emu.launches)
            if backward:
                _check_codeword_grads((x, xo, c, s, bank, bi, bo))
                launches = _full_launches(emu, n0, "dre_re_bwd_tc_full")
                if dtype == torch.float16:  # float16 rows: the SIMT backward
                    want = None
            else:
                _check_re((x, xo, c, s, bank, bi, bo), False, dtype=dtype, grads=False)
                launches = _full_launches(emu, n0)
            assert [smem for _, smem in launches] == ([want[2]] * 2 if want else [])
    finally:
        emu.use_tensor_cores, emu.optin = False, 232448


def _check_cl(B, P, labels, normalize, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(B + P)
    a = torch.randn(B, P, generator=g).to(dtype)
    b = torch.randn(B, P, generator=g).to(dtype)
    s = torch.tensor(scale)
    loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, labels, normalize)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64 = s.double().requires_grad_()
    ref = contrastive_loss_reference(a64, b64, s64, labels, normalize)
    assert_close(loss, ref, torch.float32 if dtype == torch.float32 else torch.float16)
    gl = torch.rand(B, generator=g)
    ga, gb, gs = cupy_kernels.contrastive_loss_bwd(gl, a, b, s, labels, normalize, *saved)
    ra, rb, rs = torch.autograd.grad(ref, (a64, b64, s64), gl.double())
    assert ga.dtype == dtype and gs.shape == ()
    t = torch.float32 if dtype == torch.float32 else torch.float16
    assert_close(ga, ra, t, msg="grad a")
    assert_close(gb, rb, t, msg="grad b")
    assert_close(gs, rs, t, scale=4, msg="grad scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_emu_contrastive_normalize_backward_kernel(emu, dtype):
    """dre_cl_normalize_bwd (a warp per row) takes grad u to grad a in a's dtype, in place over grad u for float32:
    rows at and below the epsilon (a zero row: gu / eps ~ 1e12, beyond float16, so there a row of norm 1e-3),
    P over and under a warp's width, a strided."""
    for B, P in [(13, 70), (9, 5)]:
        g = torch.Generator().manual_seed(P)
        a = torch.randn(P, B, generator=g).t()  # strided: (B, P) with unit stride along B
        b = torch.randn(B, P, generator=g)
        tiny = 1e-3 if dtype == torch.float16 else 1e-20
        a[2] = 0.0 if dtype != torch.float16 else a[2] * tiny
        b[4] *= tiny / b[4].norm()
        a, b = a.to(dtype), b.to(dtype)
        s = torch.tensor(2.0)
        loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, None, True)
        w = torch.rand(B, generator=g)
        n0 = len(emu.launches)
        ga, gb, gs = cupy_kernels.contrastive_loss_bwd(w, a, b, s, None, True, *saved)
        assert [name for name, _, _ in emu.launches[n0:]].count("dre_cl_normalize_bwd") == 2
        a64, b64, s64 = (t.double().requires_grad_() for t in (a, b, s))
        ref = contrastive_loss_reference(a64, b64, s64, None, True)
        ra, rb, _ = torch.autograd.grad(ref, (a64, b64, s64), w.double())
        assert ga.dtype == b.dtype == gb.dtype == dtype and ga.is_contiguous()
        # each row against its own size: the tiny rows' gradients are 1e3 .. 1e12 times the others'
        for name, x, y in (("a", ga, ra), ("b", gb, rb)):
            err = ((x.double() - y).norm(dim=1) / y.norm(dim=1)).max()
            assert err < (1e-5 if dtype == torch.float32 else 1e-2), (name, float(err))


@pytest.mark.parametrize("normalize", [False, True])
def test_emu_contrastive_partial_tiles(emu, normalize):
    # B=130: three row/column tiles, the last one partial; P=70: two P tiles of the backward
    _check_cl(130, 70, None, normalize)


def test_emu_contrastive_labels_and_16bit(emu):
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 5, 0] * 7, dtype=torch.int32)
    _check_cl(70, 20, labels, True)
    _check_cl(70, 20, labels.to(torch.int16), False)
    _check_cl(40, 24, None, True, dtype=torch.bfloat16, scale=10.0)
    _check_cl(1, 3, None, False)


def test_emu_contrastive_bad_inputs_raise_naming_the_argument(emu):
    # the cupy host's own checks (the public op checks first; these guard direct calls), in both directions
    a, b, s = torch.randn(4, 3), torch.randn(4, 3), torch.tensor(2.0)
    loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, None, True)
    bad = [((a, torch.randn(5, 3), s), ValueError, "a and b must have the same shape"),
           ((a.double(), b.double(), s), TypeError, "a must be float16, bfloat16 or float32"),
           ((a, b, torch.ones(2)), ValueError, "logit_scale must be a 0-dim tensor")]
    for (a_, b_, s_), exc, msg in bad:
        with pytest.raises(exc, match=msg):
            cupy_kernels.contrastive_loss_fwd(a_, b_, s_, None, True)
        with pytest.raises(exc, match=msg):
            cupy_kernels.contrastive_loss_bwd(torch.ones(4), a_, b_, s_, None, True, *saved)
    with pytest.raises(ValueError, match="labels must have shape"):
        cupy_kernels.contrastive_loss_fwd(a, b, s, torch.zeros(3, dtype=torch.int64), True)


def test_emu_contrastive_large_scale_far_columns(emu):
    # logits far below the column bound: the float64 rescale must keep them
    _check_cl(66, 8, None, True, scale=80.0)


def test_emu_contrastive_unnormalised_columns_far_below_the_bound(emu):
    # without normalize, norms ~8 and s=30 put whole columns more than 700 below their Cauchy-Schwarz bound, where
    # the float64 column sums underflow: dre_cl_finish recomputes those columns exactly
    _check_cl(70, 64, None, False, scale=30.0)
    labels = torch.arange(130).remainder(7)
    _check_cl(130, 64, labels, False, dtype=torch.bfloat16, scale=30.0)


@pytest.mark.parametrize("normalize", [False, True])
def test_emu_contrastive_saturated_loss_has_exactly_zero_gradient(emu, normalize):
    """One-hot softmaxes (pairs far apart): loss and gradient exactly 0, as `torch` gives. The backward of either
    side must recompute the forward's logits bit for bit (cl_uv is symmetric, cl_logit rounds the product)."""
    g = torch.Generator().manual_seed(13)
    a = 3.0 * torch.randn(70, 33, generator=g)
    b = a + 0.1 * torch.randn(70, 33, generator=g)
    s = torch.tensor(30.0 if not normalize else 3000.0)
    loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, None, normalize)
    assert torch.equal(loss, torch.zeros_like(loss))
    ga, gb, gs = cupy_kernels.contrastive_loss_bwd(torch.rand(70, generator=g), a, b, s, None, normalize, *saved)
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb)) and gs == 0


def _cl_launches(emu, n0):
    return [name for name, _, _ in emu.launches[n0:] if name.startswith("dre_cl_")]


@pytest.mark.parametrize("emu_tc", ["full", "tiled"], indirect=True)  # the full-width switch; no residual_encode here
@pytest.mark.parametrize("copies", ["at_wait", "at_issue"])
@pytest.mark.parametrize("normalize", [False, True])
def test_emu_tc_contrastive_bf16(emu_tc, normalize, copies):
    """Both sides bfloat16: the logits (forward, column fix, backward) and the backward's W y on mma.sync. B=130:
    a partial row and column tile; P=200: partial P slices and two 128-wide pieces of P, in one block of
    dre_cl_bwd_tc_wide (full) or two of dre_cl_bwd_tc (tiled); P=520: two wide blocks per row block, the second with
    one partial piece (full only). P = 200, 520 and 16 stage their slices by cp.async (two buffers), P = 70 and 3
    element by element. The emulated copies land at their wait or at issue."""
    full = emu_tc.fwd_tc == "dre_re_fwd_tc_full"  # the fixture's switch
    labels = torch.arange(130).remainder(9)
    with emu_tc.cp_async_order(copies):
        wide_cases = ((70, 520, labels[:70]),) if full else ()
        for B, P, lab in ((130, 200, None), *wide_cases, (130, 70, labels), (1, 3, None), (64, 16, None)):
            n0 = len(emu_tc.launches)
            _check_cl(B, P, lab, normalize, dtype=torch.bfloat16, scale=10.0)
            wide = full and P > 128
            kernel = "dre_cl_bwd_tc_wide" if wide else "dre_cl_bwd_tc"
            names = _cl_launches(emu_tc, n0)
            assert names.count(kernel) == 2 and len([n for n in names if n.startswith("dre_cl_bwd")]) == 2, names
            grids = [g for name, g, _ in emu_tc.launches[n0:] if name == kernel]
            assert grids == [-(-B // 64) * -(-P // (512 if wide else 128))] * 2


@pytest.mark.parametrize("emu_tc", ["full"], indirect=True)
def test_emu_tc_contrastive_wide_backward_is_the_tiled_one_to_the_bit(emu_tc, monkeypatch):
    """dre_cl_bwd_tc_wide computes each logit tile and W once for up to 4 pieces of P where dre_cl_bwd_tc computes
    them once per piece: the same logits, weights and MMAs in the same order into each output, so grad a, grad b and
    grad scale must be equal to the bit. P=264: three pieces, the last partial."""
    _assert_contrastive_wide_equals_tiled(monkeypatch, torch.device("cpu"), 70, 264, emu_tc)


def _assert_contrastive_wide_equals_tiled(monkeypatch, device, B, P, emu=None):
    g = torch.Generator().manual_seed(P)
    a = torch.randn(B, P, generator=g).bfloat16().to(device)
    b = torch.randn(B, P, generator=g).bfloat16().to(device)
    labels = torch.arange(B).remainder(11).to(device)
    s, gl = torch.tensor(9.0, device=device), torch.rand(B, generator=g).to(device)
    loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, labels, True)
    out = {}
    for full in ("1", "0"):
        monkeypatch.setenv(cupy_kernels.FULL_WIDTH_ENV, full)
        n0 = len(emu.launches) if emu is not None else 0
        out[full] = cupy_kernels.contrastive_loss_bwd(gl, a, b, s, labels, True, *saved)
        if emu is not None:
            assert _cl_launches(emu, n0).count("dre_cl_bwd_tc_wide" if full == "1" else "dre_cl_bwd_tc") == 2
    for name, w, t in zip(["grad a", "grad b", "grad scale"], out["1"], out["0"]):
        assert torch.equal(w, t), name


def test_emu_tc_contrastive_only_for_bf16_pairs(emu_tc):
    """float16 (the backward's W would flush in float16 parts) and mixed dtypes stay on the SIMT kernels."""
    from dre_kernels import cupy_kernels as ck

    for da, db in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        a, b = torch.randn(70, 20).to(da), torch.randn(70, 20).to(db)
        assert ck._cl_tensor_cores(a, b) == 0
    _check_cl(70, 20, None, True, dtype=torch.float16)
    n0 = len(emu_tc.launches)
    _check_cl(70, 20, None, True, dtype=torch.float16)
    assert "dre_cl_bwd" in _cl_launches(emu_tc, n0) and "dre_cl_bwd_tc" not in _cl_launches(emu_tc, n0)


@pytest.mark.parametrize("normalize", [False, True])
def test_emu_tc_contrastive_saturated_loss_has_exactly_zero_gradient(emu_tc, normalize):
    """As the SIMT test: every launch computes a logit's dot with a's rows as the MMA's A operand (the grad b call
    reads its tile transposed), so the backward recomputes the forward's logits to the bit."""
    g = torch.Generator().manual_seed(13)
    a = (3.0 * torch.randn(70, 33, generator=g)).bfloat16()
    b = (a.float() + 0.1 * torch.randn(70, 33, generator=g)).bfloat16()
    s = torch.tensor(30.0 if not normalize else 3000.0)
    n0 = len(emu_tc.launches)
    loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, None, normalize)
    assert torch.equal(loss, torch.zeros_like(loss))
    ga, gb, gs = cupy_kernels.contrastive_loss_bwd(torch.rand(70, generator=g), a, b, s, None, normalize, *saved)
    assert "dre_cl_bwd_tc" in _cl_launches(emu_tc, n0)
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb)) and gs == 0


def test_emu_tc_contrastive_matches_simt_closely(emu):
    """The mma.sync logits against the SIMT float32 ones on the same bfloat16 inputs: products exact in both, only
    the order of the float32 sums differs; the backward's W in two bfloat16 parts keeps ~16 bits."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(100, 96, generator=g).bfloat16(), torch.randn(100, 96, generator=g).bfloat16()
    s, gl = torch.tensor(7.0), torch.rand(100, generator=g)
    out = {}
    for tc in (False, True):
        emu.use_tensor_cores = tc
        try:
            loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, None, True)
            out[tc] = (loss,) + cupy_kernels.contrastive_loss_bwd(gl, a, b, s, None, True, *saved)
        finally:
            emu.use_tensor_cores = False
    # loss and grad scale are float32; grad a and b come back in bfloat16, where a float32 difference far below
    # their precision can still round to the neighbouring value: at most one bfloat16 step apart
    for x0, x1, name in zip(out[False], out[True], ("loss", "grad a", "grad b", "grad scale")):
        tol = 2e-5 if x0.dtype == torch.float32 else 2.0 ** -7
        torch.testing.assert_close(x1.float(), x0.float(), rtol=tol, atol=tol * float(x0.float().abs().max()),
                                   msg=name)


@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
def test_emu_contrastive_small_losses_keep_relative_precision(emu, labels):
    """Rows with losses ~1e-5 (scale 20, normalize): the loss from the off-diagonal log-sum-exp and the diagonal's
    p_ii - 1 as expm1(-r_i) keep ~1e-6 relative per row (R_i - l_ii as before: 3e-2; test_ops_contrastive_loss)."""
    from test_ops_contrastive_loss import near_saturated_case, row_relative_error

    a, b, lab = near_saturated_case(70, 40, 20.0, True, labels)
    s = torch.tensor(20.0)
    loss, *saved = cupy_kernels.contrastive_loss_fwd(a, b, s, lab, True)
    a64, b64, s64 = a.double().requires_grad_(), b.double().requires_grad_(), s.double().requires_grad_()
    ref = contrastive_loss_reference(a64, b64, s64, lab, True)
    assert float(ref.detach().median()) < 1e-4
    gl = torch.linspace(0.5, 1.0, 70)
    ga, gb, gs = cupy_kernels.contrastive_loss_bwd(gl, a, b, s, lab, True, *saved)
    ra, rb, rs = torch.autograd.grad(ref, (a64, b64, s64), gl.double())
    assert row_relative_error(loss, ref) < 1e-4
    assert row_relative_error(ga, ra) < 1e-4 and row_relative_error(gb, rb) < 1e-4
    assert abs(float(gs) - float(rs)) < 1e-4 * abs(float(rs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emu_bank_gather_and_update(emu, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 70, generator=g).to(dtype)
    bank = base.t().contiguous().t()  # strided rows
    idx = torch.tensor([5, 0, 39, 5, 12], dtype=torch.int32)
    torch.testing.assert_close(cupy_kernels.bank_gather(bank, idx), bank[idx.long()], rtol=0, atol=0)
    uidx = torch.tensor([7, 3, 39, 0], dtype=torch.int64)
    vals = torch.randn(4, 70, generator=g)
    for momentum, normalize in [(0.0, True), (0.9, True), (0.5, False)]:
        got, want = bank.clone(), bank.clone()
        cupy_kernels.bank_update_(got, uidx, vals, momentum, normalize)
        bank_update_reference_(want, uidx, vals, momentum, normalize)
        assert_close(got, want, dtype)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[uidx] = False
        assert torch.equal(got[untouched], bank[untouched])
    with pytest.raises(ValueError, match="repeat"):
        cupy_kernels.bank_update_(bank.clone(), torch.tensor([1, 1]), vals[:2], 0.0, True)
    with pytest.raises(IndexError):
        cupy_kernels.bank_gather(bank, torch.tensor([40]))


# ---------------------------------------------------------------------------------------------- GPU only
def _gpu_backends():
    if not torch.cuda.is_available():
        return ["native", "cupy"]
    return [b for b in ("native", "cupy") if b in dre_kernels.available_backends("cuda")] or ["native"]


def _on_gpu(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend not in dre_kernels.available_backends("cuda"):
        pytest.skip(dre_kernels.unavailable_backends("cuda")[backend])
    return backend


@pytest.fixture(params=_gpu_backends())
def gpu_backend(request):
    """The csrc/cuda kernels: native and cupy."""
    return _on_gpu(request.param)


def _gpu_re_case(backend, lens, blens, K, D, hard, x_dtype=torch.bfloat16, bank_dtype=torch.bfloat16, T=5000):
    args = [t.cuda() if t is not None else None for t in _re_inputs(lens, blens, K, D, x_dtype=x_dtype,
                                                                    bank_dtype=bank_dtype, T=T)]
    x, xo, c, s, bank, bi, bo = args
    x.requires_grad_()
    c.requires_grad_()
    s = None if hard else s.requires_grad_()
    E, mass = dre_kernels.residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo,
                                          assignment="hard" if hard else "soft", return_mass=True, backend=backend)
    gE = torch.randn_like(E, dtype=torch.float32)
    inputs = [x, c] + ([] if hard else [s])
    got = torch.autograd.grad(E, inputs, gE.to(E.dtype))
    Er, mr, gr = _ref_fwd_bwd(x.detach().cpu(), xo.cpu(), c.detach().cpu(), None if hard else s.detach().cpu(),
                              bank.cpu(), bi.cpu(), bo.cpu(), hard, gE.to(E.dtype).float().cpu())
    assert_close(E.cpu(), Er, x_dtype)
    assert_close(mass.cpu(), mr, torch.float32)
    for g_, r_ in zip(got, gr):
        assert_close(g_.cpu(), r_, x_dtype, scale=4)


@pytest.mark.cuda
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gpu_long_slides_split_across_blocks(gpu_backend, hard):
    _gpu_re_case(gpu_backend, [20000, 3, 0], [30000, 0, 9], K=64, D=128, hard=hard)


@pytest.mark.cuda
def test_gpu_k256_and_d4096(gpu_backend):
    _gpu_re_case(gpu_backend, [300, 40], [500, 7], K=256, D=96, hard=False)
    _gpu_re_case(gpu_backend, [200, 40], [300, 7], K=16, D=4096, hard=False)
    _gpu_re_case(gpu_backend, [200, 40], [300, 7], K=256, D=4096, hard=True)


@pytest.mark.cuda
def test_gpu_mixed_dtypes(gpu_backend):
    _gpu_re_case(gpu_backend, [500, 40], [900, 7], K=32, D=384, hard=False, x_dtype=torch.float16,
                 bank_dtype=torch.bfloat16)
    _gpu_re_case(gpu_backend, [500, 40], [900, 7], K=32, D=384, hard=True, x_dtype=torch.float32,
                 bank_dtype=torch.float16)


def _skip_unless_csrc_tensor_cores(gpu_backend):
    """The tests of the csrc/cuda kernel switches: native or cupy, on compute capability 8.0 or newer."""
    if gpu_backend not in ("native", "cupy"):
        pytest.skip("the switch selects between csrc/cuda kernels only")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("mma.sync bf16/fp16 needs compute capability 8.0")


@pytest.mark.cuda
@pytest.mark.parametrize("rows_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,D", [(64, 384), (7, 33), (128, 200), (256, 96)])
def test_gpu_tensor_core_kernels_match_simt(gpu_backend, monkeypatch, rows_dtype, K, D):
    """16-bit rows take the mma.sync kernels on sm_80+; DRE_KERNELS_CUDA_TENSOR_CORES=0 forces the SIMT ones."""
    _skip_unless_csrc_tensor_cores(gpu_backend)
    x, xo, c, s, bank, bi, bo = [t.cuda() for t in _re_inputs([300, 1, 0, 77], [2000, 5, 9, 0], K=K, D=D,
                                                              x_dtype=rows_dtype, bank_dtype=rows_dtype, T=1500)]
    out = {}
    for tc in ("1", "0"):
        monkeypatch.setenv("DRE_KERNELS_CUDA_TENSOR_CORES", tc)
        for hard in (False, True):
            xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
            sr = None if hard else s.clone().requires_grad_()
            E, mass = dre_kernels.residual_encode(xr, xo, cr, sr, bank=bank, bank_index=bi, bank_offsets=bo,
                                                  assignment="hard" if hard else "soft", return_mass=True,
                                                  backend=gpu_backend)
            gE = torch.randn(E.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
            grads = torch.autograd.grad(E.float(), [xr, cr] + ([] if hard else [sr]), gE)
            out[tc, hard] = (E.float(), mass) + tuple(g.float() for g in grads)
    for hard in (False, True):
        for name, a, b in zip(["E", "mass", "grad x", "grad c", "grad s"], out["1", hard], out["0", hard]):
            mag = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * mag, msg=f"{name} (hard={hard})")


@pytest.mark.cuda
@pytest.mark.parametrize("rows_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,D,aligned", [(64, 384, True), (64, 384, False), (5, 40, True), (24, 33, True),
                                         (256, 64, True)])
def test_gpu_full_width_forward_matches_tiled(gpu_backend, monkeypatch, rows_dtype, K, D, aligned):
    """The full-width forward (16-byte cp.async copies of aligned rows, element copies otherwise, double-buffered
    row steps, ldmatrix) against the column-tiled mma.sync kernel (DRE_KERNELS_CUDA_FULL_WIDTH=0): both split the
    float32 operand into hi + lo, so soft E agrees to float32 rounding of the sums."""
    _skip_unless_csrc_tensor_cores(gpu_backend)
    x, xo, c, s, bank, bi, bo = [t.cuda() for t in _re_inputs([300, 1, 0, 77], [5000, 5, 9, 0], K=K, D=D,
                                                              x_dtype=rows_dtype, bank_dtype=rows_dtype, T=1500)]
    if not aligned:  # a bank whose base is 8 bytes past a 16-byte boundary
        bank = _off_16_bytes(bank)
    out = {}
    for full in ("1", "0"):
        monkeypatch.setenv("DRE_KERNELS_CUDA_FULL_WIDTH", full)
        for hard in (False, True):
            out[full, hard] = dre_kernels.residual_encode(x.float(), xo, c, None if hard else s, bank=bank,
                                                          bank_index=bi, bank_offsets=bo, return_mass=True,
                                                          assignment="hard" if hard else "soft", backend=gpu_backend)
    for hard in (False, True):
        for name, a, b in zip(["E", "mass"], out["1", hard], out["0", hard]):
            tol = 2e-2 if hard else 1e-4  # hard: a near-tie may take the other codeword under another sum order
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())),
                                       msg=f"{name} (hard={hard})")


@pytest.mark.cuda
@pytest.mark.parametrize("K,D,aligned", [(64, 384, True), (64, 384, False), (5, 40, True), (24, 33, True),
                                         (128, 96, True)])
def test_gpu_full_width_soft_backward_matches_tiled(gpu_backend, monkeypatch, K, D, aligned):
    """The soft backward's bank-row pass on the full-width kernel (C and G_b staged 64 columns at a time, whole rows
    double-buffered) against the column-tiled one: grad codewords and grad scale agree to float32 rounding of the
    sums (both split C, G and h into bf16 hi + lo)."""
    _skip_unless_csrc_tensor_cores(gpu_backend)
    x, xo, c, s, bank, bi, bo = [t.cuda() for t in _re_inputs([300, 1, 0, 77], [5000, 5, 9, 0], K=K, D=D,
                                                              x_dtype=torch.bfloat16, bank_dtype=torch.bfloat16,
                                                              T=1500)]
    if not aligned:
        bank = _off_16_bytes(bank)
    gE = torch.randn(4, K, D, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    out = {}
    for full in ("1", "0"):
        monkeypatch.setenv("DRE_KERNELS_CUDA_FULL_WIDTH", full)
        cr, sr = c.clone().requires_grad_(), s.clone().requires_grad_()
        E = dre_kernels.residual_encode(x.float(), xo, cr, sr, bank=bank, bank_index=bi, bank_offsets=bo,
                                        backend=gpu_backend)
        out[full] = torch.autograd.grad(E, [cr, sr], gE)
    for name, a, b in zip(["grad c", "grad s"], out["1"], out["0"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())), msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("B,P", [(3000, 512), (700, 200), (300, 1030)])
def test_gpu_contrastive_wide_backward_is_the_tiled_one_to_the_bit(gpu_backend, monkeypatch, B, P):
    """dre_cl_bwd_tc_wide against dre_cl_bwd_tc (DRE_KERNELS_CUDA_FULL_WIDTH=0) on bfloat16 pairs, through the cupy
    kernels' host code or the native op: equal to the bit (see the emulated test)."""
    _skip_unless_csrc_tensor_cores(gpu_backend)
    if gpu_backend == "cupy":
        _assert_contrastive_wide_equals_tiled(monkeypatch, torch.device("cuda"), B, P)
        return
    g = torch.Generator().manual_seed(P)
    a = torch.randn(B, P, generator=g).bfloat16().cuda().requires_grad_()
    b = torch.randn(B, P, generator=g).bfloat16().cuda().requires_grad_()
    s = torch.tensor(9.0, device="cuda", requires_grad=True)
    out = {}
    for full in ("1", "0"):
        monkeypatch.setenv("DRE_KERNELS_CUDA_FULL_WIDTH", full)
        loss = dre_kernels.contrastive_loss(a, b, s, normalize=True, backend=gpu_backend)
        out[full] = torch.autograd.grad(loss, [a, b, s])
    for name, w, t in zip(["grad a", "grad b", "grad scale"], out["1"], out["0"]):
        assert torch.equal(w, t), name


@pytest.mark.cuda
def test_gpu_contrastive_large_batch_without_b_by_b(gpu_backend):
    B, P = 65536, 256
    a = torch.randn(B, P, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(B, P, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = dre_kernels.contrastive_loss(a, b, 10.0, normalize=True, backend=gpu_backend)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 64 * B * P, f"peak {peak / 2**20:.0f} MiB; B x B float32 would be {4 * B * B / 2**30:.0f} GiB"
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # the same loss on a slice against the reference
    n = 2048
    a2, b2 = a.detach()[:n], b.detach()[:n]
    got = dre_kernels.contrastive_loss(a2, b2, 10.0, normalize=True, backend=gpu_backend)
    ref = contrastive_loss_reference(a2.double(), b2.double(), torch.tensor(10.0, device="cuda"), None, True).mean()
    assert_close(got, ref, torch.float32, scale=10)


@pytest.mark.cuda
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gpu_opcheck_and_compile(gpu_backend, hard):
    """tests/test_library.py runs opcheck on the CPU backends only: the CUDA registrations get theirs here."""
    args = [t.cuda() if t is not None else None for t in _re_inputs([7, 0, 5], [3, 4, 0], K=4, D=24)]
    x, xo, c, s, bank, bi, bo = args
    x.requires_grad_()
    c.requires_grad_()
    s = None if hard else s.requires_grad_()
    fwd = _library._op(gpu_backend, "residual_encode_fwd")
    torch.library.opcheck(fwd, (x, xo, c, s, bank, bi, bo, hard))
    a = torch.randn(70, 16, device="cuda", requires_grad=True)
    b = torch.randn(70, 16, device="cuda", requires_grad=True)
    ls = torch.tensor(2.0, device="cuda", requires_grad=True)
    torch.library.opcheck(_library._op(gpu_backend, "contrastive_loss_fwd"), (a, b, ls, None, True))

    def step(x, c, s):
        E = dre_kernels.residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo,
                                        assignment="hard" if hard else "soft", backend=gpu_backend)
        return E.float().square().sum()

    want = step(x, c, s)
    got = torch.compile(step, fullgraph=True)(x, c, s)
    assert_close(got, want, torch.float32)


# ---------------------------------------------------------------------- value checks on the GPU: syncs, graphs
@pytest.fixture(params=["native", "cupy", "triton"])
def gpu_kernel_backend(request):
    """Every kernel backend on CUDA."""
    return _on_gpu(request.param)


def _gpu_step_inputs():
    x, xo, c, s, bank, bi, bo = [t.cuda() for t in _re_inputs([300, 1, 0, 77], [2000, 5, 9, 0], K=16, D=64,
                                                              x_dtype=torch.bfloat16, T=3000)]
    return x, xo, c, s, bank, bi, bo


@pytest.mark.cuda
def test_gpu_repeated_calls_do_not_synchronise(gpu_kernel_backend):
    """The value checks synchronise once per new index tensor: a repeated call on unchanged inputs, forward and
    backward, runs with no device synchronisation at all (torch.cuda sync debug mode turns one into an error)."""
    backend = gpu_kernel_backend
    x, xo, c, s, bank, bi, bo = _gpu_step_inputs()
    x.requires_grad_()
    c.requires_grad_()
    s.requires_grad_()
    a = torch.randn(64, 32, device="cuda", requires_grad=True)
    b = torch.randn(64, 32, device="cuda", requires_grad=True)
    logit_scale = torch.tensor(5.0, device="cuda")
    idx = torch.randperm(bank.shape[0], device="cuda")[:50]
    values = torch.randn(50, bank.shape[1], device="cuda")

    def step():
        E = dre_kernels.residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend=backend)
        grads = torch.autograd.grad(E.float().sum(), [x, c, s])
        loss = dre_kernels.contrastive_loss(a, b, logit_scale, normalize=True, backend=backend)
        grads += torch.autograd.grad(loss, [a, b])
        rows = dre_kernels.bank_gather(bank, idx, backend=backend)
        dre_kernels.bank_update_(bank, idx, values, momentum=0.9, normalize=True, backend=backend)
        return grads, rows

    step()  # checks (and compiles) once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bi[0] = 3000  # a changed index is checked again
    with pytest.raises(IndexError, match=r"bank_index holds 3000"):
        step()


@pytest.mark.cuda
def test_gpu_value_checks_under_cuda_graph_capture(gpu_kernel_backend):
    """During capture the checks become device-side asserts (no synchronisation is allowed there); the captured
    call replays with new values in its input buffers."""
    backend = gpu_kernel_backend
    x, xo, c, s, bank, bi, bo = _gpu_step_inputs()

    def f():
        return dre_kernels.residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f()  # first launches (compiles, autotunes) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    bi.copy_(torch.randint(0, bank.shape[0], bi.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, f(), rtol=1e-4, atol=1e-3)  # fp32 E; slides split across blocks add atomically
