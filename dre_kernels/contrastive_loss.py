"""contrastive_loss: the CLIP-style in-batch contrastive loss between slide and report embeddings.

    â_i = a_i / max(||a_i||, 1e-12) if normalize else a_i     (same for b; F.normalize's epsilon)
    logits_ij = s <â_i, b̂_j>
    P_i = {j : labels_j == labels_i}  (P_i = {i} without labels)
    r_i = -(1/|P_i|) sum_{j in P_i} log softmax_j(logits_i,:)     c_j = -(1/|P_j|) sum_{i in P_j} log softmax_i(logits_:,j)
    "none": (r + c) / 2, shape (B,);  "mean": (mean r + mean c) / 2

With labels=None and normalize=False this is open_clip's ClipLoss()(a, b, s). The result is float32 (float64
when a or b is float64, so that gradcheck can run). The `reference` and `torch` backends materialise the B x B
logits; the kernel backends never do.
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


def contrastive_loss_backward_torch(grad_loss, a, b, s, labels, normalize, row_lse, col_lse):
    """The backward the kernels compute, in eager torch (materialising B x B; kernels recompute it in tiles).

    For loss_i = (r_i + c_i)/2 with upstream g and logits L = s Â B̂^T:
        W_ij = g_i/2 (exp(L_ij - row_lse_i) - P_ij/|P_i|) + g_j/2 (exp(L_ij - col_lse_j) - P_ij/|P_j|)
        grad Â = s W B̂,  grad B̂ = s W^T Â,  grad s = sum_ij W_ij <â_i, b̂_j>
    then through the normalisation: grad a = (grad â - â <grad â, â>) / ||a|| (for ||a|| > eps).
    """
    acc = loss_dtype(a, b)
    A, Bm = _normalized(a, acc, normalize), _normalized(b, acc, normalize)
    s = s.to(acc)
    g = grad_loss.to(acc)
    sim = A @ Bm.t()
    logits = s * sim
    pos = _positives(labels, a.shape[0], a.device).to(acc)
    n_pos = pos.sum(1)
    W = (g[:, None] / 2) * (torch.exp(logits - row_lse.to(acc)[:, None]) - pos / n_pos[:, None]) \
        + (g[None, :] / 2) * (torch.exp(logits - col_lse.to(acc)[None, :]) - pos / n_pos[None, :])
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
