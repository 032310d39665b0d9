"""What is specific to the `native` C++ CPU kernels: the memory rule (checked by peak RSS in a subprocess), the
contrastive loss at a B where B x B would not fit the budget, chunk borders inside long slides, thread-count
independence, index and offset checks in the C++ host code (which is all that guards memory under torch.compile),
and the inductor backend of torch.compile on the native ops."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dre_kernels
from conftest import assert_close, make_offsets
from dre_kernels import bank_gather, bank_update_, contrastive_loss, residual_encode

pytestmark = pytest.mark.skipif("native" not in dre_kernels.available_backends("cpu"),
                                reason=dre_kernels._backend.unavailable_backends("cpu").get("native", ""))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: build inputs, reset the peak RSS (VmHWM, via /proc/self/clear_refs), run `body`
# once, print the peak increase in MiB over the RSS before the run. Outputs are kept alive until the end.
_PROBE = """
import sys, torch, dre_kernels
from dre_kernels import residual_encode, contrastive_loss
torch.manual_seed(0)

def rss_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

{setup}
# warm up on a tiny problem (first-call allocations of the library and of MKL are not what is measured)
{warmup}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss_kib("VmRSS:")
{body}
print((rss_kib("VmHWM:") - before) / 1024.0)
"""


def _peak_mib(setup, warmup, body):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    code = _PROBE.format(setup=textwrap.dedent(setup), warmup=textwrap.dedent(warmup), body=textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


_RE_SETUP = """
B, Mf, Mb, K, D = {B}, {Mf}, {Mb}, {K}, {D}
T = B * Mb
bank = torch.nn.functional.normalize(torch.randn(T, D), dim=1)
x = torch.randn(B * Mf, D, requires_grad=True)
xo = torch.arange(B + 1) * Mf
bo = torch.arange(B + 1) * Mb
bi = torch.randperm(T)
c = torch.randn(K, D, requires_grad=True)
s = torch.full((K,), 0.5, requires_grad=True)
def step(backend, assignment):
    E = residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, assignment=assignment,
                        backend=backend)
    E.square().sum().backward()
    return E
"""


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_residual_encode_memory_rule(assignment):
    """fwd+bwd with 120k bank rows: Mb*D floats are 61 MiB and Mb*K floats 31 MiB; native may use neither."""
    B, Mf, Mb, K, D = 4, 64, 30000, 64, 128
    setup = _RE_SETUP.format(B=B, Mf=Mf, Mb=Mb, K=K, D=D)
    warmup = (f"xs, cs, ss = torch.randn(8, D), torch.randn(K, D), torch.ones(K)\n"
              f"residual_encode(xs, torch.tensor([0, 8]), cs, ss, assignment='{assignment}', backend='native')")
    mb_k_mib = B * Mb * K * 4 / 2**20
    native = _peak_mib(setup, warmup, f"E = step('native', '{assignment}')")
    # allowed: O(B*K*D + M*D + K*D) plus per-thread blocks; well under one Mb x K float32 matrix
    assert native < mb_k_mib / 2, f"native peak {native:.1f} MiB; one Mb x K float32 matrix is {mb_k_mib:.1f} MiB"
    # the probe sees an allocation of the size the rule forbids: gathering the bank rows once. (It used to run the
    # `torch` backend here, but its hard path gathers in blocks and keeps none of them for backward, so its peak
    # exceeded all gathered rows only where the C heap kept freed blocks: under torch 2.15, not 2.11.)
    gathered_mib = B * Mb * D * 4 / 2**20
    gather_peak = _peak_mib(setup, warmup, "rows = bank.index_select(0, bi)")
    assert gather_peak > 0.9 * gathered_mib, (
        f"peak {gather_peak:.1f} MiB while gathering {gathered_mib:.1f} MiB of rows: the probe is not measuring")


def test_contrastive_loss_large_batch_without_b_by_b():
    """B = 12000: one B x B float32 matrix is 549 MiB; the native forward+backward must stay far below."""
    setup = """
