// dre bank_gather and bank_update_ on CUDA.
//
//   bank_gather(bank, index)[i] = bank[index_i]             (a bit copy in the bank's dtype)
//   bank_update_: new_i = momentum * bank[index_i] + (1 - momentum) * values_i in float32,
//                 new_i / max(||new_i||, 1e-12) if normalize, stored in bank.dtype at row index_i (in place).
// The bank is addressed through its strides (it is updated in place, so it is never copied); all offsets are
// 64-bit. Indices are range-checked and (for the update) unique before launch, so rows never race.
//
// Launch rules: 256 threads; gather grid min(ceil(n * D / 256), 65535 * 16) with a grid-stride loop; update one
// block per row, grid min(n, 65535 * 16), grid-stride over rows.
#include "dre_common.cuh"

using namespace dre_cuda;

DRE_GLOBAL void dre_bank_gather(const void* bank, int dt, i64 s0, i64 s1, const void* idx, int idx64, void* out,
                                i64 n, i64 D) {
  const i64 total = n * D, first = (i64)blockIdx.x * NTHREADS + threadIdx.x, stride = (i64)gridDim.x * NTHREADS;
  const auto copy = [&](i64 e, i64 i) {  // element e, of row i
    const i64 src = load_index(idx, i, idx64) * s0 + (e - i * D) * s1;
    if (dt == DT_F32) {
      ((float*)out)[e] = ((const float*)bank)[src];
    } else {
      ((unsigned short*)out)[e] = ((const unsigned short*)bank)[src];
    }
  };
  if (total < ((i64)1 << 31)) {
    // the row a multiply-high (FastDiv): a 64-bit division is a call of ~70 instructions, per element of a copy that
    // is otherwise two loads and a store
    const FastDiv by_d((int)D);
    for (i64 e = first; e < total; e += stride) copy(e, by_d.div((int)e));
  } else {
    for (i64 e = first; e < total; e += stride) copy(e, e / D);
  }
}

DRE_GLOBAL void dre_bank_update(void* bank, int dt, i64 s0, i64 s1, const void* idx, int idx64, const void* values,
                                int v_dt, i64 v0, i64 v1, i64 n, int D, float momentum, float keep, int normalize) {
  __shared__ float red[NTHREADS / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (i64 i = blockIdx.x; i < n; i += gridDim.x) {
    const i64 row = load_index(idx, i, idx64) * s0;
    float inv = 1.f;
    if (normalize) {
      float sq = 0.f;
      for (int d = tid; d < D; d += NTHREADS) {
        const float v = momentum * load_f(bank, row + d * s1, dt) + keep * load_f(values, i * v0 + d * v1, v_dt);
        sq += v * v;
      }
      sq = warp_sum(sq);
      if (lane == 0) red[warp] = sq;
      __syncthreads();
      float t = 0.f;
      for (int w = 0; w < NTHREADS / 32; ++w) t += red[w];
      inv = 1.f / fmaxf(sqrtf(t), 1e-12f);
      __syncthreads();  // red is reused by the next row
    }
    // each element is read (again) and written by the same thread, so the in-place update cannot race
    for (int d = tid; d < D; d += NTHREADS) {
      const float v = momentum * load_f(bank, row + d * s1, dt) + keep * load_f(values, i * v0 + d * v1, v_dt);
      store_f(bank, row + d * s1, v * inv, dt);
    }
  }
}

#if !defined(__CUDACC_RTC__) && !defined(DRE_CUDA_EMULATE)
#include "launchers.h"

namespace dre_cuda_launch {
cudaError_t bank_gather(unsigned grid, cudaStream_t stream, const void* bank, int dt, i64 s0, i64 s1, const void* idx,
                        int idx64, void* out, i64 n, i64 D) {
  if (grid > 0) dre_bank_gather<<<grid, NTHREADS, 0, stream>>>(bank, dt, s0, s1, idx, idx64, out, n, D);
  return cudaGetLastError();
}

cudaError_t bank_update(unsigned grid, cudaStream_t stream, void* bank, int dt, i64 s0, i64 s1, const void* idx,
                        int idx64, const void* values, int v_dt, i64 v0, i64 v1, i64 n, int D, float momentum,
                        float keep, int normalize) {
  if (grid > 0)
    dre_bank_update<<<grid, NTHREADS, 0, stream>>>(bank, dt, s0, s1, idx, idx64, values, v_dt, v0, v1, n, D, momentum,
                                                   keep, normalize);
  return cudaGetLastError();
}
}  // namespace dre_cuda_launch
#endif
