// dre::residual_encode_fwd / residual_encode_bwd on CPU.
//
//   S_b  = fresh rows x[x_offsets[b]:x_offsets[b+1]] and bank[bank_index[bank_offsets[b]:bank_offsets[b+1]]]
//   d_ik = ||x_i||^2 - 2 <x_i, c_k> + ||c_k||^2            (GEMM identity, clamped at 0)
//   soft: a_ik = softmax_k(-s_k d_ik)   hard: a_ik = [k = first argmin_j d_ij]
//   E_bk = sum_{i in S_b} a_ik x_i - mass_bk c_k,   mass_bk = sum_{i in S_b} a_ik
//
// Work split: the rows of all slides, in slide order (each slide's fresh rows, then its bank rows), are cut into
// a few contiguous chunks of equal row count, one at::parallel_for task each, so a long slide is shared between
// threads. A chunk walks its rows in blocks of at most kBlockRows, converting (and, for bank rows, gathering)
// each block into a thread-local float buffer; the distances and the aggregation are small GEMMs on that block
// (at::mm, i.e. MKL/OpenBLAS, single-threaded inside the parallel region). Nothing of size N*K or N*D exists.
// A slide entirely inside one chunk is written straight to the output; a slide cut by a chunk border goes to one
// of the chunk's two partial slots, summed serially afterwards (deterministic for a given thread count).
//
// Fast path (float32 accumulation on a CPU with AVX-512, avx512_kernels.h): the same walk, but the products are
// register-blocked AVX-512 kernels reading the rows through pointers (float32 unit-stride bank rows in place, no
// gather copy; the next block's bank rows are prefetched during the current product), and the row-wise work
// (distances, softmax, argmin, the backward's u and w) is vectorised. Rows and codeword columns are padded to 16
// only inside the thread-local block buffers. Elsewhere (float64, no AVX-512, DRE_NATIVE_NO_AVX512=1): at::mm.
//
// Backward (soft), with G_bk = grad_E[b,k,:], g_ik = <G_bk, x_i - c_k>, u_ik = a_ik (g_ik - sum_j a_ij g_ij),
// w_ik = dL/dd_ik = -s_k u_ik. u is computed with g_ik - g_im in place of g_ik, m = argmax_j a_ij (the same, as
// sum_j a_ij = 1): where a_im is near 1, sum_j a_ij g_ij ~ g_im would cancel against g_im and leave u_im an error of
// eps |g| instead of eps |u_im| (float32 grad_s off by 1e-3 of its size at a saturated softmax).
//   grad_x_i = sum_k a_ik G_bk + 2 sum_k w_ik (x_i - c_k)                    (fresh rows only)
//   grad_c_k = -sum_b mass_bk G_bk - 2 sum_i w_ik x_i + 2 (sum_i w_ik) c_k     (all rows, bank included)
//   grad_s_k = -sum_i u_ik d_ik
// Hard (a constant): grad_x_i = G_{b,k(i)}, grad_c_k = -sum_b mass_bk G_bk.
// The assignments are recomputed from the inputs; <x_i, c_k> and <x_i, G_bk> come from one GEMM against [C; G_b].
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cpu/avx512_kernels.h"
#include "cpu/common.h"
#include "value_checks.h"

namespace dre {
namespace cpu {
namespace {

// Rows per block: a block of 256 x 384 floats (384 KiB) stays in L2 while the GEMMs reuse it.
int64_t block_rows(int64_t D) {
  static const int64_t env = [] {
    const char* v = std::getenv("DRE_NATIVE_BLOCK_ROWS");  // for tuning only
    return v ? std::atoll(v) : 0;
  }();
  if (env > 0) return env;
  return std::max<int64_t>(32, std::min<int64_t>(256, (96 * 1024) / std::max<int64_t>(D, 1)));
}

constexpr int64_t kPrefetch = 4;

// The ragged row sequence of all slides and its split into chunks.
struct Layout {
  int64_t B = 0, N = 0;
  const int64_t* xo = nullptr;   // (B+1) x_offsets
  const int64_t* bo = nullptr;   // (B+1) bank_offsets, or null
  const int64_t* bidx = nullptr; // (Mb) bank_index, or null
  std::vector<int64_t> start;    // (B+1) first global position of each slide
  bool skip_bank = false;        // walk fresh rows only

  int64_t nx(int64_t b) const { return xo[b + 1] - xo[b]; }
  int64_t nb(int64_t b) const { return (bo && !skip_bank) ? bo[b + 1] - bo[b] : 0; }

