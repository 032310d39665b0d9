"""Host side of the `cupy` backend: the csrc/cuda kernels compiled at run time by CuPy (NVRTC), for installs without nvcc.

The .cu sources are the very ones the `native` extension compiles with nvcc (they include no headers at all, so
NVRTC needs nothing but their own directory). Each source file becomes one cupy.RawModule on first use, cached per
process (CuPy also caches the compiled binary on disk, ~/.cupy/kernel_cache). Kernels run on torch's current
stream (cupy.cuda.ExternalStream) on torch tensors through their data pointers; no data passes through CuPy arrays.

Where the sources are found (source_dir()): $DRE_KERNELS_CUDA_SRC if set; else dre_kernels/csrc_cuda, where
`pip install .` puts a copy (setup.py's build_py); else <checkout>/csrc/cuda (editable installs, source trees).

The host logic here (chunk maps, launch rules, finishing the gradients) mirrors csrc/cuda/ops_cuda.cpp line by line;
the launch rules are those written at the top of each .cu file. Tests run this module on CPU tensors against a CPU
emulation of the kernels (tests/cuda_emu) by swapping the runtime with set_runtime().
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from dre_kernels import _checks, _gpu_host
from dre_kernels.contrastive_loss import NORMALIZE_EPS
from dre_kernels._gpu_host import (backward_buffers, chunk_map, default_chunk_rows, encode_forward,  # noqa: F401
                                     finish_codeword_grads, next_pow2, num_positives,
                                     prep_codewords, row_sources)

NTHREADS = 256
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_FILES = {
    "dre_re_fwd": "residual_encode.cu",
    "dre_re_bwd_soft": "residual_encode.cu",
    "dre_re_fwd_tc": "residual_encode.cu",
    "dre_re_bwd_tc": "residual_encode.cu",
    "dre_re_fwd_tc_full": "residual_encode.cu",
    "dre_re_bwd_tc_full": "residual_encode.cu",
    "dre_cl_fwd": "contrastive_loss.cu",
    "dre_cl_finish": "contrastive_loss.cu",
    "dre_cl_norms": "contrastive_loss.cu",
    "dre_cl_bwd": "contrastive_loss.cu",
    "dre_cl_bwd_tc": "contrastive_loss.cu",
    "dre_cl_bwd_tc_wide": "contrastive_loss.cu",
    "dre_cl_normalize_bwd": "contrastive_loss.cu",
    "dre_bank_gather": "bank.cu",
    "dre_bank_update": "bank.cu",
}


def source_dir() -> str:
    """The directory holding the .cu/.cuh sources (see the module docstring)."""
    env = os.environ.get("DRE_KERNELS_CUDA_SRC")
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = ([env] if env else []) + [os.path.join(here, "csrc_cuda"),
                                           os.path.join(os.path.dirname(here), "csrc", "cuda")]
    for d in candidates:
        if os.path.isfile(os.path.join(d, "dre_common.cuh")):
            return d
    raise RuntimeError(f"dre_kernels: the CUDA sources (csrc/cuda/*.cu) were not found in any of {candidates}; "
                       "reinstall dre-kernels or set DRE_KERNELS_CUDA_SRC")


# ---------------------------------------------------------------------------------------------- runtime
class Ptr(int):
    """A device pointer argument (an int that the runtime passes as a pointer)."""


class I64(int):
    pass


class I32(int):
    pass


class F32(float):
    pass


class F64(float):
    pass


def ptr(t) -> Ptr:
    return Ptr(0 if t is None else t.data_ptr())


class CupyRuntime:
    """Compiles each .cu file once with cupy.RawModule and launches on torch's current stream."""

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _module(filename: str):
        import cupy

        src = source_dir()
        with open(os.path.join(src, filename)) as f:
            code = f.read()
        return cupy.RawModule(code=code, options=("-std=c++17", f"-I{src}"), backend="nvrtc")

    @staticmethod
    def tensor_cores(device) -> bool:
        """mma.sync bf16/fp16 needs compute capability >= 8.0; DRE_KERNELS_CUDA_TENSOR_CORES=0 turns it off."""
        if os.environ.get("DRE_KERNELS_CUDA_TENSOR_CORES", "1") == "0":
            return False
        return torch.cuda.get_device_capability(device) >= (8, 0)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def smem_optin(device) -> int:
        """The most dynamic shared memory a block may opt in to on this device (bytes)."""
        import cupy

        return int(cupy.cuda.Device(device.index).attributes["MaxSharedMemoryPerBlockOptin"])

    def launch(self, name, grid, smem, device, args):
        if grid == 0:
            return
        import cupy

        conv = {Ptr: np.uint64, I64: np.int64, I32: np.int32, F32: np.float32, F64: np.float64}
        packed = tuple(conv[type(a)](a) for a in args)
        with cupy.cuda.Device(device.index):
            fn = self._module(KERNEL_FILES[name]).get_function(name)
            if smem > SMEM_LIMIT:  # past 48 KB a kernel opts in (the launch rule checked the device's limit)
                fn.max_dynamic_shared_size_bytes = int(smem)
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
            with stream:
                fn((int(grid),), (NTHREADS,), packed, shared_mem=int(smem))