B, P = 12000, 32
a = torch.randn(B, P, requires_grad=True)
b = torch.randn(B, P, requires_grad=True)
scale = torch.tensor(10.0, requires_grad=True)
labels = torch.randint(0, 50, (B,))
"""
    warmup = "contrastive_loss(torch.randn(4, P), torch.randn(4, P), 1.0, backend='native')"
    body = """
loss = contrastive_loss(a, b, scale, labels=labels, normalize=True, backend='native')
loss.backward()
assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
"""
    peak = _peak_mib(setup, warmup, body)
    assert peak < 549 / 5, f"native contrastive loss peak {peak:.1f} MiB at B=12000"


# ---------------------------------------------------------------------------------------------- correctness
def _ragged_inputs(lengths, bank_lengths, K, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    M, Mb = sum(lengths), sum(bank_lengths)
    x = (0.5 * torch.randn(M, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    c = (0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    s = ((0.5 + torch.rand(K, generator=g, dtype=torch.float64)) / D * 4).to(dtype).requires_grad_()
    bank = 0.5 * torch.randn(Mb + 7, D, generator=g, dtype=torch.float64)
    bi = torch.randint(Mb + 7, (Mb,), generator=g)
    return x, make_offsets(lengths), c, s, bank.to(dtype), bi, make_offsets(bank_lengths)


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_chunk_borders_inside_long_slides(assignment):
    """Slides of thousands of rows are cut between threads (partial sums); compare fwd and grads to reference."""
    x, xo, c, s, bank, bi, bo = _ragged_inputs([700, 3, 0, 1500], [900, 0, 2, 2600], K=6, D=10)
    threads = torch.get_num_threads()
    results = {}
    try:
        for backend, n in (("reference", threads), ("native", 1), ("native", 2), ("native", 3)):
            torch.set_num_threads(n)
            for t in (x, c, s):
                t.grad = None
            E, mass = residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, assignment=assignment,
                                      return_mass=True, backend=backend)
            (E * torch.linspace(-1, 1, E.numel(), dtype=E.dtype).view_as(E)).sum().backward()
            results[(backend, n)] = [E.detach(), mass, x.grad.clone(), c.grad.clone()] + (
                [s.grad.clone()] if assignment == "soft" else [])
    finally:
        torch.set_num_threads(threads)
    ref = results[("reference", threads)]
    for key, got in results.items():
        for name, a, b in zip(["E", "mass", "grad_x", "grad_c", "grad_s"], got, ref):
            assert_close(a, b, dtype=torch.float64, scale=100.0, msg=f"{key} {name}")


def test_thread_count_does_not_change_float32_results_much():
    x, xo, c, s, bank, bi, bo = _ragged_inputs([2000, 1000], [3000, 500], K=16, D=48, dtype=torch.float32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend="native"))
    finally:
        torch.set_num_threads(threads)
    assert_close(outs[0], outs[1], dtype=torch.float32)


def test_same_inputs_same_bits():
    x, xo, c, s, bank, bi, bo = _ragged_inputs([900, 40], [1200, 77], K=9, D=33, dtype=torch.float32)
    E1 = residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend="native")
    E2 = residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend="native")
    assert torch.equal(E1, E2)


@pytest.mark.parametrize("labels", [False, True])
def test_contrastive_loss_many_tiles(labels):
    """B = 600 spans five 128-row tiles with a ragged last one (float64: the portable tile code)."""
    g = torch.Generator().manual_seed(3)
    B, P = 600, 20
    a = torch.randn(B, P, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, P, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 30, (B,), generator=g) if labels else None
    w = torch.rand(B, generator=g, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "native"):
        loss = contrastive_loss(a, b, scale, labels=lab, normalize=True, reduction="none", backend=backend)
        grads[backend] = [loss.detach()] + list(torch.autograd.grad((loss * w).sum(), (a, b, scale)))
    for got, want in zip(grads["native"], grads["reference"]):
        assert_close(got, want, dtype=torch.float64)


def _check_float32_contrastive_tiles():
    """float32 (the AVX-512 tile kernels where the CPU has them) over ragged tiles, against float64 reference."""
    g = torch.Generator().manual_seed(5)
    for B, P, labelled, normalize in [(300, 40, False, True), (300, 33, True, False), (129, 7, True, True),
                                      (1, 5, False, True)]:
        a = torch.randn(B, P, generator=g)
        b = torch.randn(B, P, generator=g)
        lab = torch.randint(0, 9, (B,), generator=g) if labelled else None
        w = torch.rand(B, generator=g)
        out = {}
        for backend, dt in (("native", torch.float32), ("reference", torch.float64)):
            aa, bb = a.to(dt).requires_grad_(), b.to(dt).requires_grad_()
            scale = torch.tensor(3.0 if not normalize else 12.0, dtype=dt, requires_grad=True)
            loss = contrastive_loss(aa, bb, scale, labels=lab, normalize=normalize, reduction="none", backend=backend)
            out[backend] = [loss.detach()] + list(torch.autograd.grad((loss * w.to(dt)).sum(), (aa, bb, scale)))
        for name, got, want in zip(["loss", "grad_a", "grad_b", "grad_scale"], out["native"], out["reference"]):
            assert_close(got, want, dtype=torch.float32, scale=10.0, msg=f"B={B} P={P} {name}")


def test_contrastive_loss_float32_tiles():
    _check_float32_contrastive_tiles()


def test_contrastive_loss_float32_tiles_without_avx512():
    _run_without_avx512("_check_float32_contrastive_tiles")


def test_contrastive_loss_same_bits_for_any_thread_count():
    """Each logit tile pair runs in one task in a fixed round, so the sums' order does not depend on threads."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(400, 24, generator=g), torch.randn(400, 24, generator=g)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
            loss = contrastive_loss(aa, bb, torch.tensor(5.0), normalize=True, reduction="mean", backend="native")
            outs.append([loss.detach()] + list(torch.autograd.grad(loss, (aa, bb))))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_loss_non_finite_logits(dtype):
    """The online log-sum-exps over tiles: a NaN logit makes its row's and every column's lse NaN (it must not be
    dropped when another tile raises the running max), and a column of -inf logits has lse -inf, not NaN."""
    g = torch.Generator().manual_seed(7)
    B = 300  # three tiles: the NaN row and the -inf column meet the other tiles in different rounds
    a, b = torch.randn(B, 8, generator=g, dtype=dtype), torch.randn(B, 8, generator=g, dtype=dtype)
    a[150, 3] = float("nan")
    row_lse, col_lse = torch.ops.dre.contrastive_loss_fwd(a, b, torch.tensor(2.0, dtype=dtype), None, False)[1:3]
    assert row_lse[150].isnan() and col_lse.isnan().all()
    assert row_lse[torch.arange(B) != 150].isfinite().all()
    a = torch.rand(B, 1, generator=g, dtype=dtype) + 0.5  # P = 1, a > 0: l_i7 = a_i * -inf = -inf
    b = torch.randn(B, 1, generator=g, dtype=dtype)
    b[7] = float("-inf")
    row_lse, col_lse = torch.ops.dre.contrastive_loss_fwd(a, b, torch.tensor(2.0, dtype=dtype), None, False)[1:3]
    assert col_lse[7] == float("-inf")
    assert col_lse[torch.arange(B) != 7].isfinite().all() and row_lse.isfinite().all()


