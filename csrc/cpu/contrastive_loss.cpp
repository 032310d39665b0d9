// dre::contrastive_loss_fwd / contrastive_loss_bwd on CPU, without any B x B tensor.
//
//   â_i = a_i / max(||a_i||, 1e-12) if normalize else a_i (same for b),  l_ij = s <â_i, b̂_j>
//   row_lse_i = logsumexp_j l_ij,  col_lse_j = logsumexp_i l_ij
//   r_i = row_lse_i - (1/n_i) sum_{j in P_i} l_ij,   c_j = col_lse_j - (1/n_j) sum_{i in P_j} l_ij,  loss = (r + c)/2
//
// The log-sum-exps run over the off-diagonal logits (O_i, O'_j) and the diagonal l_ii is added back at the end:
// row_lse_i = logaddexp(O_i, l_ii), and where n_i = 1 (the diagonal is the row's only positive)
// r_i = log(1 + exp(O_i - l_ii)), which keeps its relative precision as r_i -> 0 (row_lse_i - l_ii keeps only
// ulp(row_lse_i)); the backward then takes p_ii - 1 = expm1(-r_i) for such a row (dre_kernels/_library.py).
//
// The log-sum-exps are online over tiles of the logits (one tile x tile GEMM at a time, per task), each logit tile
// computed once for both directions (for_each_tile_pair); the result does not depend on the thread count. On a CPU
// with AVX-512 the float32 tiles take avx512_kernels.h (its GEMMs and exp). The forward sums the positive logits
// from the same tiles (positives_tile); the backward's positive part needs no logits: with class sums
// Bsum_c = sum_{j in c} b̂_j, sum_{j in P_i} b̂_j = Bsum_{c(i)} (labels=None: singleton classes).
//
// Backward, with g = grad_loss, p_ij = exp(l_ij - row_lse_i), q_ij = exp(l_ij - col_lse_j), n = |class|:
//   Z_ij = dL/dl_ij = g_i/2 p_ij + g_j/2 q_ij - [c(i) = c(j)] (g_i + g_j) / (2 n)
//   Y_i = sum_j Z_ij b̂_j,  X_j = sum_i Z_ij â_i   (dense part by tiles, positive part by class sums)
// except for classes of one row, whose Z_ii = g_i/2 (expm1(-r_i) + expm1(-c_i)) is set in the tile and whose
// positive part is left out of the class sums (no g_i b̂_i to be cancelled by the dense part's g_i p_ii b̂_i).
//   dâ = s Y, db̂ = s X, ds = sum_i <Y_i, â_i>, then through the normalisation.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "contrastive_loss_finish.h"
#include "cpu/avx512_kernels.h"
#include "cpu/common.h"

