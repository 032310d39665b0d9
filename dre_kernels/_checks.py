"""One input check per op, shared by every backend, run before any kernel.

Errors name the argument, what was expected and what was given:
ValueError (shapes, offsets, unknown options, bank arguments given partly), TypeError (non-float features, float
offsets), IndexError (index out of range), RuntimeError (mixed devices).

The checks on values (offsets monotone, indices in range, no duplicate indices) read the tensors, which costs one
device synchronisation per call. They run where the kernels run: the kernel backends check in their impls, before
any kernel, in eager calls and in compiled graphs alike (the native ops in C++, csrc/value_checks.h; triton and
cupy through ensure_checked, runtime_checks_residual_encode and runtime_checks_bank at the start of their impls),
with the wrappers' errors; the wrappers run them only for `reference` and `torch` (check_values), and not under
torch.compile, where they would break the graph. So an eager call on new index tensors synchronises once, whatever
the backend.

Each side remembers the tensors that passed: a small process-wide cache of (weakref to the tensor, its _version,
data pointer/shape/strides, the check and the bound it passed against), in Python here and in C++ for the native
ops. A check found there is skipped and the rest run (one synchronisation), so a repeated call on unchanged
tensors, and the backward of a call, synchronise not at all.
An in-place change bumps _version and a freed tensor's reused id fails the weakref, so neither matches a stale
entry. Writes that bypass the version counter (through .data, numpy()/DLPack views, raw kernels) are not seen,
as for autograd's saved tensors. Inference tensors (no version counter) are never cached. During CUDA graph capture
(no synchronisation allowed, and a replay runs no Python) the impl checks become device-side asserts of every
value, cache or not (torch._assert_async: a failure aborts the CUDA context rather than raising the Python error).
"""

from __future__ import annotations

import numbers
import threading
import weakref

import torch

from dre_kernels import _backend, _library

MAX_K = 256
MAX_D = 4096
_INDEX_DTYPES = (torch.int32, torch.int64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}" if isinstance(t, (numbers.Number, str)) else type(t).__name__


def check_features(name: str, t, ndim: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor; got {_describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64); got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")


def check_index_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 or int64 torch.Tensor; got {_describe(t)}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor; got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise RuntimeError(f"all tensors must be on one device: {first_name} is on {first}, {name} is on {dev}")
    return first


def _offsets_problem(name: str, first: int, last: int, min_step: int, total: int, total_name: str) -> str | None:
    if first != 0:
        return f"{name}[0] must be 0; got {first}"
    if min_step < 0:
        return f"{name} must be non-decreasing; it decreases somewhere (smallest step {min_step})"
    if last != total:
        return f"{name}[-1] must equal the number of rows of {total_name} ({total}); got {last}"
    return None


def _to_host(stats: torch.Tensor) -> list:
    """The one device synchronisation of a value check (a seam for tests that count them)."""
    return stats.tolist()


# ---------------------------------------------------------------------------------------------- verified cache
# Process-wide, not per thread: on CUDA the backward ops run in autograd's device thread, and must find what the
# forward's thread verified. In-place writes from any thread bump the version counter that entries key on.
_CACHE_SIZE = 16
_ENTRIES: list = []
_LOCK = threading.Lock()


def _entries() -> list:
    return _ENTRIES


def _signature(t: torch.Tensor):
    """What must be unchanged for a check of `t` to still hold, or None if `t` cannot be tracked."""
    if t.is_inference():
        return None
    return (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)


def _cached(t: torch.Tensor, kind: tuple) -> bool:
    sig = _signature(t)
    if sig is None:
        return False
    with _LOCK:
        return any(ref() is t and esig == sig and ekind == kind for ref, esig, ekind in _ENTRIES)


def _remember(t: torch.Tensor, kind: tuple) -> None:
    sig = _signature(t)
    if sig is None or _cached(t, kind):
        return
    with _LOCK:
        _ENTRIES.append((weakref.ref(t), sig, kind))
        # dead or surplus entries go first-in first-out
        _ENTRIES[:] = [e for e in _ENTRIES if e[0]() is not None][-_CACHE_SIZE:]


def clear_checked_cache() -> None:
    with _LOCK:
        _ENTRIES.clear()


# Kinds of verified facts: ("offsets", total), ("index", n), ("unique",).
def _run_checks(offsets, indices, unique) -> None:
    """The value checks themselves (one synchronisation); remembers what passed."""
    stats = []
    for name, off, total, total_name in offsets:
        off = off.to(torch.int64)
        steps = off[1:] - off[:-1]
        stats += [off[0], off[-1], steps.min() if steps.numel() else off.new_zeros(())]
    for name, idx, n, idx_of in indices:
        idx = idx.to(torch.int64)
        stats += [idx.min(), idx.max()] if idx.numel() else [idx.new_zeros(()), idx.new_zeros(())]
    if unique is not None and unique[1].numel() > 1:
        srt = torch.sort(unique[1].to(torch.int64)).values
        stats.append((srt[1:] == srt[:-1]).any().to(torch.int64))
    if not stats:
        return
    values = _to_host(torch.stack([s.to(torch.int64).reshape(()) for s in stats]))
    pos = 0
    for name, off, total, total_name in offsets:
        problem = _offsets_problem(name, *values[pos:pos + 3], total, total_name)
        if problem:
            raise ValueError(problem)
        pos += 3
    for name, idx, n, idx_of in indices:
        lo, hi = values[pos:pos + 2]
        pos += 2
        if idx.numel() and (lo < 0 or hi >= n):
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} holds {bad}, out of range for {idx_of} with {n} rows (valid: 0 to {n - 1})")
    if unique is not None and unique[1].numel() > 1 and values[pos]:
        raise ValueError(f"{unique[0]} must not repeat an index (a row would be written twice); it does")
    for name, off, total, total_name in offsets:
        _remember(off, ("offsets", total))
    for name, idx, n, idx_of in indices:
        _remember(idx, ("index", n))
    if unique is not None:
        _remember(unique[1], ("unique",))


