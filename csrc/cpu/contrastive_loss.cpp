// dre::contrastive_loss_fwd / contrastive_loss_bwd on CPU, without any B x B tensor.
//
//   â_i = a_i / max(||a_i||, 1e-12) if normalize else a_i (same for b),  l_ij = s <â_i, b̂_j>
//   row_lse_i = logsumexp_j l_ij,  col_lse_j = logsumexp_i l_ij
//   r_i = row_lse_i - (1/n_i) sum_{j in P_i} l_ij,   c_j = col_lse_j - (1/n_j) sum_{i in P_j} l_ij,  loss = (r + c)/2
//
// The log-sum-exps are online over tiles of the logits (one tiles x tiles GEMM at a time, per thread): one pass
// over row tiles for row_lse, one over column tiles for col_lse, so every output row is owned by one task and
// the result does not depend on the thread count. The positive terms need no logits at all: with class sums
// Bsum_c = sum_{j in c} b̂_j, sum_{j in P_i} l_ij = s <â_i, Bsum_{c(i)}> (labels=None: singleton classes).
//
// Backward, with g = grad_loss, p_ij = exp(l_ij - row_lse_i), q_ij = exp(l_ij - col_lse_j), n = |class|:
//   Z_ij = dL/dl_ij = g_i/2 p_ij + g_j/2 q_ij - [c(i) = c(j)] (g_i + g_j) / (2 n)
//   Y_i = sum_j Z_ij b̂_j,  X_j = sum_i Z_ij â_i   (dense part by tiles, positive part by class sums)
//   dâ = s Y, db̂ = s X, ds = sum_i <Y_i, â_i>, then through the normalisation.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <unordered_map>

#include "cpu/common.h"

