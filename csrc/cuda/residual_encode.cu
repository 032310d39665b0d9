// dre residual_encode on CUDA: forward, soft backward, and the argmin pass shared by the hard forward/backward.
//
//   S_b  = fresh rows of slide b and bank[bank_index[bank_offsets[b]:bank_offsets[b+1]]]
//   d_ik = ||x_i||^2 - 2 <x_i, c_k> + ||c_k||^2 (clamped at 0)   soft: a_ik = softmax_k(-s_k d_ik)
//   hard: a_ik = [k = first argmin_j d_ij]          E_bk = sum_i a_ik x_i - mass_bk c_k,  mass_bk = sum_i a_ik
//
// Work split (the Triton kernels' algorithm): each source of rows (fresh rows x, then gathered bank rows) is cut into
// chunks of at most `chunk` rows that never cross a slide; the host builds the chunk map (off, slide, cstart) with a
// few torch ops, no synchronisation. Block (c, t) owns chunk c and the output column tile t (DO columns) and walks
// its rows R at a time: (1) distances over all of D in DT-wide shared tiles (R x K pairs, 16 per thread, SIMT
// float32 FMA), (2) softmax or argmin per row (one warp per row), (3) a^T x for its column tile into a K x DO register
// accumulator (32 elements per thread). At the end one atomicAdd per accumulator element adds the block's partial
// E_b (and mass) into a float32 (B, K, D) buffer: long slides are split across blocks (split-and-atomics), so
// results are not bitwise reproducible when a slide spans blocks. Nothing of size rows x K or rows x D reaches memory.
//
// Soft backward (recomputing a; nothing of the forward is saved), G = dL/dE, g_ik = <G_bk, x_i - c_k>,
// h_ik = a_ik (g_ik - sum_j a_ij g_ij):
//   grad x_i = sum_k a_ik G_bk + 2 sum_k s_k h_ik (c_k - x_i)              (fresh rows only)
//   grad c_k = -sum_b mass_bk G_bk + 2 s_k (sum_i h_ik x_i - c_k sum_i h_ik)   grad s_k = -sum_i h_ik d_ik
// The kernel adds hx = sum_i h_ik x_i, hsum, gs = -sum_i h_ik d_ik and mass atomically; the host finishes grad c.
// Hard backward: grad x_i = G_{b,k(i)} (dre_re_fwd with G given writes it), grad c from the forward's mass.
//
// Launch rules (mirrored by the host launchers below and by dre_kernels/cupy_backend.py): 256 threads;
//   forward:  R = min(64, 4096 / K) rows per step, DO = min(256, 8192 / K, D), grid = slots * ceil(D / DO)
//             (slots only, DO = 1, without E), shared floats re_fwd_smem_floats(R, K)
//   backward: R = min(64, 2048 / K), the same DO, grid = slots * ceil(D / DO), shared re_bwd_smem_floats(R, K)
#include "dre_common.cuh"

namespace dre_cuda {

enum { RE_PPT = 16, RE_EPT = 32, RE_XO = 4096, RE_DT_FWD = 16, RE_DT_BWD = 8 };

DRE_DEVICE int imin(int a, int b) { return a < b ? a : b; }
DRE_DEVICE i64 lmin(i64 a, i64 b) { return a < b ? a : b; }

// shared memory layout (floats): roff (2R, int64) | kmin (R, int) | xsq (R) | shr (R) | msum, hsum, gsum (3K) |
// A (R(K+1)) [| H (R(K+1)) backward] | union{ xs (R(DT+1)) + cs (K(DT+1)) [+ gs (K(DT+1))], xo (RE_XO) }
DRE_DEVICE int re_phase1_floats(int R, int K, int DT, int nmat) { return R * (DT + 1) + nmat * K * (DT + 1); }

}  // namespace dre_cuda

using namespace dre_cuda;

