"""tests/fuzz_ops.py, the random sweep against `reference`, for a few seconds per CPU kernel backend (and the CUDA
kernels in the CPU emulation): it must find nothing, and keeps working for the long runs (and the GPU sessions) it
is made for."""

import os
import shutil
import subprocess
import sys

import pytest

import dre_kernels
import fuzz_ops


@pytest.mark.parametrize("backend, seconds", [("native", 3), ("triton", 6)])
def test_short_fuzz_finds_nothing(backend, seconds, capsys):
    if backend not in dre_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} not available on CPU here")
    failures = fuzz_ops.main(["--backend", backend, "--seconds", str(seconds), "--seed", "1"])
    out = capsys.readouterr().out
    assert failures == 0, out
    assert " 0 failures" in out and "cases" in out


def test_short_fuzz_of_the_emulated_cuda_kernels_finds_nothing():
    # in a child process: the emulation defines the cupy operators for CPU tensors in the process that runs it
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "fuzz_ops.py"), "--backend", "cuda-emu", "--seconds", "8",
                          "--seed", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fuzz_ops cuda-emu on cpu:" in out.stdout and " 0 failures" in out.stdout, out.stdout + out.stderr
