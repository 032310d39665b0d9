"""Triton residual_encode: forward and backward, soft (Deep TEN) and hard (VLAD) assignment.

    d_ik = ||x_i||^2 - 2 <x_i, c_k> + ||c_k||^2          (tl.dot, float32 accumulation; clamped at 0)
    soft: a_ik = softmax_k(-s_k d_ik)                   hard: a_ik = [k = first argmin_j d_ij]
    E_bk = sum_{i in S_b} a_ik x_i - mass_bk c_k        mass_bk = sum_{i in S_b} a_ik

Work decomposition. Each source of rows (the fresh rows x, then the bank rows gathered through bank_index) is cut
into chunks of CHUNK consecutive rows; a chunk may span several slides. A program owns one chunk and N_DT (1..4)
tiles of BLOCK_DO output columns. It finds the slide of its first row by a binary search of the CSR offsets, then
walks its rows slide segment by slide segment, in blocks of BLOCK_M rows: the full-width distances (a loop over D in
BLOCK_D steps, K padded to a power of two and masked), the softmax or argmin in registers, and a^T x for each of
its column tiles, kept in K x BLOCK_DO register accumulators that are added into E at the end of each segment.
Every program of a chunk recomputes the distances, so fewer, wider programs (N_DT > 1: D=384 as 3 x 128 in one
program) save that work where the accumulators still fit the registers (16-bit rows on sm_90; see the config
tables). Gathered rows, the assignment matrix and the residuals never reach memory. The grid is cdiv(rows, CHUNK)
x groups of N_DT column tiles: it depends on shapes only (no host synchronisation) and the host computes no chunk
map (no small torch ops per launch: at the DRE-SLCL step shape the host, not the GPU, set the pace). Programs of the
same chunk sit next to each other in the launch order, so the rows they all read come from L2.

Flattened loops (FLATTEN). Triton pipelines the innermost loop, here the loop over D slices: a row block starts with
no slice of its rows and codewords in flight and, after its last slice, waits for its assignments and a^T x (the
profile of the H100 run: one program per SM waiting on each slice in turn). FLATTEN twins of the configs
(_as_configs) walk a slide segment as one loop over (row block, D slice) pairs that finishes a row block at its last
slice, so the pipeliner loads the next block's first slices while this one finishes: the forward's launches and the
backward's passes that only sum (the bank rows'). Written out by hand, not as tl.range(..., flatten=True): the
compiler's fusion (triton >= 3.3) leaves the rows' slices as plain loads with triton 3.6 (the GPU image), which
pipelines the hand-written loop (tests/triton_aot.py, sm_90: cp.async for the rows, codewords and G_b with triton 3.6
and 3.9). The autotuner times the twins against the plain loops, as neither has run on a GPU yet; untimed launches
keep the plain loops.

Codewords are prepared once per call by one small kernel (_prep_transposed_kernel): ||c_k||^2 and c^T laid out
(D, K_PAD), zero-padded, split into hi + lo parts of the rows' 16-bit dtype for the tensor cores, interleaved by
row (float32 for float32 rows): the distance loop loads its operand as is, for one dot x c_hi + x c_lo over a K
of 2 BLOCK_D (the rows' columns doubled to meet the parts), where it used to load float32 codewords transposed and
split them for every row block and D slice, and then multiply the parts as two chained dots (see
_common.dot_pair for what chained dots cost on sm_90).

Long slides: split-and-atomics. A 50k-row slide becomes 50k/CHUNK programs whose partial E (and mass) are added
into one float32 (B, K, D) buffer with tl.atomic_add (one K x BLOCK_DO add per program and slide segment, not per
row, so contention is negligible). Chosen over split-and-reduce because a partials buffer would cost
(N/CHUNK + B) * K * D floats (tens of MB at the DRE-SLCL step shape, several times E itself), needs a second
kernel, and the grid stays sync-free; the price is that float32 sums are not bitwise deterministic across runs when
a slide spans programs.

Backward (recomputation, flash-attention style; nothing of the forward is saved). With G = dL/dE,
g_ik = <G_bk, x_i> - <G_bk, c_k>, h_ik = a_ik (g_ik - sum_j a_ij g_ij) (soft only; computed with g_ik - g_im for
g_ik, m = argmax_j a_ij, which cancels nothing where a_im is near 1):
    grad x_i = sum_k a_ik G_bk + 2 sum_k s_k h_ik (c_k - x_i)                        (fresh rows only)
    grad c_k = -sum_b mass_bk G_bk + 2 s_k (sum_i h_ik x_i - c_k sum_i h_ik)
    grad s_k = -sum_i h_ik d_ik
The same programs recompute d and a, add sum_i h_ik x_i (K x BLOCK_DO), sum_i h_ik, sum_i h_ik d_ik and mass
atomically, and write grad x rows directly (each row belongs to one program per column tile). Passes that only sum
(the bank rows', soft) may hold N_DT column tiles of sum_i h_ik x_i per program, as the forward does. For hard
assignment h = 0: grad x_i = G_{b, k(i)} (a gather), grad c_k = -sum_b mass_bk G_bk, so bank rows enter only
through mass: given the forward's mass (`mass=`) there is no pass over bank rows at all; without it (the dre op
schema does not carry it) one argmin-only pass over the bank rows counts them, with no E accumulation.
G is prepared once per call like the codewords (_prep_transposed_kernel): G_b^T (D, K_PAD) split into hi + lo
parts for x G_b^T, and gc_bk = <G_bk, c_k> in the same launch, where each row block used to load G_b transposed in
float32 and split it for every D slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dre_kernels import _checks
from dre_kernels._gpu_host import default_chunk_rows, next_pow2, row_sources
from dre_kernels.triton_kernels._common import (INTERPRET, TRITON_VERSION, LazyAutotune, dot_mode, dot_mode_backward,
                                               dot_pair, launch, launch_arg, mm_fr)


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _prep_transposed_kernel(src_ptr, c_ptr, dst_ptr, dot_ptr, K, D,
                            SPLIT: tl.constexpr, K_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """For each (K, D) matrix q = src[b] (program axis 0, which allows 2^31 - 1 of them): dst[b] = q^T laid out
    (D, K_PAD), zero past K, and dot[b] (K_PAD,) = sum_d q_kd c_kd in float32. SPLIT: dst[b] holds (D, 2, K_PAD), the
    hi and lo parts of the float32 value in dst's 16-bit dtype interleaved by row (row 2d + j: part j of row d), the
    right operand of _dot_t's one dot as it loads it. The codewords (src = c: dot = ||c_k||^2) and
    G = dL/dE (gc_bk = <G_bk, c_k>) take it once per call, so that the loops over D load their tensor-core operand
    as it is."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    src_ptr += b * K * D
    dst_ptr += b * (2 if SPLIT else 1) * D * K_PAD
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        m2 = kmask[:, None] & dmask[None, :]
        q = tl.load(src_ptr + k[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + k[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        sq += tl.sum(q * c, axis=1)
        smask = (k[:, None] < K_PAD) & dmask[None, :]
        if SPLIT:
            dst = dst_ptr + d[None, :] * (2 * K_PAD) + k[:, None]
            hi = q.to(dst_ptr.dtype.element_ty)
            tl.store(dst, hi, mask=smask)
            tl.store(dst + K_PAD, (q - hi.to(tl.float32)).to(dst_ptr.dtype.element_ty), mask=smask)
        else:
            tl.store(dst_ptr + d[None, :] * K_PAD + k[:, None], q.to(dst_ptr.dtype.element_ty), mask=smask)
    tl.store(dot_ptr + b * K_PAD + k, sq, mask=k < K_PAD)


@triton.jit
def _finish_codeword_grads_kernel(g_ptr, mass_ptr, hx_ptr, hsum_ptr, c_ptr, scale_ptr, gc_ptr, B, K, D,
                                  SOFT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad c_k = -sum_b mass_bk G_bk (+ 2 s_k (hx_k - hsum_k c_k) when SOFT), written in grad c's dtype: the
    host math after the backward's passes in one launch."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kmask = k < K
    m2 = kmask[:, None] & (d < D)[None, :]
    kd = k[:, None] * D + d[None, :]
    out = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    gb_ptr = g_ptr
    for b in range(0, B):
        mass = tl.load(mass_ptr + b * K + k, mask=kmask, other=0.0)
        out -= mass[:, None] * tl.load(gb_ptr + kd, mask=m2, other=0.0)
        gb_ptr += K * D  # a pointer step, not b * K * D: that product overflows int32 past 2^31 elements
    if SOFT:
        s = tl.load(scale_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        hsum = tl.load(hsum_ptr + k, mask=kmask, other=0.0)
        c = tl.load(c_ptr + kd, mask=m2, other=0.0).to(tl.float32)
        out += (2.0 * s)[:, None] * (tl.load(hx_ptr + kd, mask=m2, other=0.0) - hsum[:, None] * c)
    tl.store(gc_ptr + kd, out.to(gc_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _dot_t(x, t_ptr, d0, k, acc, D, MODE: tl.constexpr, K_PAD: tl.constexpr):
    """acc + x @ q[d0 : d0 + BLOCK_D] for x (BLOCK_M, BLOCK_D) and a prepared q^T at t_ptr. MODE 1 (x exact in its
    16-bit dtype): x q_hi + x q_lo as one dot (see _common.dot_pair), the interleaved parts (rows 2d + j) loaded as
    the right operand as they are stored, x's columns doubled to meet them; else float32 (tf32x3)."""
    if MODE == 1:
        r = 2 * d0 + tl.arange(0, 2 * x.shape[1])  # rows 2 d0 .. 2 (d0 + BLOCK_D) of (2 D, K_PAD)
        q = tl.load(t_ptr + r[:, None] * K_PAD + k[None, :], mask=(r < 2 * D)[:, None], other=0.0)
        acc = tl.dot(tl.reshape(tl.join(x, x), (x.shape[0], 2 * x.shape[1])), q, acc)
    else:
        d = d0 + tl.arange(0, x.shape[1])
        q = tl.load(t_ptr + d[:, None] * K_PAD + k[None, :], mask=(d < D)[:, None], other=0.0)
        acc = tl.dot(x.to(tl.float32), q, acc, input_precision="tf32x3")
    return acc


@triton.jit
def _distance_slice(rows_ptr, row, rmask, s_c, d0, ct_ptr, k, gt_ptr, dot, dotg, xsq, D,
                    WITH_G: tl.constexpr, HARD: tl.constexpr, MODE: tl.constexpr, K_PAD: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """The terms of columns d0 .. d0 + BLOCK_D of the rows' distances: dot + x c^T, dotg + x G_b^T (WITH_G) and
    xsq + ||x||^2 (soft)."""
    d = d0 + tl.arange(0, BLOCK_D)
    xt = tl.load(rows_ptr + row[:, None] + d[None, :].to(tl.int64) * s_c,
                 mask=rmask[:, None] & (d < D)[None, :], other=0.0)
    if not HARD:
        xf = xt.to(tl.float32)
        xsq += tl.sum(xf * xf, axis=1)
    dot = _dot_t(xt, ct_ptr, d0, k, dot, D, MODE, K_PAD)
    if WITH_G:
        dotg = _dot_t(xt, gt_ptr, d0, k, dotg, D, MODE, K_PAD)
    return dot, dotg, xsq


@triton.jit
def _finish_distances(dot, xsq, csq, HARD: tl.constexpr):
    """d (BLOCK_M, K_PAD) = ||x||^2 - 2 x c^T + ||c||^2 from the slices' sums (HARD: d - ||x||^2, the argmin's key:
    ||x||^2 is the same for every codeword of a row, and adding it before the argmin would round away the low bits
    that set near codewords apart)."""
    if HARD:
        dist = csq[None, :] - 2.0 * dot
    else:
        dist = xsq[:, None] - 2.0 * dot + csq[None, :]
        dist = tl.where(dist < 0.0, 0.0, dist)  # cancellation near x = c_k; clamped as on CPU and CUDA, NaN kept
    return dist


@triton.jit
def _distances(rows_ptr, row, rmask, s_c, ct_ptr, csq, k, gt_ptr, D,
               WITH_G: tl.constexpr, HARD: tl.constexpr, MODE: tl.constexpr, K_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The distances (_finish_distances) of a row block, and x G_b^T when WITH_G, over D in BLOCK_D slices. ct_ptr,
    gt_ptr: the prepared c^T and G_b^T (hi, lo for MODE 1)."""
    dot = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    dotg = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    xsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dot, dotg, xsq = _distance_slice(rows_ptr, row, rmask, s_c, d0, ct_ptr, k, gt_ptr, dot, dotg, xsq, D,
                                         WITH_G, HARD, MODE, K_PAD, BLOCK_D)
    return _finish_distances(dot, xsq, csq, HARD), dotg


@triton.jit
def _assign(dist, k, kmask, rmask, s, HARD: tl.constexpr):
    """Assignments (BLOCK_M, K_PAD) float32, zero on padded rows and codewords; and the argmin (hard)."""
    if HARD:
        dm = tl.where(kmask[None, :], dist, float("inf"))
        amin = tl.argmin(dm, axis=1)
        a = tl.where(k[None, :] == amin[:, None], 1.0, 0.0)
    else:
        logit = tl.where(kmask[None, :], -s[None, :] * dist, float("-inf"))
        m = tl.max(logit, axis=1)
        p = tl.exp(logit - m[:, None])
        a = p / tl.sum(p, axis=1)[:, None]
        amin = tl.zeros_like(m).to(tl.int32)
    a = tl.where(rmask[:, None], a, 0.0)
    return a, amin


@triton.jit
def _slide_of(off_ptr, r, B):
    """The slide holding row r (< offsets[B]): the largest b < B with offsets[b] <= r, by binary search. Empty
    slides share their offset with the next one and are skipped."""
    lo = r * 0
    hi = lo + B
    while hi - lo > 1:
        mid = (lo + hi) // 2
        below = tl.load(off_ptr + mid).to(tl.int64) <= r
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _segment_end(off_ptr, b, lo, hi):
    """End of the segment of slide b that starts at row lo: offsets[b + 1], within the chunk; at least lo + 1, so
    that offsets that broke the checked contract (monotone, ending at the row count) cannot stall a program."""
    return tl.maximum(tl.minimum(tl.load(off_ptr + b + 1).to(tl.int64), hi), lo + 1)


@triton.jit
def _row_offsets(r, rmask, idx_ptr, s_r, GATHER: tl.constexpr):
    if GATHER:
        row = tl.load(idx_ptr + r, mask=rmask, other=0).to(tl.int64)
    else:
        row = r.to(tl.int64)
    return row * s_r


@triton.jit
def _block_rows(r0, end, idx_ptr, s_r, GATHER: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_M of a slide segment ending at `end`: (r, mask, offsets in rows_ptr)."""
    r = r0 + tl.arange(0, BLOCK_M)
    rmask = r < end
    return r, rmask, _row_offsets(r, rmask, idx_ptr, s_r, GATHER)


@triton.jit
def _col_tile(t, D, BLOCK_DO: tl.constexpr):
    """Output columns of column tile t and their mask."""
    do = t * BLOCK_DO + tl.arange(0, BLOCK_DO)
    return do, do < D


@triton.jit
def _program_rows(pid_c, N, K, CHUNK, csq_ptr, scale_ptr, HARD: tl.constexpr, K_PAD: tl.constexpr):
    """A program's rows [lo, hi) (chunk pid_c) and codewords k (mask, ||c||^2, scale s: ||c||^2 for hard)."""
    lo = pid_c * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    csq = tl.load(csq_ptr + k)
    if HARD:
        s = csq
    else:
        s = tl.load(scale_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    return lo, hi, k, kmask, csq, s


@triton.jit
def _add_col_tile(acc, p, rows_ptr, row, rmask, s_c, t, D, MODE: tl.constexpr, EXACT_P: tl.constexpr,
                  BLOCK_DO: tl.constexpr):
    """acc (K_PAD, BLOCK_DO) + p^T x[:, tile t] (p: assignments, or h in the backward)."""
    do, domask = _col_tile(t, D, BLOCK_DO)
    xo = tl.load(rows_ptr + row[:, None] + do[None, :].to(tl.int64) * s_c, mask=rmask[:, None] & domask[None, :],
                 other=0.0)
    return mm_fr(tl.trans(p), xo, acc, MODE, EXACT_P)


@triton.jit
def _add_more_col_tiles(acc1, acc2, acc3, p, rows_ptr, row, rmask, s_c, t0, D, MODE: tl.constexpr,
                        EXACT_P: tl.constexpr, BLOCK_DO: tl.constexpr, N_DT: tl.constexpr):
    """_add_col_tile for a program's tiles after its first, t0 + 1 .. t0 + N_DT - 1 (accumulators past N_DT are
    returned as they are: dead code)."""
    if N_DT > 1:
        acc1 = _add_col_tile(acc1, p, rows_ptr, row, rmask, s_c, t0 + 1, D, MODE, EXACT_P, BLOCK_DO)
    if N_DT > 2:
        acc2 = _add_col_tile(acc2, p, rows_ptr, row, rmask, s_c, t0 + 2, D, MODE, EXACT_P, BLOCK_DO)
    if N_DT > 3:
        acc3 = _add_col_tile(acc3, p, rows_ptr, row, rmask, s_c, t0 + 3, D, MODE, EXACT_P, BLOCK_DO)
    return acc1, acc2, acc3


@triton.jit
def _atomic_add_col_tile(ptr, val, k, kmask, t, D, BLOCK_DO: tl.constexpr):
    """ptr (K, D)[:, tile t] += val, atomically (other programs add other rows' sums)."""
    do, domask = _col_tile(t, D, BLOCK_DO)
    tl.atomic_add(ptr + k[:, None] * D + do[None, :], val, mask=kmask[:, None] & domask[None, :], sem="relaxed")


@triton.jit
def _flush_col_tile(acc, mass, c_ptr, acc_ptr, b, k, kmask, t, K, D, BLOCK_DO: tl.constexpr):
    """E_b[:, tile t] += acc - mass c[:, tile t]."""
    do, domask = _col_tile(t, D, BLOCK_DO)
    c_tile = tl.load(c_ptr + k[:, None] * D + do[None, :], mask=kmask[:, None] & domask[None, :],
                     other=0.0).to(tl.float32)
    _atomic_add_col_tile(acc_ptr + b * K * D, acc - mass[:, None] * c_tile, k, kmask, t, D, BLOCK_DO)


@triton.jit
def _flat_slice(i, n_slices, lo, end, idx_ptr, s_r, rows_ptr, s_c, ct_ptr, gt_ptr, k, dot, dotg, xsq, D,
                WITH_G: tl.constexpr, HARD: tl.constexpr, GATHER: tl.constexpr, MODE: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Step i of a FLATTEN segment loop (rows lo .. end, n_slices D slices a row block): that slice's terms added to
    dot, dotg (WITH_G) and xsq (_distance_slice); returns (r, rmask, row offsets, dot, dotg, xsq, whether it was the
    row block's last slice). The index is read again each slice (an L1 hit): every address here follows from i
    alone, which the pipeliner can compute ahead (it left loads whose addresses came through an if as plain loads)."""
    block = i // n_slices
    d0 = (i - block * n_slices) * BLOCK_D
    r, rmask, row = _block_rows(lo + block * BLOCK_M, end, idx_ptr, s_r, GATHER, BLOCK_M)
    dot, dotg, xsq = _distance_slice(rows_ptr, row, rmask, s_c, d0, ct_ptr, k, gt_ptr, dot, dotg, xsq, D,
                                     WITH_G, HARD, MODE, K_PAD, BLOCK_D)
    return r, rmask, row, dot, dotg, xsq, d0 + BLOCK_D >= D


@triton.jit
def _fwd_assigned(a, acc0, acc1, acc2, acc3, mass, rows_ptr, row, rmask, s_c, t0, D, HARD: tl.constexpr,
                  WITH_E: tl.constexpr, MODE: tl.constexpr, BLOCK_DO: tl.constexpr, N_DT: tl.constexpr):
    """A row block's assignments a added into mass and, as a^T x, into the N_DT column tiles' accumulators (the
    unused ones, N_DT < 4, are dead code to the compiler)."""
    mass += tl.sum(a, axis=0)
    if WITH_E:
        acc0 = _add_col_tile(acc0, a, rows_ptr, row, rmask, s_c, t0, D, MODE, HARD, BLOCK_DO)
        acc1, acc2, acc3 = _add_more_col_tiles(acc1, acc2, acc3, a, rows_ptr, row, rmask, s_c, t0, D,
                                               MODE, HARD, BLOCK_DO, N_DT)
    return acc0, acc1, acc2, acc3, mass


@triton.jit
def _fwd_segment(lo, end, acc0, acc1, acc2, acc3, mass, rows_ptr, s_r, s_c, idx_ptr, ct_ptr, csq, k, kmask, s, t0,
                 D, HARD: tl.constexpr, GATHER: tl.constexpr, WITH_E: tl.constexpr, MODE: tl.constexpr,
                 K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                 N_DT: tl.constexpr, FLATTEN: tl.constexpr):
    """Rows lo .. end of one slide: a loop over row blocks holding a loop over D slices, or (FLATTEN) one loop over
    (row block, D slice) pairs that finishes a row block at its last slice (see the module docstring)."""
    if FLATTEN:
        n_slices = tl.cdiv(D, BLOCK_D)
        dot = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
        xsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in range(0, tl.cdiv(end - lo, BLOCK_M) * n_slices):
            r, rmask, row, dot, no_g, xsq, last = _flat_slice(i, n_slices, lo, end, idx_ptr, s_r, rows_ptr, s_c,
                                                              ct_ptr, ct_ptr, k, dot, dot, xsq, D, False, HARD,
                                                              GATHER, MODE, K_PAD, BLOCK_M, BLOCK_D)
            if last:
                a, amin = _assign(_finish_distances(dot, xsq, csq, HARD), k, kmask, rmask, s, HARD)
                acc0, acc1, acc2, acc3, mass = _fwd_assigned(a, acc0, acc1, acc2, acc3, mass, rows_ptr, row, rmask,
                                                             s_c, t0, D, HARD, WITH_E, MODE, BLOCK_DO, N_DT)
                dot = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
                xsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        for r0 in range(lo, end, BLOCK_M):
            r, rmask, row = _block_rows(r0, end, idx_ptr, s_r, GATHER, BLOCK_M)
            dist, _ = _distances(rows_ptr, row, rmask, s_c, ct_ptr, csq, k, ct_ptr, D,
                                 False, HARD, MODE, K_PAD, BLOCK_M, BLOCK_D)
            a, _ = _assign(dist, k, kmask, rmask, s, HARD)
            acc0, acc1, acc2, acc3, mass = _fwd_assigned(a, acc0, acc1, acc2, acc3, mass, rows_ptr, row, rmask, s_c,
                                                         t0, D, HARD, WITH_E, MODE, BLOCK_DO, N_DT)
    return acc0, acc1, acc2, acc3, mass


@triton.jit
def _re_fwd_kernel(rows_ptr, s_r, s_c, idx_ptr, off_ptr, c_ptr, ct_ptr, csq_ptr, scale_ptr, acc_ptr, mass_ptr,
                   N, B, K, D, CHUNK,
                   HARD: tl.constexpr, GATHER: tl.constexpr, WITH_E: tl.constexpr, MODE: tl.constexpr,
                   K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                   N_DT: tl.constexpr, FLATTEN: tl.constexpr):
    """N_DT column tiles (1..4) per program: their accumulators side by side in registers (Triton blocks are powers
    of two, so D=384 is three 128-wide tiles, not one 384-wide one), the distances computed once for all of them.
    FLATTEN: one loop over a segment's (row block, D slice) pairs (see the module docstring)."""
    tl.static_assert(N_DT >= 1 and N_DT <= 4)
    pid = tl.program_id(0).to(tl.int64)
    if WITH_E:
        n_groups = tl.cdiv(tl.cdiv(D, BLOCK_DO), N_DT)
        pid_c = pid // n_groups
        t0 = (pid % n_groups) * N_DT
    else:
        pid_c = pid
        t0 = pid * 0
    lo, hi, k, kmask, csq, s = _program_rows(pid_c, N, K, CHUNK, csq_ptr, scale_ptr, HARD, K_PAD)
    while lo < hi:  # one slide segment of the chunk per iteration
        b = _slide_of(off_ptr, lo, B)
        end = _segment_end(off_ptr, b, lo, hi)
        acc0 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
        acc1 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
        acc2 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
        acc3 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
        mass = tl.zeros((K_PAD,), dtype=tl.float32)
        acc0, acc1, acc2, acc3, mass = _fwd_segment(
            lo, end, acc0, acc1, acc2, acc3, mass, rows_ptr, s_r, s_c, idx_ptr, ct_ptr, csq, k, kmask, s, t0, D,
            HARD, GATHER, WITH_E, MODE, K_PAD, BLOCK_M, BLOCK_D, BLOCK_DO, N_DT, FLATTEN)
        if WITH_E:
            _flush_col_tile(acc0, mass, c_ptr, acc_ptr, b, k, kmask, t0, K, D, BLOCK_DO)
            if N_DT > 1:
                _flush_col_tile(acc1, mass, c_ptr, acc_ptr, b, k, kmask, t0 + 1, K, D, BLOCK_DO)
            if N_DT > 2:
                _flush_col_tile(acc2, mass, c_ptr, acc_ptr, b, k, kmask, t0 + 2, K, D, BLOCK_DO)
            if N_DT > 3:
                _flush_col_tile(acc3, mass, c_ptr, acc_ptr, b, k, kmask, t0 + 3, K, D, BLOCK_DO)
        if t0 == 0:
            tl.atomic_add(mass_ptr + b * K + k, mass, mask=kmask, sem="relaxed")
        lo = end


@triton.jit
def _bwd_assigned(dist, dotg, r, rmask, row, hx, hx1, hx2, hx3, hsum, gs, mass, rows_ptr, s_c, k, kmask, s, gc, gb_ptr,
                  g_tile, c_tile, do, domask, pid_d, gx_ptr, s_gr, D, HARD: tl.constexpr, WRITE_GX: tl.constexpr,
                  NEED_C: tl.constexpr, MODE: tl.constexpr, BLOCK_DO: tl.constexpr, N_DT: tl.constexpr):
    """A row block given its distances and x G_b^T: its assignments again, grad x of its column tile (WRITE_GX) and
    its terms of the codeword sums (NEED_C) added to the accumulators."""
    a, amin = _assign(dist, k, kmask, rmask, s, HARD)
    omask = rmask[:, None] & domask[None, :]
    if HARD:
        if NEED_C:
            mass += tl.sum(a, axis=0)
        if WRITE_GX:
            gx = tl.load(gb_ptr + amin[:, None].to(tl.int64) * D + do[None, :], mask=omask, other=0.0)
            tl.store(gx_ptr + r[:, None].to(tl.int64) * s_gr + do[None, :],
                     gx.to(gx_ptr.dtype.element_ty), mask=omask)
    else:
        g = dotg - gc[None, :]
        # shifted by g at the row's largest assignment (h is the same, as sum_k a_k = 1): where that a is
        # near 1, sum_k a_k g_k ~ g_m would cancel against g_m and leave h_m an error of eps |g|
        k_top = tl.argmax(a, axis=1)
        g -= tl.sum(tl.where(k[None, :] == k_top[:, None], g, 0.0), axis=1)[:, None]
        h = a * (g - tl.sum(a * g, axis=1)[:, None])
        xo = tl.load(rows_ptr + row[:, None] + do[None, :].to(tl.int64) * s_c, mask=omask, other=0.0)
        if NEED_C:
            mass += tl.sum(a, axis=0)
            hsum += tl.sum(h, axis=0)
            gs -= tl.sum(h * tl.where(rmask[:, None] & kmask[None, :], dist, 0.0), axis=0)
            hx = mm_fr(tl.trans(h), xo, hx, MODE, False)
            hx1, hx2, hx3 = _add_more_col_tiles(hx1, hx2, hx3, h, rows_ptr, row, rmask, s_c, pid_d, D,
                                                MODE, False, BLOCK_DO, N_DT)
        if WRITE_GX:
            hs = h * s[None, :]
            gx = tl.dot(a, g_tile, input_precision="tf32x3")
            gx += tl.dot(2.0 * hs, c_tile, input_precision="tf32x3")
            gx -= 2.0 * xo.to(tl.float32) * tl.sum(hs, axis=1)[:, None]
            tl.store(gx_ptr + r[:, None].to(tl.int64) * s_gr + do[None, :],
                     gx.to(gx_ptr.dtype.element_ty), mask=omask)
    return hx, hx1, hx2, hx3, hsum, gs, mass


@triton.jit
def _bwd_segment(lo, end, hx, hx1, hx2, hx3, hsum, gs, mass, rows_ptr, s_r, s_c, idx_ptr, ct_ptr, csq, k, kmask, s,
                 gtb_ptr, gc, gb_ptr, g_tile, c_tile, do, domask, pid_d, gx_ptr, s_gr, D, HARD: tl.constexpr,
                 GATHER: tl.constexpr, WRITE_GX: tl.constexpr, NEED_C: tl.constexpr, MODE: tl.constexpr,
                 K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                 N_DT: tl.constexpr, FLATTEN: tl.constexpr):
    """Rows lo .. end of one slide, in row blocks of D slices, or (FLATTEN) as _fwd_segment's one loop."""
    if FLATTEN:
        n_slices = tl.cdiv(D, BLOCK_D)
        dot = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
        dotg = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
        xsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in range(0, tl.cdiv(end - lo, BLOCK_M) * n_slices):
            r, rmask, row, dot, dotg, xsq, last = _flat_slice(i, n_slices, lo, end, idx_ptr, s_r, rows_ptr, s_c,
                                                              ct_ptr, gtb_ptr, k, dot, dotg, xsq, D, not HARD, HARD,
                                                              GATHER, MODE, K_PAD, BLOCK_M, BLOCK_D)
            if last:
                hx, hx1, hx2, hx3, hsum, gs, mass = _bwd_assigned(
                    _finish_distances(dot, xsq, csq, HARD), dotg, r, rmask, row, hx, hx1, hx2, hx3, hsum, gs, mass,
                    rows_ptr, s_c, k, kmask, s, gc, gb_ptr, g_tile, c_tile, do, domask, pid_d, gx_ptr, s_gr, D,
                    HARD, WRITE_GX, NEED_C, MODE, BLOCK_DO, N_DT)
                dot = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
                dotg = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
                xsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        for r0 in range(lo, end, BLOCK_M):
            r, rmask, row = _block_rows(r0, end, idx_ptr, s_r, GATHER, BLOCK_M)
            dist, dotg = _distances(rows_ptr, row, rmask, s_c, ct_ptr, csq, k, gtb_ptr, D,
                                    not HARD, HARD, MODE, K_PAD, BLOCK_M, BLOCK_D)
            hx, hx1, hx2, hx3, hsum, gs, mass = _bwd_assigned(
                dist, dotg, r, rmask, row, hx, hx1, hx2, hx3, hsum, gs, mass, rows_ptr, s_c, k, kmask, s, gc, gb_ptr,
                g_tile, c_tile, do, domask, pid_d, gx_ptr, s_gr, D, HARD, WRITE_GX, NEED_C, MODE, BLOCK_DO, N_DT)
    return hx, hx1, hx2, hx3, hsum, gs, mass


@triton.jit
def _re_bwd_kernel(rows_ptr, s_r, s_c, idx_ptr, off_ptr, c_ptr, ct_ptr, csq_ptr, scale_ptr, g_ptr, gt_ptr, gc_ptr,
                   hx_ptr, hsum_ptr, gs_ptr, mass_ptr, gx_ptr, s_gr,
                   N, B, K, D, CHUNK,
                   HARD: tl.constexpr, GATHER: tl.constexpr, WRITE_GX: tl.constexpr, NEED_C: tl.constexpr,
                   MODE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr, N_DT: tl.constexpr, FLATTEN: tl.constexpr):
    """N_DT > 1 (a pass that only sums, no grad x): column tiles pid_d..pid_d + N_DT - 1, the distances and x G_b^T
    once for all of them, as in the forward."""
    # (no chains of three: triton 3.2's compiler refuses `A and B and C`)
    tl.static_assert(N_DT == 1 or not (WRITE_GX or HARD))
    tl.static_assert(N_DT >= 1 and N_DT <= 4)
    pid = tl.program_id(0).to(tl.int64)
    n_groups = tl.cdiv(tl.cdiv(D, BLOCK_DO), N_DT)
    pid_c = pid // n_groups
    pid_d = (pid % n_groups) * N_DT
    lo, hi, k, kmask, csq, s = _program_rows(pid_c, N, K, CHUNK, csq_ptr, scale_ptr, HARD, K_PAD)
    do, domask = _col_tile(pid_d, D, BLOCK_DO)  # the first of its tiles, the only one where grad x is written
    emask = kmask[:, None] & domask[None, :]
    c_tile = tl.load(c_ptr + k[:, None] * D + do[None, :], mask=emask, other=0.0).to(tl.float32)
    hx = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
    hx1 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
    hx2 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
    hx3 = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
    hsum = tl.zeros((K_PAD,), dtype=tl.float32)
    gs = tl.zeros((K_PAD,), dtype=tl.float32)
    while lo < hi:  # one slide segment of the chunk per iteration
        b = _slide_of(off_ptr, lo, B)
        end = _segment_end(off_ptr, b, lo, hi)
        if HARD:
            gc = csq
        else:
            gc = tl.load(gc_ptr + b * K_PAD + k)
        gb_ptr = g_ptr + b * K * D
        gtb_ptr = gt_ptr + b * (2 if MODE == 1 else 1) * D * K_PAD  # G_b^T as _distances reads it
        g_tile = tl.load(gb_ptr + k[:, None] * D + do[None, :], mask=emask, other=0.0)   # G_b[:, tile]
        mass = tl.zeros((K_PAD,), dtype=tl.float32)
        hx, hx1, hx2, hx3, hsum, gs, mass = _bwd_segment(
            lo, end, hx, hx1, hx2, hx3, hsum, gs, mass, rows_ptr, s_r, s_c, idx_ptr, ct_ptr, csq, k, kmask, s, gtb_ptr,
            gc, gb_ptr, g_tile, c_tile, do, domask, pid_d, gx_ptr, s_gr, D, HARD, GATHER, WRITE_GX, NEED_C, MODE,
            K_PAD, BLOCK_M, BLOCK_D, BLOCK_DO, N_DT, FLATTEN)
        if NEED_C:
            if pid_d == 0:
                tl.atomic_add(mass_ptr + b * K + k, mass, mask=kmask, sem="relaxed")
        lo = end
    # h x, sum h and grad scale sum over every slide: one add per program
    if NEED_C:
        if not HARD:
            # the first tile with the columns held since the start (_atomic_add_col_tile here, recomputing them,
            # cost ptxas 72 B of spills at BLOCK_M=64)
            tl.atomic_add(hx_ptr + k[:, None] * D + do[None, :], hx, mask=emask, sem="relaxed")
            if N_DT > 1:
                _atomic_add_col_tile(hx_ptr, hx1, k, kmask, pid_d + 1, D, BLOCK_DO)
            if N_DT > 2:
                _atomic_add_col_tile(hx_ptr, hx2, k, kmask, pid_d + 2, D, BLOCK_DO)
            if N_DT > 3:
                _atomic_add_col_tile(hx_ptr, hx3, k, kmask, pid_d + 3, D, BLOCK_DO)
            if pid_d == 0:
                tl.atomic_add(hsum_ptr + k, hsum, mask=kmask, sem="relaxed")
                tl.atomic_add(gs_ptr + k, gs, mask=kmask, sem="relaxed")


# ---------------------------------------------------------------------------------------------- autotuning
# Config sets by kernel and codebook size, (BLOCK_M, BLOCK_D, BLOCK_DO, N_DT, num_warps, num_stages), N_DT the
# column tiles of one program (see _re_fwd_kernel): configs that ptxas compiles without register spills and within
# a block's shared memory on sm_90 and sm_80 (tests/triton_aot.py, a survey at D=384 with triton 3.9, bf16 and
# float32 rows). Eight warps but for a few: with four, the K x BLOCK_DO accumulator and the BLOCK_M x K distances,
# assignments (and, backward, the G_b and codeword tiles) leave ptxas at 255 registers and spilling for most tiles;
# the 4-warp ones below are the exceptions, each said where it stands. Large codebooks (K_PAD >= 128) take narrow
# column tiles.
# Every 16-bit launch at K=64 on sm_90, every config: no dot computed twice by two warpgroups and no accumulator
# converted between layouts in the loops (tests/triton_aot.py -v: DOT_REP=1 MMA_CVT=0; tests/test_triton_compile.py
# holds them to it). Until the split operands' hi and lo dots became one dot (_common.dot_pair) nearly every 8-warp
# config had both, on every BLOCK_D slice and row block; 4-warp configs had neither, and one was the sweep's
# fastest. Register and spill numbers below are since that change (not yet timed on a GPU).
# The forward's (..., 1, 8, 1) and (64, 32, 128, 1, 4, 1): the fastest of a sweep of the bank-row launch on the
# H100 (sweep_triton.csv: 0.45 and 0.61 ms against 1.09 for the then-autotuned (64, 32, 128, 8, 2)). The 4-warp one
# spills 104-112 B of stack on sm_90 and is kept for that measurement; the autotuner times it against the rest.
# The forward's N_DT = 3 entries (16-bit rows on sm_90 only, see _pruner) compute a row block's distances once
# for 3 column tiles instead of once per tile: at D=384, two programs per chunk (64-wide tiles) or one (128-wide)
# instead of three or six. ptxas sm_90 (triton 3.9, K=64, D=384, bf16 rows): 107-228 registers and no spills for
# the 64-wide ones; the 128-wide one (all 384 columns in one program) spills 40 B (soft) and 40-48 B (hard).
# Where they spill more, they are not tried: on sm_80 (mma.sync accumulators; 24..1208 B) and for float32 rows
# (three TF32 products per dot; 112..840 B). Triton 3.6 (the GPU image) spills 8-24 B in the 128-wide one only.
# The deep pipelines (num_stages 3 and 4; 16-bit rows on sm_90 only): the H100 profile has one program per SM (8
# warps at ~250 registers) waiting on each BLOCK_D slice of rows and codewords in turn, since num_stages <= 2
# keeps at most one slice in flight; these keep 2-3 in flight (12-24 KB of rows and codewords each), and the
# 4-warp ones fit two programs per SM. ptxas sm_90 (triton 3.9, bf16 rows): 216-255 registers, no spills, 16-88 KB
# of shared memory. Triton 3.6 (since _common.dot_pair; the GPU image) spills 8-16 B in (64, 32, 64, 1, 4, 4) and
# 48-56 B in (64, 64, 128, 1, 8, 4).
_FWD_CONFIGS = {
    "small_k": [(64, 32, 64, 1, 8, 2), (64, 32, 128, 1, 8, 2), (32, 32, 64, 1, 8, 2), (32, 32, 128, 1, 8, 2),
                (16, 64, 128, 1, 8, 2), (16, 32, 64, 1, 8, 2), (64, 128, 128, 1, 8, 1), (64, 64, 128, 1, 8, 1),
                (64, 32, 128, 1, 4, 1),
                (32, 32, 64, 3, 8, 1), (64, 32, 64, 3, 8, 2), (32, 32, 64, 3, 16, 1), (64, 64, 64, 3, 8, 1),
                (32, 32, 128, 3, 8, 1),
                # deep pipelines (sm_80 would spill 56-368 B in them)
                (64, 32, 128, 1, 8, 4), (64, 64, 128, 1, 8, 4), (64, 32, 64, 1, 4, 4), (32, 32, 64, 1, 4, 3),
                (64, 32, 64, 3, 8, 4),
                # one warpgroup (_SM90_WARPGROUP)
                (16, 32, 64, 1, 4, 2)],
    "large_k": [(16, 32, 16, 1, 8, 2), (16, 32, 32, 1, 8, 2), (32, 32, 16, 1, 8, 2), (32, 32, 32, 1, 8, 2)],
}
_BWD_CONFIGS = {
    "small_k": [(16, 32, 32, 1, 8, 2), (16, 32, 64, 1, 8, 2), (32, 32, 32, 1, 8, 2), (32, 32, 64, 1, 8, 2),
                (16, 32, 128, 1, 8, 2),
                # the soft passes that only sum (the bank rows'), bf16 rows on sm_90: 230-235 registers, no spills
                # (triton 3.6: 8 B in the BLOCK_M=64 one; 128-wide tiles x 3 spilled 112-424 B, 16 warps 80-744 B)
                (16, 32, 64, 3, 8, 2), (32, 32, 64, 3, 8, 1), (64, 32, 64, 3, 8, 1),
                # deep pipelines (sm_90, 16-bit rows, the passes that only sum): 220-248 registers, no spills
                # (triton 3.6: 16 B in (64, 32, 64, 1, 8, 3))
                (32, 32, 64, 1, 8, 4), (64, 32, 64, 1, 8, 3), (16, 32, 64, 3, 8, 4), (32, 32, 64, 3, 8, 3),
                # one warpgroup (_SM90_WARPGROUP; (16, 32, 64, 1, 4, 2) spills 16 B for float32 rows with triton 3.6)
                (16, 32, 32, 1, 4, 2)],
    # (16, 16, 16): at K_PAD = 256 the codeword-sum pass keeps to registers with it (sm_80; sm_90 32 B for float32
    # rows) where the others spill 250-500 B. The soft grad-x pass spills >= 0.7 KB in every config there: its
    # K x BLOCK_DO tiles of G_b and the codewords next to BLOCK_M x K assignments are the design's limit.
    "large_k": [(16, 32, 16, 1, 8, 2), (16, 32, 32, 1, 8, 2), (32, 32, 16, 1, 8, 2), (16, 16, 16, 1, 8, 2)],
}
LARGE_K_PAD = 128
# Configs with N_DT > 1 or num_stages > DEEP_STAGES (see the tables' comment) keep to registers only where tl.dot
# accumulates in wgmma's layout (sm_90) and the rows are 16-bit (MODE 1); other launches do not time them.
_SM90_MIN_CAPABILITY = (9, 0)
# ... and from triton 3.3 on. Triton 3.2 (torch 2.6), surveyed at K=64, D=384 on sm_90 (tests/triton_aot.py
# --sm90-only): every one converts its accumulator's layout in the loop (MMA_CVT=1) and 33 of 47 specialisations
# spill, up to 648 B. Triton 3.3, 3.4 and 3.5 convert none, as 3.6 and 3.9 do, and spill only in some deep 64-row
# ones (up to 200, 160 and 72 B).
SM90_CONFIGS_MIN_TRITON = (3, 3)
DEEP_STAGES = 2
# One warpgroup (4 warps) on 16-row blocks, for rows of any dtype on sm_90, in the launches that take the sm_90-only
# configs (the forward's with E, the backward's soft passes that only sum). Why: float32 rows (MODE 0: the training
# step's fresh features, a float32 bank) multiply with tl.dot's tf32x3, three chained MMAs, and on sm_90 Triton gives
# a dot that feeds another dot all warps along M, so the 8-warp configs compute every float32-row dot twice, one copy
# per warpgroup, and convert its accumulator between layouts in the loop (tests/triton_aot.py -v: DOT_REP=2,
# MMA_CVT=1-3; the 16-bit rows' split products are one dot each, see _common.dot_pair). With 4 warps there is one
# copy and no conversion. ptxas sm_90, K=64, D=384, no spills: the forward 237 registers for float32 rows and
# 187-210 for bf16 (triton 3.6: 245-248 and 216-228), the bank rows' backward pass 238 and 180 (triton 3.6: 255 and
# 190); sm_80 spills 56-96 B in the forward, so they are sm_90's.
_SM90_WARPGROUP = {(16, 32, 64, 1, 4, 2), (16, 32, 32, 1, 4, 2)}
# FLATTEN twins (_as_configs, _flattens_cleanly; see the module docstring), small codebooks: the forward's (16, 32,
# 64, 1, 8/4, 2), (32, 32, 64, 1, 8, 2), (32, 32, 128, 1, 8, 2), (16, 64, 128, 1, 8, 2), (32, 32, 64, 1, 4, 3) and
# (64, 32, 64, 1, 4, 4); the backward's bank-row pass takes 10. ptxas sm_90 at K=64, D=384, bf16 rows (triton 3.9
# and 3.6): forward 128-255 registers, no spills but the hard gathered (64, 32, 64, 1, 4, 4) (48 B), up to 1.7x the
# plain loop's shared memory (slices in flight across row blocks); backward 160-254, no spills; no dot computed
# twice; every row, codeword and G_b slice a cp.async (tests/triton_aot.py -v and the TTGIR).


_BLOCKS = ("BLOCK_M", "BLOCK_D", "BLOCK_DO", "N_DT")


def _as_configs(table):
    """The table's configs (FLATTEN off), then a FLATTEN twin of each that pipelines (num_stages > 1) and keeps its
    dots' layouts flattened (_flattens_cleanly): the autotuner times both where the launch may flatten (_pruner)."""
    def config(blocks, w, st, flatten):
        return triton.Config(dict(zip(_BLOCKS, blocks), FLATTEN=flatten), num_warps=w, num_stages=st)

    return ([config(blocks, w, st, False) for *blocks, w, st in table]
            + [config(blocks, w, st, True) for *blocks, w, st in table if st > 1 and _flattens_cleanly(blocks[0], w)])


def _flattens_cleanly(block_m, num_warps):
    """Whether a FLATTEN launch keeps one copy of each dot: in the flattened loop the distance dot and the a^T x (h^T
    x) dot after it share a body, and with 8 warps on 64-row blocks Triton then gives the distance dot all warps along
    M, both warpgroups computing it (tests/triton_aot.py: DOT_REP=2). 4 warps, or blocks of <= 32 rows, do not."""
    return num_warps == 4 or block_m <= 32


def _config_tuple(c):
    """A config as its table entry."""
    return (*(c.kwargs[n] for n in _BLOCKS), c.num_warps, c.num_stages)


def _columns(c):
    """Output columns one program of config c covers."""
    return c.kwargs["BLOCK_DO"] * c.kwargs["N_DT"]


# Hard assignment: the backward recomputes each fresh row's argmin, which must be the forward's (its gradient goes
# to the codeword the forward counted it under), so the forward and the backward compute the distances alike: the
# forward's dot mode (dot_mode_backward) and one BLOCK_D (where a split-precision dot's slices of D end changes its
# rounding).
HARD_BLOCK_D = 32


def _pruner(table, sm90_launch, has_column_tiles=lambda arg: True, flattens=lambda arg: True):
    """Keep the configs of the launch's codebook size whose column tile is not wider than D needs and that leave no
    column tile idle (N_DT tiles per program) (hard: and whose BLOCK_D is HARD_BLOCK_D); the sm_90-only ones
    (sm90_only) only on sm_90 in the launches sm90_launch names, and those of them for 16-bit rows only for 16-bit
    rows; the FLATTEN twins only in the launches `flattens` names; one config of each (BLOCK_M, BLOCK_D, warps,
    stages, FLATTEN) where the launch has no column tiles (has_column_tiles), as those differ in nothing it runs."""
    def prune(configs, named_args, **kwargs):
        def arg(name, default=None):
            return launch_arg(named_args, kwargs, name, default)

        d, hard = arg("D", 4096), arg("HARD", False)
        allowed = set(table["large_k" if arg("K_PAD", 64) >= LARGE_K_PAD else "small_k"])
        flat_ok = flattens(arg)
        on_sm90 = _on_sm90(arg("rows_ptr"))
        sixteen_bit = arg("MODE", 1) == 1
        keep = [c for c in configs
                if _config_tuple(c) in allowed and (not hard or c.kwargs["BLOCK_D"] == HARD_BLOCK_D)
                and (flat_ok or not c.kwargs["FLATTEN"]) and not refused_by_compiler(c, on_sm90, sixteen_bit)]
        sm90 = on_sm90 and sm90_launch(arg) and TRITON_VERSION >= SM90_CONFIGS_MIN_TRITON
        # the sm_90 gate first, so that the fallback (D narrower than every tile) cannot pick a gated config either
        eligible = [c for c in keep if not sm90_only(c) or sm90 and (sixteen_bit or not _sixteen_bit_only(c))]
        narrow = [c for c in eligible if c.kwargs["BLOCK_DO"] <= max(16, next_pow2(d)) and _idle_tiles(c, d) == 0]
        kept = narrow or [min(eligible, key=_columns)]
        if not has_column_tiles(arg):  # else the autotuner compiles and times each of the same launch
            first_of = {}
            for c in kept:
                block_m, block_d, _, _, warps, stages = _config_tuple(c)
                first_of.setdefault((block_m, block_d, warps, stages, c.kwargs["FLATTEN"]), c)
            kept = list(first_of.values())
        return kept
    return prune


def refused_by_compiler(c, on_sm90: bool, sixteen_bit: bool) -> bool:
    """Whether this Triton fails to compile config c (RuntimeError "PassManager::run failed", in its fence-insertion
    pass): triton 3.3, sm_90, 16-bit rows, 64-row blocks in one stage (tests/triton_aot.py --cases bench: 5 configs
    of the forward and the backward's bank-row pass; 3.2 and 3.4 compile them). The autotuner would pass over them
    (_common.compile_failures_lose); pruned, they cost no compile and no warning."""
    return (TRITON_VERSION == (3, 3) and on_sm90 and sixteen_bit and c.kwargs["BLOCK_M"] == 64
            and c.num_stages == 1)


def sm90_only(c) -> bool:
    """Whether config c is for sm_90 only: for 16-bit rows (_sixteen_bit_only), or one of _SM90_WARPGROUP."""
    return _sixteen_bit_only(c) or _config_tuple(c) in _SM90_WARPGROUP


def _sixteen_bit_only(c) -> bool:
    """N_DT > 1 or a deep pipeline (num_stages > DEEP_STAGES): for 16-bit rows on sm_90 only."""
    return c.kwargs["N_DT"] > 1 or c.num_stages > DEEP_STAGES


def _idle_tiles(c, d):
    """Column tiles wholly past D in a launch of config c (N_DT tiles per program)."""
    tiles = triton.cdiv(d, c.kwargs["BLOCK_DO"])
    n_dt = c.kwargs["N_DT"]
    return triton.cdiv(tiles, n_dt) * n_dt - tiles


def _on_sm90(rows) -> bool:
    """Whether the sm_90-only configs may run for rows (a CUDA tensor: by the device's capability; a CPU tensor
    reaches the pruner only in tests/triton_aot.py, which compiles for every target)."""
    if not isinstance(rows, torch.Tensor) or not rows.is_cuda:
        return True
    return torch.cuda.get_device_capability(rows.device) >= _SM90_MIN_CAPABILITY


def _autotuned(kernel, table, key, accumulated, sm90_launch, has_column_tiles=lambda arg: True,
               flattens=lambda arg: True):
    # restore_value, not reset_to_zero: the fresh rows' launch and the bank rows' launch add into the same buffers,
    # and reset_to_zero would zero them before the second launch's tuning (the first call of each shape lost the
    # fresh rows on GPU); restore_value puts back what the benchmark runs added.
    configs = _as_configs(table["small_k"] + table["large_k"])
    return LazyAutotune(kernel, configs, key=key, restore_value=accumulated,
                        prune_configs_by={"early_config_prune": _pruner(table, sm90_launch, has_column_tiles,
                                                                        flattens)})


_KEY = ["K_PAD", "D", "HARD", "MODE", "GATHER"]


# Which launches may take the sm_90-only configs (several column tiles, deep pipelines, one warpgroup), from the
# launch's arguments (arg(name, default)): the forward's with E (not the argmin-only one, which has no column tiles),
# the backward's soft passes that only sum (the grad-x passes spill 24-320 B in the deep and warpgroup ones). The
# pruner and the interpreter's fixed config (N_DT > 1 where D needs it) both ask these.
def _fwd_has_column_tiles(arg):
    return bool(arg("WITH_E", True))


def _fwd_takes_sm90_configs(arg):
    return _fwd_has_column_tiles(arg)


def _bwd_takes_sm90_configs(arg):
    return not arg("WRITE_GX", True) and not arg("HARD", False)


# Which launches may take FLATTEN: the forward's, and the backward's that only sum (the bank rows'). The grad-x
# passes (the fresh rows: few) keep the plain loop: flattened, the soft one's dots after the distances (h^T x, a G_b,
# h C) share the loop's body and take the chained-dot layout further (seen with the compiler's own fusion of this
# loop, tl.range(flatten=True), ptxas sm_90: MMA_CVT 2 -> 3 and up to 64 B of spills).
def _bwd_flattens(arg):
    return not arg("WRITE_GX", True)



_fwd_tuned = _autotuned(_re_fwd_kernel, _FWD_CONFIGS, _KEY + ["WITH_E"], ["acc_ptr", "mass_ptr"],
                        _fwd_takes_sm90_configs, has_column_tiles=_fwd_has_column_tiles)
_bwd_tuned = _autotuned(_re_bwd_kernel, _BWD_CONFIGS, _KEY + ["WRITE_GX", "NEED_C"],
                        ["hx_ptr", "hsum_ptr", "gs_ptr", "mass_ptr", "gx_ptr"], _bwd_takes_sm90_configs,
                        flattens=_bwd_flattens)


def _interp_meta(kernel, takes_sm90_configs, args, D, flattens=lambda arg: True):
    # Under the interpreter every block op is a numpy call: few, large blocks are fastest; a launch that may hold
    # several column tiles holds up to 4 of them where D > 256 (the code path of the GPU's wide configs), and one
    # that may flatten its loop does (the plain loop runs in tests/test_triton.py's every-config test).
    named = dict(zip(kernel.arg_names, args))

    def arg(name, default=None):
        return named.get(name, default)

    bd = min(256, max(16, next_pow2(D)))
    return {"BLOCK_M": 64, "BLOCK_D": bd, "BLOCK_DO": bd,
            "N_DT": min(4, triton.cdiv(D, bd)) if takes_sm90_configs(arg) else 1, "FLATTEN": flattens(arg)}


def _column_grid(chunks, D):
    """Grid of a launch over chunks x groups of N_DT column tiles."""
    return lambda meta: (chunks * triton.cdiv(triton.cdiv(D, meta["BLOCK_DO"]), meta["N_DT"]),)


# ---------------------------------------------------------------------------------------------- launchers
def _chunk_rows(n_rows: int, device, chunk_rows) -> int:
    if chunk_rows is not None:
        return int(chunk_rows)
    if INTERPRET:
        # small chunks, so the suite's small ragged slides span several programs and their atomics run (and the
        # interpreter's race check, tests/triton_memcheck.py, sees them): about +18% of the triton ops suite's time
        return 16
    return default_chunk_rows(n_rows, device)


class _Prepared:
    """src (K, D) or (B, K, D) as the loops over D read it, made by _prepare_transposed once per call and dot mode
    of the rows that meet it: get(rows_dtype, mode) -> (q^T parts, dot)."""

    def __init__(self, src, c, k_pad):
        self.src, self.c, self.k_pad = src, c, k_pad
        self._made = {}

    def get(self, rows_dtype, mode):
        # the rows' 16-bit dtype in MODE 1 (the parts' dtype), the mode alone in MODE 0 (float32)
        key = (rows_dtype, mode) if mode == 1 else mode
        if key not in self._made:
            self._made[key] = _prepare_transposed(self.src, self.c, self.k_pad, rows_dtype, mode)
        return self._made[key]


def _prepare_transposed(src, c, k_pad, rows_dtype, mode):
    """(q^T parts, dot) of each (K, D) matrix q of src (K, D) or (B, K, D), by _prep_transposed_kernel for the dot
    mode of rows of rows_dtype: ([B,] D, 2, k_pad) in rows_dtype (hi, lo; MODE 1) or ([B,] 1, D, k_pad) float32,
    and ([B,] k_pad) float32 sum_d q_kd c_kd."""
    K, D = c.shape
    lead = tuple(src.shape[:-2])  # (B,) or ()
    nb = lead[0] if lead else 1
    split = mode == 1
    t = torch.empty(lead + ((D, 2, k_pad) if split else (1, D, k_pad)), device=c.device,
                    dtype=rows_dtype if split else torch.float32)
    dot = torch.empty(lead + (k_pad,), dtype=torch.float32, device=c.device)
    if nb:
        block_k = 16
        _prep_transposed_kernel[(nb, k_pad // block_k)](src, c, t, dot, K, D, split, k_pad, block_k,
                                                        min(128, max(16, next_pow2(D))), num_warps=4)
    return t, dot


class _Codewords:
    """The codewords as the kernels read them: `c` (K, D) contiguous in their dtype, `scale` (or ||c||^2 in its
    slot for hard assignment) and, per dot mode of a row source, the prepared (c^T parts, ||c||^2), made once per
    call by _prep_transposed_kernel."""

    def __init__(self, codewords, scale, hard):
        self.c = codewords.detach().contiguous()
        self.K, self.D = self.c.shape
        self.k_pad = max(16, next_pow2(self.K))
        self.scale = None if (hard or scale is None) else scale.detach().contiguous()
        self._prepared = _Prepared(self.c, self.c, self.k_pad)

    def prepared(self, rows_dtype, mode):
        return self._prepared.get(rows_dtype, mode)


def _launch_fwd(rows, index, offsets, n_rows, cw, acc, mass, hard, with_e, chunk_rows):
    B = offsets.numel() - 1
    if B == 0 or n_rows == 0:
        return
    D = cw.D
    mode = dot_mode(rows.dtype)
    ct, csq = cw.prepared(rows.dtype, mode)
    chunk = _chunk_rows(n_rows, rows.device, chunk_rows)
    chunks = triton.cdiv(n_rows, chunk)
    gather = index is not None
    offsets = offsets.contiguous()
    idx = index if gather else offsets
    scale = csq if cw.scale is None else cw.scale
    args = (rows, rows.stride(0), rows.stride(1), idx, offsets, cw.c, ct, csq, scale, acc, mass,
            n_rows, B, cw.K, D, chunk, hard, gather, with_e, mode, cw.k_pad)

    launch(_re_fwd_kernel, _fwd_tuned, _column_grid(chunks, D) if with_e else (chunks,), args,
           _interp_meta(_re_fwd_kernel, _fwd_takes_sm90_configs, args, D))


def residual_encode_fwd(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard, *, chunk_rows=None):
    """(E (B, K, D) in promote_types(x, codewords), mass (B, K) float32); see the module docstring."""
    _checks.runtime_checks_residual_encode(x, x_offsets, bank, bank_index, bank_offsets)
    B = x_offsets.shape[0] - 1
    K, D = codewords.shape
    cw = _Codewords(codewords, scale, hard)
    acc = torch.zeros((B, K, D), dtype=torch.float32, device=x.device)
    mass = torch.zeros((B, K), dtype=torch.float32, device=x.device)
    for rows, index, offsets, n_rows in row_sources(x.detach(), x_offsets, bank, bank_index, bank_offsets):
        _launch_fwd(rows, index, offsets, n_rows, cw, acc, mass, hard, True, chunk_rows)
    out_dtype = torch.promote_types(x.dtype, codewords.dtype)
    return (acc if out_dtype == torch.float32 else acc.to(out_dtype)), mass


def residual_encode_bwd(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard,
                        need_grad_x, need_grad_codewords, need_grad_scale, *, mass=None, chunk_rows=None):
    """(grad x, grad codewords, grad scale); see the module docstring. `mass` (B, K), the forward's, lets the
    hard backward skip the bank rows entirely."""
    _checks.runtime_checks_residual_encode(x, x_offsets, bank, bank_index, bank_offsets)
    B = x_offsets.shape[0] - 1
    K, D = codewords.shape
    dev = x.device
    need_s = bool(need_grad_scale) and not hard
    need_c = bool(need_grad_codewords) or need_s
    cw = _Codewords(codewords, scale, hard)
    G = grad_E.detach().float().contiguous()
    gx = (torch.empty if need_grad_x else torch.zeros)((x.shape[0], D), dtype=x.dtype, device=dev)
    # float32 accumulators, one allocation: grad scale (K) first (returned as it is: at storage offset 0, as the
    # fake kernel's output is), hx (K, D) = sum h x, hsum (K), mass (B, K)
    sums = torch.zeros(K * (D + 2) + B * K, dtype=torch.float32, device=dev)
    gs, hx, hsum, mass_acc = sums.split([K, K * D, K, B * K])
    hx, mass_acc = hx.view(K, D), mass_acc.view(B, K)
    # soft: G_b^T prepared for each dot mode as the codewords are, and gc_bk = <G_bk, c_k> (B, K_PAD), the part of
    # dL/dd that does not depend on the row
    g_prepared = _Prepared(G, cw.c, cw.k_pad)
    use_given_mass = hard and mass is not None
    xd = x.detach()
    for src, (rows, index, offsets, n_rows) in enumerate(row_sources(xd, x_offsets, bank, bank_index, bank_offsets)):
        fresh = src == 0
        write_gx = fresh and bool(need_grad_x)
        acc_c = need_c and not use_given_mass
        if B == 0 or n_rows == 0 or not (write_gx or acc_c):
            continue
        if hard and not fresh:
            # Bank rows count only through mass: an argmin-only pass (no E, no column tiles).
            _launch_fwd(rows, index, offsets, n_rows, cw, hx, mass_acc, True, False, chunk_rows)
            continue
        mode = dot_mode_backward(rows.dtype, hard)
        ct, csq = cw.prepared(rows.dtype, mode)
        gt, gc = (G, csq) if hard else g_prepared.get(rows.dtype, mode)  # hard: not read
        chunk = _chunk_rows(n_rows, dev, chunk_rows)
        chunks = triton.cdiv(n_rows, chunk)
        gather = index is not None
        offsets = offsets.contiguous()
        idx = index if gather else offsets
        k_pad = cw.k_pad
        # A soft pass writing grad x and accumulating the codeword sums at once holds G_b, C, h x (K x BLOCK_DO
        # each) and the dots feeding grad x: at K_PAD >= 128 no tiling fits a block's shared memory (sm_80: 163 KB,
        # sm_90: 227 KB), so large codebooks take two passes over these rows, one per output (the distances are
        # recomputed; only the fresh rows write grad x, and they are the few).
        split = write_gx and acc_c and not hard and k_pad >= LARGE_K_PAD
        for pass_gx, pass_c in ((True, False), (False, True)) if split else ((write_gx, acc_c),):
            args = (rows, rows.stride(0), rows.stride(1), idx, offsets, cw.c, ct, csq,
                    csq if cw.scale is None else cw.scale, G, gt, gc,
                    hx, hsum, gs, mass_acc, gx, gx.stride(0), n_rows, B, K, D,
                    chunk, hard, gather, pass_gx, pass_c, mode, k_pad)
            launch(_re_bwd_kernel, _bwd_tuned, _column_grid(chunks, D), args,
                   _interp_meta(_re_bwd_kernel, _bwd_takes_sm90_configs, args, D, _bwd_flattens))
    if use_given_mass:
        mass_acc = mass.float().contiguous()
    if need_c:
        grad_c = torch.empty((K, D), dtype=codewords.dtype, device=dev)
        block_d = min(128, max(16, next_pow2(D)))
        _finish_codeword_grads_kernel[(triton.cdiv(K, 16), triton.cdiv(D, block_d))](
            G, mass_acc, hx, hsum, cw.c, hsum if cw.scale is None else cw.scale, grad_c, B, K, D, not hard, 16,
            block_d, num_warps=4)
    else:
        grad_c = torch.zeros((K, D), dtype=codewords.dtype, device=dev)
    s_dtype = scale.dtype if scale is not None else codewords.dtype
    grad_s = gs.to(s_dtype) if need_s else torch.zeros(K, dtype=s_dtype, device=dev)
    return gx, grad_c, grad_s
