// dre contrastive_loss on CUDA: one pass for the row and column log-sum-exps, recomputing backward, O(B*P + B) memory.
//
//   u_i = a_i / max(||a_i||, 1e-12) if normalize else a_i (v likewise from b);  l_ij = s inv_a_i inv_b_j <a_i, b_j>
//   r_i = LSE_j l_ij - mean_{j in P_i} l_ij,   c_j = LSE_i l_ij - mean_{i in P_j} l_ij,   loss = (r + c) / 2
//
// Forward (the Triton kernel's algorithm): block I owns CL_BI rows and walks every CL_BJ-column tile once; the tile
// of logits is computed with SIMT float32 FMA over CL_PT-wide shared slices of P (4 x 4 outputs per thread) and kept
// in shared memory. Rows: online max/sum in shared state. Columns: each tile reduces its columns to
// (m_t, sum_i exp(l_ij - m_t)) and adds sum * exp(m_t - ref_j) in float64 into csum_j with one atomicAdd per column
// per tile, where ref_j = |s| max_i ||u_i|| ||v_j|| >= l_ij (Cauchy-Schwarz) is known before the pass;
// col_lse = ref + log(csum). Positive logits are summed per row in shared memory and per column atomically.
// A column whose logits all lie more than ~640 below ref_j (unnormalised inputs with large norms) underflows there:
// dre_cl_finish, launched after the pass, recomputes exactly the columns that did (none with normalize, |s| <= 300).
// Both log-sum-exps leave the diagonal out and each row's diagonal logit l_ii is kept: dre_cl_finish then forms
// R_i = logaddexp(O_i, l_ii) and, where l_ii is the row's only positive, r_i = log(1 + exp(O_i - l_ii))
// (the arithmetic of dre_kernels.contrastive_loss.contrastive_loss_finish), which keeps its relative precision as
// r_i -> 0.
//
// Backward: W_ij = dL/dl_ij = g_i/2 (exp(l_ij - R_i) - M_ij/n_i) + g_j/2 (exp(l_ij - C_j) - M_ij/n_j);
// grad u_i = s sum_j W_ij v_j (one launch with x = a), grad v_j = s sum_i W_ij u_i (same kernel with the roles
// swapped), grad s = sum_ij W_ij <u_i, v_j> (per row block, summed on the host); on the diagonal of a row whose only
// positive it is, exp(l_ii - R_i) - 1 is expm1(-r_i) of the forward's r_i, free of that difference's cancellation.
// Block (I, p) owns CL_BI rows and a CL_BI-wide tile of P; it recomputes each logits tile, turns it into W in shared
// memory and multiplies by the matching tile of y. Labels: int32 or int64 (lab64), or none (positives: i == j).
//
// Tensor cores (tc = 1; sm_80+, both sides bfloat16): every logit tile is computed with mma.sync.m16n8k16 on the
// rows as stored (exact products, float32 accumulation over CL_PT_TC-wide slices of P, each slice's rows staged by
// 16-byte cp.async into one of two buffers while the other slice computes), in the forward, the column fix
// and both backward calls alike, a's rows always the MMA's A operand (the y side's call computes the transposed tile
// and reads it back transposed), so that the backward's logits are the forward's to the bit. The backward
// (dre_cl_bwd_tc) also multiplies W by y on the tensor cores: W (float32) split into bfloat16 hi + lo parts (two MMAs,
// ~16 mantissa bits, float32's range), over CL_PO_TC-wide pieces of P: dre_cl_bwd_tc_wide (where P > CL_PO_TC)
// holds CL_PO_WIDE pieces per block (128 accumulators per thread, one block per SM), so the logit tiles and W are
// computed once per side up to P = 512 where dre_cl_bwd_tc (one piece, two blocks per SM) computes them ceil(P / 128)
// times (the SIMT backward P / 64 times); DRE_KERNELS_CUDA_FULL_WIDTH=0 keeps dre_cl_bwd_tc, to time the two. float16
// rows stay on the SIMT kernels: W scales with the upstream gradient (~p_ij / B under a mean) and float16 parts end
// at 6e-8, where it would flush to zero.
//
// Launch rules: 256 threads; forward and finish grid ceil(B / 64), backward grid ceil(B / 64) * ceil(P / 64)
// (dre_cl_bwd_tc: ceil(B / 64) * ceil(P / CL_PO_TC); dre_cl_bwd_tc_wide: ceil(B / 64) * ceil(P / 512)), the norms
// min(ceil(2B / 8), 65535 * 16) and the normalisation's backward min(ceil(B / 8), 65535 * 16) (a warp per row,
// grid-stride); dynamic shared memory 0 (static arrays only).
#include "dre_common.cuh"

