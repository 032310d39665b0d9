"""Memory-bank ops: gather rows, and the in-place momentum update with L2 normalisation.

    bank_gather(bank, index)[i]  = bank[index_i]
    bank_update_: new_i = momentum * bank[index_i] + (1 - momentum) * values_i   (in float32, float64 for a float64
                  bank), L2-normalised if `normalize` (F.normalize's epsilon), stored in bank.dtype at row index_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dre_kernels import _backend, _checks
from dre_kernels import _library  # noqa: F401


def bank_gather(bank, index, backend="auto"):
    """Rows of the bank: (n, D) in bank.dtype. Gradient, if the bank requires one, scatter-adds back."""
    name = _checks.check_bank_gather(bank, index, backend)
    if name == "reference":
        return bank_gather_reference(bank, index)
    if name == "torch":
        return bank_gather_torch(bank, index)
    return _backend.kernel(name, "bank_gather")(bank, index)


def bank_update_(bank, index, values, *, momentum=0.0, normalize=True, backend="auto"):
    """Writes momentum * bank[index] + (1 - momentum) * values (L2-normalised) into bank[index]; returns bank.

    values is never differentiated through. Duplicate indices raise ValueError, out-of-range ones IndexError.
    """
    name = _checks.check_bank_update(bank, index, values, momentum, normalize, backend)
    values = values.detach()
    with torch.no_grad():
        if name == "reference":
            bank_update_reference_(bank, index, values, float(momentum), normalize)
        elif name == "torch":
            bank_update_torch_(bank, index, values, float(momentum), normalize)
        else:
            _backend.kernel(name, "bank_update_")(bank, index, values, float(momentum), normalize)
    return bank


def _acc(bank):
    return torch.float64 if bank.dtype == torch.float64 else torch.float32


def bank_gather_reference(bank, index):
    return torch.stack([bank[i] for i in index.tolist()]) if index.numel() else bank.new_empty((0, bank.shape[1]))


def bank_gather_torch(bank, index):
    return bank.index_select(0, index)


def bank_update_reference_(bank, index, values, momentum, normalize):
    acc = _acc(bank)
    for i, row in enumerate(index.tolist()):
        new = momentum * bank[row].to(acc) + (1.0 - momentum) * values[i].to(acc)
        if normalize:
            new = new / new.norm().clamp_min(1e-12)
        bank[row] = new.to(bank.dtype)


def bank_update_torch_(bank, index, values, momentum, normalize):
    acc = _acc(bank)
    index = index.long()
    new = torch.lerp(values.to(acc), bank.index_select(0, index).to(acc), momentum)
    if normalize:
        new = F.normalize(new, dim=1, eps=1e-12)
    bank.index_copy_(0, index, new.to(bank.dtype))
