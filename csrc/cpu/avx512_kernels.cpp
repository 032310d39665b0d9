// AVX-512 float32 kernels for residual_encode (see avx512_kernels.h). Every function here carries the target
// attribute; nothing from ATen or the standard library is instantiated in this file, so no AVX-512 instruction can
// reach code that runs on a CPU without it.
#include "cpu/avx512_kernels.h"

#include <immintrin.h>

#include <cstdlib>

#define DRE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define DRE_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), always_inline)) inline

namespace dre {
namespace cpu {
namespace avx512 {

bool available() {
  static const bool ok = [] {
    const char* off = std::getenv("DRE_NATIVE_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

namespace {

// ---------------------------------------------------------------- S = rows . Bp   (MR rows x NV*16 columns)
// While it computes, the kernel prefetches pf[0:npf] (rows of the next block, random bank rows whose misses would
// otherwise stall the next block), one cache line per row every 16 values of d, spread over the whole kernel.
template <int MR, int NV>
DRE_AVX512 void mk_bt(const float* const* rows, int64_t D, const float* B, int64_t ldb, float* S, int64_t lds,
                      const float* const* pf, int npf) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* x[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) x[m] = rows[m];
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    for (int m = 0; m < npf; ++m) _mm_prefetch(reinterpret_cast<const char*>(pf[m] + d0), _MM_HINT_T0);
    const int64_t d1 = D - d0 < 16 ? D : d0 + 16;
    for (int64_t d = d0; d < d1; ++d) {
      const float* b = B + d * ldb;
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 xb = _mm512_set1_ps(x[m][d]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xb, bv[v], acc[m][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(S + m * lds + 16 * v, acc[m][v]);
}

using BtFn = void (*)(const float* const*, int64_t, const float*, int64_t, float*, int64_t, const float* const*, int);
constexpr int kMR = 6, kNV = 4;

template <int NV>
DRE_AVX512 BtFn bt_fn(int mr) {
  switch (mr) {
    case 1: return &mk_bt<1, NV>;
    case 2: return &mk_bt<2, NV>;
    case 3: return &mk_bt<3, NV>;
    case 4: return &mk_bt<4, NV>;
    case 5: return &mk_bt<5, NV>;
    default: return &mk_bt<6, NV>;
  }
}

DRE_AVX512 BtFn bt_fn(int mr, int nv) {
  switch (nv) {
    case 1: return bt_fn<1>(mr);
    case 2: return bt_fn<2>(mr);
    case 3: return bt_fn<3>(mr);
    default: return bt_fn<4>(mr);
  }
}

// ---------------------------------------------------------------- E += A^T rows   (MK codewords x NV*16 columns)
template <int MK, int NV>
DRE_AVX512 void mk_at(const float* A, int64_t lda, const float* const* rows, int64_t r, int64_t j0, float* E,
                      int64_t lde, __mmask16 last) {
  __m512 acc[MK][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MK; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[m][v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, E + m * lde + 16 * v) : _mm512_loadu_ps(E + m * lde + 16 * v);
  for (int64_t i = 0; i < r; ++i) {
    const float* xr = rows[i] + j0;
    const float* a = A + i * lda;
    __m512 xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, xr + 16 * v) : _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MK; ++m) {
      const __m512 ab = _mm512_set1_ps(a[m]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(ab, xv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MK; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1)
        _mm512_mask_storeu_ps(E + m * lde + 16 * v, last, acc[m][v]);
      else
        _mm512_storeu_ps(E + m * lde + 16 * v, acc[m][v]);
    }
}

using AtFn = void (*)(const float*, int64_t, const float* const*, int64_t, int64_t, float*, int64_t, __mmask16);
#ifndef DRE_AT_MK
#define DRE_AT_MK 6
#define DRE_AT_NV 4
#endif
constexpr int kMK = DRE_AT_MK, kNVA = DRE_AT_NV;

template <int NV>
DRE_AVX512 AtFn at_fn(int mk) {
  switch (mk) {
    case 1: return &mk_at<1, NV>;
    case 2: return &mk_at<2, NV>;
    case 3: return &mk_at<3, NV>;
    case 4: return &mk_at<4, NV>;
    case 5: return &mk_at<5 <= kMK ? 5 : kMK, NV>;
    case 6: return &mk_at<6 <= kMK ? 6 : kMK, NV>;
    case 7: return &mk_at<7 <= kMK ? 7 : kMK, NV>;
    default: return &mk_at<kMK, NV>;
  }
}

DRE_AVX512 AtFn at_fn(int mk, int nv) {
  switch (nv) {
    case 1: return at_fn<1>(mk);
    case 2: return at_fn<2 <= kNVA ? 2 : kNVA>(mk);
    case 3: return at_fn<3 <= kNVA ? 3 : kNVA>(mk);
    case 4: return at_fn<4 <= kNVA ? 4 : kNVA>(mk);
    case 5: return at_fn<5 <= kNVA ? 5 : kNVA>(mk);
    default: return at_fn<kNVA>(mk);
  }
}

DRE_AVX512_INLINE __mmask16 tail_mask(int64_t n) {  // the first min(n, 16) lanes
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// e^x for x <= 0 (softmax after subtracting the max), Cephes expf: |rel err| ~ 1 ulp; NaN stays NaN,
// -inf and anything below -104 give 0.
DRE_AVX512_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // second operand returned when x is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

DRE_AVX512 void gemm_rows_bt(const float* const* rows, int64_t r, int64_t D, const float* Bp, int64_t ldb,
                             int64_t np, float* S, int64_t lds, const float* const* next, int64_t rn) {
  // (Cutting D into L1-sized chunks of Bp was measured slower at D = 384: the L2 keeps up with the 4 loads per d.)
  // Row group g prefetches rows [g * kMR, (g + 1) * kMR) of the next block (all the rest with the last group).
  for (int64_t n0 = 0; n0 < np; n0 += 16 * kNV) {
    const int nv = (int)((np - n0) / 16 < kNV ? (np - n0) / 16 : kNV);
    const BtFn full = bt_fn(kMR, nv);
    const bool pf = n0 == 0 && next != nullptr;
    for (int64_t i = 0; i < r; i += kMR) {
      const int64_t last = i + kMR >= r;
      const int64_t pf_end = last ? rn : (i + kMR < rn ? i + kMR : rn);
      const int npf = pf && pf_end > i ? (int)(pf_end - i) : 0;
      const BtFn fn = i + kMR <= r ? full : bt_fn((int)(r - i), nv);
      if (npf <= kMR) {
        fn(rows + i, D, Bp + n0, ldb, S + i * lds + n0, lds, npf ? next + i : nullptr, npf);
      } else {  // the next block is longer than this one: its extra rows are prefetched here
        fn(rows + i, D, Bp + n0, ldb, S + i * lds + n0, lds, nullptr, 0);
        for (int64_t j = i; j < pf_end; ++j)
          for (int64_t o = 0; o < D; o += 16) _mm_prefetch(reinterpret_cast<const char*>(next[j] + o), _MM_HINT_T0);
      }
    }
  }
}

DRE_AVX512 void gemm_at_rows(const float* A, int64_t lda, const float* const* rows, int64_t r, int64_t K, int64_t D,
                             float* E, int64_t lde) {
#ifndef DRE_AT_CHUNK
#define DRE_AT_CHUNK 64
#endif
  constexpr int64_t kChunk = DRE_AT_CHUNK;  // rows per pass: the chunk's slice of X (64 x 64 floats) and of A stay in L1
  for (int64_t i0 = 0; i0 < r; i0 += kChunk) {
    const int64_t ri = r - i0 < kChunk ? r - i0 : kChunk;
    for (int64_t j0 = 0; j0 < D; j0 += 16 * kNVA) {
      const int64_t left = D - j0;
      const int nv = (int)(left >= 16 * kNVA ? kNVA : (left + 15) / 16);
      const __mmask16 last = tail_mask(left - 16 * (nv - 1));
      for (int64_t k0 = 0; k0 < K; k0 += kMK) {
        const int mk = (int)(K - k0 < kMK ? K - k0 : kMK);
        at_fn(mk, nv)(A + i0 * lda + k0, lda, rows + i0, ri, j0, E + k0 * lde + j0, lde, last);
      }
    }
  }
}

DRE_AVX512 float sumsq(const float* x, int64_t D) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= D; j += 64)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {  // four chains: the FMA latency, not the loads, would bound one
      const __m512 v = _mm512_loadu_ps(x + j + 16 * u);
      acc[u] = _mm512_fmadd_ps(v, v, acc[u]);
    }
  for (; j < D; j += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(D - j), x + j);
    acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

DRE_AVX512 void soft_rows(const float* const* rows, int64_t r, int64_t D, const float* S, int64_t lds,
                          const float* csq, const float* s, int64_t K, float* A, float* Dd, int64_t lda, float* mass,
                          float* tmp) {
  // In phases over all r rows (max, then exp and sum, then scale) rather than row after row: each phase's
  // per-row reduction chains are independent across rows, so they overlap instead of running back to back.
  const int64_t kp = pad16(K);
  const __m512 two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps(), sign = _mm512_set1_ps(-0.0f);
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  float* mx = tmp;  // (r) row max of the logits, NaN when the row holds a NaN
  for (int64_t i = 0; i < r; ++i) {
    const __m512 vx = _mm512_set1_ps(sumsq(rows[i], D));
    const float* sc = S + i * lds;
    float* a = A + i * lda;
    float* d = Dd + i * lda;
    __m512 vmax = ninf;
    __mmask16 nan = 0;
    for (int64_t k = 0; k < kp; k += 16) {
      const __mmask16 valid = tail_mask(K - k);
      __m512 v = _mm512_add_ps(_mm512_fnmadd_ps(two, _mm512_loadu_ps(sc + k), vx), _mm512_loadu_ps(csq + k));
      v = _mm512_maskz_mov_ps(valid, _mm512_max_ps(zero, v));  // clamp at 0; NaN stays NaN
      _mm512_storeu_ps(d + k, v);
      __m512 l = _mm512_mul_ps(_mm512_xor_ps(_mm512_loadu_ps(s + k), sign), v);
      l = _mm512_mask_mov_ps(ninf, valid, l);
      nan |= _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q);
      _mm512_storeu_ps(a + k, l);
      vmax = _mm512_max_ps(vmax, l);
    }
    mx[i] = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(vmax);
  }
  for (int64_t i = 0; i < r; ++i) {
    float* a = A + i * lda;
    const __m512 m = _mm512_set1_ps(mx[i]);
    __m512 vsum = zero;
    for (int64_t k = 0; k < kp; k += 16) {
      const __mmask16 valid = tail_mask(K - k);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(a + k), m)));
      _mm512_storeu_ps(a + k, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    mx[i] = 1.0f / _mm512_reduce_add_ps(vsum);  // NaN rows: NaN (the NaN max made every exp NaN)
  }
  for (int64_t k = 0; k < kp; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    __m512 ms = _mm512_setzero_ps();
    for (int64_t i = 0; i < r; ++i) {
      float* a = A + i * lda;
      const __m512 ai = _mm512_maskz_mov_ps(valid, _mm512_mul_ps(_mm512_loadu_ps(a + k), _mm512_set1_ps(mx[i])));
      _mm512_storeu_ps(a + k, ai);
      ms = _mm512_add_ps(ms, ai);
    }
    if (mass != nullptr) _mm512_storeu_ps(mass + k, _mm512_add_ps(_mm512_loadu_ps(mass + k), ms));
  }
}

DRE_AVX512_INLINE int64_t hard_row(const float* sc, const float* csq, int64_t K) {
  const int64_t kp = pad16(K);
  const __m512 two = _mm512_set1_ps(2.0f), pinf = _mm512_set1_ps(__builtin_inff());
  __m512 vmin = pinf;
  for (int64_t k = 0; k < kp; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    const __m512 v = _mm512_fnmadd_ps(two, _mm512_loadu_ps(sc + k), _mm512_loadu_ps(csq + k));
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
    if (nan) return k + __builtin_ctz((unsigned)nan);  // the first NaN is the argmin
    vmin = _mm512_mask_min_ps(vmin, valid, vmin, v);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_min_ps(vmin));
  for (int64_t k = 0; k < kp; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    const __m512 v = _mm512_fnmadd_ps(two, _mm512_loadu_ps(sc + k), _mm512_loadu_ps(csq + k));
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(valid, v, m, _CMP_EQ_OQ);
    if (eq) return k + __builtin_ctz((unsigned)eq);
  }
  return 0;  // unreachable: the minimum is one of the values
}

DRE_AVX512 void hard_rows(const float* S, int64_t lds, int64_t r, const float* csq, int64_t K, int64_t* kmin) {
  for (int64_t i = 0; i < r; ++i) kmin[i] = hard_row(S + i * lds, csq, K);
}

DRE_AVX512 void add_row(float* dst, const float* src, int64_t D) {
  int64_t j = 0;
  for (; j + 16 <= D; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_add_ps(_mm512_loadu_ps(dst + j), _mm512_loadu_ps(src + j)));
  if (j < D) {
    const __mmask16 t = tail_mask(D - j);
    _mm512_mask_storeu_ps(dst + j, t, _mm512_add_ps(_mm512_maskz_loadu_ps(t, dst + j), _mm512_maskz_loadu_ps(t, src + j)));
  }
}

DRE_AVX512 void soft_bwd_rows(int64_t r, const float* A, const float* Dd, int64_t lda, const float* H, int64_t ldh,
                              const float* gc, const float* s, int64_t K, float* W, float* gs, float* ws,
                              float* wsum, float* gm) {
  const int64_t kp = pad16(K);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t i = 0; i < r; ++i) {  // phase 1: ga_i = sum_k a_ik g_ik (independent chains across rows)
    const float* a = A + i * lda;
    const float* h = H + i * ldh;
    // g is shifted by g_im, m the first k of the largest a_ik (residual_encode.cpp: the backward's u); the
    // padding holds a = h = gc = 0, so a row with no match (NaN) takes gm = 0
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < kp; k += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(a + k));
    const __m512 amax = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    int64_t m = kp;
    for (int64_t k = 0; k < kp && m == kp; k += 16) {
      const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(a + k), amax, _CMP_EQ_OQ);
      if (hit) m = k + __builtin_ctz(hit);
    }
    gm[i] = m < K ? h[m] - gc[m] : 0.0f;
    const __m512 shift = _mm512_set1_ps(gm[i]);
    __m512 vga = _mm512_setzero_ps();
    for (int64_t k = 0; k < kp; k += 16)
      vga = _mm512_fmadd_ps(
          _mm512_loadu_ps(a + k),
          _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(h + k), _mm512_loadu_ps(gc + k)), shift), vga);
    wsum[i] = _mm512_reduce_add_ps(vga);
  }
  for (int64_t i = 0; i < r; ++i) {
    const float* a = A + i * lda;
    const float* h = H + i * ldh;
    const float* d = Dd + i * lda;
    float* w_out = W + i * lda;
    const __m512 ga = _mm512_set1_ps(wsum[i]);
    const __m512 shift = _mm512_set1_ps(gm[i]);
    __m512 vws = _mm512_setzero_ps();
    for (int64_t k = 0; k < kp; k += 16) {
      const __mmask16 valid = tail_mask(K - k);
      const __m512 g = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(h + k), _mm512_loadu_ps(gc + k)), shift);
      const __m512 u = _mm512_maskz_mov_ps(valid, _mm512_mul_ps(_mm512_loadu_ps(a + k), _mm512_sub_ps(g, ga)));
      const __m512 w = _mm512_mul_ps(_mm512_xor_ps(_mm512_loadu_ps(s + k), sign), u);
      _mm512_storeu_ps(w_out + k, w);
      _mm512_storeu_ps(gs + k, _mm512_fnmadd_ps(u, _mm512_loadu_ps(d + k), _mm512_loadu_ps(gs + k)));
      _mm512_storeu_ps(ws + k, _mm512_add_ps(_mm512_loadu_ps(ws + k), w));
      vws = _mm512_add_ps(vws, w);
    }
    wsum[i] = _mm512_reduce_add_ps(vws);
  }
}

DRE_AVX512 void lse_tile(const float* L, int64_t ni, int64_t nj, int64_t ldl, float* rm, float* rs, float* cm,
                         float* cs) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff()), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < ni; ++i) {
    const float* l = L + i * ldl;
    __m512 vmax = ninf;
    for (int64_t j = 0; j < nj; j += 16)
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, tail_mask(nj - j), l + j));
    const float tile_max = _mm512_reduce_max_ps(vmax);
    const float m = rm[i] > tile_max ? rm[i] : tile_max;  // a NaN tile max keeps m; the sum below turns NaN
    const __m512 shift = _mm512_set1_ps(m == -__builtin_inff() ? 0.0f : m);
    __m512 acc = zero;
    for (int64_t j = 0; j < nj; j += 16)
      acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(tail_mask(nj - j),
                                                   exp_ps(_mm512_sub_ps(_mm512_loadu_ps(l + j), shift))));
    // an old max of -inf: the old sum is 0, or NaN (kept NaN by the product)
    const float old = rs[i] * (rm[i] == -__builtin_inff() ? 0.0f : __builtin_expf(rm[i] - m));
    rs[i] = old + _mm512_reduce_add_ps(acc);
    rm[i] = m;
  }
  for (int64_t j = 0; j < nj; j += 16) {
    const __mmask16 t = tail_mask(nj - j);
    __m512 vmax = ninf;
    for (int64_t i = 0; i < ni; ++i)
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, t, L + i * ldl + j));
    const __m512 old_m = _mm512_maskz_loadu_ps(t, cm + j);
    const __m512 m = _mm512_max_ps(old_m, vmax);
    const __mmask16 m_inf = _mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ);
    const __m512 shift = _mm512_mask_mov_ps(m, m_inf, zero);
    __m512 acc = zero;
    for (int64_t i = 0; i < ni; ++i)
      acc = _mm512_add_ps(acc, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(L + i * ldl + j), shift)));
    const __mmask16 old_inf = _mm512_cmp_ps_mask(old_m, ninf, _CMP_EQ_OQ);
    const __m512 old = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, cs + j),
                                     _mm512_maskz_mov_ps(~old_inf, exp_ps(_mm512_sub_ps(old_m, m))));
    _mm512_mask_storeu_ps(cs + j, t, _mm512_add_ps(old, acc));
    _mm512_mask_storeu_ps(cm + j, t, m);
  }
}

DRE_AVX512 void z_tile(const float* L, int64_t ni, int64_t nj, int64_t ldl, const float* gr, const float* lr,
                       const float* gc, const float* lc, float* Z, int64_t ldz) {
  for (int64_t i = 0; i < ni; ++i) {
    const __m512 g = _mm512_set1_ps(gr[i]), li = _mm512_set1_ps(lr[i]);
    for (int64_t j = 0; j < nj; j += 16) {
      const __mmask16 t = tail_mask(nj - j);
      const __m512 l = _mm512_maskz_loadu_ps(t, L + i * ldl + j);
      const __m512 zc = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, gc + j),
                                      exp_ps(_mm512_sub_ps(l, _mm512_maskz_loadu_ps(t, lc + j))));
      _mm512_mask_storeu_ps(Z + i * ldz + j, t, _mm512_fmadd_ps(g, exp_ps(_mm512_sub_ps(l, li)), zc));
    }
  }
}

}  // namespace avx512
}  // namespace cpu
}  // namespace dre