namespace dre_cuda {
enum { CL_BI = 64, CL_BJ = 64, CL_PT = 16, CL_PT_TC = 32, CL_PO_TC = 128, CL_PO_WIDE = 4 };
// the P-slice staging of one side of a logit tile, in floats: 64 x 17 float32 values (SIMT) or two buffers of
// 64 x (CL_PT_TC + 8) 16-bit values (tensor cores: the next slice loads while this one computes)
constexpr int CL_STAGE = CL_BI * (CL_PT_TC + 8) > CL_BI * (CL_PT + 1) ? CL_BI * (CL_PT_TC + 8) : CL_BI * (CL_PT + 1);
// a column sum at the bound below this has lost its largest terms to underflow (float64 normals end at 2.2e-308)
constexpr double CL_TINY = 1e-280;

// l = s uv with uv = dot (inv_i inv_j): symmetric in the two sides, so either side's backward recomputes the
// forward's logit bit for bit (the dots are the same FMA chain over P); __fmul_rn is never fused into an FMA, so l
// is rounded before a max is subtracted from it (a fused s * uv - m leaves the product's rounding error in e^{l - m}
// at the max, and a gradient of s x ulp(l) in a saturated loss whose exact gradient is 0).
DRE_DEVICE float cl_uv(float dot, float inv_i, float inv_j) { return dot * (inv_i * inv_j); }
DRE_DEVICE float cl_logit(float s, float uv) { return __fmul_rn(s, uv); }

// The column bound ref_j = |s| max_i ||u_i|| ||v_j|| >= l_ij (Cauchy-Schwarz) from dre_cl_norms's buffer: bound points
// at its norms of b (bound[j] = ||b_j||), followed by max_i ||u_i|| (bound[B]); ||v_j|| = ||b_j|| invb_j.
DRE_DEVICE float cl_ref(float s, const float* bound, const float* invb, i64 j, i64 B) {
  return fabsf(s) * bound[B] * (bound[j] * invb[j]);
}

// dot[u][v] += <x_{i0 + ty + 16u}, y_{j0 + tx + 16v}> over all of P, through shared slices xs, ys (64 x 17)
DRE_DEVICE void cl_tile_dot(const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y, int y_dt, i64 s_yr, i64 s_yc,
                            i64 i0, i64 j0, i64 B, int P, float* xs, float* ys, float dot[4][4]) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < 4; ++v) dot[u][v] = 0.f;
  for (int p0 = 0; p0 < P; p0 += CL_PT) {
    // rows r0.. of t, columns p0 .. p0 + CL_PT, into dst (zeros past B and P)
    const auto stage = [&](float* dst, const void* t, int t_dt, i64 s_r, i64 s_c, i64 r0) {
      staged_copy<CL_BI * CL_PT / NTHREADS>(
          CL_BI * CL_PT, tid,
          [&](int e) -> float {
            const int r = e / CL_PT, p = e % CL_PT;
            return (p0 + p < P && r0 + r < B) ? load_f(t, (r0 + r) * s_r + (i64)(p0 + p) * s_c, t_dt) : 0.f;
          },
          [&](int e, float v) { dst[(e / CL_PT) * (CL_PT + 1) + e % CL_PT] = v; });
    };
    stage(xs, x, x_dt, s_xr, s_xc, i0);
    stage(ys, y, y_dt, s_yr, s_yc, j0);
    __syncthreads();
    for (int p = 0; p < CL_PT; ++p) {
      float xv[4], yv[4];
      for (int u = 0; u < 4; ++u) xv[u] = xs[(ty + 16 * u) * (CL_PT + 1) + p];
      for (int v = 0; v < 4; ++v) yv[v] = ys[(tx + 16 * v) * (CL_PT + 1) + p];
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 4; ++v) dot[u][v] += xv[u] * yv[v];
    }
    __syncthreads();
  }
}

// The tensor-core tile: dot[n][e] += <x_{i0 + r}, y_{j0 + c}> over all of P for this warp's 16 x 32 piece of the
// 64 x 64 tile (rows 16 (warp % 4).., columns 32 (warp / 4)..; (r, c) of each value: cl_tc_rc), x and y 16-bit of
// dtype dt, staged raw CL_PT_TC columns of P at a time through two buffers each (xs, ys: 2 x 64 x (CL_PT_TC + 8)
// 16-bit, CL_TC_SLICE elements apart): while one slice's MMAs run, the next slice's copies are in flight. Ends with a
// barrier.
DRE_DEVICE void cl_tc_rc(int warp, int lane, int n, int e, int& r, int& c) {
  r = 16 * (warp & 3) + (lane >> 2) + 8 * (e >> 1);
  c = 32 * (warp >> 2) + 8 * n + 2 * (lane & 3) + (e & 1);
}

// Where a logit tile's side is read: 16-bit rows, and whether they may be copied 16 bytes at a time (cp.async:
// contiguous rows, P and the row stride multiples of 8, a 16-byte aligned base); else element by element
struct ClTcRows {
  const unsigned short* rows;
  i64 s_r, s_c;
  int vec;
  DRE_DEVICE ClTcRows(const void* p, i64 s_r_, i64 s_c_, int P)
      : rows((const unsigned short*)p), s_r(s_r_), s_c(s_c_),
        vec(s_c_ == 1 && P % 8 == 0 && s_r_ % 8 == 0 && ((unsigned long long)p & 15ull) == 0) {}
};

// dst (64 x W, row stride W + 8) = columns [p0, p0 + W) of rows r0 .. r0 + 63 (zeros past B and P), then a commit:
// asynchronous where src.vec (P % 8 = 0, so a 16-byte chunk is all in or all past P). Both loops stay rolled:
// unrolled, the kernels around them spilled at their 128-register cap.
template <int W>
DRE_DEVICE void cl_tc_stage(unsigned short* dst, const ClTcRows& src, i64 r0, int p0, i64 B, int P, int tid) {
  constexpr int ld = W + 8, per = W / 8;
  if (src.vec) {
#pragma unroll 1
    for (int e = tid; e < CL_BI * per; e += NTHREADS) {
      const int r = e / per, p = p0 + 8 * (e % per);
      const bool in = r0 + r < B && p < P;
      cp_async_16(dst + r * ld + 8 * (e % per), in ? src.rows + (r0 + r) * src.s_r + p : src.rows, in);
    }
  } else {
    staged_copy(
        CL_BI * W, tid,
        [&](int e) -> unsigned short {
          const int r = e / W, p = e % W;
          return (p0 + p < P && r0 + r < B) ? src.rows[(r0 + r) * src.s_r + (i64)(p0 + p) * src.s_c]
                                            : (unsigned short)0;
        },
        [&](int e, unsigned short v) { dst[(e / W) * ld + e % W] = v; });
  }
  cp_async_commit();
}

constexpr int CL_TC_SLICE = CL_BI * (CL_PT_TC + 8);  // 16-bit elements of one staged slice of one side

