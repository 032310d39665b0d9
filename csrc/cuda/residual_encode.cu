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
// Full width (dre_re_fwd_tc_full, the forward of bf16/fp16 rows on sm_80+ where its rule fits, e.g. K = 64 up to
// D = 384; dre_re_bwd_tc_full, the soft backward's passes over bf16 rows that only sum, i.e. the bank rows';
// DRE_KERNELS_CUDA_FULL_WIDTH=0 turns both off): one block per chunk holds the whole K x D accumulator in registers,
// so each row is read and its distances computed once instead of once per column tile; whole rows are staged in
// shared memory by cp.async while the previous step computes. See the comment above the kernels.
//
// Tensor cores (dre_re_fwd_tc, dre_re_bwd_tc): a source of bf16/fp16 rows on compute capability >= 8.0 runs the same
// algorithm with the products X C^T, X G^T, A^T X and H^T X on mma.sync.m16n8k16 (16-bit inputs as stored, the float32
// operand split into hi + lo 16-bit parts: two MMAs, ~16 mantissa bits, float32 accumulation), as the Triton kernels
// do; float32 rows, older GPUs and DRE_KERNELS_CUDA_TENSOR_CORES=0 take the SIMT kernels, and so does the backward
// of float16 rows (G and h split into float16 parts would lose gradients below 6e-5). Their launch rule is
// re_tc_config in launch_rules.h (copied for the cupy backend in cupy_kernels.py).
//
// Launch rules (launch_rules.h, re_simt_config, and its copy in dre_kernels/cupy_kernels.py): 256 threads;
//   forward:  R = min(64, 4096 / K) rows per step, DO = min(256, 8192 / K, D), grid = slots * ceil(D / DO)
//             (slots only, DO = 1, without E), shared floats re_fwd_smem_floats(R, K)
//   backward: R = min(64, 2048 / K), the same DO, grid = slots * ceil(D / DO), shared re_bwd_smem_floats(R, K)
#include "dre_common.cuh"

namespace dre_cuda {

enum { RE_PPT = 16, RE_EPT = 32, RE_XO = 4096, RE_DT_FWD = 16, RE_DT_BWD = 8 };

DRE_DEVICE int imin(int a, int b) { return a < b ? a : b; }
DRE_DEVICE i64 lmin(i64 a, i64 b) { return a < b ? a : b; }
DRE_DEVICE i64 lmax(i64 a, i64 b) { return a < b ? b : a; }

// shared memory layout (floats): roff (2R, int64) | kmin (R, int) | xsq (R) | shr (R) | msum, hsum, gsum (3K) |
// A (R(K+1)) [| H (R(K+1)) backward] | union{ xs (R(DT+1)) + cs (K(DT+1)) [+ gs (K(DT+1))], xo (RE_XO) }
// (the tensor-core kernels: the union holds 16-bit tiles instead, see re_tc_config in launch_rules.h)
DRE_DEVICE int re_phase1_floats(int R, int K, int DT, int nmat) { return R * (DT + 1) + nmat * K * (DT + 1); }

// The head of that layout, the same in all four kernels; `tail` is where the union starts.
struct ReSmem {
  i64* roff;
  int* kmin;
  float *xsq, *shr, *msum, *hsum, *gsum, *A, *H, *tail;
};

DRE_DEVICE ReSmem re_smem(float* smem, int R, int K, bool backward) {
  ReSmem m;
  m.roff = (i64*)smem;
  m.kmin = (int*)(smem + 2 * R);
  m.xsq = smem + 3 * R;
  m.shr = smem + 4 * R;  // backward: sum_k s_k h_rk per row
  m.msum = smem + 5 * R;
  m.hsum = m.msum + K;
  m.gsum = m.hsum + K;
  m.A = m.gsum + K;
  m.H = m.A + R * (K + 1);
  m.tail = backward ? m.H + R * (K + 1) : m.H;
  return m;
}

// The block's work: chunk blockIdx / ndt, the rows [lo, hi) of slide b, and its column tile pid_d = blockIdx % ndt;
// false when the slot is past the last chunk or empty.
DRE_DEVICE bool re_block_rows(int ndt, const i64* off, const i64* slide, const i64* cstart, i64 B, i64 chunk, i64& b,
                              i64& lo, i64& hi, int& pid_d) {
  const i64 pid_c = (i64)blockIdx.x / ndt;
  pid_d = (int)((i64)blockIdx.x % ndt);
  b = slide[pid_c];
  if (b >= B) return false;
  lo = off[b] + (pid_c - cstart[b]) * chunk;
  hi = lmin(off[b + 1], lo + chunk);
  return lo < hi;
}

// The distance the assignment step reads: ||x||^2 - 2 <x, c_k> + ||c_k||^2 clamped at 0 (NaN stays NaN); hard:
// ||c_k||^2 - 2 <x, c_k> (the argmin needs no ||x||^2 and no clamp)
DRE_DEVICE float re_distance(bool hard, float xsq, float dot, float csq) {
  if (hard) return csq - 2.f * dot;
  const float v = xsq - 2.f * dot + csq;
  return v < 0.f ? 0.f : v;
}

// Row r (< nr) of this step: its position in the source (through the index when gathering)
DRE_DEVICE i64 re_source_row(i64 r0, int r, const void* idx, int idx64, int gather) {
  return gather ? load_index(idx, r0 + r, idx64) : r0 + r;
}

// Element offsets (row * s_r) of this step's rows into roff; xsq zeroed. Rows past nr point at row 0 (never read).
DRE_DEVICE void re_row_offsets(i64* roff, float* xsq, i64 r0, int nr, int R, const void* idx, int idx64, int gather,
                               i64 s_r, int tid) {
  for (int r = tid; r < R; r += NTHREADS) {
    roff[r] = r < nr ? re_source_row(r0, r, idx, idx64, gather) * s_r : 0;
    xsq[r] = 0.f;
  }
}

// f(j, k) for this lane's codewords k = lane + 32 j < K, j < KS unrolled (K <= 32 KS, which the caller guarantees:
// RE_FULL_KS, RE_ANY_K_KS below)
template <int KS, class F>
DRE_DEVICE void for_lane_codewords(int K, int lane, F&& f) {
  static_assert(KS > 0, "KS codewords a lane");
#pragma unroll
  for (int j = 0; j < KS; ++j)
    if (lane + 32 * j < K) f(j, lane + 32 * j);
}

// Column sums over the assignment rows. Shared memory has no float atomic add: atomicAdd there is a compare-and-swap
// loop (sm_90 SASS: ATOMS.CAST.SPIN), a few round trips each. With KS > 0 (K <= 32 KS) each lane sums its codewords
// over its warp's rows in registers and adds them once per call (KS atomics a lane, per sum); with KS = 0 (the
// forward only) it sums the columns after a barrier, NTHREADS / K threads a codeword.
// The column-tiled and SIMT kernels take any K <= 256 (MAX_K): their backward holds 8 codewords a lane (24 floats,
// within 128 registers, two blocks per SM; sm_80 and sm_90 ptxas), their forward keeps KS = 0 (8 more floats took
// dre_re_fwd_tc past 128 registers on sm_80).
enum { RE_ANY_K_KS = 8 };

// Forward (2): row r of A (distances, row stride K + 1) becomes softmax_k(-s_k d_rk), or the one-hot of its first
// argmin (kmin[r] = k); rows past nr become zeros. One warp per row. msum_k += sum_r A_rk. Ends with a barrier.
template <int KS = 0>
DRE_DEVICE void re_assign_fwd(float* A, int* kmin, float* msum, int nr, int R, int K, int hard, const float* scale,
                              int tid) {
  const int lane = tid & 31, warp = tid >> 5;
  float part[KS > 0 ? KS : 1] = {};
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
    if constexpr (KS > 0) for_lane_codewords<KS>(K, lane, [&](int j, int k) { part[j] += ar[k]; });
  }
  if constexpr (KS > 0) {
    for_lane_codewords<KS>(K, lane, [&](int j, int k) { atomicAdd(msum + k, part[j]); });
    __syncthreads();
  } else {
    // NTHREADS / K threads per codeword (K <= NTHREADS), each summing every tpk-th row, then one atomic each
    __syncthreads();
    const int tpk = K <= NTHREADS ? NTHREADS / K : 1;
    for (int t = tid; t < K * tpk; t += NTHREADS) {
      const int k = t % K;
      float s = 0.f;
      for (int r = t / K; r < nr; r += tpk) s += A[r * (K + 1) + k];
      if (tpk > 1)
        atomicAdd(msum + k, s);
      else
        msum[k] += s;
    }
  }
}

// Hard backward: grad x rows are rows of G (fresh rows: the row index is the position itself).
DRE_DEVICE void re_hard_grad_rows(void* gx, int gx_dt, const float* G, const int* kmin, i64 b, i64 r0, int nr, int K,
                                  int D, int tid) {
  for (i64 e = tid; e < (i64)nr * D; e += NTHREADS) {
    const int r = (int)(e / D), d = (int)(e % D);
    store_f(gx, (r0 + r) * D + d, G[((i64)b * K + kmin[r]) * D + d], gx_dt);
  }
}