namespace dre {
namespace cpu {
namespace {

constexpr double kEps = 1e-12;

template <typename T>
at::TensorOptions topts() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
}

// (normalised rows in T, their norms)
template <typename T>
std::pair<at::Tensor, at::Tensor> normalized(const at::Tensor& a, bool normalize) {
  at::Tensor A = a.to(c10::CppTypeToScalarType<T>::value).contiguous();
  at::Tensor norms;
  if (normalize) {
    norms = A.norm(2, {1});
    A = A / norms.clamp_min(kEps).unsqueeze(1);
  }
  return {A.contiguous(), norms};
}

// Class of each row (0..nclasses-1) and class sizes; labels=None gives singleton classes (singletons: class i is
// row i, which the positives use without class sums).
struct Classes {
  std::vector<int64_t> cls, count;
  int64_t n = 0;
  bool singletons = false;
};

Classes classes_of(const c10::optional<at::Tensor>& labels, int64_t B) {
  Classes c;
  c.cls.resize(B);
  if (!labels.has_value() || !labels->defined()) {
    for (int64_t i = 0; i < B; ++i) c.cls[i] = i;
    c.count.assign(B, 1);
    c.n = B;
    c.singletons = true;
    return c;
  }
  TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == B, "dre: labels must have shape (B,) = (", B,
                    ",); got ", labels->sizes());
  TORCH_CHECK(!at::isFloatingType(labels->scalar_type()) && labels->scalar_type() != at::kBool,
              "dre: labels must be an integer tensor; got ", labels->scalar_type());
  const at::Tensor l = labels->to(at::kLong).contiguous();
  const int64_t* lp = l.data_ptr<int64_t>();
  std::unordered_map<int64_t, int64_t> id;
  id.reserve(B * 2);
  for (int64_t i = 0; i < B; ++i) {
    auto it = id.find(lp[i]);
    if (it == id.end()) {
      it = id.emplace(lp[i], c.n++).first;
      c.count.push_back(0);
    }
    c.cls[i] = it->second;
    c.count[it->second] += 1;
  }
  return c;
}

// S[c] = sum_{i in c} w_i V_i  (w = null: 1)
template <typename T>
at::Tensor class_sums(const at::Tensor& V, const Classes& c, const T* w) {
  const int64_t B = V.size(0), P = V.size(1);
  at::Tensor S = at::zeros({c.n, P}, topts<T>());
  T* sp = S.template data_ptr<T>();
  const T* vp = V.template data_ptr<T>();
  for (int64_t i = 0; i < B; ++i) {
    const T wi = w ? w[i] : T(1);
    T* dst = sp + c.cls[i] * P;
    const T* src = vp + i * P;
    for (int64_t j = 0; j < P; ++j) dst[j] += wi * src[j];
  }
  return S;
}

// The B x B logits are visited in tiles of tile_rows(B) rows and columns, in nt rounds: in round r, task i takes the
// tile pair (row tile i, column tile (i + r) mod nt), so the tasks of a round own disjoint row and column tiles. One
// computation of each logit tile serves both directions (row and column log-sum-exps; in the backward, Y_i and X_j)
// with no partial buffers and no atomics, and every row's and column's sum runs over the tiles in a fixed order: the
// result does not depend on the thread count. The tile edge depends on B alone for the same reason.
// 128: measured best against 16-64 (tiles below 128 rows lose up to 2x in the backward's GEMMs) and level with 256
// at B = 1024..4096, P = 512 on 2 cores, while leaving B / 128 tasks per round for more cores.
int64_t tile_rows(int64_t B) { return std::max<int64_t>(1, std::min<int64_t>(B, 128)); }

// Per-task scratch for one tile pair: the logit tile, the backward's Z tile, the row pointers of the AVX-512 GEMMs.
template <typename T>
struct TileScratch {
  int64_t ld;  // row stride of the tiles
  std::vector<T> L, Z;
  std::vector<const float*> rows;
  TileScratch(int64_t B, bool with_z) {
    const int64_t t = tile_rows(B);
    ld = avx512::pad16(t);
    L.resize(t * ld);
    if (with_z) Z.resize(t * ld);
    rows.resize(t);
  }
};

// fn(scratch, i0, ni, j0, nj) for every tile pair, the pairs of one round in parallel.
template <typename T, typename Fn>
void for_each_tile_pair(int64_t B, bool with_z, const Fn& fn) {
  const int64_t t = tile_rows(B), nt = (B + t - 1) / t;
  for (int64_t r = 0; r < nt; ++r)
    at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
      TileScratch<T> w(B, with_z);
      for (int64_t i = p0; i < p1; ++i) {
        const int64_t j = (i + r) % nt;
        fn(w, i * t, std::min(t, B - i * t), j * t, std::min(t, B - j * t));
      }
    });
}

// The logit tiles' second operand: K as is (at::mm), or for the AVX-512 GEMM (fast: float32 on a CPU with AVX-512),
// K^T packed (P x pad16(B), zero columns after B) once for all tiles.
template <typename T>
struct LogitOperand {
  at::Tensor K, Kt;
  bool fast;
  explicit LogitOperand(const at::Tensor& K_)
      : K(K_), fast(std::is_same<T, float>::value && avx512::available()) {
    if (fast) {
      Kt = at::zeros({K.size(1), avx512::pad16(K.size(0))}, K.options());
      Kt.narrow(1, 0, K.size(0)).copy_(K.t());
    }
  }
};

