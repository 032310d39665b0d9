"""The `dre` torch.library operators behind the kernel backends, and their fake kernels and autograd.

Every kernel backend (native, triton, cupy) implements the same six low-level operators. Their schemas are
written once, in SCHEMAS below; csrc/ops.cpp declares the native ones with identical text (a test compares them),
and the Python backends (triton, cupy) define theirs from SCHEMAS under a prefix:

    dre::residual_encode_fwd          native (C++ on CPU, CUDA on GPU; schema in csrc/ops.cpp)
    dre::triton_residual_encode_fwd   triton
    dre::cupy_residual_encode_fwd     cupy

Contract every implementation meets (shapes: B slides, M fresh rows, K codewords, D width, P embedding width):

- residual_encode_fwd(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard) -> (E, mass)
  E (B, K, D) in promote_types(x.dtype, codewords.dtype); mass (B, K) float32. Formulas in SPEC.md.
- residual_encode_bwd(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass, hard,
  need_grad_x, need_grad_codewords, need_grad_scale)
  -> (grad_x (M, D) x.dtype, grad_codewords (K, D) codewords.dtype, grad_scale (K,) scale.dtype or codewords.dtype
  when scale is None); a gradient not needed may be returned as zeros without being computed. Bank rows get no
  gradient. The backward recomputes the assignments; nothing of the forward is saved but its inputs and, for hard
  assignment, its mass (B, K): then grad_c = -sum_b mass_bk G_bk needs no pass over the bank rows at all
  (mass is None for soft assignment, and may be None for hard, in which case the bank rows are re-assigned).
- contrastive_loss_fwd(a, b, logit_scale, labels, normalize) -> (loss, row_lse, col_lse, row_loss, col_loss), each
  (B,) in the loss dtype: float32, or float64 when a or b is float64. logit_scale is a 0-dim tensor of the loss
  dtype; normalize uses F.normalize's epsilon: â = a / max(||a||, 1e-12). row_lse/col_lse: the log-sum-exp of each
  row and column of the logits; row_loss/col_loss: SPEC's r and c; loss = (r + c) / 2. Where a row's only positive
  is its diagonal (n_i = 1: labels=None, or a label of its own), r_i = log(1 + sum_{j != i} exp(l_ij - l_ii)) is
  computed from the off-diagonal log-sum-exp, so that it keeps its relative precision as r_i -> 0 (R_i - l_ii
  would lose it to ulp(R_i)); the same for c_j. The last four are saved for the backward.
- contrastive_loss_bwd(grad_loss, a, b, logit_scale, labels, normalize, row_lse, col_lse, row_loss, col_loss)
  -> (grad_a a.dtype, grad_b b.dtype, grad_logit_scale 0-dim in the loss dtype). Where n_i = 1, the diagonal's
  p_ii - 1 is taken as expm1(-r_i) (and q_ii - 1 as expm1(-c_i)), not as exp(l_ii - R_i) - 1: that difference
  cancels to an absolute error of ulp(R_i) in a row whose loss is small, which is then the row's whole gradient.
- bank_gather(bank, index) -> (n, D) bank.dtype.
- bank_update_(bank, index, values, momentum, normalize) -> (), bank updated in place.
The Python wrappers have checked every argument's type and shape before these run (SPEC.md 'Bad input'); the
values of offsets and indices each implementation checks itself, before any kernel (_checks.check_values).
"""

from __future__ import annotations

import torch

from dre_kernels import _backend

