"""contrastive_loss: every backend against `reference` and against open_clip's ClipLoss formula."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, supports_float64
from dre_kernels import contrastive_loss

SHAPES = [(1, 1), (2, 5), (7, 3), (33, 64), (70, 17)]


def make(B, P, dtype=torch.float32, device="cpu", seed=0, labels=False, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, P, generator=g).to(dtype).to(device).requires_grad_(requires_grad)
    b = torch.randn(B, P, generator=g).to(dtype).to(device).requires_grad_(requires_grad)
    lab = torch.randint(0, max(1, B // 2), (B,), generator=g).to(device) if labels else None
    return a, b, lab


def open_clip_loss(a, b, logit_scale):
    """open_clip's ClipLoss (single process): CE over image->text and text->image logits, averaged."""
    logits_per_image = logit_scale * a @ b.T
    logits_per_text = logit_scale * b @ a.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}_P{p}" for b, p in SHAPES])
def test_forward_matches_reference(backend_device, shape, dtype, labels, normalize, reduction):
    backend, device = backend_device
    if dtype == torch.float64 and not supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    a, b, lab = make(*shape, dtype=dtype, device=device, labels=labels)
    s = 3.0 if normalize else 0.7
    got = contrastive_loss(a, b, s, labels=lab, normalize=normalize, reduction=reduction, backend=backend)
    want = contrastive_loss(a, b, s, labels=lab, normalize=normalize, reduction=reduction, backend="reference")
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == want_dtype and got.shape == (() if reduction == "mean" else (shape[0],))
    # the loss is computed in float32 from rounded inputs: only float32 rounding separates the backends
    assert_close(got, want, dtype=want_dtype, scale=10.0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}_P{p}" for b, p in SHAPES])
