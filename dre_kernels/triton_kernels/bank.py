"""Triton memory-bank ops: gather and the fused in-place momentum update.

    bank_gather(bank, index)[i] = bank[index_i]
    bank_update_: new_i = momentum * bank[index_i] + (1 - momentum) * values_i  (float32),
                  new_i / max(||new_i||, 1e-12) if normalize, stored in bank.dtype at row index_i.

One program handles ROWS rows with the whole (padded) width D in registers (D <= 4096), so the update reads each
bank row and value once, normalises in registers and writes once: no float32 copy of the rows exists in memory.
The bank is addressed through its strides (it is updated in place, so it may not be copied); indices may be int32
or int64 and all address arithmetic is 64-bit. Indices are in range and unique (checked in Python by the
wrapper, and again here by _checks.runtime_checks_bank: free for eager calls, real under torch.compile), so
rows are never out of bounds and never race.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dre_kernels import _checks
from dre_kernels.triton_kernels._common import next_pow2


@triton.jit
def _gather_kernel(bank_ptr, s_br, s_bc, idx_ptr, out_ptr, n, D,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < n
    row = tl.load(idx_ptr + r, mask=rmask, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        m = rmask[:, None] & (d < D)[None, :]
        v = tl.load(bank_ptr + row[:, None] * s_br + d[None, :] * s_bc, mask=m)
        tl.store(out_ptr + r[:, None] * D + d[None, :], v, mask=m)


@triton.jit
def _update_kernel(bank_ptr, s_br, s_bc, idx_ptr, val_ptr, s_vr, s_vc, n, D, momentum,
                   NORMALIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < n
    row = tl.load(idx_ptr + r, mask=rmask, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    m = rmask[:, None] & (d < D)[None, :]
    bp = bank_ptr + row[:, None] * s_br + d[None, :] * s_bc
    old = tl.load(bp, mask=m, other=0.0).to(tl.float32)
    val = tl.load(val_ptr + r[:, None] * s_vr + d[None, :] * s_vc, mask=m, other=0.0).to(tl.float32)
    new = momentum * old + (1.0 - momentum) * val
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(new * new, axis=1))
        new = new / tl.maximum(norm, 1e-12)[:, None]
    tl.store(bp, new.to(bank_ptr.dtype.element_ty), mask=m)


def _rows_per_program(D: int) -> int:
    return max(1, min(16, 4096 // next_pow2(D)))


def bank_gather(bank, index):
    _checks.runtime_checks_bank(bank, index, unique=False)
    n, D = index.shape[0], bank.shape[1]
    out = torch.empty((n, D), dtype=bank.dtype, device=bank.device)
    if n == 0 or D == 0:
        return out
    rows = _rows_per_program(D)
    block_d = min(1024, next_pow2(D))
    _gather_kernel[(triton.cdiv(n, rows),)](bank, bank.stride(0), bank.stride(1), index.contiguous(), out, n, D,
                                            ROWS=rows, BLOCK_D=block_d, num_warps=4)
    return out


def bank_update_(bank, index, values, momentum, normalize):
    _checks.runtime_checks_bank(bank, index, unique=True)
    n, D = index.shape[0], bank.shape[1]
    if n == 0 or D == 0:
        return
    rows = _rows_per_program(D)
    block_d = next_pow2(D)
    values = values.detach()
    _update_kernel[(triton.cdiv(n, rows),)](bank, bank.stride(0), bank.stride(1), index.contiguous(), values,
                                            values.stride(0), values.stride(1), n, D, float(momentum),
                                            NORMALIZE=bool(normalize), ROWS=rows, BLOCK_D=block_d,
                                            num_warps=8 if block_d >= 2048 else 4)
