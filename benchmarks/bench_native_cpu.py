"""native vs torch on CPU: residual_encode forward+backward at the DRE-SLCL step shape (SPEC.md), float32 bank.

    .venv/bin/python benchmarks/bench_native_cpu.py [--reps 7] [--bank-rows 262144] [--assignments soft,hard]

Shape: B=16 slides, 128 fresh + 8192 bank rows each, K=64, D=384; x, codewords and scale float32 and requiring
grad; the bank (T x D, float32, L2-normalised rows) is gathered through bank_index. Mode `fwd+bwd` is
`residual_encode(...).square().sum().backward()` (no cached graph; every call re-runs forward and backward); mode
`fwd` runs under the same requires_grad settings.

Method. Each (provider, assignment) runs in its own child process, so one provider's allocator state cannot hide
or inflate the other's peak:
  - time: benchmarks.common.time_ms (wall clock after one warm-up call; p20/p50/p80 of `--reps` samples);
  - peak_rss_mb: the peak resident-set increase during one call: VmHWM is reset through /proc/self/clear_refs
    ("5"), then (VmHWM after - VmRSS before). Catches every allocation (torch tensors, std::vector scratch, MKL
    buffers), measured on the first call after inputs exist (the warm-up of a tiny problem runs before);
  - peak_tensor_mb: benchmarks.common.peak_mb (torch.profiler: tensor memory only, exact, a lower bound);
  - peak_mb = max(peak_rss_mb, peak_tensor_mb), the figure the memory ratio uses: the RSS increase alone can read
    ~0 when a call fits in memory the allocator kept from the warm-up.
The machine is shared (2 cores); the load average at the start of each child is recorded with its row.
Writes benchmarks/results/cpu_native_residual_encode.csv and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "cpu_native_residual_encode.csv")
SHAPE = dict(B=16, fresh=128, bank=8192, K=64, D=384)


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def child(provider: str, assignment: str, mode: str, reps: int, bank_rows: int) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from benchmarks import common
    from dre_kernels import residual_encode

    torch.manual_seed(0)
    B, Mf, Mb, K, D = (SHAPE[k] for k in ("B", "fresh", "bank", "K", "D"))
    bank = torch.nn.functional.normalize(torch.randn(bank_rows, D), dim=1)
    bank_index = torch.randint(0, bank_rows, (B * Mb,))
    bank_offsets = torch.arange(B + 1) * Mb
    x = torch.nn.functional.normalize(torch.randn(B * Mf, D), dim=1).requires_grad_()
    x_offsets = torch.arange(B + 1) * Mf
    # codewords from the data, so the soft assignment is neither uniform nor one-hot
    codewords = bank[torch.randperm(bank_rows)[:K]].clone().requires_grad_()
    scale = torch.full((K,), 10.0, requires_grad=True)

    def call(xx, oo, cc, ss, bk, bi, bo):
        E = residual_encode(xx, oo, cc, ss if assignment == "soft" else None, bank=bk, bank_index=bi,
                            bank_offsets=bo, assignment=assignment, backend=provider)
        if mode == "fwd+bwd":
            E.square().sum().backward()
        return E

    def fn():
        for t in (x, codewords, scale):
            t.grad = None
        return call(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets)

    # warm up the library, MKL and autograd on a tiny problem, then measure the peak RSS of one real call
    tiny = torch.randn(8, D)
    call(tiny.clone().requires_grad_(), torch.tensor([0, 8]), codewords, scale, tiny, torch.arange(8),
         torch.tensor([0, 8]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS:")
    fn()
    peak_rss_mb = (_rss_kib("VmHWM:") - before) * 1024 / 1e6
    load = common.load_average()
    p20, p50, p80, n = _times(common, fn, reps)
    peak_tensor_mb = common.peak_mb(fn, torch.device("cpu"))
    return dict(provider=provider, assignment=assignment, mode=mode, time_p20_ms=p20, time_p50_ms=p50,
                time_p80_ms=p80, reps=n, peak_rss_mb=peak_rss_mb, peak_tensor_mb=peak_tensor_mb,
                peak_mb=max(peak_rss_mb, peak_tensor_mb), load_avg=load,
                threads=torch.get_num_threads(), torch=torch.__version__)


def _times(common, fn, reps):
    import torch

    (p20, p50, p80), n = common.time_ms(fn, torch.device("cpu"), warmup=1, reps=reps, min_reps=reps, budget_s=1e9,
                                        slow_call_s=60.0)
    return p20, p50, p80, n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--bank-rows", type=int, default=262144, help="rows T of the bank the rows are gathered from")
    ap.add_argument("--assignments", default="soft,hard")
    ap.add_argument("--modes", default="fwd+bwd,fwd")
    ap.add_argument("--providers", default="torch,native")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each child (0: torch's default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        provider, assignment, mode = args.child.split(":")
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(child(provider, assignment, mode, args.reps, args.bank_rows)))
        return

    sys.path.insert(0, ROOT)
    from benchmarks import common

    rows = []
    for assignment in args.assignments.split(","):
        for mode in args.modes.split(","):
            for provider in args.providers.split(","):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{provider}:{assignment}:{mode}",
                       "--reps", str(args.reps), "--bank-rows", str(args.bank_rows), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode != 0 or not lines:
                    print(f"{provider} {assignment} {mode} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(lines[-1][len("RESULT "):]))
    base = {(r["assignment"], r["mode"]): r for r in rows if r["provider"] == "torch"}
    commit, machine = common.git_commit(), f"{platform.node()} ({common.cpu_model()}, {os.cpu_count()} cpus)"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in rows:
        t = base.get((r["assignment"], r["mode"]))
        r["speedup_vs_torch"] = round(t["time_p50_ms"] / r["time_p50_ms"], 3) if t else ""
        # p20: less sensitive to the other jobs on a shared machine
        r["speedup_p20_vs_torch"] = round(t["time_p20_ms"] / r["time_p20_ms"], 3) if t else ""
        r["peak_ratio_torch_over_this"] = round(t["peak_mb"] / max(r["peak_mb"], 1e-3), 1) if t else ""
        r.update(B=SHAPE["B"], fresh_per_slide=SHAPE["fresh"], bank_per_slide=SHAPE["bank"], K=SHAPE["K"],
                 D=SHAPE["D"], bank_rows=args.bank_rows, x_dtype="float32", bank_dtype="float32", machine=machine,
                 commit=commit, timestamp=stamp)
    header = (f"residual_encode at B={SHAPE['B']}, {SHAPE['fresh']} fresh + {SHAPE['bank']} bank rows/slide, "
              f"K={SHAPE['K']}, D={SHAPE['D']}, float32 (bank of {args.bank_rows} rows) on {machine}, "
              f"torch {rows[0]['torch'] if rows else '?'}, commit {commit}")
    print(header)
    cols = ["assignment", "mode", "provider", "time_p20_ms", "time_p50_ms", "time_p80_ms", "peak_rss_mb",
            "peak_tensor_mb", "speedup_vs_torch", "speedup_p20_vs_torch", "peak_ratio_torch_over_this", "load_avg"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    if rows:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        fields = cols + [k for k in rows[0] if k not in cols]
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
