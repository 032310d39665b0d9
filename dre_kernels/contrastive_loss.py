"""contrastive_loss: the CLIP-style in-batch contrastive loss between slide and report embeddings.

    â_i = a_i / max(||a_i||, 1e-12) if normalize else a_i     (same for b; F.normalize's epsilon)
    logits_ij = s <â_i, b̂_j>
    P_i = {j : labels_j == labels_i}  (P_i = {i} without labels)
    r_i = -(1/|P_i|) sum_{j in P_i} log softmax_j(logits_i,:)     c_j = -(1/|P_j|) sum_{i in P_j} log softmax_i(logits_:,j)
    "none": (r + c) / 2, shape (B,);  "mean": (mean r + mean c) / 2

With labels=None and normalize=False this is open_clip's ClipLoss()(a, b, s). The result is float32 (float64
when a or b is float64, so that gradcheck can run). The `reference` and `torch` backends materialise the B x B
logits; the kernel backends never do. The kernel backends keep the relative precision of a small r_i (a row the
model already gets right) and of its gradient (contrastive_loss_finish, contrastive_loss_backward_torch); the
`torch` backend is the eager baseline and forms logsumexp - l_ii as written, to within ulp(logsumexp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dre_kernels import _backend, _checks
from dre_kernels._library import loss_dtype

NORMALIZE_EPS = 1e-12


def _scale_tensor(logit_scale, dtype, device) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.to(dtype)
    return torch.tensor(float(logit_scale), dtype=dtype, device=device)


def contrastive_loss(a, b, logit_scale, *, labels=None, normalize=False, reduction="mean", backend="auto"):
    """Symmetric in-batch contrastive loss of a (B, P) against b (B, P); see the module docstring for the formula.

    logit_scale: the multiplier itself (e.g. log_scale.exp()), a Python float or a 0-dim tensor that may
    require grad. labels (B,) int: rows with equal labels are all positives of each other.
    """
    name = _checks.check_contrastive_loss(a, b, logit_scale, labels, normalize, reduction, backend)
    acc = loss_dtype(a, b)
    s = _scale_tensor(logit_scale, acc, a.device)
    if name == "reference":
        per_row = contrastive_loss_reference(a, b, s, labels, normalize)
    elif name == "torch":
        per_row = contrastive_loss_torch(a, b, s, labels, normalize)
    else:
        per_row = _backend.kernel(name, "contrastive_loss_fwd")(a, b, s, labels, normalize)[0]
    return per_row.mean() if reduction == "mean" else per_row


def _normalized(t, acc, normalize):
    t = t.to(acc)
    return F.normalize(t, dim=1, eps=NORMALIZE_EPS) if normalize else t


def _positives(labels, B, device):
    if labels is None:
        return torch.eye(B, dtype=torch.bool, device=device)
    return labels[:, None] == labels[None, :]


def contrastive_loss_reference(a, b, s, labels, normalize):
    """The formula as written: full logits, both log-softmaxes, averaged over each row's and column's positives."""
    acc = loss_dtype(a, b)
    A, Bm = _normalized(a, acc, normalize), _normalized(b, acc, normalize)
    logits = s.to(acc) * (A @ Bm.t())
    pos = _positives(labels, a.shape[0], a.device).to(acc)
    row_log_softmax = torch.log_softmax(logits, dim=1)
    col_log_softmax = torch.log_softmax(logits, dim=0)
    r = -(row_log_softmax * pos).sum(1) / pos.sum(1)
    c = -(col_log_softmax * pos).sum(0) / pos.sum(0)
    return (r + c) / 2


def contrastive_loss_torch(a, b, s, labels, normalize):
    """Eager: one GEMM for the logits, log-sum-exp per row and column; positives via the diagonal or a mask."""
    acc = loss_dtype(a, b)
    A, Bm = _normalized(a, acc, normalize), _normalized(b, acc, normalize)
    logits = (A @ Bm.t()) * s.to(acc)
    row_lse = torch.logsumexp(logits, dim=1)
    col_lse = torch.logsumexp(logits, dim=0)
    if labels is None:
        diag = logits.diagonal()
        return (row_lse + col_lse) / 2 - diag
    pos = (labels[:, None] == labels[None, :]).to(acc)
    n_pos = pos.sum(1)  # the positives relation is symmetric, so rows and columns have the same counts
    pos_logits = logits * pos
    r = row_lse - pos_logits.sum(1) / n_pos
    c = col_lse - pos_logits.sum(0) / n_pos
    return (r + c) / 2


def contrastive_loss_finish(off_row_lse, off_col_lse, diag, pos_row, pos_col, n_pos):
    """The kernel backends' last forward step, readable (they run it in a kernel: triton's _cl_finish_kernel, CUDA's
    dre_cl_finish, csrc/contrastive_loss_finish.h on CPU), after their pass over the logits, which yields for each row i
    and column j the log-sum-exp of the off-diagonal logits O_i = LSE_{j != i} l_ij and O'_j = LSE_{i != j} l_ij, the
    diagonal d_i = l_ii, the positive sums sum_{j in P_i} l_ij and |P_i|:

        R_i = logaddexp(O_i, d_i)                  (row_lse; col_lse likewise from O')
        r_i = log(1 + exp(O_i - d_i))              where |P_i| = 1: its only positive is its diagonal
        r_i = R_i - (1/|P_i|) sum_{j in P_i} l_ij  elsewhere          (c likewise)

    The first form of r keeps its relative precision as r -> 0, where R_i - d_i keeps only ulp(R_i) (4e-6 at
    R ~ 50): a row the model already gets right. Returns (loss = (r + c)/2, row_lse, col_lse, r, c)."""
    zero = torch.zeros_like(diag)
    single = n_pos == 1
    row_lse, col_lse = torch.logaddexp(off_row_lse, diag), torch.logaddexp(off_col_lse, diag)
    r = torch.where(single, torch.logaddexp(off_row_lse - diag, zero), row_lse - pos_row / n_pos)
    c = torch.where(single, torch.logaddexp(off_col_lse - diag, zero), col_lse - pos_col / n_pos)
    return (r + c) * 0.5, row_lse, col_lse, r, c


def contrastive_loss_parts_torch(a, b, s, labels, normalize):
    """contrastive_loss_fwd's outputs, in eager torch (materialising B x B): the kernel backends' contract
    (dre_kernels._library) and their arithmetic (contrastive_loss_finish), readable."""
    acc = loss_dtype(a, b)
    A, Bm = _normalized(a, acc, normalize), _normalized(b, acc, normalize)
    logits = (A @ Bm.t()) * s.to(acc)
    B = logits.shape[0]
    pos = _positives(labels, B, a.device).to(acc)
    off = logits.masked_fill(torch.eye(B, dtype=torch.bool, device=a.device), float("-inf"))
    return contrastive_loss_finish(torch.logsumexp(off, 1), torch.logsumexp(off, 0), logits.diagonal(),
                                   (logits * pos).sum(1), (logits * pos).sum(0), pos.sum(1))


def contrastive_loss_backward_torch(grad_loss, a, b, s, labels, normalize, row_lse, col_lse, row_loss, col_loss):
    """The backward the kernels compute, in eager torch (materialising B x B; kernels recompute it in tiles).

    For loss_i = (r_i + c_i)/2 with upstream g and logits L = s Â B̂^T:
        W_ij = g_i/2 (exp(L_ij - row_lse_i) - P_ij/|P_i|) + g_j/2 (exp(L_ij - col_lse_j) - P_ij/|P_j|)
        grad Â = s W B̂,  grad B̂ = s W^T Â,  grad s = sum_ij W_ij <â_i, b̂_j>
    except on the diagonal of a row whose only positive it is (|P_i| = 1): there exp(L_ii - row_lse_i) - 1 is
    expm1(-r_i), exactly, without its cancellation (and expm1(-c_i) for the column part). Then through the
    normalisation: grad a = (grad â - â <grad â, â>) / ||a|| (for ||a|| > eps).
    """
    acc = loss_dtype(a, b)
    A, Bm = _normalized(a, acc, normalize), _normalized(b, acc, normalize)
    s = s.to(acc)
    g = grad_loss.to(acc)
    sim = A @ Bm.t()
    logits = s * sim
    pos = _positives(labels, a.shape[0], a.device).to(acc)
    n_pos = pos.sum(1)
    single = n_pos == 1
    row_part = torch.exp(logits - row_lse.to(acc)[:, None]) - pos / n_pos[:, None]
    col_part = torch.exp(logits - col_lse.to(acc)[None, :]) - pos / n_pos[None, :]
    row_part.diagonal().copy_(torch.where(single, torch.expm1(-row_loss.to(acc)), row_part.diagonal()))
    col_part.diagonal().copy_(torch.where(single, torch.expm1(-col_loss.to(acc)), col_part.diagonal()))
    W = (g[:, None] / 2) * row_part + (g[None, :] / 2) * col_part
    grad_A, grad_B = s * (W @ Bm), s * (W.t() @ A)
    grad_s = (W * sim).sum()
    if normalize:
        grad_A = _normalize_backward(a.to(acc), A, grad_A)
        grad_B = _normalize_backward(b.to(acc), Bm, grad_B)
    return grad_A.to(a.dtype), grad_B.to(b.dtype), grad_s


def _normalize_backward(x, x_hat, grad_hat):
    norm = x.norm(dim=1, keepdim=True)
    projected = (grad_hat - x_hat * (grad_hat * x_hat).sum(1, keepdim=True)) / norm.clamp_min(NORMALIZE_EPS)
    return torch.where(norm > NORMALIZE_EPS, projected, grad_hat / NORMALIZE_EPS)