// Soft backward (2), one warp per row: A (distances) becomes a = softmax, H (g) becomes h = a (g - <a, g>);
// shr_r = sum_k s_k h_rk; with acc_k: msum += a, hsum += h, gsum -= h d (shared atomics, see above). Rows past nr:
// zeros. g is shifted by g_m, m the row's largest assignment (h is the same, as sum_k a_k = 1): where a_m is near 1,
// <a, g> ~ g_m would cancel against g_m and leave h_m an error of eps |g| instead of eps |h_m|.
template <int KS>
DRE_DEVICE void re_assign_bwd(float* A, float* H, float* shr, float* msum, float* hsum, float* gsum, int nr, int R,
                              int K, const float* scale, int acc_k, int tid) {
  const int lane = tid & 31, warp = tid >> 5;
  float pm[KS] = {}, ph[KS] = {}, pg[KS] = {};
  for (int r = warp; r < R; r += NTHREADS / 32) {
    float* ar = A + r * (K + 1);
    float* hr = H + r * (K + 1);
    if (r >= nr) {
      for (int k = lane; k < K; k += 32) ar[k] = hr[k] = 0.f;
      if (lane == 0) shr[r] = 0.f;
      continue;
    }
    float m = -f_inf();
    float best = f_inf();  // the largest assignment: the smallest s_k d_k
    int kbest = K;
    for (int k = lane; k < K; k += 32) {
      m = fmaxf(m, -scale[k] * ar[k]);
      if (argmin_better(scale[k] * ar[k], k, best, kbest)) {
        best = scale[k] * ar[k];
        kbest = k;
      }
    }
    m = warp_max(m);
    warp_argmin(best, kbest);
    const float gm = kbest < K ? hr[kbest] : 0.f;
    float sum = 0.f;
    for (int k = lane; k < K; k += 32) sum += expf(-scale[k] * ar[k] - m);
    sum = warp_sum(sum);
    const float inv = 1.f / sum;
    float ag = 0.f;
    for (int k = lane; k < K; k += 32) ag += expf(-scale[k] * ar[k] - m) * inv * (hr[k] - gm);
    ag = warp_sum(ag);
    float sh = 0.f;
    for_lane_codewords<KS>(K, lane, [&](int j, int k) {
      const float dist = ar[k];
      const float a = expf(-scale[k] * dist - m) * inv;
      const float h = a * ((hr[k] - gm) - ag);
      ar[k] = a;
      hr[k] = h;
      sh += scale[k] * h;
      pm[j] += a;
      ph[j] += h;
      pg[j] -= h * dist;
    });
    sh = warp_sum(sh);
    if (lane == 0) shr[r] = sh;
  }
  if (acc_k)
    for_lane_codewords<KS>(K, lane, [&](int j, int k) {
      atomicAdd(msum + k, pm[j]);
      atomicAdd(hsum + k, ph[j]);
      atomicAdd(gsum + k, pg[j]);
    });
}

// grad x of one fresh row and column: sum_k a_rk G_bk + 2 s_k h_rk c_k - 2 shr_r x_r (x_rd given as xv)
DRE_DEVICE float re_grad_x(const float* ar, const float* hr, const float* Gb, const float* C, const float* scale,
                           float shr_r, float xv, int K, int D, int dcol) {
  float v = 0.f;
  for (int k = 0; k < K; ++k) {
    const i64 o = (i64)k * D + dcol;
    v += ar[k] * Gb[o] + 2.f * scale[k] * hr[k] * C[o];
  }
  return v - 2.f * shr_r * xv;
}

// ---- tensor-core tiles (sm_80+): the distance products and a^T x / h^T x as mma.sync m16n8k16 (dre_common.cuh)
// 16-bit shared tiles have a row stride of width + 8 elements: 4-byte aligned pairs, and the 8 rows a fragment
// load touches fall in distinct banks.

// xs (R x DT, 16-bit) = columns [dd, dd + DT) of this step's rows as stored; zeros past nr and D. cols: DT, as the
// staging's divisor (one FastDiv for the rows and the codewords of a tile, re_tc_load_split)
DRE_DEVICE void re_tc_load_rows(unsigned short* xs, const void* rows, const i64* roff, i64 s_c, int nr, int R, int D,
                                int dd, const FastDiv& cols, int tid) {
  const int DT = cols.d, ld = DT + 8;
  staged_copy(
      R * DT, tid,
      [&](int e) -> unsigned short {
        const int r = cols.div(e), d = e - r * DT;
        return (r < nr && dd + d < D) ? ((const unsigned short*)rows)[roff[r] + (i64)(dd + d) * s_c] : 0;
      },
      [&](int e, unsigned short v) { xs[e + cols.div(e) * (ld - DT)] = v; });
}

// p_hi + p_lo (K8 x DT, 16-bit) = columns [dd, dd + DT) of P (K x D float32, row stride D); zeros past K and D.
// BATCH: loads in flight per thread (staged_copy); the full-width kernels, one block per SM, take 16, and 48 for
// the forward's codewords, split once per block before its accumulator is live (2 round trips at K=64, D=384)
template <int BATCH = 8>
DRE_DEVICE void re_tc_load_split(unsigned short* p_hi, unsigned short* p_lo, const float* P, int dt, int K, int D,
                                 int dd, const FastDiv& cols, int tid) {
  const int DT = cols.d, ld = DT + 8, K8 = (K + 7) & ~7;
  staged_copy<BATCH>(
      K8 * DT, tid,
      [&](int e) -> float {
        const int k = cols.div(e), d = e - k * DT;
        return k < K && dd + d < D ? P[(i64)k * D + dd + d] : 0.f;
      },
      [&](int e, float v) {
        const int o = e + cols.div(e) * (ld - DT);
        split_16(v, dt, p_hi[o], p_lo[o]);
      });
}

// acc (4 floats) += X[16 mi.., :] P^T[:, 8 ni..] over one DT-wide tile pair (P = hi + lo: two MMAs per k-step)
DRE_DEVICE void re_tc_dot_tile(float* acc, const unsigned short* xs, const unsigned short* p_hi,
                               const unsigned short* p_lo, int mi, int ni, int DT, int dt, int lane) {
  const int ld = DT + 8, g = lane >> 2, t = lane & 3;
  for (int kk = 0; kk < DT; kk += 16) {
    const unsigned short* xa = xs + (16 * mi + g) * ld + kk + 2 * t;
    unsigned a[4];
    lds_frag_a(a, xa, ld);
    const int pb = (8 * ni + g) * ld + kk + 2 * t;
    unsigned b[2] = {lds_pair(p_hi + pb), lds_pair(p_hi + pb + 8)};
    mma_16816(acc, a, b, dt);
    b[0] = lds_pair(p_lo + pb);
    b[1] = lds_pair(p_lo + pb + 8);
    mma_16816(acc, a, b, dt);
  }
}

// xo (R x DO, 16-bit) = columns [d0, d0 + dn) of this step's rows; zeros elsewhere
DRE_DEVICE void re_tc_load_cols(unsigned short* xo, const void* rows, const i64* roff, i64 s_c, int nr, int R, int DO,
                                int d0, int dn, int tid) {
  re_tc_load_rows(xo, rows, roff, s_c, nr, R, d0 + dn, d0, FastDiv(DO), tid);  // columns past d0 + dn as past D
}

// acc (8 tiles x 4 floats) += W^T X for the output tiles q = 8 warp + j of the K16 x DO/8 grid: W (R x K float32,
// row stride K + 1: assignments or h) split into hi + lo, X = xo (R x DO, 16-bit). Rows nr..R of W are zero.
DRE_DEVICE void re_tc_aggregate(float* acc, const float* W, const unsigned short* xo, int nr, int K, int DO, int dt,
                                int warp, int lane) {
  const int ld = DO + 8, g = lane >> 2, t = lane & 3, ntn = DO / 8, tiles = ((K + 15) / 16) * ntn;
  for (int kr = 0; kr < nr; kr += 16) {
    int cur = -1;
    unsigned a_hi[4], a_lo[4];
#pragma unroll
    for (int j = 0; j < RE_EPT / 4; ++j) {
      const int q = warp * (RE_EPT / 4) + j;
      if (q >= tiles) break;
      const int mi = q / ntn, ni = q % ntn;
      if (mi != cur) {  // A^T fragment: element (m = codeword, kk = row) = W[row][codeword]
        cur = mi;
        for (int i = 0; i < 4; ++i) {
          const int m = 16 * mi + g + 8 * (i & 1), r = kr + 2 * t + 8 * (i >> 1);
          unsigned short h0, l0, h1, l1;
          split_16(m < K ? W[r * (K + 1) + m] : 0.f, dt, h0, l0);
          split_16(m < K ? W[(r + 1) * (K + 1) + m] : 0.f, dt, h1, l1);
          a_hi[i] = pack_16(h0, h1);
          a_lo[i] = pack_16(l0, l1);
        }
      }
      const unsigned short* xb = xo + (kr + 2 * t) * ld + 8 * ni + g;
      const unsigned b[2] = {pack_16(xb[0], xb[ld]), pack_16(xb[8 * ld], xb[9 * ld])};
      mma_16816(acc + 4 * j, a_hi, b, dt);
      mma_16816(acc + 4 * j, a_lo, b, dt);
    }
  }
}

// ---- the two ways to run the products, behind one interface that re_fwd_body and re_bwd_body are written against.
// A Tiles value holds this block's staging tiles (in the shared-memory union after ReSmem's head) and what it needs to
// fill them; its methods, called by all threads of the block:
//   load<WITH_G>(nr, dd, C, Gb)  stage columns [dd, dd + DT) of this step's nr rows, of C and (WITH_G) of G_b
//   row_sq(r)                    sum over the staged columns of x_rd^2
//   dots<WITH_G>(dot, dotg)      dot[j] += <x_r, c_k> (dotg[j] += <x_r, G_bk>) over them, for this thread's pairs j
//   for_each_pair<N>(f)          f(j, r, k) for each dot[j] (of N) this thread holds: row r, codeword k
//   for_each_row_block(nr, d0, dn, f)   stage columns [d0, d0 + dn) of the rows in xo, a block of rows at a time
//                                (barrier before and after each staging), calling f(rs, ns) on rows rs..rs + ns
//   aggregate(acc, W, rs, ns)    acc[j] += sum_r W_(rs + r),k x_(rs + r),d (W row stride K + 1) over a staged block
//   xo_at(r, d)                  a staged value (r relative to the block)
//   for_each_out(f)              f(j, k, d) for each acc[j] this thread holds: codeword k, column d of the tile
// kPairsFwd / kPairsBwd: the length of dot (and dotg) per thread. The bodies give the same instructions as four
// hand-written kernels would (ptxas: the same registers as the kernels they replaced, instruction counts within 1%).

// SIMT float32 FMA: xs (R x DT), cs and gs (K x DT) with row stride DT + 1 (no bank conflicts in the pair loops);
// thread tid holds pairs p = tid + NTHREADS j (r = p / K, k = p % K) and outputs e = tid + NTHREADS j (k = e / DO,
// d = e % DO); xo (RE_XO floats, RE_XO / DO rows at a time) aliases the distance tiles.
template <int DT>
struct ReSimtTiles {
  static constexpr int kPairsFwd = RE_PPT, kPairsBwd = RE_PPT;
  float *xs, *cs, *gs, *xo;
  const void* rows;
  const i64* roff;
  i64 s_c;
  int dt, R, K, D, DO, tid;
  FastDiv by_do;  // the staging of xo (e / DO); the pair and output loops' divisions are amortised over D or rows

