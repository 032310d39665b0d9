// Launch rules of the residual_encode kernels (residual_encode.cu says why they are what they are): rows per step,
// output columns per block, distance step and shared memory of the SIMT and tensor-core kernels, and the rows per
// chunk that split long slides across blocks. Plain C++ (no torch, no CUDA), used by the host glue ops_cuda.cpp.
//
// dre_kernels/cupy_kernels.py (re_config, re_tc_config) and dre_kernels/_gpu_host.py (default_chunk_rows) hold the
// same rules for the cupy backend; tests/test_cuda.py compiles this header on the host and compares the two for
// every K and a sweep of D, so a change to one side that misses the other fails on the CPU.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dre_cuda_rules {

inline int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// ~4 chunks per SM over a source, 64..8192 rows each (a power of two): a long slide spreads over the GPU, and a
// small source over more than a few SMs (the floor is one step of R <= 64 rows; _gpu_host.py says why not 256)
inline int64_t chunk_rows(int64_t n_rows, int64_t num_sms) {
  const int64_t target = 4 * num_sms;
  const int64_t per = (std::max<int64_t>(n_rows, 1) + target - 1) / target;
  return std::min<int64_t>(8192, std::max<int64_t>(64, next_pow2(per)));
}

// Rows per block of the full-width kernels (dre_re_fwd_tc_full, dre_re_bwd_tc_full), which take one block per SM
// (their registers): the source's rows split evenly over the SMs in whole steps of R rows, at least one step, each
// block's span walked by slide segment
inline int64_t re_full_block_rows(int64_t n_rows, int R, int64_t num_sms) {
  const int64_t per = (std::max<int64_t>(n_rows, 1) + num_sms - 1) / num_sms;
  return (per + R - 1) / R * R;
}

// R rows per step, DO output columns per block, DT columns per distance step (0: the SIMT kernels), dynamic shared
// memory in bytes
struct ReConfig {
  int R = 0, DO = 0, DT = 0;
  unsigned smem = 0;
};

// the SIMT kernels dre_re_fwd / dre_re_bwd_soft
inline ReConfig re_simt_config(int K, int D, bool backward) {
  ReConfig c;
  c.R = std::min(64, (backward ? 2048 : 4096) / K);
  c.DO = std::min(std::min(256, 8192 / K), D);
  const int R = c.R;
  const int floats = backward ? 5 * R + 3 * K + 2 * R * (K + 1) + std::max(R * 9 + 2 * K * 9, 4096)
                              : 5 * R + 3 * K + R * (K + 1) + std::max(R * 17 + K * 17, 4096);
  c.smem = 4u * static_cast<unsigned>(floats);
  return c;
}

// The tensor-core kernels dre_re_fwd_tc / dre_re_bwd_tc: DO output columns with ceil(K/16) DO/8 <= 64 accumulator
// tiles, R rows with (R/16) ceil(K/8) <= 32 (forward) or 16 (backward) distance tiles, DT = 32 or 16 columns per
// distance step; the largest R, DT whose shared memory fits 48 KB, else none (DT = 0: the SIMT kernels run).
inline ReConfig re_tc_config(int K, int D, bool backward) {
  const int k8 = (K + 7) / 8 * 8, k16 = (K + 15) / 16;
  const int DO = 8 * std::min(64 / k16, (D + 7) / 8);
  const int tiles = backward ? 16 : 32;
  const int r_max = 16 * std::min(backward ? 2 : 4, tiles / (k8 / 8));
  for (int DT : {32, 16}) {
    for (int R = r_max; R >= 16; R -= 16) {
      const int mats = backward ? 4 : 2;
      const int un = std::max(R * (DT + 8) + mats * k8 * (DT + 8), R * (DO + 8));
      const int floats = 5 * R + 3 * K + (backward ? 2 : 1) * R * (K + 1) + (un + 1) / 2;
      if (4 * floats <= 48 * 1024) {
        ReConfig c;
        c.R = R;
        c.DO = DO;
        c.DT = DT;
        c.smem = 4u * static_cast<unsigned>(floats);
        return c;
      }
    }
  }
  return ReConfig();
}

// The full-width kernels dre_re_fwd_tc_full and dre_re_bwd_tc_full (residual_encode.cu): their shared memory in bytes
// for R rows per step and nbuf row buffers (the backward stages C and G_b re_full_slice_cols columns at a time, as
// 16-bit parts and, the next slice, in float32), and
// their rule: 24 accumulator slots per warp hold the K x D accumulator in registers (each warp ceil(D/128) 16-column
// tiles, in chunks of 3, times ceil(K/8) 8-codeword tiles: ceil(ceil(D/128) / 3) 3 ceil(K/8) <= 24, so K <= 64), R a
// multiple of 16 up to 64 (the distance tiles' groups, ReFullDotTiles, then fill at most the 8 warps); the largest R
// with two row buffers whose shared memory fits smem_optin (the device's opt-in limit per block), else the largest
// with one; none (R = 0) where nothing fits.
inline int re_full_slice_cols(int D) { return std::min(64, (D + 15) / 16 * 16); }

inline unsigned re_full_smem_bytes(int K, int D, int R, int nbuf, bool backward = false) {
  const int k8 = (K + 7) / 8 * 8, k16 = (K + 15) / 16 * 16, ldd = (D + 15) / 16 * 16 + 8, ldr = R + 8;
  const int ldp = backward ? re_full_slice_cols(D) + 8 : ldd, mats = backward ? 4 : 2;
  const int floats = (backward ? 2 : 1) * R * (K + 1) + 2 * R + (backward ? 3 : 1) * K +
                     (backward ? 2 * k8 * re_full_slice_cols(D) + 2 * R : 0);  // next slice of C, G_b; row offsets
  return static_cast<unsigned>(2 * (mats * k8 * ldp + nbuf * R * ldd + 2 * k16 * ldr) + 4 * floats);
}

struct ReFullConfig {
  int R = 0, nbuf = 0, DTS = 0;
  unsigned smem = 0;
};

inline ReFullConfig re_tc_full_config(int K, int D, int64_t smem_optin, bool backward = false) {
  ReFullConfig c;
  const int k8 = (K + 7) / 8, dpw = ((D + 15) / 16 + 7) / 8;
  if ((dpw + 2) / 3 * 3 * k8 > 24) return c;
  for (int nbuf : {2, 1}) {
    for (int R = 64; R >= 16; R -= 16) {
      if (re_full_smem_bytes(K, D, R, nbuf, backward) <= smem_optin) {
        c.R = R;
        c.nbuf = nbuf;
        c.DTS = backward ? re_full_slice_cols(D) : 0;
        c.smem = re_full_smem_bytes(K, D, R, nbuf, backward);
        return c;
      }
    }
  }
  return c;
}

}  // namespace dre_cuda_rules