// L[0:ni, 0:nj] (row stride ld) = s Q[i0:i0+ni] . K[j0:j0+nj]^T, the product rounded before anything is
// subtracted from it: where l_ij is the running max m, e^{l_ij - m} must be exactly 1 (a fused s * dot - m would
// leave the product's rounding error, scaled by s, in every gradient of a saturated loss).
template <typename T>
void logit_tile(const at::Tensor& Q, const LogitOperand<T>& k, T s, int64_t i0, int64_t ni, int64_t j0, int64_t nj,
                TileScratch<T>& w) {
  const int64_t P = Q.size(1);
  bool done = false;
  if constexpr (std::is_same<T, float>::value) {
    if (k.fast) {
      const float* q = Q.data_ptr<float>();
      for (int64_t i = 0; i < ni; ++i) w.rows[i] = q + (i0 + i) * P;
      avx512::gemm_rows_bt(w.rows.data(), ni, P, k.Kt.template data_ptr<float>() + j0, k.Kt.size(1),
                           avx512::pad16(nj), w.L.data(), w.ld);
      done = true;
    }
  }
  if (!done) {
    at::Tensor L = at::from_blob(w.L.data(), {ni, nj}, {w.ld, 1}, topts<T>());
    at::mm_out(L, Q.narrow(0, i0, ni), k.K.narrow(0, j0, nj).t());
  }
  for (int64_t i = 0; i < ni; ++i) {
    T* row = w.L.data() + i * w.ld;
    for (int64_t j = 0; j < nj; ++j) row[j] *= s;
  }
}

// Portable lse_tile (avx512_kernels.h has the formula).
template <typename T>
void lse_tile(const T* L, int64_t ni, int64_t nj, int64_t ld, T* rm, T* rs, T* cm, T* cs) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < ni; ++i) {
    const T* l = L + i * ld;
    T mx = ninf;
    for (int64_t j = 0; j < nj; ++j) mx = std::max(mx, l[j]);
    const T m = std::max(rm[i], mx), shift = m == ninf ? T(0) : m;
    T acc = 0;
    for (int64_t j = 0; j < nj; ++j) acc += std::exp(l[j] - shift);
    rs[i] = rs[i] * (rm[i] == ninf ? T(0) : std::exp(rm[i] - m)) + acc;  // NaN sums stay NaN
    rm[i] = m;
  }
  for (int64_t j = 0; j < nj; ++j) {
    T mx = ninf;
    for (int64_t i = 0; i < ni; ++i) mx = std::max(mx, L[i * ld + j]);
    const T m = std::max(cm[j], mx), shift = m == ninf ? T(0) : m;
    T acc = 0;
    for (int64_t i = 0; i < ni; ++i) acc += std::exp(L[i * ld + j] - shift);
    cs[j] = cs[j] * (cm[j] == ninf ? T(0) : std::exp(cm[j] - m)) + acc;
    cm[j] = m;
  }
}

// Portable z_tile (avx512_kernels.h has the formula).
template <typename T>
void z_tile(const T* L, int64_t ni, int64_t nj, int64_t ld, const T* gr, const T* lr, const T* gc, const T* lc, T* Z) {
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t j = 0; j < nj; ++j) {
      const T l = L[i * ld + j];
      Z[i * ld + j] = gr[i] * std::exp(l - lr[i]) + gc[j] * std::exp(l - lc[j]);
    }
}

// Sums of the positive logits from a tile (the same l_ij the log-sum-exps saw, so that a loss that
// is exactly 0 in exact arithmetic comes out as torch's does and not as the roundoff between two dot products):
//   pos_row_i += sum_{j in tile, c(j) = c(i)} l_ij,  pos_col_j += sum_{i in tile, c(i) = c(j)} l_ij.
// Singleton classes (labels=None): only the diagonal of the diagonal tiles.
template <typename T>
void positives_tile(const T* L, int64_t i0, int64_t ni, int64_t j0, int64_t nj, int64_t ld, const Classes& c,
                    T* pos_row, T* pos_col) {
  if (c.singletons) {
    if (i0 != j0) return;
    for (int64_t k = 0; k < ni; ++k) {
      const T l = L[k * ld + k];
      pos_row[i0 + k] += l;
      pos_col[i0 + k] += l;
    }
    return;
  }
  for (int64_t i = 0; i < ni; ++i) {
    const int64_t ci = c.cls[i0 + i];
    for (int64_t j = 0; j < nj; ++j)
      if (c.cls[j0 + j] == ci) {
        const T l = L[i * ld + j];
        pos_row[i0 + i] += l;
        pos_col[j0 + j] += l;
      }
  }
}

