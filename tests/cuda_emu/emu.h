// A CPU emulator of the few CUDA features the dre kernels use, so tests can run csrc/cuda/*.cu without a GPU:
// compiled as C++20 with -DDRE_CUDA_EMULATE -include emu.h. A launch runs the blocks one after another (first to
// last, or last to first: blocks_reversed), each with 256 std::threads (a persistent pool per launch); __syncthreads
// is a std::barrier over the block, warp shuffles go through a per-warp exchange buffer with a per-warp barrier,
// atomics are std::atomic_ref, static __shared__ arrays become function statics (safe: one block at a time) and
// dynamic shared memory a per-launch buffer, NaN-poisoned for every block.
// It checks the kernels' logic (indexing, synchronisation structure, reductions, atomics, cp.async groups: a copy
// lands at the wait that covers it), not their speed. Built with ThreadSanitizer (cuda_emu/build.py) it also checks
// their synchronisation: threads are real threads, so a missing __syncthreads is a data race TSan reports even where
// the threads happened to run in a safe order.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct dre_emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace dre_emu {
inline constexpr int kThreads = 256;
inline thread_local dre_emu_dim3 tidx, bidx;
inline dre_emu_dim3 bdim, gdim;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barrier[kThreads / 32] = {};
inline unsigned long long shfl_buf[kThreads / 32][32];
inline std::vector<float> smem_buf;
#if defined(__SANITIZE_ADDRESS__)
inline constexpr size_t kSmemGuard = 0;  // AddressSanitizer stops any access past the buffer, reads too
#else
inline constexpr size_t kSmemGuard = 64;  // floats past the launch's shared memory, checked after it for writes
#endif

inline float* dyn_smem() { return smem_buf.data(); }

template <typename T>
inline T shfl_xor(T v, int o) {
  const int w = tidx.x / 32, l = tidx.x % 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  shfl_buf[w][l] = bits;
  warp_barrier[w]->arrive_and_wait();
  bits = shfl_buf[w][l ^ o];
  warp_barrier[w]->arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: every lane posts its fragments, then computes its own four
// outputs from the whole warp's A and B, read back through the PTX fragment layout (see dre_common.cuh).
inline unsigned mma_a[kThreads / 32][32][4], mma_b[kThreads / 32][32][2];

inline float from_16(unsigned short u, int dt) {
  if (dt == 2) {
    const unsigned int bits = ((unsigned int)u) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return (float)h;
}

inline void mma_16816(float* d, const unsigned* a, const unsigned* b, int dt) {
  const int w = tidx.x / 32, l = tidx.x % 32, g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) mma_a[w][l][i] = a[i];
  for (int i = 0; i < 2; ++i) mma_b[w][l][i] = b[i];
  warp_barrier[w]->arrive_and_wait();
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float s = 0.f;
    for (int k = 0; k < 16; ++k) {
      const unsigned ra = mma_a[w][(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)];
      const unsigned rb = mma_b[w][col * 4 + (k % 8) / 2][k / 8];
      const unsigned short ua = (unsigned short)(k % 2 ? ra >> 16 : ra & 0xffffu);
      const unsigned short ub = (unsigned short)(k % 2 ? rb >> 16 : rb & 0xffffu);
      s += from_16(ua, dt) * from_16(ub, dt);
    }
    out[e] = d[e] + s;
  }
  warp_barrier[w]->arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// cp.async of 16 bytes (zeros for !valid); the GPU faults on misaligned addresses, so does this. On the GPU the copy
// lands at some point before the issuing thread's cp.async.wait_group that covers its group; here it lands exactly
// there (cp_async_wait_group), so shared memory read before that wait still holds what it held before (NaN-poisoned
// at first): a missing or too-weak wait shows as wrong results. Groups are per thread, as in PTX: issued copies join
// the open group, cp_async_commit_group closes it, cp_async_wait_group(n) lands all but the newest n closed groups.
// A block that ends with copies it never waited for traps. cp_async_immediate = true lands each copy at issue
// instead (the other order a GPU may take, for a test that a buffer is not overwritten while it is still read).
struct CpAsyncCopy {
  void* dst;
  unsigned char data[16];
};
inline thread_local std::vector<CpAsyncCopy> cp_open;
inline thread_local std::vector<std::vector<CpAsyncCopy>> cp_groups;  // closed groups, oldest first
inline std::atomic<bool> cp_async_immediate{false};

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if ((((unsigned long long)dst) | (valid ? ((unsigned long long)src) : 0ull)) & 15ull) __builtin_trap();
  CpAsyncCopy c{dst, {}};
  if (valid) std::memcpy(c.data, src, 16);  // global memory: read-only to these kernels, so read it now
  if (cp_async_immediate)
    std::memcpy(dst, c.data, 16);
  else
    cp_open.push_back(c);
}

