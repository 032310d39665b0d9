"""The interpreter's bounds check (tests/triton_bounds.py), which conftest.py keeps on for every interpreted launch:
it must catch a kernel stepping past its tensors (loads, stores, atomics; by an element or by a partial element)
and must not flag lanes that are masked off or tensors that are views."""

import pytest
import torch

from conftest import BOUNDS_CHECKED

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(not BOUNDS_CHECKED, reason="the interpreter (TRITON_INTERPRET=1) is not running the "
                                                          "kernels here, or DRE_KERNELS_TRITON_BOUNDS=0")

import triton_bounds  # noqa: E402


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, shift, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    if MASKED:
        tl.store(dst_ptr + i, tl.load(src_ptr + i + shift, mask=mask, other=0.0), mask=mask)
    else:
        tl.store(dst_ptr + i, tl.load(src_ptr + i + shift))


@triton.jit
def _add_kernel(dst_ptr, n, shift, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.atomic_add(dst_ptr + i + shift, tl.full((BLOCK,), 1.0, tl.float32), mask=i < n)


@triton.jit
def _cas_kernel(dst_ptr, at):
    tl.atomic_cas(dst_ptr + at, 0, 1)


def test_the_check_is_on_for_the_session():
    from triton.runtime import interpreter

    assert getattr(interpreter.GridExecutor.__call__, "_bounds_checked", False)


def test_masked_lanes_and_exact_fits_pass():
    src, dst = torch.arange(10, dtype=torch.float32), torch.zeros(10)
    _copy_kernel[(1,)](src, dst, 10, 0, True, 16)
    assert torch.equal(dst, src)
    dst = torch.zeros(16)
    _copy_kernel[(1,)](torch.arange(16.0), dst, 16, 0, False, 16)  # every lane, the last element included
    assert torch.equal(dst, torch.arange(16.0))


@pytest.mark.parametrize("shift", [1, -1])
def test_a_load_one_element_outside_is_caught(shift):
    src, dst = torch.arange(16, dtype=torch.float32), torch.zeros(16)
    first = "64" if shift > 0 else "-4"
    with pytest.raises(Exception, match=rf"_copy_kernel: create_masked_load of 4-byte elements .* {first} from `src_"):
        _copy_kernel[(1,)](src, dst, 16, shift, True, 16)


def test_an_unmasked_load_of_a_short_tensor_is_caught():
    with pytest.raises(Exception, match=r"load .* 6 of 16 active lanes, the first at byte offset 40 from `src_ptr`"):
        _copy_kernel[(1,)](torch.zeros(10), torch.zeros(16), 10, 0, False, 16)


def test_a_store_outside_is_caught():
    with pytest.raises(Exception, match=r"create_masked_store .*`dst_ptr`"):
        _copy_kernel[(1,)](torch.zeros(16), torch.zeros(10), 10, 0, False, 16)


def test_views_bound_the_access_by_their_own_extent():
    """A view's extent is its elements, not its storage: reading the first 16 of a 24-element buffer through a view
    of the last 8 is out of bounds of the launch (its other tensors live elsewhere)."""
    buf = torch.arange(24, dtype=torch.float32)
    dst = torch.zeros(16)
    with pytest.raises(Exception, match="create_masked_load"):
        _copy_kernel[(1,)](buf[16:], dst, 16, -8, False, 16)
    _copy_kernel[(1,)](buf[8:], dst, 16, 0, False, 16)
    assert torch.equal(dst, buf[8:])
    # a strided view (stride 3, 8 elements) spans 22 elements of its buffer: up to its last one, buf[21], and no
    # further (the kernel reads consecutive elements)
    out = torch.zeros(8)
    _copy_kernel[(1,)](buf[::3], out, 8, 14, False, 8)
    assert torch.equal(out, buf[14:22])
    with pytest.raises(Exception, match="create_masked_load .* 1 of 8 active lanes"):
        _copy_kernel[(1,)](buf[::3], out, 8, 15, False, 8)


def test_atomics_outside_are_caught():
    dst = torch.zeros(8)
    _add_kernel[(1,)](dst, 8, 0, 16)  # masked lanes past the end pass
    assert torch.equal(dst, torch.ones(8))
    with pytest.raises(Exception, match=r"create_atomic_rmw .*`dst_ptr`"):
        _add_kernel[(1,)](dst, 8, 1, 16)
    flags = torch.zeros(4, dtype=torch.int32)
    _cas_kernel[(1,)](flags, 3)
    assert flags.tolist() == [0, 0, 0, 1]
    with pytest.raises(Exception, match=r"create_atomic_cas .* byte offset 16 from `dst_ptr` \(a 16-byte extent\)"):
        _cas_kernel[(1,)](flags, 4)


def test_a_launch_without_tensors_in_range_names_what_it_had():
    launch = triton_bounds._Launch("k", [("empty", torch.zeros(0))])
    with pytest.raises(triton_bounds.OutOfBounds, match="k: load of 4-byte elements .* 1 of 1 active lanes"):
        launch.check("load", [0x1000], None, 4)
