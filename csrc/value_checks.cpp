// Value checks of the native ops, with one device-to-host copy per call and a cache of what passed: value_checks.h.
// The messages are those of dre_kernels/_checks.py, with the "dre: " prefix of the C++ errors.
#include "value_checks.h"

#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <string>

namespace dre {
namespace {

enum Kind : int { kOffsets = 0, kIndex = 1, kUnique = 2 };

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> ref;
  int64_t version;
  const void* data;
  std::vector<int64_t> sizes, strides;
  int64_t storage_offset;
  at::ScalarType dtype;
  at::Device device;
  int kind;
  int64_t bound;

  bool matches(const at::Tensor& t, int k, int64_t b) const {
    return kind == k && bound == b && !ref.expired() && ref._unsafe_get_target() == t.unsafeGetTensorImpl() &&
           version == t._version() && data == t.data_ptr() && dtype == t.scalar_type() && device == t.device() &&
           storage_offset == t.storage_offset() && t.sizes().equals(sizes) && t.strides().equals(strides);
  }
};

constexpr size_t kCacheSize = 16;

// Process-wide, not per thread: on CUDA the backward ops run in autograd's device thread and must find what the
// forward's thread verified. In-place writes from any thread bump the version counter that entries key on.
// (never destroyed: nothing to release at exit, and no order problem with torch's own statics)
std::mutex& cache_mutex() {
  static auto* mu = new std::mutex();
  return *mu;
}

std::vector<Entry>& cache() {
  static auto* entries = new std::vector<Entry>();
  return *entries;
}

bool trackable(const at::Tensor& t) { return !t.is_inference(); }

bool cached_locked(const at::Tensor& t, int kind, int64_t bound) {
  for (const Entry& e : cache())
    if (e.matches(t, kind, bound)) return true;
  return false;
}

bool cached(const at::Tensor& t, int kind, int64_t bound) {
  if (!trackable(t)) return false;
  const std::lock_guard<std::mutex> lock(cache_mutex());
  return cached_locked(t, kind, bound);
}

void remember(const at::Tensor& t, int kind, int64_t bound) {
  if (!trackable(t)) return;
  const std::lock_guard<std::mutex> lock(cache_mutex());
  if (cached_locked(t, kind, bound)) return;
  std::vector<Entry>& entries = cache();
  // dead entries go first, then the oldest
  std::vector<Entry> kept;
  kept.reserve(kCacheSize);
  for (Entry& e : entries)
    if (!e.ref.expired()) kept.push_back(std::move(e));
  if (kept.size() >= kCacheSize) kept.erase(kept.begin(), kept.begin() + (kept.size() - kCacheSize + 1));
  kept.push_back(Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
                       t._version(), t.data_ptr(), t.sizes().vec(), t.strides().vec(), t.storage_offset(),
                       t.scalar_type(), t.device(), kind, bound});
  entries = std::move(kept);
}

at::Tensor min_step(const at::Tensor& o64) {
  return o64.numel() > 1 ? (o64.slice(0, 1) - o64.slice(0, 0, -1)).min() : at::zeros({}, o64.options());
}

at::Tensor has_repeat(const at::Tensor& idx64) {
  const at::Tensor s = std::get<0>(at::sort(idx64));
  return (s.slice(0, 1) == s.slice(0, 0, -1)).any().to(at::kLong);
}

void device_asserts(const std::vector<OffsetsCheck>& offsets, const std::vector<IndexCheck>& indices,
                    UniqueCheck unique) {
  for (const OffsetsCheck& c : offsets) {
    const at::Tensor o = c.offsets->to(at::kLong);
    const at::Tensor ok = (o[0] == 0).logical_and(o[-1] == c.total).logical_and(min_step(o) >= 0);
    at::_assert_async(ok, std::string(c.name) + " must start at 0, not decrease and end at the row count of " +
                              c.total_name);
  }
  for (const IndexCheck& c : indices) {
    if (c.index->numel() == 0) continue;
    const auto mm = at::aminmax(c.index->to(at::kLong));
    at::_assert_async((std::get<0>(mm) >= 0).logical_and(std::get<1>(mm) < c.rows),
                      std::string(c.name) + " out of range for " + c.of_name);
  }
  if (unique.index != nullptr && unique.index->numel() > 1)
    at::_assert_async(has_repeat(unique.index->to(at::kLong)) == 0,
                      std::string(unique.name) + " must not repeat an index");
}

}  // namespace

