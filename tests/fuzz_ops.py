"""Random sweep of residual_encode and contrastive_loss for a kernel backend against `reference` (float64).

    python tests/fuzz_ops.py --backend triton --seconds 300                # CPU: triton in its interpreter
    python tests/fuzz_ops.py --backend native --device cuda --seconds 120  # GPU: the real kernels
    python tests/fuzz_ops.py --backend triton --device cuda --seconds 120  # GPU: triton at its default configs
    python tests/fuzz_ops.py --backend cuda-emu --seconds 300              # CPU: csrc/cuda in the CPU emulation

Each case draws shapes (empty and one-row slides, odd K and D, long bank slides, small and large B), dtypes,
labels, normalize and scales (up to inputs with large norms and no normalize), runs the forward and the backward,
and compares outputs and gradients with the reference in float64 (16-bit results less their own rounding). A
mismatch counts as a failure only when the kernel's error is also well above that of the `torch` backend at the
kernel's own dtypes (--slack times it): float32 cannot resolve some cases (near-ties of a hard argmin, say), and
there every backend is off alike. One-wide rows are not normalised (u = +-1 whatever the input: the exact
gradient is 0 and any float32 result is roundoff over ||a||). On a GPU, hard assignment of 16-bit rows runs on
tensor cores with the codewords split into two 16-bit parts, which resolves distances to ~2^-16 of ||x|| ||c||: a
hard case with a row whose two nearest codewords are within NEAR_TIE of that (small D, large K) may take either,
so such a case is reported as TIE and not counted (an H100 run counted 11 of 10,551 native cases before, all such).
`cuda-emu` runs the CUDA kernels (csrc/cuda/*.cu) in the CPU emulation of tests/cuda_emu as the `cupy` backend
on CPU tensors (its host code, autograd glue and kernels, through the public ops), the tensor-core kernels in a
random half of the cases, with an SM count drawn per case (the grids and block spans follow from it): their logic,
not their speed or GPU-only hazards.
Triton in its interpreter runs bounds- and race-checked (tests/triton_memcheck.py): an access outside a launch's
tensors, or a race between its programs, fails the case. For the emulated CUDA kernels the same checks are the
sanitizers': run with the environment tests/cuda_emu/build.py's sanitizer_env("address") or sanitizer_env("thread")
gives (the runtime preloaded), and a run stops at the first report.
Failures print the case; the exit status is the number of failures (at most 100).
The op suite (tests/test_ops_*.py) is the contract; this is a search for what it does not think of
(it found the column underflow of contrastive_loss without normalize). tests/test_fuzz_ops.py runs it
for a few seconds so it does not rot.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _offsets(lengths, device):
    import torch

    return torch.tensor([0] + list(itertools.accumulate(lengths)), device=device)


def _max_err(got, want):
    """max |got - want| / max(1, max |want|), less two epsilons of got's dtype when it is a 16-bit one (its own
    rounding of the result, which no kernel can avoid)."""
    import torch

    if got.numel() == 0:
        return 0.0
    mag = max(1.0, float(want.detach().abs().max()))
    err = float((got.detach().double() - want.detach().double()).abs().max()) / mag
    if got.dtype in (torch.float16, torch.bfloat16):
        err = max(0.0, err - 2 * torch.finfo(got.dtype).eps)
    return err


def _errors(run, backend, ref_inputs, kernel_inputs, seed):
    """Relative max errors of each output of run(backend) and of the gradients of a random weighting of them,
    against run('reference') on the float64 copies of the inputs."""
    import torch

    outs, refs = run(backend, kernel_inputs), run("reference", ref_inputs)
    errs = [_max_err(o, r) for o, r in zip(outs, refs)]
    if not any(o.numel() for o in outs):
        return errs
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
    grads = torch.autograd.grad(sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights)), kernel_inputs,
                                allow_unused=True)
    rgrads = torch.autograd.grad(sum((r * w.double()).sum() for r, w in zip(refs, weights)), ref_inputs,
                                 allow_unused=True)
    return errs + [_max_err(a, b) if a is not None and b is not None else 0.0 for a, b in zip(grads, rgrads)]


# a hard case's row is at a near-tie when its two nearest codewords' distances differ by less than this times
# ||x|| max ||c||: twice the bound on that difference's error on tensor cores (each distance within ~2^-15, the
# codewords split into two bf16 parts of 8 bits each; x exact)
NEAR_TIE = 2.0 ** -13


def has_near_tie(rows, codewords) -> bool:
    """Whether any row's two smallest squared distances to the codewords (float64) are within NEAR_TIE."""
    import torch

    if rows.shape[0] == 0 or codewords.shape[0] < 2:
        return False
    r, c = rows.detach().double().cpu(), codewords.detach().double().cpu()
    d = (c * c).sum(1)[None, :] - 2.0 * r @ c.T  # ||x||^2 is common to a row: the argmin's key
    two = torch.topk(d, 2, dim=1, largest=False).values
    margin = NEAR_TIE * r.norm(dim=1) * c.norm(dim=1).max()
    return bool((two[:, 1] - two[:, 0] <= margin).any())


