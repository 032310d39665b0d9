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
template <int MR, int NV>
DRE_AVX512 void mk_bt(const float* const* rows, int64_t D, const float* B, int64_t ldb, float* S, int64_t lds) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* x[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) x[m] = rows[m];
  for (int64_t d = 0; d < D; ++d) {
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
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(S + m * lds + 16 * v, acc[m][v]);
}

using BtFn = void (*)(const float* const*, int64_t, const float*, int64_t, float*, int64_t);
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
constexpr int kMK = 8, kNVA = 3;

template <int NV>
DRE_AVX512 AtFn at_fn(int mk) {
  switch (mk) {
    case 1: return &mk_at<1, NV>;
    case 2: return &mk_at<2, NV>;
    case 3: return &mk_at<3, NV>;
    case 4: return &mk_at<4, NV>;
    case 5: return &mk_at<5, NV>;
    case 6: return &mk_at<6, NV>;
    case 7: return &mk_at<7, NV>;
    default: return &mk_at<8, NV>;
  }
}

DRE_AVX512 AtFn at_fn(int mk, int nv) {
  switch (nv) {
    case 1: return at_fn<1>(mk);
    case 2: return at_fn<2>(mk);
    default: return at_fn<3>(mk);
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
                             int64_t np, float* S, int64_t lds) {
  for (int64_t n0 = 0; n0 < np; n0 += 16 * kNV) {
    const int nv = (int)((np - n0) / 16 < kNV ? (np - n0) / 16 : kNV);
    const BtFn full = bt_fn(kMR, nv);
    int64_t i = 0;
    for (; i + kMR <= r; i += kMR) full(rows + i, D, Bp + n0, ldb, S + i * lds + n0, lds);
    if (i < r) bt_fn((int)(r - i), nv)(rows + i, D, Bp + n0, ldb, S + i * lds + n0, lds);
  }
}

DRE_AVX512 void gemm_at_rows(const float* A, int64_t lda, const float* const* rows, int64_t r, int64_t K, int64_t D,
                             float* E, int64_t lde) {
  constexpr int64_t kChunk = 64;  // rows per pass: the chunk's slice of X (64 x 48 floats) and of A stay in L1
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
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (j < D) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(D - j), x + j);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

DRE_AVX512 void soft_row(float xsq, const float* sc, const float* csq, const float* s, int64_t K, float* a,
                         float* d) {
  const int64_t kp = pad16(K);
  const __m512 vx = _mm512_set1_ps(xsq), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 vmax = ninf;
  __mmask16 nan = 0;
  for (int64_t k = 0; k < kp; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    __m512 v = _mm512_add_ps(_mm512_fnmadd_ps(two, _mm512_loadu_ps(sc + k), vx), _mm512_loadu_ps(csq + k));
    v = _mm512_maskz_mov_ps(valid, _mm512_max_ps(zero, v));  // clamp at 0; NaN stays NaN
    _mm512_storeu_ps(d + k, v);
    __m512 l = _mm512_mul_ps(_mm512_xor_ps(_mm512_loadu_ps(s + k), _mm512_set1_ps(-0.0f)), v);
    l = _mm512_mask_mov_ps(ninf, valid, l);
    nan |= _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q);
    _mm512_storeu_ps(a + k, l);
    vmax = _mm512_max_ps(vmax, l);
  }
  if (nan) {
    for (int64_t k = 0; k < K; ++k) a[k] = __builtin_nanf("");
    return;
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = zero;
  for (int64_t k = 0; k < kp; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(a + k), m)));
    _mm512_storeu_ps(a + k, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t k = 0; k < kp; k += 16) _mm512_storeu_ps(a + k, _mm512_mul_ps(_mm512_loadu_ps(a + k), inv));
}

DRE_AVX512 int64_t hard_row(const float* sc, const float* csq, int64_t K) {
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

DRE_AVX512 void add_row(float* dst, const float* src, int64_t D) {
  int64_t j = 0;
  for (; j + 16 <= D; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_add_ps(_mm512_loadu_ps(dst + j), _mm512_loadu_ps(src + j)));
  if (j < D) {
    const __mmask16 t = tail_mask(D - j);
    _mm512_mask_storeu_ps(dst + j, t, _mm512_add_ps(_mm512_maskz_loadu_ps(t, dst + j), _mm512_maskz_loadu_ps(t, src + j)));
  }
}

DRE_AVX512 float soft_bwd_row(const float* a, const float* d, const float* h, const float* gc, const float* s,
                              int64_t K, float* w_out, float* gs, float* ws, float* ms) {
  const int64_t kp = pad16(K);
  __m512 vga = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; k += 16)
    vga = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_sub_ps(_mm512_loadu_ps(h + k), _mm512_loadu_ps(gc + k)), vga);
  const __m512 ga = _mm512_set1_ps(_mm512_reduce_add_ps(vga));
  __m512 vws = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    const __m512 ak = _mm512_loadu_ps(a + k);
    const __m512 g = _mm512_sub_ps(_mm512_loadu_ps(h + k), _mm512_loadu_ps(gc + k));
    const __m512 u = _mm512_maskz_mov_ps(valid, _mm512_mul_ps(ak, _mm512_sub_ps(g, ga)));
    const __m512 w = _mm512_mul_ps(_mm512_xor_ps(_mm512_loadu_ps(s + k), _mm512_set1_ps(-0.0f)), u);
    _mm512_storeu_ps(w_out + k, w);
    _mm512_storeu_ps(gs + k, _mm512_fnmadd_ps(u, _mm512_loadu_ps(d + k), _mm512_loadu_ps(gs + k)));
    _mm512_storeu_ps(ws + k, _mm512_add_ps(_mm512_loadu_ps(ws + k), w));
    _mm512_storeu_ps(ms + k, _mm512_add_ps(_mm512_loadu_ps(ms + k), ak));
    vws = _mm512_add_ps(vws, w);
  }
  return _mm512_reduce_add_ps(vws);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace dre