DRE_DEVICE void cl_tile_dot_tc(const void* x, i64 s_xr, i64 s_xc, const void* y, i64 s_yr, i64 s_yc, int dt, i64 i0,
                               i64 j0, i64 B, int P, unsigned short* xs, unsigned short* ys, float dot[4][4]) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int ld = CL_PT_TC + 8;
  const ClTcRows xsrc(x, s_xr, s_xc, P), ysrc(y, s_yr, s_yc, P);
  for (int n = 0; n < 4; ++n)
    for (int e = 0; e < 4; ++e) dot[n][e] = 0.f;
  cl_tc_stage<CL_PT_TC>(xs, xsrc, i0, 0, B, P, tid);
  cl_tc_stage<CL_PT_TC>(ys, ysrc, j0, 0, B, P, tid);
  for (int p0 = 0, buf = 0; p0 < P; p0 += CL_PT_TC, buf ^= 1) {
    if (p0 + CL_PT_TC < P) {  // the next slice into the other buffers (freed by the last slice's closing barrier)
      cl_tc_stage<CL_PT_TC>(xs + (buf ^ 1) * CL_TC_SLICE, xsrc, i0, p0 + CL_PT_TC, B, P, tid);
      cl_tc_stage<CL_PT_TC>(ys + (buf ^ 1) * CL_TC_SLICE, ysrc, j0, p0 + CL_PT_TC, B, P, tid);
      cp_async_wait<2>();  // this slice's two groups landed, the next slice's two may be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned short* xb = xs + buf * CL_TC_SLICE;
    const unsigned short* yb0 = ys + buf * CL_TC_SLICE;
    for (int kk = 0; kk < CL_PT_TC; kk += 16) {
      const unsigned short* xa = xb + (16 * (warp & 3) + g) * ld + kk + 2 * t;
      unsigned a[4];
      lds_frag_a(a, xa, ld);
      for (int n = 0; n < 4; ++n) {
        const unsigned short* yb = yb0 + (32 * (warp >> 2) + 8 * n + g) * ld + kk + 2 * t;
        const unsigned b[2] = {lds_pair(yb), lds_pair(yb + 8)};
        mma_16816(dot[n], a, b, dt);
      }
    }
    __syncthreads();
  }
}

// L[r][c] = l_{i0 + r, j0 + c} = s inva_i <a_i, b_j> invb_j for the 64 x 64 tile (-inf outside B x B), on the tensor
// cores when tc (both a and b of the 16-bit dtype a_dt); ends with a barrier, so L is ready for any thread
DRE_DEVICE void cl_logits_tile(const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* bm, int b_dt, i64 s_br,
                               i64 s_bc, const float* inva, const float* invb, float s, i64 i0, i64 j0, i64 B, int P,
                               int tc, float* xs, float* ys, float* L) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
  float dot[4][4];
  if (tc) {
    cl_tile_dot_tc(a, s_ar, s_ac, bm, s_br, s_bc, a_dt, i0, j0, B, P, (unsigned short*)xs, (unsigned short*)ys, dot);
  } else {
    cl_tile_dot(a, a_dt, s_ar, s_ac, bm, b_dt, s_br, s_bc, i0, j0, B, P, xs, ys, dot);
  }
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < 4; ++v) {
      int r = ty + 16 * u, c = tx + 16 * v;
      if (tc) cl_tc_rc(warp, lane, u, v, r, c);
      const i64 i = i0 + r, j = j0 + c;
      L[r * (CL_BJ + 1) + c] = (i < B && j < B) ? cl_logit(s, cl_uv(dot[u][v], inva[i], invb[j])) : -f_inf();
    }
  __syncthreads();
}

DRE_DEVICE bool cl_positive(const void* labels, int lab64, int has_labels, i64 i, i64 j) {
  return has_labels ? load_index(labels, i, lab64) == load_index(labels, j, lab64) : i == j;
}

// The backward's weight of logit (i, j) from its dot <x_i, y_j>, times invy_j (0 outside B x B): W_ij as in the file
// comment; gsl += W_ij <u_i, v_j>.
DRE_DEVICE float cl_bwd_weight(float dot, i64 i, i64 j, i64 B, const float* invx, const float* invy,
                               const void* labels, int lab64, int has_labels, float s, const float* lx,
                               const float* ly, const float* rx, const float* ry, const float* g, const float* npos,
                               float& gsl) {
  if (i >= B || j >= B) return 0.f;
  const float uv = cl_uv(dot, invx[i], invy[j]);
  const float l = cl_logit(s, uv);
  // npos null (no labels): P_i = {i}, |P_i| = 1
  const float ni = npos ? npos[i] : 1.f;
  float w;
  if (i == j && ni == 1.f) {
    w = 0.5f * g[i] * (expm1f(-rx[i]) + expm1f(-ry[i]));
  } else {
    const float pos = cl_positive(labels, lab64, has_labels, i, j) ? 1.f : 0.f;
    const float nj = npos ? npos[j] : 1.f;
    w = 0.5f * g[i] * (expf(l - lx[i]) - pos / ni) + 0.5f * g[j] * (expf(l - ly[j]) - pos / nj);
  }
  gsl += w * uv;
  return w * invy[j];
}

// grad s partial of a row block: the block's sum of gsl, written to gs_out[pid_i] by thread 0
DRE_DEVICE void cl_block_sum(float gsl, float* red, float* gs_out, i64 pid_i) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  gsl = warp_sum(gsl);
  if (lane == 0) red[warp] = gsl;
  __syncthreads();
  if (tid == 0) {
    float t = 0.f;
    for (int w = 0; w < NTHREADS / 32; ++w) t += red[w];
    gs_out[pid_i] = t;
  }
}
}  // namespace dre_cuda

using namespace dre_cuda;

