"""Benchmark of the CUDA kernels (`native` on CUDA, and `cupy` when installed) against `triton`, eager `torch` and
torch.compile of the `torch` backend (CUDA only).

    python benchmarks/bench_cuda.py [--quick] [--out benchmarks/results/cuda_<device>.csv]

Providers: torch, torch.compile, triton, native, cupy, and native_simt / cupy_simt (the same backends with
DRE_KERNELS_CUDA_TENSOR_CORES=0: the SIMT kernels instead of the mma.sync ones; bf16 rows take the tensor cores).
Cases (inputs and measurement shared with bench_triton.py):
  residual_encode, soft and hard, modes fwd and fwd+bwd (x, codewords, scale require grad; loss = <E, G>):
    step  : the DRE-SLCL step shape, B=16 slides, 128 fresh rows (bf16) + 8192 bank rows (bf16 bank) each, K=64, D=384
    50k   : B=16 slides, 128 fresh + 50,000 bank rows each, same K, D, dtypes
  contrastive_loss, B=65536 (16384 with --quick), P=512, bf16, normalize, fwd and fwd+bwd.
Columns: time p20/p50/p80 (triton.testing.do_bench), GB/s of rows read (once per pass: fwd reads the rows once,
fwd+bwd twice) and its share of the device's peak, peak extra memory (torch.cuda.max_memory_allocated), speedups
against torch. Without a CUDA GPU the script says so and exits with status 0 without measuring anything.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import device_bandwidth_gbs, device_slug, environment  # noqa: E402


def _residual_fn(provider, inputs, mode, hard):
    import dre_kernels

    x, x_off, c, s, bank, bi, bo = inputs
    backend = "torch" if provider in ("torch", "torch.compile") else provider.removesuffix("_simt")
    assignment = "hard" if hard else "soft"
    simt = provider.endswith("_simt")  # the csrc/cuda SIMT kernels instead of the tensor-core ones

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
    if not simt:
        return call

    def call_simt():  # the switch is read at every launch, forward and backward
        os.environ["DRE_KERNELS_CUDA_TENSOR_CORES"] = "0"
        try:
            return call()
        finally:
            os.environ.pop("DRE_KERNELS_CUDA_TENSOR_CORES", None)

    return call_simt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the step shape and a B=16384 contrastive case")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/cuda_<device>.csv)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA GPU here; the CUDA kernels are benchmarked on a GPU only (nothing measured).",
              file=sys.stderr)
        return 0
    import dre_kernels
    from benchmarks.bench_triton import _contrastive_fn, _measure, _residual_inputs

    device = torch.device("cuda")
    avail = dre_kernels.available_backends(device)
    if "native" not in avail:
        print(f"bench_cuda: native CUDA kernels unavailable: {dre_kernels.unavailable_backends(device)['native']}",
              file=sys.stderr)
        return 1
    kernels = [p for p in ("triton", "native", "cupy") if p in avail]
    env = environment(device)
    peak_bw, _ = device_bandwidth_gbs(device)
    rows = []

    def record(op, shape, mode, provider, res, base, gbs):
        p20, p50, p80, mem = res
        rows.append(dict(op=op, shape=shape, mode=mode, provider=provider, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                         peak_mb=mem, gbs=gbs, bw_share=gbs / peak_bw, speedup_vs_torch=base[0] / p50,
                         mem_vs_torch=mem / base[1] if base[1] not in (0, float("inf")) else float("nan"), **env))

    shapes = [("step", 16, 128, 8192, 64, 384)] + ([] if args.quick else [("50k", 16, 128, 50000, 64, 384)])
    for name, B, fresh, bank_rows, K, D in shapes:
        inputs, rows_bytes = _residual_inputs(B, fresh, bank_rows, K, D, device)
        for hard in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                base = None
                simt = [k + "_simt" for k in kernels if k in ("native", "cupy")]
                for provider in ["torch", "torch.compile"] + kernels + simt:
                    res = _measure(_residual_fn(provider, inputs, mode, hard), device)
                    gbs = (1 if mode == "fwd" else 2) * rows_bytes / (res[1] * 1e-3) / 1e9
                    base = (res[1], res[3]) if provider == "torch" else base
                    op = "residual_encode_" + ("hard" if hard else "soft")
                    record(op, f"{name}: B={B} fresh={fresh} bank={bank_rows} K={K} D={D} bf16", mode, provider,
                           res, base, gbs)
                    print(f"{name:5s} {op:21s} {mode:8s} {provider:14s} p50 {res[1]:9.3f} ms  {gbs:8.1f} GB/s "
                          f"({100 * gbs / peak_bw:5.1f}%)  peak {res[3]:9.1f} MB", flush=True)
        del inputs
        torch.cuda.empty_cache()
    B, P = (16384, 512) if args.quick else (65536, 512)
    for mode in ("fwd", "fwd+bwd"):
        base = None
        for provider in ["torch"] + kernels:
            res = _measure(_contrastive_fn(provider, B, P, mode, device), device)
            base = (res[1], res[3]) if provider == "torch" else base
            record("contrastive_loss", f"B={B} P={P} bf16 normalize", mode, provider, res, base, float("nan"))
            print(f"contrastive B={B} {mode:8s} {provider:8s} p50 {res[1]:9.3f} ms  peak {res[3]:10.1f} MB",
                  flush=True)
            torch.cuda.empty_cache()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"cuda_{device_slug(device)}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
