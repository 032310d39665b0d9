"""residual_encode: every backend against `reference` on awkward shapes, dtypes and layouts, forward and backward."""

import importlib

import pytest
import torch

import dre_kernels
from conftest import assert_close, make_offsets, supports_float64
from dre_kernels import residual_encode

# (name, fresh rows per slide, bank rows per slide or None, K, D)
CASES = [
    ("basic", [5, 7], [9, 4], 4, 8),
    ("odd_empty_one_row", [3, 0, 1, 11], [2, 5, 0, 7], 5, 13),
    ("no_bank", [6, 1, 0], None, 3, 7),
    ("bank_only", [0, 0, 0], [10, 3, 1], 6, 5),
    ("all_empty", [0, 0], [0, 0], 2, 3),
    ("no_slides", [], None, 2, 4),
    ("k1_d1", [4, 2], [3, 3], 1, 1),
    ("wider", [40, 17], [64, 30], 33, 70),
]
CASE_IDS = [c[0] for c in CASES]
HALF_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(lengths, bank_lengths, K, D, *, dtype=torch.float32, bank_dtype=None, cw_dtype=None, hard=False,
                device="cpu", seed=0, index_dtype=torch.int64, T=None, duplicates=True, requires_grad=True):
    """Random ragged inputs. For hard assignment every row sits near one codeword, so no backend meets a near tie."""
    g = torch.Generator().manual_seed(seed)
    M = sum(lengths)
    c = torch.randn(K, D, generator=g)  # never requires grad itself: x and bank below are built from it
    if hard:
        c = c * 2.0
        x = c[torch.randint(K, (M,), generator=g)] + 0.1 * torch.randn(M, D, generator=g)
    else:
        x = 0.5 * torch.randn(M, D, generator=g)
        c = 0.5 * c
    scale = (0.5 + torch.rand(K, generator=g)) / D
    inputs = dict(
        x=x.to(dtype).to(device).requires_grad_(requires_grad),
        x_offsets=make_offsets(lengths, index_dtype, device),
        codewords=c.clone().to(cw_dtype or dtype).to(device).requires_grad_(requires_grad),
        scale=scale.to(cw_dtype or dtype).to(device).requires_grad_(requires_grad and not hard),
    )
    if bank_lengths is not None:
        Mb = sum(bank_lengths)
        T = T or max(Mb, 1) + 3
        if hard:
            bank = c[torch.randint(K, (T,), generator=g)] + 0.1 * torch.randn(T, D, generator=g)
        else:
            bank = 0.5 * torch.randn(T, D, generator=g)
        if duplicates:
            index = torch.randint(T, (Mb,), generator=g)
        else:
            index = torch.randperm(T, generator=g)[:Mb]
        inputs.update(bank=bank.to(bank_dtype or dtype).to(device), bank_index=index.to(index_dtype).to(device),
                      bank_offsets=make_offsets(bank_lengths, index_dtype, device))
    return inputs


def run(inputs, backend, assignment, return_mass=False):
    kw = {k: v for k, v in inputs.items() if k not in ("x", "x_offsets", "codewords", "scale")}
    return residual_encode(inputs["x"], inputs["x_offsets"], inputs["codewords"], inputs["scale"],
                           assignment=assignment, return_mass=return_mass, backend=backend, **kw)


def grads(inputs, out, grad_out):
    """Gradients of <out, grad_out>; an input that took no part (an empty x, say) gets zeros rather than None."""
    wrt = [inputs[k] for k in ("x", "codewords", "scale") if inputs[k].requires_grad]
    got = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, got)]


@pytest.mark.parametrize("assignment", ["soft", "hard"])
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_mass_match_reference(backend_device, case, dtype, assignment):
    backend, device = backend_device
    if dtype == torch.float64 and not supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    _, lengths, bank_lengths, K, D = case
    inp = make_inputs(lengths, bank_lengths, K, D, dtype=dtype, hard=assignment == "hard", device=device)
    E, mass = run(inp, backend, assignment, return_mass=True)
    E_ref, mass_ref = run(inp, "reference", assignment, return_mass=True)
    assert E.shape == (len(lengths), K, D) and E.dtype == dtype and E.device.type == device
    assert mass.shape == (len(lengths), K) and mass.dtype == torch.float32
    assert_close(E, E_ref)
    assert_close(mass, mass_ref, dtype=torch.float32 if dtype == torch.float64 else dtype)