SCHEMAS: dict[str, str] = {
    "residual_encode_fwd": (
        "(Tensor x, Tensor x_offsets, Tensor codewords, Tensor? scale, Tensor? bank, Tensor? bank_index, "
        "Tensor? bank_offsets, bool hard) -> (Tensor, Tensor)"),
    "residual_encode_bwd": (
        "(Tensor grad_E, Tensor x, Tensor x_offsets, Tensor codewords, Tensor? scale, Tensor? bank, "
        "Tensor? bank_index, Tensor? bank_offsets, Tensor? mass, bool hard, bool need_grad_x, "
        "bool need_grad_codewords, bool need_grad_scale) -> (Tensor, Tensor, Tensor)"),
    "contrastive_loss_fwd": (
        "(Tensor a, Tensor b, Tensor logit_scale, Tensor? labels, bool normalize) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "contrastive_loss_bwd": (
        "(Tensor grad_loss, Tensor a, Tensor b, Tensor logit_scale, Tensor? labels, bool normalize, "
        "Tensor row_lse, Tensor col_lse, Tensor row_loss, Tensor col_loss) -> (Tensor, Tensor, Tensor)"),
    "bank_gather": "(Tensor bank, Tensor index) -> Tensor",
    "bank_update_": "(Tensor(a!) bank, Tensor index, Tensor values, float momentum, bool normalize) -> ()",
}

# Where each kernel backend's operators live: backend -> name prefix in the `dre` namespace.
PREFIXES = {"native": "", "triton": "triton_", "cupy": "cupy_"}

_LIB = torch.library.Library("dre", "FRAGMENT")  # noqa: TOR901 - Python-defined ops and fake/autograd registrations

native_error: str | None = None
try:
    from dre_kernels import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except (ImportError, OSError) as e:  # not built, or built against another torch
    native_error = f"{type(e).__name__}: {e}"


def qualname(backend: str, op: str) -> str:
    return f"dre::{PREFIXES[backend]}{op}"


def _op(backend: str, op: str):
    return getattr(torch.ops.dre, PREFIXES[backend] + op).default


# ---------------------------------------------------------------------------------------------- fake kernels
def _residual_encode_fwd_fake(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard):
    B = x_offsets.shape[0] - 1
    K, D = codewords.shape
    out_dtype = torch.promote_types(x.dtype, codewords.dtype)
    return x.new_empty((B, K, D), dtype=out_dtype), x.new_empty((B, K), dtype=torch.float32)


def _residual_encode_bwd_fake(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass, hard,
                              need_grad_x, need_grad_codewords, need_grad_scale):
    scale_dtype = scale.dtype if scale is not None else codewords.dtype
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(codewords, memory_format=torch.contiguous_format),
            codewords.new_empty((codewords.shape[0],), dtype=scale_dtype))


def loss_dtype(a, b) -> torch.dtype:
    """float64 when a or b is float64 (so gradcheck can run), else float32."""
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _contrastive_loss_fwd_fake(a, b, logit_scale, labels, normalize):
    B = a.shape[0]
    return tuple(a.new_empty((B,), dtype=loss_dtype(a, b)) for _ in range(5))


def _contrastive_loss_bwd_fake(grad_loss, a, b, logit_scale, labels, normalize, row_lse, col_lse, row_loss,
                               col_loss):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format),
            a.new_empty((), dtype=loss_dtype(a, b)))


def _bank_gather_fake(bank, index):
    return bank.new_empty((index.shape[0], bank.shape[1]))


def _bank_update_fake(bank, index, values, momentum, normalize):
    return None


_FAKES = {
    "residual_encode_fwd": _residual_encode_fwd_fake,
    "residual_encode_bwd": _residual_encode_bwd_fake,
    "contrastive_loss_fwd": _contrastive_loss_fwd_fake,
    "contrastive_loss_bwd": _contrastive_loss_bwd_fake,
    "bank_gather": _bank_gather_fake,
    "bank_update_": _bank_update_fake,
}