// rlse (the off-diagonal row log-sum-exps), rdiag (l_ii), rpos (B) float32 written; csum (B) float64 (off-diagonal)
// and cpos (B) float32 accumulated (zeroed by the host).
DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_cl_fwd(const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* bm, int b_dt,
                                             i64 s_br, i64 s_bc, const float* inva, const float* invb,
                                             const void* labels, int lab64, int has_labels, const float* scale,
                                             const float* bound, float* rlse, float* rdiag, float* rpos, double* csum,
                                             float* cpos, i64 B, int P, int tc) {
  __shared__ __align__(16) float xs[CL_STAGE];  // 16-byte aligned: cp.async targets
  __shared__ __align__(16) float ys[CL_STAGE];
  __shared__ float L[CL_BI * (CL_BJ + 1)];
  __shared__ float m_i[CL_BI], l_i[CL_BI], pos_i[CL_BI], dg[CL_BI];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const i64 i0 = (i64)blockIdx.x * CL_BI;
  const float s = scale[0];
  for (int r = tid; r < CL_BI; r += NTHREADS) {
    m_i[r] = -f_inf();
    l_i[r] = 0.f;
    pos_i[r] = 0.f;
  }
  for (i64 j0 = 0; j0 < B; j0 += CL_BJ) {
    cl_logits_tile(a, a_dt, s_ar, s_ac, bm, b_dt, s_br, s_bc, inva, invb, s, i0, j0, B, P, tc, xs, ys, L);
    // the diagonal out of the log-sum-exps (-inf in L), kept in dg for the positives
    if (i0 == j0) {  // CL_BI == CL_BJ: the diagonal of a row block lies in one tile
      for (int r = tid; r < CL_BI; r += NTHREADS) {
        if (i0 + r < B) {
          dg[r] = L[r * (CL_BJ + 1) + r];
          rdiag[i0 + r] = dg[r];
          L[r * (CL_BJ + 1) + r] = -f_inf();
        }
      }
      __syncthreads();
    }
    // rows: online log-sum-exp and positives (one warp per row, two columns per lane)
    for (int r = warp; r < CL_BI; r += NTHREADS / 32) {
      const i64 i = i0 + r;
      if (i >= B) continue;
      const float* lr = L + r * (CL_BJ + 1);
      float mx = fmaxf(lr[lane], lr[lane + 32]);
      mx = warp_max(mx);
      const float m_new = fmaxf(m_i[r], mx);
      const float shift = m_new == -f_inf() ? 0.f : m_new;  // a row with no off-diagonal logit yet
      float se = 0.f, ps = 0.f;
      for (int c = lane; c < CL_BJ; c += 32) {
        se += expf(lr[c] - shift);
        if (j0 + c < B && cl_positive(labels, lab64, has_labels, i, j0 + c)) ps += j0 + c == i ? dg[r] : lr[c];
      }
      se = warp_sum(se);
      ps = warp_sum(ps);
      if (lane == 0) {
        l_i[r] = (m_i[r] == -f_inf() ? 0.f : l_i[r] * expf(m_i[r] - m_new)) + se;
        m_i[r] = m_new;
        pos_i[r] += ps;
      }
    }
    // columns: this tile's share, rescaled to the column bound in float64; positives of the column
    for (int c = warp; c < CL_BJ; c += NTHREADS / 32) {
      const i64 j = j0 + c;
      if (j >= B) continue;
      float mx = fmaxf(L[lane * (CL_BJ + 1) + c], L[(lane + 32) * (CL_BJ + 1) + c]);
      mx = warp_max(mx);
      if (mx == -f_inf()) mx = 0.f;  // a column whose only logit here was its diagonal
      float se = 0.f, ps = 0.f;
      for (int r = lane; r < CL_BI; r += 32) {
        const float l = L[r * (CL_BJ + 1) + c];
        se += expf(l - mx);
        if (i0 + r < B && cl_positive(labels, lab64, has_labels, i0 + r, j)) ps += i0 + r == j ? dg[c] : l;
      }
      se = warp_sum(se);
      ps = warp_sum(ps);
      if (lane == 0) {
        atomicAdd(csum + j, (double)se * exp((double)mx - (double)cl_ref(s, bound, invb, j, B)));
        atomicAdd(cpos + j, ps);
      }
    }
    __syncthreads();
  }
  for (int r = tid; r < CL_BI; r += NTHREADS) {
    const i64 i = i0 + r;
    if (i < B) {
      rlse[i] = m_i[r] + logf(l_i[r]);
      rpos[i] = pos_i[r];
    }
  }
}

// log(exp x + exp y) as torch.logaddexp: x + log 2 where x == y (infinities included), NaN in, NaN out
DRE_DEVICE float logaddexp_f(float x, float y) {
  const float hi = x > y ? x : y, lo = x > y ? y : x;
  return lo == hi ? hi + 0.69314718f : hi + log1pf(expf(lo - hi));
}