def test_float16_and_bfloat16_accumulate_in_float32():
    """Many rows of a half-precision slide: a float16 accumulator would be off by far more than the tolerance."""
    x, xo, c, s, bank, bi, bo = _ragged_inputs([5000], [0], K=4, D=8, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        xh, ch, sh = x.detach().to(dt), c.detach().to(dt), s.detach().to(dt)
        got = residual_encode(xh, xo, ch, sh, backend="native").float()
        want = residual_encode(xh.float(), xo, ch.float(), sh.float(), backend="reference")
        rel = (got - want).abs().max() / want.abs().max()
        assert rel < 1e-2, (dt, float(rel))


# ---------------------------------------------------------------------------------------------- checks in C++
def _raw_inputs():
    x, xo, c, s, bank, bi, bo = _ragged_inputs([3, 2], [2, 2], K=3, D=4, dtype=torch.float32)
    return x.detach(), xo, c.detach(), s.detach(), bank, bi, bo


def test_kernel_checks_bank_index_range():
    x, xo, c, s, bank, bi, bo = _raw_inputs()
    for bad in (bank.shape[0], -1, 2**40):
        bi2 = bi.clone()
        bi2[1] = bad
        with pytest.raises(IndexError, match="bank_index"):
            torch.ops.dre.residual_encode_fwd(x, xo, c, s, bank, bi2, bo, False)
        with pytest.raises(IndexError, match="bank_index"):
            torch.ops.dre.residual_encode_bwd(torch.ones(2, 3, 4), x, xo, c, s, bank, bi2, bo, None, False, True, True,
                                              True)


def test_kernel_checks_offsets():
    x, xo, c, s, bank, bi, bo = _raw_inputs()  # 5 fresh rows, 4 bank rows
    for off in (torch.tensor([1, 3, 5]), torch.tensor([0, 4, 3]), torch.tensor([0, 3, 6]), torch.tensor([0, 3, 99])):
        with pytest.raises(ValueError, match="x_offsets"):
            torch.ops.dre.residual_encode_fwd(x, off, c, s, bank, bi, bo, False)
    for off in (torch.tensor([1, 2, 4]), torch.tensor([0, 3, 2]), torch.tensor([0, 2, 5]), torch.tensor([0, 2])):
        with pytest.raises(ValueError, match="bank_offsets"):
            torch.ops.dre.residual_encode_fwd(x, xo, c, s, bank, bi, off, False)


def test_kernel_checks_bank_op_indices():
    bank = torch.randn(6, 3)
    with pytest.raises(IndexError, match="index"):
        torch.ops.dre.bank_gather(bank, torch.tensor([0, 6]))
    with pytest.raises(IndexError, match="index"):
        torch.ops.dre.bank_update_(bank, torch.tensor([-1]), torch.randn(1, 3), 0.0, True)
    with pytest.raises(ValueError, match="repeat"):
        torch.ops.dre.bank_update_(bank, torch.tensor([2, 2]), torch.randn(2, 3), 0.0, True)
    before = bank.clone()
    with pytest.raises(IndexError):
        torch.ops.dre.bank_update_(bank, torch.tensor([1, 6]), torch.randn(2, 3), 0.0, True)
    assert torch.equal(bank, before), "a rejected update must not write any row"


def test_bad_index_raises_under_torch_compile():
    """torch.compile skips the Python value checks; the C++ kernel still raises instead of reading out of bounds."""
    x, xo, c, s, bank, bi, bo = _raw_inputs()

    def f(x, xo, c, s, bank, bi, bo):
        return residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend="native").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, xo, c, s, bank, bi, bo), f(x, xo, c, s, bank, bi, bo))
    bi2 = bi.clone()
    bi2[0] = 10**6
    with pytest.raises(IndexError, match="bank_index"):
        compiled(x, xo, c, s, bank, bi2, bo)