// The off-diagonal log-sum-exps O_i = logsumexp_{j != i} l_ij, O'_j = logsumexp_{i != j} l_ij (l_ij = s <A_i, B_j>),
// the diagonal l_ii and the positive sums (positives_tile), one logit tile for all five.
template <typename T>
void lse_both(const at::Tensor& A, const at::Tensor& Bn, T s, const Classes& c, T* off_row, T* off_col, T* diag,
              T* pos_row, T* pos_col) {
  const int64_t B = A.size(0);
  std::vector<T> rm(B, -std::numeric_limits<T>::infinity()), rs(B, T(0)), cm(rm), cs(rs);
  std::fill(pos_row, pos_row + B, T(0));
  std::fill(pos_col, pos_col + B, T(0));
  const LogitOperand<T> k(Bn);
  for_each_tile_pair<T>(B, false, [&](TileScratch<T>& w, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    logit_tile<T>(A, k, s, i0, ni, j0, nj, w);
    positives_tile<T>(w.L.data(), i0, ni, j0, nj, w.ld, c, pos_row, pos_col);
    if (i0 == j0)  // a diagonal tile (rows and columns are cut alike): its diagonal out of the sums
      for (int64_t q = 0; q < ni; ++q) {
        diag[i0 + q] = w.L[q * w.ld + q];
        w.L[q * w.ld + q] = -std::numeric_limits<T>::infinity();
      }
    if constexpr (std::is_same<T, float>::value) {
      if (k.fast) {
        avx512::lse_tile(w.L.data(), ni, nj, w.ld, &rm[i0], &rs[i0], &cm[j0], &cs[j0]);
        return;
      }
    }
    lse_tile<T>(w.L.data(), ni, nj, w.ld, &rm[i0], &rs[i0], &cm[j0], &cs[j0]);
  });
  for (int64_t i = 0; i < B; ++i) {
    off_row[i] = rm[i] + std::log(rs[i]);  // -inf without an off-diagonal term (B = 1)
    off_col[i] = cm[i] + std::log(cs[i]);
  }
}


template <typename T>
ContrastiveFwdOut fwd_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
                           const c10::optional<at::Tensor>& labels, bool normalize) {
  const int64_t B = a.size(0);
  const T s = logit_scale.to(c10::CppTypeToScalarType<T>::value).template item<T>();
  const at::Tensor A = normalized<T>(a, normalize).first, Bn = normalized<T>(b, normalize).first;
  const Classes c = classes_of(labels, B);
  // off-diagonal log-sum-exps (rows, columns), diagonal, positive sums (rows, columns), |P_i|
  at::Tensor parts = at::empty({6, B}, topts<T>());
  T* p = parts.template data_ptr<T>();
  lse_both<T>(A, Bn, s, c, p, p + B, p + 2 * B, p + 3 * B, p + 4 * B);
  for (int64_t i = 0; i < B; ++i) p[5 * B + i] = static_cast<T>(c.count[c.cls[i]]);
  return contrastive_loss_finish(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5]);
}