# ---------------------------------------------------------------------------------------------- autograd
def _make_autograd(backend: str):
    def residual_encode_setup(ctx, inputs, output):
        x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard = inputs
        if hard:
            # the forward's mass carries all the backward needs of the bank rows: the bank is not kept, so it may
            # be updated in place (bank_update_) between forward and backward
            ctx.save_for_backward(x, x_offsets, codewords, scale, None, None, None, output[1])
        else:
            ctx.save_for_backward(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, None)
        ctx.hard = hard
        ctx.mark_non_differentiable(output[1])
        # grads of unused outputs (mass, always) reach the backward as None, not as zeros filled for nothing
        ctx.set_materialize_grads(False)

    def residual_encode_backward(ctx, grad_E, grad_mass):
        x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass = ctx.saved_tensors
        need_x, _, need_c, need_s = ctx.needs_input_grad[:4]
        if grad_E is None or not (need_x or need_c or need_s):
            return (None,) * 8
        grad_x, grad_c, grad_s = _op(backend, "residual_encode_bwd")(
            grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass, ctx.hard,
            bool(need_x), bool(need_c), bool(need_s and not ctx.hard))
        return (grad_x if need_x else None, None, grad_c if need_c else None,
                grad_s if need_s else None, None, None, None, None)

    def contrastive_setup(ctx, inputs, output):
        a, b, logit_scale, labels, normalize = inputs
        _, row_lse, col_lse, row_loss, col_loss = output
        ctx.save_for_backward(a, b, logit_scale, labels, row_lse, col_lse, row_loss, col_loss)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(row_lse, col_lse, row_loss, col_loss)
        ctx.set_materialize_grads(False)  # as residual_encode's: four (B,) zero fills fewer per backward

    def contrastive_backward(ctx, grad_loss, *_grad_saved):
        a, b, logit_scale, labels, row_lse, col_lse, row_loss, col_loss = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 5
        grad_a, grad_b, grad_s = _op(backend, "contrastive_loss_bwd")(
            grad_loss, a, b, logit_scale, labels, ctx.normalize, row_lse, col_lse, row_loss, col_loss)
        need = ctx.needs_input_grad
        return (grad_a if need[0] else None, grad_b if need[1] else None, grad_s if need[2] else None, None, None)

    def gather_setup(ctx, inputs, output):
        bank, index = inputs
        ctx.save_for_backward(index)
        ctx.bank_shape, ctx.bank_dtype = bank.shape, bank.dtype

    def gather_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        # bank_gather is a plain index_select, so its adjoint is a scatter-add (duplicates accumulate).
        grad_bank = grad.new_zeros(ctx.bank_shape, dtype=torch.float32).index_add_(0, index.long(), grad.float())
        return grad_bank.to(ctx.bank_dtype), None

    return {
        "residual_encode_fwd": (residual_encode_backward, residual_encode_setup),
        "contrastive_loss_fwd": (contrastive_backward, contrastive_setup),
        "bank_gather": (gather_backward, gather_setup),
    }


def _register_meta(backend: str) -> None:
    for op, fake in _FAKES.items():
        torch.library.register_fake(qualname(backend, op), fake, lib=_LIB)
    for op, (backward, setup) in _make_autograd(backend).items():
        torch.library.register_autograd(qualname(backend, op), backward, setup_context=setup, lib=_LIB)
    for op in SCHEMAS:
        _backend.register_kernel(backend, op, _op(backend, op))


def define_python_backend(backend: str, impls: dict, dispatch_keys=("CUDA", "CPU"), prefix: str | None = None) -> None:
    """Define the operators of a Python-implemented kernel backend (triton, cupy) from SCHEMAS.

    impls: op name -> Python implementation, for every op of SCHEMAS. The implementations run under
    torch.library, so opcheck and torch.compile see them as opaque operators with the fake kernels above.
    """
    if prefix is not None:
        PREFIXES[backend] = prefix
    missing = set(SCHEMAS) - set(impls)
    if missing:
        raise ValueError(f"backend {backend!r} lacks implementations of {sorted(missing)}")
    for op, schema in SCHEMAS.items():
        name = qualname(backend, op)
        torch.library.define(name, schema, lib=_LIB)
        for key in dispatch_keys:
            torch.library.impl(name, key, impls[op], lib=_LIB)
    _register_meta(backend)


def _native_has_schemas() -> bool:
    return all(hasattr(torch.ops.dre, op) for op in SCHEMAS)


if native_error is None:
    if _native_has_schemas():
        _register_meta("native")
    else:  # pragma: no cover - a stale build
        native_error = "dre_kernels._C loaded but does not define the dre operators (rebuild it)"
