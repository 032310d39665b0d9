"""Benchmark of the GPU kernel backends at the DRE-SLCL shapes: `native` (csrc/cuda), `cupy` and `triton` against
eager `torch` and torch.compile of the `torch` backend (CUDA only).

    python benchmarks/bench_cuda.py [--quick] [--providers torch triton ...] [--out results/cuda_<device>.csv]
    python benchmarks/bench_cuda.py --smoke --out /tmp/x.csv   # tiny shapes on the CPU: exercises this script

Providers: torch, torch.compile, triton, native, cupy, native_simt / cupy_simt (the same backends with
DRE_KERNELS_CUDA_TENSOR_CORES=0: the SIMT kernels instead of the mma.sync ones; bf16 rows take the tensor cores),
and native_tiled / cupy_tiled (DRE_KERNELS_CUDA_FULL_WIDTH=0: the residual_encode forward and the soft backward's
bank-row pass on the column-tiled mma.sync kernels instead of the full-width ones, and the contrastive backward on
dre_cl_bwd_tc, one 128-wide piece of P per block, instead of dre_cl_bwd_tc_wide); by default every one available.
benchmarks/bench_triton.py is this script with torch, torch.compile and triton.
Cases:
  residual_encode, soft and hard, modes fwd and fwd+bwd (x, codewords, scale require grad; loss = <E, G>):
    step  : the DRE-SLCL step shape, B=16 slides, 128 fresh rows (bf16) + 8192 bank rows (bf16 bank) each, K=64, D=384
    50k   : B=16 slides, 128 fresh + 50,000 bank rows each, same K, D, dtypes
  contrastive_loss, B=65536 (16384 with --quick), P=512, bf16, normalize, fwd and fwd+bwd: peak memory against
  torch (B x B float32 logits alone are 17 GB there; out-of-memory is recorded as inf).
Every call reuses its inputs, so after the first (which compiles, autotunes and runs the value checks) the checks'
cache vouches for the index tensors and no call synchronises: the times are the kernels' and the host's launches.
Columns: time p20/p50/p80 (triton.testing.do_bench), GB/s of rows read (fresh + bank rows, each read once per
pass: once for fwd, twice for fwd+bwd, whose backward recomputes the assignments) and its share of the device's
peak, peak extra memory (torch.cuda.max_memory_allocated above the live memory before the call), speedups and
memory against torch. Without a CUDA GPU (and without --smoke) the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import (device_bandwidth_gbs, device_slug, environment, is_oom, peak_mb, time_ms,  # noqa: E402
                               write_autotune_csv, write_csv)

PROVIDERS = ("torch", "torch.compile", "triton", "native", "cupy", "native_simt", "cupy_simt", "native_tiled",
             "cupy_tiled")
# provider suffix -> the environment switch of the csrc/cuda kernels it sets for its calls
VARIANTS = {"_simt": ("DRE_KERNELS_CUDA_TENSOR_CORES", "0"), "_tiled": ("DRE_KERNELS_CUDA_FULL_WIDTH", "0")}


def _base_and_switch(provider):
    """(backend, (env var, value) or None) of a provider."""
    if provider in ("torch", "torch.compile"):
        return "torch", None
    for suffix, switch in VARIANTS.items():
        if provider.endswith(suffix):
            return provider.removesuffix(suffix), switch
    return provider, None
# (name, B, fresh rows per slide, bank rows per slide, K, D)
SHAPES = [("step", 16, 128, 8192, 64, 384), ("50k", 16, 128, 50000, 64, 384)]
SMOKE_SHAPES = [("smoke", 2, 4, 40, 8, 16)]


def _residual_inputs(B, fresh, bank_rows, K, D, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    T = B * bank_rows
    x = torch.randn(B * fresh, D, device=device, generator=g).to(torch.bfloat16)
    x = torch.nn.functional.normalize(x.float(), dim=1).to(torch.bfloat16)
    bank = torch.nn.functional.normalize(torch.randn(T, D, device=device, generator=g), dim=1).to(torch.bfloat16)
    bank_index = torch.randperm(T, device=device, generator=g)[: B * bank_rows]
    x_off = torch.arange(B + 1, device=device) * fresh
    b_off = torch.arange(B + 1, device=device) * bank_rows
    c = torch.nn.functional.normalize(torch.randn(K, D, device=device, generator=g), dim=1)
    s = torch.full((K,), 10.0, device=device)
    rows_bytes = x.numel() * x.element_size() + bank_index.numel() * D * bank.element_size()
    return (x, x_off, c, s, bank, bank_index, b_off), rows_bytes


def shape_inputs(name, device):
    """_residual_inputs of the SHAPES (or SMOKE_SHAPES) case called `name` (the GPU tools share bench_cuda's
    shapes)."""
    _, B, fresh, bank_rows, K, D = next(s for s in SHAPES + SMOKE_SHAPES if s[0] == name)
    return _residual_inputs(B, fresh, bank_rows, K, D, device)


def _residual_fn(provider, inputs, mode, hard):
    import dre_kernels

    x, x_off, c, s, bank, bi, bo = inputs
    backend, switch = _base_and_switch(provider)
    assignment = "hard" if hard else "soft"

    def run(x, c, s):
        return dre_kernels.residual_encode(x, x_off, c, None if hard else s, bank=bank, bank_index=bi,
                                           bank_offsets=bo, assignment=assignment, backend=backend)

    if provider == "torch.compile":
        run = torch.compile(run)
    if mode == "fwd":
        call = lambda: run(x, c, s)  # noqa: E731
    else:
        xg, cg, sg = x.clone().requires_grad_(), c.clone().requires_grad_(), s.clone().requires_grad_()
        G = torch.randn(x_off.numel() - 1, c.shape[0], c.shape[1], device=x.device)

        def call():
            E = run(xg, cg, sg)
            torch.autograd.backward(E, G.to(E.dtype))
            xg.grad = cg.grad = sg.grad = None
    return _switched(call, switch)


def _switched(call, switch):
    """call, run with the csrc/cuda switch (env var, value) set (None: call itself)."""
    if switch is None:
        return call

    def call_switched():  # the csrc/cuda switches are read at every launch, forward and backward
        os.environ[switch[0]] = switch[1]
        try:
            return call()
        finally:
            os.environ.pop(switch[0], None)

    return call_switched


def _contrastive_fn(provider, B, P, mode, device):
    import dre_kernels

    provider, switch = _base_and_switch(provider)
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(B, P, device=device, generator=g).to(torch.bfloat16).requires_grad_(mode != "fwd")
    b = torch.randn(B, P, device=device, generator=g).to(torch.bfloat16).requires_grad_(mode != "fwd")
    s = torch.tensor(14.3, device=device, requires_grad=mode != "fwd")

    def run():
        loss = dre_kernels.contrastive_loss(a, b, s, normalize=True, backend=provider)
        if mode != "fwd":
            loss.backward()
            a.grad = b.grad = s.grad = None
        return loss

    return _switched(run, switch)


def _measure(fn, device):
    """(p20, p50, p80, peak extra MB); inf everywhere for an out-of-memory, which is a result."""
    try:
        fn()  # compile / autotune / value checks outside the timed region
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        (p20, p50, p80), _ = time_ms(fn, device, reps=3, budget_s=0.1)
        return p20, p50, p80, peak_mb(fn, device)
    except Exception as e:  # noqa: BLE001 - anything but an OOM is re-raised
        if is_oom(e):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return float("inf"), float("inf"), float("inf"), float("inf")
        raise


def available_providers(device, wanted=PROVIDERS):
    """The providers of `wanted` that can run on `device` (the *_simt and *_tiled ones on CUDA only)."""
    import dre_kernels

    avail = dre_kernels.available_backends(device)
    ok = []
    for p in wanted:
        base, switch = _base_and_switch(p)
        if base in avail and (switch is None or (device.type == "cuda" and base in ("native", "cupy"))):
            ok.append(p)
    return ok


def main(argv=None, *, default_name="cuda", default_providers=PROVIDERS):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the step shape and a B=16384 contrastive case")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(default_providers),
                    help="what to measure (default: every one available)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks this script, measures nothing")
    ap.add_argument("--out", default=None,
                    help=f"CSV path (default benchmarks/results/{default_name}_<device>.csv)")
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() or args.smoke):
        print(f"bench_{default_name}: no CUDA GPU here; the GPU kernels are benchmarked on a GPU only "
              "(nothing measured).", file=sys.stderr)
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    providers = available_providers(device, args.providers)
    kernels = [p for p in providers if p not in ("torch", "torch.compile")]
    if "torch" not in providers or not kernels:
        print(f"bench_{default_name}: nothing to compare: of {args.providers} only {providers} run on {device}",
              file=sys.stderr)
        return 1
    env = environment(device)
    peak_bw, _ = device_bandwidth_gbs(device)
    rows = []

    def record(op, shape, mode, provider, res, base, gbs):
        p20, p50, p80, mem = res
        rows.append(dict(op=op, shape=shape, mode=mode, provider=provider, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                         peak_mb=mem, gbs=gbs, bw_share=gbs / peak_bw, speedup_vs_torch=base[0] / p50,
                         mem_vs_torch=mem / base[1] if base[1] not in (0, float("inf")) else float("nan"), **env))

    shapes = SMOKE_SHAPES if args.smoke else SHAPES[:1] if args.quick else SHAPES
    for name, B, fresh, bank_rows, K, D in shapes:
        inputs, rows_bytes = _residual_inputs(B, fresh, bank_rows, K, D, device)
        for hard in (False, True):
            op = "residual_encode_" + ("hard" if hard else "soft")
            for mode in ("fwd", "fwd+bwd"):
                base = None
                for provider in providers:  # torch first: the base of the ratios
                    res = _measure(_residual_fn(provider, inputs, mode, hard), device)
                    gbs = (1 if mode == "fwd" else 2) * rows_bytes / (res[1] * 1e-3) / 1e9
                    base = (res[1], res[3]) if provider == "torch" else base
                    record(op, f"{name}: B={B} fresh={fresh} bank={bank_rows} K={K} D={D} bf16", mode, provider,
                           res, base, gbs)
                    print(f"{name:5s} {op:21s} {mode:8s} {provider:14s} p50 {res[1]:9.3f} ms  {gbs:8.1f} GB/s "
                          f"({100 * gbs / peak_bw:5.1f}%)  peak {res[3]:9.1f} MB", flush=True)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    B, P = (64, 16) if args.smoke else (16384, 512) if args.quick else (65536, 512)
    for mode in ("fwd", "fwd+bwd"):
        base = None
        # the _tiled providers time dre_cl_bwd_tc (one piece of P per block) against the wide backward
        for provider in [p for p in providers
                         if p == "torch" or p in kernels and (_base_and_switch(p)[1] is None
                                                              or p.endswith("_tiled") and mode != "fwd")]:
            res = _measure(_contrastive_fn(provider, B, P, mode, device), device)
            base = (res[1], res[3]) if provider == "torch" else base
            record("contrastive_loss", f"B={B} P={P} bf16 normalize", mode, provider, res, base, float("nan"))
            print(f"contrastive B={B} {mode:8s} {provider:8s} p50 {res[1]:9.3f} ms  peak {res[3]:10.1f} MB",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{default_name}_{device_slug(device)}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")
    # which Triton configs won each tuning, and by how much (the N_DT > 1 ones among them)
    tuned = write_autotune_csv(os.path.splitext(out)[0] + "_autotune.csv")
    if tuned:
        print(f"wrote {tuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
