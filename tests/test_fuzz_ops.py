"""tests/fuzz_ops.py, the random sweep against `reference`, for a few seconds per CPU kernel backend: it must find
nothing, and keeps working for the long runs (and the GPU sessions) it is made for."""

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
