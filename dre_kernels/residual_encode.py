"""residual_encode: residual aggregation of each slide's tiles against K codewords (Deep TEN soft / VLAD hard).

    S_b   = fresh rows x[x_offsets[b]:x_offsets[b+1]]  and  bank[bank_index[bank_offsets[b]:bank_offsets[b+1]]]
    d_ik  = ||x_i - c_k||^2
    soft: a_ik = exp(-s_k d_ik) / sum_j exp(-s_j d_ij)          hard: a_ik = [k = first argmin_j d_ij]
    E_bk  = sum_{i in S_b} a_ik (x_i - c_k)                     mass_bk = sum_{i in S_b} a_ik

This module holds the public function, the `reference` implementation (the executable spec, materialising
everything) and the `torch` one (GEMM formulation, the fair eager baseline). The kernel backends implement the
operators `dre::*residual_encode_fwd/bwd` (see dre_kernels/_library.py).
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from dre_kernels import _backend, _checks
from dre_kernels import _library  # noqa: F401  (registers the kernel backends' operators)

# Rows per block when the torch backend needs no autograd graph: bounds the gathered rows and the N x K scores.
TORCH_BLOCK_ROWS = 16384
# Above this many slides the torch backend scatters outer products instead of looping over slides in Python.
TORCH_MAX_LOOP_SLIDES = 1024


def accumulation_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (kernels accumulate in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def residual_encode(x, x_offsets, codewords, scale=None, *, bank=None, bank_index=None, bank_offsets=None,
                    assignment="soft", return_mass=False, backend="auto"):
    """Residual encoding of B slides against K codewords: returns E (B, K, D) [and mass (B, K) float32].

    x (M, D) fresh rows, split into slides by x_offsets (B+1,); codewords (K, D); scale (K,) for "soft".
    bank (T, D), bank_index (Mb,), bank_offsets (B+1,): extra rows per slide taken from a memory bank (no
    gradient). E_bk = sum_{i in S_b} a_ik (x_i - c_k) in promote_types(x.dtype, codewords.dtype); gradients flow
    to x, codewords and scale (soft); mass carries none. See SPEC.md for the full contract.
    """
    name = _checks.check_residual_encode(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, assignment,
                                         return_mass, backend)
    hard = assignment == "hard"
    if hard:
        scale = None
    if name == "reference":
        E, mass = residual_encode_reference(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard)
    elif name == "torch":
        E, mass = residual_encode_torch(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard)
    else:
        E, mass = _backend.kernel(name, "residual_encode_fwd")(
            x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard)
    return (E, mass) if return_mass else E


# ---------------------------------------------------------------------------------------------- reference
def residual_encode_reference(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard):
    """The formulas as written: per slide, gather its rows, form every residual (N, K, D), assign, sum."""
    acc = accumulation_dtype(x, codewords, scale, bank)
    out_dtype = torch.promote_types(x.dtype, codewords.dtype)
    K, D = codewords.shape
    c = codewords.to(acc)
    x_offs = x_offsets.tolist()
    b_offs = bank_offsets.tolist() if bank is not None else None
    E, mass = [], []
    for b in range(len(x_offs) - 1):
        rows = [x[x_offs[b]:x_offs[b + 1]].to(acc)]
        if bank is not None:
            idx = bank_index[b_offs[b]:b_offs[b + 1]].long()
            rows.append(bank.detach()[idx].to(acc))
        X = torch.cat(rows)                          # (N, D)
        residuals = X[:, None, :] - c[None, :, :]    # (N, K, D)
        d = (residuals * residuals).sum(-1)          # (N, K)
        if hard:
            a = F.one_hot(d.argmin(dim=1), K).to(acc)
        else:
            a = torch.softmax(-scale.to(acc) * d, dim=1)
        E.append((a[:, :, None] * residuals).sum(0))
        mass.append(a.detach().sum(0))
    if not E:
        return _no_slides(c, out_dtype)
    return torch.stack(E).to(out_dtype), torch.stack(mass).to(torch.float32)


# ---------------------------------------------------------------------------------------------- torch (eager)
def residual_encode_torch(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard):
    """GEMM formulation: d = ||x||^2 - 2 x c^T + ||c||^2, E_b = a_b^T X_b - mass_b c, per slide.

    Without an autograd graph to keep, rows are processed in blocks of TORCH_BLOCK_ROWS, so neither the gathered
    bank rows nor the N x K scores exist in full; with one, autograd keeps them anyway, so blocks buy nothing.
    """
    acc = accumulation_dtype(x, codewords, scale, bank)
    out_dtype = torch.promote_types(x.dtype, codewords.dtype)
    B = x_offsets.shape[0] - 1
    K, D = codewords.shape
    c = codewords.to(acc)
    c_sq = (c * c).sum(1)
    neg_scale = None if hard else -scale.to(acc)
    grad_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, codewords, None if hard else scale))

    def assign(X):
        d = torch.addmm(c_sq, X, c.t(), alpha=-2.0) + (X * X).sum(1, keepdim=True)
        if hard:
            return F.one_hot(d.argmin(dim=1), K).to(acc)
        return torch.softmax(d * neg_scale, dim=1)

    sources = [(x, x_offsets, None)]
    if bank is not None:
        sources.append((bank.detach(), bank_offsets, bank_index))

    if B > TORCH_MAX_LOOP_SLIDES:
        return _torch_scatter(sources, assign, B, K, D, c, acc, out_dtype, grad_graph)

    ax_terms = [[] for _ in range(B)]
    mass_terms = [[] for _ in range(B)]
    for src, offsets, index in sources:
        offs = offsets.tolist()
        total = offs[-1]
        block = total if (grad_graph and index is None) else TORCH_BLOCK_ROWS
        for r0 in range(0, total, max(block, 1)):
            r1 = min(total, r0 + block)
            rows = src[r0:r1] if index is None else src.index_select(0, index[r0:r1])
            X = rows.to(acc)
            a = assign(X)
            b = max(bisect.bisect_right(offs, r0) - 1, 0)
            while b < B and offs[b] < r1:
                lo, hi = max(offs[b], r0) - r0, min(offs[b + 1], r1) - r0
                if hi > lo:
                    ax_terms[b].append(a[lo:hi].t() @ X[lo:hi])
                    mass_terms[b].append(a[lo:hi].sum(0))
                b += 1
    E, mass = [], []
    for b in range(B):
        if ax_terms[b]:
            m = torch.stack(mass_terms[b]).sum(0)
            E.append(torch.stack(ax_terms[b]).sum(0) - m[:, None] * c)
            mass.append(m.detach())
        else:
            E.append(c * 0.0)  # zeros that stay in the autograd graph, so backward works when every slide is empty
            mass.append(c.new_zeros((K,)))
    if B == 0:
        return _no_slides(c, out_dtype)
    return torch.stack(E).to(out_dtype), torch.stack(mass).to(torch.float32)


def _no_slides(c, out_dtype):
    """E (0, K, D) and mass (0, K) for B = 0, attached to the graph of the codewords like any other output."""
    K, D = c.shape
    return (c[None] * 0.0)[:0].to(out_dtype), c.new_zeros((0, K), dtype=torch.float32)


def _torch_scatter(sources, assign, B, K, D, c, acc, out_dtype, grad_graph):
    """Many small slides: scatter-add the outer products a_i (x) x_i into E, in blocks of rows."""
    E = c.new_zeros((B, K, D))
    mass = c.new_zeros((B, K))
    block = max(1, (1 << 22) // (K * D))
    for src, offsets, index in sources:
        total = (index.shape[0] if index is not None else src.shape[0])
        offsets64 = offsets.to(torch.int64)
        for r0 in range(0, total, block):
            r1 = min(total, r0 + block)
            rows = src[r0:r1] if index is None else src.index_select(0, index[r0:r1])
            X = rows.to(acc)
            a = assign(X)
            seg = torch.searchsorted(offsets64[1:], torch.arange(r0, r1, device=X.device), right=True)
            E = E.index_add(0, seg, a[:, :, None] * X[:, None, :])
            mass = mass.index_add(0, seg, a)
    E = E - mass[:, :, None] * c
    return E.to(out_dtype), mass.detach().to(torch.float32)


# ---------------------------------------------------------------------------------------------- backward formulas
def residual_encode_backward_torch(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard,
                                   mass=None):
    """The backward the kernels compute, written in eager torch (recomputing the assignments per slide).

    With G = grad_E[b] (K, D), r_ik = x_i - c_k, z_ik = -s_k d_ik and g_ik = <G_k, r_ik>:
        u_ik     = a_ik (g_ik - sum_j a_ij g_ij)                 (dL/dz_ik; zero for hard assignment)
        grad x_i = sum_k a_ik G_k - 2 sum_k u_ik s_k r_ik         (fresh rows only)
        grad c_k = -mass_k G_k + 2 s_k sum_i u_ik r_ik           (fresh and bank rows)
        grad s_k = -sum_i u_ik d_ik
    u is computed as a_ik ((g_ik - g_im) - sum_j a_ij (g_ij - g_im)), m = argmax_j a_ij (equal, as sum_j a_ij = 1),
    as every kernel does: where a_im is near 1, sum_j a_ij g_ij ~ g_im cancels against g_im, leaving u_im with an
    error of eps |g| instead of eps |u_im|; with the shift the m term is 0 and the rest are small terms of their own
    precision (float32 grad_s at a saturated softmax: 1e-3 of its size before, 1e-8 after).
    For hard assignment u = 0: grad x_i = G_{k(i)}, grad c_k = -sum_b mass_bk G_bk, and bank rows enter only
    through mass: given the forward's `mass` (B, K), the bank rows are not read at all. Returns (grad_x,
    grad_codewords, grad_scale) in the dtypes of x, codewords and scale.
    """
    given_mass = hard and mass is not None
    acc = accumulation_dtype(x, codewords, scale, bank)
    K, D = codewords.shape
    c = codewords.to(acc)
    c_sq = (c * c).sum(1)
    s = None if hard else scale.to(acc)
    G_all = grad_E.to(acc)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device)
    grad_c = torch.zeros((K, D), dtype=acc, device=x.device)
    grad_s = torch.zeros((K,), dtype=acc, device=x.device)
    x_offs = x_offsets.tolist()
    b_offs = bank_offsets.tolist() if bank is not None else None
    for b in range(len(x_offs) - 1):
        G = G_all[b]
        parts = [(x[x_offs[b]:x_offs[b + 1]].to(acc), x_offs[b])]
        if bank is not None and not given_mass:
            idx = bank_index[b_offs[b]:b_offs[b + 1]].long()
            parts.append((bank.detach().index_select(0, idx).to(acc), None))
        if given_mass:
            grad_c -= mass[b].to(acc)[:, None] * G
        for X, row0 in parts:
            if X.shape[0] == 0:
                continue
            d = torch.addmm(c_sq, X, c.t(), alpha=-2.0) + (X * X).sum(1, keepdim=True)
            if hard:
                a = F.one_hot(d.argmin(dim=1), K).to(acc)
            else:
                a = torch.softmax(-s * d, dim=1)
            if not given_mass:
                grad_c -= a.sum(0)[:, None] * G
            gx = a @ G
            if not hard:
                g = X @ G.t() - (G * c).sum(1)                      # g_ik = <G_k, x_i - c_k>
                g = g - g.gather(1, a.argmax(1, keepdim=True))      # minus g_im (see the docstring)
                u = a * (g - (a * g).sum(1, keepdim=True))
                us = u * s
                gx -= 2.0 * (us.sum(1, keepdim=True) * X - us @ c)
                grad_c += 2.0 * (us.t() @ X - us.sum(0)[:, None] * c)
                grad_s -= (u * d).sum(0)
            if row0 is not None:
                grad_x[row0:row0 + X.shape[0]] = gx
    scale_dtype = scale.dtype if scale is not None else codewords.dtype
    return grad_x.to(x.dtype), grad_c.to(codewords.dtype), grad_s.to(scale_dtype)