  void init() {
    start.resize(B + 1);
    start[0] = 0;
    for (int64_t b = 0; b < B; ++b) start[b + 1] = start[b] + nx(b) + nb(b);
    N = start[B];
  }
  // first slide whose rows reach past position p
  int64_t slide_at(int64_t p) const {
    auto it = std::upper_bound(start.begin(), start.end(), p);
    return std::max<int64_t>(0, (it - start.begin()) - 1);
  }
};

template <typename T>
at::TensorOptions opts() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
}

template <typename T>
struct Prep {
  at::Tensor C;      // (K, D) codewords in T
  at::Tensor csq;    // (K,)
  at::Tensor s;      // (K,) scale (soft)
  int64_t K, D;
};

template <typename T>
Prep<T> prepare(const at::Tensor& codewords, const c10::optional<at::Tensor>& scale, bool hard) {
  Prep<T> p;
  p.C = codewords.to(c10::CppTypeToScalarType<T>::value).contiguous();
  p.csq = (p.C * p.C).sum(1).contiguous();
  if (!hard) p.s = scale->to(c10::CppTypeToScalarType<T>::value).contiguous();
  p.K = p.C.size(0);
  p.D = p.C.size(1);
  return p;
}

// Distances and assignments of the r rows of a block from their scores SC (row stride ld, <x_i, c_k> in the
// first K columns); writes a (r x K, row stride K) and d (r x K). Returns nothing; hard writes a one-hot a.
template <typename T>
inline void assign_rows(const T* X, int64_t r, int64_t D, const T* SC, int64_t ld, const T* csq, const T* s,
                        int64_t K, bool hard, T* a, T* d, int64_t* kmin) {
  for (int64_t i = 0; i < r; ++i) {
    const T* xi = X + i * D;
    const T* sc = SC + i * ld;
    T* di = d + i * K;
    if (hard) {
      // argmin_k d_ik needs no ||x_i||^2 (the same for every k) and no clamp
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) di[k] = csq[k] - T(2) * sc[k];
    } else {
      T xsq = 0;
#pragma omp simd reduction(+ : xsq)
      for (int64_t j = 0; j < D; ++j) xsq += xi[j] * xi[j];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        T v = xsq - T(2) * sc[k] + csq[k];
        di[k] = v < T(0) ? T(0) : v;  // NaN stays NaN
      }
    }
    T* ai = a + i * K;
    if (hard) {
      int64_t best = 0;
      for (int64_t k = 1; k < K; ++k) {
        // torch.argmin semantics: the first minimum, and NaN counts as the minimum
        if (std::isnan(di[best])) break;
        if (di[k] < di[best] || std::isnan(di[k])) best = k;
      }
      kmin[i] = best;
      for (int64_t k = 0; k < K; ++k) ai[k] = T(0);
      ai[best] = T(1);
    } else {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        ai[k] = -s[k] * di[k];
        m = std::max(m, ai[k]);
      }
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        ai[k] = std::exp(ai[k] - m);
        sum += ai[k];
      }
      const T inv = T(1) / sum;
      for (int64_t k = 0; k < K; ++k) ai[k] *= inv;
    }
  }
}

// True when the rows of `r` can be read in place as T (same dtype, unit column stride).
template <typename T>
bool readable_as(const Rows& r) {
  return r.dtype == c10::CppTypeToScalarType<T>::value && r.s1 == 1;
}