def test_torch_compile_inductor_fullgraph():
    """The inductor backend (the default) compiles residual_encode and contrastive_loss on native, with grads."""
    x, xo, c, s, bank, bi, bo = _ragged_inputs([5, 3], [4, 6], K=3, D=8, dtype=torch.float32)
    proj = torch.randn(3 * 8, 6)
    reports = torch.randn(2, 6)

    def step(x, c, s):
        E = residual_encode(x, xo, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend="native")
        emb = E.flatten(1) @ proj
        return contrastive_loss(emb, reports, 2.0, normalize=True, backend="native")

    try:
        compiled = torch.compile(step, fullgraph=True)
        loss = compiled(x, c, s)
    except Exception as e:  # pragma: no cover - inductor needs a working C++ toolchain
        if "InductorError" in type(e).__name__ or "CppCompileError" in type(e).__name__:
            pytest.skip(f"inductor could not compile on this machine: {type(e).__name__}")
        raise
    grads = torch.autograd.grad(loss, (x, c, s))
    want = step(x, c, s)
    want_grads = torch.autograd.grad(want, (x, c, s))
    assert_close(loss, want, dtype=torch.float32)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, dtype=torch.float32)


def test_bank_update_matches_torch_for_every_dtype():
    g = torch.Generator().manual_seed(5)
    for bank_dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for values_dtype in (torch.float32, torch.bfloat16):
            bank = torch.randn(20, 7, generator=g).to(bank_dtype)
            idx = torch.tensor([3, 0, 19], dtype=torch.int32)
            vals = torch.randn(3, 7, generator=g).to(values_dtype)
            want = bank_update_(bank.clone(), idx, vals, momentum=0.3, backend="torch")
            got = bank_update_(bank.clone(), idx, vals, momentum=0.3, backend="native")
            assert_close(got.float(), want.float(), dtype=bank_dtype)
            assert torch.equal(bank_gather(got, idx.long(), backend="native"), got[idx.long()])


