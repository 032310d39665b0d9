"""Triton contrastive_loss: one pass over logit tiles for both log-sum-exps, recomputing backward, O(B*P + B) memory.

    u_i = a_i / max(||a_i||, 1e-12) if normalize else a_i   (same v for b);   l_ij = s <u_i, v_j> = s inv_a_i inv_b_j <a_i, b_j>
    r_i = LSE_j l_ij - mean_{j in P_i} l_ij      c_j = LSE_i l_ij - mean_{i in P_j} l_ij      loss = (r + c) / 2

Forward, one kernel call: program I owns a block of rows and walks every column block J once, computing the tile
l_IJ with tl.dot (float32 accumulation, looping over P). The row LSE is an online max/sum in registers. The column
LSE needs the other direction of the same tile: each tile reduces its columns to (m_t, sum_i exp(l_ij - m_t)) and
adds sum * exp(m_t - ref_j) into a float64 per-column accumulator with one atomic add per column per tile, where
ref_j = |s| max_i ||u_i|| ||v_j|| >= l_ij (Cauchy-Schwarz) is a column bound known before the pass; col_lse =
ref_j + log(acc_j). The rescale is float64 so that columns whose logits sit up to ~640 below their bound still
count exactly (with normalize and |s| <= 300 no column can fall that far); only B floats per direction reach
memory, never a B x B tensor or per-tile partials. Without normalize, inputs with large norms can put a whole column
further below its bound, where its float64 sum underflows: a second kernel (_cl_finish_kernel) recomputes the
log-sum-exp of exactly those columns with an online max over every row, and its programs whose columns are all
fine read no row (the usual case: a launch and a few reads per index). Positives (labels_i == labels_j,
or i == j without labels) are summed per row in registers and per column with a float32 atomic add in the same pass;
|P_i| comes from a sort of the labels.
Both log-sum-exps leave the diagonal out, and the pass keeps each row's diagonal logit l_ii: _cl_finish_kernel
forms R_i = logaddexp(O_i, l_ii) and, for a row whose only positive is its diagonal, r_i = log(1 + exp(O_i - l_ii))
(contrastive_loss_finish's arithmetic, in one launch instead of ~12 torch ops), which keeps its relative precision as
r_i -> 0 where R_i - l_ii keeps ulp(R_i).

Backward, with W_ij = dL/dl_ij = g_i/2 (exp(l_ij - R_i) - M_ij/n_i) + g_j/2 (exp(l_ij - C_j) - M_ij/n_j):
grad u_i = s sum_j W_ij v_j, grad v_j = s sum_i W_ij u_i, grad s = sum_ij W_ij <u_i, v_j>; on the diagonal of a
row whose only positive it is, exp(l_ii - R_i) - 1 is expm1(-r_i) from the forward (no cancellation). W is
symmetric under swapping (a, R) with (b, C), so one kernel computes grad u with rows of a, and the same kernel
with the roles swapped computes grad v: two calls that each recompute the tiles (instead of B x P float32 atomics
per tile). Every launch computes a logit alike, a on the left of the dot and the same BLOCK_P (BLOCK_P_BY_MODE),
so that the backward's logits are the forward's to the bit.
Each program owns a row block and a BLOCK_PO-wide tile of P for its register accumulator.
Around them, two row kernels keep the host to a few allocations: _cl_norms_kernel computes the norms, their
inverses and the column bound's max_i ||u_i|| once per call (the forward, the finish kernel and the backward read the
same bits), and _cl_normalize_bwd_kernel takes grad u to grad a = (grad u - u <u, grad u>) / ||a|| in a's dtype,
in place where a is in the loss dtype (no B x P temporary besides grad u).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dre_kernels._gpu_host import num_positives
from dre_kernels.contrastive_loss import NORMALIZE_EPS
from dre_kernels._library import loss_dtype
from dre_kernels.triton_kernels._common import (F64_DOT, INTERPRET, TRITON_VERSION, LazyAutotune, dot_mode, launch,
                                               launch_arg, mm_fr, next_pow2)


@triton.jit
def _mm_rr(p, q, acc, MODE: tl.constexpr):
    if MODE == 1:
        acc = tl.dot(p, q, acc)
    elif MODE == 2:
        acc = tl.dot(p.to(tl.float64), q.to(tl.float64), acc, out_dtype=tl.float64)  # triton < 3.7 wants it said
    else:
        acc = tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision="tf32x3")
    return acc


@triton.jit
def _tile_dot(x_ptr, s_xr, s_xc, y_ptr, s_yr, s_yc, i, imask, j, jmask, P,
              MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """<x_i, y_j> for a BLOCK_I x BLOCK_J tile, float32 (float64 for MODE 2)."""
    dot = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64 if MODE == 2 else tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        pm = p < P
        xt = tl.load(x_ptr + i[:, None] * s_xr + p[None, :] * s_xc, mask=imask[:, None] & pm[None, :], other=0.0)
        yt = tl.load(y_ptr + j[None, :] * s_yr + p[:, None] * s_yc, mask=jmask[None, :] & pm[:, None], other=0.0)
        dot = _mm_rr(xt, yt, dot, MODE)
    return dot


@triton.jit
def _logits_tile(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, s, inva, i, imask, invb, j, jmask, P,
                 MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """(l_ij = s <a_i, b_j> inva_i invb_j, the mask i, j < B) for a tile: the forward and the finish kernel compute
    every logit alike, and the backward too (_logit)."""
    dot = _tile_dot(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, i, imask, j, jmask, P, MODE, BLOCK_I, BLOCK_J, BLOCK_P)
    return _logit(s, dot, inva, invb)[0], imask[:, None] & jmask[None, :]


@triton.jit
def _logit(s, dot, inv_i, inv_j):
    """(l, uv) with uv = dot (inv_i inv_j), l = s uv: symmetric in the two sides, so the backward of either side
    recomputes the forward's logits bit for bit where its dot is the same. The kernels run without FP fusion: a
    fused s * uv - m would leave the product's rounding error in e^{l - m} where l is the max m itself, and with
    it a gradient of s x ulp(l) in a saturated loss whose exact gradient is 0."""
    uv = dot * (inv_i[:, None] * inv_j[None, :])
    return s * uv, uv


@triton.jit
def _online_lse(m, l, lt, AXIS: tl.constexpr):
    """(max, sum of exp(. - max)) along AXIS after folding the tile lt into the running (m, l); -inf-safe."""
    m_new = tl.maximum(m, tl.max(lt, axis=AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = m_safe[:, None] if AXIS == 1 else m_safe[None, :]
    return m_new, l * tl.exp(m - m_safe) + tl.sum(tl.exp(lt - shift), axis=AXIS)


@triton.jit
def _positives(lab_ptr, li, i, j, jmask, valid, HAS_LABELS: tl.constexpr):
    if HAS_LABELS:
        lj = tl.load(lab_ptr + j, mask=jmask, other=0)
        pos = (li[:, None] == lj[None, :]) & valid
    else:
        pos = (i[:, None] == j[None, :]) & valid
    return pos


# _cl_norms_kernel's buffer, (4 B + 1) in the loss dtype: the rows' inverse norms 1 / max(||a_i||, eps) (1 without
# normalize), then b's, the norms of a and of b, and max_i ||u_i|| = max_i ||a_i|| inv_a_i (for the column bound)
_INV_A, _INV_B, _NORM_A, _NORM_B, _U_MAX = (tl.constexpr(k) for k in range(5))
NORMS_ROWS = 4


def _row_meta(P):
    """The row kernels' tiles: 32 rows x up to 128 columns over 8 warps (16 values a thread: no spills on sm_90)."""
    return {"BLOCK_I": 32, "BLOCK_P": min(128, max(16, next_pow2(P))), "num_warps": 8}