inline void cp_async_commit_group() {
  cp_groups.push_back(std::move(cp_open));
  cp_open.clear();
}

inline void cp_async_wait_group(int n) {
  while ((int)cp_groups.size() > n) {
    for (const CpAsyncCopy& c : cp_groups.front()) std::memcpy(c.dst, c.data, 16);
    cp_groups.erase(cp_groups.begin());
  }
}

inline void cp_async_end_block() {
  bool pending = !cp_open.empty();
  for (const auto& g : cp_groups) pending = pending || !g.empty();
  cp_open.clear();
  cp_groups.clear();
  if (pending) __builtin_trap();
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lane l posts the address of row l % 8 of matrix l / 8; lane
// (g = l / 4, t = l % 4) receives (M_i[2t][g], M_i[2t + 1][g]) of each matrix i, the lower row in the low half.
inline const unsigned short* ldm_rows[kThreads / 32][32];
inline void ldmatrix_x4_trans(unsigned* b, const unsigned short* row_ptr) {
  const int w = tidx.x / 32, l = tidx.x % 32, g = l / 4, t = l % 4;
  if (((unsigned long long)row_ptr) & 15ull) __builtin_trap();
  ldm_rows[w][l] = row_ptr;
  warp_barrier[w]->arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    const unsigned lo = ldm_rows[w][8 * i + 2 * t][g], hi = ldm_rows[w][8 * i + 2 * t + 1][g];
    b[i] = lo | (hi << 16);
  }
  warp_barrier[w]->arrive_and_wait();
}

// __syncthreads_or: a barrier that returns whether any thread's p was nonzero. Calls alternate between two flags:
// thread 0 clears a call's flag after the call's second barrier, and the next call to set it is two calls on, after
// barriers that thread 0 reaches only once it has cleared it.
inline std::atomic<int> sync_or_flag[2];
inline thread_local unsigned sync_or_calls = 0;

inline int syncthreads_or(int p) {
  std::atomic<int>& flag = sync_or_flag[sync_or_calls++ & 1];
  if (p) flag.store(1, std::memory_order_relaxed);
  block_barrier->arrive_and_wait();
  const int any = flag.load(std::memory_order_relaxed);
  block_barrier->arrive_and_wait();
  if (tidx.x == 0) flag.store(0, std::memory_order_relaxed);
  return any;
}

// the order a launch runs its blocks in, one after another: first to last, or (true) last to first
inline std::atomic<bool> blocks_reversed{false};

inline void launch(unsigned grid, unsigned smem_bytes, const std::function<void()>& body) {
  if (grid == 0) return;
  const size_t smem_floats = smem_bytes / sizeof(float);
  smem_buf.assign(smem_floats + kSmemGuard, std::nanf(""));  // NaN-poisoned: reading unset smem shows
  std::barrier<> bar(kThreads);
  for (int w = 0; w < kThreads / 32; ++w) warp_barrier[w] = new std::barrier<>(32);
  block_barrier = &bar;
  bdim = {kThreads, 1, 1};
  gdim = {grid, 1, 1};
  const bool reversed = blocks_reversed;
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t) {
    pool.emplace_back([t, grid, reversed, smem_floats, &body, &bar] {
      tidx = {(unsigned)t, 0, 0};
      for (unsigned b = 0; b < grid; ++b) {
        bidx = {reversed ? grid - 1 - b : b, 0, 0};
        body();
        cp_async_end_block();
        bar.arrive_and_wait();  // the next block starts when all threads left this one...
        // ...on freshly poisoned dynamic shared memory, as a GPU block finds another block's leftovers or garbage
        if (t == 0) std::fill(smem_buf.begin(), smem_buf.begin() + smem_floats, std::nanf(""));
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (int w = 0; w < kThreads / 32; ++w) delete warp_barrier[w];
  // the kSmemGuard floats past the launch's shared memory are a guard: a kernel that wrote there overran its smem
  const float poison = std::nanf("");
  for (size_t i = smem_floats; i < smem_buf.size(); ++i)
    if (std::memcmp(&smem_buf[i], &poison, sizeof(float)) != 0) __builtin_trap();
}
}  // namespace dre_emu

#define threadIdx dre_emu::tidx
#define blockIdx dre_emu::bidx
#define blockDim dre_emu::bdim
#define gridDim dre_emu::gdim
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() dre_emu::block_barrier->arrive_and_wait()
#define __syncthreads_or(p) dre_emu::syncthreads_or(p)

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  return dre_emu::shfl_xor(v, o);
}
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off: never fused
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
  std::atomic_ref<unsigned int> a(*p);
  unsigned int old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}

namespace dre_cuda {
inline float f16_to_f32(unsigned short u) {
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return (float)h;
}
inline unsigned short f32_to_f16(float f) {
  _Float16 h = (_Float16)f;
  unsigned short u;
  std::memcpy(&u, &h, 2);
  return u;
}
}  // namespace dre_cuda
