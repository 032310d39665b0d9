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


# A stand-in for Nsight Compute's command line, as benchmarks/ncu_kernels.py uses it: profiling runs the app (and
# fails on a metric it "does not know", as ncu does), --import --page raw prints a raw-page CSV of two kernels for
# the metrics profiled, any other page fails (the script's source page is best effort).
_FAKE_NCU = r'''
import csv, json, subprocess, sys
args = sys.argv[1:]
UNKNOWN = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
if "--import" in args:
    rep = json.load(open(args[args.index("--import") + 1]))
    if args[args.index("--page") + 1] == "source":
        print('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"')
        for i, n in enumerate([5, 400, 30]):
            print(f'"0x{16 * i:x}","LDG.E.128 R{i}, desc[UR4][R2.64]","{n}","{n // 2}"')
        sys.exit(0)
    value = {"gpu__time_duration.sum": ("nsecond", "1,234"), "dram__bytes_read.sum": ("byte", "2,000,000"),
             "dram__bytes_write.sum": ("byte", "1,000,000"), "launch__registers_per_thread": ("register", "168"),
             "launch__grid_size": ("", "132"), "launch__block_size": ("", "256"),
             "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": ("", "9.5"),
             "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": ("", "3.5"),
             "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": ("", "1.0")}
    print("==PROF== Connected to process 1")
    fixed = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
             "Grid Size", "Device", "CC"]
    w = csv.writer(sys.stdout, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(fixed + rep["metrics"])
    w.writerow([""] * len(fixed) + [value.get(m, ("", ""))[0] for m in rep["metrics"]])
    for i, name in enumerate(["_re_fwd_kernel", "void dre_re_fwd_tc_full<(int)64>(const float *, int)"]):
        w.writerow([str(i), "1", "python", "h", name, "1", "7", "(256, 1, 1)", "(132, 1, 1)", "0", "9.0"]
                   + [value.get(m, ("", "0.1"))[1] for m in rep["metrics"]])
    sys.exit(0)
with_value = {"--profile-from-start", "--clock-control", "--metrics", "--export", "--section", "--import-source"}
i = 0
while args[i].startswith("--"):
    i += 2 if args[i] in with_value else 1
opts, app = args[:i], args[i:]
metrics = opts[opts.index("--metrics") + 1].split(",")
if UNKNOWN in metrics:
    print(f"==ERROR== Failed to find metric regex:^{UNKNOWN}$")
    sys.exit(1)
res = subprocess.run(app, capture_output=True, text=True)
print(res.stdout + res.stderr)
if res.returncode == 0 and "ncu_kernels: ran" in res.stdout:
    json.dump({"metrics": metrics}, open(opts[opts.index("--export") + 1] + ".ncu-rep", "w"))
sys.exit(res.returncode)
'''


def test_ncu_kernels_driver_with_a_stand_in_ncu(monkeypatch, tmp_path):
    """benchmarks/ncu_kernels.py runs only where Nsight Compute and a GPU are: here a stand-in ncu (above) runs the
    script's real child (torch provider, tiny shapes, CPU) and prints a raw page in ncu's layout, so that the
    command lines, the retry without a metric ncu does not know, the parsing (units, thousands separators) and the
    summary are checked before a GPU session spends minutes on them. The raw page's layout is the one ncu's
    documentation gives, not yet seen from the real ncu."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import ncu_kernels

    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\n{_FAKE_NCU}")
    fake.chmod(0o755)
    monkeypatch.setenv("NCU", str(fake))
    out = tmp_path / "out"
    cases = ["torch:soft:fwd", "torch:contrastive:fwd+bwd"]
    assert ncu_kernels.main(["--cases", *cases, "--shape", "smoke", "--contrastive-batch", "64", "--device", "cpu",
                             "--warmup", "1", "--source", "--out", str(out),
                             "--reports", str(tmp_path / "reports")]) == 0
    md = (out / "ncu.md").read_text()
    for case in cases:
        assert f"### {case}" in md and (out / f"{ncu_kernels.case_file(case)}.csv").exists()
        log = (out / f"{ncu_kernels.case_file(case)}.log").read_text()
        assert "--clock-control none" in log and f"ran {case} at smoke on cpu" in log
    rows = [line for line in md.splitlines() if line.startswith("| _re_fwd_kernel") or line.startswith("| dre_re")]
    assert len(rows) == 4  # two kernels per case, their names without parameters
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[1:4] == ["1.2", "3", "2431.1"]  # 1,234 ns; 2 + 1 MB; 3 MB / 1.234 us
    assert cells[10] == "168" and cells[12] == "132 x 256"
    assert cells[-1] == "long_scoreboard 9.5, barrier 3.5, wait 1.0"  # the three largest stalls, largest first
    assert [line.split("|")[1].strip() for line in rows[:2]] == ["_re_fwd_kernel", "dre_re_fwd_tc_full<(int)64>"]
    # the unknown metric was dropped (first case) and not asked for again (second case)
    assert (out / "torch-soft-fwd.log").read_text().count("dropping metrics") == 1
    hot = md.split("Most sampled instructions")[1].splitlines()[2:5]  # the source page's lines, most samples first
    assert [line.split()[0] for line in hot] == ["400", "30", "5"] and "LDG.E.128 R1" in hot[0]
    assert (tmp_path / "reports" / "torch-soft-fwd_source.csv").exists()
    assert "dropping" not in (out / "torch-contrastive-fwd_bwd.log").read_text()
    # bad cases fail before any profiling; no ncu: nothing measured, status 0
    with pytest.raises(SystemExit):
        ncu_kernels.main(["--cases", "torch:soft:backward", "--out", str(tmp_path / "x")])
    monkeypatch.setenv("NCU", "")
    monkeypatch.setattr(ncu_kernels.shutil, "which", lambda name: None)
    monkeypatch.setattr(ncu_kernels.glob, "glob", lambda pattern: [])
    monkeypatch.delenv("CUDA_HOME", raising=False)
    assert ncu_kernels.main(["--cases", "torch:soft:fwd", "--out", str(tmp_path / "y")]) == 0
    assert not (tmp_path / "y").exists()
