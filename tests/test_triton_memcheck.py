"""The interpreter's bounds and race check (tests/triton_memcheck.py), which conftest.py keeps on for every
interpreted launch: it must catch a kernel stepping past its tensors (loads, stores, atomics; by an element or by a
partial element) and programs racing on an element, and must not flag lanes that are masked off, tensors that are
views, atomics that only meet atomics, or a program's own writes read after a barrier."""

import pytest
import torch

from conftest import MEMCHECKED

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(not MEMCHECKED, reason="the interpreter (TRITON_INTERPRET=1) is not running the "
                                                          "kernels here, or DRE_KERNELS_TRITON_MEMCHECK=0")

import triton_memcheck  # noqa: E402


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

    assert getattr(interpreter.GridExecutor.__call__, "_memchecked", False)


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
    launch = triton_memcheck._Launch("k", [("empty", torch.zeros(0))])
    with pytest.raises(triton_memcheck.OutOfBounds, match="k: load of 4-byte elements .* 1 of 1 active lanes"):
        launch.check("load", [0x1000], None, 4)


# The race check: programs of one launch run in any order, or at once, on a GPU; the interpreter runs them one after
# another, so a kernel whose programs write what another program touches passes there and races on the GPU.

@triton.jit
def _store_at_kernel(dst_ptr, src_ptr, stride, BLOCK: tl.constexpr):
    """Program p stores src[p * stride + i] to dst[p * stride + i]: programs overlap where stride < BLOCK."""
    p = tl.program_id(0)
    i = p * stride + tl.arange(0, BLOCK)
    tl.store(dst_ptr + i, tl.load(src_ptr + i))


@triton.jit
def _shift_kernel(buf_ptr, BLOCK: tl.constexpr):
    """Program p stores block p + 1 of buf from block p: it reads what program p - 1 writes."""
    p = tl.program_id(0)
    i = p * BLOCK + tl.arange(0, BLOCK)
    tl.store(buf_ptr + i + BLOCK, tl.load(buf_ptr + i))


@triton.jit
def _sum_then_read_kernel(acc_ptr, out_ptr, READ: tl.constexpr, BLOCK: tl.constexpr):
    """Every program adds 1 to acc[:BLOCK] atomically; with READ it also loads acc (another program's adds race)."""
    i = tl.arange(0, BLOCK)
    tl.atomic_add(acc_ptr + i, tl.full((BLOCK,), 1.0, tl.float32), sem="relaxed")
    if READ:
        tl.store(out_ptr + tl.program_id(0) * BLOCK + i, tl.load(acc_ptr + i))


@triton.jit
def _write_then_read_kernel(buf_ptr, out_ptr, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    """One program stores buf reversed, then loads it in order: each element read is another lane's write."""
    i = tl.arange(0, BLOCK)
    tl.store(buf_ptr + (BLOCK - 1 - i), i.to(tl.float32))
    if BARRIER:
        tl.debug_barrier()
    tl.store(out_ptr + i, tl.load(buf_ptr + i))


@triton.jit
def _scatter_kernel(dst_ptr, idx_ptr, src_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst_ptr + tl.load(idx_ptr + i), tl.load(src_ptr + i))


def test_programs_that_write_their_own_elements_pass():
    src, dst = torch.arange(32.0), torch.zeros(32)
    _store_at_kernel[(4,)](dst, src, 8, 8)
    assert torch.equal(dst, src)
    acc = torch.zeros(8)
    _sum_then_read_kernel[(5,)](acc, torch.zeros(40), False, 8)  # atomics from every program meet: no race
    assert torch.equal(acc, torch.full((8,), 5.0))


def test_two_programs_storing_one_element_race():
    with pytest.raises(Exception, match=r"_store_at_kernel: two programs store one element \(4 elements\), the first "
                                        r"at byte offset 16 from `dst_ptr`.* programs \[\(0, 0, 0\), \(1, 0, 0\)\]"):
        _store_at_kernel[(2,)](torch.zeros(12), torch.arange(12.0), 4, 8)


def test_a_program_reading_what_another_writes_races():
    with pytest.raises(Exception, match=r"_shift_kernel: one program stores, another loads or adds to one element"):
        _shift_kernel[(3,)](torch.arange(32.0), 8)


def test_a_load_of_what_other_programs_add_atomically_races():
    with pytest.raises(Exception, match=r"_sum_then_read_kernel: one program adds atomically, another loads"):
        _sum_then_read_kernel[(2,)](torch.zeros(8), torch.zeros(16), True, 8)
    # one program alone: its own load after its own atomic is the in-program hazard, named as such
    with pytest.raises(Exception, match=r"program \(0, 0, 0\) loads an element it wrote in an earlier operation"):
        _sum_then_read_kernel[(1,)](torch.zeros(8), torch.zeros(8), True, 8)


def test_a_program_reading_its_own_earlier_store_without_a_barrier_is_flagged():
    with pytest.raises(Exception, match=r"_write_then_read_kernel: program \(0, 0, 0\) loads an element it wrote in "
                                        r"an earlier operation \(8 elements\).*tl.debug_barrier"):
        _write_then_read_kernel[(1,)](torch.zeros(8), torch.zeros(8), False, 8)
    out = torch.zeros(8)
    _write_then_read_kernel[(1,)](torch.zeros(8), out, True, 8)  # the barrier orders them
    assert out.tolist() == list(range(7, -1, -1))


def test_duplicate_lanes_of_one_store_must_agree():
    dst = torch.zeros(4)
    _scatter_kernel[(1,)](dst, torch.tensor([0, 1, 1, 3]), torch.tensor([5.0, 7.0, 7.0, 9.0]), 4)  # one value: fine
    assert dst.tolist() == [5.0, 7.0, 0.0, 9.0]
    with pytest.raises(Exception, match=r"_scatter_kernel: one create_masked_store writes different values to one "
                                        r"element from lanes that share its address \(1 elements\), the first at "
                                        r"byte offset 4 from `dst_ptr`"):
        _scatter_kernel[(1,)](dst, torch.tensor([0, 1, 1, 3]), torch.tensor([5.0, 7.0, 8.0, 9.0]), 4)
    # integers: equal values to distinct elements, and to one element, are no race
    ints = torch.zeros(4, dtype=torch.int32)
    _scatter_kernel[(1,)](ints, torch.tensor([3, 0, 2, 2]), torch.full((4,), 6, dtype=torch.int32), 4)
    assert ints.tolist() == [6, 0, 6, 6]
    with pytest.raises(Exception, match=r"writes different values .* \(1 elements\), the first at byte offset 8"):
        _scatter_kernel[(1,)](ints, torch.tensor([3, 0, 2, 2]), torch.tensor([1, 1, 2, 3], dtype=torch.int32), 4)
