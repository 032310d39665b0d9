"""Smoke test of the benchmark suite: the quick path of benchmarks/run.py on tiny shapes writes sane CSV, Markdown
and PNG files. Runs in a child process (torch.compile settings of the suite must not leak into this one); the
providers are those available here except torch_compile, whose compile time would dominate (< 30 s)."""

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import dre_kernels

    out = tmp_path_factory.mktemp("bench")
    providers = [p for p in dre_kernels.available_backends("cpu") if p != "triton"]
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(out),
           "--ops", "residual_encode_soft", "contrastive_loss", "bank_gather", "--sweeps", "rows", "B",
           "--providers", *providers, "--no-progress", "--threads", "1", "--reps", "5", "--budget-s", "0.05"]
    env = dict(os.environ, KINETO_LOG_LEVEL="5")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, providers


def test_csv_rows_are_sane(quick_run):
    out, providers = quick_run
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for col in ("device", "torch", "triton", "cuda", "commit", "op", "provider", "mode", "B", "rows_per_slide", "K",
                "D", "P", "dtype", "p20_ms", "p50_ms", "p80_ms", "peak_mb", "gbs", "bw_share", "speedup_vs_torch",
                "status"):
        assert col in rows[0], col
    # 2 residual_encode shapes x 3 modes + 2 loss shapes x 3 modes + 2 gather shapes x 1 mode, per provider
    assert len(rows) == (2 * 3 + 2 * 3 + 2) * len(providers)
    assert {r["provider"] for r in rows} == set(providers)
    for r in rows:
        assert r["device"] and r["torch"] and r["commit"]
        assert r["status"] == "ok", r
        p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= p50 <= p80 < math.inf
        assert float(r["peak_mb"]) >= 0
        assert float(r["gbs"]) > 0 and float(r["bw_share"]) > 0
        if r["provider"] == "torch":
            assert float(r["speedup_vs_torch"]) == 1.0
        else:
            assert float(r["speedup_vs_torch"]) > 0


