"""The value checks of the Python kernel backends at run time (dre_kernels._checks.ensure_checked).

The value checks (offsets, index ranges, duplicate indices) run in the impls of the kernel backends, eager or
compiled (the wrappers run them for `reference` and `torch` only, and skip them under torch.compile), so a bad index
raises the wrapper's error instead of reaching a kernel, and an eager call on new tensors synchronises once. A small
cache spares the backward and repeated calls on unchanged tensors a second synchronisation; it must never vouch for
a tensor changed in place, a different tensor, or another bound.

Triton runs here under TRITON_INTERPRET=1 (conftest.py); cupy's impls are called directly with a no-op kernel
runtime, since their checks run before any launch.
"""

import gc

import pytest
import torch

import dre_kernels
from conftest import value_check_inputs
from dre_kernels import _checks, _library, cupy_kernels

pytestmark = pytest.mark.skipif("triton" not in dre_kernels.available_backends("cpu"),
                                reason="triton backend not available on CPU (needs TRITON_INTERPRET=1)")


@pytest.fixture(autouse=True)
def fresh_cache():
    _checks.clear_checked_cache()
    yield
    _checks.clear_checked_cache()


@pytest.fixture
def syncs(monkeypatch):
    """Counts the value checks' device synchronisations (their one tensor-to-list call each)."""
    calls = []
    orig = _checks._to_host

    def counting(t):
        calls.append(torch.compiler.is_compiling())
        return orig(t)

    monkeypatch.setattr(_checks, "_to_host", counting)
    return calls




def encode(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, backend="triton"):
    return dre_kernels.residual_encode(x, x_offsets, codewords, scale, bank=bank, bank_index=bank_index,
                                       bank_offsets=bank_offsets, backend=backend)


def gather2(bank, index):
    return dre_kernels.bank_gather(bank, index, backend="triton") * 2.0


def update(bank, index, values):
    dre_kernels.bank_update_(bank, index, values, momentum=0.5, normalize=True, backend="triton")
    return bank.sum()


def compiled(fn, backend="aot_eager"):
    return torch.compile(fn, fullgraph=True, backend=backend)


# ------------------------------------------------------------------------------------ (1) bad input under compile
RE_BAD = [
    ("bank_index_high", dict(bank_index=torch.tensor([0, 6, 1])), IndexError, r"bank_index holds 6"),
    ("bank_index_negative", dict(bank_index=torch.tensor([0, -1, 1])), IndexError, r"bank_index holds -1"),
    ("bank_offsets_end", dict(bank_offsets=torch.tensor([0, 1, 2])), ValueError, r"bank_offsets\[-1\]"),
    ("x_offsets_start", dict(x_offsets=torch.tensor([1, 2, 5])), ValueError, r"x_offsets\[0\] must be 0"),
    ("x_offsets_decrease", dict(x_offsets=torch.tensor([0, 6, 5])), ValueError, r"x_offsets must be non-decreasing"),
    ("x_offsets_end", dict(x_offsets=torch.tensor([0, 2, 4])), ValueError, r"x_offsets\[-1\]"),
]


@pytest.mark.parametrize("case", RE_BAD, ids=[c[0] for c in RE_BAD])
def test_compiled_residual_encode_bad_input_raises(case, syncs):
    _, over, exc, pattern = case
    f = compiled(encode)
    good = value_check_inputs()
    f(**good)  # compiles on good input; the bad one below reuses the graph (same shapes)
    with pytest.raises(exc, match=pattern):
        f(**value_check_inputs(**over))
    # the error came from the impl's check at run time, not from tracing
    assert syncs and not any(syncs)


@pytest.mark.parametrize("case", RE_BAD[:3], ids=[c[0] for c in RE_BAD[:3]])
def test_backward_op_checks(case):
    """The backward op checks too (autograd's version check guards saved tensors; the op itself must not trust
    its caller)."""
    _, over, exc, pattern = case
    a = value_check_inputs(**over)
    grad_E = torch.randn(2, 3, 4)
    with pytest.raises(exc, match=pattern):
        torch.ops.dre.triton_residual_encode_bwd(grad_E, a["x"], a["x_offsets"], a["codewords"], a["scale"],
                                                 a["bank"], a["bank_index"], a["bank_offsets"], None, False,
                                                 True, True, True)


