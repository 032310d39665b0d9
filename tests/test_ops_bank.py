"""bank_gather and bank_update_: every backend against `reference`."""

import pytest
import torch

from conftest import assert_close, supports_float64
from dre_kernels import bank_gather, bank_update_

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _bank(T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_matches_reference(backend_device, dtype, index_dtype):
    backend, device = backend_device
    if dtype == torch.float64 and not supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    bank = _bank(23, 13, dtype, device)
    for idx in ([3, 3, 0, 22, 7], [], [5]):
        index = torch.tensor(idx, dtype=index_dtype, device=device)
        got = bank_gather(bank, index, backend=backend)
        want = bank_gather(bank, index, backend="reference")
        assert got.dtype == dtype and got.shape == (len(idx), 13)
        assert torch.equal(got, want)


def test_gather_noncontiguous_bank_and_index(backend_device):
    backend, device = backend_device
    bank = _bank(13, 20, torch.float32, device).t()  # (20, 13), column-major
    index = torch.tensor([0, 9, 4, 19, 4, 2], device=device)[::2]
    assert torch.equal(bank_gather(bank, index, backend=backend), bank[index])


def test_gather_gradient_scatters_back(backend_device):
    backend, device = backend_device
    bank = _bank(6, 4, torch.float32, device).requires_grad_()
    index = torch.tensor([1, 1, 4], device=device)
    out = bank_gather(bank, index, backend=backend)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, bank, g)
    want = torch.zeros(6, 4, device=device)
    want[1] = g[0] + g[1]
    want[4] = g[2]
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_matches_reference(backend_device, dtype, momentum, normalize):
    backend, device = backend_device
    if dtype == torch.float64 and not supports_float64(backend, device):
        pytest.skip(f"{backend} on {device} does not take float64")
    bank = _bank(31, 11, dtype, device)
    index = torch.tensor([30, 0, 7, 12, 5], dtype=torch.int32, device=device)
    values = _bank(5, 11, torch.float32, device, seed=1)  # values in another dtype than the bank
    got, want = bank.clone(), bank.clone()
    out = bank_update_(got, index, values, momentum=momentum, normalize=normalize, backend=backend)
    bank_update_(want, index, values, momentum=momentum, normalize=normalize, backend="reference")
    assert out is got
    untouched = torch.ones(31, dtype=torch.bool, device=device)
    untouched[index.long()] = False
    assert torch.equal(got[untouched], bank[untouched])
    assert_close(got, want, dtype=dtype)
    if normalize:
        norms = got[index.long()].double().norm(dim=1)
        assert_close(norms, torch.ones_like(norms), dtype=dtype)


def test_update_empty_index_and_noncontiguous_values(backend_device):
    backend, device = backend_device
    bank = _bank(8, 6, torch.bfloat16, device)
    before = bank.clone()
    bank_update_(bank, torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, 6, device=device),
                 backend=backend)
    assert torch.equal(bank, before)
    values = _bank(6, 3, torch.float32, device).t()  # (3, 6) strided
    want = bank.clone()
    bank_update_(bank, torch.tensor([2, 5, 0], device=device), values, momentum=0.5, backend=backend)
    bank_update_(want, torch.tensor([2, 5, 0], device=device), values.contiguous(), momentum=0.5, backend="reference")
    assert_close(bank, want, dtype=torch.bfloat16)


def test_update_never_differentiates_values(backend_device):
    backend, device = backend_device
    bank = _bank(5, 3, torch.float32, device)
    values = torch.randn(2, 3, device=device, requires_grad=True)
    bank_update_(bank, torch.tensor([0, 3], device=device), values, backend=backend)
    assert not bank.requires_grad and bank.grad_fn is None
