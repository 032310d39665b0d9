// The `dre` operator schemas, in one TORCH_LIBRARY block (pytorch/extension-cpp style).
//
// The CPU implementations are registered by csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(dre, CPU, ...)), the CUDA ones by
// csrc/cuda/*.cpp (TORCH_LIBRARY_IMPL(dre, CUDA, ...)); fake (meta) kernels and autograd are registered from Python
// in dre_kernels/_library.py, whose SCHEMAS dict holds the same text (tests/test_library.py compares them).
// Formulas and the contract of each operator: SPEC.md and the docstring of dre_kernels/_library.py.

#include <torch/library.h>

TORCH_LIBRARY(dre, m) {
  m.def(
      "residual_encode_fwd(Tensor x, Tensor x_offsets, Tensor codewords, Tensor? scale, Tensor? bank, "
      "Tensor? bank_index, Tensor? bank_offsets, bool hard) -> (Tensor, Tensor)");
  m.def(
      "residual_encode_bwd(Tensor grad_E, Tensor x, Tensor x_offsets, Tensor codewords, Tensor? scale, "
      "Tensor? bank, Tensor? bank_index, Tensor? bank_offsets, Tensor? mass, bool hard, bool need_grad_x, "
      "bool need_grad_codewords, bool need_grad_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_fwd(Tensor a, Tensor b, Tensor logit_scale, Tensor? labels, bool normalize) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_loss_bwd(Tensor grad_loss, Tensor a, Tensor b, Tensor logit_scale, Tensor? labels, "
      "bool normalize, Tensor row_lse, Tensor col_lse, Tensor row_loss, Tensor col_loss) -> (Tensor, Tensor, Tensor)");
  m.def("bank_gather(Tensor bank, Tensor index) -> Tensor");
  m.def("bank_update_(Tensor(a!) bank, Tensor index, Tensor values, float momentum, bool normalize) -> ()");
}
