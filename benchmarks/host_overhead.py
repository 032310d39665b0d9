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
Not included: the cost of Triton's own launcher on GPU (argument binding, specialisation, the driver call).

    python benchmarks/host_overhead.py --jit-launcher [--arch 90]

measures most of that launcher without a GPU: the kernels are compiled for the arch (sm_90 by default; the first
call of each case compiles, ~3 s a kernel, and is not timed) and every launch goes through Triton's own
JITFunction.run with warmup=True against a stub driver (tests/triton_aot.py): the argument binding, the
specialisation and the compiled-kernel lookup a GPU launch does, all but the grid's evaluation and the driver call
(cuLaunchKernel, a few microseconds). Launches go through the autotuner as on a GPU, its timing replaced by a
constant (the first config of each table wins, and later calls find it in the autotuner's cache). Extra column:
launch_us, the time per call in Triton's launch path (the autotuner's run and JITFunction.run); host_us is then the
whole call with those launches in it.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

# before triton and dre_kernels are imported: --jit-launcher takes Triton's compiled launch path (JITFunction)
JIT_LAUNCHER = "--jit-launcher" in sys.argv[1:]
os.environ["TRITON_INTERPRET"] = "0" if JIT_LAUNCHER else "1"
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler's start/stop lines

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


class StubbedLaunches:
    """Replaces every interpreted Triton launch by a counter while active; with jit (--jit-launcher), runs each
    compiled-kernel launch through Triton's own path up to the driver call (the autotuner's run, then
    JITFunction.run with warmup=True) and adds up the time spent in that path (ns)."""

    def __init__(self, jit: bool = False):
        if jit:
            from triton.runtime.autotuner import Autotuner
            from triton.runtime.jit import JITFunction as cls

            self._tuner = Autotuner
        else:
            from triton.runtime.interpreter import InterpretedFunction as cls
        self._cls, self._jit = cls, jit
        self.count = 0
        self.ns = 0
        self._depth = 0  # inside a timed launch (an autotuner's run calls JITFunction.run)

    def _timed(self, launch, *args, **kwargs):
        self._depth += 1
        t0 = time.perf_counter_ns()
        try:
            return launch(*args, **kwargs)
        finally:
            self._depth -= 1
            if not self._depth:
                self.ns += time.perf_counter_ns() - t0

    def __enter__(self):
        self._run = run_launch = self._cls.run
        stub = self

        def run(fn, *args, grid, warmup=False, **kwargs):
            stub.count += 1
            if stub._jit:
                stub._timed(run_launch, fn, *args, grid=grid, warmup=True, **kwargs)

        self._cls.run = run
        if self._jit:
            self._tuner_run = tuner_run = self._tuner.run
            self._tuner.run = lambda tuner, *args, **kwargs: stub._timed(tuner_run, tuner, *args, **kwargs)
        return self

    def __exit__(self, *exc):
        self._cls.run = self._run
        if self._jit:
            self._tuner.run = self._tuner_run


def use_stub_driver(arch: int) -> None:
    """Triton's active driver answers for a CUDA GPU of compute capability arch / 10 (tests/triton_aot.py's stub:
    no GPU is touched), the autotuner times every config alike (no launch: the first one wins), and the public API
    takes the triton backend on CPU tensors, as on a GPU."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton_aot import _StubDriver

    from dre_kernels import _backend

    driver.set_active(_StubDriver(GPUTarget("cuda", arch, 32)))
    Autotuner._bench = lambda tuner, *args, config, **meta: [1.0, 1.0, 1.0]
    _backend._triton_interpret = lambda: True


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


def measure(fn, reps: int, calls: int) -> tuple[float, int, int, float]:
    """(host microseconds per call, best of `reps` rounds; aten ops per call; Triton launches per call;
    microseconds per call inside Triton's launch path in that round, with --jit-launcher)."""
    with StubbedLaunches(JIT_LAUNCHER) as stub:
        for _ in range(3):
            fn()
        stub.count = 0
        fn()
        launches = stub.count
        best, launch_us = float("inf"), 0.0
        for _ in range(reps):
            stub.ns = 0
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            dt = (time.perf_counter() - t0) / calls
            if dt < best:
                best, launch_us = dt, stub.ns / calls / 1e3
        ops = aten_ops(fn)
    return best * 1e6, ops, launches, launch_us


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="CSV path (default: benchmarks/results/host_overhead_<cpu>.csv)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--jit-launcher", action="store_true",
                        help="launches through Triton's compiled-kernel path up to the driver call (see above)")
    parser.add_argument("--arch", type=int, default=90, help="with --jit-launcher: compute capability x10")
    args = parser.parse_args(argv)
    import dre_kernels

    if JIT_LAUNCHER:
        use_stub_driver(args.arch)
    elif "triton" not in dre_kernels.available_backends("cpu"):
        print("the triton backend is not available here:", dre_kernels.unavailable_backends("cpu").get("triton"))
        return 1
    import triton

    env = dict(cpu=common.cpu_model(), torch=torch.__version__, triton=triton.__version__, commit=common.git_commit())
    if JIT_LAUNCHER:
        env["launcher"] = f"jit sm_{args.arch}"
    rows = []
    for op, mode, pas, fn in cases():
        host_us, ops, launches, launch_us = measure(fn, args.reps, args.calls)
        rows.append(dict(op=op, mode=mode, **{"pass": pas}, host_us=round(host_us, 1), aten_ops=ops,
                         triton_launches=launches, load_average=round(common.load_average(), 2), **env,
                         **({"launch_us": round(launch_us, 1)} if JIT_LAUNCHER else {})))
        print(f"{op:17s} {mode:9s} {pas:8s} {host_us:8.1f} us  {ops:3d} aten ops  {launches} launches"
              + (f"  {launch_us:7.1f} us in Triton's launch path" if JIT_LAUNCHER else ""), flush=True)
    default = "host_overhead_jit" if JIT_LAUNCHER else "host_overhead"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{default}_{common.slug(common.cpu_model())}.csv")
    common.write_csv(out, rows)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