def _check_float32_kernel_paths():
    """float32 native vs float64 reference over the shapes the AVX-512 kernels special-case: K and D not multiples
    of 16 (padded columns, masked tails), K above one 64-column tile, row counts not multiples of the 6-row
    microkernel, strided and float16 banks (converted, not read in place), row views (read in place with a row
    stride other than D), and non-contiguous x."""
    cases = [(5, 33), (16, 48), (17, 100), (70, 20), (64, 384)]
    for K, D in cases:
        x, xo, c, s, bank, bi, bo = _ragged_inputs([13, 0, 101], [7, 300, 65], K=K, D=D, dtype=torch.float32)
        # "row_view": unit column stride but a row stride of 2D, still read in place
        banks = {"float32": bank, "strided": torch.cat([bank, bank], 1)[:, ::2], "float16": bank.half(),
                 "row_view": torch.cat([bank, bank], 1)[:, :D]}
        xs = {"contiguous": x, "strided": torch.cat([x, x], 1)[:, ::2].detach().requires_grad_(),
              "row_view": torch.cat([x, x], 1)[:, D:].detach().requires_grad_()}
        for bank_kind, bk in banks.items():
            for xk, xx in xs.items():
                for assignment in ("soft", "hard"):
                    got, want = [], []
                    for backend, out in (("native", got), ("reference", want)):
                        args = [t.detach().double().requires_grad_() if backend == "reference" else t
                                for t in (xx, c, s)]
                        bank_b = bk.double() if backend == "reference" else bk
                        for t in args:
                            t.grad = None
                        E, mass = residual_encode(args[0], xo, args[1], args[2], bank=bank_b, bank_index=bi,
                                                  bank_offsets=bo, assignment=assignment, return_mass=True,
                                                  backend=backend)
                        (E * torch.linspace(-1, 1, E.numel(), dtype=E.dtype).view_as(E)).sum().backward()
                        out += [E.detach(), mass, args[0].grad, args[1].grad] + (
                            [args[2].grad] if assignment == "soft" else [])
                    for name, a, b in zip(["E", "mass", "grad_x", "grad_c", "grad_s"], got, want):
                        assert_close(a, b, dtype=torch.float32, scale=10.0,
                                     msg=f"K={K} D={D} bank={bank_kind} x={xk} {assignment} {name}")


def test_float32_kernel_paths():
    """The default float32 path (AVX-512 kernels when the CPU has them) against the reference."""
    _check_float32_kernel_paths()


def _run_without_avx512(check: str):
    """test_native_cpu.<check>() on the portable path (ATen GEMMs, scalar loops): a fresh interpreter with
    DRE_NATIVE_NO_AVX512=1, which the extension reads once."""
    env = dict(os.environ, DRE_NATIVE_NO_AVX512="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    code = f"import test_native_cpu as t; t.{check}(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.join(ROOT, "tests"))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_float32_kernel_paths_without_avx512():
    _run_without_avx512("_check_float32_kernel_paths")


def _check_saturated_soft_backward():
    from test_ops_residual_encode import SATURATED_LIMITS, saturated_soft_backward_errors

    for seed in range(3):
        for what, err in saturated_soft_backward_errors("native", "cpu", seed).items():
            assert err < SATURATED_LIMITS[what], f"seed {seed}: grad {what}: {err:.2e} of its size"


def test_saturated_soft_backward_without_avx512():
    """test_ops_residual_encode's saturated-softmax precision test on the portable path (its own u loop)."""
    _run_without_avx512("_check_saturated_soft_backward")