@pytest.mark.parametrize("assignment", ["soft", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_reference(backend_device, case, dtype, assignment):
    backend, device = backend_device
    _, lengths, bank_lengths, K, D = case
    inp = make_inputs(lengths, bank_lengths, K, D, dtype=dtype, hard=assignment == "hard", device=device, seed=1)
    E = run(inp, backend, assignment)
    E_ref = run(inp, "reference", assignment)
    g_out = torch.randn(E.shape, generator=torch.Generator().manual_seed(2)).to(E.dtype).to(device)
    got, want = grads(inp, E, g_out), grads(inp, E_ref, g_out)
    for name, a, b in zip(("x", "codewords", "scale"), got, want):
        assert a is not None and b is not None, name
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, msg=f"grad {name}")


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_mixed_dtypes(backend_device, assignment):
    backend, device = backend_device
    for x_dtype, cw_dtype, bank_dtype in [(torch.bfloat16, torch.float32, torch.float16),
                                          (torch.float32, torch.float32, torch.bfloat16),
                                          (torch.float16, torch.bfloat16, torch.float32)]:
        inp = make_inputs([6, 0, 9], [5, 7, 2], 5, 12, dtype=x_dtype, cw_dtype=cw_dtype, bank_dtype=bank_dtype,
                          hard=assignment == "hard", device=device)
        E = run(inp, backend, assignment)
        E_ref = run(inp, "reference", assignment)
        assert E.dtype == torch.promote_types(x_dtype, cw_dtype)
        assert_close(E, E_ref, dtype=torch.bfloat16 if torch.bfloat16 in (x_dtype, cw_dtype) else torch.float16)
        g_out = torch.ones_like(E)
        for a, b in zip(grads(inp, E, g_out), grads(inp, E_ref, g_out)):
            assert a.dtype == b.dtype
            assert_close(a, b)


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_noncontiguous_inputs_and_int32_indices(backend_device, assignment):
    backend, device = backend_device
    inp = make_inputs([7, 3, 0, 5], [4, 9, 1, 0], 6, 11, hard=assignment == "hard", device=device,
                      index_dtype=torch.int32, requires_grad=False)
    contiguous = dict(inp)
    # same values, strided layouts: x column-major, codewords every other column of a wider tensor, bank transposed,
    # bank_index and offsets with a stride of 2
    x = inp["x"].detach().t().contiguous().t().requires_grad_()
    wide = torch.zeros(inp["codewords"].shape[0], 2 * inp["codewords"].shape[1], device=device)
    wide[:, ::2] = inp["codewords"].detach()
    cw = wide[:, ::2].requires_grad_()
    bank = inp["bank"].t().contiguous().t()
    idx2 = torch.zeros(2 * inp["bank_index"].numel(), dtype=torch.int32, device=device)
    idx2[::2] = inp["bank_index"]
    off2 = torch.zeros(2 * inp["x_offsets"].numel(), dtype=torch.int32, device=device)
    off2[::2] = inp["x_offsets"]
    strided = dict(inp, x=x, codewords=cw, bank=bank, bank_index=idx2[::2], x_offsets=off2[::2])
    assert not (x.is_contiguous() or cw.is_contiguous() or strided["bank_index"].is_contiguous())
    contiguous["x"] = inp["x"].detach().clone().requires_grad_()
    contiguous["codewords"] = inp["codewords"].detach().clone().requires_grad_()
    E = run(strided, backend, assignment)
    E_ref = run(contiguous, "reference", assignment)
    assert_close(E, E_ref)
    g = torch.randn_like(E)
    (gx, gc), (gx_ref, gc_ref) = torch.autograd.grad(E, [x, cw], g), torch.autograd.grad(
        E_ref, [contiguous["x"], contiguous["codewords"]], g)
    assert_close(gx, gx_ref)
    assert_close(gc, gc_ref)


def test_duplicate_bank_indices_count_twice(backend_device):
    backend, device = backend_device
    inp = make_inputs([2], [6], 3, 4, device=device, requires_grad=False)
    inp["bank_index"] = torch.tensor([1, 1, 1, 0, 0, 2], device=device)
    E, mass = run(inp, backend, "soft", return_mass=True)
    E_ref, mass_ref = run(inp, "reference", "soft", return_mass=True)
    assert_close(E, E_ref)
    assert_close(mass, mass_ref)
    assert float(mass.sum()) == pytest.approx(8.0, rel=1e-5)  # 2 fresh + 6 bank rows, each of total weight 1


def test_hard_ties_go_to_the_smallest_index(backend_device):
    backend, device = backend_device
    inp = make_inputs([5, 4], [3, 2], 4, 6, hard=True, device=device, requires_grad=False)
    cw = inp["codewords"].detach().clone()
    cw[1] = cw[0]  # an exact tie for every row that is nearest to codeword 0 or 1
    cw[3] = cw[2]
    inp["codewords"] = cw
    _, mass = run(inp, backend, "hard", return_mass=True)
    assert mass[:, 1].sum() == 0 and mass[:, 3].sum() == 0
    assert mass.sum(1).tolist() == [8.0, 6.0]


def test_empty_slides_give_zeros_and_bank_gets_no_gradient(backend_device):
    backend, device = backend_device
    inp = make_inputs([3, 0, 2], [1, 0, 4], 3, 5, device=device)
    inp["bank"] = inp["bank"].clone().requires_grad_()
    E, mass = run(inp, backend, "soft", return_mass=True)
    assert torch.count_nonzero(E[1]) == 0 and torch.count_nonzero(mass[1]) == 0
    assert not mass.requires_grad
    E.sum().backward()
    assert inp["bank"].grad is None
    assert inp["x"].grad is not None and inp["codewords"].grad is not None and inp["scale"].grad is not None


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_gradcheck_float64(backend_device, assignment):
    backend, device = backend_device
    if not supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    inp = make_inputs([3, 0, 2], [2, 1, 3], 3, 4, dtype=torch.float64, hard=assignment == "hard", device=device)
    bank_kw = {k: inp[k] for k in ("bank", "bank_index", "bank_offsets")}
    wrt = (inp["x"], inp["codewords"]) + ((inp["scale"],) if assignment == "soft" else ())

    def f(x, cw, *scale):
        return residual_encode(x, inp["x_offsets"], cw, scale[0] if scale else None, assignment=assignment,
                               backend=backend, **bank_kw)

    assert torch.autograd.gradcheck(f, wrt, eps=1e-6, atol=1e-6)


def saturated_inputs(seed):
    """(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, grad_E), float32: rows each near one
    codeword and far from the others (s (d_ik - d_im) ~ 20: a row's largest soft assignment is 1 - 1e-8)."""
    g = torch.Generator().manual_seed(seed)
    K, D, lengths, bank_lengths = 3, 384, [10, 4], [50, 30]
    c = 0.5 * torch.randn(K, D, generator=g)
    s = 0.1 + 0.02 * torch.rand(K, generator=g)

    def near_codewords(n):
        return c[torch.randint(K, (n,), generator=g)] + 0.3 * torch.randn(n, D, generator=g)

    x = near_codewords(sum(lengths))
    bank = near_codewords(sum(bank_lengths) + 5)
    index = torch.randint(bank.shape[0], (sum(bank_lengths),), generator=g)
    grad_E = torch.randn(len(lengths), K, D, generator=g)
    return x, make_offsets(lengths), c, s, bank, index, make_offsets(bank_lengths), grad_E


def relative_errors(got, want, names=("x", "codewords", "scale")):
    """max |got - want| / max |want| of each gradient, by name."""
    return {n: float((a.double() - b.double()).abs().max() / b.double().abs().max())
            for a, b, n in zip(got, want, names)}


def saturated_soft_backward_errors(backend, device, seed):
    """relative_errors of the gradients of `backend` against the float64 reference at saturated_inputs(seed)."""
    x, xo, c, s, bank, index, bo, grad_E = saturated_inputs(seed)
    got, want = [], []
    for out, name, dtype in ((got, backend, torch.float32), (want, "reference", torch.float64)):
        inp = dict(x=x.to(device, dtype).requires_grad_(), x_offsets=xo.to(device),
                   codewords=c.to(device, dtype).requires_grad_(), scale=s.to(device, dtype).requires_grad_(),
                   bank=bank.to(device), bank_index=index.to(device), bank_offsets=bo.to(device))
        E = run(inp, name, "soft")
        out += grads(inp, E, grad_E.to(device, E.dtype))
    return relative_errors(got, want)


SATURATED_LIMITS = {"x": 2e-4, "codewords": 2e-4, "scale": 1e-3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_backward_precise_where_the_softmax_saturates(backend_device, seed):
    """grad scale to 1e-3 of its size where each row's largest assignment is 1 - 1e-8. Computed as written,
    u_ik = a_ik (g_ik - sum_j a_ij g_ij) cancels at the largest a_ik and leaves it an error of eps |g| (~1e-6),
    which grad_s_k = -sum_i u_ik d_ik multiplies by d: errors of 2-9% of grad scale here (up to all of it
    elsewhere); the kernels shift g by g at each row's largest assignment (1e-6). `torch` is autograd's softmax
    backward, which has that cancellation: not held to this."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("autograd's softmax backward (the eager baseline) cancels at a saturated softmax")
    errors = saturated_soft_backward_errors(backend, device, seed)
    for what, err in errors.items():
        assert err < SATURATED_LIMITS[what], f"grad {what}: {err:.2e} of its size"


def test_nan_propagates_without_crash(backend_device):
    backend, device = backend_device
    inp = make_inputs([3, 4], [2, 2], 3, 5, device=device, requires_grad=False)
    x = inp["x"].detach().clone()
    x[1, 2] = float("nan")
    inp["x"] = x
    E = run(inp, backend, "soft")
    E_ref = run(inp, "reference", "soft")
    assert torch.isnan(E[0]).any()
    assert torch.isfinite(E[1]).all()
    assert_close(E[1], E_ref[1])


def test_hard_mass_counts_rows(backend_device):
    backend, device = backend_device
    inp = make_inputs([10, 3, 0], [5, 0, 8], 4, 9, hard=True, device=device)
    _, mass = run(inp, backend, "hard", return_mass=True)
    assert mass.sum(1).tolist() == [15.0, 3.0, 8.0]
    assert torch.equal(mass, mass.round())


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_torch_backend_blocked_and_scatter_paths(monkeypatch, assignment):
    """The torch backend's row blocks (no autograd graph) and its many-slides scatter path agree with reference."""
    re_mod = importlib.import_module("dre_kernels.residual_encode")  # the package attribute is the function

    inp = make_inputs([5, 0, 9, 2, 1], [7, 3, 0, 11, 2], 4, 6, hard=assignment == "hard", requires_grad=False)
    E_ref, mass_ref = run(inp, "reference", assignment, return_mass=True)
    monkeypatch.setattr(re_mod, "TORCH_BLOCK_ROWS", 3)
    E, mass = run(inp, "torch", assignment, return_mass=True)
    assert_close(E, E_ref)
    assert_close(mass, mass_ref)
    monkeypatch.setattr(re_mod, "TORCH_MAX_LOOP_SLIDES", 2)
    inp = make_inputs([5, 0, 9, 2, 1], [7, 3, 0, 11, 2], 4, 6, hard=assignment == "hard")
    E, mass = run(inp, "torch", assignment, return_mass=True)
    E_ref, mass_ref = run(inp, "reference", assignment, return_mass=True)
    assert_close(E, E_ref)
    assert_close(mass, mass_ref)
    g = torch.randn_like(E)
    for a, b in zip(grads(inp, E, g), grads(inp, E_ref, g)):
        assert_close(a, b)


def test_reference_matches_hand_computation():
    """The reference against a tiny case worked out by hand: two rows, two codewords, hard and soft."""
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    off = torch.tensor([0, 2])
    E, mass = residual_encode(x, off, c, assignment="hard", return_mass=True, backend="reference")
    # both rows are nearest to c0 (d = 0 and 4 vs 8 and 4: tie on row 1 goes to index 0)
    assert mass.tolist() == [[2.0, 0.0]]
    assert E[0].tolist() == [[2.0, 0.0], [0.0, 0.0]]
    s = torch.tensor([0.5, 0.5])
    E = residual_encode(x, off, c, s, backend="reference")
    a0 = torch.softmax(torch.tensor([-0.0, -4.0]), 0)  # row 0: d = (0, 8) -> exp(-s d)
    a1 = torch.tensor([0.5, 0.5])                       # row 1: d = (4, 4)
    want_k0 = a0[0] * (x[0] - c[0]) + a1[0] * (x[1] - c[0])
    want_k1 = a0[1] * (x[0] - c[1]) + a1[1] * (x[1] - c[1])
    torch.testing.assert_close(E[0], torch.stack([want_k0, want_k1]))


def test_available_backends_lists_the_eager_ones():
    assert dre_kernels.available_backends("cpu")[:2] == ["reference", "torch"]


def test_hard_backward_reads_no_bank_rows(backend_device):
    """Hard assignment: the bank rows enter the backward only through the forward's mass, so overwriting the bank
    between forward and backward (as bank_update_ does in a training step) must not change the gradients."""
    backend, device = backend_device
    inp = make_inputs([6, 2, 5], [9, 4, 7], 4, 10, hard=True, device=device)
    E = run(inp, backend, "hard")
    g = torch.randn(E.shape, generator=torch.Generator().manual_seed(3)).to(device)
    want = grads(inp, E, g)
    inp2 = dict(inp)
    E2 = run(inp2, backend, "hard")
    inp2["bank"].fill_(float("nan"))
    got = grads(inp2, E2, g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert_close(a, b)