  DRE_DEVICE ReSimtTiles(float* tail, const void* rows_, int dt_, const i64* roff_, i64 s_c_, int R_, int K_, int D_,
                         int DO_, int /*DT: a template argument here*/, int tid_)
      : rows(rows_), roff(roff_), s_c(s_c_), dt(dt_), R(R_), K(K_), D(D_), DO(DO_), tid(tid_), by_do(DO_) {
    xs = tail;
    cs = xs + R * (DT + 1);
    gs = cs + K * (DT + 1);
    xo = xs;
  }

  template <bool WITH_G>
  DRE_DEVICE void load(int nr, int dd, const float* C, const float* Gb) {
    const int ld = DT + 1;
    staged_copy(
        R * DT, tid,
        [&](int e) -> float {
          const int r = e / DT, d = e % DT;
          return (r < nr && dd + d < D) ? load_f(rows, roff[r] + (i64)(dd + d) * s_c, dt) : 0.f;
        },
        [&](int e, float v) { xs[(e / DT) * ld + e % DT] = v; });
    // C (and G_b) columns [dd, dd + DT), zero past D
    const auto stage = [&](float* dst, const float* P) {
      staged_copy(
          K * DT, tid,
          [&](int e) -> float {
            const int k = e / DT, d = e % DT;
            return dd + d < D ? P[(i64)k * D + dd + d] : 0.f;
          },
          [&](int e, float v) { dst[(e / DT) * ld + e % DT] = v; });
    };
    stage(cs, C);
    if constexpr (WITH_G) stage(gs, Gb);
  }

  DRE_DEVICE float row_sq(int r) const {
    float s = 0.f;
    for (int d = 0; d < DT; ++d) s += xs[r * (DT + 1) + d] * xs[r * (DT + 1) + d];
    return s;
  }

  template <bool WITH_G, int N>
  DRE_DEVICE void dots(float (&dot)[N], float (&dotg)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int p = tid + NTHREADS * j;
      if (p < R * K) {
        const float* xr = xs + (p / K) * (DT + 1);
        const float* cr = cs + (p % K) * (DT + 1);
        const float* gr = gs + (p % K) * (DT + 1);
        float s = dot[j], t = dotg[j];
        for (int d = 0; d < DT; ++d) {
          s += xr[d] * cr[d];
          if constexpr (WITH_G) t += xr[d] * gr[d];
        }
        dot[j] = s;
        if constexpr (WITH_G) dotg[j] = t;
      }
    }
  }

  template <int N, class F>
  DRE_DEVICE void for_each_pair(F&& f) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int p = tid + NTHREADS * j;
      if (p < R * K) f(j, p / K, p % K);
    }
  }

  template <class F>
  DRE_DEVICE void for_each_row_block(int nr, int d0, int dn, F&& f) {
    const int RS = RE_XO / DO;  // DO >= 1: the host passes 1 for a pass without E
    for (int rs = 0; rs < nr; rs += RS) {
      const int ns = imin(RS, nr - rs);
      __syncthreads();  // xo aliases the distance tiles
      for (int e = tid; e < ns * DO; e += NTHREADS) {
        const int r = by_do.div(e), d = e - r * DO;
        xo[e] = d < dn ? load_f(rows, roff[rs + r] + (i64)(d0 + d) * s_c, dt) : 0.f;
      }
      __syncthreads();
      f(rs, ns);
    }
  }

  DRE_DEVICE void aggregate(float* acc, const float* W, int rs, int ns) const {
#pragma unroll
    for (int j = 0; j < RE_EPT; ++j) {
      const int e = tid + NTHREADS * j;
      if (e < K * DO) {
        const int k = e / DO, d = e % DO;
        float s = acc[j];
        for (int r = 0; r < ns; ++r) s += W[(rs + r) * (K + 1) + k] * xo[r * DO + d];
        acc[j] = s;
      }
    }
  }

  DRE_DEVICE float xo_at(int r, int d) const { return xo[r * DO + d]; }

  template <class F>
  DRE_DEVICE void for_each_out(F&& f) const {
#pragma unroll
    for (int j = 0; j < RE_EPT; ++j) {
      const int e = tid + NTHREADS * j;
      if (e < K * DO) f(j, e / DO, e % DO);
    }
  }
};

// Tensor cores (sm_80+, 16-bit rows): mma.sync m16n8k16 on 16-bit tiles xs (R x DT), c_hi/c_lo and g_hi/g_lo
// (K8 x DT, the float32 operand split into hi + lo), row stride DT + 8; xo (R x DO, all nr rows at once) aliases them.
// Warp w owns distance tiles (N / 4) w.. of the (R/16) x (K8/8) grid (N = kPairs*) and aggregation tiles 8w..8w+7 of
// the (K16/16) x (DO/8) grid; element e of a tile sits in the accumulator's [4 (tile - first) + e] (PTX layout).
struct ReTcTiles {
  static constexpr int kPairsFwd = RE_PPT, kPairsBwd = RE_PPT / 2;  // the backward holds dot and dotg
  unsigned short *xs, *c_hi, *c_lo, *g_hi, *g_lo, *xo;
  const void* rows;
  const i64* roff;
  i64 s_c;
  int dt, R, K, D, DO, DT, tid;

  // recomputed where used: held in the struct, they stay live through the row loop (ptxas then takes 115-128
  // registers for these kernels on sm_90 instead of 96)
  DRE_DEVICE int warp() const { return tid >> 5; }
  DRE_DEVICE int lane() const { return tid & 31; }
  DRE_DEVICE int nnt() const { return ((K + 7) & ~7) / 8; }
  DRE_DEVICE int tiles() const { return (R / 16) * nnt(); }

  DRE_DEVICE ReTcTiles(float* tail, const void* rows_, int dt_, const i64* roff_, i64 s_c_, int R_, int K_, int D_,
                       int DO_, int DT_, int tid_)
      : rows(rows_), roff(roff_), s_c(s_c_), dt(dt_), R(R_), K(K_), D(D_), DO(DO_), DT(DT_), tid(tid_) {
    const int K8 = (K + 7) & ~7;
    xs = (unsigned short*)tail;
    c_hi = xs + R * (DT + 8);
    c_lo = c_hi + K8 * (DT + 8);
    g_hi = c_lo + K8 * (DT + 8);
    g_lo = g_hi + K8 * (DT + 8);
    xo = xs;
  }

  template <bool WITH_G>
  DRE_DEVICE void load(int nr, int dd, const float* C, const float* Gb) {
    const FastDiv cols(DT);  // made here, not held in the struct (see above)
    re_tc_load_rows(xs, rows, roff, s_c, nr, R, D, dd, cols, tid);
    re_tc_load_split(c_hi, c_lo, C, dt, K, D, dd, cols, tid);
    if constexpr (WITH_G) re_tc_load_split(g_hi, g_lo, Gb, dt, K, D, dd, cols, tid);
  }

  DRE_DEVICE float row_sq(int r) const {
    float s = 0.f;
    for (int d = 0; d < DT; ++d) {
      const float v = from_16(xs[r * (DT + 8) + d], dt);
      s += v * v;
    }
    return s;
  }

  template <bool WITH_G, int N>
  DRE_DEVICE void dots(float (&dot)[N], float (&dotg)[N]) const {
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
      const int q = warp() * (N / 4) + j;
      if (q < tiles()) {
        re_tc_dot_tile(dot + 4 * j, xs, c_hi, c_lo, q / nnt(), q % nnt(), DT, dt, lane());
        if constexpr (WITH_G) re_tc_dot_tile(dotg + 4 * j, xs, g_hi, g_lo, q / nnt(), q % nnt(), DT, dt, lane());
      }
    }
  }

  template <int N, class F>
  DRE_DEVICE void for_each_pair(F&& f) const {
    const int g = lane() >> 2, t = lane() & 3;
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
      const int q = warp() * (N / 4) + j;
      if (q >= tiles()) continue;
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * (q / nnt()) + g + 8 * (e >> 1), k = 8 * (q % nnt()) + 2 * t + (e & 1);
        if (k < K) f(4 * j + e, r, k);
      }
    }
  }

  template <class F>
  DRE_DEVICE void for_each_row_block(int nr, int d0, int dn, F&& f) {
    __syncthreads();  // xo aliases the distance tiles
    re_tc_load_cols(xo, rows, roff, s_c, nr, R, DO, d0, dn, tid);
    __syncthreads();
    f(0, nr);
  }

  DRE_DEVICE void aggregate(float* acc, const float* W, int rs, int ns) const {
    re_tc_aggregate(acc, W + rs * (K + 1), xo + rs * (DO + 8), ns, K, DO, dt, warp(), lane());
  }

  DRE_DEVICE float xo_at(int r, int d) const { return from_16(xo[r * (DO + 8) + d], dt); }

  template <class F>
  DRE_DEVICE void for_each_out(F&& f) const {
    const int ntn = DO / 8, tiles3 = ((K + 15) / 16) * ntn, g = lane() >> 2, t = lane() & 3;
#pragma unroll
    for (int j = 0; j < RE_EPT / 4; ++j) {
      const int q = warp() * (RE_EPT / 4) + j;
      if (q >= tiles3) continue;
      for (int e = 0; e < 4; ++e) {
        const int k = 16 * (q / ntn) + g + 8 * (e >> 1), d = 8 * (q % ntn) + 2 * t + (e & 1);
        if (k < K) f(4 * j + e, k, d);
      }
    }
  }
};