def test_compiled_bank_gather_bad_index_raises_inductor():
    bank = torch.randn(6, 4)
    f = compiled(gather2, backend="inductor")
    torch.testing.assert_close(f(bank, torch.tensor([1, 5, 2])), bank[[1, 5, 2]] * 2.0)
    with pytest.raises(IndexError, match=r"index holds 6, out of range for bank with 6 rows"):
        f(bank, torch.tensor([1, 6, 2]))
    with pytest.raises(IndexError, match=r"index holds -3"):
        f(bank, torch.tensor([-3, 0, 2]))


@pytest.mark.parametrize("index, exc, pattern", [
    (torch.tensor([1, 6, 2]), IndexError, r"index holds 6"),
    (torch.tensor([1, 5, 1]), ValueError, r"index must not repeat"),
], ids=["out_of_range", "duplicate"])
def test_compiled_bank_update_bad_index_raises(index, exc, pattern):
    bank = torch.randn(6, 4)
    before = bank.clone()
    f = compiled(update)
    with pytest.raises(exc, match=pattern):
        f(bank, index, torch.randn(3, 4))
    torch.testing.assert_close(bank, before, rtol=0, atol=0)  # raised before any write


# ------------------------------------------------------------------------------------ (2) one sync per eager call
def test_eager_calls_synchronise_once(syncs):
    a = value_check_inputs()
    a["x"].requires_grad_()
    E = encode(**a)
    assert len(syncs) == 1
    E.sum().backward()  # the backward op's check finds the same tensors, unchanged
    assert len(syncs) == 1
    syncs.clear()
    bank, idx = torch.randn(6, 4), torch.tensor([3, 0, 5])
    dre_kernels.bank_gather(bank, idx, backend="triton")
    assert len(syncs) == 1
    syncs.clear()
    dre_kernels.bank_update_(bank, idx, torch.randn(3, 4), momentum=0.5, backend="triton")
    assert len(syncs) == 1  # the gather's verdict does not cover the update's duplicate check: one fresh sync
    assert not any(syncs)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_values_are_checked_on_one_side(monkeypatch, syncs, backend):
    """The wrappers check values for `reference` and `torch` only; a kernel backend's impl checks them (native: in
    C++, no Python synchronisation at all), so an eager call on new tensors synchronises once, not twice."""
    if backend not in dre_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} not available here")
    wrapper_checks = []
    orig = _checks.check_offsets_and_indices
    monkeypatch.setattr(_checks, "check_offsets_and_indices",
                        lambda *args: (wrapper_checks.append(args), orig(*args))[1])
    kernel = backend in _library.PREFIXES
    a = value_check_inputs()
    encode(**a, backend=backend)
    bank, idx = torch.randn(6, 4), torch.tensor([3, 0, 5])
    dre_kernels.bank_gather(bank, idx, backend=backend)
    dre_kernels.bank_update_(bank, torch.tensor([1, 2]), torch.randn(2, 4), momentum=0.5, backend=backend)
    assert len(wrapper_checks) == (0 if kernel else 3)
    assert len(syncs) == (0 if backend == "native" else 3)
    # and bad values still raise the wrappers' errors before any kernel
    for over, exc, pattern in [(dict(bank_index=torch.tensor([0, 6, 1])), IndexError, r"bank_index holds 6"),
                               (dict(x_offsets=torch.tensor([0, 6, 5])), ValueError, r"x_offsets must be non-decr")]:
        with pytest.raises(exc, match=pattern):
            encode(**value_check_inputs(**over), backend=backend)
    before = bank.clone()
    with pytest.raises(ValueError, match=r"index must not repeat an index"):
        dre_kernels.bank_update_(bank, torch.tensor([1, 1]), torch.randn(2, 4), momentum=0.5, backend=backend)
    torch.testing.assert_close(bank, before, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_repeated_eager_calls_do_not_synchronise(syncs, backend):
    """The cache, wherever the checks run: a call on unchanged tensors (forward and backward) checks nothing again;
    an in-place change is checked again, and refused when bad."""
    a = value_check_inputs()
    a["x"].requires_grad_()
    encode(**a, backend=backend).sum().backward()
    encode(**a, backend=backend).sum().backward()
    assert len(syncs) == 1
    a["bank_index"][0] = 4
    encode(**a, backend=backend)
    assert len(syncs) == 2
    a["bank_index"][0] = 6
    with pytest.raises(IndexError, match=r"bank_index holds 6"):
        encode(**a, backend=backend)


def test_backward_in_another_thread_finds_the_forwards_checks(syncs):
    """On CUDA autograd runs the backward ops in its device thread: the cache is process-wide."""
    import threading

    a = value_check_inputs()
    a["x"].requires_grad_()
    E = encode(**a)
    assert len(syncs) == 1
    t = threading.Thread(target=lambda: E.sum().backward())
    t.start()
    t.join()
    assert a["x"].grad is not None and len(syncs) == 1


def test_cupy_impls_share_the_checks_and_the_cache(syncs):
    """cupy impls share the checks and the cache (called directly: no CUDA here; kernels go to a no-op runtime)."""
    launches = []

    class NoRuntime:
        def launch(self, name, grid, smem, device, args):
            launches.append(name)

    prev = cupy_kernels.set_runtime(NoRuntime())
    try:
        bank, idx = torch.randn(6, 4), torch.tensor([3, 0, 5])
        cupy_kernels.bank_update_(bank, idx, torch.randn(3, 4), 0.5, True)
        cupy_kernels.bank_gather(bank, idx)  # the update's verdict on idx covers the gather's range check
        assert len(syncs) == 1 and launches == ["dre_bank_update", "dre_bank_gather"]
        with pytest.raises(IndexError, match=r"index holds 6"):
            cupy_kernels.bank_gather(bank, torch.tensor([6]))
        with pytest.raises(ValueError, match=r"index must not repeat"):
            cupy_kernels.bank_update_(bank, torch.tensor([2, 2]), torch.randn(2, 4), 0.5, True)
        a = value_check_inputs(bank_index=torch.tensor([0, 9, 1]))
        with pytest.raises(IndexError, match=r"bank_index holds 9"):
            cupy_kernels.residual_encode_fwd(a["x"], a["x_offsets"], a["codewords"], a["scale"], a["bank"],
                                             a["bank_index"], a["bank_offsets"], False)
        assert launches == ["dre_bank_update", "dre_bank_gather"]
    finally:
        cupy_kernels.set_runtime(prev)


# ------------------------------------------------------------------------------------ (3) the cache is sound
def test_in_place_change_after_good_call_raises():
    bank, idx = torch.randn(6, 4), torch.tensor([1, 5, 2])
    f = compiled(gather2)
    dre_kernels.bank_gather(bank, idx, backend="triton")  # eager: checked and remembered
    f(bank, idx)
    idx[1] = 6
    with pytest.raises(IndexError, match=r"index holds 6"):
        f(bank, idx)
    idx[1] = 5
    f(bank, idx)
    idx[1:].fill_(-1)  # through a view: the version counter is shared
    with pytest.raises(IndexError, match=r"index holds -1"):
        f(bank, idx)
    with pytest.raises(IndexError, match=r"index holds -1"):
        torch.ops.dre.triton_bank_gather(bank, idx)  # the op itself, without any wrapper


def test_cache_keys_on_the_bound_and_the_kind():
    idx = torch.tensor([1, 5, 2])
    dre_kernels.bank_gather(torch.randn(6, 4), idx, backend="triton")
    with pytest.raises(IndexError, match=r"out of range for bank with 5 rows"):
        torch.ops.dre.triton_bank_gather(torch.randn(5, 4), idx)  # same index, smaller bank
    dup = torch.tensor([1, 1])
    torch.ops.dre.triton_bank_gather(torch.randn(6, 4), dup)  # in range: remembered, but not as unique
    with pytest.raises(ValueError, match=r"must not repeat"):
        torch.ops.dre.triton_bank_update_(torch.randn(6, 4), dup, torch.randn(2, 4), 0.5, True)
    off = torch.tensor([0, 1, 3])
    a = value_check_inputs(bank_offsets=off)
    encode(**a)
    # checked as bank_offsets (ending at 3 rows of bank_index) says nothing of them as x_offsets of a 5-row x
    with pytest.raises(ValueError, match=r"x_offsets\[-1\]"):
        torch.ops.dre.triton_residual_encode_fwd(a["x"], off, a["codewords"], a["scale"], None, None, None, False)


def test_freed_tensor_does_not_vouch_for_a_new_one():
    bank = torch.randn(6, 4)
    for _ in range(20):  # try to get a new tensor at the freed one's id (CPython reuses the memory at once)
        good = torch.tensor([1, 2, 3])
        torch.ops.dre.triton_bank_gather(bank, good)
        old_id = id(good)
        del good
        gc.collect()
        bad = torch.tensor([1, 7, 3])
        with pytest.raises(IndexError, match=r"index holds 7"):
            torch.ops.dre.triton_bank_gather(bank, bad)
        if id(bad) == old_id:
            break


def test_cache_stays_small():
    bank = torch.randn(6, 4)
    keep = [torch.tensor([i % 6]) for i in range(40)]
    for t in keep:
        torch.ops.dre.triton_bank_gather(bank, t)
    assert len(_checks._entries()) <= 16
    assert _checks._cached(keep[-1], ("index", 6)) and not _checks._cached(keep[0], ("index", 6))


def test_inference_tensors_are_checked_every_time(syncs):
    bank = torch.randn(6, 4)
    with torch.inference_mode():
        idx = torch.tensor([1, 2])
        torch.ops.dre.triton_bank_gather(bank, idx)
        torch.ops.dre.triton_bank_gather(bank, idx)
    assert len(syncs) == 2


def test_device_asserts_logic():
    """The checks used during CUDA graph capture, run on CPU (where torch._assert_async raises at once)."""
    bank = torch.randn(6, 4)
    _checks._device_asserts(*_checks._residual_encode_values(torch.randn(5, 4), torch.tensor([0, 2, 5]), bank,
                                                             torch.tensor([0, 5, 1]), torch.tensor([0, 1, 3])))
    _checks._device_asserts(*_checks._bank_values(bank, torch.tensor([3, 0, 5]), unique=True))
    bad = [
        _checks._residual_encode_values(torch.randn(5, 4), torch.tensor([0, 6, 5]), None, None, None),
        _checks._residual_encode_values(torch.randn(5, 4), torch.tensor([1, 2, 5]), None, None, None),
        _checks._residual_encode_values(torch.randn(5, 4), torch.tensor([0, 2, 4]), None, None, None),
        _checks._bank_values(bank, torch.tensor([3, 6]), unique=False),
        _checks._bank_values(bank, torch.tensor([-1, 2]), unique=False),
        _checks._bank_values(bank, torch.tensor([2, 2]), unique=True),
    ]
    for args in bad:
        with pytest.raises(RuntimeError):
            _checks._device_asserts(*args)


# ------------------------------------------------------------------------------------ (4) good compiled calls
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_compiled_residual_encode_matches_reference(hard, syncs):
    a = value_check_inputs()
    if hard:
        a["scale"] = None
    x = a["x"].clone().requires_grad_()
    c = a["codewords"].clone().requires_grad_()
    assignment = "hard" if hard else "soft"

    def step(x, c, backend):
        E = dre_kernels.residual_encode(x, a["x_offsets"], c, a["scale"], assignment=assignment, bank=a["bank"],
                                        bank_index=a["bank_index"], bank_offsets=a["bank_offsets"], backend=backend)
        return (E * E).sum(), E

    loss, E = torch.compile(lambda x, c: step(x, c, "triton"), fullgraph=True, backend="aot_eager")(x, c)
    loss.backward()
    xr = a["x"].clone().requires_grad_()
    cr = a["codewords"].clone().requires_grad_()
    loss_r, E_r = step(xr, cr, "reference")
    loss_r.backward()
    torch.testing.assert_close(E, E_r, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(x.grad, xr.grad, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(c.grad, cr.grad, atol=2e-4, rtol=2e-4)


def test_compiled_bank_update_matches_reference():
    bank = torch.randn(6, 4)
    idx, vals = torch.tensor([4, 0, 2]), torch.randn(3, 4)
    ref = bank.clone()
    compiled(update)(bank, idx, vals)
    dre_kernels.bank_update_(ref, idx, vals, momentum=0.5, normalize=True, backend="reference")
    torch.testing.assert_close(bank, ref, atol=2e-5, rtol=2e-5)
