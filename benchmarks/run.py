"""Benchmark every dre op x every available provider x modes fwd/bwd/fwd+bwd over sweeps of shapes.

    python -m benchmarks.run                 # default sweep for the device present (cuda if available)
    python -m benchmarks.run --quick         # the one-minute subset (small shapes)
    python -m benchmarks.run --ops residual_encode_soft contrastive_loss --providers torch native --modes fwd

Writes benchmarks/results/<device-slug>/results.csv (one row per measurement), results.md (tables) and
plots/*.png (time and peak memory against rows per slide, or loss batch B, one line per provider).
Sweeps (benchmarks/cases.py): "gpu" on CUDA (B=16 slides, rows per slide 1k..64k, K 16..256, D 128..1024, loss B
64..65536, float32/bfloat16/float16; 960 measurements, an estimated 30-60 minutes on an H100, a good part of it
torch.compile), "cpu" on CPU (B=4 slides, rows per slide 1k..8320, K 16..256 and D 128..1024 at 2048 rows per
slide, loss B 64..4096, float32/bfloat16; ~390 measurements, 11 minutes measured on 2 busy cores with --threads 1,
half of it the `reference` backend), and "quick" (tiny; about a minute on CPU once torch.compile's cache in /tmp
is warm, two when cold).
On a shared CPU use --threads 1: with 2 threads on an oversubscribed machine every OpenMP barrier waits for the
descheduled thread and a 4 us gather reads as 16 ms. Both GPU and CPU sweeps include the headline shape (B=16, 128 + 8192
rows per slide, K=64, D=384, bf16 bank).
Method (timing, memory, bandwidth): see benchmarks/common.py; shapes and bytes: benchmarks/cases.py.
A provider/shape whose estimated memory exceeds --mem-budget-gb is recorded as skipped (times NaN); an
out-of-memory error is recorded as inf; any other error is recorded with its message.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import sys
import time
import warnings

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (CPU peak memory) is chatty otherwise

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import cases as C  # noqa: E402
from benchmarks import common  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

COLUMNS = ["device", "device_type", "torch", "triton", "cuda", "commit", "threads", "op", "provider", "mode",
           "sweep", "B", "rows_per_slide", "fresh_per_slide", "K", "D", "P", "dtype", "bank_dtype",
           "p20_ms", "p50_ms", "p80_ms", "reps", "peak_mb", "gbs", "bw_share", "speedup_vs_torch", "status",
           "peak_bw_gbs", "meas_s"]


def measure(case, provider, mode, inputs, device, budget_bytes, timing):
    """One CSV row's measured fields: times, reps, peak memory, status."""
    nan = math.nan
    why = C.skip_reason(case, provider, mode, budget_bytes)
    if why:
        return dict(p20_ms=nan, p50_ms=nan, p80_ms=nan, reps=0, peak_mb=nan, status=why)
    fn = None
    try:
        fn = C.build(case, provider, mode, inputs)
        (p20, p50, p80), reps = common.time_ms(fn, device, warmup=C.warmup_calls(provider), **timing)
        mem = common.peak_mb(fn, device)
        return dict(p20_ms=p20, p50_ms=p50, p80_ms=p80, reps=reps, peak_mb=mem, status="ok")
    except Exception as e:  # noqa: BLE001 - every failure is a recorded result, never the end of the sweep
        inf = math.inf
        if common.is_oom(e):
            return dict(p20_ms=inf, p50_ms=inf, p80_ms=inf, reps=0, peak_mb=inf, status="oom")
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        return dict(p20_ms=nan, p50_ms=nan, p80_ms=nan, reps=0, peak_mb=nan, status=f"error: {msg}")
    finally:
        del fn
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def add_derived(rows):
    """GB/s, bandwidth share and speedup against `torch` (same op, shape and mode) on every row."""
    torch_ms = {(r["_case"].key, r["mode"]): r["p50_ms"] for r in rows if r["provider"] == "torch"}
    for r in rows:
        r["gbs"] = C.gbs(r["_case"], r["mode"], r["p50_ms"])
        bw = r["peak_bw_gbs"]
        r["bw_share"] = r["gbs"] / bw if bw and bw > 0 else math.nan
        t = torch_ms.get((r["_case"].key, r["mode"]), math.nan)
        ok = r["status"] == "ok" and t > 0 and not math.isinf(t)
        r["speedup_vs_torch"] = t / r["p50_ms"] if ok and r["p50_ms"] > 0 else math.nan


