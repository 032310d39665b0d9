// Host glue of the dre CUDA kernels: checks, launch rules, the small torch ops around the kernels, and the
// TORCH_LIBRARY_IMPL(dre, CUDA, ...) registration. Kernels run on torch's current stream of the inputs' device.
//
// This file mirrors dre_kernels/cupy_kernels.py line by line (the cupy backend runs the same .cu kernels through
// NVRTC, and its host code is what the CPU emulation tests exercise); change both together. Formulas and the work
// split: the header comments of residual_encode.cu, contrastive_loss.cu and bank.cu.
//
// Checks: what the Python wrappers check is checked again here (shapes, dtypes, CSR offsets, index ranges,
// duplicate update indices), because under torch.compile the Python value checks are skipped and a bad index must
// raise instead of reaching a kernel. The value checks of one call cost one device synchronisation, or none for
// tensors that passed before unchanged (csrc/value_checks.h).
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>

#include "cuda/launch_rules.h"
#include "contrastive_loss_finish.h"
#include "cuda/launchers.h"
#include "value_checks.h"

namespace dre {
namespace cuda_glue {
namespace {

using i64 = long long;
constexpr double kEps = 1e-12;
constexpr int kClBlock = 64;
constexpr int kClPoTc = 128;  // CL_PO_TC of contrastive_loss.cu: dre_cl_bwd_tc's output tile width in P
constexpr int kClPoWide = 4;  // CL_PO_WIDE: dre_cl_bwd_tc_wide's pieces of kClPoTc per block
constexpr i64 kMaxGrid = 65535LL * 16;

// int64 tensor data as the launchers' long long (int64_t is long on LP64 Linux: same size, distinct type)
const i64* lp(const at::Tensor& t) { return reinterpret_cast<const i64*>(t.data_ptr<int64_t>()); }

void launched(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "dre: CUDA launch of ", what, " failed: ", cudaGetErrorString(e));
}

int dt(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK_TYPE(false, "dre: ", name, " must be float16, bfloat16 or float32 for the CUDA kernels; got ",
                       t.scalar_type());
  }
  return 0;
}

int is64(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, "dre: ", name, " must be 1-D; got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "dre: ", name,
                   " must be an int32 or int64 tensor; got ", t.scalar_type());
  return t.scalar_type() == at::kLong ? 1 : 0;
}

void on_device(const at::Tensor& t, const at::Device& dev, const char* name) {
  TORCH_CHECK(t.device() == dev, "dre: ", name, " must be on ", dev, " like the other inputs; got ", t.device());
}

const void* ptr(const c10::optional<at::Tensor>& t) { return (t.has_value() && t->defined()) ? t->data_ptr() : nullptr; }
bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Value checks with one synchronisation per call (none for what the cache vouches for): value_checks.h. During
// CUDA graph capture no synchronisation is allowed and a replay runs no host code: device-side asserts instead.
void check_values(const std::vector<OffsetsCheck>& offsets, const std::vector<IndexCheck>& indices,
                  UniqueCheck unique = {}) {
  dre::check_values(offsets, indices, unique,
                    c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None);
}

// ------------------------------------------------------------------------------------------- residual_encode
using dre_cuda_rules::ReConfig;
using dre_cuda_rules::re_simt_config;
using dre_cuda_rules::re_tc_config;