// Forward over one source of rows, the products by Tiles (see the header comment). With E (with_e): adds partial E
// into acc (B, K, D) float32, and mass (B, K). Without E: the argmin/assignment pass only (mass). With G (hard only):
// writes grad x rows gx[i] = G_{b, k(i)}.
template <class Tiles>
DRE_DEVICE void re_fwd_body(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx, int idx64, int gather,
                            const i64* off, const i64* slide, const i64* cstart, const float* C, const float* csq,
                            const float* scale, float* acc_out, float* mass_out, const float* G, void* gx, int gx_dt,
                            i64 B, int K, int D, i64 chunk, int hard, int with_e, int R, int DO, int DT) {
  DRE_DYN_SMEM(smem);
  const int tid = threadIdx.x;
  const int ndt = with_e ? (D + DO - 1) / DO : 1;
  i64 b, lo, hi;
  int pid_d;
  if (!re_block_rows(ndt, off, slide, cstart, B, chunk, b, lo, hi, pid_d)) return;
  const int d0 = pid_d * DO;
  const int dn = with_e ? imin(DO, D - d0) : 0;
  constexpr int NP = Tiles::kPairsFwd;

  const ReSmem m = re_smem(smem, R, K, false);
  i64* roff = m.roff;
  int* kmin = m.kmin;
  float *xsq = m.xsq, *msum = m.msum, *A = m.A;
  Tiles tl(m.tail, rows, rows_dt, roff, s_c, R, K, D, DO, DT, tid);

  float acc[RE_EPT];
#pragma unroll
  for (int j = 0; j < RE_EPT; ++j) acc[j] = 0.f;
  for (int k = tid; k < K; k += NTHREADS) msum[k] = 0.f;
  __syncthreads();

  for (i64 r0 = lo; r0 < hi; r0 += R) {
    const int nr = (int)lmin((i64)R, hi - r0);
    re_row_offsets(roff, xsq, r0, nr, R, idx, idx64, gather, s_r, tid);
    __syncthreads();
    // (1) distances: dot_rk = <x_r, c_k>, ||x_r||^2 from the same tiles
    float dot[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) dot[j] = 0.f;
    for (int dd = 0; dd < D; dd += DT) {
      tl.template load<false>(nr, dd, C, C);
      __syncthreads();
      if (!hard && tid < R) xsq[tid] += tl.row_sq(tid);
      tl.template dots<false>(dot, dot);
      __syncthreads();
    }
    tl.template for_each_pair<NP>(
        [&](int j, int r, int k) { A[r * (K + 1) + k] = re_distance(hard, xsq[r], dot[j], csq[k]); });
    __syncthreads();
    // (2) assignments and their column sums
    re_assign_fwd(A, kmin, msum, nr, R, K, hard, scale, tid);
    if (G != 0) re_hard_grad_rows(gx, gx_dt, G, kmin, b, r0, nr, K, D, tid);
    // (3) aggregation a^T x over this block's column tile
    if (with_e) tl.for_each_row_block(nr, d0, dn, [&](int rs, int ns) { tl.aggregate(acc, A, rs, ns); });
    __syncthreads();
  }
  if (with_e) {
    tl.for_each_out([&](int j, int k, int d) {
      if (d < dn) {
        const i64 o = (i64)k * D + d0 + d;
        atomicAdd(acc_out + (i64)b * K * D + o, acc[j] - msum[k] * C[o]);
      }
    });
  }
  if (pid_d == 0 && mass_out != 0)
    for (int k = tid; k < K; k += NTHREADS) atomicAdd(mass_out + b * K + k, msum[k]);
}

// Soft backward over one source of rows, the products by Tiles (see the header comment). G (B, K, D) and gc (B, K) =
// <G_bk, c_k> float32; hx (K, D), hsum (K), gsum (K), mass (B, K) float32 accumulators; gx (M, D) contiguous in gx_dt
// (fresh rows only).
template <class Tiles>
DRE_DEVICE void re_bwd_body(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx, int idx64, int gather,
                            const i64* off, const i64* slide, const i64* cstart, const float* C, const float* csq,
                            const float* scale, const float* G, const float* gc, float* hx_out, float* hsum_out,
                            float* gsum_out, float* mass_out, void* gx, int gx_dt, i64 B, int K, int D, i64 chunk,
                            int write_gx, int need_c, int R, int DO, int DT) {
  DRE_DYN_SMEM(smem);
  const int tid = threadIdx.x;
  const int ndt = (D + DO - 1) / DO;
  i64 b, lo, hi;
  int pid_d;
  if (!re_block_rows(ndt, off, slide, cstart, B, chunk, b, lo, hi, pid_d)) return;
  const int d0 = pid_d * DO;
  const int dn = imin(DO, D - d0);
  const float* Gb = G + (i64)b * K * D;
  constexpr int NP = Tiles::kPairsBwd;

  const ReSmem m = re_smem(smem, R, K, true);
  i64* roff = m.roff;
  float *xsq = m.xsq, *shr = m.shr, *msum = m.msum, *hsum = m.hsum, *gsum = m.gsum, *A = m.A, *H = m.H;
  Tiles tl(m.tail, rows, rows_dt, roff, s_c, R, K, D, DO, DT, tid);

  float acc[RE_EPT];
#pragma unroll
  for (int j = 0; j < RE_EPT; ++j) acc[j] = 0.f;
  for (int k = tid; k < K; k += NTHREADS) msum[k] = hsum[k] = gsum[k] = 0.f;
  __syncthreads();

  for (i64 r0 = lo; r0 < hi; r0 += R) {
    const int nr = (int)lmin((i64)R, hi - r0);
    re_row_offsets(roff, xsq, r0, nr, R, idx, idx64, gather, s_r, tid);
    __syncthreads();
    // (1) distances and g_rk = <G_bk, x_r> - <G_bk, c_k> from the same tiles
    float dot[NP], dotg[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) dot[j] = dotg[j] = 0.f;
    for (int dd = 0; dd < D; dd += DT) {
      tl.template load<true>(nr, dd, C, Gb);
      __syncthreads();
      if (tid < R) xsq[tid] += tl.row_sq(tid);
      tl.template dots<true>(dot, dotg);
      __syncthreads();
    }
    tl.template for_each_pair<NP>([&](int j, int r, int k) {
      A[r * (K + 1) + k] = re_distance(false, xsq[r], dot[j], csq[k]);
      H[r * (K + 1) + k] = dotg[j] - gc[b * K + k];  // g_rk
    });
    __syncthreads();
    // (2) per row: a (softmax), h = a (g - <a, g>); mass, hsum and gsum by shared atomics; shr_r = sum_k s_k h_rk
    re_assign_bwd<RE_ANY_K_KS>(A, H, shr, msum, hsum, gsum, nr, R, K, scale, need_c && pid_d == 0, tid);
    // (3) h^T x over this block's column tile, and grad x of the fresh rows (barriers in for_each_row_block: A, H,
    // shr complete before the first block)
    tl.for_each_row_block(nr, d0, dn, [&](int rs, int ns) {
      if (need_c) tl.aggregate(acc, H, rs, ns);
      if (write_gx) {
        for (int e = tid; e < ns * DO; e += NTHREADS) {
          const int r = e / DO, d = e % DO;
          if (d >= dn) continue;
          const float v = re_grad_x(A + (rs + r) * (K + 1), H + (rs + r) * (K + 1), Gb, C, scale, shr[rs + r],
                                    tl.xo_at(r, d), K, D, d0 + d);
          store_f(gx, (r0 + rs + r) * D + d0 + d, v, gx_dt);
        }
      }
    });
    __syncthreads();
  }
  if (need_c) {
    tl.for_each_out([&](int j, int k, int d) {
      if (d < dn) atomicAdd(hx_out + (i64)k * D + d0 + d, acc[j]);
    });
    if (pid_d == 0) {
      for (int k = tid; k < K; k += NTHREADS) {
        atomicAdd(mass_out + b * K + k, msum[k]);
        atomicAdd(hsum_out + k, hsum[k]);
        atomicAdd(gsum_out + k, gsum[k]);
      }
    }
  }
}

}  // namespace dre_cuda

using namespace dre_cuda;

// The four kernels: forward and soft backward, each SIMT (any rows, any GPU) and on the tensor cores (sm_80+,
// 16-bit rows). Tensor-core launch rule (host: re_tc_config): DO a multiple of 8 with ceil(K/16) DO/8 <= 64, R a
// multiple of 16 with (R/16) K8/8 <= 32 (backward: <= 16, two sets of distance accumulators), DT in {16, 32}; shared
// floats 5R + 3K + R(K+1) (backward: + R(K+1) more) + the 16-bit tiles' union. Two blocks per SM (DRE_MIN_BLOCKS:
// registers capped at 128; their shared memory, by the launch rules, is at most 48 KB).
DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_re_fwd(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx,
                                             int idx64, int gather, const i64* off, const i64* slide, const i64* cstart,
                                             const float* C, const float* csq, const float* scale, float* acc_out,
                                             float* mass_out, const float* G, void* gx, int gx_dt, i64 B, int K, int D,
                                             i64 chunk, int hard, int with_e, int R, int DO) {
  re_fwd_body<ReSimtTiles<RE_DT_FWD>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart, C, csq, scale,
                                      acc_out, mass_out, G, gx, gx_dt, B, K, D, chunk, hard, with_e, R, DO, RE_DT_FWD);
}

DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_re_bwd_soft(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx,
                                                  int idx64, int gather, const i64* off, const i64* slide,
                                                  const i64* cstart, const float* C, const float* csq,
                                                  const float* scale, const float* G, const float* gc, float* hx_out,
                                                  float* hsum_out, float* gsum_out, float* mass_out, void* gx,
                                                  int gx_dt, i64 B, int K, int D, i64 chunk, int write_gx, int need_c,
                                                  int R, int DO) {
  re_bwd_body<ReSimtTiles<RE_DT_BWD>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart, C, csq, scale,
                                      G, gc, hx_out, hsum_out, gsum_out, mass_out, gx, gx_dt, B, K, D, chunk, write_gx,
                                      need_c, R, DO, RE_DT_BWD);
}

DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_re_fwd_tc(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx,
                                                int idx64, int gather, const i64* off, const i64* slide,
                                                const i64* cstart, const float* C, const float* csq, const float* scale,
                                                float* acc_out, float* mass_out, const float* G, void* gx, int gx_dt,
                                                i64 B, int K, int D, i64 chunk, int hard, int with_e, int R, int DO,
                                                int DT) {
  re_fwd_body<ReTcTiles>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart, C, csq, scale, acc_out,
                         mass_out, G, gx, gx_dt, B, K, D, chunk, hard, with_e, R, DO, DT);
}

// (the host sends bf16 rows only: G and h split into float16 parts would lose gradients below 6e-5)
DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_re_bwd_tc(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx,
                                                int idx64, int gather, const i64* off, const i64* slide,
                                                const i64* cstart, const float* C, const float* csq, const float* scale,
                                                const float* G, const float* gc, float* hx_out, float* hsum_out,
                                                float* gsum_out, float* mass_out, void* gx, int gx_dt, i64 B, int K,
                                                int D, i64 chunk, int write_gx, int need_c, int R, int DO, int DT) {
  re_bwd_body<ReTcTiles>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart, C, csq, scale, G, gc, hx_out,
                         hsum_out, gsum_out, mass_out, gx, gx_dt, B, K, D, chunk, write_gx, need_c, R, DO, DT);
}