// After dre_cl_fwd, for block J's CL_BJ indices j: the off-diagonal column log-sum-exp O'_j = ref_j + log(csum_j), or,
// for the columns whose float64 sum at the bound underflowed (csum_j < CL_TINY: the column's largest off-diagonal logit
// lies more than ~640 below ref_j, which only unnormalised inputs with large norms reach), recomputed exactly by
// walking every row tile with an online max/sum per column (a block with none of those reads no row); then
// contrastive_loss_finish's arithmetic for row j and column j, in place: rlse (O_j) becomes row_lse, rpos (the positive
// sum) r, cpos c, rdiag (l_jj) the loss (r + c) / 2, and clse col_lse. npos: |P_j|, or null without labels (1).
DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_cl_finish(const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* bm,
                                                int b_dt, i64 s_br, i64 s_bc, const float* inva, const float* invb,
                                                const float* scale, const float* bound, const double* csum,
                                                const float* npos, float* rlse, float* rdiag, float* rpos,
                                                float* cpos, float* clse, i64 B, int P, int tc) {
  __shared__ __align__(16) float xs[CL_STAGE];  // 16-byte aligned: cp.async targets
  __shared__ __align__(16) float ys[CL_STAGE];
  __shared__ float L[CL_BI * (CL_BJ + 1)];
  __shared__ float m_j[CL_BJ], l_j[CL_BJ];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const i64 j0 = (i64)blockIdx.x * CL_BJ;
  if (tid < CL_BJ) {
    m_j[tid] = -f_inf();
    l_j[tid] = 0.f;
  }
  // uniform across the block, and the barrier after m_j, l_j (a shared flag that every thread in need set would be
  // a write-write race)
  const int any_need = __syncthreads_or(tid < CL_BJ && j0 + tid < B && csum[j0 + tid] < CL_TINY);
  const float s = scale[0];
  for (i64 i0 = 0; any_need && i0 < B; i0 += CL_BI) {
    cl_logits_tile(a, a_dt, s_ar, s_ac, bm, b_dt, s_br, s_bc, inva, invb, s, i0, j0, B, P, tc, xs, ys, L);
    if (i0 == j0) {  // the diagonal out, as in dre_cl_fwd
      for (int r = tid; r < CL_BI; r += NTHREADS) L[r * (CL_BJ + 1) + r] = -f_inf();
      __syncthreads();
    }
    for (int c = warp; c < CL_BJ; c += NTHREADS / 32) {
      if (j0 + c >= B) continue;
      float mx = fmaxf(L[lane * (CL_BJ + 1) + c], L[(lane + 32) * (CL_BJ + 1) + c]);
      mx = warp_max(mx);
      const float m_new = fmaxf(m_j[c], mx);
      const float shift = m_new == -f_inf() ? 0.f : m_new;
      float se = 0.f;
      for (int r = lane; r < CL_BI; r += 32) se += expf(L[r * (CL_BJ + 1) + c] - shift);
      se = warp_sum(se);
      if (lane == 0) {
        l_j[c] = (m_j[c] == -f_inf() ? 0.f : l_j[c] * expf(m_j[c] - m_new)) + se;
        m_j[c] = m_new;
      }
    }
    __syncthreads();
  }
  const i64 j = j0 + tid;
  if (tid >= CL_BJ || j >= B) return;
  const float off_col = csum[j] < CL_TINY ? m_j[tid] + logf(l_j[tid])
                                          : (float)((double)cl_ref(s, bound, invb, j, B) + log(csum[j]));
  const float off_row = rlse[j], diag = rdiag[j], n = npos ? npos[j] : 1.f;
  const float row_lse = logaddexp_f(off_row, diag), col_lse = logaddexp_f(off_col, diag);
  const float r = n == 1.f ? logaddexp_f(off_row - diag, 0.f) : row_lse - rpos[j] / n;
  const float c = n == 1.f ? logaddexp_f(off_col - diag, 0.f) : col_lse - cpos[j] / n;
  rlse[j] = row_lse;
  clse[j] = col_lse;
  rpos[j] = r;
  cpos[j] = c;
  rdiag[j] = (r + c) * 0.5f;
}

// gu (B, P) float32 = s sum_j W_ij v_j for the rows of x; gs_out[block row] = sum over its rows of sum_j W_ij <u_i, v_j>
// (with_gs). lx, ly: the log-sum-exps on x's side and y's side; rx, ry: the losses r, c on each side (expm1(-r) on
// the diagonal where npos = 1); g: grad of the loss (B); npos: |P_i| (B), or null without labels (1).
// two blocks per SM: at most 128 registers (ptxas takes 96 on sm_80 and sm_90), no spills
DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_cl_bwd(const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y, int y_dt,
                                             i64 s_yr, i64 s_yc, const float* invx, const float* invy,
                                             const void* labels, int lab64, int has_labels, const float* scale,
                                             const float* lx, const float* ly, const float* rx, const float* ry,
                                             const float* g, const float* npos, float* gu, float* gs_out, i64 B, int P,
                                             int with_gs) {
  __shared__ float tiles[CL_BJ * (CL_BI + 1)];  // the two dot slices, then the y tile (64 x 65)
  __shared__ float W[CL_BI * (CL_BJ + 1)];
  __shared__ float red[NTHREADS / 32];
  float* xs = tiles;
  float* ys = tiles + CL_BI * (CL_PT + 1);
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int npt = (P + CL_BI - 1) / CL_BI;
  const i64 pid_i = (i64)blockIdx.x / npt;
  const int pid_p = (int)((i64)blockIdx.x % npt);
  const i64 i0 = pid_i * CL_BI;
  const int p0 = pid_p * CL_BI;
  const float s = scale[0];
  float acc[4][4];
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < 4; ++v) acc[u][v] = 0.f;
  float gsl = 0.f;
  for (i64 j0 = 0; j0 < B; j0 += CL_BJ) {
    float dot[4][4];
    cl_tile_dot(x, x_dt, s_xr, s_xc, y, y_dt, s_yr, s_yc, i0, j0, B, P, xs, ys, dot);
    // unrolled so that dot[][] stays in registers (rolled, ptxas put it in a 64-byte local-memory frame)
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int r = ty + 16 * u, c = tx + 16 * v;
        W[r * (CL_BJ + 1) + c] = cl_bwd_weight(dot[u][v], i0 + r, j0 + c, B, invx, invy, labels, lab64, has_labels,
                                               s, lx, ly, rx, ry, g, npos, gsl);
      }
    // y tile (CL_BJ rows x CL_BI columns of P), into the dot slices' space (cl_tile_dot ended with a barrier)
    staged_copy(
        CL_BJ * CL_BI, tid,
        [&](int e) -> float {
          const int c = e / CL_BI, p = e % CL_BI;
          return (j0 + c < B && p0 + p < P) ? load_f(y, (j0 + c) * s_yr + (i64)(p0 + p) * s_yc, y_dt) : 0.f;
        },
        [&](int e, float v) { tiles[(e / CL_BI) * (CL_BI + 1) + e % CL_BI] = v; });
    __syncthreads();
    for (int c = 0; c < CL_BJ; ++c) {
      float wv[4], yv[4];
      for (int u = 0; u < 4; ++u) wv[u] = W[(ty + 16 * u) * (CL_BJ + 1) + c];
      for (int v = 0; v < 4; ++v) yv[v] = tiles[c * (CL_BI + 1) + tx + 16 * v];
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 4; ++v) acc[u][v] += wv[u] * yv[v];
    }
    __syncthreads();
  }
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < 4; ++v) {
      const i64 i = i0 + ty + 16 * u;
      const int p = p0 + tx + 16 * v;
      if (i < B && p < P) gu[i * P + p] = s * acc[u][v];
    }
  if (with_gs && pid_p == 0) cl_block_sum(gsl, red, gs_out, pid_i);
}

