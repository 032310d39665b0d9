"""CMakeLists.txt builds the dre operators as a shared library (find_package(Torch)) that torch.ops.load_library
loads. The library is loaded in a fresh interpreter that never imports dre_kernels._C: both register
TORCH_LIBRARY(dre), and a second registration of the same namespace is an error."""

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_hints() -> list[str]:
    """A CUDA build of torch makes its CMake config look for a CUDA toolkit even for a CPU-only library: point it
    at the toolkit and nvrtc, and name an arch so it does not try to detect a GPU."""
    if torch.version.cuda is None:
        return []
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    root = next((r for r in candidates if r and os.path.exists(os.path.join(r, "include", "cuda_runtime.h"))), None)
    hints = []
    if root:
        hints += [f"-DCUDA_TOOLKIT_ROOT_DIR={root}", f"-DCUDAToolkit_ROOT={root}"]
    nvrtc = sorted(glob.glob(os.path.join(root or "/nonexistent", "lib*", "libnvrtc.so*")))
    for site in sys.path:
        nvrtc += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    if nvrtc:
        hints.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return hints


def test_cmake_build_and_load_library(tmp_path):
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) found")
    build = tmp_path / "build"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0"))
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", ROOT, "-B", str(build), *gen, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}", *_cuda_hints()]
    out = subprocess.run(configure, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 and "CUDA" in out.stdout + out.stderr and torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build and its CMake config cannot find a usable CUDA toolkit here: "
                    + (out.stderr.strip().splitlines() or ["?"])[-1][:300])
    assert out.returncode == 0, f"cmake configure failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    out = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"cmake build failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    libs = glob.glob(str(build / "libdre_ops*.so")) + glob.glob(str(build / "libdre_ops*.dylib"))
    assert libs, f"no libdre_ops in {os.listdir(build)}"

    # A fresh interpreter, sys.path without the checkout, so dre_kernels._C cannot be imported by accident.
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path = [p for p in sys.path if p not in ('', {ROOT!r})]
        torch.ops.load_library({libs[0]!r})
        assert 'dre_kernels._C' not in sys.modules
        x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
        off = torch.tensor([0, 3])
        c = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
        E, mass = torch.ops.dre.residual_encode_fwd(x, off, c, None, None, None, None, True)
        # hard: rows 0 and 1 go to codeword 0, row 2 to codeword 1
        assert mass.tolist() == [[2.0, 1.0]], mass
        assert torch.equal(E, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])), E
        bank = torch.arange(12.0).view(4, 3)
        assert torch.equal(torch.ops.dre.bank_gather(bank, torch.tensor([3, 0])), bank[[3, 0]])
        try:
            torch.ops.dre.bank_gather(bank, torch.tensor([4]))
        except IndexError:
            pass
        else:
            raise AssertionError('out-of-range index not rejected')
        loss = torch.ops.dre.contrastive_loss_fwd(torch.eye(3), torch.eye(3), torch.tensor(1.0), None, False)[0]
        assert torch.allclose(loss, torch.full((3,), float(torch.log(torch.tensor(torch.e + 2.0))) - 1.0))
        print('ok')
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