def _device_asserts(offsets, indices, unique) -> None:
    """The same checks as device-side asserts, for CUDA graph capture (no synchronisation, replayed every time)."""
    for name, off, total, total_name in offsets:
        o = off.to(torch.int64)
        ok = (o[0] == 0) & (o[-1] == total)
        if o.numel() > 1:
            ok = ok & ((o[1:] - o[:-1]).min() >= 0)
        torch._assert_async(ok, f"{name} must start at 0, not decrease and end at the row count of {total_name}")
    for name, idx, n, idx_of in indices:
        if idx.numel():
            lo, hi = torch.aminmax(idx.to(torch.int64))
            torch._assert_async((lo >= 0) & (hi < n), f"{name} out of range for {idx_of} with {n} rows")
    if unique is not None and unique[1].numel() > 1:
        srt = torch.sort(unique[1].to(torch.int64)).values
        torch._assert_async((srt[1:] != srt[:-1]).all(), f"{unique[0]} must not repeat an index")


def check_offsets_and_indices(offsets: list[tuple[str, torch.Tensor, int, str]],
                              indices: list[tuple[str, torch.Tensor, int, str]],
                              unique: tuple[str, torch.Tensor] | None = None) -> None:
    """Value checks on CSR offsets and row indices, for the wrappers (see check_values): skipped under
    torch.compile, else as ensure_checked: one device synchronisation, none when the cache vouches for every tensor
    (a repeated call on unchanged inputs), device-side asserts under CUDA graph capture. Remembers the tensors that
    passed.

    offsets: (name, tensor, row count it must end at, name of that tensor).
    indices: (name, tensor, number of rows it indexes, name of the indexed tensor).
    unique: (name, index tensor) that must not repeat a value.
    """
    if _compiling():
        return
    ensure_checked(offsets, indices, unique)


def ensure_checked(offsets: list[tuple[str, torch.Tensor, int, str]],
                   indices: list[tuple[str, torch.Tensor, int, str]],
                   unique: tuple[str, torch.Tensor] | None = None) -> None:
    """The value checks for the kernel impls (which run also when called from a compiled graph) and, through
    check_offsets_and_indices, the wrappers: checks what the cache does not vouch for (same tensor object, same
    _version, same bound), with at most one synchronisation; under CUDA graph capture, device-side asserts of
    everything. The backward of an eager call, whose forward has just checked the same tensors, costs nothing."""
    for name, off, total, total_name in offsets:
        if off.numel() < 1:
            raise ValueError(f"{name} must hold B+1 >= 1 entries; got an empty tensor")
    tensors = [o[1] for o in offsets] + [i[1] for i in indices] + ([unique[1]] if unique is not None else [])
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        # a replay runs no Python and sees whatever values the captured buffers hold then: no cache, all checks
        _device_asserts(offsets, indices, unique)
        return
    offsets = [o for o in offsets if not _cached(o[1], ("offsets", o[2]))]
    indices = [i for i in indices if not _cached(i[1], ("index", i[2]))]
    if unique is not None and _cached(unique[1], ("unique",)):
        unique = None
    _run_checks(offsets, indices, unique)