int64_t chunk_rows(int64_t n_rows) {
  return dre_cuda_rules::chunk_rows(n_rows, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

// The full-width kernels' persistent blocks: `span` rows each (whole steps of R), one block per SM
struct FullSpans {
  at::Tensor off;
  int64_t span = 0, grid = 0;
};

FullSpans full_spans(const at::Tensor& offsets, int64_t n_rows, int R) {
  FullSpans f;
  f.off = offsets.to(at::kLong).contiguous();
  f.span = dre_cuda_rules::re_full_block_rows(n_rows, R, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  f.grid = (n_rows + f.span - 1) / f.span;
  return f;
}

// mma.sync bf16/fp16 needs compute capability >= 8.0; DRE_KERNELS_CUDA_TENSOR_CORES=0 turns it off. The backward
// takes bfloat16 rows only: its G and h operands split into float16 parts would lose small gradients (< 6e-5).
bool use_tensor_cores(const at::Tensor& rows, bool backward = false) {
  if (rows.scalar_type() != at::kBFloat16 && (backward || rows.scalar_type() != at::kHalf)) return false;
  const char* v = std::getenv("DRE_KERNELS_CUDA_TENSOR_CORES");  // read per call: benchmarks switch it in-process
  return (v == nullptr || std::string(v) != "0") && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// the full-width kernels: dre_re_fwd_tc_full, dre_re_bwd_tc_full for the backward's passes that only sum (where
// their rule fits) and dre_cl_bwd_tc_wide; DRE_KERNELS_CUDA_FULL_WIDTH=0 turns them off (to time them against the
// column-tiled kernels; the cupy backend reads the same switch). Read per call: benchmarks switch it in-process.
bool full_width_enabled() {
  const char* v = std::getenv("DRE_KERNELS_CUDA_FULL_WIDTH");
  if (v == nullptr) return true;
  const std::string s(v);
  return !(s == "0" || s == "false" || s == "off" || s == "no");
}

dre_cuda_rules::ReFullConfig full_width_config(const at::Tensor& rows, int K, int D, bool backward = false) {
  if (!full_width_enabled() || !use_tensor_cores(rows, backward)) return {};
  return dre_cuda_rules::re_tc_full_config(K, D, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin,
                                           backward);
}

// rows the full-width kernel may copy 16 bytes at a time: contiguous 16-bit rows, 16-byte aligned
bool vec_rows(const at::Tensor& rows, int D) {
  return rows.stride(1) == 1 && D % 8 == 0 && rows.stride(0) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 == 0;
}

struct ChunkMap {
  at::Tensor off, slide, cstart;
  int64_t slots = 0, chunk = 0;
};

// slide-aligned chunks of `chunk` rows, computed on the device without synchronisation
ChunkMap chunk_map(const at::Tensor& offsets, int64_t n_rows) {
  ChunkMap m;
  m.chunk = chunk_rows(n_rows);
  m.off = offsets.to(at::kLong).contiguous();
  const int64_t B = m.off.numel() - 1;
  const at::Tensor lens = m.off.slice(0, 1) - m.off.slice(0, 0, B);
  const at::Tensor nch = at::div(lens + (m.chunk - 1), m.chunk, "floor");
  const at::Tensor cend = at::cumsum(nch, 0);
  m.cstart = (cend - nch).contiguous();
  m.slots = (n_rows + m.chunk - 1) / m.chunk + B;
  m.slide = at::searchsorted(cend, at::arange(m.slots, m.off.options()), /*out_int32=*/false, /*right=*/true)
                .contiguous();
  return m;
}

struct Source {
  at::Tensor rows;
  c10::optional<at::Tensor> index;
  at::Tensor offsets;
  int64_t n_rows;
};

std::vector<Source> sources(const at::Tensor& x, const at::Tensor& x_offsets, const c10::optional<at::Tensor>& bank,
                            const c10::optional<at::Tensor>& bank_index,
                            const c10::optional<at::Tensor>& bank_offsets) {
  std::vector<Source> out;
  out.push_back({x.detach(), c10::nullopt, x_offsets, x.size(0)});
  if (given(bank)) out.push_back({bank->detach(), bank_index->contiguous(), *bank_offsets, bank_index->numel()});
  return out;
}

void re_checks(const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
               const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
               const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets,
               bool hard) {
  TORCH_CHECK_VALUE(x.dim() == 2 && codewords.dim() == 2, "dre: x and codewords must be 2-D; got ", x.sizes(),
                    " and ", codewords.sizes());
  const int64_t K = codewords.size(0), D = codewords.size(1);
  TORCH_CHECK_VALUE(K >= 1 && K <= 256 && D >= 1 && D <= 4096 && x.size(1) == D,
                    "dre: need 1 <= K <= 256, 1 <= D <= 4096 and x of width D; got codewords ", codewords.sizes(),
                    ", x ", x.sizes());
  const at::Device dev = x.device();
  TORCH_CHECK(dev.is_cuda(), "dre: x must be a CUDA tensor for the CUDA kernels; got ", dev);
  dt(x, "x");
  dt(codewords, "codewords");
  on_device(codewords, dev, "codewords");
  on_device(x_offsets, dev, "x_offsets");
  if (!hard) {
    TORCH_CHECK_VALUE(given(scale), "dre: scale is required for soft assignment");
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == K, "dre: scale must have shape (K,) = (", K, ",); got ",
                      scale->sizes());
    dt(*scale, "scale");
    on_device(*scale, dev, "scale");
  }
  is64(x_offsets, "x_offsets");
  const bool has_bank = given(bank);
  TORCH_CHECK_VALUE(has_bank == given(bank_index) && has_bank == given(bank_offsets),
                    "dre: bank, bank_index and bank_offsets must be given together or not at all");
  if (has_bank) {
    dt(*bank, "bank");
    TORCH_CHECK_VALUE(bank->dim() == 2 && bank->size(1) == D, "dre: bank must have shape (T, ", D, "); got ",
                      bank->sizes());
    on_device(*bank, dev, "bank");
    on_device(*bank_index, dev, "bank_index");
    on_device(*bank_offsets, dev, "bank_offsets");
    TORCH_CHECK_VALUE(bank_offsets->numel() == x_offsets.numel(), "dre: bank_offsets must have B+1 = ",
                      x_offsets.numel(), " entries like x_offsets; got ", bank_offsets->numel());
    is64(*bank_offsets, "bank_offsets");
    is64(*bank_index, "bank_index");
    check_values({{&x_offsets, x.size(0), "x_offsets", "x"},
                  {&*bank_offsets, bank_index->numel(), "bank_offsets", "bank_index"}},
                 {{&*bank_index, bank->size(0), "bank_index", "bank"}});
  } else {
    check_values({{&x_offsets, x.size(0), "x_offsets", "x"}}, {});
  }
}

struct Prep {
  at::Tensor c32, csq, s32;
};

Prep prep(const at::Tensor& codewords, const c10::optional<at::Tensor>& scale, bool hard) {
  Prep p;
  p.c32 = codewords.detach().to(at::kFloat).contiguous();
  p.csq = (p.c32 * p.c32).sum(1).contiguous();
  p.s32 = (hard || !given(scale)) ? p.csq : scale->detach().to(at::kFloat).contiguous();
  return p;
}

void launch_re_fwd(const Source& s, const Prep& p, float* acc, float* mass, bool hard, bool with_e,
                   const at::Tensor* G = nullptr, at::Tensor* gx = nullptr) {
  const int64_t B = s.offsets.numel() - 1;
  if (B == 0 || s.n_rows == 0) return;
  const int K = static_cast<int>(p.c32.size(0)), D = static_cast<int>(p.c32.size(1));
  const bool gather = s.index.has_value();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int rows_dt = dt(s.rows, "rows"), idx64 = gather ? is64(*s.index, "bank_index") : 1;
  const void* idx = gather ? s.index->data_ptr() : nullptr;
  const dre_cuda_rules::ReFullConfig full = with_e && G == nullptr ? full_width_config(s.rows, K, D)
                                                                    : dre_cuda_rules::ReFullConfig();
  if (full.R) {
    const FullSpans f = full_spans(s.offsets, s.n_rows, full.R);
    launched(dre_cuda_launch::re_fwd_tc_full(static_cast<unsigned>(f.grid), full.smem, stream, s.rows.data_ptr(),
                                             rows_dt, s.rows.stride(0), s.rows.stride(1), idx, idx64, gather ? 1 : 0,
                                             lp(f.off), s.n_rows, p.c32.data_ptr<float>(), p.csq.data_ptr<float>(),
                                             p.s32.data_ptr<float>(), acc, mass, B, K, D, f.span, hard ? 1 : 0, full.R,
                                             full.nbuf, vec_rows(s.rows, D) ? 1 : 0),
             "dre_re_fwd_tc_full");
    return;
  }
  const ChunkMap m = chunk_map(s.offsets, s.n_rows);
  const ReConfig tc = use_tensor_cores(s.rows) ? re_tc_config(K, D, false) : ReConfig();
  ReConfig cfg = tc.DT ? tc : re_simt_config(K, D, false);
  if (!with_e) cfg.DO = tc.DT ? 8 : 1;
  const int64_t grid = m.slots * (with_e ? (D + cfg.DO - 1) / cfg.DO : 1);
  TORCH_CHECK(grid < (1LL << 31), "dre: residual_encode grid too large (", grid, " blocks)");
  const int gx_dt = gx ? dt(*gx, "grad_x") : 0;
  const float* Gp = G ? G->data_ptr<float>() : nullptr;
  void* gxp = gx ? gx->data_ptr() : nullptr;
  // the tensor-core kernel takes the SIMT kernel's arguments and its distance step DT
  const auto launch = [&](auto... args) {
    if (tc.DT)
      launched(dre_cuda_launch::re_fwd_tc(args..., tc.DT), "dre_re_fwd_tc");
    else
      launched(dre_cuda_launch::re_fwd(args...), "dre_re_fwd");
  };
  launch(static_cast<unsigned>(grid), cfg.smem, stream, s.rows.data_ptr(), rows_dt, s.rows.stride(0), s.rows.stride(1),
         idx, idx64, gather ? 1 : 0, lp(m.off), lp(m.slide), lp(m.cstart), p.c32.data_ptr<float>(),
         p.csq.data_ptr<float>(), p.s32.data_ptr<float>(), acc, mass, Gp, gxp, gx_dt, B, K, D, m.chunk, hard ? 1 : 0,
         with_e ? 1 : 0, cfg.R, cfg.DO);
}

std::tuple<at::Tensor, at::Tensor> residual_encode_fwd_cuda(
    const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets, bool hard) {
  const c10::cuda::CUDAGuard guard(x.device());
  re_checks(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard);
  const int64_t B = x_offsets.numel() - 1, K = codewords.size(0), D = codewords.size(1);
  const at::ScalarType out_dtype = at::promote_types(x.scalar_type(), codewords.scalar_type());
  const Prep p = prep(codewords, scale, hard);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor acc = at::zeros({B, K, D}, f32), mass = at::zeros({B, K}, f32);
  for (const Source& s : sources(x, x_offsets, bank, bank_index, bank_offsets))
    launch_re_fwd(s, p, acc.data_ptr<float>(), mass.data_ptr<float>(), hard, true);
  return {out_dtype == at::kFloat ? acc : acc.to(out_dtype), mass};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_encode_bwd_cuda(
    const at::Tensor& grad_E, const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets,
    const c10::optional<at::Tensor>& mass, bool hard, bool need_grad_x, bool need_grad_codewords,
    bool need_grad_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  re_checks(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard);
  const int64_t B = x_offsets.numel() - 1, K = codewords.size(0), D = codewords.size(1);
  TORCH_CHECK_VALUE(grad_E.dim() == 3 && grad_E.size(0) == B && grad_E.size(1) == K && grad_E.size(2) == D,
                    "dre: grad_E must have shape (B, K, D) = (", B, ", ", K, ", ", D, "); got ", grad_E.sizes());
  on_device(grad_E, x.device(), "grad_E");
  const at::ScalarType scale_dtype = given(scale) ? scale->scalar_type() : codewords.scalar_type();
  const bool need_s = need_grad_scale && !hard;
  const bool need_c = need_grad_codewords || need_s;
  const Prep p = prep(codewords, scale, hard);
  const at::Tensor G = grad_E.detach().to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = need_grad_x ? at::empty({x.size(0), D}, x.options()) : at::zeros({x.size(0), D}, x.options());
  at::Tensor hx = at::zeros({K, D}, f32), hsum = at::zeros({K}, f32), gsum = at::zeros({K}, f32);
  at::Tensor mass_acc = at::zeros({B, K}, f32);
  at::Tensor gc;
  if (!hard) gc = (G * p.c32.unsqueeze(0)).sum(2).contiguous();
  const bool use_given_mass = hard && given(mass);
  if (use_given_mass)
    TORCH_CHECK_VALUE(mass->dim() == 2 && mass->size(0) == B && mass->size(1) == K,
                      "dre: mass must have shape (B, K) = (", B, ", ", K, "); got ", mass->sizes());
  const std::vector<Source> srcs = sources(x, x_offsets, bank, bank_index, bank_offsets);
  for (size_t si = 0; si < srcs.size(); ++si) {
    const Source& s = srcs[si];
    const bool fresh = si == 0;
    const bool write_gx = fresh && need_grad_x;
    const bool acc_c = need_c && !use_given_mass;
    if (B == 0 || s.n_rows == 0 || !(write_gx || acc_c)) continue;
    if (hard) {
      // one argmin pass: writes grad x rows G_{b,k(i)} (fresh rows) and/or counts mass
      launch_re_fwd(s, p, nullptr, acc_c ? mass_acc.data_ptr<float>() : nullptr, true, false,
                    write_gx ? &G : nullptr, write_gx ? &gx : nullptr);
      continue;
    }
    const bool gather = s.index.has_value();
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int rows_dt = dt(s.rows, "rows"), idx64 = gather ? is64(*s.index, "bank_index") : 1;
    const void* idx = gather ? s.index->data_ptr() : nullptr;
    const dre_cuda_rules::ReFullConfig full = write_gx ? dre_cuda_rules::ReFullConfig()
                                                       : full_width_config(s.rows, static_cast<int>(K),
                                                                           static_cast<int>(D), true);
    if (full.R) {  // a pass that only sums (the bank rows): rows read and distances computed once, all D columns
      const FullSpans f = full_spans(s.offsets, s.n_rows, full.R);
      launched(dre_cuda_launch::re_bwd_tc_full(
                   static_cast<unsigned>(f.grid), full.smem, stream, s.rows.data_ptr(), rows_dt, s.rows.stride(0),
                   s.rows.stride(1), idx, idx64, gather ? 1 : 0, lp(f.off), s.n_rows, p.c32.data_ptr<float>(),
                   p.csq.data_ptr<float>(), p.s32.data_ptr<float>(), G.data_ptr<float>(), gc.data_ptr<float>(),
                   hx.data_ptr<float>(), hsum.data_ptr<float>(), gsum.data_ptr<float>(), mass_acc.data_ptr<float>(), B,
                   static_cast<int>(K), static_cast<int>(D), f.span, full.R, full.nbuf,
                   vec_rows(s.rows, static_cast<int>(D)) ? 1 : 0, full.DTS),
               "dre_re_bwd_tc_full");
      continue;
    }
    const ChunkMap m = chunk_map(s.offsets, s.n_rows);
    // the arguments every column-tiled soft backward kernel starts with (after grid, shared memory and stream)
    const auto source = [&](auto&& kernel, unsigned grid, unsigned smem, auto... rest) {
      return kernel(grid, smem, stream, s.rows.data_ptr(), rows_dt, s.rows.stride(0), s.rows.stride(1), idx, idx64,
                    gather ? 1 : 0, lp(m.off), lp(m.slide), lp(m.cstart), p.c32.data_ptr<float>(),
                    p.csq.data_ptr<float>(), p.s32.data_ptr<float>(), G.data_ptr<float>(), gc.data_ptr<float>(),
                    hx.data_ptr<float>(), hsum.data_ptr<float>(), gsum.data_ptr<float>(),
                    mass_acc.data_ptr<float>(), rest...);
    };
    const ReConfig tc = use_tensor_cores(s.rows, true) ? re_tc_config(static_cast<int>(K), static_cast<int>(D), true)
                                                       : ReConfig();
    const ReConfig cfg = tc.DT ? tc : re_simt_config(static_cast<int>(K), static_cast<int>(D), true);
    const int64_t grid = m.slots * ((D + cfg.DO - 1) / cfg.DO);
    TORCH_CHECK(grid < (1LL << 31), "dre: residual_encode grid too large (", grid, " blocks)");
    const auto launch_tiled = [&](auto kernel, auto... distance_step) {  // the tensor-core kernel's DT, or none
      return source(kernel, static_cast<unsigned>(grid), cfg.smem, gx.data_ptr(), dt(gx, "grad_x"), B,
                    static_cast<int>(K), static_cast<int>(D), m.chunk, write_gx ? 1 : 0, acc_c ? 1 : 0, cfg.R, cfg.DO,
                    distance_step...);
    };
    if (tc.DT)
      launched(launch_tiled(dre_cuda_launch::re_bwd_tc, tc.DT), "dre_re_bwd_tc");
    else
      launched(launch_tiled(dre_cuda_launch::re_bwd_soft), "dre_re_bwd_soft");
  }
  if (use_given_mass) mass_acc = mass->to(at::kFloat);
  at::Tensor grad_c = -(mass_acc.unsqueeze(2) * G).sum(0);
  if (!hard) grad_c = grad_c + (2.0 * p.s32).unsqueeze(1) * (hx - hsum.unsqueeze(1) * p.c32);
  if (!need_c) grad_c = at::zeros_like(grad_c);
  at::Tensor grad_s = need_s ? gsum : at::zeros_like(gsum);
  return {gx, grad_c.to(codewords.scalar_type()), grad_s.to(scale_dtype)};
}

// ------------------------------------------------------------------------------------------- contrastive
// dre_cl_norms's buffer, one fill and one launch: inv_a, inv_b, ||a||, ||b|| (B each), then max_i ||u_i||
struct ClNorms {
  at::Tensor inva, invb, na, nb;  // views of one buffer; nb is followed by max_i ||u_i||
  const float* bound() const { return nb.data_ptr<float>(); }  // ||b|| followed by max_i ||u_i|| (cl_ref)
};

ClNorms cl_norms(const at::Tensor& a, const at::Tensor& b, bool normalize) {
  const int64_t B = a.size(0), P = a.size(1);
  const at::Tensor buf = at::zeros({4 * B + 1}, a.options().dtype(at::kFloat));
  if (B > 0) {
    const int64_t rows_per_block = 256 / 32;  // a warp per row of a 256-thread block
    launched(dre_cuda_launch::cl_norms(
                 static_cast<unsigned>(std::min<int64_t>((2 * B + rows_per_block - 1) / rows_per_block, kMaxGrid)),
                 at::cuda::getCurrentCUDAStream(), a.data_ptr(), dt(a, "a"), a.stride(0), a.stride(1), b.data_ptr(),
                 dt(b, "b"), b.stride(0), b.stride(1), buf.data_ptr<float>(), B, static_cast<int>(P), normalize,
                 static_cast<float>(kEps)),
             "dre_cl_norms");
  }
  return {buf.narrow(0, 0, B), buf.narrow(0, B, B), buf.narrow(0, 2 * B, B), buf.narrow(0, 3 * B, B)};
}

// |P_i| (B) float32, or undefined without labels: the kernels take a null pointer for |P_i| = 1
at::Tensor num_positives(const c10::optional<at::Tensor>& labels) {
  if (!given(labels)) return at::Tensor();
  const at::Tensor lab = labels->to(at::kLong);
  const at::Tensor srt = std::get<0>(at::sort(lab));
  const at::Tensor n = at::searchsorted(srt, lab, false, /*right=*/true) - at::searchsorted(srt, lab, false, false);
  return n.to(at::kFloat);
}

struct Labels {
  at::Tensor t;
  int lab64 = 1, has = 0;
};

Labels labels_of(const c10::optional<at::Tensor>& labels, int64_t B, const at::Device& dev) {
  Labels l;
  if (!given(labels)) return l;
  TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == B, "dre: labels must have shape (B,) = (", B,
                    ",); got ", labels->sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels->scalar_type()) && !at::isComplexType(labels->scalar_type()) &&
                       labels->scalar_type() != at::kBool,
                   "dre: labels must be an integer tensor; got ", labels->scalar_type());
  on_device(*labels, dev, "labels");
  l.t = (labels->scalar_type() == at::kInt || labels->scalar_type() == at::kLong) ? labels->contiguous()
                                                                                   : labels->to(at::kLong);
  l.lab64 = l.t.scalar_type() == at::kLong ? 1 : 0;
  l.has = 1;
  return l;
}

// the logits on the tensor cores (contrastive_loss.cu): both sides bfloat16 (float16 stays on the SIMT kernels: the
// backward's W, split into float16 parts, would flush small gradients), with use_tensor_cores's device rule
int cl_tensor_cores(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kBFloat16 && use_tensor_cores(b, true) ? 1 : 0;
}

void cl_checks(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.sizes() == b.sizes(), "dre: a and b must have the same shape (B, P); got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.is_cuda(), "dre: a must be a CUDA tensor for the CUDA kernels; got ", a.device());
  on_device(b, a.device(), "b");
  dt(a, "a");
  dt(b, "b");
  TORCH_CHECK_VALUE(logit_scale.numel() == 1, "dre: logit_scale must be a 0-dim tensor; got shape ",
                    logit_scale.sizes());
}

ContrastiveFwdOut contrastive_loss_fwd_cuda(const at::Tensor& a_, const at::Tensor& b_,
                                            const at::Tensor& logit_scale, const c10::optional<at::Tensor>& labels,
                                            bool normalize) {
  const c10::cuda::CUDAGuard guard(a_.device());
  cl_checks(a_, b_, logit_scale);
  const at::Tensor a = a_.detach(), b = b_.detach();
  const int64_t B = a.size(0), P = a.size(1);
  const auto f32 = a.options().dtype(at::kFloat);
  const at::Tensor s = logit_scale.detach().to(a.device(), at::kFloat).reshape({1}).contiguous();
  const ClNorms norms = cl_norms(a, b, normalize);
  // the forward's per-row sums, which dre_cl_finish turns into the outputs in place
  at::Tensor rlse = at::empty({B}, f32), rdiag = at::empty({B}, f32), rpos = at::empty({B}, f32);
  at::Tensor cpos = at::zeros({B}, f32), clse = at::empty({B}, f32);
  if (B == 0) return {rdiag, rlse, clse, rpos, cpos};
  at::Tensor csum = at::zeros({B}, a.options().dtype(at::kDouble));
  const Labels lab = labels_of(labels, B, a.device());
  const int tc = cl_tensor_cores(a, b);
  launched(dre_cuda_launch::cl_fwd(static_cast<unsigned>((B + kClBlock - 1) / kClBlock),
                                   at::cuda::getCurrentCUDAStream(), a.data_ptr(), dt(a, "a"), a.stride(0),
                                   a.stride(1), b.data_ptr(), dt(b, "b"), b.stride(0), b.stride(1),
                                   norms.inva.data_ptr<float>(), norms.invb.data_ptr<float>(),
                                   lab.has ? lab.t.data_ptr() : nullptr, lab.lab64, lab.has, s.data_ptr<float>(),
                                   norms.bound(), rlse.data_ptr<float>(), rdiag.data_ptr<float>(),
                                   rpos.data_ptr<float>(),
                                   csum.data_ptr<double>(), cpos.data_ptr<float>(), B, static_cast<int>(P), tc),
           "dre_cl_fwd");
  const at::Tensor npos = num_positives(labels);
  launched(dre_cuda_launch::cl_finish(static_cast<unsigned>((B + kClBlock - 1) / kClBlock),
                                      at::cuda::getCurrentCUDAStream(), a.data_ptr(), dt(a, "a"), a.stride(0),
                                      a.stride(1), b.data_ptr(), dt(b, "b"), b.stride(0), b.stride(1),
                                      norms.inva.data_ptr<float>(), norms.invb.data_ptr<float>(),
                                      s.data_ptr<float>(), norms.bound(), csum.data_ptr<double>(),
                                      data_or_null(npos), rlse.data_ptr<float>(),
                                      rdiag.data_ptr<float>(), rpos.data_ptr<float>(), cpos.data_ptr<float>(),
                                      clse.data_ptr<float>(), B, static_cast<int>(P), tc),
           "dre_cl_finish");
  return {rdiag, rlse, clse, rpos, cpos};  // (loss, row_lse, col_lse, r, c)
}

// grad t (t's dtype) from grad u through u = t / max(||t||, eps): dre_cl_normalize_bwd, in place over gu for float32
// t (no B x P temporary)
at::Tensor normalize_backward(at::Tensor& gu, const at::Tensor& t, const at::Tensor& inv, const at::Tensor& norm,
                              bool normalize) {
  if (!normalize) return gu.to(t.scalar_type());
  const int64_t B = t.size(0), P = t.size(1);
  at::Tensor out = t.scalar_type() == at::kFloat
                       ? gu
                       : at::empty({B, P}, t.options().memory_format(at::MemoryFormat::Contiguous));
  if (B > 0 && P > 0) {
    const int64_t rows_per_block = 256 / 32;  // a warp per row of a 256-thread block
    launched(dre_cuda_launch::cl_normalize_bwd(
                 static_cast<unsigned>(std::min<int64_t>((B + rows_per_block - 1) / rows_per_block, kMaxGrid)),
                 at::cuda::getCurrentCUDAStream(), gu.data_ptr<float>(), t.data_ptr(), dt(t, "a"), t.stride(0),
                 t.stride(1), inv.data_ptr<float>(), norm.data_ptr<float>(), out.data_ptr(), dt(out, "a"), B,
                 static_cast<int>(P), static_cast<float>(kEps)),
             "dre_cl_normalize_bwd");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& logit_scale,
    const c10::optional<at::Tensor>& labels, bool normalize, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_loss, const at::Tensor& col_loss) {
  const c10::cuda::CUDAGuard guard(a_.device());
  cl_checks(a_, b_, logit_scale);
  const at::Tensor a = a_.detach(), b = b_.detach();
  const int64_t B = a.size(0), P = a.size(1);
  TORCH_CHECK_VALUE(grad_loss.numel() == B && row_lse.numel() == B && col_lse.numel() == B &&
                        row_loss.numel() == B && col_loss.numel() == B,
                    "dre: grad_loss, row_lse, col_lse, row_loss and col_loss must have B = ", B, " entries");
  const auto f32 = a.options().dtype(at::kFloat);
  const at::Tensor s = logit_scale.detach().to(a.device(), at::kFloat).reshape({1}).contiguous();
  const ClNorms norms = cl_norms(a, b, normalize);
  const at::Tensor &inva = norms.inva, &invb = norms.invb;
  const at::Tensor g = grad_loss.detach().to(at::kFloat).reshape({-1}).contiguous();
  const at::Tensor npos = num_positives(labels);
  const Labels lab = labels_of(labels, B, a.device());
  at::Tensor gu = at::empty({B, P}, f32), gv = at::empty({B, P}, f32);
  const int64_t nrb = (B + kClBlock - 1) / kClBlock;
  at::Tensor gs = at::zeros({std::max<int64_t>(nrb, 1)}, f32);
  const at::Tensor rl = row_lse.detach().to(at::kFloat).contiguous(), cl = col_lse.detach().to(at::kFloat).contiguous();
  const at::Tensor rr = row_loss.detach().to(at::kFloat).contiguous(),
                   cr = col_loss.detach().to(at::kFloat).contiguous();
  if (B > 0) {
    const int tc = cl_tensor_cores(a, b);
    // dre_cl_bwd_tc_wide where P spans more than one CL_PO_TC piece: each logit tile once per 4 pieces
    const int wide = tc && P > kClPoTc && full_width_enabled();
    const int64_t po = tc ? kClPoTc * (wide ? kClPoWide : 1) : kClBlock;  // the output tile's width in P
    const int64_t grid = nrb * ((P + po - 1) / po);
    TORCH_CHECK(grid < (1LL << 31), "dre: contrastive_loss grid too large (", grid, " blocks)");
    struct Side {
      const at::Tensor *x, *y, *invx, *invy, *lx, *ly, *rx, *ry;
      at::Tensor* out;
      int with_gs;
    };
    const Side sides[2] = {{&a, &b, &inva, &invb, &rl, &cl, &rr, &cr, &gu, 1},
                           {&b, &a, &invb, &inva, &cl, &rl, &cr, &rr, &gv, 0}};
    for (const Side& sd : sides) {
      // x_is_b (the second call): the tensor-core kernel keeps a's rows on the left of every logit's dot
      const auto bwd = [&](auto launcher, auto... extra) {
        return launcher(static_cast<unsigned>(grid), at::cuda::getCurrentCUDAStream(), sd.x->data_ptr(),
                        dt(*sd.x, "a"), sd.x->stride(0), sd.x->stride(1), sd.y->data_ptr(), dt(*sd.y, "b"),
                        sd.y->stride(0), sd.y->stride(1), sd.invx->data_ptr<float>(), sd.invy->data_ptr<float>(),
                        lab.has ? lab.t.data_ptr() : nullptr, lab.lab64, lab.has, s.data_ptr<float>(),
                        sd.lx->data_ptr<float>(), sd.ly->data_ptr<float>(), sd.rx->data_ptr<float>(),
                        sd.ry->data_ptr<float>(), g.data_ptr<float>(), data_or_null(npos),
                        sd.out->data_ptr<float>(), gs.data_ptr<float>(), B, static_cast<int>(P), sd.with_gs,
                        extra...);
      };
      if (tc) {
        launched(bwd(dre_cuda_launch::cl_bwd_tc, 1 - sd.with_gs, wide), wide ? "dre_cl_bwd_tc_wide" : "dre_cl_bwd_tc");
      } else {
        launched(bwd(dre_cuda_launch::cl_bwd), "dre_cl_bwd");
      }
    }
  }
  const at::Tensor grad_a = normalize_backward(gu, a, inva, norms.na, normalize);
  const at::Tensor grad_b = normalize_backward(gv, b, invb, norms.nb, normalize);
  return {grad_a, grad_b, gs.sum()};
}

// ------------------------------------------------------------------------------------------- bank
at::Tensor bank_gather_cuda(const at::Tensor& bank, const at::Tensor& index) {
  const c10::cuda::CUDAGuard guard(bank.device());
  TORCH_CHECK_VALUE(bank.dim() == 2, "dre: bank must be 2-D; got shape ", bank.sizes());
  TORCH_CHECK(bank.is_cuda(), "dre: bank must be a CUDA tensor for the CUDA kernels; got ", bank.device());
  on_device(index, bank.device(), "index");
  const int code = dt(bank, "bank");
  is64(index, "index");
  check_values({}, {{&index, bank.size(0), "index", "bank"}});
  const int64_t n = index.numel(), D = bank.size(1);
  at::Tensor out = at::empty({n, D}, bank.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0 || D == 0) return out;
  const at::Tensor idx = index.contiguous();
  const int64_t grid = std::min<int64_t>((n * D + 255) / 256, kMaxGrid);
  launched(dre_cuda_launch::bank_gather(static_cast<unsigned>(grid), at::cuda::getCurrentCUDAStream(),
                                        bank.data_ptr(), code, bank.stride(0), bank.stride(1), idx.data_ptr(),
                                        is64(idx, "index"), out.data_ptr(), n, D),
           "dre_bank_gather");
  return out;
}

void bank_update_cuda(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& values_, double momentum,
                      bool normalize) {
  const c10::cuda::CUDAGuard guard(bank.device());
  TORCH_CHECK_VALUE(bank.dim() == 2, "dre: bank must be 2-D; got shape ", bank.sizes());
  TORCH_CHECK(bank.is_cuda(), "dre: bank must be a CUDA tensor for the CUDA kernels; got ", bank.device());
  on_device(index, bank.device(), "index");
  on_device(values_, bank.device(), "values");
  const int64_t n = index.numel(), D = bank.size(1);
  TORCH_CHECK_VALUE(values_.dim() == 2 && values_.size(0) == n && values_.size(1) == D,
                    "dre: values must have shape (len(index), D) = (", n, ", ", D, "); got ", values_.sizes());
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "dre: momentum must be in [0, 1]; got ", momentum);
  const int code = dt(bank, "bank"), vcode = dt(values_, "values");
  is64(index, "index");
  check_values({}, {{&index, bank.size(0), "index", "bank"}}, {&index, "index"});
  if (n == 0 || D == 0) return;
  const at::Tensor idx = index.contiguous(), values = values_.detach();
  launched(dre_cuda_launch::bank_update(static_cast<unsigned>(std::min<int64_t>(n, kMaxGrid)),
                                        at::cuda::getCurrentCUDAStream(), bank.data_ptr(), code, bank.stride(0),
                                        bank.stride(1), idx.data_ptr(), is64(idx, "index"), values.data_ptr(), vcode,
                                        values.stride(0), values.stride(1), n, static_cast<int>(D),
                                        static_cast<float>(momentum), static_cast<float>(1.0 - momentum),
                                        normalize ? 1 : 0),
           "dre_bank_update");
}

}  // namespace
}  // namespace cuda_glue
}  // namespace dre

TORCH_LIBRARY_IMPL(dre, CUDA, m) {
  m.impl("residual_encode_fwd", &dre::cuda_glue::residual_encode_fwd_cuda);
  m.impl("residual_encode_bwd", &dre::cuda_glue::residual_encode_bwd_cuda);
  m.impl("contrastive_loss_fwd", &dre::cuda_glue::contrastive_loss_fwd_cuda);
  m.impl("contrastive_loss_bwd", &dre::cuda_glue::contrastive_loss_bwd_cuda);
  m.impl("bank_gather", &dre::cuda_glue::bank_gather_cuda);
  m.impl("bank_update_", &dre::cuda_glue::bank_update_cuda);
}