void check_values(const std::vector<OffsetsCheck>& offsets_in, const std::vector<IndexCheck>& indices_in,
                  UniqueCheck unique, bool device_asserts_only) {
  for (const OffsetsCheck& c : offsets_in)
    TORCH_CHECK_VALUE(c.offsets->numel() >= 1, "dre: ", c.name, " must hold B+1 >= 1 entries; got an empty tensor");
  if (device_asserts_only) {
    device_asserts(offsets_in, indices_in, unique);
    return;
  }
  std::vector<OffsetsCheck> offsets;
  std::vector<IndexCheck> indices;
  for (const OffsetsCheck& c : offsets_in)
    if (!cached(*c.offsets, kOffsets, c.total)) offsets.push_back(c);
  for (const IndexCheck& c : indices_in)
    if (!cached(*c.index, kIndex, c.rows)) indices.push_back(c);
  const bool check_unique = unique.index != nullptr && unique.index->numel() > 1 && !cached(*unique.index, kUnique, 0);
  if (offsets.empty() && indices.empty() && !check_unique) return;

  std::vector<at::Tensor> stats;
  for (const OffsetsCheck& c : offsets) {
    const at::Tensor o = c.offsets->to(at::kLong);
    stats.insert(stats.end(), {o[0], o[-1], min_step(o)});
  }
  for (const IndexCheck& c : indices) {
    if (c.index->numel() == 0) {
      const at::Tensor z = at::zeros({}, c.index->options().dtype(at::kLong));
      stats.insert(stats.end(), {z, z});
    } else {
      const auto mm = at::aminmax(c.index->to(at::kLong));
      stats.insert(stats.end(), {std::get<0>(mm), std::get<1>(mm)});
    }
  }
  if (check_unique) stats.push_back(has_repeat(unique.index->to(at::kLong)));
  const at::Tensor host = at::stack(stats).to(at::kCPU);  // the one synchronisation
  const int64_t* v = host.data_ptr<int64_t>();

  for (const OffsetsCheck& c : offsets) {
    const int64_t first = v[0], last = v[1], step = v[2];
    v += 3;
    TORCH_CHECK_VALUE(first == 0, "dre: ", c.name, "[0] must be 0; got ", first);
    TORCH_CHECK_VALUE(step >= 0, "dre: ", c.name, " must be non-decreasing; it decreases somewhere (smallest step ",
                      step, ")");
    TORCH_CHECK_VALUE(last == c.total, "dre: ", c.name, "[-1] must equal the number of rows of ", c.total_name, " (",
                      c.total, "); got ", last);
  }
  for (const IndexCheck& c : indices) {
    const int64_t lo = v[0], hi = v[1];
    v += 2;
    TORCH_CHECK_INDEX(c.index->numel() == 0 || (lo >= 0 && hi < c.rows), "dre: ", c.name, " holds ",
                      lo < 0 ? lo : hi, ", out of range for ", c.of_name, " with ", c.rows, " rows (valid: 0 to ",
                      c.rows - 1, ")");
  }
  if (check_unique)
    TORCH_CHECK_VALUE(v[0] == 0, "dre: ", unique.name,
                      " must not repeat an index (a row would be written twice); it does");

  for (const OffsetsCheck& c : offsets) remember(*c.offsets, kOffsets, c.total);
  for (const IndexCheck& c : indices) remember(*c.index, kIndex, c.rows);
  if (check_unique) remember(*unique.index, kUnique, 0);
}

}  // namespace dre
