"""Where the time of one op call goes on a CUDA GPU: each kernel's device time (torch.profiler) against the call's
wall time, per backend, at the DRE-SLCL step shape (see bench_cuda.py). Host overhead = wall - device busy time.

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


def profile(name, fn, reps):
    from torch.profiler import ProfilerActivity, profile as tprofile

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / reps
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t > 0:
            rows.append((t / 1e3 / reps, ev.count // reps, ev.key))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"== {name}: wall {wall_ms:.3f} ms/call, device busy {busy:.3f} ms/call")
    for t, n, key in rows[:8]:
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
