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
#define DRE_DYN_SMEM(name) extern __shared__ __align__(16) float name[]
// at least `min_blocks` blocks of NTHREADS per SM: caps registers at 65536 / (NTHREADS * min_blocks)
#define DRE_MIN_BLOCKS(min_blocks) __launch_bounds__(NTHREADS, min_blocks)
#else
#define DRE_MIN_BLOCKS(min_blocks)
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

// q = x / d for 0 <= x < 2^31 (x % d: x - q d), by a multiply-high and a shift (Granlund and Montgomery, as CUTLASS's
// FastDivmod): m = ceil(2^p / d) with p = 31 + ceil(log2 d), so floor(x m / 2^p) = floor(x / d) for every such x
// (m d - 2^p < d <= 2^(p - 31)). nvcc compiles a division by a runtime int to ~20 instructions (SASS: I2F.RP,
// MUFU.RCP, F2I and fix-ups), and the staging loops divided every element's index by a width, two or three times.
// Its set-up is a 64-bit division (a call of ~70 instructions): made once per kernel (the full-width ones) or per
// tile staging (the column-tiled ones, where held in their struct it would stay live in registers).
struct FastDiv {
  int d;
  unsigned m = 0;
  int s = 0;
  DRE_DEVICE explicit FastDiv(int divisor) : d(divisor) {
    if (d > 1) {
      const int l = 32 - __clz(d - 1);  // ceil(log2 d)
      m = (unsigned)(((1ull << (31 + l)) + (unsigned)d - 1) / (unsigned)d);
      s = l - 1;
    }
  }
  DRE_DEVICE int div(int x) const { return d > 1 ? (int)(__umulhi((unsigned)x, m) >> s) : x; }
};

// For e = tid, tid + NTHREADS, .. < n: store(e, load(e)), the block's threads striding over n elements (global ->
// shared staging). Each thread issues BATCH loads before it uses the first: written as one loop of load-then-store,
// nvcc kept one load in flight per thread (SASS: LDG, then its conversion and STS, per element), one memory round
// trip per element; here one per BATCH elements.
template <int BATCH = 8, class Load, class Store>
DRE_DEVICE void staged_copy(int n, int tid, Load&& load, Store&& store) {
  for (int e0 = tid; e0 < n; e0 += BATCH * NTHREADS) {
    decltype(load(0)) v[BATCH];
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      const int e = e0 + j * NTHREADS;
      v[j] = e < n ? load(e) : decltype(load(0))(0);
    }
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      const int e = e0 + j * NTHREADS;
      if (e < n) store(e, v[j]);
    }
  }
}

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


// ------------------------------------------------------------------ tensor cores (sm_80 and newer)
// The 16-bit dtype of a row source (DT_F16 or DT_BF16) is the MMA input type; float32 operands that meet those rows
// (codewords, assignments, gradients) are split v ~= hi + lo into two 16-bit values and multiplied in two MMAs:
// ~16 (bf16) or ~22 (fp16) mantissa bits of the operand, products exact, float32 accumulation.
DRE_DEVICE float from_16(unsigned short u, int dt) { return dt == DT_BF16 ? bf16_to_f32(u) : f16_to_f32(u); }
DRE_DEVICE unsigned short to_16(float v, int dt) { return dt == DT_BF16 ? f32_to_bf16(v) : f32_to_f16(v); }
DRE_DEVICE void split_16(float v, int dt, unsigned short& hi, unsigned short& lo) {
  hi = to_16(v, dt);
  lo = to_16(v - from_16(hi, dt), dt);
}
DRE_DEVICE unsigned pack_16(unsigned short lo, unsigned short hi) { return (unsigned)lo | ((unsigned)hi << 16); }
// two adjacent 16-bit values (p 4-byte aligned) as one MMA register
DRE_DEVICE unsigned lds_pair(const unsigned short* p) {
#ifdef DRE_CUDA_EMULATE
  if (((unsigned long long)p) & 3ull) __builtin_trap();  // a misaligned 32-bit shared load faults on the GPU
  return pack_16(p[0], p[1]);
#else
  return *(const unsigned*)p;
#endif
}

// The A fragment of mma.m16n8k16 (below) from a row-major 16-bit shared tile: p at element (g, 2t) of the 16 x 16
// block, ld the tile's row stride
DRE_DEVICE void lds_frag_a(unsigned (&a)[4], const unsigned short* p, int ld) {
  a[0] = lds_pair(p);
  a[1] = lds_pair(p + 8 * ld);
  a[2] = lds_pair(p + 8);
  a[3] = lds_pair(p + 8 * ld + 8);
}

// d (16x8 float32 tile) += A (16x16, row-major) B (16x8, column-major): mma.sync.aligned.m16n8k16, one warp.
// Fragments (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4, low half = lower column:
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];   d[e] = D[g + 8 (e / 2)][2t + e % 2]
DRE_DEVICE void mma_16816(float* d, const unsigned* a, const unsigned* b, int dt) {
#if defined(DRE_CUDA_EMULATE)
  dre_emu::mma_16816(d, a, b, dt);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (dt == DT_BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host launches the tensor-core kernels only on compute capability >= 8.0
#endif
}


// ---- asynchronous copies and matrix loads (sm_80 and newer; the emulation in tests/cuda_emu/emu.h)
#if !defined(DRE_CUDA_EMULATE) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// the 32-bit shared-window address of a generic pointer into shared memory
DRE_DEVICE unsigned smem_u32(const void* p) {
  unsigned a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }" : "=r"(a) : "l"(p));
  return a;
}
#endif

// 16 bytes global -> shared without a register round trip (cp.async.cg, L2 only); !valid: the 16 bytes are zeroed
// (src-size 0, nothing read). Both addresses 16-byte aligned.
DRE_DEVICE void cp_async_16(void* dst_shared, const void* src, bool valid) {
#if defined(DRE_CUDA_EMULATE)
  dre_emu::cp_async_16(dst_shared, src, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst_shared)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  __trap();
#endif
}
// close the copies issued so far into a group; wait until at most N groups are pending (this thread's copies)
DRE_DEVICE void cp_async_commit() {
#if defined(DRE_CUDA_EMULATE)
  dre_emu::cp_async_commit_group();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
DRE_DEVICE void cp_async_wait() {
#if defined(DRE_CUDA_EMULATE)
  dre_emu::cp_async_wait_group(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// The A fragment of mma.m16n8k16 (16 x 16, row-major in the fragment) of the transpose of a row-major 16-bit shared
// tile T (A = T^T: A's rows are T's columns): lane l gives the address of row (l % 8) + 8 (l / 16) of T at column
// 8 ((l / 8) % 2) (8 consecutive elements, 16-byte aligned), and ldmatrix .trans hands lane (g, t) the pairs
// (T[2t..2t+1][g], i.e. A[g][2t..2t+1]) of the four 8 x 8 matrices in a[0..3]'s order.
DRE_DEVICE void ldmatrix_x4_trans(unsigned (&a)[4], const unsigned short* row_ptr) {
#if defined(DRE_CUDA_EMULATE)
  dre_emu::ldmatrix_x4_trans(a, row_ptr);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_u32(row_ptr)));
#else
  __trap();
#endif
}

}  // namespace dre_cuda