# The value checks of each op, written once: the impls of the Python kernel backends run them (ensure_checked) and
# the wrappers for the other backends (check_values).
def _residual_encode_values(x, x_offsets, bank, bank_index, bank_offsets):
    offsets = [("x_offsets", x_offsets, x.shape[0], "x")]
    indices = []
    if bank is not None:
        offsets.append(("bank_offsets", bank_offsets, bank_index.shape[0], "bank_index"))
        indices.append(("bank_index", bank_index, bank.shape[0], "bank"))
    return offsets, indices, None


def _bank_values(bank, index, unique: bool):
    return [], [("index", index, bank.shape[0], "bank")], (("index", index) if unique else None)


def check_values(backend: str, offsets, indices, unique=None) -> None:
    """The wrappers' value checks, after the dispatch: run for `reference` and `torch`, left to the impls of the
    kernel backends, the `dre` operators of _library.PREFIXES (above, and csrc/value_checks.h for native), which
    run them before any kernel with the same errors: an eager call on new index tensors synchronises once."""
    if backend not in _library.PREFIXES:
        check_offsets_and_indices(offsets, indices, unique)


def runtime_checks_residual_encode(x, x_offsets, bank, bank_index, bank_offsets) -> None:
    """The value checks of residual_encode_fwd/bwd, for the impls of the Python kernel backends."""
    ensure_checked(*_residual_encode_values(x, x_offsets, bank, bank_index, bank_offsets))


def runtime_checks_bank(bank, index, unique: bool) -> None:
    """The value checks of bank_gather (unique=False) and bank_update_ (unique=True), for the kernel impls."""
    ensure_checked(*_bank_values(bank, index, unique))


def check_offsets_shape(name: str, off, num_rows_name: str) -> None:
    check_index_tensor(name, off)
    if off.numel() < 1:
        raise ValueError(f"{name} must hold B+1 >= 1 entries (its first is 0, its last the row count of "
                         f"{num_rows_name}); got an empty tensor")


def check_residual_encode(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, assignment, return_mass,
                          backend):
    """Checks every argument of residual_encode and resolves `backend`; returns the backend's name."""
    if assignment not in ("soft", "hard"):
        raise ValueError(f"assignment must be 'soft' or 'hard'; got {assignment!r}")
    if not isinstance(return_mass, bool):
        raise TypeError(f"return_mass must be a bool; got {_describe(return_mass)}")
    check_features("x", x)
    check_features("codewords", codewords)
    M, D = x.shape
    K, Dc = codewords.shape
    if Dc != D:
        raise ValueError(f"codewords must have shape (K, D) with D = x.shape[1] = {D}; got shape {tuple(codewords.shape)}")
    if not 1 <= K <= MAX_K:
        raise ValueError(f"codewords must have 1 <= K <= {MAX_K} rows; got K = {K}")
    if not 1 <= D <= MAX_D:
        raise ValueError(f"x and codewords must have 1 <= D <= {MAX_D} columns; got D = {D}")
    check_offsets_shape("x_offsets", x_offsets, "x")
    tensors = {"x": x, "x_offsets": x_offsets, "codewords": codewords}
    dtypes = [x.dtype, codewords.dtype]
    if assignment == "soft":
        if scale is None:
            raise ValueError("scale is required for assignment='soft': a (K,) tensor of per-codeword smoothing factors")
        check_features("scale", scale, ndim=1)
        if scale.shape[0] != K:
            raise ValueError(f"scale must have shape (K,) = ({K},); got {tuple(scale.shape)}")
        tensors["scale"] = scale
        dtypes.append(scale.dtype)
    given = [n for n, v in (("bank", bank), ("bank_index", bank_index), ("bank_offsets", bank_offsets)) if v is not None]
    if given and len(given) != 3:
        missing = [n for n in ("bank", "bank_index", "bank_offsets") if n not in given]
        raise ValueError(f"bank, bank_index and bank_offsets must be given together or not at all; "
                         f"got {', '.join(given)} without {', '.join(missing)}")
    if bank is not None:
        check_features("bank", bank)
        if bank.shape[1] != D:
            raise ValueError(f"bank must have shape (T, D) with D = {D}; got shape {tuple(bank.shape)}")
        check_index_tensor("bank_index", bank_index)
        check_offsets_shape("bank_offsets", bank_offsets, "bank_index")
        if bank_offsets.shape[0] != x_offsets.shape[0]:
            raise ValueError(f"bank_offsets must have B+1 = {x_offsets.shape[0]} entries like x_offsets; "
                             f"got {bank_offsets.shape[0]}")
        tensors.update(bank=bank, bank_index=bank_index, bank_offsets=bank_offsets)
        dtypes.append(bank.dtype)
    name = _backend.resolve_backend(backend, check_same_device(**tensors), dtypes, "residual_encode")
    check_values(name, *_residual_encode_values(x, x_offsets, bank, bank_index, bank_offsets))
    return name