def residual_case(rng, device):
    import torch

    K = rng.choice([1, 2, 3, 7, 16, 17, 33, 64, 100, 256])
    D = rng.choice([1, 3, 8, 16, 33, 64, 130, 384])
    if rng.random() < 0.2:
        # many slides, most of them empty: blocks that start mid-slide, after runs of empty slides, and walk several
        # slides (the full-width CUDA kernels' persistent blocks, the Triton programs' slide segments)
        B = rng.choice([33, 100, 300])
        lens = [rng.choice([1, 7, 40]) if rng.random() < 0.1 else 0 for _ in range(B)]
        blens = [rng.choice([1, 16, 70]) if rng.random() < 0.1 else 0 for _ in range(B)]
    else:
        B = rng.randint(1, 4)
        lens = [rng.choice([0, 1, 2, 5, 17, 40]) for _ in range(B)]
        blens = [rng.choice([0, 1, 3, 16, 50, 300]) for _ in range(B)]
    x_dtype, bank_dtype = (rng.choice([torch.float32, torch.bfloat16, torch.float16]) for _ in range(2))
    hard, use_bank = rng.random() < 0.4, rng.random() < 0.8
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randn(sum(lens), D, generator=g).to(x_dtype)
    c = 0.5 * torch.randn(K, D, generator=g)
    s = 0.02 + 0.1 * torch.rand(K, generator=g)
    T = sum(blens) + 5
    bank = torch.randn(T, D, generator=g).to(bank_dtype).to(device)
    bank_index = torch.randint(0, T, (sum(blens),), generator=g).to(device)
    kw = dict(bank=bank, bank_index=bank_index, bank_offsets=_offsets(blens, device)) if use_bank else {}
    assignment = "hard" if hard else "soft"
    x_off = _offsets(lens, device)

    def run(backend, inputs):
        import dre_kernels

        xi, ci, si = inputs
        return [dre_kernels.residual_encode(xi, x_off, ci, None if hard else si, assignment=assignment,
                                            backend=backend, **kw)]

    if hard:  # measured only for a case that is off (main)
        run.near_tie = lambda: has_near_tie(
            torch.cat([x.double()] + ([bank.cpu().double()[bank_index.cpu()]] if use_bank else [])), c)

    desc = dict(op="residual_encode", K=K, D=D, lens=lens, blens=blens if use_bank else None, x=str(x_dtype),
                bank=str(bank_dtype), assignment=assignment)
    return desc, run, (x, c, s)


def contrastive_case(rng, device):
    import torch

    B = rng.choice([1, 2, 3, 31, 32, 33, 65, 100, 130])
    P = rng.choice([1, 2, 5, 16, 33, 64, 130, 264, 520])  # 264, 520: several 128-wide pieces of the wide backward
    labels = torch.randint(0, rng.choice([1, 2, 5, 50]), (B,)).to(device) if rng.random() < 0.4 else None
    normalize = rng.random() < 0.5 and P > 1
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    std, scale = rng.choice([0.1, 1.0, 3.0]), rng.choice([0.5, 3.0, 14.3, 30.0])
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    a = (std * torch.randn(B, P, generator=g)).to(dtype)
    b = (std * torch.randn(B, P, generator=g)).to(dtype)

    def run(backend, inputs):
        import dre_kernels

        ai, bi = inputs
        return [dre_kernels.contrastive_loss(ai, bi, scale, labels=labels, normalize=normalize, reduction="none",
                                             backend=backend)]

    desc = dict(op="contrastive_loss", B=B, P=P, labels=labels is not None, normalize=normalize, dtype=str(dtype),
                std=std, scale=scale)
    return desc, run, (a, b)


