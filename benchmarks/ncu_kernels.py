"""Hardware counters of the op kernels by Nsight Compute (ncu): why a kernel takes the time it takes, where
bench_cuda.py says only how long and profile_kernels.py which kernels.

    python benchmarks/ncu_kernels.py --out DIR [--cases triton:soft:fwd native:contrastive:fwd+bwd ...]
                                     [--shape step|50k] [--source] [--reports DIR]
    python benchmarks/ncu_kernels.py --list        # the cases, without profiling anything

A case, PROVIDER:OP:MODE (a bench_cuda.py provider; OP soft, hard or contrastive; MODE fwd or fwd+bwd), is one of
bench_cuda.py's calls at its shape, profiled in a process of its own:

    ncu --profile-from-start off --clock-control none --metrics METRICS -o DIR/CASE \\
        python benchmarks/ncu_kernels.py --run CASE

The child makes the call a few times with the profiler off (the first calls autotune and compile), then once
between cudaProfilerStart and cudaProfilerStop: every kernel of that one call is profiled, nothing else. Then
`ncu --import DIR/CASE.ncu-rep --csv --page raw` writes DIR/CASE.csv, and DIR/ncu.md sums each kernel up: time,
DRAM bytes and throughput, SM, issue and tensor-pipe activity, achieved occupancy, registers, L2 reductions and
atomics, shared-memory bank conflicts, and the three largest stall reasons (cycles a warp waited per instruction it
issued: long_scoreboard is global memory, barrier is __syncthreads, mio_throttle / short_scoreboard shared memory).
ncu.md is rewritten after each case, so a run cut off at its time limit keeps the cases it finished.

--clock-control none leaves the card's clocks as they are (the device tool's rule; ncu would lock them to base).
A metric this ncu does not know is dropped: ncu names it, and the case is profiled again without it.
--source adds the SourceCounters section (warp-state samples per instruction), writes CASE_source.csv beside the
report (`--page source --print-source sass`) and its most sampled lines into ncu.md, best effort: the columns are
the ones this ncu prints.
Without ncu (or a CUDA GPU) the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from benchmarks.common import write_text  # noqa: E402

# (metric, column): what the summary shows, in order. gmma: Hopper's warpgroup MMAs (Triton's tl.dot on sm_90),
# hmma: mma.sync (csrc/cuda's kernels); a chip has the one or both.
METRICS = [
    ("gpu__time_duration.sum", "time"),
    ("dram__bytes_read.sum", "dram read"),
    ("dram__bytes_write.sum", "dram write"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram %"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm %"),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue %"),
    ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "hmma %"),
    ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "gmma %"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %"),
    ("launch__registers_per_thread", "regs"),
    ("launch__shared_mem_per_block_dynamic", "dyn smem"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "block"),
    ("lts__t_sectors_op_red.sum", "L2 red sectors"),
    ("lts__t_sectors_op_atom.sum", "L2 atom sectors"),
    ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum", "smem conflicts"),
]
# ("selected", the cycle a warp issues, is not a stall)
STALL_REASONS = ("long_scoreboard", "short_scoreboard", "barrier", "mio_throttle", "lg_throttle", "wait",
                 "math_pipe_throttle", "not_selected", "dispatch_stall", "no_instruction", "membar",
                 "branch_resolving", "drain", "sleeping", "imc_miss", "tex_throttle", "misc")


def stall_metric(reason: str) -> str:
    return f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"


ALL_METRICS = [m for m, _ in METRICS] + [stall_metric(r) for r in STALL_REASONS]

OPS = ("soft", "hard", "contrastive")
MODES = ("fwd", "fwd+bwd")
# the default cases, most telling first (a run cut off keeps the first ones)
DEFAULT_CASES = ("triton:soft:fwd", "native:soft:fwd", "triton:soft:fwd+bwd", "native:soft:fwd+bwd",
                 "triton:contrastive:fwd+bwd", "native:contrastive:fwd+bwd", "triton:hard:fwd+bwd",
                 "native:hard:fwd+bwd", "native_tiled:soft:fwd")


def parse_case(case: str) -> tuple[str, str, str]:
    from benchmarks.bench_cuda import PROVIDERS

    parts = case.split(":")
    if len(parts) != 3 or parts[0] not in PROVIDERS or parts[1] not in OPS or parts[2] not in MODES:
        raise ValueError(f"case {case!r}: expected PROVIDER:OP:MODE with PROVIDER one of {PROVIDERS}, OP one of "
                         f"{OPS}, MODE one of {MODES}")
    return parts[0], parts[1], parts[2]


def case_file(case: str) -> str:
    """A file name for a case: native:soft:fwd+bwd -> native-soft-fwd_bwd."""
    return case.replace(":", "-").replace("+", "_")


# ------------------------------------------------------------------------------------------------ the child
def run_case(case: str, shape: str, contrastive_batch: int, device_name: str, warmup: int) -> int:
    """Make the case's call `warmup` times, then once inside the profiler's range (CUDA) or once more (CPU)."""
    import torch

    from benchmarks.bench_cuda import _contrastive_fn, _residual_fn, shape_inputs

    provider, op, mode = parse_case(case)
    device = torch.device(device_name)
    if op == "contrastive":
        fn = _contrastive_fn(provider, contrastive_batch, 16 if shape == "smoke" else 512, mode, device)
    else:
        inputs, _ = shape_inputs(shape, device)
        fn = _residual_fn(provider, inputs, mode, op == "hard")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    else:
        fn()
    print(f"ncu_kernels: ran {case} at {shape} on {device}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ the driver
def find_ncu() -> str | None:
    """$NCU, ncu on the PATH, or Nsight Compute's usual install places."""
    if os.environ.get("NCU"):
        return os.environ["NCU"]
    found = shutil.which("ncu")
    if found:
        return found
    cands = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")) + sorted(glob.glob("/usr/local/cuda*/bin/ncu"))
    if os.environ.get("CUDA_HOME"):
        cands.insert(0, os.path.join(os.environ["CUDA_HOME"], "bin", "ncu"))
    return next((c for c in cands if os.access(c, os.X_OK)), None)


