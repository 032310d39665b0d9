"""Where the time of one op call goes on a CUDA GPU: each kernel's device time (torch.profiler) against the call's
wall time, per backend, at the DRE-SLCL step shape (see bench_cuda.py). Host overhead = wall - device busy time;
"host issue" (the host's time inside the calls) and "syncs/call" (CUDA runtime calls that wait for the device)
tell a slow host from one that waits: a sync inside a call makes wall ~ host + device instead of their max.

    python benchmarks/profile_kernels.py [--providers triton native] [--shape step|50k] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_cuda import SHAPES, _contrastive_fn, _residual_fn, shape_inputs  # noqa: E402


# CUDA runtime calls that make the host wait for the device (.item() and device-to-host copies among them): one
# inside a call serialises the host's work with the kernels', which wall - device busy does not tell apart from
# slow host code
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
               "cuCtxSynchronize")


def profile(name, fn, reps, warmup=3):
    """Prints the call's wall time, the host's time to issue it, device busy time, syncs per call, the top
    kernels by device time and the top host operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    for _ in range(warmup):  # the first calls of a shape autotune and compile
        fn()
    torch.cuda.synchronize()
    issue = 0.0
    t0 = time.perf_counter()
    for _ in range(reps):
        t1 = time.perf_counter()
        fn()
        issue += time.perf_counter() - t1
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / reps
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels, host, syncs = [], [], 0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        on_device = getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA
        if on_device or (t > 0 and ev.self_cpu_time_total == 0):  # a kernel (host ops carry their kernels' time)
            if t > 0:
                kernels.append((t / 1e3 / reps, ev.count // reps, ev.key))
            continue
        if ev.key.startswith(_SYNC_CALLS):
            syncs += ev.count
        if ev.self_cpu_time_total > 0:
            host.append((ev.self_cpu_time_total / 1e3 / reps, ev.count // reps, ev.key))
    kernels.sort(reverse=True)
    host.sort(reverse=True)
    busy = sum(r[0] for r in kernels)
    print(f"== {name}: wall {wall_ms:.3f} ms/call, host issue {1e3 * issue / reps:.3f} ms/call, device busy "
          f"{busy:.3f} ms/call, syncs/call {max(0, syncs - 1) / reps:.1f}")  # - 1: the profile's own synchronize
    for t, n, key in kernels[:8]:
        print(f"   {t:8.3f} ms  x{n:<3d} {key[:100]}")
    print("   host, self CPU time (the profiler's own overhead included):")
    for t, n, key in host[:8]:
        print(f"   {t:8.3f} ms  x{n:<3d} {key[:100]}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--providers", nargs="+", default=["triton", "native"])
    ap.add_argument("--shape", default="step", choices=[s[0] for s in SHAPES])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--contrastive-batch", type=int, default=16384)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA GPU here (nothing measured)", file=sys.stderr)
        return 0
    dev = torch.device("cuda")
    inputs, _ = shape_inputs(args.shape, dev)
    for p in args.providers:
        for hard in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                profile(f"residual_encode {'hard' if hard else 'soft'} {mode} {p} ({args.shape})",
                        _residual_fn(p, inputs, mode, hard), args.reps)
    for p in args.providers:
        for mode in ("fwd", "fwd+bwd"):
            profile(f"contrastive_loss {mode} {p} B={args.contrastive_batch} P=512",
                    _contrastive_fn(p, args.contrastive_batch, 512, mode, dev), max(2, args.reps // 10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