def _emulate_cuda_as_cupy():
    """Make `cupy` run here on CPU tensors in the CUDA emulation (this process only); returns the emulator runtime,
    whose use_tensor_cores picks the mma.sync kernels for 16-bit rows."""
    import torch

    sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
    import build

    from dre_kernels import _backend, _library, cupy_kernels

    rt = build.EmuRuntime()
    cupy_kernels.set_runtime(rt)
    if ("cupy", "residual_encode_fwd") in _backend._KERNELS:  # CuPy installed: the ops exist for CUDA tensors
        for op, fn in cupy_kernels.IMPLS.items():
            torch.library.impl(_library.qualname("cupy", op), "CPU", fn, lib=_library._LIB)
    else:
        _library.define_python_backend("cupy", cupy_kernels.IMPLS, dispatch_keys=("CPU",))
    unavailable = _backend._unavailable_reason
    _backend._unavailable_reason = lambda name, dev: None if (name, dev) == ("cupy", "cpu") else unavailable(name, dev)
    return rt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", required=True, choices=["triton", "native", "cupy", "torch", "cuda-emu"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", nargs="+", default=["residual_encode", "contrastive_loss"])
    ap.add_argument("--tol", type=float, default=3e-3, help="relative error that always passes")
    ap.add_argument("--slack", type=float, default=4.0, help="a failure must be this many times torch's error")
    ap.add_argument("--autotune", action="store_true",
                    help="triton on GPU: autotune each new shape (default: each launch's first config, one compile "
                         "per shape; an H100 run autotuning every shape got through 6 cases in 54 s)")
    args = ap.parse_args(argv)
    # set for this run only: a test calls main() in its own process, whose later tests must not inherit them (the
    # autotune switch once did, and turned the autotuner off for every triton test after it)
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "DRE_KERNELS_TRITON_AUTOTUNE")}
    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.backend == "triton" and not args.autotune:
        os.environ.setdefault("DRE_KERNELS_TRITON_AUTOTUNE", "0")
    try:
        if os.environ.get("TRITON_INTERPRET") == "1" and args.backend == "triton":
            # each launch bounds- and race-checked, as in the test suite (a kernel reading past its tensors is a FAIL)
            sys.path.insert(0, HERE)
            import triton_memcheck

            with triton_memcheck.checked():
                return _fuzz(args, ap)
        return _fuzz(args, ap)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fuzz(args, ap) -> int:
    import torch

    import dre_kernels

    label, emu = args.backend, None
    if args.backend == "cuda-emu":
        if args.device != "cpu":
            ap.error("--backend cuda-emu runs on --device cpu")
        emu, args.backend = _emulate_cuda_as_cupy(), "cupy"
        from dre_kernels import _gpu_host
    if args.backend not in dre_kernels.available_backends(args.device):
        print(f"fuzz_ops: {args.backend} is not available on {args.device}: "
              f"{dre_kernels.unavailable_backends(args.device).get(args.backend)}", file=sys.stderr)
        return 0
    device = torch.device(args.device)
    makers = {"residual_encode": residual_case, "contrastive_loss": contrastive_case}
    rng = random.Random(args.seed)
    t0, n, failures, ties = time.time(), 0, 0, 0
    while time.time() - t0 < args.seconds:
        desc, run, inputs = makers[rng.choice(args.ops)](rng, device)
        seed = rng.randrange(1 << 30)
        if emu is not None:
            emu.use_tensor_cores = desc["tensor_cores"] = rng.random() < 0.5
            # the SM count sets the full-width kernels' blocks (one per SM, an even share of the rows each) and the
            # chunk size of the others: few SMs, blocks of many slides; many, blocks of a step or less
            desc["sms"] = rng.choice([1, 2, 3, 5, 8, 132])
            _gpu_host.num_sms = lambda device, n=desc["sms"]: n
        kernel_inputs = [t.to(device).requires_grad_() for t in inputs]
        ref_inputs = [t.detach().double().to(device).requires_grad_() for t in inputs]
        try:
            errs = _errors(run, args.backend, ref_inputs, kernel_inputs, seed)
            if max(errs) > args.tol:
                base = _errors(run, "torch", ref_inputs, [t.detach().clone().requires_grad_() for t in kernel_inputs],
                               seed)
                bad = [i for i, (e, b) in enumerate(zip(errs, base)) if e > args.tol and e > args.slack * b]
                if bad:
                    tie = getattr(run, "near_tie", lambda: False)()
                    ties, failures = ties + tie, failures + (not tie)
                    print(f"{'TIE' if tie else 'FAIL'} {desc}: errors {[f'{e:.2e}' for e in errs]}, "
                          f"torch {[f'{e:.2e}' for e in base]}", flush=True)
        except Exception as e:  # noqa: BLE001 - a crash or a wrong error is a failure too
            failures += 1
            print(f"FAIL {desc}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        n += 1
    print(f"fuzz_ops {label} on {args.device}: {n} cases, "
          f"{failures} failures in {time.time() - t0:.0f} s ({ties} hard cases off at a near-tie, not counted)")
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