// ---- the full-width kernels on the tensor cores (dre_re_fwd_tc_full, dre_re_bwd_tc_full): one block per SM and
// all D columns. The kernels above give each block a column tile of DO <= 128 columns (their K x DO accumulator is 32
// floats per thread) and stage DT = 16..32 columns at a time: every column tile recomputes the full-width distances,
// codewords are split again for every step, and each DT step is a synchronous load between two barriers (3.1 ms at
// the DRE-SLCL step shape on the H100, 30x the time to read the rows). Here, where the whole K x D accumulator fits
// in registers (RE_FULL_TILES 16 x 8 tiles per warp, 96 floats per thread: K = 64 up to D = 384, K = 32 up to D = 768;
// re_full_for_each_tile), a block
//   - stages R whole rows at a time (xs: R x LDD, 16-byte cp.async straight into shared memory where rows are
//     contiguous and 16-byte aligned), the next step's rows loading while this step computes (nbuf = 2);
//   - computes each row's distances once (X C^T, mma.sync, C split into hi + lo; a warp's fragments of X meet two
//     codeword tiles and those of C three row tiles: ReFullDotTiles), the softmax or argmin
//     (re_assign_fwd), splits the assignments into A^T hi + lo (at_hi, at_lo: K16 x LDR), and adds A^T X for all D
//     columns into registers, as its transpose X^T A: the MMA's A operand is then 16 columns of X, three of which a
//     warp holds while each 8-codeword tile of A^T is loaded once (A^T X would load each column tile of X once per
//     16 codewords: 245 KB of shared-memory reads per 48 rows at K = 64, D = 384, where X^T A reads 132 KB);
//   - adds E_b and mass at the end of each slide segment of its rows (atomics, as the other kernels).
// Blocks are persistent: the register file holds one block per SM, so each takes an even share of the source's rows
// (launch_rules.h re_full_block_rows: ~one block per SM, whole steps of R rows), a span that may cross slides, and
// walks it a slide segment at a time in steps of up to R rows (ReFullStep). Slide-aligned chunks of 2^n rows (the
// kernels above) cost these kernels a step of 16 rows per 256-row chunk at R = 48, up to four waves of blocks where
// one fits, and a codeword split and a K x D flush of atomics per chunk.
// The forward splits the codewords into hi + lo once per block, into shared memory (c_hi, c_lo: K8 x LDD).
// The soft backward's passes that only sum (dre_re_bwd_tc_full: the bank rows, and fresh rows whose grad x is not
// asked for) hold sum_i h_ik x_i the same way, with g_rk = <G_bk, x_r> - <G_bk, c_k> computed beside the distances
// from the same fragments of x. C and G_b split at full width would take 200 KB of shared memory at K = 64, D = 384
// before any row, so both are staged DTS columns at a time (c_hi, c_lo, g_hi, g_lo: K8 x LDP), split from float32;
// the rows are still read, and their distances computed, once. The next slice's float32 columns (cg: 2 x K8 x DTS)
// are copied while this slice's MMAs run (cp.async where C and G_b rows are 16-byte aligned), with them a share of
// the next step's rows (nbuf = 2): one group in flight at a time, so each wait is for the copies it needs.
// Launch rule: re_tc_full_config (launch_rules.h; its copy in cupy_kernels.py): the largest R (multiple of 16 up to
// 64), double-buffered if that fits, whose shared memory (re_full_smem_bytes) fits the device's opt-in limit; none
// (the kernels above run) where nothing fits or the accumulator would not.
enum { RE_FULL_TILES = 24, RE_FULL_DCH = 3 };
// codewords per lane in the full-width assignment passes (re_assign_fwd / re_assign_bwd): their rule takes K <= 64
enum { RE_FULL_KS = 2 };

struct ReFullSmem {
  unsigned short *c_hi, *c_lo, *g_hi, *g_lo, *xs, *at_hi, *at_lo;
  float *cg, *A, *H, *xsq, *shr, *msum, *hsum, *gsum;
  i64* roff;
  int* kmin;
  int LDD, LDR, LDP;
};

// shared layout, every part 16-byte aligned (bytes: launch_rules.h re_full_smem_bytes), 16-bit then float32:
//   forward:  c_hi, c_lo (K8 x LDD) | xs[nbuf] (R x LDD) | at_hi, at_lo (K16 x LDR) | A (R x (K+1)) | xsq (R) |
//             kmin (R) | msum (K)
//   backward: c_hi, c_lo, g_hi, g_lo (K8 x LDP) | xs[nbuf] | at_hi, at_lo | cg (2 x K8 x DTS) | roff (R, 64-bit) |
//             A, H (R x (K+1)) | xsq (R) | shr (R) | msum, hsum, gsum (K)
// LDD = D16 + 8, LDP = DTS + 8, LDR = R + 8 (row strides of 4 (mod 8) words: fragment loads conflict-free)
DRE_DEVICE ReFullSmem re_full_smem(float* smem, int R, int K, int D, int nbuf, int DTS, bool backward) {
  ReFullSmem m;
  const int K8 = (K + 7) & ~7, K16 = (K + 15) & ~15;
  m.LDD = ((D + 15) & ~15) + 8;
  m.LDR = R + 8;
  m.LDP = backward ? DTS + 8 : m.LDD;
  m.c_hi = (unsigned short*)smem;
  m.c_lo = m.c_hi + K8 * m.LDP;
  m.g_hi = m.c_lo + K8 * m.LDP;  // backward only
  m.g_lo = m.g_hi + K8 * m.LDP;
  m.xs = backward ? m.g_lo + K8 * m.LDP : m.g_hi;
  m.at_hi = m.xs + nbuf * R * m.LDD;
  m.at_lo = m.at_hi + K16 * m.LDR;
  m.cg = (float*)(m.at_lo + K16 * m.LDR);  // backward only
  m.roff = (i64*)(m.cg + 2 * K8 * DTS);     // backward only
  m.A = backward ? (float*)(m.roff + R) : m.cg;
  m.H = m.A + R * (K + 1);  // backward only
  m.xsq = backward ? m.H + R * (K + 1) : m.H;
  m.shr = m.xsq + R;  // backward: sum_k s_k h_rk per row; forward: kmin in its place
  m.kmin = (int*)m.shr;
  m.msum = m.shr + R;
  m.hsum = m.msum + K;  // backward only
  m.gsum = m.hsum + K;
  return m;
}

// Where the full-width kernels read their rows: a source as the other kernels take it, and whether its rows may be
// copied 16 bytes at a time (the host checked s_c = 1, D % 8 = 0, s_r % 8 = 0 and a 16-byte aligned base)
struct ReFullRows {
  const void* rows;
  i64 s_r, s_c;
  const void* idx;
  int idx64, gather, D, vec;
  FastDiv per_row;  // copies per row: D / 8 of 16 bytes (vec), else D elements
};

// xs (R x LDD) = rows r0 .. r0 + nr of the source as stored, zeros for rows nr..R (columns D..LDD untouched);
// asynchronous where vec (uncommitted: the caller closes the group). part of parts: that share of the copies only;
// roff: the rows' element offsets (row * s_r) read from there (shared memory), not from the source's index.
DRE_DEVICE void re_full_stage_rows(unsigned short* xs, int LDD, const ReFullRows& src, i64 r0, int nr, int R,
                                   int tid, int part = 0, int parts = 1, const i64* roff = nullptr) {
  const unsigned short* rows = (const unsigned short*)src.rows;
  const int D = src.D;
  // (staged_copy: each copy needs its row's index first, a load of its own)
  const auto offset = [&](int r) -> i64 {
    return r >= nr ? 0 : roff ? roff[r] : re_source_row(r0, r, src.idx, src.idx64, src.gather) * src.s_r;
  };
  if (src.vec) {
    // (32-bit: n parts <= R D (D / 16) < 2^31; a 64-bit division is a call to a ~70-instruction routine)
    const int per = src.per_row.d, n = R * per, e0 = n * part / parts;
    staged_copy(
        n * (part + 1) / parts - e0, tid, [&](int e) -> i64 { return offset(src.per_row.div(e0 + e)); },
        [&](int e, i64 o) {
          const int r = src.per_row.div(e0 + e), c = e0 + e - r * per;
          cp_async_16(xs + r * LDD + 8 * c, rows + o + 8 * c, r < nr);
        });
  } else {
    const int n = R * D, e0 = n * part / parts;
    staged_copy(
        n * (part + 1) / parts - e0, tid,
        [&](int e) -> unsigned short {
          const int r = src.per_row.div(e0 + e);
          return r < nr ? rows[offset(r) + (i64)(e0 + e - r * D) * src.s_c] : 0;
        },
        [&](int e, unsigned short v) {
          const int r = src.per_row.div(e0 + e);
          xs[r * LDD + e0 + e - r * D] = v;
        });
  }
}

// A step of a block's rows [lo, hi): rows r0 .. r0 + nr, all of slide b (nr = 0: past hi, the block is done)
struct ReFullStep {
  i64 r0, b;
  int nr;
};