// Forward over one source of rows. With E (with_e): adds partial E into acc (B, K, D) float32, and mass (B, K).
// Without E: the argmin/assignment pass only (mass). With G (hard only): writes grad x rows gx[i] = G_{b, k(i)}.
DRE_GLOBAL void dre_re_fwd(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx, int idx64, int gather,
                           const i64* off, const i64* slide, const i64* cstart, const float* C, const float* csq,
                           const float* scale, float* acc_out, float* mass_out, const float* G, void* gx, int gx_dt,
                           i64 B, int K, int D, i64 chunk, int hard, int with_e, int R, int DO) {
  DRE_DYN_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ndt = with_e ? (D + DO - 1) / DO : 1;
  const i64 pid = blockIdx.x;
  const i64 pid_c = pid / ndt;
  const int pid_d = (int)(pid % ndt);
  const i64 b = slide[pid_c];
  if (b >= B) return;
  const i64 lo = off[b] + (pid_c - cstart[b]) * chunk;
  const i64 hi = lmin(off[b + 1], lo + chunk);
  if (lo >= hi) return;
  const int DT = RE_DT_FWD;
  const int d0 = pid_d * DO;
  const int dn = with_e ? imin(DO, D - d0) : 0;
  const int RS = RE_XO / (DO > 0 ? DO : 1);

  i64* roff = (i64*)smem;
  int* kmin = (int*)(smem + 2 * R);
  float* xsq = smem + 3 * R;
  float* msum = smem + 5 * R;
  float* A = msum + 3 * K;
  float* xs = A + R * (K + 1);
  float* cs = xs + R * (DT + 1);
  float* xo = xs;

  float acc[RE_EPT];
#pragma unroll
  for (int j = 0; j < RE_EPT; ++j) acc[j] = 0.f;
  for (int k = tid; k < K; k += NTHREADS) msum[k] = 0.f;
  __syncthreads();

  for (i64 r0 = lo; r0 < hi; r0 += R) {
    const int nr = (int)lmin((i64)R, hi - r0);
    for (int r = tid; r < R; r += NTHREADS) {
      roff[r] = r < nr ? (gather ? load_index(idx, r0 + r, idx64) : r0 + r) * s_r : 0;
      xsq[r] = 0.f;
    }
    __syncthreads();
    // (1) distances
    float dot[RE_PPT];
#pragma unroll
    for (int j = 0; j < RE_PPT; ++j) dot[j] = 0.f;
    for (int dd = 0; dd < D; dd += DT) {
      for (int e = tid; e < R * DT; e += NTHREADS) {
        const int r = e / DT, d = e % DT;
        xs[r * (DT + 1) + d] = (r < nr && dd + d < D) ? load_f(rows, roff[r] + (i64)(dd + d) * s_c, rows_dt) : 0.f;
      }
      for (int e = tid; e < K * DT; e += NTHREADS) {
        const int k = e / DT, d = e % DT;
        cs[k * (DT + 1) + d] = dd + d < D ? C[(i64)k * D + dd + d] : 0.f;
      }
      __syncthreads();
      if (!hard && tid < R) {
        float s = 0.f;
        for (int d = 0; d < DT; ++d) s += xs[tid * (DT + 1) + d] * xs[tid * (DT + 1) + d];
        xsq[tid] += s;
      }
#pragma unroll
      for (int j = 0; j < RE_PPT; ++j) {
        const int p = tid + NTHREADS * j;
        if (p < R * K) {
          const float* xr = xs + (p / K) * (DT + 1);
          const float* cr = cs + (p % K) * (DT + 1);
          float s = dot[j];
          for (int d = 0; d < DT; ++d) s += xr[d] * cr[d];
          dot[j] = s;
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < RE_PPT; ++j) {
      const int p = tid + NTHREADS * j;
      if (p < R * K) {
        const int r = p / K, k = p % K;
        float v;
        if (hard) {
          v = csq[k] - 2.f * dot[j];  // argmin needs no ||x||^2 and no clamp
        } else {
          v = xsq[r] - 2.f * dot[j] + csq[k];
          v = v < 0.f ? 0.f : v;  // NaN stays NaN
        }
        A[r * (K + 1) + k] = v;
      }
    }
    __syncthreads();
    // (2) assignments, one warp per row; rows past nr become zeros
    for (int r = warp; r < R; r += NTHREADS / 32) {
      float* ar = A + r * (K + 1);
      if (r >= nr) {
        for (int k = lane; k < K; k += 32) ar[k] = 0.f;
        continue;
      }
      if (hard) {
        float bv = f_inf();
        int bk = K;
        for (int k = lane; k < K; k += 32)
          if (argmin_better(ar[k], k, bv, bk)) {
            bv = ar[k];
            bk = k;
          }
        warp_argmin(bv, bk);
        for (int k = lane; k < K; k += 32) ar[k] = k == bk ? 1.f : 0.f;
        if (lane == 0) kmin[r] = bk;
      } else {
        float m = -f_inf();
        for (int k = lane; k < K; k += 32) m = fmaxf(m, -scale[k] * ar[k]);
        m = warp_max(m);
        float sum = 0.f;
        for (int k = lane; k < K; k += 32) {
          const float e = expf(-scale[k] * ar[k] - m);
          ar[k] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        const float inv = 1.f / sum;
        for (int k = lane; k < K; k += 32) ar[k] *= inv;
      }
    }
    __syncthreads();
    for (int k = tid; k < K; k += NTHREADS) {
      float s = 0.f;
      for (int r = 0; r < nr; ++r) s += A[r * (K + 1) + k];
      msum[k] += s;
    }
    // hard backward: grad x rows are rows of G (fresh rows: the row index is the position itself)
    if (G != 0) {
      for (i64 e = tid; e < (i64)nr * D; e += NTHREADS) {
        const int r = (int)(e / D), d = (int)(e % D);
        store_f(gx, (r0 + r) * D + d, G[((i64)b * K + kmin[r]) * D + d], gx_dt);
      }
    }
    // (3) aggregation a^T x over this block's column tile
    if (with_e) {
      for (int rs = 0; rs < nr; rs += RS) {
        const int ns = imin(RS, nr - rs);
        __syncthreads();  // xo aliases the distance tiles
        for (int e = tid; e < ns * DO; e += NTHREADS) {
          const int r = e / DO, d = e % DO;
          xo[e] = d < dn ? load_f(rows, roff[rs + r] + (i64)(d0 + d) * s_c, rows_dt) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < RE_EPT; ++j) {
          const int e = tid + NTHREADS * j;
          if (e < K * DO) {
            const int k = e / DO, d = e % DO;
            float s = acc[j];
            for (int r = 0; r < ns; ++r) s += A[(rs + r) * (K + 1) + k] * xo[r * DO + d];
            acc[j] = s;
          }
        }
      }
    }
    __syncthreads();
  }
  if (with_e) {
#pragma unroll
    for (int j = 0; j < RE_EPT; ++j) {
      const int e = tid + NTHREADS * j;
      if (e < K * DO) {
        const int k = e / DO, d = e % DO;
        if (d < dn) {
          const i64 o = (i64)k * D + d0 + d;
          atomicAdd(acc_out + (i64)b * K * D + o, acc[j] - msum[k] * C[o]);
        }
      }
    }
  }
  if (pid_d == 0 && mass_out != 0)
    for (int k = tid; k < K; k += NTHREADS) atomicAdd(mass_out + b * K + k, msum[k]);
}

// Soft backward over one source of rows (see the header comment). G (B, K, D) and gc (B, K) = <G_bk, c_k> float32;
// hx (K, D), hsum (K), gsum (K), mass (B, K) float32 accumulators; gx (M, D) contiguous in gx_dt (fresh rows only).
DRE_GLOBAL void dre_re_bwd_soft(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx, int idx64,
                                int gather, const i64* off, const i64* slide, const i64* cstart, const float* C,
                                const float* csq, const float* scale, const float* G, const float* gc, float* hx_out,
                                float* hsum_out, float* gsum_out, float* mass_out, void* gx, int gx_dt, i64 B, int K,
                                int D, i64 chunk, int write_gx, int need_c, int R, int DO) {
  DRE_DYN_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ndt = (D + DO - 1) / DO;
  const i64 pid = blockIdx.x;
  const i64 pid_c = pid / ndt;
  const int pid_d = (int)(pid % ndt);
  const i64 b = slide[pid_c];
  if (b >= B) return;
  const i64 lo = off[b] + (pid_c - cstart[b]) * chunk;
  const i64 hi = lmin(off[b + 1], lo + chunk);
  if (lo >= hi) return;
  const int DT = RE_DT_BWD;
  const int d0 = pid_d * DO;
  const int dn = imin(DO, D - d0);
  const int RS = RE_XO / DO;
  const float* Gb = G + (i64)b * K * D;

  i64* roff = (i64*)smem;
  float* xsq = smem + 3 * R;
  float* shr = smem + 4 * R;  // sum_k s_k h_ik per row
  float* msum = smem + 5 * R;
  float* hsum = msum + K;
  float* gsum = hsum + K;
  float* A = gsum + K;
  float* H = A + R * (K + 1);
  float* xs = H + R * (K + 1);
  float* cs = xs + R * (DT + 1);
  float* gs = cs + K * (DT + 1);
  float* xo = xs;

  float acc[RE_EPT];
#pragma unroll
  for (int j = 0; j < RE_EPT; ++j) acc[j] = 0.f;
  for (int k = tid; k < K; k += NTHREADS) msum[k] = hsum[k] = gsum[k] = 0.f;
  __syncthreads();

  for (i64 r0 = lo; r0 < hi; r0 += R) {
    const int nr = (int)lmin((i64)R, hi - r0);
    for (int r = tid; r < R; r += NTHREADS) {
      roff[r] = r < nr ? (gather ? load_index(idx, r0 + r, idx64) : r0 + r) * s_r : 0;
      xsq[r] = 0.f;
    }
    __syncthreads();
    float dot[RE_PPT], dotg[RE_PPT];
#pragma unroll
    for (int j = 0; j < RE_PPT; ++j) dot[j] = dotg[j] = 0.f;
    for (int dd = 0; dd < D; dd += DT) {
      for (int e = tid; e < R * DT; e += NTHREADS) {
        const int r = e / DT, d = e % DT;
        xs[r * (DT + 1) + d] = (r < nr && dd + d < D) ? load_f(rows, roff[r] + (i64)(dd + d) * s_c, rows_dt) : 0.f;
      }
      for (int e = tid; e < K * DT; e += NTHREADS) {
        const int k = e / DT, d = e % DT;
        const bool in = dd + d < D;
        cs[k * (DT + 1) + d] = in ? C[(i64)k * D + dd + d] : 0.f;
        gs[k * (DT + 1) + d] = in ? Gb[(i64)k * D + dd + d] : 0.f;
      }
      __syncthreads();
      if (tid < R) {
        float s = 0.f;
        for (int d = 0; d < DT; ++d) s += xs[tid * (DT + 1) + d] * xs[tid * (DT + 1) + d];
        xsq[tid] += s;
      }
#pragma unroll
      for (int j = 0; j < RE_PPT; ++j) {
        const int p = tid + NTHREADS * j;
        if (p < R * K) {
          const float* xr = xs + (p / K) * (DT + 1);
          const float* cr = cs + (p % K) * (DT + 1);
          const float* gr = gs + (p % K) * (DT + 1);
          float s = dot[j], t = dotg[j];
          for (int d = 0; d < DT; ++d) {
            s += xr[d] * cr[d];
            t += xr[d] * gr[d];
          }
          dot[j] = s;
          dotg[j] = t;
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < RE_PPT; ++j) {
      const int p = tid + NTHREADS * j;
      if (p < R * K) {
        const int r = p / K, k = p % K;
        const float v = xsq[r] - 2.f * dot[j] + csq[k];
        A[r * (K + 1) + k] = v < 0.f ? 0.f : v;
        H[r * (K + 1) + k] = dotg[j] - gc[b * K + k];  // g_rk
      }
    }
    __syncthreads();
    // per row: a (softmax), h = a (g - <a, g>); mass, hsum and gsum by shared atomics; shr_r = sum_k s_k h_rk
    for (int r = warp; r < R; r += NTHREADS / 32) {
      float* ar = A + r * (K + 1);
      float* hr = H + r * (K + 1);
      if (r >= nr) {
        for (int k = lane; k < K; k += 32) ar[k] = hr[k] = 0.f;
        if (lane == 0) shr[r] = 0.f;
        continue;
      }
      float m = -f_inf();
      for (int k = lane; k < K; k += 32) m = fmaxf(m, -scale[k] * ar[k]);
      m = warp_max(m);
      float sum = 0.f;
      for (int k = lane; k < K; k += 32) sum += expf(-scale[k] * ar[k] - m);
      sum = warp_sum(sum);
      const float inv = 1.f / sum;
      float ag = 0.f;
      for (int k = lane; k < K; k += 32) ag += expf(-scale[k] * ar[k] - m) * inv * hr[k];
      ag = warp_sum(ag);
      float sh = 0.f;
      for (int k = lane; k < K; k += 32) {
        const float dist = ar[k];
        const float a = expf(-scale[k] * dist - m) * inv;
        const float h = a * (hr[k] - ag);
        ar[k] = a;
        hr[k] = h;
        sh += scale[k] * h;
        if (need_c && pid_d == 0) {
          atomicAdd(msum + k, a);
          atomicAdd(hsum + k, h);
          atomicAdd(gsum + k, -h * dist);
        }
      }
      sh = warp_sum(sh);
      if (lane == 0) shr[r] = sh;
    }
    for (int rs = 0; rs < nr; rs += RS) {
      const int ns = imin(RS, nr - rs);
      __syncthreads();  // xo aliases the distance tiles; A, H, shr complete
      for (int e = tid; e < ns * DO; e += NTHREADS) {
        const int r = e / DO, d = e % DO;
        xo[e] = d < dn ? load_f(rows, roff[rs + r] + (i64)(d0 + d) * s_c, rows_dt) : 0.f;
      }
      __syncthreads();
      if (need_c) {
#pragma unroll
        for (int j = 0; j < RE_EPT; ++j) {
          const int e = tid + NTHREADS * j;
          if (e < K * DO) {
            const int k = e / DO, d = e % DO;
            float s = acc[j];
            for (int r = 0; r < ns; ++r) s += H[(rs + r) * (K + 1) + k] * xo[r * DO + d];
            acc[j] = s;
          }
        }
      }
      if (write_gx) {
        for (int e = tid; e < ns * DO; e += NTHREADS) {
          const int r = e / DO, d = e % DO;
          if (d >= dn) continue;
          const float* ar = A + (rs + r) * (K + 1);
          const float* hr = H + (rs + r) * (K + 1);
          float v = 0.f;
          for (int k = 0; k < K; ++k) {
            const i64 o = (i64)k * D + d0 + d;
            v += ar[k] * Gb[o] + 2.f * scale[k] * hr[k] * C[o];
          }
          v -= 2.f * shr[rs + r] * xo[e];
          store_f(gx, (r0 + rs + r) * D + d0 + d, v, gx_dt);
        }
      }
    }
    __syncthreads();
  }
  if (need_c) {
#pragma unroll
    for (int j = 0; j < RE_EPT; ++j) {
      const int e = tid + NTHREADS * j;
      if (e < K * DO) {
        const int k = e / DO, d = e % DO;
        if (d < dn) atomicAdd(hx_out + (i64)k * D + d0 + d, acc[j]);
      }
    }
    if (pid_d == 0) {
      for (int k = tid; k < K; k += NTHREADS) {
        atomicAdd(mass_out + b * K + k, msum[k]);
        atomicAdd(hsum_out + k, hsum[k]);
        atomicAdd(gsum_out + k, gsum[k]);
      }
    }
  }
}

#if !defined(__CUDACC_RTC__) && !defined(DRE_CUDA_EMULATE)
#include "launchers.h"

namespace dre_cuda_launch {
cudaError_t re_fwd(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r, i64 s_c,
                   const void* idx, int idx64, int gather, const i64* off, const i64* slide, const i64* cstart,
                   const float* C, const float* csq, const float* scale, float* acc_out, float* mass_out,
                   const float* G, void* gx, int gx_dt, i64 B, int K, int D, i64 chunk, int hard, int with_e, int R,
                   int DO) {
  if (grid > 0)
    dre_re_fwd<<<grid, NTHREADS, smem, stream>>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart, C,
                                                 csq, scale, acc_out, mass_out, G, gx, gx_dt, B, K, D, chunk, hard,
                                                 with_e, R, DO);
  return cudaGetLastError();
}

cudaError_t re_bwd_soft(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                        i64 s_c, const void* idx, int idx64, int gather, const i64* off, const i64* slide,
                        const i64* cstart, const float* C, const float* csq, const float* scale, const float* G,
                        const float* gc, float* hx_out, float* hsum_out, float* gsum_out, float* mass_out, void* gx,
                        int gx_dt, i64 B, int K, int D, i64 chunk, int write_gx, int need_c, int R, int DO) {
  if (grid > 0)
    dre_re_bwd_soft<<<grid, NTHREADS, smem, stream>>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart,
                                                      C, csq, scale, G, gc, hx_out, hsum_out, gsum_out, mass_out, gx,
                                                      gx_dt, B, K, D, chunk, write_gx, need_c, R, DO);
  return cudaGetLastError();
}
}  // namespace dre_cuda_launch
#endif
