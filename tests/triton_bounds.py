"""Bounds checking for Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1).

Every load, store and atomic of a launch must touch only elements of the launch's tensor arguments: each tensor's
own extent (its first element to its last, by its sizes and strides), lanes masked off excepted, as on a GPU. There
an access outside its tensors reads another allocation or faults, and a fault loses the CUDA context (an H100 sweep
lost every later launch to one); the interpreter reads or writes host memory instead, silently. `checked()` wraps
the interpreter's memory operations for a with-block and raises OutOfBounds at the first access outside, naming the
kernel, the operation, the offending element and the tensor argument nearest to it. conftest.py switches it on for
the whole session wherever the interpreter runs the kernels (DRE_KERNELS_TRITON_BOUNDS=0 switches it off).

Overlapping or adjacent arguments (views of one buffer) merge into one allowed span, so a step from one view into
the next is not caught: this checks for accesses that leave the launch's memory, which is what faults on a GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


class _Launch:
    """The allowed spans of one launch: the merged byte extents of its tensor arguments."""

    def __init__(self, kernel_name, named_tensors):
        self.kernel = kernel_name
        self.tensors = [(name, t.data_ptr(), _extent_bytes(t)) for name, t in named_tensors]
        spans = sorted((lo, lo + n) for _, lo, n in self.tensors if n > 0)
        merged = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.lo = np.array([s[0] for s in merged], dtype=np.uint64)
        self.hi = np.array([s[1] for s in merged], dtype=np.uint64)

    def check(self, op, ptrs, mask, elem_bytes):
        addr = np.asarray(ptrs, dtype=np.uint64).ravel()
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).ravel()]
        if addr.size == 0:
            return
        if self.lo.size:
            i = np.searchsorted(self.lo, addr, side="right").astype(np.int64) - 1
            inside = (i >= 0) & (addr + np.uint64(elem_bytes) <= self.hi[np.maximum(i, 0)])
        else:
            inside = np.zeros(addr.shape, dtype=bool)
        if not np.all(inside):
            raise OutOfBounds(f"{self.kernel}: {op} of {elem_bytes}-byte elements outside the launch's tensors: "
                              f"{int(np.count_nonzero(~inside))} of {addr.size} active lanes, the first at "
                              f"{self._describe(int(addr[~inside][0]))}")

    def _describe(self, a):
        if not self.tensors:
            return f"address {a:#x} (the launch has no tensor arguments)"
        def gap(entry):
            _, lo, n = entry
            return lo - a if a < lo else max(0, a - (lo + n) + 1)
        name, lo, n = min(self.tensors, key=gap)
        return f"byte offset {a - lo} from `{name}` (a {n}-byte extent)"


def _extent_bytes(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last (strides >= 0, as torch's are)."""
    if t.numel() == 0:
        return 0
    last = sum(st * (sz - 1) for sz, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _bytes_of(handle) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


_active: list[_Launch] = []


@contextlib.contextmanager
def checked():
    """Bounds-check every interpreted launch in the block (re-entrant: a nested use is a no-op)."""
    from triton.runtime import interpreter as interp

    if getattr(interp.GridExecutor.__call__, "_bounds_checked", False):
        yield
        return
    builder = interp.interpreter_builder
    real_call = interp.GridExecutor.__call__
    real = {name: getattr(builder, name)
            for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}

    def call(self, *args, **kwargs):
        named = list(zip(self.arg_names, args)) + list(kwargs.items())
        _active.append(_Launch(getattr(self.fn, "__name__", "kernel"),
                               [(n, a) for n, a in named if isinstance(a, torch.Tensor)]))
        try:
            return real_call(self, *args, **kwargs)
        finally:
            _active.pop()

    call._bounds_checked = True

    def guard(op, ptr_at, mask_at):
        def wrapped(*args, **kwargs):
            if _active:
                ptrs = args[ptr_at]
                mask = args[mask_at].data if mask_at is not None else None
                _active[-1].check(op, ptrs.data, mask, _bytes_of(ptrs))
            return real[op](*args, **kwargs)
        return wrapped

    # positions as in every supported triton (3.2 .. 3.9): load(ptrs, mask, ...), store(ptrs, value, mask, ...),
    # atomic_rmw(op, ptr, val, mask, ...), atomic_cas(ptr, cmp, val, ...); create_load and create_store call the
    # masked ones with an all-true mask
    patches = {"create_masked_load": guard("create_masked_load", 0, 1),
               "create_masked_store": guard("create_masked_store", 0, 2),
               "create_atomic_rmw": guard("create_atomic_rmw", 1, 3),
               "create_atomic_cas": guard("create_atomic_cas", 0, None)}
    interp.GridExecutor.__call__ = call
    for name, fn in patches.items():
        setattr(builder, name, fn)
    try:
        yield
    finally:
        interp.GridExecutor.__call__ = real_call
        for name in patches:
            delattr(builder, name)  # back to the class's methods
