"""The value checks of the native ops in C++ (csrc/value_checks.h), run here on the CPU impls.

They stand between a bad offset or index and the kernels when the Python wrappers' checks are skipped (under
torch.compile, or an op called directly), raise the wrappers' errors, and remember what passed in a cache of their
own (on CUDA that saves the device synchronisation of a repeated call: tests/test_cuda.py checks that on a GPU).
The cache must never vouch for a tensor changed in place, a new tensor, another bound or another kind of check.
"""

import gc
import re
import threading

import pytest
import torch

import dre_kernels
from conftest import value_check_inputs

pytestmark = pytest.mark.skipif("native" not in dre_kernels.available_backends("cpu"),
                                reason="native extension not built")

ops = torch.ops.dre




def fwd(a, hard=False):
    return ops.residual_encode_fwd(a["x"], a["x_offsets"], a["codewords"], a["scale"], a["bank"], a["bank_index"],
                                   a["bank_offsets"], hard)


def wrapper_error(a):
    with pytest.raises((ValueError, IndexError)) as info:
        dre_kernels.residual_encode(a["x"], a["x_offsets"], a["codewords"], a["scale"], bank=a["bank"],
                                    bank_index=a["bank_index"], bank_offsets=a["bank_offsets"], backend="torch")
    return info.type, str(info.value)


RE_BAD = [
    dict(bank_index=torch.tensor([0, 6, 1])),
    dict(bank_index=torch.tensor([0, -1, 1])),
    dict(bank_offsets=torch.tensor([0, 1, 2])),
    dict(bank_offsets=torch.tensor([0, 2, 1])),
    dict(x_offsets=torch.tensor([1, 2, 5])),
    dict(x_offsets=torch.tensor([0, 6, 5])),
    dict(x_offsets=torch.tensor([0, 2, 4])),
]


@pytest.mark.parametrize("over", RE_BAD, ids=lambda o: "-".join(f"{k}={v.tolist()}" for k, v in o.items()))
def test_op_raises_the_wrappers_error(over):
    a = value_check_inputs(**over)
    exc, message = wrapper_error(a)
    with pytest.raises(exc, match=re.escape(message)):
        fwd(a)
    grad_E = torch.randn(2, 3, 4)
    with pytest.raises(exc, match=re.escape(message)):  # the backward op checks the same
        ops.residual_encode_bwd(grad_E, a["x"], a["x_offsets"], a["codewords"], a["scale"], a["bank"],
                                a["bank_index"], a["bank_offsets"], None, False, True, True, True)


@pytest.mark.parametrize("index, exc, wrapper_message", [
    (torch.tensor([1, 6, 2]), IndexError, "index holds 6, out of range for bank with 6 rows (valid: 0 to 5)"),
    (torch.tensor([-2, 0]), IndexError, "index holds -2"),
    (torch.tensor([1, 5, 1]), ValueError, "index must not repeat an index (a row would be written twice); it does"),
])
def test_bank_ops_raise_the_wrappers_error(index, exc, wrapper_message):
    bank = torch.randn(6, 4)
    before = bank.clone()
    with pytest.raises(exc, match=re.escape(wrapper_message)):
        dre_kernels.bank_update_(bank, index, torch.randn(len(index), 4), momentum=0.5, backend="torch")
    with pytest.raises(exc, match=re.escape(wrapper_message)):
        ops.bank_update_(bank, index, torch.randn(len(index), 4), 0.5, True)
    torch.testing.assert_close(bank, before, rtol=0, atol=0)  # raised before any write
    if exc is IndexError:
        with pytest.raises(exc, match=re.escape(wrapper_message)):
            ops.bank_gather(bank, index)


def test_in_place_change_after_good_call_raises():
    bank, idx = torch.randn(6, 4), torch.tensor([1, 5, 2])
    torch.testing.assert_close(ops.bank_gather(bank, idx), bank[idx])
    idx[1] = 6
    with pytest.raises(IndexError, match=r"index holds 6"):
        ops.bank_gather(bank, idx)
    idx[1] = 5
    ops.bank_gather(bank, idx)
    idx[1:].fill_(-1)  # through a view: the version counter is shared
    with pytest.raises(IndexError, match=r"index holds -1"):
        ops.bank_gather(bank, idx)
    a = value_check_inputs()
    fwd(a)
    a["x_offsets"][1] = 7
    with pytest.raises(ValueError, match=r"x_offsets must be non-decreasing"):
        fwd(a)