// dre_cl_bwd on the tensor cores (both sides bfloat16, sm_80+): the same outputs. Block (I, p) owns CL_BI rows and a
// CL_PO_TC-wide tile of P; per column block it recomputes the logit tile with cl_tile_dot_tc (x_is_b: the y side's
// call, which puts a's rows on the left as every other launch does, and reads the tile transposed), turns it into
// W (float32, shared), stages y's tile and adds W y on the tensor cores, W split into hi + lo bfloat16 parts. Warp w
// accumulates rows 16 (w % 4).. and columns 64 (w / 4).. of the output tile (8 MMA tiles of 16 x 8).
// The tensor-core backward's body: block (I, p) owns CL_BI rows and NPC pieces of CL_PO_TC columns of P (acc: NPC x 32
// floats per thread). Each logit tile is computed and turned into W once per block, so once per side for the whole of
// P where NPC * CL_PO_TC >= P; y's pieces are staged one at a time through the logit slices' space (the first while
// the weights are computed).
template <int NPC>
DRE_DEVICE void cl_bwd_tc_body(const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y, int y_dt, i64 s_yr,
                               i64 s_yc, const float* invx, const float* invy, const void* labels, int lab64,
                               int has_labels, const float* scale, const float* lx, const float* ly, const float* rx,
                               const float* ry, const float* g, const float* npos, float* gu, float* gs_out, i64 B,
                               int P, int with_gs, int x_is_b) {
  constexpr int LDY = CL_PO_TC + 8, XS = 2 * CL_TC_SLICE;
  // the logits' P slices (two buffers per side), then y's (CL_BJ x CL_PO_TC) pieces, 16-bit (declared as floats:
  // 4-byte pairs, 16-byte aligned for cp.async)
  constexpr int STAGE = 2 * XS > CL_BJ * LDY ? 2 * XS : CL_BJ * LDY;
  __shared__ __align__(16) float stage_f[STAGE / 2];
  unsigned short* stage = (unsigned short*)stage_f;
  __shared__ float W[CL_BI * (CL_BJ + 1)];
  __shared__ float red[NTHREADS / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
  const int npt = (P + NPC * CL_PO_TC - 1) / (NPC * CL_PO_TC);
  const i64 pid_i = (i64)blockIdx.x / npt;
  const int pid_p = (int)((i64)blockIdx.x % npt);
  const i64 i0 = pid_i * CL_BI;
  const int p0 = pid_p * NPC * CL_PO_TC;
  const float s = scale[0];
  const int mrow = 16 * (warp & 3), ncol = 64 * (warp >> 2);
  const ClTcRows ysrc(y, s_yr, s_yc, P);  // y's rows for its output-side tiles
  float acc[NPC][8][4];
#pragma unroll
  for (int q = 0; q < NPC; ++q)
    for (int n = 0; n < 8; ++n)
      for (int e = 0; e < 4; ++e) acc[q][n][e] = 0.f;
  float gsl = 0.f;
  for (i64 j0 = 0; j0 < B; j0 += CL_BJ) {
    float dot[4][4];
    if (x_is_b) {
      cl_tile_dot_tc(y, s_yr, s_yc, x, s_xr, s_xc, x_dt, j0, i0, B, P, stage, stage + XS, dot);
    } else {
      cl_tile_dot_tc(x, s_xr, s_xc, y, s_yr, s_yc, x_dt, i0, j0, B, P, stage, stage + XS, dot);
    }
    // y's first piece (rows j0.., columns p0.. of P) into the staging space, which the tile's closing barrier
    // freed: it lands while the weights are computed
    cl_tc_stage<CL_PO_TC>(stage, ysrc, j0, p0, B, P, tid);
    // the dots into W (the fragments' registers free again before the weights: with both live, ptxas spilled)
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int r, c;
        cl_tc_rc(warp, lane, n, e, r, c);
        // x_is_b: the tile was <a_{j0 + r}, b_{i0 + c}>, this block's row c and column r
        W[x_is_b ? c * (CL_BJ + 1) + r : r * (CL_BJ + 1) + c] = dot[n][e];
      }
    __syncthreads();
    for (int e = tid; e < CL_BI * CL_BJ; e += NTHREADS) {
      const int r = e / CL_BJ, c = e % CL_BJ;
      float* w = W + r * (CL_BJ + 1) + c;
      *w = cl_bwd_weight(*w, i0 + r, j0 + c, B, invx, invy, labels, lab64, has_labels, s, lx, ly, rx, ry, g, npos,
                         gsl);
    }
#pragma unroll
    for (int q = 0; q < NPC; ++q) {
      if (p0 + q * CL_PO_TC < P) {  // the same for the whole block (barriers inside)
        if (q > 0) cl_tc_stage<CL_PO_TC>(stage, ysrc, j0, p0 + q * CL_PO_TC, B, P, tid);
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll 1
        for (int kk = 0; kk < CL_BJ; kk += 16) {
          // A = W[mrow.., kk..] (row-major), split into hi + lo
          unsigned a_hi[4], a_lo[4];
          for (int t = 0; t < 4; ++t) {
            const int r = mrow + gq + 8 * (t & 1), k = kk + 2 * tq + 8 * (t >> 1);
            unsigned short h0, l0, h1, l1;
            split_16(W[r * (CL_BJ + 1) + k], y_dt, h0, l0);
            split_16(W[r * (CL_BJ + 1) + k + 1], y_dt, h1, l1);
            a_hi[t] = pack_16(h0, h1);
            a_lo[t] = pack_16(l0, l1);
          }
#pragma unroll
          for (int n = 0; n < 8; ++n) {
            // B[k][col] = y_{j0 + k, p0 + q CL_PO_TC + col}: pairs along k, two 16-bit loads each
            const unsigned short* yb = stage + (kk + 2 * tq) * LDY + ncol + 8 * n + gq;
            const unsigned b[2] = {pack_16(yb[0], yb[LDY]), pack_16(yb[8 * LDY], yb[9 * LDY])};
            mma_16816(acc[q][n], a_hi, b, y_dt);
            mma_16816(acc[q][n], a_lo, b, y_dt);
          }
        }
        __syncthreads();  // the piece (and, after the last, W) free for the next
      }
    }
  }
#pragma unroll
  for (int q = 0; q < NPC; ++q)
    for (int n = 0; n < 8; ++n)
      for (int e = 0; e < 4; ++e) {
        const i64 i = i0 + mrow + gq + 8 * (e >> 1);
        const int p = p0 + q * CL_PO_TC + ncol + 8 * n + 2 * tq + (e & 1);
        if (i < B && p < P) gu[i * P + p] = s * acc[q][n][e];
      }
  if (with_gs && pid_p == 0) cl_block_sum(gsl, red, gs_out, pid_i);
}