def test_markdown_and_plots(quick_run):
    out, providers = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# dre-kernels benchmarks")
    assert "| shape | mode | " + " | ".join(providers) + " |" in md
    for op in ("residual_encode_soft", "contrastive_loss", "bank_gather"):
        assert f"## {op}" in md
    pngs = sorted(os.listdir(out / "plots"))
    assert "residual_encode_soft_fwd_bwd.png" in pngs and "contrastive_loss_fwd.png" in pngs
    for p in pngs:
        with open(out / "plots" / p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gpu_session_script_names_existing_files():
    """benchmarks/gpu_session.sh is run only on a GPU machine: the files it names must not rot in between."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "benchmarks", "gpu_session.sh")).read()
    paths = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", text))
    assert len(paths) >= 10
    missing = [p for p in sorted(paths) if not os.path.isfile(os.path.join(root, p))]
    assert not missing, missing
    assert subprocess.run(["bash", "-n", os.path.join(root, "benchmarks", "gpu_session.sh")]).returncode == 0


@pytest.mark.parametrize("script", ["bench_cuda", "bench_triton"])
def test_gpu_op_benchmark_smoke(tmp_path, script):
    """bench_cuda.py (and bench_triton.py, the same with triton only) run on a GPU only; --smoke runs their whole
    path on tiny CPU shapes, so a slip in them does not first show on a lent GPU."""
    import importlib

    import dre_kernels

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    mod = importlib.import_module(f"benchmarks.{script}")
    out = tmp_path / "gpu.csv"
    providers = ["torch", "native"] if script == "bench_cuda" else ["torch", "triton"]
    if any(p not in dre_kernels.available_backends("cpu") for p in providers):
        pytest.skip(f"needs {providers} on the CPU")
    assert mod.main(["--smoke", "--providers", *providers, "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    cases = {(r["op"], r["mode"], r["provider"]) for r in rows}
    for op in ("residual_encode_soft", "residual_encode_hard", "contrastive_loss"):
        for mode in ("fwd", "fwd+bwd"):
            assert {(op, mode, p) for p in providers} <= cases
    assert all(float(r["p50_ms"]) > 0 and r["device_type"] == "cpu" for r in rows)
    # nothing to compare: an error status, not an empty CSV
    assert mod.main(["--smoke", "--providers", "torch", "--out", str(tmp_path / "none.csv")]) == 1
    assert not (tmp_path / "none.csv").exists()


def test_training_step_benchmark_smoke(tmp_path):
    """benchmarks/bench_step.py on a tiny step with the GPU defaults' bf16 autocast, every backend that runs here
    (triton in its interpreter): the path a GPU session takes, minus the GPU."""
    import dre_kernels

    backends = [b for b in ("torch", "native", "triton") if b in dre_kernels.available_backends("cpu")]
    cmd = [sys.executable, "-m", "benchmarks.bench_step", "--device", "cpu", "--backends", *backends,
           "--slides", "2", "--fresh", "2", "--bank-rows", "16", "--K", "4", "--D", "32", "--P", "16",
           "--report-dim", "32", "--tile", "32", "--encoder", "vit_tiny_patch16_224", "--amp", "--warmup", "1",
           "--steps", "1", "--out", str(tmp_path)]
    env = dict(os.environ, KINETO_LOG_LEVEL="5", TRITON_INTERPRET="1")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "step.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["backend"] for r in rows) == sorted(backends)
    assert all(r["status"] == "ok" and float(r["step_ms"]) > 0 for r in rows), rows


def test_triton_sweep_and_profile_tools_smoke(monkeypatch, tmp_path):
    """benchmarks/sweep_triton.py re-launches an op's captured Triton launches over a grid of configs; here in the
    interpreter with a stand-in timer: every op's launch is captured, configs run and rank, and a fault (which on a
    GPU poisons the context) stops the sweep. profile_kernels.py and the sweep exit cleanly without a GPU."""
    import random

    import dre_kernels

    if "triton" not in dre_kernels.available_backends("cpu"):
        pytest.skip("needs triton in its interpreter")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch
    import triton.testing

    from benchmarks import profile_kernels, sweep_triton
    from benchmarks.bench_cuda import _residual_inputs
    from dre_kernels.triton_kernels import contrastive_loss as tcl
    from dre_kernels.triton_kernels import residual_encode as tre

    assert profile_kernels.main([]) == 0 and sweep_triton.main([]) == 0  # no GPU: they say so and measure nothing
    calls = []

    def fake_bench(fn, **kwargs):
        fn()
        calls.append(1)
        if fault_at and len(calls) == fault_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return float(100 - len(calls))

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    (x, xo, c, s, bank, bi, bo), _ = _residual_inputs(2, 3, 20, 5, 12, torch.device("cpu"))
    a = torch.randn(40, 9, requires_grad=True)
    b = torch.randn(40, 9, requires_grad=True)
    fault_at, rows = 0, []
    re_launches = sweep_triton.capture(tre, lambda: tre.residual_encode_fwd(x, xo, c, s, bank, bi, bo, False))
    assert [L[0].fn.__name__ for L in re_launches] == ["_re_fwd_kernel"] * 2  # fresh rows, then bank rows
    cl_launches = sweep_triton.capture(
        tcl, lambda: dre_kernels.contrastive_loss(a, b, 2.0, backend="triton").backward())
    assert [L[0].fn.__name__ for L in cl_launches] == ["_cl_fwd_kernel", "_cl_bwd_kernel", "_cl_bwd_kernel"]
    assert sweep_triton.sweep("re", re_launches[-1:], 1.0, rows, random.Random(0))
    assert sweep_triton.sweep("cl", cl_launches[1:2], 1.0, rows, random.Random(0))
    for op in ("re", "cl"):
        ran = [r for r in rows if r["op"] == op]
        assert len(ran) >= 3 and all(r["error"] == "" for r in ran), ran[:3]
        assert [r["ms"] for r in ran] == sorted(r["ms"] for r in ran) and sum(r["own_config"] for r in ran) == 1
    calls.clear()
    fault_at, rows = 2, []
    assert not sweep_triton.sweep("re", re_launches[-1:], 5.0, rows, random.Random(0))
    assert len(rows) == 2 and rows[-1]["error"] == "RuntimeError"


def test_host_overhead_benchmark(tmp_path):
    """host_overhead.py stubs every Triton launch and counts them: each op's forward launches its kernels (the
    residual_encode forward: the codeword prep, then fresh and bank rows), the backward more, and the CSV says so."""
    import dre_kernels

    if "triton" not in dre_kernels.available_backends("cpu"):
        pytest.skip("triton backend not available here")
    out = tmp_path / "host.csv"
    res = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--out", str(out), "--reps", "1",
                          "--calls", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, KINETO_LOG_LEVEL="5"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["op"], r["mode"], r["pass"]): r for r in csv.DictReader(open(out))}
    assert len(rows) == 8
    for (op, mode, pas), r in rows.items():
        assert float(r["host_us"]) > 0 and int(r["aten_ops"]) > 0, r
        if pas == "fwd+bwd":
            assert int(r["triton_launches"]) > int(rows[(op, mode, "fwd")]["triton_launches"]), r
    assert int(rows[("residual_encode", "soft", "fwd")]["triton_launches"]) == 3
    # contrastive_loss: the row norms, the pass, the column fix; backward: the norms, both sides, and with
    # normalize the normalisation's backward for each side
    assert int(rows[("contrastive_loss", "", "fwd")]["triton_launches"]) == 3
    assert int(rows[("contrastive_loss", "", "fwd+bwd")]["triton_launches"]) == 6
    assert int(rows[("contrastive_loss", "normalize", "fwd+bwd")]["triton_launches"]) == 8


def test_host_overhead_benchmark_through_tritons_launch_path(tmp_path):
    """--jit-launcher: the same calls with each launch going through Triton's autotuner and JITFunction.run (compiled
    for sm_90 here, no GPU: a stub driver) up to the driver call. Every launch the stubbed run counts goes that way, and
    the time in that path is part of the call's."""
    from test_triton_compile import _compiler_available

    reason = _compiler_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "host_jit.csv"
    res = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--jit-launcher", "--out", str(out),
                          "--reps", "1", "--calls", "2"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                              "KINETO_LOG_LEVEL": "5", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["op"], r["mode"], r["pass"]): r for r in csv.DictReader(open(out))}
    assert len(rows) == 8
    for key, r in rows.items():
        assert r["launcher"] == "jit sm_90", r
        assert 0 < float(r["launch_us"]) < float(r["host_us"]), r
    assert int(rows[("residual_encode", "soft", "fwd")]["triton_launches"]) == 3
    assert int(rows[("contrastive_loss", "normalize", "fwd+bwd")]["triton_launches"]) == 8
