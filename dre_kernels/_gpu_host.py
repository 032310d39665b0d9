"""Host-side launch rules shared by the GPU backends (triton, cupy): how a source of rows is cut into
slide-aligned chunks, the float32 codeword tensors every residual_encode kernel reads, and the contrastive_loss
host math around the kernels (positives per row).

A "source" is the fresh rows (x, split by x_offsets) or the bank rows (bank gathered by bank_index, split by
bank_offsets). Each source is cut into chunks of `chunk` rows that never cross a slide, so a long slide spreads
over many programs/blocks and their partial sums are added atomically.
"""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Rows per chunk, at least: one row block of the widest config (BLOCK_M / R = 64). The floor was 256, which left
# small sources on few programs: the DRE-SLCL step's 2048 fresh rows made 8 chunks (8-48 programs on 132 SMs, each
# walking 4-16 row blocks in turn, before the bank rows' launch could start), where 64 makes 32. Sources past
# 4 * SMs * 256 rows (the step's 131k bank rows) are cut as before.
MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 8192


def default_chunk_rows(n_rows: int, device) -> int:
    """~4 chunks per SM over a source, MIN_CHUNK_ROWS..MAX_CHUNK_ROWS rows each (a power of two): a long slide
    spreads over the GPU, and a small source over more than a few SMs."""
    target = 4 * num_sms(device)
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, next_pow2(-(-max(n_rows, 1) // target)))))


def chunk_map(offsets: torch.Tensor, n_rows: int, chunk: int):
    """Slide-aligned chunks of `chunk` rows, without synchronisation: (int64 offsets, slide of each slot, first
    slot of each slide, number of slots). The slot count depends on shapes only, so grids need no host sync."""
    off = offsets.to(torch.int64).contiguous()
    B = off.numel() - 1
    lens = off[1:] - off[:-1]
    nch = (lens + (chunk - 1)) // chunk
    cend = torch.cumsum(nch, 0)
    cstart = (cend - nch).contiguous()
    slots = -(-n_rows // chunk) + B
    slide = torch.searchsorted(cend, torch.arange(slots, device=off.device), right=True).contiguous()
    return off, slide, cstart, slots


def row_sources(x, x_offsets, bank, bank_index, bank_offsets):
    """(rows, index or None, offsets, n_rows) for the fresh rows and, if given, the bank rows."""
    out = [(x, None, x_offsets, x.shape[0])]
    if bank is not None:
        out.append((bank.detach(), bank_index.contiguous(), bank_offsets, bank_index.shape[0]))
    return out


def prep_codewords(codewords, scale, hard):
    """(codewords float32, ||c_k||^2, scale float32); for hard assignment the scale slot holds ||c||^2 (unused)."""
    c32 = codewords.detach().float().contiguous()
    csq = (c32 * c32).sum(1).contiguous()
    s32 = csq if (hard or scale is None) else scale.detach().float().contiguous()
    return c32, csq, s32


def encode_forward(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard, launch_source):
    """The forward driver of residual_encode_fwd: E and mass accumulated in float32 by one
    launch_source(rows, index, offsets, n_rows, c32, csq, s32, acc, mass) per row source (fresh rows, then bank
    rows); E returned in promote_types(x.dtype, codewords.dtype)."""
    B = x_offsets.shape[0] - 1
    K, D = codewords.shape
    out_dtype = torch.promote_types(x.dtype, codewords.dtype)
    c32, csq, s32 = prep_codewords(codewords, scale, hard)
    acc = torch.zeros((B, K, D), dtype=torch.float32, device=x.device)
    mass = torch.zeros((B, K), dtype=torch.float32, device=x.device)
    for rows, index, offsets, n_rows in row_sources(x.detach(), x_offsets, bank, bank_index, bank_offsets):
        launch_source(rows, index, offsets, n_rows, c32, csq, s32, acc, mass)
    return (acc if out_dtype == torch.float32 else acc.to(out_dtype)), mass


def backward_buffers(x, B: int, K: int, D: int, need_grad_x: bool):
    """residual_encode_bwd's outputs and accumulators: grad x (M, D) in x's dtype (zeros unless the kernels write
    it), and float32 hx (K, D) = sum h x, hsum (K), gsum (K) = grad scale, mass (B, K)."""
    dev = x.device
    gx = (torch.empty if need_grad_x else torch.zeros)((x.shape[0], D), dtype=x.dtype, device=dev)
    f32 = dict(dtype=torch.float32, device=dev)
    hx, hsum, gsum, mass = (torch.zeros(shape, **f32) for shape in ((K, D), (K,), (K,), (B, K)))
    return gx, hx, hsum, gsum, mass


def finish_codeword_grads(G, mass, hx, hsum, gsum, c32, s32, codewords, scale, hard, need_c, need_s):
    """grad c_k = -sum_b mass_bk G_bk (+ 2 s_k (hx_k - hsum_k c_k) for soft) and grad s = gsum, zeros where not
    needed, in the dtypes of codewords and scale."""
    grad_c = -torch.einsum("bk,bkd->kd", mass, G)
    if not hard:
        grad_c += (2.0 * s32)[:, None] * (hx - hsum[:, None] * c32)
    if not need_c:
        grad_c = torch.zeros_like(grad_c)
    grad_s = gsum if need_s else torch.zeros_like(gsum)
    return grad_c.to(codewords.dtype), grad_s.to(scale.dtype if scale is not None else codewords.dtype)


# ---------------------------------------------------------------------------------------------- contrastive_loss
def num_positives(labels, dtype=torch.float32):
    """n_i = |{j : label_j = label_i}| in `dtype`; None without labels (n_i = 1: the kernels take a null pointer)."""
    if labels is None:
        return None
    lab = labels.to(torch.int64)
    srt = torch.sort(lab).values
    n = torch.searchsorted(srt, lab, right=True) - torch.searchsorted(srt, lab, right=False)
    return n.to(dtype)