// One piece of CL_PO_TC columns per block (grid ceil(B / 64) * ceil(P / CL_PO_TC)), two blocks per SM.
DRE_GLOBAL void DRE_MIN_BLOCKS(2) dre_cl_bwd_tc(const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y, int y_dt,
                                                i64 s_yr, i64 s_yc, const float* invx, const float* invy,
                                                const void* labels, int lab64, int has_labels, const float* scale,
                                                const float* lx, const float* ly, const float* rx, const float* ry,
                                                const float* g, const float* npos, float* gu, float* gs_out, i64 B,
                                                int P, int with_gs, int x_is_b) {
  cl_bwd_tc_body<1>(x, x_dt, s_xr, s_xc, y, y_dt, s_yr, s_yc, invx, invy, labels, lab64, has_labels, scale, lx, ly, rx,
                    ry, g, npos, gu, gs_out, B, P, with_gs, x_is_b);
}

// CL_PO_WIDE = 4 pieces per block (grid ceil(B / 64) * ceil(P / 512)): at P <= 512 each logit tile is computed once
// per side, where dre_cl_bwd_tc computes it ceil(P / 128) times; the 128 accumulators per thread leave one block
// per SM.
DRE_GLOBAL void DRE_MIN_BLOCKS(1) dre_cl_bwd_tc_wide(const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y,
                                                     int y_dt, i64 s_yr, i64 s_yc, const float* invx,
                                                     const float* invy, const void* labels, int lab64, int has_labels,
                                                     const float* scale, const float* lx, const float* ly,
                                                     const float* rx, const float* ry, const float* g,
                                                     const float* npos, float* gu, float* gs_out, i64 B, int P,
                                                     int with_gs, int x_is_b) {
  cl_bwd_tc_body<CL_PO_WIDE>(x, x_dt, s_xr, s_xc, y, y_dt, s_yr, s_yc, invx, invy, labels, lab64, has_labels, scale,
                             lx, ly, rx, ry, g, npos, gu, gs_out, B, P, with_gs, x_is_b);
}

// The rows' norms, once per call, into `norms` (4B + 1 floats, zeroed): the inverse norms
// inv_t = 1 / max(||t_i||, eps) (1 without normalize) of a's rows then b's, the norms, and max_i ||u_i||
// (u_i = a_i inv_a) for the column bound, by an atomicMax on its bits (non-negative floats order as unsigned
// integers; a NaN norm wins, so the bound is NaN as torch's max would make it). One warp per row, grid-stride over
// the 2B rows.
DRE_GLOBAL void dre_cl_norms(const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* bm, int b_dt, i64 s_br,
                             i64 s_bc, float* norms, i64 B, int P, int normalize, float eps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (i64 r = (i64)blockIdx.x * (NTHREADS / 32) + warp; r < 2 * B; r += (i64)gridDim.x * (NTHREADS / 32)) {
    const bool side_b = r >= B;
    const i64 i = side_b ? r - B : r;
    float ss = 0.f;
    for (int p = lane; p < P; p += 32) {
      const float v = side_b ? load_f(bm, i * s_br + (i64)p * s_bc, b_dt) : load_f(a, i * s_ar + (i64)p * s_ac, a_dt);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      const float norm = sqrtf(ss), inv = normalize ? 1.f / fmaxf(norm, eps) : 1.f;
      norms[r] = inv;  // inv_a at [0, B), inv_b at [B, 2B)
      norms[2 * B + r] = norm;
      if (!side_b) atomicMax(reinterpret_cast<unsigned int*>(norms + 4 * B), __float_as_uint(norm * inv));
    }
  }
}

