// dre::bank_gather and dre::bank_update_ on CPU.
//
//   bank_gather(bank, index)[i] = bank[index_i]
//   bank_update_: new_i = momentum * bank[index_i] + (1 - momentum) * values_i   (float32; float64 for a float64
//                 bank), divided by max(||new_i||, 1e-12) if normalize, stored in bank.dtype at row index_i.
// Indices are range-checked here (and duplicates rejected for the update), since under torch.compile the Python
// value checks are skipped and a bad index must still raise instead of touching memory out of bounds.
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "cpu/common.h"
#include "value_checks.h"

namespace dre {
namespace cpu {
namespace {

at::Tensor bank_gather_cpu(const at::Tensor& bank, const at::Tensor& index) {
  check_2d(bank, "bank");
  const at::Tensor idx = as_index(index, "index");
  check_values({}, {{&index, bank.size(0), "index", "bank"}});
  const int64_t n = idx.numel(), D = bank.size(1);
  at::Tensor out = at::empty({n, D}, bank.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0 || D == 0) return out;
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t es = bank.element_size(), s0 = bank.stride(0), s1 = bank.stride(1);
  const char* src = static_cast<const char*>(bank.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const char* row = src + ip[i] * s0 * es;
      char* o = dst + i * D * es;
      if (s1 == 1) {
        std::memcpy(o, row, D * es);
      } else {
        for (int64_t j = 0; j < D; ++j) std::memcpy(o + j * es, row + j * s1 * es, es);
      }
    }
  });
  return out;
}

template <typename T>
void update_impl(const at::Tensor& bank, const at::Tensor& idx, const at::Tensor& values, double momentum,
                 bool normalize) {
  const Rows br(bank), vr(values);
  const int64_t n = idx.numel(), D = bank.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const T mom = static_cast<T>(momentum), keep = static_cast<T>(1.0 - momentum);
  at::parallel_for(0, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
    std::vector<T> old(D), nw(D);
    for (int64_t i = i0; i < i1; ++i) {
      br.load(ip[i], old.data());
      vr.load(i, nw.data());
      T sq = 0;
      for (int64_t j = 0; j < D; ++j) {
        nw[j] = mom * old[j] + keep * nw[j];
        sq += nw[j] * nw[j];
      }
      if (normalize) {
        const T inv = T(1) / std::max(std::sqrt(sq), T(1e-12));
        for (int64_t j = 0; j < D; ++j) nw[j] *= inv;
      }
      br.store(ip[i], nw.data());
    }
  });
}

void bank_update_cpu(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& values, double momentum,
                     bool normalize) {
  check_2d(bank, "bank");
  check_2d(values, "values");
  const at::Tensor idx = as_index(index, "index");
  TORCH_CHECK_VALUE(values.size(0) == idx.numel() && values.size(1) == bank.size(1),
                    "dre: values must have shape (len(index), D) = (", idx.numel(), ", ", bank.size(1), "); got ",
                    values.sizes());
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "dre: momentum must be in [0, 1]; got ", momentum);
  // no repeats: two writes to one row from two threads would race (and the contract forbids them anyway)
  check_values({}, {{&index, bank.size(0), "index", "bank"}}, {&index, "index"});
  if (idx.numel() == 0 || bank.size(1) == 0) return;
  if (bank.scalar_type() == at::kDouble)
    update_impl<double>(bank, idx, values, momentum, normalize);
  else
    update_impl<float>(bank, idx, values, momentum, normalize);
}

}  // namespace
}  // namespace cpu
}  // namespace dre

TORCH_LIBRARY_IMPL(dre, CPU, m) {
  m.impl("bank_gather", &dre::cpu::bank_gather_cpu);
  m.impl("bank_update_", &dre::cpu::bank_update_cpu);
}
