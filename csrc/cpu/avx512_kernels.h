// AVX-512 float32 kernels for the residual_encode hot loops, chosen at run time (avx512::available()).
//
// Why: torch's CPU GEMM (MKL) takes its AVX2 code path on AMD CPUs, so on an AVX-512 machine a plain
// register-blocked AVX-512 kernel does the (rows x D) . (D x K) products at up to twice MKL's rate, and fusing the
// row-wise work (distances, softmax, argmin) next to it avoids the scalar loops. The kernels read the rows through
// an array of row pointers, so float32 bank rows are used in place instead of being gathered into a copy.
//
// This header includes no ATen and the .cpp compiles every function with a target attribute, so no AVX-512 code can
// leak into inline functions shared with the rest of the extension; callers must check available() first.
#pragma once

#include <cstdint>

namespace dre {
namespace cpu {
namespace avx512 {

// The CPU has AVX-512 F/BW/DQ/VL and DRE_NATIVE_NO_AVX512 is unset (set it to test the portable path).
bool available();

// Columns padded to a multiple of 16 floats (one zmm register).
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// S[i * lds + n] = sum_d rows[i][d] * Bp[d * ldb + n]   for i < r, n < np (np a multiple of 16).
// Bp holds B^T packed row-major (D x ldb); each rows[i] points at D contiguous floats. next[0:rn] (may be null):
// rows of the block to come, prefetched into the cache while this product runs.
void gemm_rows_bt(const float* const* rows, int64_t r, int64_t D, const float* Bp, int64_t ldb, int64_t np,
                  float* S, int64_t lds, const float* const* next = nullptr, int64_t rn = 0);

// E[k * lde + j] += sum_i A[i * lda + k] * rows[i][j]   for k < K, j < D.
void gemm_at_rows(const float* A, int64_t lda, const float* const* rows, int64_t r, int64_t K, int64_t D, float* E,
                  int64_t lde);

// sum_j x[j]^2
float sumsq(const float* x, int64_t D);

// Soft assignment of r rows (all row arrays padded to kp = pad16(K) columns, row stride lda; zeros in the padding
// of csq and s): with xsq_i = ||rows[i]||^2 and sc_i = S[i * lds : ...],
//   d_ik = max(xsq_i - 2 sc_ik + csq_k, 0) -> Dd,  a_ik = softmax_k(-s_k d_ik) -> A,  mass[k] += sum_i a_ik
// (mass may be null). A NaN anywhere in a row makes that row of A NaN (as torch.softmax). tmp: r floats.
void soft_rows(const float* const* rows, int64_t r, int64_t D, const float* S, int64_t lds, const float* csq,
               const float* s, int64_t K, float* A, float* Dd, int64_t lda, float* mass, float* tmp);

// kmin[i] = first argmin_k of csq_k - 2 S[i * lds + k], i < r (torch.argmin semantics: a NaN counts as the
// minimum). csq padded to pad16(K).
void hard_rows(const float* S, int64_t lds, int64_t r, const float* csq, int64_t K, int64_t* kmin);

// dst[j] += src[j] for j < D
void add_row(float* dst, const float* src, int64_t D);

// Soft backward of r rows (row arrays padded to kp = pad16(K), zeros in the padding of gc and s), with h_ik =
// H[i * ldh + k] = <x_i, G_bk>, m_i = argmax_k a_ik:
//   g_ik = h_ik - gc_k - g_im, ga_i = sum_k a_ik g_ik, u_ik = a_ik (g_ik - ga_i), w_ik = -s_k u_ik
//   W <- w; gs_k -= sum_i u_ik d_ik; ws_k += sum_i w_ik; wsum[i] = sum_k w_ik. gm: r floats of scratch.
void soft_bwd_rows(int64_t r, const float* A, const float* Dd, int64_t lda, const float* H, int64_t ldh,
                   const float* gc, const float* s, int64_t K, float* W, float* gs, float* ws, float* wsum,
                   float* gm);

// contrastive_loss: online log-sum-exp update from one tile of logits l_ij = L[i * ldl + j] (i < ni, j < nj):
//   rows:    m = max(rm_i, max_j l_ij),  rs_i <- rs_i e^{rm_i - m} + sum_j e^{l_ij - m},  rm_i <- m
//   columns: the same over i into (cm_j, cs_j).
// A row or column that is all -inf keeps sum 0 (its lse is -inf); a NaN logit makes its row's and column's sum NaN.
void lse_tile(const float* L, int64_t ni, int64_t nj, int64_t ldl, float* rm, float* rs, float* cm, float* cs);

// contrastive_loss backward: Z_ij = gr_i e^{L_ij - lr_i} + gc_j e^{L_ij - lc_j} (the dense part of dloss/dl_ij),
// written to Z[i * ldz + j].
void z_tile(const float* L, int64_t ni, int64_t nj, int64_t ldl, const float* gr, const float* lr, const float* gc,
            const float* lc, float* Z, int64_t ldz);

}  // namespace avx512
}  // namespace cpu
}  // namespace dre
