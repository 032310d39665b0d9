"""Timing, peak memory, bandwidth and environment for the benchmark suite.

Time (`time_ms`): p20/p50/p80 in milliseconds.
  - CUDA: `triton.testing.do_bench(fn, warmup, rep, quantiles=[0.2, 0.5, 0.8])` (CUDA events, L2 flushed between
    calls by do_bench).
  - CPU: wall clock (`time.perf_counter`) of `fn()` after `warmup` calls, repeated until `reps` samples or
    `budget_s` seconds, at least `min_reps` samples; quantiles by linear interpolation. A call slower than
    `slow_call_s` in warm-up is not repeated: its warm-up time is the one sample (column `reps` says so).

Peak memory (`peak_mb`): the extra memory one call of `fn` needs, above what was live before it.
  - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
  - CPU: torch.profiler with profile_memory=True records every allocation and free of torch's CPU allocator;
    the running sum of those events in time order is the live tensor memory, and its maximum is the peak.
    Resolution: exact to the byte for tensor memory (every allocation is an event, nothing is sampled); blind to
    memory that does not go through torch's allocator (std::vector scratch in C++ kernels, oneDNN/BLAS
    workspaces, Python objects), so it is a lower bound on the RSS increase. Peak RSS sampling (/proc/self/statm)
    was rejected: glibc keeps freed blocks mapped, so RSS after earlier measurements does not fall back and
    the increase of a later one reads as ~0; VmHWM cannot be reset without a child process per measurement.

Bandwidth share: achieved GB/s over the device's peak. GPUs from a table of datasheet numbers (KNOWN_BANDWIDTH);
on CPU a STREAM-like copy (`b.copy_(a)` of 2 x 128 MB float32, counted as read + write, best of 5) measured once.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

# Datasheet DRAM bandwidth, GB/s (1e9 bytes/s). Matched in order against torch.cuda.get_device_name().
KNOWN_BANDWIDTH = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),       # SXM
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),       # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- time
def _quantiles(samples):
    if len(samples) == 1:
        return samples * 3
    qs = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: qs[1] = p20, qs[4] = p50, qs[7] = p80
    return [qs[1], statistics.median(samples), qs[7]]


def time_ms(fn, device: torch.device, *, warmup=1, reps=20, min_reps=3, budget_s=1.0, slow_call_s=5.0,
            gpu_warmup_ms=25, gpu_rep_ms=100):
    """(p20, p50, p80) in ms and the number of samples (-1 on CUDA, where do_bench decides)."""
    if device.type == "cuda":
        import triton.testing

        p20, p50, p80 = triton.testing.do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, quantiles=[0.2, 0.5, 0.8])
        return (float(p20), float(p50), float(p80)), -1
    last = None
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
    if last > slow_call_s:
        return tuple(_quantiles([1e3 * last])), 1
    samples = []
    t_start = time.perf_counter()
    while len(samples) < reps and (len(samples) < min_reps or time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - t0))
    return tuple(_quantiles(samples)), len(samples)


# ---------------------------------------------------------------------------------------------- memory
def peak_mb(fn, device: torch.device) -> float:
    """Extra memory (MB, 1e6 bytes) live at the worst moment of one call of fn; see the module docstring."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 1e6
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints profiler_start/stop lines to fd 2 whatever KINETO_LOG_LEVEL says
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak / 1e6


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------- device
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return slug(f"cpu {cpu_model()} {os.cpu_count()}c")


@functools.lru_cache(maxsize=None)
def cpu_copy_bandwidth_gbs(mb: int = 128, repeats: int = 5) -> float:
    """STREAM-copy-like bandwidth of this CPU in GB/s: best of `repeats` copies of `mb` MB, read + write."""
    n = mb * 1_000_000 // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)  # fault the pages in
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def device_bandwidth_gbs(device: torch.device) -> tuple[float, str]:
    """(peak GB/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in KNOWN_BANDWIDTH:
            if key.lower() in name.lower():
                return bw, f"datasheet ({key})"
        return math.nan, "unknown device (add it to benchmarks/common.py KNOWN_BANDWIDTH)"
    return cpu_copy_bandwidth_gbs(), "measured STREAM-like copy (2 x 128 MB float32, best of 5)"


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dre_kernels", "csrc"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_text(path: str, text: str) -> None:
    """text to `path` atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict]) -> None:
    """rows to `path` atomically (write_text): a run cut off leaves no half-written CSV."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def autotune_rows() -> list[dict]:
    """The Triton autotuner's timings of every config it tried in this process (dre_kernels' AUTOTUNE_LOG), one row
    per config, fastest first within each tuning, the chosen one marked."""
    try:
        from dre_kernels.triton_kernels._common import AUTOTUNE_LOG
    except ImportError:  # no triton
        return []
    rows = []
    for n, tuning in enumerate(AUTOTUNE_LOG):
        key = " ".join(f"{k}={v}" for k, v in tuning["key"].items())
        ranked = sorted(tuning["timings"].items(), key=lambda kv: kv[1])
        for rank, (config, ms) in enumerate(ranked):
            rows.append(dict(tuning=n, kernel=tuning["kernel"], key=key, rank=rank, ms=ms,
                             chosen=config is tuning["best"], **config.kwargs, num_warps=config.num_warps,
                             num_stages=config.num_stages))
    return rows


def write_autotune_csv(path: str) -> str | None:
    """autotune_rows() to `path` (nothing where no tuning ran); the path written, or None."""
    rows = autotune_rows()
    if not rows:
        return None
    fields = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(path, [{k: r.get(k, "") for k in fields} for r in rows])
    return path


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def environment(device: torch.device) -> dict:
    """The columns every CSV row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    bw, bw_source = device_bandwidth_gbs(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "peak_bw_gbs": round(bw, 1),
        "peak_bw_source": bw_source,
    }