// Visits the rows of chunk [p0, p1) slide by slide, in blocks: seg_begin(b), block(b, is_fresh, first_row_pos,
// r), seg_end(b, owned). Before each block, ptr[0:r] points at the block's rows as T: in place when `direct` and
// the tensor is readable as T (bank rows are then not copied at all), else converted (and gathered) into X
// (r x D, contiguous), in which case ptr[i] = X + i * D. With bank rows in place, nxt[0:nn] points at the rows
// of the slide's next bank block (nn = 0 if none), for the block to prefetch while it computes.
template <typename T, typename SegBegin, typename Block, typename SegEnd>
void walk_chunk(const Layout& L, int64_t p0, int64_t p1, int64_t R, const Rows& xr, const Rows& br, T* X,
                const T** ptr, const T** nxt, int64_t& nn, bool direct, SegBegin seg_begin, Block block,
                SegEnd seg_end) {
  if (p0 >= p1) return;
  const bool x_in_place = direct && readable_as<T>(xr);
  const bool b_in_place = direct && L.bidx != nullptr && readable_as<T>(br);
  auto bank_row = [&](int64_t j) { return reinterpret_cast<const T*>(br.base) + L.bidx[j] * br.s0; };
  for (int64_t b = L.slide_at(p0); b < L.B && L.start[b] < p1; ++b) {
    const int64_t lo = std::max(L.start[b], p0), hi = std::min(L.start[b + 1], p1);
    if (lo >= hi) continue;
    seg_begin(b);
    const int64_t fresh_end = L.start[b] + L.nx(b);
    nn = 0;
    // fresh rows
    for (int64_t q = lo; q < std::min(hi, fresh_end); q += R) {
      const int64_t r = std::min(R, std::min(hi, fresh_end) - q);
      const int64_t row0 = L.xo[b] + (q - L.start[b]);
      for (int64_t i = 0; i < r; ++i) {
        if (x_in_place) {
          ptr[i] = reinterpret_cast<const T*>(xr.base) + (row0 + i) * xr.s0;
        } else {
          xr.load(row0 + i, X + i * xr.d);
          ptr[i] = X + i * xr.d;
        }
      }
      block(b, true, row0, r);
    }
    // bank rows, gathered block by block (or read in place)
    bool ready = false;  // ptr already holds this block's rows, prefetched by the previous block
    for (int64_t q = std::max(lo, fresh_end); q < hi; q += R) {
      const int64_t r = std::min(R, hi - q);
      const int64_t j0 = L.bo[b] + (q - fresh_end);
      if (b_in_place) {
        if (ready) {
          std::copy(nxt, nxt + r, ptr);
        } else {
          for (int64_t i = 0; i < r; ++i) {
            ptr[i] = bank_row(j0 + i);
            br.prefetch(L.bidx[j0 + i]);  // random rows: start every miss now, the GEMM reads them next
          }
        }
        nn = q + R < hi ? std::min(R, hi - q - R) : 0;
        for (int64_t i = 0; i < nn; ++i) nxt[i] = bank_row(j0 + R + i);
        ready = true;
      } else {
        for (int64_t i = 0; i < r; ++i) {
          if (i + kPrefetch < r) br.prefetch(L.bidx[j0 + i + kPrefetch]);  // random rows: hide the miss latency
          br.load(L.bidx[j0 + i], X + i * br.d);
          ptr[i] = X + i * br.d;
        }
      }
      block(b, false, j0, r);
    }
    nn = 0;
    seg_end(b, lo == L.start[b] && hi == L.start[b + 1]);
  }
}

struct Inputs {
  at::Tensor xo64, bo64, bidx64;
  Rows xr, br;
  Layout L;
};