def test_gradients_match_reference(backend_device, shape, dtype, labels, normalize):
    backend, device = backend_device
    a, b, lab = make(*shape, dtype=dtype, device=device, labels=labels, seed=3)
    s = torch.tensor(2.5, device=device, requires_grad=True)
    w = torch.randn(shape[0], generator=torch.Generator().manual_seed(4)).to(device)
    got = contrastive_loss(a, b, s, labels=lab, normalize=normalize, reduction="none", backend=backend)
    want = contrastive_loss(a, b, s, labels=lab, normalize=normalize, reduction="none", backend="reference")
    g_got = torch.autograd.grad((got * w).sum(), [a, b, s])
    g_want = torch.autograd.grad((want * w).sum(), [a, b, s])
    for name, x, y in zip("abs", g_got, g_want):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert_close(x, y, scale=10.0 if name == "s" else 1.0, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_at_or_below_the_normalize_epsilon(backend_device, dtype):
    """normalize divides by max(||a_i||, 1e-12): a zero row, one far below the epsilon and one just above it (all of
    whose gradient is then gu / eps, or the full projection) give the reference's loss and gradients."""
    backend, device = backend_device
    a, b, _ = make(9, 6, dtype=torch.float32, requires_grad=False)
    a[2] = 0.0
    b[5] = 0.0
    a[4] *= 1e-20 / a[4].norm()
    b[7] *= 3e-12 / b[7].norm()
    a = a.to(dtype).to(device).requires_grad_()
    b = b.to(dtype).to(device).requires_grad_()
    s = torch.tensor(2.0, device=device, requires_grad=True)
    w = torch.rand(9, generator=torch.Generator().manual_seed(5)).to(device)
    got = contrastive_loss(a, b, s, normalize=True, reduction="none", backend=backend)
    want = contrastive_loss(a, b, s, normalize=True, reduction="none", backend="reference")
    assert_close(got, want, dtype=torch.float32, scale=10.0)
    g_got = torch.autograd.grad((got * w).sum(), [a, b, s])
    g_want = torch.autograd.grad((want * w).sum(), [a, b, s])
    for name, x, y in zip("abs", g_got, g_want):
        assert torch.isfinite(x).all(), name
        assert_close(x, y, scale=10.0, msg=f"grad {name}")  # relative to the largest (~1e12 = gu / eps)


def test_equals_open_clip_clip_loss(backend_device):
    backend, device = backend_device
    a, b, _ = make(19, 12, device=device, requires_grad=False)
    for s in (1.0, 14.3):
        got = contrastive_loss(a, b, s, backend=backend)
        assert_close(got, open_clip_loss(a, b, s), dtype=torch.float32, scale=10.0)


def test_labels_multi_positive(backend_device):
    backend, device = backend_device
    a, b, _ = make(6, 4, device=device, requires_grad=False)
    s = 1.3
    # every label distinct: the same as no labels
    distinct = torch.arange(6, device=device) * 7
    assert_close(contrastive_loss(a, b, s, labels=distinct, backend=backend),
                 contrastive_loss(a, b, s, backend=backend), dtype=torch.float32)
    # groups {0,1,2} and {3,4,5}: r_i = lse_i - mean over the group of logits_ij, by hand
    lab = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    logits = s * a @ b.T
    groups = [[0, 1, 2], [3, 4, 5]]
    r = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, groups[i // 3]].mean() for i in range(6)])
    c = torch.stack([torch.logsumexp(logits[:, j], 0) - logits[groups[j // 3], j].mean() for j in range(6)])
    got = contrastive_loss(a, b, s, labels=lab, reduction="none", backend=backend)
    assert_close(got, (r + c) / 2, dtype=torch.float32)


def test_logit_scale_float_or_tensor(backend_device):
    backend, device = backend_device
    a, b, _ = make(5, 3, device=device, requires_grad=False)
    x = contrastive_loss(a, b, 2.0, backend=backend)
    y = contrastive_loss(a, b, torch.tensor(2.0, dtype=torch.float64, device=device), backend=backend)
    assert_close(x, y, dtype=torch.float32)


def test_noncontiguous(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(5)
    a = torch.randn(9, 16, generator=g).to(device)[:, ::2]
    b = torch.randn(8, 9, generator=g).to(device).t()
    assert not a.is_contiguous() and not b.is_contiguous()
    got = contrastive_loss(a, b, 1.7, normalize=True, backend=backend)
    want = contrastive_loss(a.contiguous(), b.contiguous(), 1.7, normalize=True, backend="reference")
    assert_close(got, want, dtype=torch.float32)


@pytest.mark.parametrize("std, scale", [(3.0, 14.3), (1.0, 30.0)])
def test_unnormalised_large_logits(backend_device, std, scale):
    """Without normalize, inputs with large norms put every logit of a column far below the Cauchy-Schwarz bound
    that one-pass kernels sum the column at (by more than float64's exp range, ~700): the column log-sum-exps
    must stay exact."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(11)
    a = (std * torch.randn(70, 64, generator=g)).to(device).requires_grad_()
    b = (std * torch.randn(70, 64, generator=g)).to(device).requires_grad_()
    labels = torch.arange(70).remainder(9).to(device)
    with torch.no_grad():  # the regime: some column's logits all sit > 700 below the bound
        logits = scale * a.double() @ b.double().T
        bound = scale * a.double().norm(dim=1).max() * b.double().norm(dim=1)
        assert (bound - logits.max(0).values).max() > 700
    for lab in (None, labels):
        got = contrastive_loss(a, b, scale, labels=lab, normalize=False, reduction="none", backend=backend)
        want = contrastive_loss(a.double(), b.double(), scale, labels=lab, normalize=False, reduction="none",
                                backend="reference")
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype=torch.float32)
        w = torch.rand(70, generator=g).to(device)
        ga, gb = torch.autograd.grad((got * w).sum(), (a, b))
        ra, rb = torch.autograd.grad((want * w.double()).sum(), (a, b))
        assert_close(ga, ra, dtype=torch.float32, scale=4)
        assert_close(gb, rb, dtype=torch.float32, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("B", [1, 2, 3, 70])
def test_saturated_loss_has_exactly_zero_gradient(backend_device, B, normalize, dtype):
    """Each pair far apart from the others (huge unnormalised logits): every softmax is one-hot, the loss and its
    exact gradient are 0, and `torch` gets exactly 0 (it subtracts the logits it summed). A kernel that recomputes
    a logit in the backward by another rounding than the forward's, or fuses s * dot - max into an FMA, leaves
    s x ulp(l) ~ 1e-2 here (found by tests/fuzz_ops.py)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(12)
    a = (3.0 * torch.randn(B, 33, generator=g)).to(device, dtype)
    b = (a + 0.1 * torch.randn(B, 33, generator=g).to(device, dtype)).requires_grad_()
    a.requires_grad_()
    scale = 3000.0 if normalize else 30.0
    with torch.no_grad():
        an, bn = a.double(), b.double()
        if normalize:
            an, bn = F.normalize(an, dim=1), F.normalize(bn, dim=1)
        logits = scale * an @ bn.T
        off = torch.eye(B, dtype=torch.float64, device=device) * 1e9  # the diagonal out of the min
        d = logits.diagonal()
        assert (d[:, None] - logits + off).min() > 200 and (d[None, :] - logits + off).min() > 200
    loss = contrastive_loss(a, b, scale, normalize=normalize, reduction="none", backend=backend)
    ga, gb = torch.autograd.grad((loss * torch.linspace(0.5, 1.0, B, device=device)).sum(), (a, b))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_float64(backend_device, labels, normalize):
    backend, device = backend_device
    if not supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    a, b, lab = make(5, 3, dtype=torch.float64, device=device, labels=labels)
    s = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)

    def f(a, b, s):
        return contrastive_loss(a, b, s, labels=lab, normalize=normalize, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (a, b, s), eps=1e-6, atol=1e-6)


def near_saturated_case(B, P, scale, normalize, labels, seed=21):
    """Pairs (a_i, b_i = a_i + noise) the model already tells apart: at these scales most rows' losses lie between
    1e-3 and 1e-7."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, P, generator=g)
    b = a + 0.3 * torch.randn(B, P, generator=g)
    lab = None
    if labels:  # a few rows share a label (n_i = 2), the rest have one of their own
        lab = torch.arange(B)
        lab[:8] = torch.arange(8) // 2
    return a, b, lab


def row_relative_error(got, want):
    """max over rows of ||got_i - want_i|| / ||want_i||, for (B,) or (B, P)."""
    got, want = got.detach().double().reshape(want.shape[0], -1), want.detach().reshape(want.shape[0], -1)
    return float(((got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("normalize, scale", [(True, 16.0), (True, 20.0), (False, 0.5)], ids=["n16", "n20", "raw"])
def test_small_losses_and_their_gradients_keep_relative_precision(backend_device, normalize, scale, labels, dtype):
    """Where a row's only positive is its diagonal and its loss r_i is small, r_i = R_i - l_ii and the diagonal's
    p_ii - 1 = exp(l_ii - R_i) - 1 each cancel to an absolute error of ulp(R_i) (1e-6 at R ~ 16): a relative error
    of 1e-2 in the loss and the gradient of a row at r_i ~ 1e-5. The kernel backends compute r_i from the
    off-diagonal log-sum-exp and p_ii - 1 as expm1(-r_i), and keep ~1e-6 (before: 3e-2 in the loss, 2e-2 in the
    gradients at scale 20). The `torch` backend is the eager baseline, R_i - l_ii as written."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the eager baseline forms R_i - l_ii as written")
    a, b, lab = near_saturated_case(64, 48, scale, normalize, labels)
    a, b = a.to(dtype), b.to(dtype)
    w = torch.linspace(0.5, 1.0, 64, dtype=torch.float64)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    want = contrastive_loss(a64, b64, s64, labels=lab, normalize=normalize, reduction="none", backend="reference")
    assert float(want.detach().median()) < 2e-4  # the regime
    ra, rb, rs = torch.autograd.grad((want * w).sum(), (a64, b64, s64))
    ad, bd = a.to(device).requires_grad_(), b.to(device).requires_grad_()
    sd = torch.tensor(scale, device=device, requires_grad=True)
    got = contrastive_loss(ad, bd, sd, labels=None if lab is None else lab.to(device), normalize=normalize,
                           reduction="none", backend=backend)
    ga, gb, gs = torch.autograd.grad((got * w.float().to(device)).sum(), (ad, bd, sd))
    assert row_relative_error(got.cpu(), want.detach()) < 1e-4  # the loss is float32 for any input dtype
    grad_tol = 1e-4 if dtype == torch.float32 else 8e-3  # gradients are returned in the inputs' dtype
    assert row_relative_error(ga.cpu(), ra) < grad_tol
    assert row_relative_error(gb.cpu(), rb) < grad_tol
    assert abs(float(gs) - float(rs)) < 1e-4 * abs(float(rs))


@pytest.mark.parametrize("labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("normalize", [False, True])
def test_nan_propagates_without_crash(backend_device, normalize, labels):
    """A NaN in one row of a makes its row's logits and every column's log-sum-exp NaN: the losses are NaN where the
    reference's are (every entry), the backward runs, and no backend turns the NaN into a finite value (a max
    that drops NaN operands, as the GPU's does, must not hide it: the sums still carry it)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    a[2, 3] = float("nan")
    lab = torch.tensor([0, 1, 0, 2, 1]) if labels else None
    want = contrastive_loss(a, b, 2.0, labels=lab, normalize=normalize, reduction="none", backend="reference")
    ad = a.to(device).requires_grad_()
    got = contrastive_loss(ad, b.to(device), 2.0, labels=None if lab is None else lab.to(device), normalize=normalize,
                           reduction="none", backend=backend)
    assert torch.equal(torch.isnan(got.detach().cpu()), torch.isnan(want)), (got, want)
    got.sum().backward()
    assert torch.isnan(ad.grad).any()