def case_fields(c):
    loss = c.op == "contrastive_loss"
    return dict(op=c.op, sweep=c.sweep, B=c.B, rows_per_slide="" if loss else c.rows,
                fresh_per_slide=c.fresh if c.op.startswith("residual_encode") else "", K=c.K or "", D=c.D or "",
                P=c.P or "", dtype=c.dtype, bank_dtype=c.bank_dtype)


def _fmt(v, digits=4):
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}g}"
    return str(v)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})


def _cell(r):
    if r["status"] == "oom":
        return "OOM"
    if r["status"].startswith("skipped"):
        return "skip"
    if r["status"] != "ok":
        return "error"
    s = f"{r['p50_ms']:.3g} ms, {r['peak_mb']:.3g} MB"
    if not math.isnan(r["speedup_vs_torch"]) and r["provider"] != "torch":
        s += f", {r['speedup_vs_torch']:.2f}x"
    return s


def write_markdown(path, rows, env, providers, header_notes):
    lines = [f"# dre-kernels benchmarks: {env['device']}", ""]
    lines += [f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, "
              f"{env['threads']} threads; {header_notes['date']}",
              f"- scale `{header_notes['scale']}`; peak bandwidth {env['peak_bw_gbs']} GB/s ({env['peak_bw_source']})",
              f"- load average (1 min) {header_notes['load_before']:.2f} before, {header_notes['load_after']:.2f} "
              f"after, on {os.cpu_count()} cores; wall time {header_notes['wall_s']:.0f} s"]
    for note in header_notes["notes"]:
        lines.append(f"- **{note}**")
    lines += ["", "Cells: p50 time, peak extra memory, speedup against `torch` (p50 / p50). Times: "
              "`triton.testing.do_bench` on GPU, repeated wall-clock timing on CPU (benchmarks/common.py). "
              "`skip`: estimated memory over the budget (or a Python loop too slow); OOM: out of memory; "
              "full numbers (p20/p80, GB/s, bandwidth share) in results.csv. `torch_compile` is the `torch` "
              "backend under torch.compile(fullgraph=False) (it graph-breaks on .tolist() of the offsets), compile "
              "time excluded. Modes: `fwd` is the training forward (inputs require grad), `bwd` the backward of one "
              "forward. Peak memory: torch.cuda.max_memory_allocated on GPU, the profiler's allocation events on "
              "CPU (tensor memory only).", ""]
    errors = {}
    head_keys = {c.key for c in C.headline_cases()}
    head = [r for r in rows if r["_case"].key in head_keys]
    groups = [("Headline shape (B=16 slides, 128 fresh + 8192 bank rows, K=64, D=384, bf16 bank)", head)] if head else []
    for op in C.OPS:
        op_rows = [r for r in rows if r["op"] == op and r["sweep"] != "headline"]
        if op_rows:
            groups.append((op, op_rows))
    for title, grp in groups:
        lines += [f"## {title}", "", "| shape | mode | " + " | ".join(providers) + " |",
                  "|---|---|" + "---|" * len(providers)]
        keys = []
        for r in grp:
            k = (r["_case"].key, r["mode"])
            if k not in keys:
                keys.append(k)
        for key, mode in keys:
            by_p = {r["provider"]: r for r in grp if r["_case"].key == key and r["mode"] == mode}
            any_r = next(iter(by_p.values()))
            label = any_r["_case"].label() if title in C.OPS else f"{any_r['op']} {any_r['_case'].label()}"
            lines.append(f"| {label} | {mode} | " + " | ".join(_cell(by_p[p]) if p in by_p else "" for p in providers)
                         + " |")
            for p, r in by_p.items():
                if r["status"].startswith("error"):
                    errors.setdefault((p, r["status"]), []).append(f"{r['op']} {mode}")
        lines.append("")
    if errors:
        lines += ["## Errors", ""]
        for (p, msg), where in errors.items():
            lines.append(f"- `{p}` ({len(where)}x, e.g. {where[0]}): {msg}")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="the one-minute subset (small shapes)")
    p.add_argument("--scale", choices=sorted(C.SCALES), help="sweep sizes (default: gpu on cuda, cpu on cpu)")
    p.add_argument("--ops", nargs="+", choices=C.OPS, default=list(C.OPS))
    p.add_argument("--providers", nargs="+", help="default: reference torch torch_compile + available kernels")
    p.add_argument("--modes", nargs="+", choices=C.MODES, default=list(C.MODES))
    p.add_argument("--sweeps", nargs="+", help="only these sweeps (rows K D dtype B headline)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device-slug>)")
    p.add_argument("--mem-budget-gb", type=float,
                   help="skip estimates above this (default: 90%% of GPU memory; on CPU min(6, MemAvailable/2))")
    p.add_argument("--reps", type=int, default=20, help="CPU: at most this many timed calls")
    p.add_argument("--budget-s", type=float, default=1.0, help="CPU: stop repeating after this many seconds")
    p.add_argument("--note", action="append", default=[], help="a line for the Markdown header (repeatable)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's default")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = "quick" if args.quick else (args.scale or ("gpu" if device.type == "cuda" else "cpu"))
    if args.mem_budget_gb is not None:
        budget = args.mem_budget_gb * 1e9
    elif device.type == "cuda":
        budget = 0.9 * common.device_memory_bytes(device)
    else:
        budget = min(6e9, common.device_memory_bytes(device) / 2)
    providers = C.default_providers(device, args.providers)
    cases = [c for c in C.make_cases(scale, args.ops) if not args.sweeps or c.sweep in args.sweeps]
    jobs = [(c, p, m) for c in cases for m in C.modes_of(c.op) if m in args.modes for p in providers]
    out_dir = args.out or os.path.join(RESULTS, common.device_slug(device))
    os.makedirs(out_dir, exist_ok=True)

    load_before = common.load_average()
    env = common.environment(device)
    timing = dict(reps=args.reps, budget_s=args.budget_s) if device.type == "cpu" else {}
    if args.quick:
        timing = dict(reps=min(args.reps, 10), budget_s=min(args.budget_s, 0.3)) if device.type == "cpu" else \
            dict(gpu_warmup_ms=10, gpu_rep_ms=30)
    t0 = time.time()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is pinned in requirements
        tqdm = None
    bar = tqdm(total=len(jobs), disable=args.no_progress, unit="meas", dynamic_ncols=True) if tqdm else None
    rows = []
    warnings.filterwarnings("ignore", category=FutureWarning)
    for c in cases:
        inputs = C.make_inputs(c, device)
        for m in C.modes_of(c.op):
            if m not in args.modes:
                continue
            for p in providers:
                if bar:
                    bar.set_description(f"{c.op} {m} {p} {c.label()}"[:70])
                r = dict(env, **case_fields(c), provider=p, mode=m, _case=c)
                t_meas = time.perf_counter()
                r.update(measure(c, p, m, inputs, device, budget, timing))
                r["meas_s"] = time.perf_counter() - t_meas  # whole measurement: build, compile, timing, memory
                rows.append(r)
                if bar:
                    bar.update(1)
        del inputs
    if bar:
        bar.close()
    add_derived(rows)
    wall = time.time() - t0
    load_after = common.load_average()
    notes = list(args.note)
    if load_before > 0.5 * (os.cpu_count() or 1) or load_after > 0.5 * (os.cpu_count() or 1):
        notes.append(f"Noisy: the machine was busy (load average {max(load_before, load_after):.1f} on "
                     f"{os.cpu_count()} cores); treat these times as indicative only.")
    header = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), scale=scale, load_before=load_before,
                  load_after=load_after, wall_s=wall, notes=notes)
    csv_path = os.path.join(out_dir, "results.csv")
    md_path = os.path.join(out_dir, "results.md")
    write_csv(csv_path, rows)
    write_markdown(md_path, rows, env, providers, header)
    written = [csv_path, md_path]
    if not args.no_plots:
        from benchmarks import plots

        written += plots.plot_all(rows, os.path.join(out_dir, "plots"), title=env["device"])
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} measurements ({n_ok} ok) in {wall:.0f} s on {env['device']}; wrote {out_dir}/ "
          f"(results.csv, results.md, {len(written) - 2} plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