// the slide of row r: the last b < B with off[b] <= r (empty slides before it skipped)
DRE_DEVICE i64 re_slide_of(const i64* off, i64 B, i64 r) {
  i64 lo = 0, hi = B;
  while (hi - lo > 1) {
    const i64 mid = (lo + hi) >> 1;
    if (off[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// The same, searched by a warp's lanes at once (call it from whole warps): one round of loads for B <= 32, two for
// B <= 1024, where the binary search waits for log2 B dependent loads before a block's first rows can be staged
DRE_DEVICE i64 re_slide_of_warp(const i64* off, i64 B, i64 r, int lane) {
  i64 a = 0, n = B;  // off[a] <= r, and the answer lies in [a, a + n)
  while (n > 1) {
    const i64 step = (n + 31) / 32, p = a + lane * step;
    int c = p < a + n && off[p] <= r ? 1 : 0;  // lanes 0 .. c - 1 (off is monotone)
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    const i64 a1 = a + (c > 0 ? c - 1 : 0) * step;  // (c = 0 only for offsets that broke the contract: stay in range)
    n = lmin(step, a + n - a1);
    a = a1;
  }
  return a;
}

// The step of up to R rows at row r0 of slide b, within [.., hi); at least one row, so that offsets that broke the
// checked contract (monotone, ending at the row count) cannot stall a block
DRE_DEVICE ReFullStep re_full_step_at(const i64* off, i64 b, i64 r0, i64 hi, int R) {
  return {r0, b, r0 < hi ? (int)lmin((i64)R, lmax(lmin(off[b + 1], hi), r0 + 1) - r0) : 0};
}

// The step after st: the rest of its slide's segment, else the next non-empty slide's first rows (a search only past
// empty slides)
DRE_DEVICE ReFullStep re_full_next_step(const ReFullStep& st, const i64* off, i64 B, i64 hi, int R) {
  const i64 r = st.r0 + st.nr;
  if (r >= hi) return {r, st.b, 0};
  i64 b = st.b;
  if (r >= off[b + 1]) b = b + 2 <= B && r < off[b + 2] ? b + 1 : re_slide_of(off, B, r);
  return re_full_step_at(off, b, r, hi, R);
}

// Before the row loop: columns D..D16 of every row buffer zeroed (staging never writes them), the first step's
// copies issued
DRE_DEVICE void re_full_begin_rows(const ReFullSmem& m, const ReFullRows& src, const ReFullStep& st, int R, int nbuf,
                                   int tid) {
  const int pad = ((src.D + 15) & ~15) - src.D;
  for (int e = tid; e < nbuf * R * pad; e += NTHREADS) m.xs[(e / pad) * m.LDD + src.D + e % pad] = 0;
  re_full_stage_rows(m.xs, m.LDD, src, st.r0, st.nr, R, tid);
  cp_async_commit();
}

// Step s's rows (st), staged and visible to the block (ends with a barrier): the next step's (nx) copies are issued
// first when double-buffered, this step's (one buffer, after the last step's barrier freed it) otherwise
DRE_DEVICE const unsigned short* re_full_step_rows(const ReFullSmem& m, const ReFullRows& src, const ReFullStep& st,
                                                   const ReFullStep& nx, i64 s, int R, int nbuf, int tid) {
  unsigned short* xs = m.xs + (nbuf == 2 ? (int)(s & 1) : 0) * R * m.LDD;
  if (nbuf == 1 && s > 0) {
    re_full_stage_rows(xs, m.LDD, src, st.r0, st.nr, R, tid);
    cp_async_commit();
  }
  if (nbuf == 2 && nx.nr > 0) {
    re_full_stage_rows(m.xs + (int)((s + 1) & 1) * R * m.LDD, m.LDD, src, nx.r0, nx.nr, R, tid);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
  return xs;
}

// xsq[r] = ||x_r||^2 of the staged rows, one warp per row
DRE_DEVICE void re_full_row_sq(float* xsq, const unsigned short* xs, int LDD, int R, int D, int dt, int tid) {
  const int warp = tid >> 5, lane = tid & 31, D16 = (D + 15) & ~15;
  for (int r = warp; r < R; r += NTHREADS / 32) {
    float sq = 0.f;
    for (int d = 2 * lane; d < D16; d += 64) {
      const unsigned p = lds_pair(xs + r * LDD + d);
      const float v0 = from_16((unsigned short)(p & 0xffffu), dt), v1 = from_16((unsigned short)(p >> 16), dt);
      sq += v0 * v0 + v1 * v1;
    }
    sq = warp_sum(sq);
    if (lane == 0) xsq[r] = sq;
  }
}

// The distance products X C^T of a step: the (R/16) x (K8/8) grid of 16 x 8 tiles, S slots per warp. A warp holds DM
// row tiles' A fragments (m0 .. m0 + DM) and multiplies each with S / DM codeword tiles (n0 ..), so each fragment of X
// and of C is read from shared memory once per 16 columns: with one row tile per warp and four codeword tiles, each
// codeword fragment was read once per row tile (2.5 KB per warp and 16 columns for 8 MMAs; DM = 3, S = 6: 2.5 KB for
// 12). Where the tile groups fill at most half the block, two warps (parts) share a group, each summing half of the
// 16-column steps; part 1 hands its sums to part 0 through shared memory (re_full_dots_combine). The forward takes
// DM = 3, S = 6 (R = 48: 4 groups of 3 x 2 tiles, 2 parts), the backward, whose slots hold <x, c> and <x, G_b> both,
// DM = 2, S = 4 (R = 64: 8 groups of 2 x 2). The kernels construct it where they use it: held across the backward's
// slice loop, its fields took registers enough to spill.
template <int DM, int S>
struct ReFullDotTiles {
  static constexpr int kSlots = S;
  int m0, n0, part, parts;
  bool active;
  DRE_DEVICE ReFullDotTiles(int R, int K, int tid) {
    const int warp = tid >> 5, mg = (R / 16 + DM - 1) / DM, ng = ((K + 7) / 8 + S / DM - 1) / (S / DM);
    const int groups = mg * ng, grp = warp % groups;
    parts = 2 * groups <= NTHREADS / 32 ? 2 : 1;
    part = warp / groups;
    active = part < parts;
    m0 = DM * (grp / ng);
    n0 = S / DM * (grp % ng);
  }
  // f(j, i, mi, ni): slot j = DM n + i of this warp holds tile (mi, ni) of the grid; i, n constants when unrolled
  template <class F>
  DRE_DEVICE void for_each(int R, int K, F&& f) const {
    if (!active) return;
#pragma unroll
    for (int j = 0; j < S; ++j) {
      const int mi = m0 + j % DM, ni = n0 + j / DM;
      if (16 * mi < R && 8 * ni < K) f(j, j % DM, mi, ni);
    }
  }
};
using ReFullFwdDots = ReFullDotTiles<3, 6>;
using ReFullBwdDots = ReFullDotTiles<2, 4>;

// dot[4j..] += X[rows, kx .. kx + kn] C^T for this warp's tiles (tl), C = c_hi + c_lo staged from column kx (row
// stride ldp, kn a multiple of 16), this part's share of the 16-column steps; WITH_G: dotg the same with G = g_hi +
// g_lo, from the same fragments of x. Two MMAs per operand and step.
template <bool WITH_G, int DM, int S>
DRE_DEVICE void re_full_dots(float* dot, float* dotg, const ReFullDotTiles<DM, S>& tl, const unsigned short* xs,
                             int LDD, int kx, int kn, const ReFullSmem& m, int ldp, int R, int K, int dt, int tid) {
  const int lane = tid & 31, g = lane >> 2, t = lane & 3, steps = kn / 16, per = (steps + tl.parts - 1) / tl.parts;
  if (!tl.active) return;
  for (int ks = tl.part * per; ks < imin(steps, (tl.part + 1) * per); ++ks) {
    const int kk = kx + 16 * ks;
    unsigned a[DM][4], bf[4];
#pragma unroll
    for (int n = 0; n < S / DM; ++n) {
      const int ni = tl.n0 + n, pb = (8 * ni + g) * ldp + kk - kx + 2 * t;
      if (8 * ni >= K) break;
      // C's fragments of this codeword tile, then G_b's, each for the warp's DM row tiles
#pragma unroll
      for (int q = 0; q < (WITH_G ? 2 : 1); ++q) {
        const unsigned short* hi = q ? m.g_hi : m.c_hi;
        const unsigned short* lo = q ? m.g_lo : m.c_lo;
        bf[0] = lds_pair(hi + pb), bf[1] = lds_pair(hi + pb + 8);
        bf[2] = lds_pair(lo + pb), bf[3] = lds_pair(lo + pb + 8);
#pragma unroll
        for (int i = 0; i < DM; ++i) {
          if (16 * (tl.m0 + i) >= R) break;
          if (n == 0 && q == 0) lds_frag_a(a[i], xs + (16 * (tl.m0 + i) + g) * LDD + kk + 2 * t, LDD);
          float* d = (q ? dotg : dot) + 4 * (DM * n + i);
          mma_16816(d, a[i], bf, dt);
          mma_16816(d, a[i], bf + 2, dt);
        }
      }
    }
  }
}

// f(i, r, k) for each element dot[i] re_full_dots gave this thread: row r, codeword k < K
template <int DM, int S, class F>
DRE_DEVICE void re_full_for_each_dot(const ReFullDotTiles<DM, S>& tl, int R, int K, int tid, F&& f) {
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  tl.for_each(R, K, [&](int j, int, int mi, int ni) {
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * mi + g + 8 * (e >> 1), k = 8 * ni + 2 * t + (e & 1);
      if (k < K) f(4 * j + e, r, k);
    }
  });
}

// The parts' sums of a split: part 1 stores its dot (dotg) in P (Pg, R x (K + 1) float32) before a barrier, and
// after it part 0 calls f(r, k, <x_r, c_k>, <x_r, G_bk>) with both parts' sums; unsplit, f is called with its own.
// before: true for the call before the barrier.
template <int DM, int S, class F>
DRE_DEVICE void re_full_dots_combine(bool before, const ReFullDotTiles<DM, S>& tl, const float* dot, const float* dotg,
                                     float* P, float* Pg, int R, int K, int tid, F&& f) {
  if (before != (tl.part == 1)) return;
  re_full_for_each_dot(tl, R, K, tid, [&](int i, int r, int k) {
    float* p = P + r * (K + 1) + k;
    float* pg = Pg ? Pg + r * (K + 1) + k : nullptr;
    if (before) {
      *p = dot[i];
      if (pg) *pg = dotg[i];
    } else {
      f(r, k, dot[i] + (tl.parts == 2 ? *p : 0.f), pg ? dotg[i] + (tl.parts == 2 ? *pg : 0.f) : 0.f);
    }
  });
}

// at_hi + at_lo (K16 x LDR) = W^T split into 16-bit parts; W (R x K float32, row stride K + 1); zero past K
DRE_DEVICE void re_full_split_t(const ReFullSmem& m, const float* W, const FastDiv& R, int K, int dt, int tid) {
  const int K16 = (K + 15) & ~15;
  for (int e = tid; e < K16 * R.d; e += NTHREADS) {
    const int k = R.div(e), r = e - k * R.d;
    split_16(k < K ? W[r * (K + 1) + k] : 0.f, dt, m.at_hi[k * m.LDR + r], m.at_lo[k * m.LDR + r]);
  }
}

// The accumulator's tiles: slot j = 3 (c nk + ni) + i of warp w holds E^T's 16 x 8 tile of columns dtile = w dpw + 3c + i
// (dpw = ceil(D16 / 128) column tiles per warp, in chunks of RE_FULL_DCH = 3) and codewords 8 ni .. (nk = K8 / 8), so
// that a chunk's three 16-column tiles of X stay in registers while each 8-codeword tile of W^T is loaded once
// (launch_rules.h re_tc_full_config: ceil(dpw / 3) 3 nk <= RE_FULL_TILES). f(j, i, dtile, ni) for each slot of this
// warp's that holds a tile (the dtile < D16 / 16); i is a constant where the loop is unrolled.
template <class F>
DRE_DEVICE void re_full_for_each_tile(int K, int D, int tid, F&& f) {
  const int warp = tid >> 5, nd = ((D + 15) & ~15) / 16, dpw = (nd + 7) / 8, nk = ((K + 7) & ~7) / 8;
#pragma unroll
  for (int j = 0; j < RE_FULL_TILES; ++j) {
    const int i = j % RE_FULL_DCH, c = j / RE_FULL_DCH / nk, ni = j / RE_FULL_DCH % nk;
    const int dl = RE_FULL_DCH * c + i, dtile = warp * dpw + dl;
    if (dl < dpw && dtile < nd) f(j, i, dtile, ni);
  }
}

// acc += (W^T X)^T = X^T W over all D columns and the rows below nr (W^T from re_full_split_t, zero past nr); exact: W
// is 0/1, exact in 16 bits, so its hi part alone (one MMA). X^T is the A operand (ldmatrix .trans of the staged rows),
// W^T's hi and lo parts the B operand.
DRE_DEVICE void re_full_aggregate(float* acc, const ReFullSmem& m, const unsigned short* xs, int nr, int K, int D,
                                  bool exact, int dt, int tid) {
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  // this lane's row of the four 8 x 8 matrices of a 16 x 16 block of X (ldmatrix_x4_trans)
  const unsigned short* xl = xs + ((lane & 7) + 8 * (lane >> 4)) * m.LDD + 8 * ((lane >> 3) & 1);
  for (int kr = 0; kr < nr; kr += 16) {
    unsigned ax[RE_FULL_DCH][4], bh[2], bl[2];
    re_full_for_each_tile(K, D, tid, [&](int j, int i, int dtile, int ni) {
      if (i == 0) {  // the next 8 codewords of W^T
        const int pb = (8 * ni + g) * m.LDR + kr + 2 * t;
        bh[0] = lds_pair(m.at_hi + pb);
        bh[1] = lds_pair(m.at_hi + pb + 8);
        if (!exact) {
          bl[0] = lds_pair(m.at_lo + pb);
          bl[1] = lds_pair(m.at_lo + pb + 8);
        }
      }
      if (ni == 0) ldmatrix_x4_trans(ax[i], xl + kr * m.LDD + 16 * dtile);  // a chunk's first pass: its tiles of X
      mma_16816(acc + 4 * j, ax[i], bh, dt);
      if (!exact) mma_16816(acc + 4 * j, ax[i], bl, dt);
    });
  }
}

// f(k, d, v) for each element v = acc[i] re_full_aggregate gave this thread, k < K and d < D
template <class F>
DRE_DEVICE void re_full_for_each_out(const float* acc, int K, int D, int tid, F&& f) {
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  re_full_for_each_tile(K, D, tid, [&](int j, int, int dtile, int ni) {
    for (int e = 0; e < 4; ++e) {
      const int d = 16 * dtile + g + 8 * (e >> 1), k = 8 * ni + 2 * t + (e & 1);
      if (k < K && d < D) f(k, d, acc[4 * j + e]);
    }
  });
}

DRE_GLOBAL void DRE_MIN_BLOCKS(1) dre_re_fwd_tc_full(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx,
                                                     int idx64, int gather, const i64* off, i64 n_rows,
                                                     const float* C, const float* csq, const float* scale,
                                                     float* acc_out, float* mass_out, i64 B, int K, int D, i64 span,
                                                     int hard, int R, int nbuf, int vec) {
  DRE_DYN_SMEM(smem);
  const i64 lo = (i64)blockIdx.x * span, hi = lmin(n_rows, lo + span);
  if (lo >= hi || B <= 0) return;
  const int tid = threadIdx.x, dt = rows_dt, D16 = (D + 15) & ~15;
  const ReFullSmem m = re_full_smem(smem, R, K, D, nbuf, 0, false);
  const ReFullRows src{rows, s_r, s_c, idx, idx64, gather, D, vec, FastDiv(vec ? D / 8 : D)};
  const FastDiv by_r(R);

  // the first step's rows load while the codewords are split
  ReFullStep st = re_full_step_at(off, re_slide_of_warp(off, B, lo, tid & 31), lo, hi, R);
  re_full_begin_rows(m, src, st, R, nbuf, tid);
  re_tc_load_split<48>(m.c_hi, m.c_lo, C, dt, K, D, 0, FastDiv(D16), tid);
  for (int k = tid; k < K; k += NTHREADS) m.msum[k] = 0.f;
  float acc[4 * RE_FULL_TILES];
#pragma unroll
  for (int j = 0; j < 4 * RE_FULL_TILES; ++j) acc[j] = 0.f;

  for (i64 s = 0; st.nr > 0; ++s) {
    const ReFullStep nx = re_full_next_step(st, off, B, hi, R);
    const int nr = st.nr;
    const unsigned short* xs = re_full_step_rows(m, src, st, nx, s, R, nbuf, tid);
    // (1) ||x_r||^2 (soft) and the distance products <x_r, c_k>
    if (!hard) re_full_row_sq(m.xsq, xs, m.LDD, R, D, dt, tid);
    float dot[4 * ReFullFwdDots::kSlots];
#pragma unroll
    for (int j = 0; j < 4 * ReFullFwdDots::kSlots; ++j) dot[j] = 0.f;
    re_full_dots<false>(dot, dot, ReFullFwdDots(R, K, tid), xs, m.LDD, 0, D16, m, m.LDP, R, K, dt, tid);
    re_full_dots_combine(true, ReFullFwdDots(R, K, tid), dot, dot, m.A, nullptr, R, K, tid, [](int, int, float, float) {});
    __syncthreads();  // xsq, part 1's sums
    re_full_dots_combine(false, ReFullFwdDots(R, K, tid), dot, dot, m.A, nullptr, R, K, tid, [&](int r, int k, float xc, float) {
      m.A[r * (K + 1) + k] = re_distance(hard, m.xsq[r], xc, csq[k]);
    });
    __syncthreads();
    // (2) assignments, their column sums, and A^T split into hi + lo (zero past nr and K)
    re_assign_fwd<RE_FULL_KS>(m.A, m.kmin, m.msum, nr, R, K, hard, scale, tid);
    re_full_split_t(m, m.A, by_r, K, dt, tid);
    __syncthreads();
    // (3) acc += A^T X over all columns (hard: A is 0/1: one MMA)
    re_full_aggregate(acc, m, xs, nr, K, D, hard, dt, tid);
    __syncthreads();  // xs, A and at are rewritten by the next step
    if (nx.nr == 0 || nx.b != st.b) {  // the slide's segment ends: E_b += acc - mass c, mass_b += msum
      const i64 b = st.b;
      re_full_for_each_out(acc, K, D, tid, [&](int k, int d, float v) {
        const i64 o = (i64)k * D + d;
        atomicAdd(acc_out + b * K * D + o, v - m.msum[k] * C[o]);
      });
      if (mass_out != 0)
        for (int k = tid; k < K; k += NTHREADS) atomicAdd(mass_out + b * K + k, m.msum[k]);
#pragma unroll
      for (int j = 0; j < 4 * RE_FULL_TILES; ++j) acc[j] = 0.f;
      __syncthreads();  // msum read
      for (int k = tid; k < K; k += NTHREADS) m.msum[k] = 0.f;
    }
    st = nx;
  }
}

// cg (2 x K8 x DTS float32) = columns [dd, dd + DTS) of C, then of G_b (K x D, row stride D), zeros past K and D:
// 16-byte cp.async where vec16 (D % 4 = 0 and both 16-byte aligned: a piece is all in or all past D), else loaded
// here (uncommitted: the caller closes the group)
// (per: DTS / 4 where vec16, else DTS)
DRE_DEVICE void re_full_copy_cg(float* cg, const float* C, const float* Gb, int K, int D, int dd, int DTS,
                                const FastDiv& per, bool vec16, int tid) {
  const int K8 = (K + 7) & ~7;
  if (vec16) {
    for (int e = tid; e < 2 * K8 * per.d; e += NTHREADS) {
      const int mk = per.div(e), k = mk < K8 ? mk : mk - K8, d4 = 4 * (e - mk * per.d), d = dd + d4;
      const float* P = mk < K8 ? C : Gb;
      const bool in = k < K && d < D;
      cp_async_16(cg + mk * DTS + d4, in ? P + (i64)k * D + d : P, in);
    }
  } else {
    staged_copy<16>(
        2 * K8 * DTS, tid,
        [&](int e) -> float {
          const int mk = per.div(e), k = mk < K8 ? mk : mk - K8, d = dd + e - mk * DTS;
          return k < K && d < D ? (mk < K8 ? C : Gb)[(i64)k * D + d] : 0.f;
        },
        [&](int e, float v) { cg[e] = v; });
  }
}

// c_hi + c_lo, g_hi + g_lo (K8 x LDP, 16-bit) = cg split
DRE_DEVICE void re_full_split_cg(const ReFullSmem& m, int K, const FastDiv& DTS, int dt, int tid) {
  const int K8 = (K + 7) & ~7;
  for (int e = tid; e < 2 * K8 * DTS.d; e += NTHREADS) {
    const int mk = DTS.div(e), o = (mk < K8 ? mk : mk - K8) * m.LDP + e - mk * DTS.d;
    if (mk < K8)
      split_16(m.cg[e], dt, m.c_hi[o], m.c_lo[o]);
    else
      split_16(m.cg[e], dt, m.g_hi[o], m.g_lo[o]);
  }
}

// The soft backward's summing pass over one source (no grad x), as re_bwd_body's with need_c: adds hx = sum_i h_ik x_i
// (K, D), hsum, gsum = -sum_i h_ik d_ik (K) and mass (B, K); G (B, K, D) and gc (B, K) = <G_bk, c_k> float32. DTS:
// the columns of C and G_b staged at a time (a multiple of 16).
DRE_GLOBAL void DRE_MIN_BLOCKS(1) dre_re_bwd_tc_full(const void* rows, int rows_dt, i64 s_r, i64 s_c, const void* idx,
                                                     int idx64, int gather, const i64* off, i64 n_rows,
                                                     const float* C, const float* csq, const float* scale,
                                                     const float* G, const float* gc, float* hx_out, float* hsum_out,
                                                     float* gsum_out, float* mass_out, i64 B, int K, int D, i64 span,
                                                     int R, int nbuf, int vec, int DTS) {
  DRE_DYN_SMEM(smem);
  const i64 lo = (i64)blockIdx.x * span, hi = lmin(n_rows, lo + span);
  if (lo >= hi || B <= 0) return;
  const int tid = threadIdx.x, dt = rows_dt, D16 = (D + 15) & ~15;
  const ReFullSmem m = re_full_smem(smem, R, K, D, nbuf, DTS, true);
  const ReFullRows src{rows, s_r, s_c, idx, idx64, gather, D, vec, FastDiv(vec ? D / 8 : D)};
  const FastDiv by_r(R), by_dts(DTS);
  // G_b of every slide is 16-byte aligned where G is and D % 4 = 0
  const bool vec16 = (D & 3) == 0 && (((u64)C | (u64)G) & 15ull) == 0;
  const FastDiv cg_per_row(vec16 ? DTS / 4 : DTS);  // re_full_copy_cg's copies per row
  const int slices = (D16 + DTS - 1) / DTS;
  // the first step's rows, and the first slice of C and G_b, while the sums are zeroed
  ReFullStep st = re_full_step_at(off, re_slide_of_warp(off, B, lo, tid & 31), lo, hi, R);
  re_full_begin_rows(m, src, st, R, nbuf, tid);
  re_full_copy_cg(m.cg, C, G + st.b * K * D, K, D, 0, DTS, cg_per_row, vec16, tid);
  cp_async_commit();
  for (int k = tid; k < K; k += NTHREADS) m.msum[k] = m.hsum[k] = m.gsum[k] = 0.f;
  float acc[4 * RE_FULL_TILES];
#pragma unroll
  for (int j = 0; j < 4 * RE_FULL_TILES; ++j) acc[j] = 0.f;

  for (i64 s = 0; st.nr > 0; ++s) {
    const ReFullStep nx = re_full_next_step(st, off, B, hi, R);
    const int nr = st.nr;
    unsigned short* xs = m.xs + (nbuf == 2 ? (int)(s & 1) : 0) * R * m.LDD;
    // the next step's buffer, filled a share per slice (nbuf = 2; with one buffer the next rows wait for the step)
    unsigned short* xs1 = nbuf == 2 ? m.xs + (int)((s + 1) & 1) * R * m.LDD : nullptr;
    if (nbuf == 1 && s > 0) {  // its one buffer is free only now
      re_full_stage_rows(xs, m.LDD, src, st.r0, nr, R, tid);
      cp_async_commit();
    }
    // the next step's row offsets, read by its shares below: the index read once per step, not before each share
    if (nbuf == 2 && nx.nr > 0)
      for (int r = tid; r < R; r += NTHREADS)
        m.roff[r] = r < nx.nr ? re_source_row(nx.r0, r, src.idx, src.idx64, src.gather) * s_r : 0;
    cp_async_wait<0>();  // this step's rows and the first slice
    __syncthreads();
    // (1) ||x_r||^2, <x_r, c_k> and <x_r, G_bk>: C and G_b DTS columns at a time
    re_full_row_sq(m.xsq, xs, m.LDD, R, D, dt, tid);
    float dot[4 * ReFullBwdDots::kSlots], dotg[4 * ReFullBwdDots::kSlots];
#pragma unroll
    for (int j = 0; j < 4 * ReFullBwdDots::kSlots; ++j) dot[j] = dotg[j] = 0.f;
    for (int sl = 0; sl < slices; ++sl) {
      if (sl > 0) {
        cp_async_wait<0>();  // this slice (and the share of rows copied with it)
        __syncthreads();
      }
      re_full_split_cg(m, K, by_dts, dt, tid);
      __syncthreads();  // cg is free, the parts are ready
      // copy the next slice (this step's, or the next step's first) and a share of the next step's rows
      if (sl + 1 < slices || nx.nr > 0)  // (G_b of the next step's slide)
        re_full_copy_cg(m.cg, C, G + (sl + 1 < slices ? st.b : nx.b) * K * D, K, D,
                        sl + 1 < slices ? (sl + 1) * DTS : 0, DTS, cg_per_row, vec16, tid);
      if (nbuf == 2 && nx.nr > 0) re_full_stage_rows(xs1, m.LDD, src, nx.r0, nx.nr, R, tid, sl, slices, m.roff);
      cp_async_commit();
      re_full_dots<true>(dot, dotg, ReFullBwdDots(R, K, tid), xs, m.LDD, sl * DTS, imin(DTS, D16 - sl * DTS), m, m.LDP, R, K, dt, tid);
      if (sl + 1 == slices)
        re_full_dots_combine(true, ReFullBwdDots(R, K, tid), dot, dotg, m.A, m.H, R, K, tid, [](int, int, float, float) {});
      __syncthreads();  // the next split overwrites the parts; after the last: xsq, part 1's sums
    }
    re_full_dots_combine(false, ReFullBwdDots(R, K, tid), dot, dotg, m.A, m.H, R, K, tid, [&](int r, int k, float xc, float xg) {
      m.A[r * (K + 1) + k] = re_distance(false, m.xsq[r], xc, csq[k]);
      m.H[r * (K + 1) + k] = xg - gc[st.b * K + k];  // g_rk
    });
    __syncthreads();
    // (2) a, h = a (g - <a, g>), mass, hsum and gsum (re_assign_bwd); h^T split into hi + lo
    re_assign_bwd<RE_FULL_KS>(m.A, m.H, m.shr, m.msum, m.hsum, m.gsum, nr, R, K, scale, 1, tid);
    __syncthreads();
    re_full_split_t(m, m.H, by_r, K, dt, tid);
    __syncthreads();
    // (3) acc += h^T X over all columns
    re_full_aggregate(acc, m, xs, nr, K, D, false, dt, tid);
    __syncthreads();  // xs, A, H and at are rewritten by the next step
    if (nx.nr == 0 || nx.b != st.b) {  // the slide's segment ends: mass_b += msum
      for (int k = tid; k < K; k += NTHREADS) atomicAdd(mass_out + st.b * K + k, m.msum[k]);
      __syncthreads();  // msum read
      for (int k = tid; k < K; k += NTHREADS) m.msum[k] = 0.f;
    }
    if (nx.nr == 0) {  // the block's rows end: the sums over slides
      re_full_for_each_out(acc, K, D, tid, [&](int k, int d, float v) { atomicAdd(hx_out + (i64)k * D + d, v); });
      for (int k = tid; k < K; k += NTHREADS) {
        atomicAdd(hsum_out + k, m.hsum[k]);
        atomicAdd(gsum_out + k, m.gsum[k]);
      }
    }
    st = nx;
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

cudaError_t re_fwd_tc(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                      i64 s_c, const void* idx, int idx64, int gather, const i64* off, const i64* slide,
                      const i64* cstart, const float* C, const float* csq, const float* scale, float* acc_out,
                      float* mass_out, const float* G, void* gx, int gx_dt, i64 B, int K, int D, i64 chunk, int hard,
                      int with_e, int R, int DO, int DT) {
  if (grid > 0)
    dre_re_fwd_tc<<<grid, NTHREADS, smem, stream>>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart,
                                                    C, csq, scale, acc_out, mass_out, G, gx, gx_dt, B, K, D, chunk,
                                                    hard, with_e, R, DO, DT);
  return cudaGetLastError();
}

cudaError_t re_bwd_tc(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                      i64 s_c, const void* idx, int idx64, int gather, const i64* off, const i64* slide,
                      const i64* cstart, const float* C, const float* csq, const float* scale, const float* G,
                      const float* gc, float* hx_out, float* hsum_out, float* gsum_out, float* mass_out, void* gx,
                      int gx_dt, i64 B, int K, int D, i64 chunk, int write_gx, int need_c, int R, int DO, int DT) {
  if (grid > 0)
    dre_re_bwd_tc<<<grid, NTHREADS, smem, stream>>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, slide, cstart,
                                                    C, csq, scale, G, gc, hx_out, hsum_out, gsum_out, mass_out, gx,
                                                    gx_dt, B, K, D, chunk, write_gx, need_c, R, DO, DT);
  return cudaGetLastError();
}

cudaError_t re_fwd_tc_full(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                           i64 s_c, const void* idx, int idx64, int gather, const i64* off, i64 n_rows, const float* C,
                           const float* csq, const float* scale, float* acc_out, float* mass_out, i64 B, int K, int D,
                           i64 span, int hard, int R, int nbuf, int vec) {
  if (grid == 0) return cudaSuccess;
  // past 48 KB, dynamic shared memory needs the kernel's opt-in (the host checked the device's limit)
  cudaError_t e = cudaFuncSetAttribute(dre_re_fwd_tc_full, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  dre_re_fwd_tc_full<<<grid, NTHREADS, smem, stream>>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, n_rows, C,
                                                       csq, scale, acc_out, mass_out, B, K, D, span, hard, R, nbuf,
                                                       vec);
  return cudaGetLastError();
}

cudaError_t re_bwd_tc_full(unsigned grid, unsigned smem, cudaStream_t stream, const void* rows, int rows_dt, i64 s_r,
                           i64 s_c, const void* idx, int idx64, int gather, const i64* off, i64 n_rows, const float* C,
                           const float* csq, const float* scale, const float* G, const float* gc, float* hx_out,
                           float* hsum_out, float* gsum_out, float* mass_out, i64 B, int K, int D, i64 span, int R,
                           int nbuf, int vec, int DTS) {
  if (grid == 0) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(dre_re_bwd_tc_full, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  dre_re_bwd_tc_full<<<grid, NTHREADS, smem, stream>>>(rows, rows_dt, s_r, s_c, idx, idx64, gather, off, n_rows, C,
                                                       csq, scale, G, gc, hx_out, hsum_out, gsum_out, mass_out, B, K,
                                                       D, span, R, nbuf, vec, DTS);
  return cudaGetLastError();
}
}  // namespace dre_cuda_launch
#endif
