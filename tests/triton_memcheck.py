"""Bounds and race checking for Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1).

Bounds.

Every load, store and atomic of a launch must touch only elements of the launch's tensor arguments: each tensor's
own extent (its first element to its last, by its sizes and strides), lanes masked off excepted, as on a GPU. There
an access outside its tensors reads another allocation or faults, and a fault loses the CUDA context (an H100 sweep
lost every later launch to one); the interpreter reads or writes host memory instead, silently. `checked()` wraps
the interpreter's memory operations for a with-block and raises OutOfBounds at the first access outside, naming the
kernel, the operation, the offending element and the tensor argument nearest to it. conftest.py switches it on for
the whole session wherever the interpreter runs the kernels (DRE_KERNELS_TRITON_MEMCHECK=0 switches it off).

Overlapping or adjacent arguments (views of one buffer) merge into one allowed span, so a step from one view into
the next is not caught: this checks for accesses that leave the launch's memory, which is what faults on a GPU.

Races. On a GPU the programs of a launch run in any order, or at once, and a program's lanes are many threads; the
interpreter runs programs one after another and a program's operations whole, so a race gives the right answer
there. At the end of each launch `checked()` raises Race where:
- two programs store one element (no atomic), or one stores an element another loads or adds to;
- programs add to an element atomically and another program loads it (it sees any number of the adds);
- a program loads an element it stored or added to in an earlier operation with no tl.debug_barrier between;
- one store's lanes write different values to one element (the GPU keeps any one of them).
Elements are matched by their first byte: two views of one buffer with different element sizes are not compared.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


class Race(AssertionError):
    pass


LOAD, STORE, ATOMIC = 0, 1, 2  # the kinds of access the race check tells apart


class _Launch:
    """One launch: the allowed spans (the merged byte extents of its tensor arguments) and, for the race check, every
    active lane's element address, program, kind (load, store, atomic), operation number and barrier epoch (the
    tl.debug_barrier calls before it)."""

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
        self.accesses = []  # (addresses, program, kind, operation number, barrier epoch)
        self.barriers = 0

    def check(self, op, ptrs, mask, elem_bytes, kind=None, program=0, values=None):
        """Bounds-check one operation's active lanes and, given its kind, record them for races()."""
        active = None if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).ravel()
        addr = np.asarray(ptrs, dtype=np.uint64).ravel()
        if active is not None:
            addr = addr[active]
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
        if kind is None:
            return
        if kind == STORE and values is not None:
            vals = np.broadcast_to(np.asarray(values), np.shape(ptrs)).ravel()
            self._same_value_per_address(op, addr, vals if active is None else vals[active])
        self.accesses.append((addr, program, kind, len(self.accesses), self.barriers))

    def _same_value_per_address(self, op, addr, vals):
        """Lanes of one store that share an address must store one value: a GPU keeps any one of them."""
        order = np.argsort(addr, kind="stable")
        a, v = addr[order], vals[order]
        equal = v[1:] == v[:-1]
        if v.dtype.kind == "f":
            equal |= np.isnan(v[1:]) & np.isnan(v[:-1])
        differs = (a[1:] == a[:-1]) & ~equal
        if np.any(differs):
            where = np.unique(a[1:][differs])
            raise Race(f"{self.kernel}: one {op} writes different values to one element from lanes that share its "
                       f"address ({where.size} elements), the first at {self._describe(int(where[0]))}")

    def races(self):
        """Raise Race if two programs of this launch touch one element and at least one of them writes it without an
        atomic (programs run in any order, or at once, on a GPU), or atomics and plain loads meet on one element
        (the load sees any number of the adds), or one program loads an element it wrote in an earlier operation with
        no tl.debug_barrier between (its lanes are other threads on a GPU, which need not see the write)."""
        written = [a[0] for a in self.accesses if a[2] != LOAD]
        if not written:
            return
        # only the loads of elements someone writes can race: keep those (most loads are of rows and codewords)
        written = np.unique(np.concatenate(written))
        accesses = []
        for a in self.accesses:
            if a[2] == LOAD:
                i = np.minimum(np.searchsorted(written, a[0]), written.size - 1)
                a = (a[0][written[i] == a[0]],) + a[1:]
            if a[0].size:
                accesses.append(a)
        addr = np.concatenate([a[0] for a in accesses])
        n = [a[0].size for a in accesses]
        prog, kind, seq, epoch = (np.repeat(np.array([a[i] for a in accesses], dtype=np.int64), n)
                                  for i in range(1, 5))
        uaddr, at = np.unique(addr, return_inverse=True)
        big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        lo, hi = {}, {}
        for k in (LOAD, STORE, ATOMIC):
            sel = kind == k
            lo[k], hi[k] = np.full(uaddr.size, big), np.full(uaddr.size, small)
            np.minimum.at(lo[k], at[sel], prog[sel])
            np.maximum.at(hi[k], at[sel], prog[sel])
        has = {k: lo[k] != big for k in lo}
        other_lo, other_hi = np.minimum(lo[LOAD], lo[ATOMIC]), np.maximum(hi[LOAD], hi[ATOMIC])
        found = {
            "two programs store": has[STORE] & (lo[STORE] != hi[STORE]),
            "one program stores, another loads or adds to": has[STORE] & (has[LOAD] | has[ATOMIC]) &
            ((other_lo != lo[STORE]) | (other_hi != lo[STORE])),
            "one program adds atomically, another loads": has[ATOMIC] & has[LOAD] &
            ((lo[ATOMIC] != hi[ATOMIC]) | (lo[LOAD] != hi[LOAD]) | (lo[ATOMIC] != lo[LOAD])),
        }
        for what, bad in found.items():
            if np.any(bad):
                first = int(np.flatnonzero(bad)[0])
                touching = sorted(set(prog[at == first].tolist()))
                raise Race(f"{self.kernel}: {what} one element ({int(np.count_nonzero(bad))} elements), the first "
                           f"at {self._describe(int(uaddr[first]))}, touched by programs "
                           f"{[_program_name(p) for p in touching[:4]]}")
        # one program's load of an element it wrote (stored or added to) in an earlier operation of one epoch
        progs, prog_at = np.unique(prog, return_inverse=True)
        n_epochs = int(epoch.max()) + 1
        assert uaddr.size * progs.size * n_epochs < 2 ** 62  # the keys below fit an int64
        pair, pair_at = np.unique((at.astype(np.int64) * progs.size + prog_at) * n_epochs + epoch,
                                  return_inverse=True)
        pair_at = pair_at.ravel()
        first_write = np.full(pair.size, big)
        last_load = np.full(pair.size, small)
        w = kind != LOAD
        np.minimum.at(first_write, pair_at[w], seq[w])
        np.maximum.at(last_load, pair_at[~w], seq[~w])
        bad = first_write < last_load
        if np.any(bad):
            first = int(pair[np.flatnonzero(bad)[0]]) // n_epochs  # element * programs + program
            raise Race(f"{self.kernel}: program {_program_name(int(progs[first % progs.size]))} loads an element it "
                       f"wrote in an earlier operation ({int(np.count_nonzero(bad))} elements), the first at "
                       f"{self._describe(int(uaddr[first // progs.size]))}: without tl.debug_barrier its threads need "
                       f"not see each other's writes")

    def _describe(self, a):
        if not self.tensors:
            return f"address {a:#x} (the launch has no tensor arguments)"
        def gap(entry):
            _, lo, n = entry
            return lo - a if a < lo else max(0, a - (lo + n) + 1)
        name, lo, n = min(self.tensors, key=gap)
        return f"byte offset {a - lo} from `{name}` (a {n}-byte extent)"


