// contrastive_loss_fwd's last step on CPU, and the forward's output type (the CUDA kernels do this arithmetic in
// dre_cl_finish, the Triton ones in _cl_finish_kernel; the Python twin is
// dre_kernels.contrastive_loss.contrastive_loss_finish): from the off-diagonal
// log-sum-exps O (rows), O' (columns), the diagonal logits d, the positive sums and |P_i|,
//   row_lse = logaddexp(O, d),  r = log(1 + exp(O - d)) where |P_i| = 1, else row_lse - pos_row / |P_i|  (c alike),
// returning (loss = (r + c) / 2, row_lse, col_lse, r, c), in the inputs' dtype.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dre {

using ContrastiveFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline ContrastiveFwdOut contrastive_loss_finish(const at::Tensor& off_row, const at::Tensor& off_col,
                                                 const at::Tensor& diag, const at::Tensor& pos_row,
                                                 const at::Tensor& pos_col, const at::Tensor& npos) {
  const at::Tensor zero = at::zeros_like(diag), single = npos == 1;
  const at::Tensor row_lse = at::logaddexp(off_row, diag), col_lse = at::logaddexp(off_col, diag);
  const at::Tensor r = at::where(single, at::logaddexp(off_row - diag, zero), row_lse - pos_row / npos);
  const at::Tensor c = at::where(single, at::logaddexp(off_col - diag, zero), col_lse - pos_col / npos);
  return {(r + c) * 0.5, row_lse, col_lse, r, c};
}

}  // namespace dre
