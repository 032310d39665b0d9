// Host launchers of the dre CUDA kernels: one per kernel, taking raw pointers, sizes, strides (in elements), dtype
// codes (dre_common.cuh: 0 float32, 1 float16, 2 bfloat16; index arrays: is64 = 0 int32, 1 int64), the grid and
// dynamic shared memory the launch rules of each .cu give, and the stream. They return cudaGetLastError().
// No torch here: the host glue (csrc/cuda/*.cpp) computes the launch rules and calls these.
#pragma once

#include <cuda_runtime_api.h>

namespace dre_cuda_launch {
typedef long long i64;

cudaError_t re_fwd(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r, i64 s_c,
                   const void* idx, int idx64, int gather, const i64* off, const i64* slide, const i64* cstart,
                   const float* C, const float* csq, const float* scale, float* acc_out, float* mass_out,
                   const float* G, void* gx, int gx_dt, i64 B, int K, int D, i64 chunk, int hard, int with_e, int R,
                   int DO);

cudaError_t re_bwd_soft(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                        i64 s_c, const void* idx, int idx64, int gather, const i64* off, const i64* slide,
                        const i64* cstart, const float* C, const float* csq, const float* scale, const float* G,
                        const float* gc, float* hx_out, float* hsum_out, float* gsum_out, float* mass_out, void* gx,
                        int gx_dt, i64 B, int K, int D, i64 chunk, int write_gx, int need_c, int R, int DO);

// the tensor-core variants (sm_80+, 16-bit rows): the same arguments and the distance step DT
cudaError_t re_fwd_tc(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                      i64 s_c, const void* idx, int idx64, int gather, const i64* off, const i64* slide,
                      const i64* cstart, const float* C, const float* csq, const float* scale, float* acc_out,
                      float* mass_out, const float* G, void* gx, int gx_dt, i64 B, int K, int D, i64 chunk, int hard,
                      int with_e, int R, int DO, int DT);

// the full-width kernels: the forward (E and mass only) and the soft backward's summing pass, each block `span` rows
// of the source (launch_rules.h re_full_block_rows) walked by slide segment through the CSR offsets; each sets the
// kernel's dynamic shared memory opt-in to smem
cudaError_t re_fwd_tc_full(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                           i64 s_c, const void* idx, int idx64, int gather, const i64* off, i64 n_rows, const float* C,
                           const float* csq, const float* scale, float* acc_out, float* mass_out, i64 B, int K, int D,
                           i64 span, int hard, int R, int nbuf, int vec);

cudaError_t re_bwd_tc_full(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                           i64 s_c, const void* idx, int idx64, int gather, const i64* off, i64 n_rows, const float* C,
                           const float* csq, const float* scale, const float* G, const float* gc, float* hx_out,
                           float* hsum_out, float* gsum_out, float* mass_out, i64 B, int K, int D, i64 span, int R,
                           int nbuf, int vec, int DTS);

cudaError_t re_bwd_tc(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                      i64 s_c, const void* idx, int idx64, int gather, const i64* off, const i64* slide,
                      const i64* cstart, const float* C, const float* csq, const float* scale, const float* G,
                      const float* gc, float* hx_out, float* hsum_out, float* gsum_out, float* mass_out, void* gx,
                      int gx_dt, i64 B, int K, int D, i64 chunk, int write_gx, int need_c, int R, int DO, int DT);

// the rows' inverse norms and norms of a then b, and max_i ||u_i||, into norms (4B + 1 floats, zeroed): dre_cl_norms
cudaError_t cl_norms(unsigned grid, cudaStream_t stream, const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* b,
                     int b_dt, i64 s_br, i64 s_bc, float* norms, i64 B, int P, int normalize, float eps);

// bound: the norms of b in cl_norms's buffer, followed by max_i ||u_i|| (see cl_ref)
cudaError_t cl_fwd(unsigned grid, cudaStream_t stream, const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* b,
                   int b_dt, i64 s_br, i64 s_bc, const float* inva, const float* invb, const void* labels, int lab64,
                   int has_labels, const float* scale, const float* bound, float* rlse, float* rdiag, float* rpos,
                   double* csum, float* cpos, i64 B, int P, int tc);

// the column log-sum-exps and the loss arithmetic after cl_fwd, in place (see dre_cl_finish); npos null: no labels
cudaError_t cl_finish(unsigned grid, cudaStream_t stream, const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* b,
                      int b_dt, i64 s_br, i64 s_bc, const float* inva, const float* invb, const float* scale,
                      const float* bound, const double* csum, const float* npos, float* rlse, float* rdiag, float* rpos,
                      float* cpos, float* clse, i64 B, int P, int tc);

cudaError_t cl_bwd(unsigned grid, cudaStream_t stream, const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y,
                   int y_dt, i64 s_yr, i64 s_yc, const float* invx, const float* invy, const void* labels, int lab64,
                   int has_labels, const float* scale, const float* lx, const float* ly, const float* rx,
                   const float* ry, const float* g, const float* npos, float* gu, float* gs_out, i64 B, int P,
                   int with_gs);

// the tensor-core backward (sm_80+, both sides bfloat16); x_is_b: the call for grad b (x = b, y = a); wide:
// dre_cl_bwd_tc_wide (CL_PO_WIDE pieces of P per block; grid ceil(B / 64) * ceil(P / 512)), else dre_cl_bwd_tc
cudaError_t cl_bwd_tc(unsigned grid, cudaStream_t stream, const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y,
                      int y_dt, i64 s_yr, i64 s_yc, const float* invx, const float* invy, const void* labels,
                      int lab64, int has_labels, const float* scale, const float* lx, const float* ly,
                      const float* rx, const float* ry, const float* g, const float* npos, float* gu, float* gs_out,
                      i64 B, int P, int with_gs, int x_is_b, int wide);

// grad a (in out_dt; out may be gu) from grad u through u = a / max(||a||, eps): a warp per row
cudaError_t cl_normalize_bwd(unsigned grid, cudaStream_t stream, const float* gu, const void* t, int t_dt, i64 s_tr,
                             i64 s_tc, const float* inv, const float* norm, void* out, int out_dt, i64 B, int P,
                             float eps);

cudaError_t bank_gather(unsigned grid, cudaStream_t stream, const void* bank, int dt, i64 s0, i64 s1, const void* idx,
                        int idx64, void* out, i64 n, i64 D);

cudaError_t bank_update(unsigned grid, cudaStream_t stream, void* bank, int dt, i64 s0, i64 s1, const void* idx,
                        int idx64, const void* values, int v_dt, i64 v0, i64 v1, i64 n, int D, float momentum,
                        float keep, int normalize);
}  // namespace dre_cuda_launch