def _program_id(builder) -> int:
    x, y, z = builder.grid_idx
    return x | (y << 32) | (z << 48)


def _program_name(p: int) -> tuple:
    return (p & 0xFFFFFFFF, (p >> 32) & 0xFFFF, p >> 48)


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
    """Bounds- and race-check every interpreted launch in the block (re-entrant: a nested use is a no-op)."""
    from triton.runtime import interpreter as interp

    if getattr(interp.GridExecutor.__call__, "_memchecked", False):
        yield
        return
    builder = interp.interpreter_builder
    real_call = interp.GridExecutor.__call__
    real = {name: getattr(builder, name)
            for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
                         "create_barrier")}

    def call(self, *args, **kwargs):
        named = list(zip(self.arg_names, args)) + list(kwargs.items())
        _active.append(_Launch(getattr(self.fn, "__name__", "kernel"),
                               [(n, a) for n, a in named if isinstance(a, torch.Tensor)]))
        try:
            out = real_call(self, *args, **kwargs)
            _active[-1].races()
            return out
        finally:
            _active.pop()

    call._memchecked = True

    def guard(op, ptr_at, mask_at, kind, value_at=None):
        def wrapped(*args, **kwargs):
            if _active:
                ptrs = args[ptr_at]
                mask = args[mask_at].data if mask_at is not None else None
                values = args[value_at].data if value_at is not None else None
                _active[-1].check(op, ptrs.data, mask, _bytes_of(ptrs), kind, _program_id(builder), values)
            return real[op](*args, **kwargs)
        return wrapped

    # positions as in every supported triton (3.2 .. 3.9): load(ptrs, mask, ...), store(ptrs, value, mask, ...),
    # atomic_rmw(op, ptr, val, mask, ...), atomic_cas(ptr, cmp, val, ...); create_load and create_store call the
    # masked ones with an all-true mask
    patches = {"create_masked_load": guard("create_masked_load", 0, 1, LOAD),
               "create_masked_store": guard("create_masked_store", 0, 2, STORE, value_at=1),
               "create_atomic_rmw": guard("create_atomic_rmw", 1, 3, ATOMIC),
               "create_atomic_cas": guard("create_atomic_cas", 0, None, ATOMIC)}
    def barrier(*args, **kwargs):
        if _active:
            _active[-1].barriers += 1
        return real["create_barrier"](*args, **kwargs)

    patches["create_barrier"] = barrier
    interp.GridExecutor.__call__ = call
    for name, fn in patches.items():
        setattr(builder, name, fn)
    try:
        yield
    finally:
        interp.GridExecutor.__call__ = real_call
        for name in patches:
            delattr(builder, name)  # back to the class's methods
