"""The `triton` backend: Triton kernels for the six `dre` operators, registered as dre::triton_*.

Modules: residual_encode (fused distance / assignment / aggregation, forward and recomputing backward),
contrastive_loss (one-pass row and column log-sum-exp, recomputing backward), bank (gather and the fused momentum
update). On CPU tensors the kernels run only under TRITON_INTERPRET=1 (tests); autotuning is bypassed there.
"""

from dre_kernels import _library
from dre_kernels.triton_kernels import bank, contrastive_loss, residual_encode

def _residual_encode_bwd(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass, hard,
                         need_grad_x, need_grad_codewords, need_grad_scale):
    return residual_encode.residual_encode_bwd(grad_E, x, x_offsets, codewords, scale, bank, bank_index,
                                               bank_offsets, hard, need_grad_x, need_grad_codewords,
                                               need_grad_scale, mass=mass)


IMPLS = {
    "residual_encode_fwd": residual_encode.residual_encode_fwd,
    "residual_encode_bwd": _residual_encode_bwd,
    "contrastive_loss_fwd": contrastive_loss.contrastive_loss_fwd,
    "contrastive_loss_bwd": contrastive_loss.contrastive_loss_bwd,
    "bank_gather": bank.bank_gather,
    "bank_update_": bank.bank_update_,
}

_library.define_python_backend("triton", IMPLS)