_UNKNOWN_METRIC = re.compile(r"Failed to find metric\s+(?:regex:)?\^?([A-Za-z0-9_.]+?)\$?(?:\s|$)")


def unknown_metrics(output: str) -> list[str]:
    """The metrics an ncu error output says it does not know."""
    return _UNKNOWN_METRIC.findall(output)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def parse_raw_csv(text: str) -> list[dict]:
    """Rows of `ncu --csv --page raw`: a header ("ID","Process ID",...,metric names), a units row, one row per
    kernel; lines before the header (ncu's ==PROF== messages) are skipped. Each row: {column: str}, and "_units"."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    table = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, units, data = table[0], table[1] if len(table) > 1 else [], table[2:]
    unit_of = dict(zip(header, units))
    return [dict(zip(header, row), _units=unit_of) for row in data if len(row) == len(header)]


def _scaled(row: dict, metric: str, want: str) -> float | None:
    """A metric's value in the unit `want` (s, byte, %, or as it is), from the unit ncu printed."""
    value = _number(row.get(metric, ""))
    if value is None:
        return None
    unit = row["_units"].get(metric, "").strip().lower()
    scale = {"s": {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6,
                   "ms": 1e-3},
             "byte": {"byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "kibyte": 1024.0,
                      "mibyte": 1024.0 ** 2, "gibyte": 1024.0 ** 3}}.get(want, {})
    return value * scale.get(unit, 1.0)


def kernel_summary(row: dict) -> dict:
    """One kernel's numbers for the table (None where this ncu did not give the metric)."""
    # the name without its parameter list (ncu prints it unless --print-kernel-base function took): template
    # arguments kept, they tell instantiations apart
    name = re.sub(r"\([^()]*\)\s*$", "", row.get("Kernel Name", "?")).replace("void ", "").strip()
    t = _scaled(row, "gpu__time_duration.sum", "s")
    rd = _scaled(row, "dram__bytes_read.sum", "byte")
    wr = _scaled(row, "dram__bytes_write.sum", "byte")
    out = {"kernel": name, "time_us": None if t is None else 1e6 * t,
           "dram_mb": None if rd is None or wr is None else (rd + wr) / 1e6,
           "dram_gbs": None if t in (None, 0.0) or rd is None or wr is None else (rd + wr) / t / 1e9}
    for metric, column in METRICS:
        if column not in ("time", "dram read", "dram write"):  # those three are in the derived columns above
            out[column] = _number(row.get(metric, ""))
    stalls = [(v, r) for r in STALL_REASONS if (v := _number(row.get(stall_metric(r), ""))) is not None]
    out["stalls"] = sorted(stalls, reverse=True)[:3]
    return out


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.{digits}f}"
    return f"{int(v)}"