// The dense part of the backward, one logit tile for both sides: with
// Zdense_ij = g_i/2 exp(l_ij - row_lse_i) + g_j/2 exp(l_ij - col_lse_j),  Y_i += sum_j Zdense_ij B_j and
// X_j += sum_i Zdense_ij A_i; but Zdense_ii = g_i/2 (em1_row_i + em1_col_i) for a row of a one-row class (own_i):
// its whole dL/dl_ii, with em1 = expm1(-r), expm1(-c) (its positive part is then left out of finish_side).
template <typename T>
void dense_grad(const at::Tensor& A, const at::Tensor& Bn, T s, const T* g_half, const T* row_lse, const T* col_lse,
                const T* em1_row, const T* em1_col, const std::vector<char>& own, at::Tensor& Y, at::Tensor& X) {
  const int64_t B = A.size(0), P = A.size(1);
  const LogitOperand<T> k(Bn);
  const auto own_diagonal = [&](TileScratch<T>& w, int64_t i0, int64_t ni, int64_t j0) {
    if (i0 == j0)
      for (int64_t q = 0; q < ni; ++q)
        if (own[i0 + q]) w.Z[q * w.ld + q] = g_half[i0 + q] * (em1_row[i0 + q] + em1_col[i0 + q]);
  };
  for_each_tile_pair<T>(B, true, [&](TileScratch<T>& w, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    logit_tile<T>(A, k, s, i0, ni, j0, nj, w);
    if constexpr (std::is_same<T, float>::value) {
      if (k.fast) {
        avx512::z_tile(w.L.data(), ni, nj, w.ld, g_half + i0, row_lse + i0, g_half + j0, col_lse + j0,
                       w.Z.data(), w.ld);
        own_diagonal(w, i0, ni, j0);
        // L is free again: Z^T into it, the A operand of Y_i's product
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < nj; ++j) w.L[j * w.ld + i] = w.Z[i * w.ld + j];
        const float* a = A.data_ptr<float>();
        const float* b = Bn.data_ptr<float>();
        for (int64_t j = 0; j < nj; ++j) w.rows[j] = b + (j0 + j) * P;
        avx512::gemm_at_rows(w.L.data(), w.ld, w.rows.data(), nj, ni, P, Y.data_ptr<float>() + i0 * P, P);
        for (int64_t i = 0; i < ni; ++i) w.rows[i] = a + (i0 + i) * P;
        avx512::gemm_at_rows(w.Z.data(), w.ld, w.rows.data(), ni, nj, P, X.data_ptr<float>() + j0 * P, P);
        return;
      }
    }
    z_tile<T>(w.L.data(), ni, nj, w.ld, g_half + i0, row_lse + i0, g_half + j0, col_lse + j0, w.Z.data());
    own_diagonal(w, i0, ni, j0);
    const at::Tensor Z = at::from_blob(w.Z.data(), {ni, nj}, {w.ld, 1}, topts<T>());
    Y.narrow(0, i0, ni).addmm_(Z, Bn.narrow(0, j0, nj));
    X.narrow(0, j0, nj).addmm_(Z.t(), A.narrow(0, i0, ni));
  });
}

// Finishes one side's gradient in place, row by row (no B x P temporaries): with D = Y (U = Â, V = B̂) or X (the
// roles swapped),
//   D_i -= (g_i Vsum_c + GVsum_c) / (2 n_c)    (positives; not for classes of one row: in dense_grad's Z_ii),
//   dots_i = <D_i, U_i>                         (grad s = sum_i dots_i; only when dots is given),
//   D_i <- s D_i, then through û = u / max(||u||, eps) when normalize: (D_i - û_i <û_i, D_i>) / ||u_i|| above eps,
//   D_i / eps below.
template <typename T>
void finish_side(at::Tensor& D, const at::Tensor& U, const at::Tensor& V, const at::Tensor& norms, bool normalize,
                 T s, const T* g, const Classes& c, T* dots) {
  const int64_t B = D.size(0), P = D.size(1);
  at::Tensor Vsum, GVsum;
  if (!c.singletons) {
    Vsum = class_sums<T>(V, c, nullptr);
    GVsum = class_sums<T>(V, c, g);
  }
  T* dp = D.template data_ptr<T>();
  const T* up = U.template data_ptr<T>();
  const T* np = normalize ? norms.template data_ptr<T>() : nullptr;
  at::parallel_for(0, B, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* d = dp + i * P;
      const T* u = up + i * P;
      if (c.count[c.cls[i]] > 1) {
        const int64_t k = c.cls[i];
        const T inv2n = T(1) / (T(2) * static_cast<T>(c.count[k]));
        const T* vs = Vsum.template data_ptr<T>() + k * P;
        const T* gvs = GVsum.template data_ptr<T>() + k * P;
        for (int64_t j = 0; j < P; ++j) d[j] -= (g[i] * vs[j] + gvs[j]) * inv2n;
      }
      T du = 0;
      for (int64_t j = 0; j < P; ++j) du += d[j] * u[j];
      if (dots != nullptr) dots[i] = du;
      if (!normalize) {
        for (int64_t j = 0; j < P; ++j) d[j] *= s;
      } else if (np[i] > kEps) {
        const T proj = s * du, inv = T(1) / np[i];
        for (int64_t j = 0; j < P; ++j) d[j] = (s * d[j] - u[j] * proj) * inv;
      } else {
        for (int64_t j = 0; j < P; ++j) d[j] = s * d[j] / static_cast<T>(kEps);
      }
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& grad_loss, const at::Tensor& a,
                                                        const at::Tensor& b, const at::Tensor& logit_scale,
                                                        const c10::optional<at::Tensor>& labels, bool normalize,
                                                        const at::Tensor& row_lse_in, const at::Tensor& col_lse_in,
                                                        const at::Tensor& row_loss, const at::Tensor& col_loss) {
  constexpr auto st = c10::CppTypeToScalarType<T>::value;
  const int64_t B = a.size(0), P = a.size(1);
  TORCH_CHECK_VALUE(grad_loss.numel() == B && row_lse_in.numel() == B && col_lse_in.numel() == B &&
                        row_loss.numel() == B && col_loss.numel() == B,
                    "dre: grad_loss, row_lse, col_lse, row_loss and col_loss must have B = ", B, " entries");
  const T s = logit_scale.to(st).template item<T>();
  auto [A, na] = normalized<T>(a, normalize);
  auto [Bn, nb] = normalized<T>(b, normalize);
  const at::Tensor g = grad_loss.to(st).contiguous().view({B});
  const at::Tensor row_lse = row_lse_in.to(st).contiguous(), col_lse = col_lse_in.to(st).contiguous();
  const T* gp = g.template data_ptr<T>();
  at::Tensor Y = at::zeros({B, P}, topts<T>()), X = at::zeros({B, P}, topts<T>());
  const at::Tensor g_half = g / 2;
  const at::Tensor em1_row = at::expm1(-row_loss.to(st)).contiguous();
  const at::Tensor em1_col = at::expm1(-col_loss.to(st)).contiguous();
  const Classes c = classes_of(labels, B);
  std::vector<char> own(B);
  for (int64_t i = 0; i < B; ++i) own[i] = c.count[c.cls[i]] == 1;
  dense_grad<T>(A, Bn, s, g_half.template data_ptr<T>(), row_lse.template data_ptr<T>(),
                col_lse.template data_ptr<T>(), em1_row.template data_ptr<T>(), em1_col.template data_ptr<T>(), own,
                Y, X);
  std::vector<T> dots(B);
  finish_side<T>(Y, A, Bn, na, normalize, s, gp, c, dots.data());
  finish_side<T>(X, Bn, A, nb, normalize, s, gp, c, nullptr);
  double gs = 0;  // a fixed order, in double: the same bits for any thread count
  for (int64_t i = 0; i < B; ++i) gs += static_cast<double>(dots[i]);
  const at::Tensor grad_s = at::scalar_tensor(gs, topts<T>());
  return {Y.to(a.scalar_type()).contiguous(), X.to(b.scalar_type()).contiguous(), grad_s};
}

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale) {
  check_2d(a, "a");
  check_2d(b, "b");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "dre: a and b must have the same shape (B, P); got ", a.sizes(),
                    " and ", b.sizes());
  check_float(logit_scale, "logit_scale");
  TORCH_CHECK_VALUE(logit_scale.numel() == 1, "dre: logit_scale must be a 0-dim tensor; got shape ",
                    logit_scale.sizes());
}