_runtime = None


def set_runtime(rt):
    """Swap the kernel runtime (tests: a CPU emulation); None restores CuPy. Returns the previous one."""
    global _runtime
    prev, _runtime = _runtime, rt
    return prev


def _get_runtime():
    global _runtime
    if _runtime is None:
        _runtime = CupyRuntime()
    return _runtime


def _launch(name, grid, smem, device, *args):
    _get_runtime().launch(name, grid, smem, device, args)


# ---------------------------------------------------------------------------------------------- checks
def _dt(t, name) -> I32:
    if t.dtype not in _DT:
        raise TypeError(f"dre cupy: {name} must be float16, bfloat16 or float32 on the GPU kernels; got {t.dtype}")
    return I32(_DT[t.dtype])


def _is64(t) -> I32:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"dre cupy: index tensors must be int32 or int64; got {t.dtype}")
    return I32(1 if t.dtype == torch.int64 else 0)


# Value checks (offsets, index ranges, duplicates): dre_kernels._checks.runtime_checks_*, shared with the triton
# backend; free after an eager wrapper's check (its cache), one synchronisation when called from a compiled graph.


# ---------------------------------------------------------------------------------------------- residual_encode
def re_config(K: int, D: int, backward: bool) -> tuple[int, int, int]:
    """(R rows per step, DO output columns per block, dynamic shared memory bytes) of the SIMT kernels: the rules
    of csrc/cuda/launch_rules.h (re_simt_config), which the native glue uses; tests/test_cuda.py compares them."""
    R = min(64, (2048 if backward else 4096) // K)
    DO = min(256, 8192 // K, D)
    if backward:
        floats = 5 * R + 3 * K + 2 * R * (K + 1) + max(R * 9 + 2 * K * 9, 4096)
    else:
        floats = 5 * R + 3 * K + R * (K + 1) + max(R * 17 + K * 17, 4096)
    return R, DO, 4 * floats


SMEM_LIMIT = 48 * 1024  # dynamic shared memory every launch may use without an opt-in


def re_tc_config(K: int, D: int, backward: bool):
    """(R, DO, DT, shared memory bytes) of the tensor-core kernels dre_re_fwd_tc / dre_re_bwd_tc, or None where
    they do not fit (backward with K > 128). The rules of csrc/cuda/launch_rules.h (re_tc_config)."""
    k8, k16 = -(-K // 8) * 8, -(-K // 16)
    DO = 8 * min(64 // k16, -(-D // 8))
    tiles = 16 if backward else 32  # distance accumulator tiles of 16 x 8 per block
    r_max = 16 * min(2 if backward else 4, tiles // (k8 // 8))
    for DT in (32, 16):
        for R in range(r_max, 15, -16):
            mats = 4 if backward else 2
            union = max(R * (DT + 8) + mats * k8 * (DT + 8), R * (DO + 8))  # 16-bit elements
            floats = 5 * R + 3 * K + (2 if backward else 1) * R * (K + 1) + -(-union // 2)
            if 4 * floats <= SMEM_LIMIT:
                return R, DO, DT, 4 * floats
    return None


def re_full_slice_cols(D: int) -> int:
    """Columns of C and G_b the full-width backward stages at a time (launch_rules.h re_full_slice_cols)."""
    return min(64, -(-D // 16) * 16)


def re_full_smem_bytes(K: int, D: int, R: int, nbuf: int, backward: bool = False) -> int:
    """Shared memory (bytes) of the full-width kernels dre_re_fwd_tc_full / dre_re_bwd_tc_full (launch_rules.h
    re_full_smem_bytes)."""
    k8, k16, ldd = -(-K // 8) * 8, -(-K // 16) * 16, -(-D // 16) * 16 + 8
    ldp, mats = (re_full_slice_cols(D) + 8, 4) if backward else (ldd, 2)
    floats = (2 if backward else 1) * R * (K + 1) + 2 * R + (3 if backward else 1) * K
    if backward:
        floats += 2 * k8 * re_full_slice_cols(D) + 2 * R  # the next slice of C and G_b (float32), row offsets
    return 2 * (mats * k8 * ldp + nbuf * R * ldd + 2 * k16 * (R + 8)) + 4 * floats


def re_tc_full_config(K: int, D: int, smem_optin: int, backward: bool = False):
    """(R rows per step, row buffers, shared memory bytes) of the full-width forward (or backward), or None where its
    K x D accumulator or its shared memory does not fit: csrc/cuda/launch_rules.h (re_tc_full_config)."""
    k8, nd = -(-K // 8), -(-D // 16)  # 8-codeword tiles, 16-column tiles
    dpw = -(-nd // 8)  # column tiles per warp
    if -(-dpw // 3) * 3 * k8 > 24:
        return None
    for nbuf in (2, 1):
        for R in range(64, 15, -16):
            smem = re_full_smem_bytes(K, D, R, nbuf, backward)
            if smem <= smem_optin:
                return R, nbuf, smem
    return None


def re_full_block_rows(n_rows: int, R: int, sms: int) -> int:
    """Rows per block of the full-width kernels, one block per SM: the source split evenly over the SMs in whole
    steps of R rows (launch_rules.h re_full_block_rows)."""
    per = -(-max(n_rows, 1) // sms)
    return -(-per // R) * R


def _full_spans(offsets, n_rows: int, R: int, device):
    """(int64 offsets, rows per block, grid) of a full-width launch over a source (ops_cuda.cpp full_spans)."""
    span = re_full_block_rows(n_rows, R, _gpu_host.num_sms(device))
    return offsets.to(torch.int64).contiguous(), span, -(-n_rows // span)


FULL_WIDTH_ENV = "DRE_KERNELS_CUDA_FULL_WIDTH"


def full_width_enabled() -> bool:
    """The full-width kernels (dre_re_fwd_tc_full, dre_re_bwd_tc_full, dre_cl_bwd_tc_wide) are on unless
    DRE_KERNELS_CUDA_FULL_WIDTH=0 (to time them against the tiled ones)."""
    return os.environ.get(FULL_WIDTH_ENV, "1").strip() not in ("0", "false", "off", "no")


def _vec_rows(rows, D: int) -> bool:
    """Rows the full-width kernel may copy 16 bytes at a time: contiguous 16-bit rows, 16-byte aligned."""
    return (rows.stride(1) == 1 and D % 8 == 0 and rows.stride(0) % 8 == 0 and rows.data_ptr() % 16 == 0)


def _simt_config(K: int, D: int, backward: bool):
    R, DO, smem = re_config(K, D, backward)
    return R, DO, None, smem


def _use_tensor_cores(rows, backward: bool = False) -> bool:
    """The tensor-core kernels take 16-bit rows, on devices the runtime says have them (compute capability >= 8.0).
    The backward only bfloat16 rows: its G and h operands, split into two parts of the rows' dtype, would lose their
    bits in float16 when gradients are small (below float16's normal range, 6e-5); bfloat16 has float32's range."""
    dtypes = (torch.bfloat16,) if backward else (torch.float16, torch.bfloat16)
    return rows.dtype in dtypes and _get_runtime().tensor_cores(rows.device)


def _re_checks(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard):
    K, D = codewords.shape
    if not 1 <= K <= 256 or not 1 <= D <= 4096 or x.shape[1] != D:
        raise ValueError(f"dre cupy: need 1 <= K <= 256, 1 <= D <= 4096 and x of width D; got codewords "
                         f"{tuple(codewords.shape)}, x {tuple(x.shape)}")
    _dt(x, "x")
    _dt(codewords, "codewords")
    if not hard:
        if scale is None or scale.shape != (K,):
            raise ValueError(f"dre cupy: scale must have shape (K,) = ({K},) for soft assignment")
        _dt(scale, "scale")
    _is64(x_offsets)
    if (bank is None) != (bank_index is None) or (bank is None) != (bank_offsets is None):
        raise ValueError("dre cupy: bank, bank_index and bank_offsets must be given together or not at all")
    if bank is not None:
        _dt(bank, "bank")
        if bank.dim() != 2 or bank.shape[1] != D:
            raise ValueError(f"dre cupy: bank must have shape (T, {D}); got {tuple(bank.shape)}")
        if bank_offsets.numel() != x_offsets.numel():
            raise ValueError("dre cupy: bank_offsets must have B+1 entries like x_offsets")
        _is64(bank_index)
        _is64(bank_offsets)
    _checks.runtime_checks_residual_encode(x, x_offsets, bank, bank_index, bank_offsets)


def _launch_re_fwd(rows, index, offsets, n_rows, c32, csq, s32, acc, mass, hard, with_e, G=None, gx=None):
    B = offsets.numel() - 1
    if B == 0 or n_rows == 0:
        return
    K, D = c32.shape
    gather = index is not None
    full = (re_tc_full_config(K, D, _get_runtime().smem_optin(rows.device))
            if with_e and G is None and full_width_enabled() and _use_tensor_cores(rows) else None)
    if full:
        R, nbuf, smem = full
        off, span, grid = _full_spans(offsets, n_rows, R, rows.device)
        _launch("dre_re_fwd_tc_full", grid, smem, rows.device,
                ptr(rows), _dt(rows, "rows"), I64(rows.stride(0)), I64(rows.stride(1)),
                ptr(index), _is64(index) if gather else I32(1), I32(int(gather)),
                ptr(off), I64(n_rows), ptr(c32), ptr(csq), ptr(s32), ptr(acc), ptr(mass),
                I64(B), I32(K), I32(D), I64(span), I32(int(hard)), I32(R), I32(nbuf), I32(int(_vec_rows(rows, D))))
        return
    chunk = default_chunk_rows(n_rows, rows.device)
    off, slide, cstart, slots = chunk_map(offsets, n_rows, chunk)
    tc = re_tc_config(K, D, backward=False) if _use_tensor_cores(rows) else None
    R, DO, DT, smem = tc if tc else _simt_config(K, D, backward=False)
    if not with_e:
        DO = 1 if tc is None else 8
    grid = slots * (-(-D // DO) if with_e else 1)
    _launch("dre_re_fwd_tc" if tc else "dre_re_fwd", grid, smem, rows.device,
            ptr(rows), _dt(rows, "rows"), I64(rows.stride(0)), I64(rows.stride(1)),
            ptr(index), _is64(index) if gather else I32(1), I32(int(gather)),
            ptr(off), ptr(slide), ptr(cstart), ptr(c32), ptr(csq), ptr(s32), ptr(acc), ptr(mass),
            ptr(G), ptr(gx), _dt(gx, "grad_x") if gx is not None else I32(0),
            I64(B), I32(K), I32(D), I64(chunk), I32(int(hard)), I32(int(with_e)), I32(R), I32(DO),
            *((I32(DT),) if tc else ()))


def residual_encode_fwd(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard):
    _re_checks(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard)
    return encode_forward(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard,
                          lambda *source: _launch_re_fwd(*source, hard, True))


def residual_encode_bwd(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass, hard,
                        need_grad_x, need_grad_codewords, need_grad_scale):
    _re_checks(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard)
    B = x_offsets.shape[0] - 1
    K, D = codewords.shape
    dev = x.device
    if tuple(grad_E.shape) != (B, K, D):
        raise ValueError(f"dre cupy: grad_E must have shape (B, K, D) = ({B}, {K}, {D}); got {tuple(grad_E.shape)}")
    need_s = bool(need_grad_scale) and not hard
    need_c = bool(need_grad_codewords) or need_s
    c32, csq, s32 = prep_codewords(codewords, scale, hard)
    G = grad_E.detach().float().contiguous()
    gx, hx, hsum, gsum, mass_acc = backward_buffers(x, B, K, D, bool(need_grad_x))
    gc = None if hard else torch.einsum("bkd,kd->bk", G, c32).contiguous()
    use_given_mass = hard and mass is not None
    if use_given_mass and tuple(mass.shape) != (B, K):
        raise ValueError(f"dre cupy: mass must have shape (B, K) = ({B}, {K}); got {tuple(mass.shape)}")
    for src, (rows, index, offsets, n_rows) in enumerate(row_sources(x.detach(), x_offsets, bank, bank_index,
                                                                  bank_offsets)):
        fresh = src == 0
        write_gx = fresh and bool(need_grad_x)
        acc_c = need_c and not use_given_mass
        if B == 0 or n_rows == 0 or not (write_gx or acc_c):
            continue
        if hard:
            # one argmin pass: writes grad x rows G_{b,k(i)} (fresh rows) and/or counts mass
            _launch_re_fwd(rows, index, offsets, n_rows, c32, csq, s32, None, mass_acc if acc_c else None, True,
                           False, G=G if write_gx else None, gx=gx if write_gx else None)
            continue
        gather = index is not None
        rows_args = (ptr(rows), _dt(rows, "rows"), I64(rows.stride(0)), I64(rows.stride(1)),
                     ptr(index), _is64(index) if gather else I32(1), I32(int(gather)))
        sum_args = (ptr(c32), ptr(csq), ptr(s32), ptr(G), ptr(gc), ptr(hx), ptr(hsum), ptr(gsum), ptr(mass_acc))
        use_tc = _use_tensor_cores(rows, backward=True)
        full = (re_tc_full_config(K, D, _get_runtime().smem_optin(dev), backward=True)
                if use_tc and not write_gx and full_width_enabled() else None)
        if full:  # a pass that only sums (the bank rows): rows read and distances computed once, all D columns
            R, nbuf, smem = full
            off, span, grid = _full_spans(offsets, n_rows, R, dev)
            _launch("dre_re_bwd_tc_full", grid, smem, dev, *rows_args, ptr(off), I64(n_rows), *sum_args, I64(B),
                    I32(K), I32(D), I64(span), I32(R), I32(nbuf), I32(int(_vec_rows(rows, D))),
                    I32(re_full_slice_cols(D)))
            continue
        chunk = default_chunk_rows(n_rows, dev)
        off, slide, cstart, slots = chunk_map(offsets, n_rows, chunk)
        source = (*rows_args, ptr(off), ptr(slide), ptr(cstart), *sum_args)
        tc = re_tc_config(K, D, backward=True) if use_tc else None
        R, DO, DT, smem = tc if tc else _simt_config(K, D, backward=True)
        _launch("dre_re_bwd_tc" if tc else "dre_re_bwd_soft", slots * -(-D // DO), smem, dev, *source,
                ptr(gx), _dt(gx, "grad_x"), I64(B), I32(K), I32(D), I64(chunk), I32(int(write_gx)),
                I32(int(acc_c)), I32(R), I32(DO), *((I32(DT),) if tc else ()))
    if use_given_mass:
        mass_acc = mass.float()
    grad_c, grad_s = finish_codeword_grads(G, mass_acc, hx, hsum, gsum, c32, s32, codewords, scale, hard, need_c,
                                           need_s)
    return gx, grad_c, grad_s


# ---------------------------------------------------------------------------------------------- contrastive
CL_BLOCK = 64
CL_PO_TC = 128  # the output tile's width in P of dre_cl_bwd_tc
CL_PO_WIDE = 4  # dre_cl_bwd_tc_wide's pieces of CL_PO_TC per block (used where P > CL_PO_TC)


def _cl_tensor_cores(a, b) -> I32:
    """1 where the logits go to the tensor cores (csrc/cuda/contrastive_loss.cu): both sides bfloat16 on a device
    that has them. float16 stays on the SIMT kernels (the backward's W, split into float16 parts, would flush)."""
    both_bf16 = a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    return I32(1 if both_bf16 and _get_runtime().tensor_cores(a.device) else 0)


def _labels(labels, B):
    if labels is None:
        return None, I32(1), I32(0)
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"dre cupy: labels must have shape (B,) = ({B},); got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"dre cupy: labels must be an integer tensor; got {labels.dtype}")
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    lab = labels.contiguous()
    return lab, _is64(lab), I32(1)


def _cl_inputs(a, b, logit_scale, normalize):
    """What both directions start from: a, b detached; the scale as a float32 (1,) tensor; dre_cl_norms's buffer
    (4B + 1 floats: 1/||.|| of a's rows (1 without normalize), then b's, the norms of a's and b's rows, and
    max_i ||u_i||) and its views inv a, ||a||, inv b, ||b||."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"dre cupy: a and b must have the same shape (B, P); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    _dt(a, "a")
    _dt(b, "b")
    if logit_scale.numel() != 1:
        raise ValueError(f"dre cupy: logit_scale must be a 0-dim tensor; got shape {tuple(logit_scale.shape)}")
    a, b = a.detach(), b.detach()
    s = logit_scale.detach().float().reshape(1).contiguous()
    B, P = a.shape
    norms = torch.zeros(4 * B + 1, dtype=torch.float32, device=a.device)
    if B:
        rows_per_block = NTHREADS // 32  # a warp per row
        _launch("dre_cl_norms", min(-(-2 * B // rows_per_block), _MAX_GRID), 0, a.device, ptr(a), _dt(a, "a"),
                I64(a.stride(0)), I64(a.stride(1)), ptr(b), _dt(b, "b"), I64(b.stride(0)), I64(b.stride(1)),
                ptr(norms), I64(B), I32(P), I32(int(normalize)), F32(NORMALIZE_EPS))
    inva, invb, na, nb = norms[:4 * B].view(4, B)
    return a, b, s, inva, na, invb, nb


def contrastive_loss_fwd(a, b, logit_scale, labels, normalize):
    a, b, s, inva, na, invb, nb = _cl_inputs(a, b, logit_scale, normalize)
    B, P = a.shape
    dev = a.device
    # the forward's per-row sums, which dre_cl_finish turns into the outputs in place
    rlse, rdiag, rpos, clse = (torch.empty(B, dtype=torch.float32, device=dev) for _ in range(4))
    cpos = torch.zeros(B, dtype=torch.float32, device=dev)
    if B == 0:
        return rdiag, rlse, clse, rpos, cpos
    csum = torch.zeros(B, dtype=torch.float64, device=dev)
    lab, lab64, has = _labels(labels, B)
    tc = _cl_tensor_cores(a, b)
    _launch("dre_cl_fwd", -(-B // CL_BLOCK), 0, dev,
            ptr(a), _dt(a, "a"), I64(a.stride(0)), I64(a.stride(1)), ptr(b), _dt(b, "b"), I64(b.stride(0)),
            I64(b.stride(1)), ptr(inva), ptr(invb), ptr(lab), lab64, has, ptr(s), ptr(nb), ptr(rlse), ptr(rdiag),
            ptr(rpos), ptr(csum), ptr(cpos), I64(B), I32(P), tc)
    npos = num_positives(labels)  # None without labels: |P_i| = 1
    _launch("dre_cl_finish", -(-B // CL_BLOCK), 0, dev,
            ptr(a), _dt(a, "a"), I64(a.stride(0)), I64(a.stride(1)), ptr(b), _dt(b, "b"), I64(b.stride(0)),
            I64(b.stride(1)), ptr(inva), ptr(invb), ptr(s), ptr(nb), ptr(csum), ptr(npos), ptr(rlse), ptr(rdiag),
            ptr(rpos), ptr(cpos), ptr(clse), I64(B), I32(P), tc)
    return rdiag, rlse, clse, rpos, cpos  # (loss, row_lse, col_lse, r, c)


def contrastive_loss_bwd(grad_loss, a, b, logit_scale, labels, normalize, row_lse, col_lse, row_loss, col_loss):
    a, b, s, inva, na, invb, nb = _cl_inputs(a, b, logit_scale, normalize)
    B, P = a.shape
    dev = a.device
    g = grad_loss.detach().float().reshape(-1).contiguous()
    if any(t.numel() != B for t in (g, row_lse, col_lse, row_loss, col_loss)):
        raise ValueError(f"dre cupy: grad_loss, row_lse, col_lse, row_loss and col_loss must have B = {B} entries")
    npos = num_positives(labels)  # None without labels: |P_i| = 1
    lab, lab64, has = _labels(labels, B)
    gu = torch.empty((B, P), dtype=torch.float32, device=dev)
    gv = torch.empty((B, P), dtype=torch.float32, device=dev)
    nrb = -(-B // CL_BLOCK)
    gs = torch.zeros(max(nrb, 1), dtype=torch.float32, device=dev)
    rl, cl = row_lse.detach().float().contiguous(), col_lse.detach().float().contiguous()
    rr, cr = row_loss.detach().float().contiguous(), col_loss.detach().float().contiguous()
    if B:
        tc = _cl_tensor_cores(a, b)
        wide = bool(tc) and P > CL_PO_TC and full_width_enabled()  # each logit tile once per 4 pieces of P
        grid = nrb * -(-P // ((CL_PO_TC * (CL_PO_WIDE if wide else 1)) if tc else CL_BLOCK))
        for x, y, invx, invy, lx, ly, rx, ry, out, with_gs in ((a, b, inva, invb, rl, cl, rr, cr, gu, 1),
                                                               (b, a, invb, inva, cl, rl, cr, rr, gv, 0)):
            args = (ptr(x), _dt(x, "a"), I64(x.stride(0)), I64(x.stride(1)), ptr(y), _dt(y, "b"), I64(y.stride(0)),
                    I64(y.stride(1)), ptr(invx), ptr(invy), ptr(lab), lab64, has, ptr(s), ptr(lx), ptr(ly), ptr(rx),
                    ptr(ry), ptr(g), ptr(npos), ptr(out), ptr(gs), I64(B), I32(P), I32(with_gs))
            if tc:
                _launch("dre_cl_bwd_tc_wide" if wide else "dre_cl_bwd_tc", grid, 0, dev, *args,
                        I32(1 - with_gs))  # x_is_b: the second call
            else:
                _launch("dre_cl_bwd", grid, 0, dev, *args)
    grad_a = _normalize_backward(gu, a, inva, na, normalize)
    grad_b = _normalize_backward(gv, b, invb, nb, normalize)
    return grad_a, grad_b, gs.sum().reshape(())


def _normalize_backward(gu, t, inv, norm, normalize):
    """grad t (t's dtype) from grad u through u = t / max(||t||, eps): dre_cl_normalize_bwd, a warp per row, in
    place over gu for float32 t."""
    if not normalize:
        return gu.to(t.dtype)
    B, P = t.shape
    out = gu if t.dtype == torch.float32 else torch.empty((B, P), dtype=t.dtype, device=t.device)
    if B and P:
        rows_per_block = NTHREADS // 32  # a warp per row
        _launch("dre_cl_normalize_bwd", min(-(-B // rows_per_block), _MAX_GRID), 0, t.device, ptr(gu), ptr(t),
                _dt(t, "a"), I64(t.stride(0)), I64(t.stride(1)), ptr(inv), ptr(norm), ptr(out), _dt(out, "a"), I64(B),
                I32(P), F32(NORMALIZE_EPS))
    return out


# ---------------------------------------------------------------------------------------------- bank
_MAX_GRID = 65535 * 16


def bank_gather(bank, index):
    if bank.dim() != 2:
        raise ValueError(f"dre cupy: bank must be 2-D; got shape {tuple(bank.shape)}")
    n, D = index.shape[0], bank.shape[1]
    _checks.runtime_checks_bank(bank, index, unique=False)
    out = torch.empty((n, D), dtype=bank.dtype, device=bank.device)
    if n == 0 or D == 0:
        return out
    idx = index.contiguous()
    _launch("dre_bank_gather", min(-(-n * D // NTHREADS), _MAX_GRID), 0, bank.device,
            ptr(bank), _dt(bank, "bank"), I64(bank.stride(0)), I64(bank.stride(1)), ptr(idx), _is64(idx), ptr(out),
            I64(n), I64(D))
    return out


def bank_update_(bank, index, values, momentum, normalize):
    n, D = index.shape[0], bank.shape[1]
    if values.dim() != 2 or tuple(values.shape) != (n, D):
        raise ValueError(f"dre cupy: values must have shape (len(index), D) = ({n}, {D}); got {tuple(values.shape)}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"dre cupy: momentum must be in [0, 1]; got {momentum}")
    _checks.runtime_checks_bank(bank, index, unique=True)
    if n == 0 or D == 0:
        return
    idx = index.contiguous()
    values = values.detach()
    _launch("dre_bank_update", min(n, _MAX_GRID), 0, bank.device,
            ptr(bank), _dt(bank, "bank"), I64(bank.stride(0)), I64(bank.stride(1)), ptr(idx), _is64(idx),
            ptr(values), _dt(values, "values"), I64(values.stride(0)), I64(values.stride(1)), I64(n), I32(D),
            F32(float(momentum)), F32(1.0 - float(momentum)), I32(int(bool(normalize))))


IMPLS = {
    "residual_encode_fwd": residual_encode_fwd,
    "residual_encode_bwd": residual_encode_bwd,
    "contrastive_loss_fwd": contrastive_loss_fwd,
    "contrastive_loss_bwd": contrastive_loss_bwd,
    "bank_gather": bank_gather,
    "bank_update_": bank_update_,
}


def register() -> None:
    """Define the dre::cupy_* operators (CUDA dispatch key only)."""
    from dre_kernels import _library

    _library.define_python_backend("cupy", IMPLS, dispatch_keys=("CUDA",))
