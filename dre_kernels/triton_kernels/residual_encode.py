"""Triton residual_encode: forward and backward, soft (Deep TEN) and hard (VLAD) assignment.

    d_ik = ||x_i||^2 - 2 <x_i, c_k> + ||c_k||^2          (tl.dot, float32 accumulation; clamped at 0)
    soft: a_ik = softmax_k(-s_k d_ik)                   hard: a_ik = [k = first argmin_j d_ij]
    E_bk = sum_{i in S_b} a_ik x_i - mass_bk c_k        mass_bk = sum_{i in S_b} a_ik

Work decomposition. Each source of rows (the fresh rows x, then the bank rows gathered through bank_index) is cut
into chunks of at most CHUNK rows that never cross a slide boundary; chunk slots are laid out slide after slide,
computed on the device from the CSR offsets (no host synchronisation: the grid size depends on shapes only,
cdiv(N, CHUNK) + B slots, the unused ones exit at once). A program owns one chunk and one tile of BLOCK_DO output
columns; it walks the chunk in blocks of BLOCK_M rows: the full-width distances (a loop over D in BLOCK_D steps,
K padded to a power of two and masked), the softmax or argmin in registers, and a^T x for its column tile, kept in
a K x BLOCK_DO register accumulator. Gathered rows, the assignment matrix and the residuals never reach memory.
Programs of the same chunk sit next to each other in the launch order, so the rows they all read come from L2.

Long slides: split-and-atomics. A 50k-row slide becomes 50k/CHUNK programs whose partial E (and mass) are added
into one float32 (B, K, D) buffer with tl.atomic_add (one K x BLOCK_DO add per program, not per row, so contention
is negligible). Chosen over split-and-reduce because a partials buffer would cost (N/CHUNK + B) * K * D floats
(tens of MB at the DRE-SLCL step shape, several times E itself), needs a second kernel, and the grid stays
sync-free; the price is that float32 sums are not bitwise deterministic across runs when a slide spans programs.

Backward (recomputation, flash-attention style; nothing of the forward is saved). With G = dL/dE,
g_ik = <G_bk, x_i> - <G_bk, c_k>, h_ik = a_ik (g_ik - sum_j a_ij g_ij) (soft only; computed with g_ik - g_im for
g_ik, m = argmax_j a_ij, which cancels nothing where a_im is near 1):
    grad x_i = sum_k a_ik G_bk + 2 sum_k s_k h_ik (c_k - x_i)                        (fresh rows only)
    grad c_k = -sum_b mass_bk G_bk + 2 s_k (sum_i h_ik x_i - c_k sum_i h_ik)
    grad s_k = -sum_i h_ik d_ik
The same programs recompute d and a, add sum_i h_ik x_i (K x BLOCK_DO), sum_i h_ik, sum_i h_ik d_ik and mass
atomically, and write grad x rows directly (each row belongs to one program per column tile). For hard assignment
h = 0: grad x_i = G_{b, k(i)} (a gather), grad c_k = -sum_b mass_bk G_bk, so bank rows enter only through mass:
given the forward's mass (`mass=`) there is no pass over bank rows at all; without it (the dre op schema does not
carry it) one argmin-only pass over the bank rows counts them, with no E accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dre_kernels import _checks
from dre_kernels._gpu_host import (backward_buffers, chunk_map, default_chunk_rows, encode_forward,
                                     finish_codeword_grads, next_pow2, prep_codewords, row_sources)
from dre_kernels.triton_kernels._common import (INTERPRET, LazyAutotune, dot_mode, dot_mode_backward, launch,
                                               launch_arg, mm_ff, mm_fr, mm_rf)


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _distances(rows_ptr, row, rmask, s_c, c_ptr, csq, k, kmask, g_ptr, D,
               WITH_G: tl.constexpr, HARD: tl.constexpr, MODE: tl.constexpr, K_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """d (BLOCK_M, K_PAD) = ||x||^2 - 2 x c^T + ||c||^2 (HARD: d - ||x||^2, the argmin's key), and x G_b^T when
    WITH_G (g_ptr at G_b). ||x||^2 is the same for every codeword of a row: adding it before the argmin would round
    away the low bits that set near codewords apart."""
    dot = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    dotg = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    xsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        xt = tl.load(rows_ptr + row[:, None] + d[None, :].to(tl.int64) * s_c,
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        if not HARD:
            xf = xt.to(tl.float32)
            xsq += tl.sum(xf * xf, axis=1)
        cmask = kmask[None, :] & dmask[:, None]
        ct = tl.load(c_ptr + k[None, :] * D + d[:, None], mask=cmask, other=0.0)  # (BLOCK_D, K_PAD) = c^T
        dot = mm_rf(xt, ct, dot, MODE)
        if WITH_G:
            gt = tl.load(g_ptr + k[None, :] * D + d[:, None], mask=cmask, other=0.0)
            dotg = mm_rf(xt, gt, dotg, MODE)
    if HARD:
        dist = csq[None, :] - 2.0 * dot
    else:
        dist = xsq[:, None] - 2.0 * dot + csq[None, :]
        dist = tl.where(dist < 0.0, 0.0, dist)  # cancellation near x = c_k; clamped as on CPU and CUDA, NaN kept
    return dist, dotg


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
def _chunk_bounds(pid_c, off_ptr, cstart_ptr, b, CHUNK):
    j = pid_c - tl.load(cstart_ptr + b)
    lo = tl.load(off_ptr + b) + j * CHUNK
    hi = tl.minimum(tl.load(off_ptr + b + 1), lo + CHUNK)
    return lo, hi


@triton.jit
def _row_offsets(r, rmask, idx_ptr, s_r, GATHER: tl.constexpr):
    if GATHER:
        row = tl.load(idx_ptr + r, mask=rmask, other=0).to(tl.int64)
    else:
        row = r.to(tl.int64)
    return row * s_r


@triton.jit
def _re_fwd_kernel(rows_ptr, s_r, s_c, idx_ptr, off_ptr, slide_ptr, cstart_ptr,
                   c_ptr, csq_ptr, scale_ptr, acc_ptr, mass_ptr,
                   B, K, D, CHUNK,
                   HARD: tl.constexpr, GATHER: tl.constexpr, WITH_E: tl.constexpr, MODE: tl.constexpr,
                   K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if WITH_E:
        n_dt = tl.cdiv(D, BLOCK_DO)
        pid_c = pid // n_dt
        pid_d = pid % n_dt
    else:
        pid_c = pid
        pid_d = pid * 0
    b = tl.load(slide_ptr + pid_c)
    if b < B:
        lo, hi = _chunk_bounds(pid_c, off_ptr, cstart_ptr, b, CHUNK)
        k = tl.arange(0, K_PAD)
        kmask = k < K
        csq = tl.load(csq_ptr + k, mask=kmask, other=0.0)
        if HARD:
            s = csq
        else:
            s = tl.load(scale_ptr + k, mask=kmask, other=0.0)
        do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        acc = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
        mass = tl.zeros((K_PAD,), dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            rmask = r < hi
            row = _row_offsets(r, rmask, idx_ptr, s_r, GATHER)
            dist, _ = _distances(rows_ptr, row, rmask, s_c, c_ptr, csq, k, kmask, c_ptr, D,
                                 False, HARD, MODE, K_PAD, BLOCK_M, BLOCK_D)
            a, _ = _assign(dist, k, kmask, rmask, s, HARD)
            mass += tl.sum(a, axis=0)
            if WITH_E:
                xo = tl.load(rows_ptr + row[:, None] + do[None, :].to(tl.int64) * s_c,
                             mask=rmask[:, None] & domask[None, :], other=0.0)
                acc = mm_fr(tl.trans(a), xo, acc, MODE, HARD)
        if WITH_E:
            emask = kmask[:, None] & domask[None, :]
            ct = tl.load(c_ptr + k[:, None] * D + do[None, :], mask=emask, other=0.0)
            acc = acc - mass[:, None] * ct
            tl.atomic_add(acc_ptr + b * K * D + k[:, None] * D + do[None, :], acc, mask=emask, sem="relaxed")
        if pid_d == 0:
            tl.atomic_add(mass_ptr + b * K + k, mass, mask=kmask, sem="relaxed")


@triton.jit
def _re_bwd_kernel(rows_ptr, s_r, s_c, idx_ptr, off_ptr, slide_ptr, cstart_ptr,
                   c_ptr, csq_ptr, scale_ptr, g_ptr, gc_ptr,
                   hx_ptr, hsum_ptr, gs_ptr, mass_ptr, gx_ptr, s_gr,
                   B, K, D, CHUNK,
                   HARD: tl.constexpr, GATHER: tl.constexpr, WRITE_GX: tl.constexpr, NEED_C: tl.constexpr,
                   MODE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n_dt = tl.cdiv(D, BLOCK_DO)
    pid_c = pid // n_dt
    pid_d = pid % n_dt
    b = tl.load(slide_ptr + pid_c)
    if b < B:
        lo, hi = _chunk_bounds(pid_c, off_ptr, cstart_ptr, b, CHUNK)
        k = tl.arange(0, K_PAD)
        kmask = k < K
        csq = tl.load(csq_ptr + k, mask=kmask, other=0.0)
        if HARD:
            s = csq
            gc = csq
        else:
            s = tl.load(scale_ptr + k, mask=kmask, other=0.0)
            gc = tl.load(gc_ptr + b * K + k, mask=kmask, other=0.0)
        do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        emask = kmask[:, None] & domask[None, :]
        gb_ptr = g_ptr + b * K * D
        g_tile = tl.load(gb_ptr + k[:, None] * D + do[None, :], mask=emask, other=0.0)   # G_b[:, tile]
        c_tile = tl.load(c_ptr + k[:, None] * D + do[None, :], mask=emask, other=0.0)
        hx = tl.zeros((K_PAD, BLOCK_DO), dtype=tl.float32)
        hsum = tl.zeros((K_PAD,), dtype=tl.float32)
        gs = tl.zeros((K_PAD,), dtype=tl.float32)
        mass = tl.zeros((K_PAD,), dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            rmask = r < hi
            row = _row_offsets(r, rmask, idx_ptr, s_r, GATHER)
            dist, dotg = _distances(rows_ptr, row, rmask, s_c, c_ptr, csq, k, kmask, gb_ptr, D,
                                    not HARD, HARD, MODE, K_PAD, BLOCK_M, BLOCK_D)
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
                if WRITE_GX:
                    hs = h * s[None, :]
                    gx = mm_ff(a, g_tile, tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32))
                    gx = mm_ff(2.0 * hs, c_tile, gx)
                    gx -= 2.0 * xo.to(tl.float32) * tl.sum(hs, axis=1)[:, None]
                    tl.store(gx_ptr + r[:, None].to(tl.int64) * s_gr + do[None, :],
                             gx.to(gx_ptr.dtype.element_ty), mask=omask)
        if NEED_C:
            if not HARD:
                tl.atomic_add(hx_ptr + k[:, None] * D + do[None, :], hx, mask=emask, sem="relaxed")
            if pid_d == 0:
                tl.atomic_add(mass_ptr + b * K + k, mass, mask=kmask, sem="relaxed")
                if not HARD:
                    tl.atomic_add(hsum_ptr + k, hsum, mask=kmask, sem="relaxed")
                    tl.atomic_add(gs_ptr + k, gs, mask=kmask, sem="relaxed")


# ---------------------------------------------------------------------------------------------- autotuning
# Config sets by kernel and codebook size, (BLOCK_M, BLOCK_D, BLOCK_DO, num_warps, num_stages): configs that ptxas
# compiles without register spills and within a block's shared memory on sm_90 and sm_80 (tests/triton_aot.py, a
# survey at D=384 with triton 3.9, bf16 and float32 rows). Eight warps throughout: with four, the K x BLOCK_DO
# accumulator and the BLOCK_M x K distances, assignments (and, backward, the G_b and codeword tiles) leave ptxas at
# 255 registers and spilling for most tiles. Large codebooks (K_PAD >= 128) take narrow column tiles.
_FWD_CONFIGS = {
    "small_k": [(64, 32, 64, 8, 2), (64, 32, 128, 8, 2), (32, 32, 64, 8, 2), (32, 32, 128, 8, 2),
                (16, 64, 128, 8, 2), (16, 32, 64, 8, 2)],
    "large_k": [(16, 32, 16, 8, 2), (16, 32, 32, 8, 2), (32, 32, 16, 8, 2), (32, 32, 32, 8, 2)],
}
_BWD_CONFIGS = {
    "small_k": [(16, 32, 32, 8, 2), (16, 32, 64, 8, 2), (32, 32, 32, 8, 2), (32, 32, 64, 8, 2),
                (16, 32, 128, 8, 2)],
    # (16, 16, 16): at K_PAD = 256 the codeword-sum pass keeps to registers with it (sm_80; sm_90 32 B for float32
    # rows) where the others spill 250-500 B. The soft grad-x pass spills >= 0.7 KB in every config there: its
    # K x BLOCK_DO tiles of G_b and the codewords next to BLOCK_M x K assignments are the design's limit.
    "large_k": [(16, 32, 16, 8, 2), (16, 32, 32, 8, 2), (32, 32, 16, 8, 2), (16, 16, 16, 8, 2)],
}
LARGE_K_PAD = 128


def _as_configs(table):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_DO": bdo}, num_warps=w, num_stages=st)
            for bm, bd, bdo, w, st in table]


# Hard assignment: the backward recomputes each fresh row's argmin, which must be the forward's (its gradient goes
# to the codeword the forward counted it under), so the forward and the backward compute the distances alike: the
# forward's dot mode (dot_mode_backward) and one BLOCK_D (where a split-precision dot's slices of D end changes its
# rounding).
HARD_BLOCK_D = 32


def _pruner(table):
    """Keep the configs of the launch's codebook size whose column tile is not wider than D needs (hard: and whose
    BLOCK_D is HARD_BLOCK_D)."""
    def prune(configs, named_args, **kwargs):
        k_pad = launch_arg(named_args, kwargs, "K_PAD", 64)
        d = launch_arg(named_args, kwargs, "D", 4096)
        hard = launch_arg(named_args, kwargs, "HARD", False)
        allowed = set(table["large_k" if k_pad >= LARGE_K_PAD else "small_k"])
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.kwargs["BLOCK_DO"], c.num_warps,
                                       c.num_stages) in allowed and (not hard or c.kwargs["BLOCK_D"] == HARD_BLOCK_D)]
        narrow = [c for c in keep if c.kwargs["BLOCK_DO"] <= max(16, next_pow2(d))]
        return narrow or [min(keep, key=lambda c: c.kwargs["BLOCK_DO"])]
    return prune


def _autotuned(kernel, table, key, accumulated):
    # restore_value, not reset_to_zero: the fresh rows' launch and the bank rows' launch add into the same buffers,
    # and reset_to_zero would zero them before the second launch's tuning (the first call of each shape lost the
    # fresh rows on GPU); restore_value puts back what the benchmark runs added.
    configs = _as_configs(table["small_k"] + table["large_k"])
    return LazyAutotune(kernel, configs, key=key, prune_configs_by={"early_config_prune": _pruner(table)},
                        restore_value=accumulated)


_KEY = ["K_PAD", "D", "HARD", "MODE", "GATHER"]
_fwd_tuned = _autotuned(_re_fwd_kernel, _FWD_CONFIGS, _KEY + ["WITH_E"], ["acc_ptr", "mass_ptr"])
_bwd_tuned = _autotuned(_re_bwd_kernel, _BWD_CONFIGS, _KEY + ["WRITE_GX", "NEED_C"],
                        ["hx_ptr", "hsum_ptr", "gs_ptr", "mass_ptr", "gx_ptr"])


def _interp_meta(D):
    # Under the interpreter every block op is a numpy call: few, large blocks are fastest.
    bd = min(256, max(16, next_pow2(D)))
    return {"BLOCK_M": 64, "BLOCK_D": bd, "BLOCK_DO": bd}


# ---------------------------------------------------------------------------------------------- launchers
def _chunk_rows(n_rows: int, device, chunk_rows) -> int:
    if chunk_rows is not None:
        return int(chunk_rows)
    if INTERPRET:
        return 4096
    return default_chunk_rows(n_rows, device)


def _launch_fwd(rows, index, offsets, n_rows, c32, csq, s32, acc, mass, hard, with_e, chunk_rows):
    B = offsets.numel() - 1
    if B == 0 or n_rows == 0:
        return
    K, D = c32.shape
    chunk = _chunk_rows(n_rows, rows.device, chunk_rows)
    off, slide, cstart, slots = chunk_map(offsets, n_rows, chunk)
    gather = index is not None
    idx = index if gather else off
    args = (rows, rows.stride(0), rows.stride(1), idx, off, slide, cstart, c32, csq, s32, acc, mass,
            B, K, D, chunk, hard, gather, with_e, dot_mode(rows.dtype), max(16, next_pow2(K)))

    def grid(meta):
        return (slots * triton.cdiv(D, meta["BLOCK_DO"]) if with_e else slots,)

    launch(_re_fwd_kernel, _fwd_tuned, grid, args, _interp_meta(D))


def residual_encode_fwd(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard, *, chunk_rows=None):
    """(E (B, K, D) in promote_types(x, codewords), mass (B, K) float32); see the module docstring."""
    _checks.runtime_checks_residual_encode(x, x_offsets, bank, bank_index, bank_offsets)
    return encode_forward(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard,
                          lambda *source: _launch_fwd(*source, hard, True, chunk_rows))


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
    c32, csq, s32 = prep_codewords(codewords, scale, hard)
    G = grad_E.detach().float().contiguous()
    gx, hx, hsum, gs, mass_acc = backward_buffers(x, B, K, D, bool(need_grad_x))
    gc = csq if hard else torch.einsum("bkd,kd->bk", G, c32).contiguous()
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
            _launch_fwd(rows, index, offsets, n_rows, c32, csq, s32, hx, mass_acc, True, False, chunk_rows)
            continue
        chunk = _chunk_rows(n_rows, dev, chunk_rows)
        off, slide, cstart, slots = chunk_map(offsets, n_rows, chunk)
        gather = index is not None
        idx = index if gather else off
        k_pad = max(16, next_pow2(K))
        # A soft pass writing grad x and accumulating the codeword sums at once holds G_b, C, h x (K x BLOCK_DO
        # each) and the dots feeding grad x: at K_PAD >= 128 no tiling fits a block's shared memory (sm_80: 163 KB,
        # sm_90: 227 KB), so large codebooks take two passes over these rows, one per output (the distances are
        # recomputed; only the fresh rows write grad x, and they are the few).
        split = write_gx and acc_c and not hard and k_pad >= LARGE_K_PAD
        for pass_gx, pass_c in ((True, False), (False, True)) if split else ((write_gx, acc_c),):
            args = (rows, rows.stride(0), rows.stride(1), idx, off, slide, cstart, c32, csq, s32, G, gc,
                    hx, hsum, gs, mass_acc, gx, gx.stride(0), B, K, D, chunk,
                    hard, gather, pass_gx, pass_c, dot_mode_backward(rows.dtype, hard), k_pad)
            launch(_re_bwd_kernel, _bwd_tuned, lambda meta: (slots * triton.cdiv(D, meta["BLOCK_DO"]),), args,
                   _interp_meta(D))
    if use_given_mass:
        mass_acc = mass.float()
    grad_c, grad_s = finish_codeword_grads(G, mass_acc, hx, hsum, gs, c32, s32, codewords, scale, hard, need_c,
                                           need_s)
    return gx, grad_c, grad_s