namespace dre {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;
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

// Class of each row (0..nclasses-1) and class sizes; labels=None gives singleton classes.
struct Classes {
  std::vector<int64_t> cls, count;
  int64_t n = 0;
};

Classes classes_of(const c10::optional<at::Tensor>& labels, int64_t B) {
  Classes c;
  c.cls.resize(B);
  if (!labels.has_value() || !labels->defined()) {
    for (int64_t i = 0; i < B; ++i) c.cls[i] = i;
    c.count.assign(B, 1);
    c.n = B;
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

// Online log-sum-exp over the rows of Q (B x P) against all rows of K: lse_i = log sum_j exp(s <Q_i, K_j>).
template <typename T>
void lse_pass(const at::Tensor& Q, const at::Tensor& Kt, T s, T* lse) {
  const int64_t B = Q.size(0);
  const int64_t nt = (B + kTile - 1) / kTile;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor Lb = at::empty({kTile, kTile}, topts<T>());
    std::vector<T> m(kTile), sum(kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kTile, ni = std::min(kTile, B - i0);
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t j0 = 0; j0 < B; j0 += kTile) {
        const int64_t nj = std::min(kTile, B - j0);
        at::Tensor L = Lb.view({-1}).narrow(0, 0, ni * nj).view({ni, nj});  // contiguous ni x nj
        at::mm_out(L, Q.narrow(0, i0, ni), Kt.narrow(0, j0, nj).t());
        const T* lp = L.template data_ptr<T>();
        for (int64_t i = 0; i < ni; ++i) {
          const T* row = lp + i * nj;
          T mx = m[i];
          for (int64_t j = 0; j < nj; ++j) mx = std::max(mx, s * row[j]);
          if (mx == -std::numeric_limits<T>::infinity()) continue;
          T acc = (m[i] == -std::numeric_limits<T>::infinity()) ? T(0) : sum[i] * std::exp(m[i] - mx);
          for (int64_t j = 0; j < nj; ++j) acc += std::exp(s * row[j] - mx);
          sum[i] = acc;
          m[i] = mx;
        }
      }
      for (int64_t i = 0; i < ni; ++i) lse[i0 + i] = m[i] + std::log(sum[i]);
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& a, const at::Tensor& b,
                                                        const at::Tensor& logit_scale,
                                                        const c10::optional<at::Tensor>& labels, bool normalize) {
  const int64_t B = a.size(0);
  const T s = logit_scale.to(c10::CppTypeToScalarType<T>::value).template item<T>();
  auto [A, na] = normalized<T>(a, normalize);
  auto [Bn, nb] = normalized<T>(b, normalize);
  (void)na;
  (void)nb;
  at::Tensor row_lse = at::empty({B}, topts<T>()), col_lse = at::empty({B}, topts<T>());
  lse_pass<T>(A, Bn, s, row_lse.template data_ptr<T>());
  lse_pass<T>(Bn, A, s, col_lse.template data_ptr<T>());
  const Classes c = classes_of(labels, B);
  // positives: <â_i, Bsum_{c(i)}> / n and <Asum_{c(j)}, b̂_j> / n
  const at::Tensor Bsum = class_sums<T>(Bn, c, nullptr), Asum = class_sums<T>(A, c, nullptr);
  at::Tensor loss = at::empty({B}, topts<T>());
  const int64_t P = A.size(1);
  const T* ap = A.template data_ptr<T>();
  const T* bp = Bn.template data_ptr<T>();
  const T* asp = Asum.template data_ptr<T>();
  const T* bsp = Bsum.template data_ptr<T>();
  const T* rl = row_lse.template data_ptr<T>();
  const T* cl = col_lse.template data_ptr<T>();
  T* lo = loss.template data_ptr<T>();
  at::parallel_for(0, B, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = c.cls[i];
      T pr = 0, pc = 0;
      for (int64_t j = 0; j < P; ++j) {
        pr += ap[i * P + j] * bsp[k * P + j];
        pc += asp[k * P + j] * bp[i * P + j];
      }
      const T n = static_cast<T>(c.count[k]);
      lo[i] = ((rl[i] - s * pr / n) + (cl[i] - s * pc / n)) / T(2);
    }
  });
  return {loss, row_lse, col_lse};
}

// Y_i += sum_j Zdense_ij K_j over all j, for the rows i of Q (Q-side lse `lse_q`, other side `lse_k`):
// Zdense_ij = g_i/2 exp(l_ij - lse_q_i) + g_j/2 exp(l_ij - lse_k_j), l_ij = s <Q_i, K_j>.
template <typename T>
void dense_grad_pass(const at::Tensor& Q, const at::Tensor& Km, T s, const T* g, const T* lse_q, const T* lse_k,
                     at::Tensor& Y) {
  const int64_t B = Q.size(0);
  const int64_t nt = (B + kTile - 1) / kTile;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor Lb = at::empty({kTile, kTile}, topts<T>());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kTile, ni = std::min(kTile, B - i0);
      at::Tensor Yt = Y.narrow(0, i0, ni);
      for (int64_t j0 = 0; j0 < B; j0 += kTile) {
        const int64_t nj = std::min(kTile, B - j0);
        at::Tensor L = Lb.view({-1}).narrow(0, 0, ni * nj).view({ni, nj});  // contiguous ni x nj
        at::mm_out(L, Q.narrow(0, i0, ni), Km.narrow(0, j0, nj).t());
        T* lp = L.template data_ptr<T>();
        for (int64_t i = 0; i < ni; ++i) {
          const T gi = g[i0 + i] / T(2), li = lse_q[i0 + i];
          T* row = lp + i * nj;
          for (int64_t j = 0; j < nj; ++j) {
            const T l = s * row[j];
            row[j] = gi * std::exp(l - li) + (g[j0 + j] / T(2)) * std::exp(l - lse_k[j0 + j]);
          }
        }
        Yt.addmm_(L, Km.narrow(0, j0, nj));
      }
    }
  });
}

