// Helpers shared by the native CPU kernels: dtype-converting row loads/stores, host-side index and offset
// validation, and the split of a ragged row sequence into per-thread chunks.
//
// Rows of any float dtype (float16, bfloat16, float32, float64) and any strides are converted block by block
// into small thread-local buffers of the accumulation type (float, or double when an input is float64), so no
// kernel ever copies a whole (M, D) or (Mb, D) tensor.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dre {
namespace cpu {

// A 2-D float tensor seen as rows: base pointer, dtype and strides (in elements). Never copied.
struct Rows {
  const char* base = nullptr;
  char* mbase = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t s0 = 0, s1 = 1, n = 0, d = 0, esize = 4;

  Rows() = default;
  explicit Rows(const at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(t.dim() == 2);
    base = static_cast<const char*>(t.data_ptr());
    mbase = static_cast<char*>(t.data_ptr());
    dtype = t.scalar_type();
    s0 = t.stride(0);
    s1 = t.stride(1);
    n = t.size(0);
    d = t.size(1);
    esize = t.element_size();
  }

  template <typename src_t, typename T>
  static inline void load_as(const src_t* p, int64_t s1, int64_t d, T* dst) {
    if (s1 == 1) {
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<T>(p[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<T>(p[j * s1]);
    }
  }

  // dst[0:d] = row i converted to T.
  template <typename T>
  inline void load(int64_t i, T* dst) const {
    const char* p = base + i * s0 * esize;
    switch (dtype) {
      case at::kFloat: load_as(reinterpret_cast<const float*>(p), s1, d, dst); break;
      case at::kDouble: load_as(reinterpret_cast<const double*>(p), s1, d, dst); break;
      case at::kHalf: load_as(reinterpret_cast<const c10::Half*>(p), s1, d, dst); break;
      case at::kBFloat16: load_as(reinterpret_cast<const c10::BFloat16*>(p), s1, d, dst); break;
      default: TORCH_CHECK(false, "dre: unsupported dtype ", dtype);
    }
  }

  // Prefetch row i (every cache line of it) ahead of a load.
  inline void prefetch(int64_t i) const {
    const char* p = base + i * s0 * esize;
    const int64_t bytes = (s1 == 1 ? d : 1) * esize;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
  }

  template <typename dst_t, typename T>
  static inline void store_as(dst_t* p, int64_t s1, int64_t d, const T* src) {
    for (int64_t j = 0; j < d; ++j) p[j * s1] = static_cast<dst_t>(src[j]);
  }

  // row i = src[0:d] rounded to the tensor's dtype.
  template <typename T>
  inline void store(int64_t i, const T* src) const {
    char* p = mbase + i * s0 * esize;
    switch (dtype) {
      case at::kFloat: store_as(reinterpret_cast<float*>(p), s1, d, src); break;
      case at::kDouble: store_as(reinterpret_cast<double*>(p), s1, d, src); break;
      case at::kHalf: store_as(reinterpret_cast<c10::Half*>(p), s1, d, src); break;
      case at::kBFloat16: store_as(reinterpret_cast<c10::BFloat16*>(p), s1, d, src); break;
      default: TORCH_CHECK(false, "dre: unsupported dtype ", dtype);
    }
  }
};

inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "dre: ", name,
              " must be float16, bfloat16, float32 or float64; got ", st);
  TORCH_CHECK(t.device().is_cpu(), "dre: ", name, " must be a CPU tensor for the CPU kernel; got ", t.device());
}

inline void check_2d(const at::Tensor& t, const char* name) {
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, "dre: ", name, " must be 2-D; got shape ", t.sizes());
}

// 1-D int32/int64 tensor as contiguous int64 (offsets and indices are small next to the features).
inline at::Tensor as_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, "dre: ", name, " must be 1-D; got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "dre: ", name,
              " must be an int32 or int64 tensor; got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

inline at::ScalarType acc_type(std::initializer_list<const at::Tensor*> ts) {
  for (auto* t : ts)
    if (t != nullptr && t->defined() && t->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// Number of chunks the row work is split into: a few per thread, so uneven chunks still balance.
inline int64_t num_chunks(int64_t total_rows, int64_t min_rows_per_chunk) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_size = std::max<int64_t>(1, total_rows / std::max<int64_t>(1, min_rows_per_chunk));
  return std::max<int64_t>(1, std::min<int64_t>(threads, by_size));
}

}  // namespace cpu
}  // namespace dre