Inputs setup_inputs(const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
                    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
                    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets,
                    bool hard) {
  check_2d(x, "x");
  check_2d(codewords, "codewords");
  const int64_t K = codewords.size(0), D = codewords.size(1);
  TORCH_CHECK_VALUE(K >= 1 && x.size(1) == D, "dre: codewords must have shape (K, D) with K >= 1 and D = ",
                    x.size(1), "; got ", codewords.sizes());
  if (!hard) {
    TORCH_CHECK_VALUE(scale.has_value() && scale->defined(), "dre: scale is required for soft assignment");
    check_float(*scale, "scale");
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == K, "dre: scale must have shape (K,) = (", K,
                      ",); got ", scale->sizes());
  }
  const bool has_bank = bank.has_value() && bank->defined();
  TORCH_CHECK_VALUE(has_bank == (bank_index.has_value() && bank_index->defined()) &&
                        has_bank == (bank_offsets.has_value() && bank_offsets->defined()),
                    "dre: bank, bank_index and bank_offsets must be given together or not at all");
  Inputs in;
  in.xo64 = as_index(x_offsets, "x_offsets");
  in.xr = Rows(x);
  in.L.B = in.xo64.numel() - 1;
  in.L.xo = in.xo64.data_ptr<int64_t>();
  if (has_bank) {
    check_2d(*bank, "bank");
    TORCH_CHECK_VALUE(bank->size(1) == D, "dre: bank must have shape (T, D) with D = ", D, "; got ",
                      bank->sizes());
    in.bo64 = as_index(*bank_offsets, "bank_offsets");
    TORCH_CHECK_VALUE(in.bo64.numel() == in.xo64.numel(), "dre: bank_offsets must have B+1 = ", in.xo64.numel(),
                      " entries like x_offsets; got ", in.bo64.numel());
    in.bidx64 = as_index(*bank_index, "bank_index");
    in.br = Rows(*bank);
    in.L.bo = in.bo64.data_ptr<int64_t>();
    in.L.bidx = in.bidx64.data_ptr<int64_t>();
  }
  if (has_bank)
    check_values({{&x_offsets, x.size(0), "x_offsets", "x"}, {&*bank_offsets, bank_index->numel(), "bank_offsets",
                  "bank_index"}},
                 {{&*bank_index, bank->size(0), "bank_index", "bank"}});
  else
    check_values({{&x_offsets, x.size(0), "x_offsets", "x"}}, {});
  return in;
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
std::tuple<at::Tensor, at::Tensor> fwd_impl(Inputs& in, const at::Tensor& codewords,
                                            const c10::optional<at::Tensor>& scale, bool hard,
                                            at::ScalarType out_dtype) {
  Layout& L = in.L;
  L.init();
  const Prep<T> P = prepare<T>(codewords, scale, hard);
  const int64_t K = P.K, D = P.D, B = L.B;
  at::Tensor E = at::zeros({B, K, D}, opts<T>());
  at::Tensor mass = at::zeros({B, K}, opts<T>());
  const int64_t R = block_rows(D);
  const int64_t nc = num_chunks(L.N, R);
  at::Tensor slotE = at::zeros({nc, 2, K, D}, opts<T>());
  at::Tensor slotM = at::zeros({nc, 2, K}, opts<T>());
  std::vector<int64_t> slot_slide(nc * 2, -1);
  const at::Tensor Ct = P.C.t();
  const T* C = P.C.template data_ptr<T>();
  const T* csq = P.csq.template data_ptr<T>();
  const T* s = hard ? nullptr : P.s.template data_ptr<T>();
  T* Ep = E.template data_ptr<T>();
  T* Mp = mass.template data_ptr<T>();

  // AVX-512 path (float32 accumulation): own GEMM kernels on row pointers, padded to Kp columns
  const bool fast = std::is_same<T, float>::value && avx512::available();
  const int64_t Kp = fast ? avx512::pad16(K) : K;
  at::Tensor Cp, csqp, sp;
  if (fast) {
    Cp = at::zeros({D, Kp}, opts<T>());  // C^T packed, zero columns past K
    Cp.narrow(1, 0, K).copy_(P.C.t());
    csqp = at::zeros({Kp}, opts<T>());
    csqp.narrow(0, 0, K).copy_(P.csq);
    sp = at::zeros({Kp}, opts<T>());
    if (!hard) sp.narrow(0, 0, K).copy_(P.s);
  }

  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    at::Tensor Xb = at::empty({R, D}, opts<T>()), Sb = at::empty({R, Kp}, opts<T>());
    at::Tensor Ab = at::empty({R, Kp}, opts<T>()), Db = at::empty({R, Kp}, opts<T>());
    at::Tensor Eloc = at::empty({K, D}, opts<T>());
    std::vector<T> mloc(Kp), tmp(R);
    std::vector<int64_t> kmin(R);
    std::vector<const T*> ptr(R), nxt(R);
    int64_t nn = 0;
    T* X = Xb.template data_ptr<T>();
    T* El = Eloc.template data_ptr<T>();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p0 = L.N * c / nc, p1 = L.N * (c + 1) / nc;
      int nslot = 0;
      walk_chunk<T>(
          L, p0, p1, R, in.xr, in.br, X, ptr.data(), nxt.data(), nn, fast,
          [&](int64_t) {
            Eloc.zero_();
            std::fill(mloc.begin(), mloc.end(), T(0));
          },
          [&](int64_t, bool, int64_t, int64_t r) {
            T* A = Ab.template data_ptr<T>();
            T* Sp = Sb.template data_ptr<T>();
            if constexpr (std::is_same<T, float>::value) {
              if (fast) {
                const float* const* rows = ptr.data();
                avx512::gemm_rows_bt(rows, r, D, Cp.data_ptr<float>(), Kp, Kp, Sp, Kp, nxt.data(), nn);
                if (hard) {
                  avx512::hard_rows(Sp, Kp, r, csqp.data_ptr<float>(), K, kmin.data());
                  for (int64_t i = 0; i < r; ++i) {
                    mloc[kmin[i]] += 1.f;
                    avx512::add_row(El + kmin[i] * D, rows[i], D);
                  }
                } else {
                  float* Dd = Db.data_ptr<float>();
                  avx512::soft_rows(rows, r, D, Sp, Kp, csqp.data_ptr<float>(), sp.data_ptr<float>(), K, A, Dd, Kp,
                                    mloc.data(), tmp.data());
                  avx512::gemm_at_rows(A, Kp, rows, r, K, D, El, D);
                }
                return;
              }
            }
            at::Tensor Xr = Xb.narrow(0, 0, r);
            at::Tensor Sr = Sb.narrow(0, 0, r);
            at::mm_out(Sr, Xr, Ct);
            assign_rows<T>(X, r, D, Sp, K, csq, s, K, hard, A, Db.template data_ptr<T>(), kmin.data());
            if (hard) {
              for (int64_t i = 0; i < r; ++i) {
                const int64_t k = kmin[i];
                mloc[k] += T(1);
                T* e = El + k * D;
                const T* xi = X + i * D;
                for (int64_t j = 0; j < D; ++j) e[j] += xi[j];
              }
            } else {
              for (int64_t i = 0; i < r; ++i)
                for (int64_t k = 0; k < K; ++k) mloc[k] += A[i * K + k];
              Eloc.addmm_(Ab.narrow(0, 0, r).t(), Xr);
            }
          },
          [&](int64_t b, bool owned) {
            // E_b (part) = sum a x - mass c
            T* dstE;
            T* dstM;
            if (owned) {
              dstE = Ep + b * K * D;
              dstM = Mp + b * K;
            } else {
              const int64_t slot = c * 2 + (nslot++ == 0 ? 0 : 1);
              slot_slide[slot] = b;
              dstE = slotE.template data_ptr<T>() + slot * K * D;
              dstM = slotM.template data_ptr<T>() + slot * K;
            }
            for (int64_t k = 0; k < K; ++k) {
              for (int64_t j = 0; j < D; ++j) dstE[k * D + j] = El[k * D + j] - mloc[k] * C[k * D + j];
              dstM[k] = mloc[k];
            }
          });
    }
  });
  for (int64_t slot = 0; slot < nc * 2; ++slot) {
    const int64_t b = slot_slide[slot];
    if (b < 0) continue;
    E[b].add_(slotE.view({nc * 2, K, D})[slot]);
    mass[b].add_(slotM.view({nc * 2, K})[slot]);
  }
  at::Tensor Eout = E.scalar_type() == out_dtype ? E : E.to(out_dtype);
  return {Eout, mass.to(at::kFloat)};
}