// d/da of â = a / max(||a||, eps), applied to dâ: (dâ - â <â, dâ>) / ||a|| when ||a|| > eps, else dâ / eps.
template <typename T>
at::Tensor normalize_backward(const at::Tensor& dA, const at::Tensor& A, const at::Tensor& norms) {
  const at::Tensor big = norms > kEps;
  const at::Tensor proj = (A * dA).sum(1, true);
  const at::Tensor through = (dA - A * proj) / norms.clamp_min(kEps).unsqueeze(1);
  return at::where(big.unsqueeze(1), through, dA / kEps);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& grad_loss, const at::Tensor& a,
                                                        const at::Tensor& b, const at::Tensor& logit_scale,
                                                        const c10::optional<at::Tensor>& labels, bool normalize,
                                                        const at::Tensor& row_lse_in, const at::Tensor& col_lse_in) {
  constexpr auto st = c10::CppTypeToScalarType<T>::value;
  const int64_t B = a.size(0), P = a.size(1);
  TORCH_CHECK_VALUE(grad_loss.numel() == B && row_lse_in.numel() == B && col_lse_in.numel() == B,
                    "dre: grad_loss, row_lse and col_lse must have B = ", B, " entries");
  const T s = logit_scale.to(st).template item<T>();
  auto [A, na] = normalized<T>(a, normalize);
  auto [Bn, nb] = normalized<T>(b, normalize);
  const at::Tensor g = grad_loss.to(st).contiguous().view({B});
  const at::Tensor row_lse = row_lse_in.to(st).contiguous(), col_lse = col_lse_in.to(st).contiguous();
  const T* gp = g.template data_ptr<T>();
  at::Tensor Y = at::zeros({B, P}, topts<T>()), X = at::zeros({B, P}, topts<T>());
  dense_grad_pass<T>(A, Bn, s, gp, row_lse.template data_ptr<T>(), col_lse.template data_ptr<T>(), Y);
  dense_grad_pass<T>(Bn, A, s, gp, col_lse.template data_ptr<T>(), row_lse.template data_ptr<T>(), X);
  // positives: Y_i -= (g_i Bsum_c + GBsum_c) / (2n), X_j -= (g_j Asum_c + GAsum_c) / (2n)
  const Classes c = classes_of(labels, B);
  const at::Tensor Bsum = class_sums<T>(Bn, c, nullptr), GBsum = class_sums<T>(Bn, c, gp);
  const at::Tensor Asum = class_sums<T>(A, c, nullptr), GAsum = class_sums<T>(A, c, gp);
  {
    T* yp = Y.template data_ptr<T>();
    T* xp = X.template data_ptr<T>();
    const T *bs = Bsum.template data_ptr<T>(), *gbs = GBsum.template data_ptr<T>(), *as = Asum.template data_ptr<T>(),
            *gas = GAsum.template data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      const int64_t k = c.cls[i];
      const T inv2n = T(1) / (T(2) * static_cast<T>(c.count[k]));
      for (int64_t j = 0; j < P; ++j) {
        yp[i * P + j] -= (gp[i] * bs[k * P + j] + gbs[k * P + j]) * inv2n;
        xp[i * P + j] -= (gp[i] * as[k * P + j] + gas[k * P + j]) * inv2n;
      }
    }
  }
  const at::Tensor grad_s = (Y * A).sum().to(st);
  at::Tensor dA = Y * s, dB = X * s;
  if (normalize) {
    dA = normalize_backward<T>(dA, A, na);
    dB = normalize_backward<T>(dB, Bn, nb);
  }
  return {dA.to(a.scalar_type()).contiguous(), dB.to(b.scalar_type()).contiguous(), grad_s};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_fwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                        const at::Tensor& logit_scale,
                                                                        const c10::optional<at::Tensor>& labels,
                                                                        bool normalize) {
  check_inputs(a, b, logit_scale);
  // detached views: at::parallel_for workers do not inherit the caller's below-autograd dispatch state
  const at::Tensor a_ = a.detach(), b_ = b.detach(), s_ = logit_scale.detach();
  if (acc_type({&a, &b}) == at::kDouble) return fwd_impl<double>(a_, b_, s_, labels, normalize);
  return fwd_impl<float>(a_, b_, s_, labels, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b, const at::Tensor& logit_scale,
    const c10::optional<at::Tensor>& labels, bool normalize, const at::Tensor& row_lse, const at::Tensor& col_lse) {
  check_inputs(a, b, logit_scale);
  const at::Tensor a_ = a.detach(), b_ = b.detach(), s_ = logit_scale.detach(), g_ = grad_loss.detach();
  if (acc_type({&a, &b}) == at::kDouble)
    return bwd_impl<double>(g_, a_, b_, s_, labels, normalize, row_lse.detach(), col_lse.detach());
  return bwd_impl<float>(g_, a_, b_, s_, labels, normalize, row_lse.detach(), col_lse.detach());
}

}  // namespace
}  // namespace cpu
}  // namespace dre

TORCH_LIBRARY_IMPL(dre, CPU, m) {
  m.impl("contrastive_loss_fwd", &dre::cpu::contrastive_loss_fwd_cpu);
  m.impl("contrastive_loss_bwd", &dre::cpu::contrastive_loss_bwd_cpu);
}