def test_cache_keys_on_the_bound_and_the_kind():
    idx = torch.tensor([1, 5, 2])
    ops.bank_gather(torch.randn(6, 4), idx)
    with pytest.raises(IndexError, match=r"out of range for bank with 5 rows"):
        ops.bank_gather(torch.randn(5, 4), idx)  # same index, smaller bank
    dup = torch.tensor([1, 1])
    ops.bank_gather(torch.randn(6, 4), dup)  # in range: remembered, but not as free of repeats
    with pytest.raises(ValueError, match=r"must not repeat"):
        ops.bank_update_(torch.randn(6, 4), dup, torch.randn(2, 4), 0.5, True)
    off = torch.tensor([0, 1, 3])
    a = value_check_inputs(bank_offsets=off)
    fwd(a)
    # passing as bank_offsets (ending at the 3 rows of bank_index) says nothing of them as x_offsets of a 5-row x
    with pytest.raises(ValueError, match=r"x_offsets\[-1\]"):
        ops.residual_encode_fwd(a["x"], off, a["codewords"], a["scale"], None, None, None, False)
    with pytest.raises(IndexError, match=r"bank_index holds 5"):  # and a's bank_index against a 5-row bank
        ops.residual_encode_fwd(a["x"], a["x_offsets"], a["codewords"], a["scale"], torch.randn(5, 4),
                                a["bank_index"], a["bank_offsets"], False)


def test_freed_tensor_does_not_vouch_for_a_new_one():
    bank = torch.randn(6, 4)
    for _ in range(20):  # the allocator hands out the freed memory again at once; the TensorImpl must differ
        good = torch.tensor([1, 2, 3])
        ops.bank_gather(bank, good)
        del good
        gc.collect()
        with pytest.raises(IndexError, match=r"index holds 7"):
            ops.bank_gather(bank, torch.tensor([1, 7, 3]))


def test_inference_tensors_are_checked_every_time():
    bank = torch.randn(6, 4)
    with torch.inference_mode():
        idx = torch.tensor([1, 2])
        ops.bank_gather(bank, idx)
        idx[1] = 9  # inference tensors have no version counter: nothing may be cached for them
        with pytest.raises(IndexError, match=r"index holds 9"):
            ops.bank_gather(bank, idx)


def test_a_cached_verdict_is_used():
    """The cache does skip checks: a write that bypasses the version counter (here through numpy, the documented
    blind spot, as for autograd's saved tensors) is not seen by the second call. A duplicate is harmless here
    (two writes of one row on CPU); the same call with a new tensor is checked and refused."""
    bank = torch.randn(6, 4)
    idx = torch.tensor([1, 2])
    ops.bank_update_(bank, idx, torch.randn(2, 4), 0.5, True)
    idx.numpy()[1] = 1
    ops.bank_update_(bank, idx, torch.randn(2, 4), 0.5, True)  # vouched for by the cache
    with pytest.raises(ValueError, match=r"must not repeat"):
        ops.bank_update_(bank, idx.clone(), torch.randn(2, 4), 0.5, True)


def test_compiled_native_bad_index_raises():
    """Under torch.compile the wrappers' checks are skipped; the C++ checks raise the same error at run time."""
    def gather2(bank, index):
        return dre_kernels.bank_gather(bank, index, backend="native") * 2.0

    bank = torch.randn(6, 4)
    f = torch.compile(gather2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(bank, torch.tensor([1, 5, 2])), bank[[1, 5, 2]] * 2.0)
    with pytest.raises(IndexError, match=r"index holds 6, out of range for bank with 6 rows"):
        f(bank, torch.tensor([1, 6, 2]))


def test_cache_is_shared_across_threads():
    """On CUDA the backward ops run in autograd's device thread: what the forward's thread verified must count
    there too (seen through the numpy blind spot of test_a_cached_verdict_is_used, from another thread)."""
    bank = torch.randn(6, 4)
    idx = torch.tensor([1, 2])
    ops.bank_update_(bank, idx, torch.randn(2, 4), 0.5, True)
    idx.numpy()[1] = 1
    errors = []

    def other():
        try:
            ops.bank_update_(bank, idx, torch.randn(2, 4), 0.5, True)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert not errors