c10::optional<at::Tensor> detached(const c10::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) return t->detach();
  return t;
}

std::tuple<at::Tensor, at::Tensor> residual_encode_fwd_detached(
    const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets, bool hard);

std::tuple<at::Tensor, at::Tensor> residual_encode_fwd_cpu(
    const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets, bool hard) {
  // Detached views (no copies): the worker threads of at::parallel_for do not inherit the caller's
  // below-autograd dispatch state, so no tensor they touch may require grad.
  const at::Tensor x_ = x.detach(), c_ = codewords.detach();
  const c10::optional<at::Tensor> s_ = detached(scale), bank_ = detached(bank);
  return residual_encode_fwd_detached(x_, x_offsets, c_, s_, bank_, bank_index, bank_offsets, hard);
}

std::tuple<at::Tensor, at::Tensor> residual_encode_fwd_detached(
    const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets, bool hard) {
  Inputs in = setup_inputs(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard);
  const at::ScalarType out_dtype = at::promote_types(x.scalar_type(), codewords.scalar_type());
  const at::Tensor* sp = (!hard && scale.has_value()) ? &*scale : nullptr;
  const at::Tensor* bp = (bank.has_value() && bank->defined()) ? &*bank : nullptr;
  if (acc_type({&x, &codewords, sp, bp}) == at::kDouble)
    return fwd_impl<double>(in, codewords, scale, hard, out_dtype);
  return fwd_impl<float>(in, codewords, scale, hard, out_dtype);
}

