"""Benchmark of the `triton` backend against eager `torch` and torch.compile of the `torch` backend (CUDA only).

    python benchmarks/bench_triton.py [--quick] [--out benchmarks/results/triton_<device>.csv]

Cases:
  residual_encode, soft, modes fwd and fwd+bwd (x, codewords, scale require grad; loss = <E, G>):
    step  : the DRE-SLCL step shape, B=16 slides, 128 fresh rows (bf16) + 8192 bank rows (bf16 bank) each, K=64, D=384
    50k   : B=16 slides, 128 fresh + 50,000 bank rows each, same K, D, dtypes
  contrastive_loss, B=65536, P=512, bf16, normalize, fwd and fwd+bwd: peak memory against torch (B x B float32
  logits alone are 17 GB there; out-of-memory is recorded as inf).
Columns: time p20/p50/p80 (triton.testing.do_bench), GB/s of rows read (fresh + bank rows, each read once per
pass: once for fwd, twice for fwd+bwd, whose backward recomputes the assignments) and its share of the device's
peak, peak extra memory (torch.cuda.max_memory_allocated above the live memory before the call), speedups against
torch. Without a CUDA GPU the script says so and exits with status 0 without measuring anything.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import device_bandwidth_gbs, device_slug, environment, is_oom, peak_mb, time_ms  # noqa: E402


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


def _residual_fn(provider, inputs, mode):
    import dre_kernels

    x, x_off, c, s, bank, bi, bo = inputs
    backend = "torch" if provider in ("torch", "torch.compile") else provider

    def run(x, c, s):
        return dre_kernels.residual_encode(x, x_off, c, s, bank=bank, bank_index=bi, bank_offsets=bo,
                                           assignment="soft", backend=backend)

    if provider == "torch.compile":
        run = torch.compile(run)
    if mode == "fwd":
        return lambda: run(x, c, s)
    xg, cg, sg = x.clone().requires_grad_(), c.clone().requires_grad_(), s.clone().requires_grad_()
    G = torch.randn(x_off.numel() - 1, c.shape[0], c.shape[1], device=x.device)

    def fwd_bwd():
        E = run(xg, cg, sg)
        torch.autograd.backward(E, G.to(E.dtype))
        xg.grad = cg.grad = sg.grad = None

    return fwd_bwd


def _contrastive_fn(provider, B, P, mode, device):
    import dre_kernels

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

    return run


def _measure(fn, device):
    try:
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize(device)
        (p20, p50, p80), _ = time_ms(fn, device)
        mem = peak_mb(fn, device)
        return p20, p50, p80, mem
    except Exception as e:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
        if is_oom(e):
            torch.cuda.empty_cache()
            return float("inf"), float("inf"), float("inf"), float("inf")
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the step shape and a B=16384 contrastive case")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/triton_<device>.csv)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA GPU here; the triton backend is benchmarked on CUDA only (nothing measured).",
              file=sys.stderr)
        return 0
    import dre_kernels

    device = torch.device("cuda")
    if "triton" not in dre_kernels.available_backends(device):
        print(f"bench_triton: triton backend unavailable: {dre_kernels.unavailable_backends(device)['triton']}",
              file=sys.stderr)
        return 1
    env = environment(device)
    peak_bw, _ = device_bandwidth_gbs(device)
    rows = []
    shapes = [("step", 16, 128, 8192, 64, 384)] + ([] if args.quick else [("50k", 16, 128, 50000, 64, 384)])
    for name, B, fresh, bank_rows, K, D in shapes:
        inputs, rows_bytes = _residual_inputs(B, fresh, bank_rows, K, D, device)
        for mode in ("fwd", "fwd+bwd"):
            base = None
            for provider in ("torch", "torch.compile", "triton"):
                p20, p50, p80, mem = _measure(_residual_fn(provider, inputs, mode), device)
                passes = 1 if mode == "fwd" else 2
                gbs = passes * rows_bytes / (p50 * 1e-3) / 1e9
                base = (p50, mem) if provider == "torch" else base
                rows.append(dict(op="residual_encode", shape=f"{name}: B={B} fresh={fresh} bank={bank_rows} K={K} "
                                 f"D={D} bf16", mode=mode, provider=provider, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                                 peak_mb=mem, gbs=gbs, bw_share=gbs / peak_bw, speedup_vs_torch=base[0] / p50,
                                 mem_vs_torch=mem / base[1] if base[1] not in (0, float("inf")) else float("nan"),
                                 **env))
                print(f"{name:5s} {mode:8s} {provider:14s} p50 {p50:9.3f} ms  {gbs:8.1f} GB/s "
                      f"({100 * gbs / peak_bw:5.1f}%)  peak {mem:9.1f} MB", flush=True)
        del inputs
        torch.cuda.empty_cache()
    B, P = (16384, 512) if args.quick else (65536, 512)
    for mode in ("fwd", "fwd+bwd"):
        base = None
        for provider in ("torch", "triton"):
            p20, p50, p80, mem = _measure(_contrastive_fn(provider, B, P, mode, device), device)
            base = (p50, mem) if provider == "torch" else base
            rows.append(dict(op="contrastive_loss", shape=f"B={B} P={P} bf16 normalize", mode=mode,
                             provider=provider, p20_ms=p20, p50_ms=p50, p80_ms=p80, peak_mb=mem, gbs=float("nan"),
                             bw_share=float("nan"), speedup_vs_torch=base[0] / p50,
                             mem_vs_torch=mem / base[1] if base[1] not in (0, float("inf")) else 0.0, **env))
            print(f"contrastive B={B} {mode:8s} {provider:8s} p50 {p50:9.3f} ms  peak {mem:10.1f} MB", flush=True)
            torch.cuda.empty_cache()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"triton_{device_slug(device)}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