// The normalisation's backward: grad t from grad u through u = t inv, inv = 1 / max(||t||, eps):
//   grad t = (gu - u <u, gu>) inv   where ||t|| > eps,   gu inv   at or below it (F.normalize's clamped norm)
// in t's dtype. One warp per row (the row's dot is warp-uniform); out may be gu itself (float32 t): each element is
// read by the lane that writes it, after the whole row's dot.
DRE_GLOBAL void dre_cl_normalize_bwd(const float* gu, const void* t, int t_dt, i64 s_tr, i64 s_tc, const float* inv,
                                     const float* norm, void* out, int out_dt, i64 B, int P, float eps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (i64 i = (i64)blockIdx.x * (NTHREADS / 32) + warp; i < B; i += (i64)gridDim.x * (NTHREADS / 32)) {
    const float iv = inv[i];
    float dot = 0.f;
    if (norm[i] > eps) {
      for (int p = lane; p < P; p += 32) dot += load_f(t, i * s_tr + (i64)p * s_tc, t_dt) * iv * gu[i * P + p];
      dot = warp_sum(dot);
    }
    for (int p = lane; p < P; p += 32) {
      const float u = load_f(t, i * s_tr + (i64)p * s_tc, t_dt) * iv;
      store_f(out, i * P + p, (gu[i * P + p] - u * dot) * iv, out_dt);
    }
  }
}

#if !defined(__CUDACC_RTC__) && !defined(DRE_CUDA_EMULATE)
#include "launchers.h"

namespace dre_cuda_launch {
cudaError_t cl_fwd(unsigned grid, cudaStream_t stream, const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* b,
                   int b_dt, i64 s_br, i64 s_bc, const float* inva, const float* invb, const void* labels, int lab64,
                   int has_labels, const float* scale, const float* bound, float* rlse, float* rdiag, float* rpos,
                   double* csum, float* cpos, i64 B, int P, int tc) {
  if (grid > 0)
    dre_cl_fwd<<<grid, NTHREADS, 0, stream>>>(a, a_dt, s_ar, s_ac, b, b_dt, s_br, s_bc, inva, invb, labels, lab64,
                                              has_labels, scale, bound, rlse, rdiag, rpos, csum, cpos, B, P, tc);
  return cudaGetLastError();
}

cudaError_t cl_finish(unsigned grid, cudaStream_t stream, const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* b,
                      int b_dt, i64 s_br, i64 s_bc, const float* inva, const float* invb, const float* scale,
                      const float* bound, const double* csum, const float* npos, float* rlse, float* rdiag, float* rpos,
                      float* cpos, float* clse, i64 B, int P, int tc) {
  if (grid > 0)
    dre_cl_finish<<<grid, NTHREADS, 0, stream>>>(a, a_dt, s_ar, s_ac, b, b_dt, s_br, s_bc, inva, invb, scale, bound,
                                                 csum, npos, rlse, rdiag, rpos, cpos, clse, B, P, tc);
  return cudaGetLastError();
}

cudaError_t cl_bwd(unsigned grid, cudaStream_t stream, const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y,
                   int y_dt, i64 s_yr, i64 s_yc, const float* invx, const float* invy, const void* labels, int lab64,
                   int has_labels, const float* scale, const float* lx, const float* ly, const float* rx,
                   const float* ry, const float* g, const float* npos, float* gu, float* gs_out, i64 B, int P,
                   int with_gs) {
  if (grid > 0)
    dre_cl_bwd<<<grid, NTHREADS, 0, stream>>>(x, x_dt, s_xr, s_xc, y, y_dt, s_yr, s_yc, invx, invy, labels, lab64,
                                              has_labels, scale, lx, ly, rx, ry, g, npos, gu, gs_out, B, P, with_gs);
  return cudaGetLastError();
}

cudaError_t cl_bwd_tc(unsigned grid, cudaStream_t stream, const void* x, int x_dt, i64 s_xr, i64 s_xc, const void* y,
                      int y_dt, i64 s_yr, i64 s_yc, const float* invx, const float* invy, const void* labels,
                      int lab64, int has_labels, const float* scale, const float* lx, const float* ly,
                      const float* rx, const float* ry, const float* g, const float* npos, float* gu, float* gs_out,
                      i64 B, int P, int with_gs, int x_is_b, int wide) {
  if (grid > 0 && wide) {
    dre_cl_bwd_tc_wide<<<grid, NTHREADS, 0, stream>>>(x, x_dt, s_xr, s_xc, y, y_dt, s_yr, s_yc, invx, invy, labels,
                                                      lab64, has_labels, scale, lx, ly, rx, ry, g, npos, gu, gs_out,
                                                      B, P, with_gs, x_is_b);
  } else if (grid > 0) {
    dre_cl_bwd_tc<<<grid, NTHREADS, 0, stream>>>(x, x_dt, s_xr, s_xc, y, y_dt, s_yr, s_yc, invx, invy, labels, lab64,
                                                 has_labels, scale, lx, ly, rx, ry, g, npos, gu, gs_out, B, P,
                                                 with_gs, x_is_b);
  }
  return cudaGetLastError();
}

cudaError_t cl_norms(unsigned grid, cudaStream_t stream, const void* a, int a_dt, i64 s_ar, i64 s_ac, const void* b,
                     int b_dt, i64 s_br, i64 s_bc, float* norms, i64 B, int P, int normalize, float eps) {
  if (grid > 0)
    dre_cl_norms<<<grid, NTHREADS, 0, stream>>>(a, a_dt, s_ar, s_ac, b, b_dt, s_br, s_bc, norms, B, P, normalize, eps);
  return cudaGetLastError();
}

cudaError_t cl_normalize_bwd(unsigned grid, cudaStream_t stream, const float* gu, const void* t, int t_dt, i64 s_tr,
                             i64 s_tc, const float* inv, const float* norm, void* out, int out_dt, i64 B, int P,
                             float eps) {
  if (grid > 0)
    dre_cl_normalize_bwd<<<grid, NTHREADS, 0, stream>>>(gu, t, t_dt, s_tr, s_tc, inv, norm, out, out_dt, B, P, eps);
  return cudaGetLastError();
}
}  // namespace dre_cuda_launch
#endif
