"""Host overhead of the `triton` backend: the CPU time of one call with every Triton launch stubbed out.

    python benchmarks/host_overhead.py [--out benchmarks/results/host_overhead_<cpu>.csv] [--reps 7]

On a GPU a call cannot finish faster than the host issues it: input checks, the dispatch, the torch.library
operator and autograd plumbing, the small torch ops around the kernels and the kernel launches. At the DRE-SLCL
step shape the H100 showed it (benchmarks/results/nvidia-h100-80gb-hbm3: residual_encode soft forward 1.18 ms by
do_bench with a 1.08 ms kernel, 1.03 ms with a 0.45 ms kernel; hard fwd+bwd 4.05 ms of wall time per call against
1.12 ms of device time). This measures that host side on any machine, without a GPU: the ops run on tiny CPU
tensors under TRITON_INTERPRET=1 with triton's InterpretedFunction.run replaced by a counter, so what is timed is
the Python and torch work around the kernels (torch ops on 16 x 4 x 8 tensors cost their dispatch, not their
arithmetic).

Columns: host_us (best of `reps` rounds of `calls` calls: the least disturbed, as the floor a GPU call cannot go
below), aten_ops (torch operators the call issues outside autograd's own, from torch.profiler: each is a CUDA
kernel launch or an allocation on GPU, ~5-10 us of host time there), triton_launches (kernel launches per call).
Not included: the cost of Triton's own launcher on GPU (argument binding, specialisation, the driver call; tens of
microseconds per launch), which needs a GPU to measure.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton and dre_kernels are imported
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler's start/stop lines

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


class StubbedLaunches:
    """Replaces every interpreted Triton launch by a counter while active."""

    def __init__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._cls = InterpretedFunction
        self.count = 0

    def __enter__(self):
        self._run = self._cls.run
        stub = self

        def run(fn, *args, grid, warmup, **kwargs):
            stub.count += 1

        self._cls.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._run


def cases(B=16, fresh=4, bank_rows=16, K=4, D=8, P=8):
    """(op, mode, pass, fn): residual_encode soft and hard, contrastive_loss without and with normalize, each
    forward and forward+backward."""
    import dre_kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * fresh, D, generator=g).bfloat16().requires_grad_()
    x_off = torch.arange(0, B * fresh + 1, fresh)
    bank = torch.randn(4 * B * bank_rows, D, generator=g).bfloat16()
    index = torch.randint(0, bank.shape[0], (B * bank_rows,), generator=g)
    bank_off = torch.arange(0, B * bank_rows + 1, bank_rows)
    cw = torch.randn(K, D, generator=g).requires_grad_()
    scale = torch.rand(K, generator=g).requires_grad_()
    a = torch.randn(B, P, generator=g).requires_grad_()
    b = torch.randn(B, P, generator=g).requires_grad_()

    def encode(mode):
        return lambda: dre_kernels.residual_encode(x, x_off, cw, scale if mode == "soft" else None, bank=bank,
                                                   bank_index=index, bank_offsets=bank_off, assignment=mode,
                                                   backend="triton")

    out = []
    for mode in ("soft", "hard"):
        fwd = encode(mode)
        out += [("residual_encode", mode, "fwd", fwd), ("residual_encode", mode, "fwd+bwd",
                                                        lambda f=fwd: f().sum().backward())]
    for normalize in (False, True):
        loss = lambda n=normalize: dre_kernels.contrastive_loss(a, b, 10.0, normalize=n, backend="triton")  # noqa: E731
        mode = "normalize" if normalize else ""
        out += [("contrastive_loss", mode, "fwd", loss),
                ("contrastive_loss", mode, "fwd+bwd", lambda f=loss: f().backward())]
    return out


def aten_ops(fn) -> int:
    """Top-level torch operators one call issues (those autograd's engine runs included, their children not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def measure(fn, reps: int, calls: int) -> tuple[float, int, int]:
    """(host microseconds per call, best of `reps` rounds; aten ops per call; Triton launches per call)."""
    with StubbedLaunches() as stub:
        for _ in range(3):
            fn()
        stub.count = 0
        fn()
        launches = stub.count
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls)
        ops = aten_ops(fn)
    return best * 1e6, ops, launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="CSV path (default: benchmarks/results/host_overhead_<cpu>.csv)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)
    import dre_kernels

    if "triton" not in dre_kernels.available_backends("cpu"):
        print("the triton backend is not available here:", dre_kernels.unavailable_backends("cpu").get("triton"))
        return 1
    import triton

    env = dict(cpu=common.cpu_model(), torch=torch.__version__, triton=triton.__version__, commit=common.git_commit())
    rows = []
    for op, mode, pas, fn in cases():
        host_us, ops, launches = measure(fn, args.reps, args.calls)
        rows.append(dict(op=op, mode=mode, **{"pass": pas}, host_us=round(host_us, 1), aten_ops=ops,
                         triton_launches=launches, load_average=round(common.load_average(), 2), **env))
        print(f"{op:17s} {mode:5s} {pas:8s} {host_us:8.1f} us  {ops:3d} aten ops  {launches} launches", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"host_overhead_{common.slug(common.cpu_model())}.csv")
    common.write_csv(out, rows)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