ContrastiveFwdOut contrastive_loss_fwd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
                                           const c10::optional<at::Tensor>& labels, bool normalize) {
  check_inputs(a, b, logit_scale);
  // detached views: at::parallel_for workers do not inherit the caller's below-autograd dispatch state
  const at::Tensor a_ = a.detach(), b_ = b.detach(), s_ = logit_scale.detach();
  if (acc_type({&a, &b}) == at::kDouble) return fwd_impl<double>(a_, b_, s_, labels, normalize);
  return fwd_impl<float>(a_, b_, s_, labels, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const c10::optional<at::Tensor>& labels, bool normalize, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_loss, const at::Tensor& col_loss) {
  check_inputs(a, b, logit_scale);
  const at::Tensor a_ = a.detach(), b_ = b.detach(), s_ = logit_scale.detach(), g_ = grad_loss.detach();
  if (acc_type({&a, &b}) == at::kDouble)
    return bwd_impl<double>(g_, a_, b_, s_, labels, normalize, row_lse.detach(), col_lse.detach(), row_loss.detach(),
                            col_loss.detach());
  return bwd_impl<float>(g_, a_, b_, s_, labels, normalize, row_lse.detach(), col_lse.detach(), row_loss.detach(),
                         col_loss.detach());
}

}  // namespace
}  // namespace cpu
}  // namespace dre

TORCH_LIBRARY_IMPL(dre, CPU, m) {
  m.impl("contrastive_loss_fwd", &dre::cpu::contrastive_loss_fwd_cpu);
  m.impl("contrastive_loss_bwd", &dre::cpu::contrastive_loss_bwd_cpu);
}