def summary_markdown(case: str, rows: list[dict]) -> str:
    cols = ["time us", "dram MB", "dram GB/s", "dram %", "sm %", "issue %", "hmma %", "gmma %", "occupancy %",
            "regs", "dyn smem", "grid x block", "L2 red+atom sectors", "smem conflicts", "top stalls (cycles/issue)"]
    lines = [f"### {case}", "", "| kernel | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    total = 0.0
    for r in map(kernel_summary, rows):
        total += r["time_us"] or 0.0
        atom = [r[c] for c in ("L2 red sectors", "L2 atom sectors") if r[c] is not None]
        cells = [_fmt(r["time_us"]), _fmt(r["dram_mb"]), _fmt(r["dram_gbs"]), _fmt(r["dram %"]), _fmt(r["sm %"]),
                 _fmt(r["issue %"]), _fmt(r["hmma %"]), _fmt(r["gmma %"]), _fmt(r["occupancy %"]), _fmt(r["regs"]),
                 _fmt(r["dyn smem"]), f"{_fmt(r['grid'])} x {_fmt(r['block'])}",
                 _fmt(sum(atom)) if atom else "-", _fmt(r["smem conflicts"]),
                 ", ".join(f"{name} {v:.1f}" for v, name in r["stalls"]) or "-"]
        lines.append(f"| {r['kernel'][:60]} | " + " | ".join(cells) + " |")
    lines += ["", f"{len(rows)} kernels, {total:.1f} us of device time under the profiler.", ""]
    return "\n".join(lines)


def source_hot_spots(text: str, top: int = 25) -> str:
    """The instructions with the most warp-state samples, from `--page source --csv` (best effort: the columns
    are the ones this ncu prints; empty if it has none counting samples)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"') and "Source" in line), None)
    if start is None:
        return ""
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    if not rows:
        return ""
    sample_col = next((c for c in rows[0] if c and c.startswith("Warp Stall Sampling (All")), None)
    if sample_col is None:
        return ""
    ranked = sorted(rows, key=lambda r: _number(r.get(sample_col, "")) or 0.0, reverse=True)[:top]
    return "\n".join(f"    {_fmt(_number(r.get(sample_col, '')), 0):>8s}  {r.get('Source', '')[:110]}" for r in ranked)


def _import(ncu: str, report: str, page: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`ncu --import report --csv PAGE`, with the printing options this script prefers where this ncu has them."""
    preferred = ["--print-units", "base", "--print-kernel-base", "function"]
    res = subprocess.run([ncu, "--import", report, "--csv", *page, *preferred], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        res = subprocess.run([ncu, "--import", report, "--csv", *page], capture_output=True, text=True,
                             timeout=timeout)
    return res


def source_csv(report: str) -> str:
    """Where the source page of a report goes: beside it (every SASS line of every kernel, megabytes)."""
    return report.removesuffix(".ncu-rep") + "_source.csv"


def profile_case(ncu: str, case: str, out_dir: str, args, metrics: list[str]) -> tuple[list[dict], list[str], str, str]:
    """Profile one case: (raw rows, the metrics kept, a status line, the source page's hot spots (--source) or "");
    its ncu output goes to DIR/CASE.log."""
    base = os.path.join(out_dir, case_file(case))
    report = os.path.join(args.reports or out_dir, case_file(case))
    child = [sys.executable, os.path.abspath(__file__), "--run", case, "--shape", args.shape, "--device",
             args.device, "--contrastive-batch", str(args.contrastive_batch), "--warmup", str(args.warmup)]
    metrics = list(metrics)
    with open(base + ".log", "w") as log:
        for _ in range(8):  # each retry drops the metrics ncu named as unknown
            cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--metrics", ",".join(metrics),
                   "--force-overwrite", "--export", report]
            if args.source:
                cmd += ["--section", "SourceCounters", "--import-source", "yes"]
            log.write("$ " + " ".join(cmd + child) + "\n")
            log.flush()
            try:
                res = subprocess.run(cmd + child, capture_output=True, text=True, timeout=args.case_timeout)
            except subprocess.TimeoutExpired:
                return [], metrics, f"timed out after {args.case_timeout} s", ""
            log.write(res.stdout + res.stderr)
            unknown = [m for m in unknown_metrics(res.stdout + res.stderr) if m in metrics]
            if res.returncode != 0 and unknown:
                metrics = [m for m in metrics if m not in unknown]
                log.write(f"# dropping metrics this ncu does not know: {unknown}\n")
                continue
            if res.returncode != 0:
                tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
                return [], metrics, f"ncu exit status {res.returncode}: {' | '.join(tail)}", ""
            break
        else:
            return [], metrics, "ncu kept naming unknown metrics", ""
    report += ".ncu-rep"
    imp = _import(ncu, report, ["--page", "raw"], args.case_timeout)
    with open(base + ".csv", "w") as f:
        f.write(imp.stdout)
    rows = parse_raw_csv(imp.stdout)
    hot = ""
    if args.source:
        src = _import(ncu, report, ["--page", "source", "--print-source", "sass"], args.case_timeout)
        with open(source_csv(report), "w") as f:
            f.write(src.stdout if src.returncode == 0 else src.stdout + src.stderr)
        hot = source_hot_spots(src.stdout) if src.returncode == 0 else ""
    status = f"{len(rows)} kernels" if rows else f"no kernels in the report (import exit status {imp.returncode})"
    return rows, metrics, status, hot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="PROVIDER:OP:MODE ...")
    ap.add_argument("--shape", default="step", choices=["step", "50k", "smoke"],
                    help="bench_cuda.py's shapes (smoke: tiny, for tests)")
    ap.add_argument("--contrastive-batch", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=3, help="calls before the profiled one (autotuning, compiles)")
    ap.add_argument("--source", action="store_true", help="also sample warp states per instruction (SourceCounters)")
    ap.add_argument("--case-timeout", type=int, default=300, help="seconds one case's ncu run may take")
    ap.add_argument("--out", default="ncu_out", help="the CSVs, logs and ncu.md")
    ap.add_argument("--reports", help="the .ncu-rep reports (default: --out; megabytes each with --source)")
    ap.add_argument("--list", action="store_true", help="print the cases and the metrics; profile nothing")
    ap.add_argument("--run", metavar="CASE", help=argparse.SUPPRESS)  # the child under ncu
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # the child's (cpu: tests)
    args = ap.parse_args(argv)
    if args.run:
        return run_case(args.run, args.shape, args.contrastive_batch, args.device, args.warmup)
    try:
        for case in args.cases:
            parse_case(case)  # a typo fails here, not after minutes of profiling
    except ValueError as e:
        ap.error(str(e))
    if args.list:
        print("\n".join(args.cases))
        print("metrics:", ",".join(ALL_METRICS))
        return 0
    ncu = find_ncu()
    if ncu is None:
        print("ncu_kernels: no Nsight Compute (ncu) here; set NCU to its path (nothing measured)", file=sys.stderr)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("ncu_kernels: no CUDA GPU here (nothing measured)", file=sys.stderr)
            return 0
    os.makedirs(args.out, exist_ok=True)
    if args.reports:
        os.makedirs(args.reports, exist_ok=True)
    metrics = list(ALL_METRICS)
    parts = [f"# Nsight Compute counters ({args.shape} shape, contrastive B={args.contrastive_batch})", ""]
    failed = 0
    for case in args.cases:
        rows, metrics, status, hot = profile_case(ncu, case, args.out, args, metrics)
        print(f"ncu_kernels: {case}: {status}", flush=True)
        if rows:
            parts.append(summary_markdown(case, rows))
            if hot:
                parts += ["Most sampled instructions (warp-state samples, all reasons):", "", hot, ""]
        else:
            failed += 1
            parts += [f"### {case}", "", f"not profiled: {status}", ""]
        write_text(os.path.join(args.out, "ncu.md"), "\n".join(parts))
    dropped = sorted(set(ALL_METRICS) - set(metrics))
    if dropped:
        print(f"ncu_kernels: metrics this ncu does not know (dropped): {dropped}")
    with open(os.path.join(args.out, "ncu.md")) as f:
        print(f.read())
    return 1 if failed == len(args.cases) else 0


if __name__ == "__main__":
    sys.exit(main())
