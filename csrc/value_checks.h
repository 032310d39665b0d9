// Value checks of the native ops (CSR offsets, index ranges, duplicate update indices), shared by the CPU and CUDA
// impls. They are the only ones a native call gets: the Python wrappers leave these checks to the kernel backends'
// impls (dre_kernels/_checks.py, check_values), eager or compiled, and the messages here are theirs (for
// `reference` and `torch`), so a bad index raises the same error whatever the backend.
//
// Cost: all the checks of one op call bring their statistics to the host in one copy (one device synchronisation
// on CUDA, none on CPU), and a small process-wide cache remembers the tensors that passed (a weak reference to the
// TensorImpl, its version counter, data pointer, sizes, strides, dtype, device, the kind of check and its bound), so
// the backward op and repeated calls on unchanged tensors do not synchronise again. An in-place write bumps the
// version, and a freed TensorImpl's memory is held by the weak reference, so neither matches a stale entry; writes
// that bypass the version counter (.data, numpy/DLPack views, raw kernels) are not seen, as for autograd's saved
// tensors. Inference tensors have no version counter and are checked every time.
//
// During CUDA graph capture the caller passes device_asserts: every check becomes an at::_assert_async of its
// values, cache or not (no synchronisation is allowed there, and a replay sees whatever the buffers hold then).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dre {

// offsets[0] == 0, non-decreasing, offsets[-1] == total (the row count of `total_name`)
struct OffsetsCheck {
  const at::Tensor* offsets;
  int64_t total;
  const char* name;
  const char* total_name;
};

// 0 <= index[i] < rows (the row count of `of_name`)
struct IndexCheck {
  const at::Tensor* index;
  int64_t rows;
  const char* name;
  const char* of_name;
};

// index holds no value twice (index == nullptr: no such check)
struct UniqueCheck {
  const at::Tensor* index = nullptr;
  const char* name = nullptr;
};

void check_values(const std::vector<OffsetsCheck>& offsets, const std::vector<IndexCheck>& indices,
                  UniqueCheck unique = {}, bool device_asserts = false);

}  // namespace dre
