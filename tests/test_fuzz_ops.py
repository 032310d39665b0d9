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


def test_near_tie_is_the_gap_of_the_two_nearest_codewords():
    """fuzz_ops does not count a hard case whose rows sit at a near-tie (tensor-core distances may take either
    codeword there); the test of a near-tie must not swallow ordinary rows."""
    import torch

    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    at_middle = torch.tensor([[0.5, 0.3]])  # equidistant from the first two
    off_middle = torch.tensor([[0.5 + 1e-3, 0.3]])  # 2e-3 apart in squared distance, far above 2^-12 * ||x|| ||c||
    assert fuzz_ops.has_near_tie(at_middle, c)
    assert fuzz_ops.has_near_tie(torch.tensor([[0.5 + 1e-6, 0.3]]), c)
    assert not fuzz_ops.has_near_tie(off_middle, c)
    assert fuzz_ops.has_near_tie(torch.cat([off_middle, at_middle]), c)  # any row
    assert not fuzz_ops.has_near_tie(at_middle, c[:1]) and not fuzz_ops.has_near_tie(at_middle[:0], c)
