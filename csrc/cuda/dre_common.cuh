// Device helpers shared by the dre CUDA kernels. No includes at all: this file and the kernel sources compile with
// nvcc (the extension), with NVRTC (the cupy backend, which has no host headers) and, for the CPU-side tests, as
// plain C++ under DRE_CUDA_EMULATE (tests/cuda_emu/emu.h supplies threadIdx, __syncthreads, shuffles, atomics).
//
// Dtype codes (the `*_dt` kernel arguments): 0 float32, 1 float16, 2 bfloat16. Rows are converted to float32 on
// load and rounded to nearest-even on store; all accumulation is float32 (float64 for the column log-sum-exp of the
// contrastive loss). Every element offset is 64-bit (long long): row * stride never overflows at 2^31 rows.
#pragma once

#ifndef DRE_CUDA_EMULATE
#define DRE_DEVICE __device__ __forceinline__
#define DRE_GLOBAL extern "C" __global__
#define DRE_DYN_SMEM(name) extern __shared__ float name[]
#else
#define DRE_DYN_SMEM(name) float* name = dre_emu::dyn_smem()
#define DRE_DEVICE inline
#define DRE_GLOBAL extern "C"
#endif

namespace dre_cuda {

typedef long long i64;
typedef unsigned long long u64;

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { NTHREADS = 256 };  // every kernel runs 256-thread blocks (8 warps)

DRE_DEVICE float bf16_to_f32(unsigned short u) { return __uint_as_float(((unsigned int)u) << 16); }

DRE_DEVICE unsigned short f32_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                  // round to nearest even
  return (unsigned short)(u >> 16);
}

#ifndef DRE_CUDA_EMULATE
DRE_DEVICE float f16_to_f32(unsigned short u) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(u));
  return f;
}
DRE_DEVICE unsigned short f32_to_f16(float f) {
  unsigned short u;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f));
  return u;
}
#endif

// element i (already multiplied by its stride) of a float32/float16/bfloat16 array, as float32
DRE_DEVICE float load_f(const void* p, i64 i, int dt) {
  if (dt == DT_F32) return ((const float*)p)[i];
  if (dt == DT_BF16) return bf16_to_f32(((const unsigned short*)p)[i]);
  return f16_to_f32(((const unsigned short*)p)[i]);
}

DRE_DEVICE void store_f(void* p, i64 i, float v, int dt) {
  if (dt == DT_F32) {
    ((float*)p)[i] = v;
  } else if (dt == DT_BF16) {
    ((unsigned short*)p)[i] = f32_to_bf16(v);
  } else {
    ((unsigned short*)p)[i] = f32_to_f16(v);
  }
}

// entry i of an int32 (is64 = 0) or int64 (is64 = 1) index array
DRE_DEVICE i64 load_index(const void* p, i64 i, int is64) {
  return is64 ? ((const i64*)p)[i] : (i64)((const int*)p)[i];
}

DRE_DEVICE float f_inf() { return __uint_as_float(0x7f800000u); }
DRE_DEVICE bool f_isnan(float v) { return v != v; }

DRE_DEVICE float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
DRE_DEVICE float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// (value, index) argmin over a warp with torch.argmin's rules: the first NaN wins, else the first minimum.
DRE_DEVICE bool argmin_better(float v, int k, float w, int j) {
  const bool vn = f_isnan(v), wn = f_isnan(w);
  if (vn || wn) return vn && (!wn || k < j);
  return v < w || (v == w && k < j);
}
DRE_DEVICE void warp_argmin(float& v, int& k) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    const int j = __shfl_xor_sync(0xffffffffu, k, o);
    if (argmin_better(w, j, v, k)) {
      v = w;
      k = j;
    }
  }
}

}  // namespace dre_cuda