// ------------------------------------------------------------------------------------------------ backward
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(Inputs& in, const at::Tensor& grad_E, const at::Tensor& x,
                                                        const at::Tensor& codewords,
                                                        const c10::optional<at::Tensor>& scale,
                                                        const c10::optional<at::Tensor>& mass, bool hard,
                                                        bool need_x, bool need_c, bool need_s) {
  Layout& L = in.L;
  if (hard) need_s = false;
  // with the forward's mass, hard grad_c = -sum_b mass_bk G_bk: the bank rows are not read at all
  const bool given_mass = hard && mass.has_value() && mass->defined();
  // grad_x depends on each fresh row alone; the bank rows only feed grad_codewords and grad_scale
  L.skip_bank = !(need_c || need_s) || given_mass;
  L.init();
  const Prep<T> P = prepare<T>(codewords, scale, hard);
  const int64_t K = P.K, D = P.D, B = L.B;
  TORCH_CHECK_VALUE(grad_E.dim() == 3 && grad_E.size(0) == B && grad_E.size(1) == K && grad_E.size(2) == D,
                    "dre: grad_E must have shape (B, K, D) = (", B, ", ", K, ", ", D, "); got ", grad_E.sizes());
  const at::Tensor G = grad_E.to(c10::CppTypeToScalarType<T>::value).contiguous();
  // gc_bk = <G_bk, c_k>
  // (batched matrix-vector products: no B x K x D temporary; hard needs no gc)
  const at::Tensor GC = hard ? at::Tensor()
                             : at::bmm(G.transpose(0, 1), P.C.unsqueeze(2)).squeeze(2).t().contiguous();
  const at::ScalarType scale_dtype = (scale.has_value() && scale->defined()) ? scale->scalar_type()
                                                                             : codewords.scalar_type();
  at::Tensor grad_x = need_x ? at::empty({x.size(0), D}, x.options().dtype(x.scalar_type()))
                             : at::zeros({x.size(0), D}, x.options());
  Rows gxr;
  if (need_x) gxr = Rows(grad_x);
  const int64_t R = block_rows(D);
  const int64_t nc = L.N > 0 ? num_chunks(L.N, R) : 1;
  // per-chunk partial sums: WX = sum_i w_i x_i^T, MG = sum_b mass_b G_b (K x D); wsum, gs (K)
  at::Tensor WX = at::zeros({nc, K, D}, opts<T>()), MG = at::zeros({nc, K, D}, opts<T>());
  at::Tensor WS = at::zeros({nc, K}, opts<T>()), GS = at::zeros({nc, K}, opts<T>());
  const T* C = P.C.template data_ptr<T>();
  const T* csq = P.csq.template data_ptr<T>();
  const T* s = hard ? nullptr : P.s.template data_ptr<T>();
  const T* Gp = G.template data_ptr<T>();
  const T* GCp = hard ? nullptr : GC.template data_ptr<T>();

  // AVX-512 path (float32 accumulation), as in the forward; [C^T | G_b^T] is packed D x 2Kp per slide
  const bool fast = std::is_same<T, float>::value && avx512::available();
  const int64_t Kp = fast ? avx512::pad16(K) : K;
  at::Tensor csqp, sp;
  if (fast) {
    csqp = at::zeros({Kp}, opts<T>());
    csqp.narrow(0, 0, K).copy_(P.csq);
    sp = at::zeros({Kp}, opts<T>());
    if (!hard) sp.narrow(0, 0, K).copy_(P.s);
  }

  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    const int64_t W2 = hard ? K : 2 * K;
    at::Tensor Xb = at::empty({R, D}, opts<T>()), SH = at::empty({R, fast ? 2 * Kp : W2}, opts<T>());
    at::Tensor Ab = at::empty({R, Kp}, opts<T>()), Db = at::empty({R, Kp}, opts<T>());
    at::Tensor Pb = at::empty({R, 2 * K}, opts<T>()), GXb = at::empty({R, D}, opts<T>());
    at::Tensor CG = at::empty({2 * K, D}, opts<T>());  // [C; G_b]
    std::copy(C, C + K * D, CG.template data_ptr<T>());
    const at::Tensor CGt = hard ? P.C.t() : CG.t();
    std::vector<T> mseg(Kp), rowtmp(D), wsum_row(R), gm_row(R);
    std::vector<int64_t> kmin(R);
    std::vector<const T*> ptr(R), nxt(R);
    int64_t nn = 0;
    // fast path only: packed [C^T | G_b^T] (D x 2Kp), w rows (R x Kp), padded gc_b, wsum and gs partial sums
    at::Tensor CGp, Wb;
    std::vector<T> gcp, wsp, gsp;
    if (fast) {
      CGp = at::zeros({D, 2 * Kp}, opts<T>());
      CGp.narrow(1, 0, K).copy_(P.C.t());
      Wb = at::empty({R, Kp}, opts<T>());
      gcp.assign(Kp, T(0));
      wsp.assign(Kp, T(0));
      gsp.assign(Kp, T(0));
    }
    T* X = Xb.template data_ptr<T>();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p0 = L.N * c / nc, p1 = L.N * (c + 1) / nc;
      at::Tensor WXc = WX[c];
      T* MGc = MG.template data_ptr<T>() + c * K * D;
      T* WSc = WS.template data_ptr<T>() + c * K;
      T* GSc = GS.template data_ptr<T>() + c * K;
      walk_chunk<T>(
          L, p0, p1, R, in.xr, in.br, X, ptr.data(), nxt.data(), nn, fast,
          [&](int64_t b) {
            std::fill(mseg.begin(), mseg.end(), T(0));
            if (!hard) std::copy(Gp + b * K * D, Gp + (b + 1) * K * D, CG.template data_ptr<T>() + K * D);
            if (fast && !hard) {
              T* cg = CGp.template data_ptr<T>();
              const T* Gb = Gp + b * K * D;
              for (int64_t k = 0; k < K; ++k)
                for (int64_t j = 0; j < D; ++j) cg[j * 2 * Kp + Kp + k] = Gb[k * D + j];
              std::copy(GCp + b * K, GCp + (b + 1) * K, gcp.begin());
            }
          },
          [&](int64_t b, bool fresh, int64_t row0, int64_t r) {
            const T* Gb = Gp + b * K * D;
            if constexpr (std::is_same<T, float>::value) {
              if (fast) {
                const float* const* rows = ptr.data();
                float* sh = SH.data_ptr<float>();
                if (hard) {
                  avx512::gemm_rows_bt(rows, r, D, CGp.data_ptr<float>(), 2 * Kp, Kp, sh, Kp, nxt.data(), nn);
                  avx512::hard_rows(sh, Kp, r, csqp.data_ptr<float>(), K, kmin.data());
                  for (int64_t i = 0; i < r; ++i) {
                    mseg[kmin[i]] += 1.f;
                    if (fresh && need_x) gxr.store(row0 + i, Gb + kmin[i] * D);
                  }
                  return;
                }
                const int64_t ld = 2 * Kp;
                avx512::gemm_rows_bt(rows, r, D, CGp.data_ptr<float>(), ld, ld, sh, ld, nxt.data(), nn);
                float* A = Ab.data_ptr<float>();
                float* Dd = Db.data_ptr<float>();
                float* W = Wb.data_ptr<float>();
                avx512::soft_rows(rows, r, D, sh, ld, csqp.data_ptr<float>(), sp.data_ptr<float>(), K, A, Dd, Kp,
                                  mseg.data(), wsum_row.data());
                avx512::soft_bwd_rows(r, A, Dd, Kp, sh + Kp, ld, gcp.data(), sp.data_ptr<float>(), K, W, gsp.data(),
                                      wsp.data(), wsum_row.data(), gm_row.data());
                if (need_c) avx512::gemm_at_rows(W, Kp, rows, r, K, D, WXc.data_ptr<float>(), D);
                if (fresh && need_x) {
                  // grad_x = [-2W | A] [C; G_b] + 2 (sum_k w_ik) x_i   (fresh rows: a small share of all rows)
                  float* Pp = Pb.data_ptr<float>();
                  for (int64_t i = 0; i < r; ++i)
                    for (int64_t k = 0; k < K; ++k) {
                      Pp[i * 2 * K + k] = -2.f * W[i * Kp + k];
                      Pp[i * 2 * K + K + k] = A[i * Kp + k];
                    }
                  at::Tensor GXr = GXb.narrow(0, 0, r);
                  at::mm_out(GXr, Pb.narrow(0, 0, r), CG);
                  float* gx = GXb.data_ptr<float>();
                  for (int64_t i = 0; i < r; ++i) {
                    const float two_w = 2.f * wsum_row[i];
                    float* g = gx + i * D;
                    const float* xi = rows[i];
                    for (int64_t j = 0; j < D; ++j) g[j] += two_w * xi[j];
                    gxr.store(row0 + i, g);
                  }
                }
                return;
              }
            }
            at::Tensor Xr = Xb.narrow(0, 0, r);
            at::Tensor SHr = SH.narrow(0, 0, r);
            at::mm_out(SHr, Xr, CGt);
            const T* sh = SH.template data_ptr<T>();
            T* A = Ab.template data_ptr<T>();
            T* Dd = Db.template data_ptr<T>();
            assign_rows<T>(X, r, D, sh, W2, csq, s, K, hard, A, Dd, kmin.data());
            if (hard) {
              for (int64_t i = 0; i < r; ++i) mseg[kmin[i]] += T(1);
              if (fresh && need_x)
                for (int64_t i = 0; i < r; ++i) gxr.store(row0 + i, Gb + kmin[i] * D);
              return;
            }
            // soft: u, w = -s u; Pb = [-2 W | A]
            T* Pp = Pb.template data_ptr<T>();
            const T* gc = GCp + b * K;
            for (int64_t i = 0; i < r; ++i) {
              const T* a = A + i * K;
              const T* h = sh + i * W2 + K;
              int64_t m = 0;  // g is shifted by g_im (see the top of this file)
              for (int64_t k = 1; k < K; ++k)
                if (a[k] > a[m]) m = k;
              const T gm = h[m] - gc[m];
              T ga = 0;
#pragma omp simd reduction(+ : ga)
              for (int64_t k = 0; k < K; ++k) ga += a[k] * ((h[k] - gc[k]) - gm);
              T ws = 0;
              T* pw = Pp + i * 2 * K;
              const T* di = Dd + i * K;
#pragma omp simd reduction(+ : ws)
              for (int64_t k = 0; k < K; ++k) {
                const T u = a[k] * (((h[k] - gc[k]) - gm) - ga);
                const T w = -s[k] * u;
                GSc[k] -= u * di[k];
                WSc[k] += w;
                mseg[k] += a[k];
                ws += w;
                pw[k] = T(-2) * w;
                pw[K + k] = a[k];
              }
              wsum_row[i] = ws;
            }
            if (need_c) WXc.addmm_(Pb.narrow(0, 0, r).narrow(1, 0, K).t(), Xr, T(1), T(-0.5));
            if (fresh && need_x) {
              // grad_x = [-2W | A] [C; G_b] + 2 (sum_k w_ik) x_i
              at::Tensor GXr = GXb.narrow(0, 0, r);
              at::mm_out(GXr, Pb.narrow(0, 0, r), CG);
              T* gx = GXb.template data_ptr<T>();
              for (int64_t i = 0; i < r; ++i) {
                const T two_w = T(2) * wsum_row[i];
                T* g = gx + i * D;
                const T* xi = X + i * D;
                for (int64_t j = 0; j < D; ++j) g[j] += two_w * xi[j];
                gxr.store(row0 + i, g);
              }
            }
          },
          [&](int64_t b, bool) {
            const T* Gb = Gp + b * K * D;
            for (int64_t k = 0; k < K; ++k) {
              const T m = mseg[k];
              if (m == T(0)) continue;
              for (int64_t j = 0; j < D; ++j) MGc[k * D + j] += m * Gb[k * D + j];
            }
          });
      if (fast) {
        for (int64_t k = 0; k < K; ++k) {
          WSc[k] += wsp[k];
          GSc[k] += gsp[k];
        }
        std::fill(wsp.begin(), wsp.end(), T(0));
        std::fill(gsp.begin(), gsp.end(), T(0));
      }
    }
  });
  at::Tensor grad_c, grad_s;
  if (need_c) {
    // grad_c = -MG - 2 WX + 2 wsum c   (WX above holds sum_i w_i x_i)
    at::Tensor gc;
    if (given_mass) {
      TORCH_CHECK_VALUE(mass->dim() == 2 && mass->size(0) == B && mass->size(1) == K,
                        "dre: mass must have shape (B, K) = (", B, ", ", K, "); got ", mass->sizes());
      // -sum_b mass_bk G_bk as K products (1 x B) . (B x D), no B x K x D temporary
      gc = -at::bmm(mass->to(G.scalar_type()).t().unsqueeze(1), G.transpose(0, 1)).squeeze(1);
    } else {
      gc = -MG.sum(0);
    }
    if (!hard) gc = gc - 2 * WX.sum(0) + 2 * WS.sum(0).unsqueeze(1) * P.C;
    grad_c = gc.to(codewords.scalar_type());
  } else {
    grad_c = at::zeros({K, D}, codewords.options());
  }
  if (need_s) {
    grad_s = GS.sum(0).to(scale_dtype);
  } else {
    grad_s = at::zeros({K}, codewords.options().dtype(scale_dtype));
  }
  return {grad_x, grad_c, grad_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_encode_bwd_cpu(
    const at::Tensor& grad_E, const at::Tensor& x, const at::Tensor& x_offsets, const at::Tensor& codewords,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bank,
    const c10::optional<at::Tensor>& bank_index, const c10::optional<at::Tensor>& bank_offsets,
    const c10::optional<at::Tensor>& mass, bool hard, bool need_grad_x, bool need_grad_codewords,
    bool need_grad_scale) {
  check_float(grad_E, "grad_E");
  Inputs in = setup_inputs(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard);
  const at::Tensor grad_E_ = grad_E.detach(), x_ = x.detach(), c_ = codewords.detach();
  const c10::optional<at::Tensor> s_ = detached(scale);
  in.xr = Rows(x_);
  const at::Tensor* sp = (!hard && scale.has_value()) ? &*scale : nullptr;
  const at::Tensor* bp = (bank.has_value() && bank->defined()) ? &*bank : nullptr;
  if (acc_type({&x, &codewords, sp, bp, &grad_E}) == at::kDouble)
    return bwd_impl<double>(in, grad_E_, x_, c_, s_, mass, hard, need_grad_x, need_grad_codewords, need_grad_scale);
  return bwd_impl<float>(in, grad_E_, x_, c_, s_, mass, hard, need_grad_x, need_grad_codewords, need_grad_scale);
}

}  // namespace
}  // namespace cpu
}  // namespace dre

TORCH_LIBRARY_IMPL(dre, CPU, m) {
  m.impl("residual_encode_fwd", &dre::cpu::residual_encode_fwd_cpu);
  m.impl("residual_encode_bwd", &dre::cpu::residual_encode_bwd_cpu);
}