def check_contrastive_loss(a, b, logit_scale, labels, normalize, reduction, backend):
    """Checks every argument of contrastive_loss and resolves `backend`; returns the backend's name."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool; got {_describe(normalize)}")
    check_features("a", a)
    check_features("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (B, P); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"a and b must have shape (B, P) with B >= 1 and P >= 1; got {tuple(a.shape)}")
    tensors = {"a": a, "b": b}
    if isinstance(logit_scale, torch.Tensor):
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a float or a floating-point 0-dim tensor; got {logit_scale.dtype}")
        if logit_scale.dim() != 0:
            raise ValueError(f"logit_scale must be a 0-dim tensor or a Python float; got shape {tuple(logit_scale.shape)}")
        tensors["logit_scale"] = logit_scale
    elif isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(f"logit_scale must be a Python float or a 0-dim floating-point tensor; got {_describe(logit_scale)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of shape (B,) or None; got {_describe(labels)}")
        if labels.shape != (a.shape[0],):
            raise ValueError(f"labels must have shape (B,) = ({a.shape[0]},); got {tuple(labels.shape)}")
        tensors["labels"] = labels
    return _backend.resolve_backend(backend, check_same_device(**tensors), [a.dtype, b.dtype], "contrastive_loss")


def check_bank_gather(bank, index, backend):
    """Checks every argument of bank_gather and resolves `backend`; returns the backend's name."""
    check_features("bank", bank)
    check_index_tensor("index", index)
    name = _backend.resolve_backend(backend, check_same_device(bank=bank, index=index), [bank.dtype])
    check_values(name, *_bank_values(bank, index, unique=False))
    return name


def check_bank_update(bank, index, values, momentum, normalize, backend):
    """Checks every argument of bank_update_ and resolves `backend`; returns the backend's name."""
    check_features("bank", bank)
    check_index_tensor("index", index)
    check_features("values", values)
    if values.shape != (index.shape[0], bank.shape[1]):
        raise ValueError(f"values must have shape (len(index), D) = ({index.shape[0]}, {bank.shape[1]}); "
                         f"got {tuple(values.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a Python float in [0, 1]; got {_describe(momentum)}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool; got {_describe(normalize)}")
    if bank.requires_grad:
        raise ValueError("bank must not require grad: it is a buffer updated in place, never differentiated")
    name = _backend.resolve_backend(backend, check_same_device(bank=bank, index=index, values=values),
                                    [bank.dtype, values.dtype])
    check_values(name, *_bank_values(bank, index, unique=True))
    return name


def check_kmeans(x, k, iters, seed, backend):
    """Checks every argument of kmeans and resolves `backend`; returns the backend's name."""
    check_features("x", x)
    for name, v in (("k", k), ("iters", iters), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {_describe(v)}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}]; got {k}")
    if x.shape[0] < k:
        raise ValueError(f"x must have at least k = {k} rows to pick k centres from; got {x.shape[0]}")
    if not 1 <= x.shape[1] <= MAX_D:
        raise ValueError(f"x must have 1 <= D <= {MAX_D} columns; got D = {x.shape[1]}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0; got {iters}")
    return _backend.resolve_backend(backend, x.device, [x.dtype])