@triton.jit
def _cl_norms_kernel(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, norms_ptr, B, P, EPS: tl.constexpr,
                     NORMALIZE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr):
    """||a_i||, ||b_i|| (accumulated in the buffer's dtype), their inverses clamped at eps, and max_i ||u_i|| by an
    atomic max into a zeroed slot: what the forward, the finish kernel and the backward read, the same bits in
    each."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < B
    ACC = norms_ptr.dtype.element_ty
    sa = tl.zeros((BLOCK_I,), dtype=ACC)
    sb = tl.zeros((BLOCK_I,), dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        m = imask[:, None] & (p < P)[None, :]
        at = tl.load(a_ptr + i[:, None] * s_ar + p[None, :] * s_ac, mask=m, other=0.0).to(ACC)
        bt = tl.load(b_ptr + i[:, None] * s_br + p[None, :] * s_bc, mask=m, other=0.0).to(ACC)
        sa += tl.sum(at * at, axis=1)
        sb += tl.sum(bt * bt, axis=1)
    na = tl.sqrt(sa)
    nb = tl.sqrt(sb)
    if NORMALIZE:
        inva = 1.0 / tl.maximum(na, EPS)
        invb = 1.0 / tl.maximum(nb, EPS)
    else:
        inva = tl.full((BLOCK_I,), 1.0, dtype=ACC)
        invb = inva
    tl.store(norms_ptr + _INV_A * B + i, inva, mask=imask)
    tl.store(norms_ptr + _INV_B * B + i, invb, mask=imask)
    tl.store(norms_ptr + _NORM_A * B + i, na, mask=imask)
    tl.store(norms_ptr + _NORM_B * B + i, nb, mask=imask)
    tl.atomic_max(norms_ptr + _U_MAX * B, tl.max(tl.where(imask, na * inva, 0.0), axis=0), sem="relaxed")


@triton.jit
def _bound_scale(norms_ptr, s, B):
    """|s| max_i ||u_i||: the column bound ref_j = |s| max_i ||u_i|| ||v_j|| >= l_ij (Cauchy-Schwarz) over ||v_j||."""
    return tl.abs(s) * tl.load(norms_ptr + _U_MAX * B)


@triton.jit
def _column_bound(norms_ptr, bound_scale, invb, j, jmask, B):
    return bound_scale * (tl.load(norms_ptr + _NORM_B * B + j, mask=jmask, other=0.0) * invb)


@triton.jit
def _cl_normalize_bwd_kernel(gu_ptr, t_ptr, s_tr, s_tc, norms_ptr, out_ptr, B, P, SIDE: tl.constexpr,
                             EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr):
    """grad t from grad u through u = t / max(||t||, eps), in t's dtype (out_ptr may be gu_ptr: each row is read
    whole before it is written): (gu - u <u, gu>) / ||t|| above eps, gu / eps at or below it. SIDE: 0 a, 1 b."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < B
    inv = tl.load(norms_ptr + (_INV_A + SIDE) * B + i, mask=imask, other=0.0)
    norm = tl.load(norms_ptr + (_NORM_A + SIDE) * B + i, mask=imask, other=0.0)
    dots = tl.zeros((BLOCK_I,), dtype=inv.dtype)
    for p0 in range(0, P, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        m = imask[:, None] & (p < P)[None, :]
        u = tl.load(t_ptr + i[:, None] * s_tr + p[None, :] * s_tc, mask=m, other=0.0).to(inv.dtype) * inv[:, None]
        dots += tl.sum(u * tl.load(gu_ptr + i[:, None] * P + p[None, :], mask=m, other=0.0), axis=1)
    dots = tl.where(norm <= EPS, 0.0, dots)
    for p0 in range(0, P, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        m = imask[:, None] & (p < P)[None, :]
        u = tl.load(t_ptr + i[:, None] * s_tr + p[None, :] * s_tc, mask=m, other=0.0).to(inv.dtype) * inv[:, None]
        gu = tl.load(gu_ptr + i[:, None] * P + p[None, :], mask=m, other=0.0)
        tl.store(out_ptr + i[:, None] * P + p[None, :], ((gu - u * dots[:, None]) * inv[:, None]).to(
            out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cl_fwd_kernel(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, norms_ptr, lab_ptr, scale_ptr,
                   rlse_ptr, rdiag_ptr, rpos_ptr, csum_ptr, cpos_ptr, B, P,
                   HAS_LABELS: tl.constexpr, MODE: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """norms_ptr: _cl_norms_kernel's buffer (inverse norms, norms, max_i ||u_i||)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < B
    ACC = tl.float64 if MODE == 2 else tl.float32
    s = tl.load(scale_ptr).to(ACC)
    bound = _bound_scale(norms_ptr, s, B)
    inva = tl.load(norms_ptr + _INV_A * B + i, mask=imask, other=0.0)
    li = tl.load(lab_ptr + i, mask=imask, other=0) if HAS_LABELS else i
    m_i = tl.full((BLOCK_I,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_I,), dtype=ACC)
    pos_i = tl.zeros((BLOCK_I,), dtype=ACC)
    d_i = tl.zeros((BLOCK_I,), dtype=ACC)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        jmask = j < B
        invb = tl.load(norms_ptr + _INV_B * B + j, mask=jmask, other=0.0)
        logits, valid = _logits_tile(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, s, inva, i, imask, invb, j, jmask, P,
                                     MODE, BLOCK_I, BLOCK_J, BLOCK_P)
        d_i += tl.sum(tl.where(valid & (i[:, None] == j[None, :]), logits, 0.0), axis=1)
        # the log-sum-exps leave the diagonal out (_cl_finish_kernel adds it back); no `~` on a
        # boolean tile: triton 3.2's interpreter cannot invert int1
        lt = tl.where(valid & (i[:, None] != j[None, :]), logits, float("-inf"))
        # rows: online log-sum-exp (rows past B, and a row with no off-diagonal logit, stay at -inf)
        m_i, l_i = _online_lse(m_i, l_i, lt, 1)
        # positives, both directions
        pos = _positives(lab_ptr, li, i, j, jmask, valid, HAS_LABELS)
        pl = tl.where(pos, logits, 0.0)
        pos_i += tl.sum(pl, axis=1)
        tl.atomic_add(cpos_ptr + j, tl.sum(pl, axis=0), mask=jmask, sem="relaxed")
        # columns: this tile's share, rescaled to the column bound in float64
        cm = tl.max(lt, axis=0)
        cm = tl.where(cm == float("-inf"), 0.0, cm)  # a column with no logit here (past B, or only its diagonal)
        cs = tl.sum(tl.exp(lt - cm[None, :]), axis=0)
        ref = _column_bound(norms_ptr, bound, invb, j, jmask, B)
        contrib = cs.to(tl.float64) * tl.exp((cm - ref).to(tl.float64))
        tl.atomic_add(csum_ptr + j, contrib, mask=jmask, sem="relaxed")
    tl.store(rlse_ptr + i, m_i + tl.log(tl.where(imask, l_i, 1.0)), mask=imask)
    tl.store(rdiag_ptr + i, d_i, mask=imask)
    tl.store(rpos_ptr + i, pos_i, mask=imask)


# A column whose bound-referenced sum fell below this lies more than ~640 below its bound: recomputed exactly.
COLUMN_SUM_TINY = 1e-280


@triton.jit
def _log1p_small(x):
    """log(1 + x) for x in [0, 1] (or NaN) to a few ulp, also where 1 + x rounds to 1 (Goldberg: log(u) x / (u - 1),
    u = 1 + x rounded); in plain tl ops, as libdevice's log1p is not in every triton's interpreter."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _logaddexp(x, y):
    """log(exp x + exp y) as torch.logaddexp computes it: x + log 2 where x == y (infinities included), NaN in, NaN
    out."""
    hi = tl.where(x > y, x, y)
    lo = tl.where(x > y, y, x)
    return tl.where(lo == hi, hi + 0.6931471805599453, hi + _log1p_small(tl.exp(lo - hi)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 to a few ulp, also where exp(x) rounds near 1 (Kahan: (u - 1) x / log(u), u = exp(x) rounded); in
    plain tl ops, as _log1p_small."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def _cl_finish_kernel(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, norms_ptr, scale_ptr, csum_ptr,
                      rlse_ptr, rdiag_ptr, rpos_ptr, cpos_ptr, npos_ptr, clse_ptr, B, P,
                      TINY: tl.constexpr, HAS_LABELS: tl.constexpr, MODE: tl.constexpr,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    """After _cl_fwd_kernel, for a block of indices j: the off-diagonal column log-sum-exp O'_j (ref_j + log(csum_j)
    from the pass, or exactly, with an online max over every row, where the float64 sum at the bound underflowed; a
    block with no such column reads no row), then contrastive_loss_finish's arithmetic for row j and column j, in
    place: rlse (O_j) becomes row_lse, rpos (the positive sum) r, cpos c, rdiag (l_jj) the loss (r + c) / 2, and
    clse col_lse."""
    j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = j < B
    csum = tl.load(csum_ptr + j, mask=jmask, other=1.0)
    need = jmask & (csum < TINY)
    rows = tl.where(tl.sum(need.to(tl.int32), axis=0) > 0, B, 0)
    ACC = tl.float64 if MODE == 2 else tl.float32
    s = tl.load(scale_ptr).to(ACC)
    invb = tl.load(norms_ptr + _INV_B * B + j, mask=jmask, other=0.0)
    ref = _column_bound(norms_ptr, _bound_scale(norms_ptr, s, B), invb, j, jmask, B)
    off_col = (ref.to(tl.float64) + tl.log(tl.where(need, 1.0, csum))).to(ACC)
    m_j = tl.full((BLOCK_J,), float("-inf"), dtype=ACC)
    l_j = tl.zeros((BLOCK_J,), dtype=ACC)
    for i0 in range(0, rows, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        imask = i < B
        inva = tl.load(norms_ptr + _INV_A * B + i, mask=imask, other=0.0)
        logits, valid = _logits_tile(a_ptr, s_ar, s_ac, b_ptr, s_br, s_bc, s, inva, i, imask, invb, j, jmask, P,
                                     MODE, BLOCK_I, BLOCK_J, BLOCK_P)
        lt = tl.where(valid & (i[:, None] != j[None, :]), logits, float("-inf"))
        m_j, l_j = _online_lse(m_j, l_j, lt, 0)
    off_col = tl.where(need, m_j + tl.log(tl.where(need, l_j, 1.0)), off_col)
    # contrastive_loss_finish (its docstring has the why of r's first form)
    off_row = tl.load(rlse_ptr + j, mask=jmask, other=0.0)
    diag = tl.load(rdiag_ptr + j, mask=jmask, other=0.0)
    n_pos = tl.load(npos_ptr + j, mask=jmask, other=1.0) if HAS_LABELS else tl.full((BLOCK_J,), 1.0, ACC)
    row_lse = _logaddexp(off_row, diag)
    col_lse = _logaddexp(off_col, diag)
    single = n_pos == 1.0
    zero = tl.zeros((BLOCK_J,), dtype=ACC)
    pos_row = tl.load(rpos_ptr + j, mask=jmask, other=0.0)
    pos_col = tl.load(cpos_ptr + j, mask=jmask, other=0.0)
    r = tl.where(single, _logaddexp(off_row - diag, zero), row_lse - pos_row / n_pos)
    c = tl.where(single, _logaddexp(off_col - diag, zero), col_lse - pos_col / n_pos)
    tl.store(rlse_ptr + j, row_lse, mask=jmask)
    tl.store(clse_ptr + j, col_lse, mask=jmask)
    tl.store(rpos_ptr + j, r, mask=jmask)
    tl.store(cpos_ptr + j, c, mask=jmask)
    tl.store(rdiag_ptr + j, (r + c) * 0.5, mask=jmask)


@triton.jit
def _cl_bwd_kernel(x_ptr, s_xr, s_xc, y_ptr, s_yr, s_yc, norms_ptr, lab_ptr, scale_ptr,
                   lx_ptr, ly_ptr, rx_ptr, ry_ptr, g_ptr, npos_ptr, gu_ptr, gs_ptr, B, P,
                   HAS_LABELS: tl.constexpr, X_IS_B: tl.constexpr, MODE: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PO: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n_pt = tl.cdiv(P, BLOCK_PO)
    pid_i = pid // n_pt
    pid_p = pid % n_pt
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < B
    ACC = tl.float64 if MODE == 2 else tl.float32
    s = tl.load(scale_ptr).to(ACC)
    # the inverse norms of x's side, then y's: a's at _INV_A, b's at _INV_B
    invx_ptr = norms_ptr + (_INV_A + X_IS_B) * B
    invy_ptr = norms_ptr + (_INV_B - X_IS_B) * B
    invx = tl.load(invx_ptr + i, mask=imask, other=0.0)
    lx = tl.load(lx_ptr + i, mask=imask, other=0.0)
    # p_ii - 1 = expm1(-r_i) on the diagonal of a row whose only positive it is (no cancellation); the y side's
    # expm1(-c_j) is needed on that diagonal only (j = i), so it is taken at i once, not per column tile
    ex = _expm1(-tl.load(rx_ptr + i, mask=imask, other=0.0))
    ey = _expm1(-tl.load(ry_ptr + i, mask=imask, other=0.0))
    hg_i = 0.5 * tl.load(g_ptr + i, mask=imask, other=0.0)
    n_i = tl.load(npos_ptr + i, mask=imask, other=1.0) if HAS_LABELS else tl.full((BLOCK_I,), 1.0, ACC)
    li = tl.load(lab_ptr + i, mask=imask, other=0) if HAS_LABELS else i
    po = (pid_p * BLOCK_PO + tl.arange(0, BLOCK_PO)).to(tl.int64)
    pomask = po < P
    acc = tl.zeros((BLOCK_I, BLOCK_PO), dtype=ACC)
    gs = tl.zeros((BLOCK_I,), dtype=ACC)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        jmask = j < B
        if X_IS_B:
            # <a_j, b_i> with a on the left as in the forward, then transposed: a tensor-core dot is not symmetric
            # in its operands to the bit (tf32x3 adds a_lo b_hi before a_hi b_lo), and the saturated loss needs
            # these logits to be the forward's exactly
            dot = tl.trans(_tile_dot(y_ptr, s_yr, s_yc, x_ptr, s_xr, s_xc, j, jmask, i, imask, P, MODE,
                                     BLOCK_J, BLOCK_I, BLOCK_P))
        else:
            dot = _tile_dot(x_ptr, s_xr, s_xc, y_ptr, s_yr, s_yc, i, imask, j, jmask, P, MODE, BLOCK_I, BLOCK_J,
                            BLOCK_P)
        invy = tl.load(invy_ptr + j, mask=jmask, other=0.0)
        ly = tl.load(ly_ptr + j, mask=jmask, other=0.0)
        hg_j = 0.5 * tl.load(g_ptr + j, mask=jmask, other=0.0)
        n_j = tl.load(npos_ptr + j, mask=jmask, other=1.0) if HAS_LABELS else tl.full((BLOCK_J,), 1.0, ACC)
        logits, uv = _logit(s, dot, invx, invy)
        valid = imask[:, None] & jmask[None, :]
        posf = tl.where(_positives(lab_ptr, li, i, j, jmask, valid, HAS_LABELS), 1.0, 0.0)
        own = (i[:, None] == j[None, :]) & (n_i[:, None] == 1.0)
        w = (hg_i[:, None] * tl.where(own, ex[:, None], tl.exp(logits - lx[:, None]) - posf / n_i[:, None])
             + hg_j[None, :] * tl.where(own, ey[:, None], tl.exp(logits - ly[None, :]) - posf / n_j[None, :]))
        w = tl.where(valid, w, 0.0)
        yt = tl.load(y_ptr + j[:, None] * s_yr + po[None, :] * s_yc, mask=jmask[:, None] & pomask[None, :],
                     other=0.0)
        if MODE == 2:
            acc = tl.dot(w * invy[None, :], yt.to(tl.float64), acc, out_dtype=tl.float64)
        elif MODE == 1 and yt.dtype == tl.float16:
            # W scales with the upstream gradient (g_i = 1/B under a mean: W ~ p_ij / B, 1e-10 at B = 65536) and
            # float16's parts end at 6e-8, so split into them it would flush to zero: tf32x3 (float32's range)
            acc = tl.dot(w * invy[None, :], yt.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = mm_fr(w * invy[None, :], yt, acc, MODE, False)
        if not X_IS_B:  # grad s once, in the a-side call
            gs += tl.sum(w * uv, axis=1)
    tl.store(gu_ptr + i[:, None] * P + po[None, :], s * acc, mask=imask[:, None] & pomask[None, :])
    if not X_IS_B:
        if pid_p == 0:
            tl.store(gs_ptr + pid_i, tl.sum(gs, axis=0))


# ---------------------------------------------------------------------------------------------- autotuning
# The forward, the finish kernel and both backward calls must compute each logit to the same bits (a saturated loss has
# its exact gradient 0 only where exp(l_ij - R_i) is exactly 1 at the max), so they share one BLOCK_P per dot mode: a
# tf32x3 tl.dot is three MMA chains per BLOCK_P slice of P (a_lo b_hi, a_hi b_lo, a_hi b_hi), and where the slices end
# changes the rounding. (16-bit MMAs chain through the accumulator whatever the slice; pinned too, one rule.)
BLOCK_P_BY_MODE = {0: 16, 1: 32, 2: 16}
# Configs, by mode, that ptxas compiles without register spills on sm_90 and sm_80 at P=512 (tests/triton_aot.py
# survey, triton 3.9; float32 for mode 0, bfloat16 and float16 for mode 1; but for 8 bytes of stack in the a-side
# backward at (32, 32, 32, 64) on sm_90). float64 (raw-op use only) spills in all of them.
_FWD_CONFIGS = [(64, 64, 16, 8, 2), (128, 64, 16, 8, 2), (64, 128, 16, 8, 2),
                (64, 64, 32, 8, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2), (64, 32, 32, 4, 2)]
# BLOCK_I >= 32 throughout: the grad-scale partials buffer holds cdiv(B, 32) row blocks
_BWD_CONFIGS = [(64, 32, 16, 64, 8, 2), (64, 32, 16, 128, 8, 2), (32, 32, 16, 64, 4, 2),
                (64, 32, 32, 128, 8, 2), (64, 64, 32, 64, 8, 2), (32, 32, 32, 64, 4, 2)]
# Wide output tiles: a program recomputes its logit tiles once per BLOCK_PO slice of P, so BLOCK_PO = P (512, 16-bit
# rows) computes each logit once per side where BLOCK_PO = 64 computed it 8 times (the H100's backward took 64 ms at
# B=16384 where the forward took a fraction of that). Spill-free on sm_90 and sm_80 at P=512 (triton 3.9: 16-bit
# 180-253 registers; float32 at 256 wide, 240-255; float32 at 512 spills 0.3-1.3 KB). Not surveyed with
# triton < 3.3, whose compiler aborts on some backward configs (below): there they are left out.
# float16 rows multiply W in float32 (tf32x3, see _cl_bwd_kernel), which spills at 512 wide as float32 does: they take
# the 256-wide 16-bit config (_keep_mode_block_p drops the 512-wide ones for them).
# A one-warpgroup forward for float32 rows (mode 0): tf32x3 is three chained MMAs, and on sm_90 Triton gives a dot
# that feeds another dot all warps along M, so with 8 warps every float32 logit tile is computed twice, once per
# warpgroup, and its accumulator changes layout in the loop (tests/triton_aot.py -v: DOT_REP=2, MMA_CVT=1); with 4
# warps and 64-row blocks, neither. ptxas (triton 3.9 and 3.6, P = 512 and 33, sm_90 and sm_80): 222-255 registers,
# no spills. (The backward's 4-warp, 64-row configs spill 8-96 B in some specialisations: not taken.)
if TRITON_VERSION >= (3, 3):
    _BWD_CONFIGS += [(32, 32, 32, 512, 8, 2), (32, 64, 32, 512, 8, 2), (32, 32, 16, 256, 8, 2),
                     (32, 32, 32, 256, 8, 2)]
    _FWD_CONFIGS += [(64, 64, 16, 4, 2)]


# Backward configs whose compile aborts the process in triton < 3.3 (an assertion in LinearLayout::reshapeOuts, 16-bit
# rows, the a-side call, sm_90; tests/triton_aot.py with triton 3.2): an autotuner that tried one would kill its
# process, so there they are never tried.
_BWD_ABORTS_BEFORE_TRITON_3_3 = {(64, 32, 32, 128, 8, 2), (64, 64, 32, 64, 8, 2)}


def _config_tuple(c):
    return tuple(c.kwargs[k] for k in ("BLOCK_I", "BLOCK_J", "BLOCK_P", "BLOCK_PO") if k in c.kwargs) + (
        c.num_warps, c.num_stages)


def _keep_mode_block_p(configs, named_args, **kwargs):
    """The configs whose BLOCK_P is the launch's mode's (BLOCK_P_BY_MODE), less those that abort the compiler and
    those whose output tile is wider than P needs (BLOCK_PO > max(128, P rounded up to a power of two)) or, for
    float16 rows, wider than 256."""
    bp = BLOCK_P_BY_MODE[launch_arg(named_args, kwargs, "MODE")]
    widest = max(128, next_pow2(launch_arg(named_args, kwargs, "P", 128)))
    if getattr(launch_arg(named_args, kwargs, "y_ptr"), "dtype", None) == torch.float16:
        widest = min(widest, 256)
    aborts = _BWD_ABORTS_BEFORE_TRITON_3_3 if TRITON_VERSION < (3, 3) else set()
    return [c for c in configs if c.kwargs["BLOCK_P"] == bp and _config_tuple(c) not in aborts
            and c.kwargs.get("BLOCK_PO", 0) <= widest]


_PRUNE = {"early_config_prune": _keep_mode_block_p}
_fwd_tuned = LazyAutotune(
    _cl_fwd_kernel,
    [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_P": bp}, num_warps=w, num_stages=st)
     for bi, bj, bp, w, st in _FWD_CONFIGS], key=["P", "HAS_LABELS", "MODE"], prune_configs_by=_PRUNE,
    restore_value=["csum_ptr", "cpos_ptr"])
# gs: one slot per row block of the config's BLOCK_I; a benchmark run of a narrower config must not leave its slots
# behind for the sum (the first call of each shape had a wrong grad scale on GPU)
_bwd_tuned = LazyAutotune(
    _cl_bwd_kernel,
    [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_P": bp, "BLOCK_PO": bpo}, num_warps=w, num_stages=st)
     for bi, bj, bp, bpo, w, st in _BWD_CONFIGS],
    key=["P", "HAS_LABELS", "MODE", "X_IS_B"], prune_configs_by=_PRUNE, restore_value=["gs_ptr"])


def _interp_meta(P, backward=False):
    # only the kernel's own constexprs: triton < 3.3 rejects a launch with any other keyword
    bp = min(128, max(16, next_pow2(P)))
    return {"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_P": bp, **({"BLOCK_PO": bp} if backward else {})}


# ---------------------------------------------------------------------------------------------- launchers
def _mode(a, b) -> int:
    """0: float32 dots (tf32x3 on GPU); 1: both in one 16-bit dtype, exact products; 2: float64 (raw-op use)."""
    if torch.float64 in (a.dtype, b.dtype):
        if not F64_DOT:
            # a broadcast product in its place compiles to megabytes of PTX that ptxas takes minutes over
            raise TypeError(f"the triton backend's contrastive kernels take float64 (raw ops) from triton 3.3 on, "
                            f"whose tl.dot takes float64; this is triton {triton.__version__}")
        return 2
    return dot_mode(a.dtype) if a.dtype == b.dtype else 0


def _norms(a, b, normalize, acc):
    """_cl_norms_kernel's buffer (see _INV_A), one launch."""
    B, P = a.shape
    norms = torch.zeros(NORMS_ROWS * B + 1, dtype=acc, device=a.device)
    meta = _row_meta(P)
    _cl_norms_kernel[(triton.cdiv(B, meta["BLOCK_I"]),)](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), norms, B, P, NORMALIZE_EPS, normalize, **meta)
    return norms


def _labels_and_counts(labels, acc, unused):
    """(has labels, the labels contiguous, |P_i| in acc); without labels the kernels read neither (HAS_LABELS), and
    both pointers are `unused`, any tensor of the call."""
    if labels is None:
        return False, unused, unused
    return True, labels.contiguous(), num_positives(labels, acc)


def contrastive_loss_fwd(a, b, logit_scale, labels, normalize):
    B, P = a.shape
    dev = a.device
    acc = loss_dtype(a, b)
    # the forward's per-row sums, which _cl_finish_kernel turns into the outputs in place (see there)
    rlse, rdiag, rpos = (torch.empty(B, dtype=acc, device=dev) for _ in range(3))
    csum = torch.zeros(B, dtype=torch.float64, device=dev)
    cpos = torch.zeros(B, dtype=acc, device=dev)
    clse = torch.empty(B, dtype=acc, device=dev)
    if B == 0:
        return rdiag, rlse, clse, rpos, cpos
    norms = _norms(a, b, normalize, acc)
    has_labels, lab, npos = _labels_and_counts(labels, acc, norms)
    mode = _mode(a, b)
    args = (a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), norms, lab, logit_scale,
            rlse, rdiag, rpos, csum, cpos, B, P, has_labels, mode)
    launch(_cl_fwd_kernel, _fwd_tuned, lambda meta: (triton.cdiv(B, meta["BLOCK_I"]),), args, _interp_meta(P),
           enable_fp_fusion=False)
    meta = _interp_meta(P) if INTERPRET else {"BLOCK_I": 64, "BLOCK_J": 64, "BLOCK_P": BLOCK_P_BY_MODE[mode],
                                              "num_warps": 8}
    _cl_finish_kernel[(triton.cdiv(B, meta["BLOCK_J"]),)](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), norms, logit_scale, csum,
        rlse, rdiag, rpos, cpos, npos, clse, B, P, COLUMN_SUM_TINY, has_labels, mode, **meta, enable_fp_fusion=False)
    # (loss, row_lse, col_lse, r, c)
    return rdiag, rlse, clse, rpos, cpos


def _normalize_backward(gu, t, norms, side, normalize):
    """grad t (t's dtype) from grad u: _cl_normalize_bwd_kernel, in place over gu where t is in gu's dtype."""
    B, P = t.shape
    if not normalize:
        return gu.to(t.dtype)
    out = gu if t.dtype == gu.dtype else torch.empty((B, P), dtype=t.dtype, device=t.device)
    if B:
        meta = _row_meta(P)
        _cl_normalize_bwd_kernel[(triton.cdiv(B, meta["BLOCK_I"]),)](
            gu, t, t.stride(0), t.stride(1), norms, out, B, P, side, NORMALIZE_EPS, **meta)
    return out


def contrastive_loss_bwd(grad_loss, a, b, logit_scale, labels, normalize, row_lse, col_lse, row_loss, col_loss):
    B, P = a.shape
    dev = a.device
    acc = loss_dtype(a, b)
    norms = _norms(a, b, normalize, acc) if B else torch.zeros(1, dtype=acc, device=dev)
    g = grad_loss.to(acc).contiguous()
    has_labels, lab, npos = _labels_and_counts(labels, acc, norms)
    gu = torch.empty((B, P), dtype=acc, device=dev)
    gv = torch.empty((B, P), dtype=acc, device=dev)
    meta = _interp_meta(P, backward=True)
    # one float per row block, summed here: deterministic, and sized for the smallest BLOCK_I of any config
    gs = torch.zeros(triton.cdiv(B, 32) if B else 1, dtype=acc, device=dev)
    rl, cl, rr, cr = (t.to(acc).contiguous() for t in (row_lse, col_lse, row_loss, col_loss))
    mode = _mode(a, b)
    if B:
        for x, y, lx, ly, rx, ry, out, x_is_b in ((a, b, rl, cl, rr, cr, gu, False),
                                                  (b, a, cl, rl, cr, rr, gv, True)):
            args = (x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), norms, lab, logit_scale, lx, ly, rx,
                    ry, g, npos, out, gs, B, P, has_labels, x_is_b, mode)
            launch(_cl_bwd_kernel, _bwd_tuned,
                   lambda m: (triton.cdiv(B, m["BLOCK_I"]) * triton.cdiv(P, m["BLOCK_PO"]),), args, meta,
                   enable_fp_fusion=False)
    grad_a = _normalize_backward(gu, a, norms, 0, normalize)
    grad_b = _normalize_backward(gv, b, norms, 1, normalize)
    return grad_a, grad_b, gs.sum().reshape(())
