"""Tuning sweep of the Triton kernels on a CUDA GPU: every launch of one op call at a DRE-SLCL shape is captured,
then re-launched with each of a grid of meta-parameters (block shapes, warps, stages), timed alone
(triton.testing.do_bench, median), and listed fastest first next to the autotuner's own choice. The results say
which configs to add to the kernels' tables; they change nothing by themselves.

    python benchmarks/sweep_triton.py [--shape step|50k] [--budget 240] [--ops re_soft re_hard cl] [--out x.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_cuda import SHAPES, _contrastive_fn, shape_inputs  # noqa: E402


def capture(module, call):
    """[(kernel, config, autotuned?, grid, args, options)] of the launches `call` makes through module.launch."""
    from dre_kernels.triton_kernels._common import INTERPRET

    seen = []
    real = module.launch

    def spy(kernel, tuned, grid, args, interp_meta, **options):
        out = real(kernel, tuned, grid, args, interp_meta, **options)
        # the config the autotuner ran this launch with; under the interpreter (no autotuning) its fixed one
        best = None if INTERPRET else getattr(tuned.get(), "best_config", None)
        if best is not None:
            seen.append((kernel, dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages), True,
                         grid, args, options))
        else:
            seen.append((kernel, dict(interp_meta), False, grid, args, options))
        return out

    module.launch = spy
    try:
        call()
        torch.cuda.synchronize()
    finally:
        module.launch = real
    return seen


def grid_of(kernel_name, base):
    """Candidate configs; the launch's own config stands for the parameters not swept (the contrastive kernels'
    BLOCK_P is set by the dot mode)."""
    if kernel_name.startswith("_re_"):
        axes = dict(BLOCK_M=[16, 32, 64, 128], BLOCK_D=[32, 64, 128], BLOCK_DO=[32, 64, 128, 256],
                    num_warps=[4, 8, 16], num_stages=[1, 2, 3, 4])
        # column tiles per program (the backward's grad-x passes refuse N_DT > 1 at compile time: listed as errors)
        axes["N_DT"] = [1, 2, 3, 4]
        axes["FLATTEN"] = [False, True]  # a segment's row blocks and D slices as one loop
    else:
        axes = dict(BLOCK_I=[32, 64, 128], BLOCK_J=[32, 64, 128], num_warps=[4, 8], num_stages=[1, 2, 3])
        if kernel_name == "_cl_bwd_kernel":
            axes["BLOCK_PO"] = [64, 128, 256, 512]
    names = list(axes)
    return [dict(base, **dict(zip(names, v))) for v in itertools.product(*axes.values())]


def sweep(label, launches, budget_s, rows, rng):
    import triton
    import triton.testing

    for n, (kernel, base, autotuned, grid, args, options) in enumerate(launches):
        kname = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        cands = grid_of(kname, base)
        rng.shuffle(cands)
        cands.insert(0, base)
        t_end = time.time() + budget_s
        results, lost = [], False
        for cfg in cands:
            if time.time() > t_end:
                break
            meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            g = grid(meta) if callable(grid) else grid
            try:
                fn = lambda: kernel[g](*args, **cfg, **options)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
            except Exception as e:  # noqa: BLE001 - out of resources, compile errors: the config does not fit
                results.append((float("inf"), cfg, type(e).__name__))
                if "illegal" in str(e) or type(e).__name__ == "AcceleratorError":
                    # a fault poisons the CUDA context: every later launch of this process fails (an H100 run
                    # once listed 73 good configs as errors after one), so stop and name the culprit
                    print(f"!! {kname} {cfg} faulted ({str(e).splitlines()[0]}); the CUDA context is lost, "
                          f"stopping the sweep", flush=True)
                    lost = True
                    break
                continue
            results.append((ms, cfg, ""))
        results.sort(key=lambda r: r[0])
        base_ms = next((r[0] for r in results if r[1] is base), float("nan"))
        print(f"== {label} launch {n} {kname}: {len(results)} configs tried; the launch's own config "
              f"({'autotuned' if autotuned else 'fixed'}) {base}: {base_ms:.4f} ms", flush=True)
        for ms, cfg, err in results[:8]:
            print(f"   {ms:9.4f} ms  {cfg} {err}", flush=True)
        for rank, (ms, cfg, err) in enumerate(results):
            rows.append(dict(op=label, launch=n, kernel=kname, ms=ms, error=err, rank=rank,
                             own_config=cfg is base, **cfg))
        if lost:
            return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="step", choices=[s[0] for s in SHAPES])
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per captured launch")
    ap.add_argument("--ops", nargs="+", default=["re_soft_fwd", "re_soft_bwd", "cl_fwd", "cl_bwd"],
                    help="re_soft_fwd, re_soft_bwd, re_hard_fwd (BLOCK_D is fixed for hard in the library), cl_fwd, "
                         "cl_bwd")
    ap.add_argument("--contrastive-batch", type=int, default=16384)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_triton: no CUDA GPU here (nothing measured)", file=sys.stderr)
        return 0
    from dre_kernels.triton_kernels import contrastive_loss as tcl
    from dre_kernels.triton_kernels import residual_encode as tre

    dev = torch.device("cuda")
    (x, xo, c, s, bank, bi, bo), _ = shape_inputs(args.shape, dev)
    G = torch.randn(xo.numel() - 1, c.shape[0], c.shape[1], device=dev)
    rows, rng = [], random.Random(0)
    for op in args.ops:
        if op.startswith("re_"):
            hard = "hard" in op
            sc = None if hard else s
            if op.endswith("fwd"):
                call = lambda: tre.residual_encode_fwd(x, xo, c, sc, bank, bi, bo, hard)  # noqa: E731
            else:
                def call():
                    return tre.residual_encode_bwd(G, x, xo, c, sc, bank, bi, bo, hard, True, True, True)
            call()  # autotune first, so the captured launches show the autotuner's choice
            launches = capture(tre, call)[-1:]  # the bank rows' launch: the fresh rows are 1.5% of the rows
        else:
            call = _contrastive_fn("triton", args.contrastive_batch, 512, "fwd" if op == "cl_fwd" else "fwd+bwd", dev)
            call()
            launches = [L for L in capture(tcl, call) if op == "cl_fwd" or L[0].fn.__name__ == "_cl_bwd_kernel"][:1]
        alive = sweep(f"{op} {args.shape}", launches, args.budget, rows, rng)
        if args.out and rows:  # after each op: a run cut off keeps what it measured
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("op", "launch", "kernel", "ms"), k))
            with open(args.out + ".tmp", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
            os.replace(args.out + ".tmp", args.out)
        if not alive:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
