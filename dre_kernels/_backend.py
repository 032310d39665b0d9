"""Backends: what exists, what works on which device, and the one dispatch every op goes through.

| name        | what                                                                  | devices    |
|-------------|-----------------------------------------------------------------------|------------|
| `reference` | the formulas written naively in PyTorch (the executable spec)         | any        |
| `torch`     | the best eager PyTorch without custom kernels (the fair baseline)     | any        |
| `triton`    | Triton kernels (CPU only under TRITON_INTERPRET=1, for tests)         | CUDA       |
| `native`    | the compiled extension `dre_kernels._C`: C++ on CPU, CUDA on GPU      | CPU, CUDA  |
| `cupy`      | the csrc/cuda kernels compiled at run time by CuPy/NVRTC             | CUDA       |

`"auto"` (or the `DRE_KERNELS_BACKEND` environment variable, which overrides `"auto"`): CUDA tensors take the
faster kernel backend as measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3/): `triton` for
residual_encode and contrastive_loss (2.5-8x faster than `native` there), `native` for the bank ops and kmeans; the
other one where the first is missing. CPU tensors take `native` if built, else `torch`. If the chosen backend
does not support the inputs' dtype (float64 on a GPU kernel, say), `auto` falls back to `torch`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "torch", "triton", "native", "cupy")
ENV_VAR = "DRE_KERNELS_BACKEND"

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_AND_DOUBLE = _FLOAT + (torch.float64,)

# Each op of a kernel backend registers itself here (see dre_kernels._library): (backend, op) -> callable.
# An op missing from this table makes that backend unavailable for that op, with the reason given below.
_KERNELS: dict[tuple[str, str], object] = {}


def register_kernel(backend: str, op: str, fn) -> None:
    _KERNELS[(backend, op)] = fn


def kernel(backend: str, op: str):
    return _KERNELS[(backend, op)]


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, str):
        return torch.device(device).type
    return device.type


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _native_status() -> tuple[bool, bool, str]:
    """(built for CPU, built for CUDA, why not) for dre_kernels._C."""
    from dre_kernels import _library

    if _library.native_error is not None:
        return False, False, f"the compiled extension dre_kernels._C is not built or failed to load ({_library.native_error})"
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("dre::residual_encode_fwd", "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("dre::residual_encode_fwd", "CUDA")
    return has_cpu, has_cuda, ""


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    """Whether `module` can be imported (asked once: find_spec walks sys.path, tens of microseconds per call)."""
    return importlib.util.find_spec(module) is not None


def _unavailable_reason(name: str, device_type: str) -> str | None:
    """None if `name` works for tensors on `device_type`, else why not."""
    if name in ("reference", "torch"):
        return None
    if name == "native":
        has_cpu, has_cuda, why = _native_status()
        if why:
            return why
        if device_type == "cpu":
            return None if has_cpu else "dre_kernels._C was built without CPU kernels"
        if device_type == "cuda":
            if not has_cuda:
                return "dre_kernels._C was built without CUDA kernels (torch CPU-only, nvcc missing or DRE_KERNELS_SKIP_CUDA=1)"
            return None if torch.cuda.is_available() else "no CUDA GPU is available"
        return f"no native kernels for device type {device_type!r}"
    if name == "triton":
        if not _installed("triton"):
            return "the triton package is not installed (pip install triton)"
        if ("triton", "residual_encode_fwd") not in _KERNELS:
            return "the Triton kernels are not part of this build of dre_kernels yet"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is available"
        if device_type == "cpu":
            return None if _triton_interpret() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not run on device type {device_type!r}"
    if name == "cupy":
        if device_type != "cuda":
            return "CuPy kernels run on CUDA tensors only"
        if not _installed("cupy"):
            return "the cupy package is not installed (pip install 'dre-kernels[cupy]')"
        if ("cupy", "residual_encode_fwd") not in _KERNELS:
            return "the CuPy backend is not part of this build of dre_kernels yet"
        return None if torch.cuda.is_available() else "no CUDA GPU is available"
    return f"unknown backend {name!r}"


def available_backends(device="cpu") -> list[str]:
    """The backends that run on tensors of `device` here, in the order of BACKENDS."""
    device_type = _device_type(device)
    return [b for b in BACKENDS if _unavailable_reason(b, device_type) is None]


def unavailable_backends(device="cpu") -> dict[str, str]:
    """Backend name -> why it does not run on `device` here."""
    device_type = _device_type(device)
    out = {}
    for b in BACKENDS:
        why = _unavailable_reason(b, device_type)
        if why is not None:
            out[b] = why
    return out


def supported_dtypes(backend: str, device_type: str) -> tuple[torch.dtype, ...]:
    if backend in ("reference", "torch") or (backend == "native" and device_type == "cpu"):
        return _FLOAT_AND_DOUBLE
    return _FLOAT


# `auto` on CUDA, per op: the measured faster kernel backend first (module docstring)
_CUDA_AUTO_ORDER = {"residual_encode": ("triton", "native", "torch"), "contrastive_loss": ("triton", "native", "torch")}
_CUDA_AUTO_DEFAULT = ("native", "triton", "torch")


def resolve_backend(backend: str, device, dtypes=(), op: str = "") -> str:
    """The one dispatch: turn `backend=` (maybe "auto") into the name of a backend that runs these inputs of `op`.

    Raises ValueError for an unknown name, RuntimeError when the asked-for backend is not available here and
    TypeError when it does not take these dtypes.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    kind, text = _resolve(backend, _device_type(device), tuple(str(d) for d in dtypes), op)
    if kind == "ok":
        return text
    raise {"ValueError": ValueError, "RuntimeError": RuntimeError, "TypeError": TypeError}[kind](text)


# torch.compile calls this once at trace time and keeps the answer as a constant: the availability probes
# (imports, dispatcher queries, the environment) are not traceable, and they cannot change inside a graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, dtype_names: tuple, op: str = "") -> tuple:
    dtypes = [getattr(torch, n.replace("torch.", "")) for n in dtype_names]
    requested = backend
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            requested = env
    if requested == "auto":
        order = _CUDA_AUTO_ORDER.get(op, _CUDA_AUTO_DEFAULT) if device_type == "cuda" else ("native", "torch")
        for name in order:
            if _unavailable_reason(name, device_type) is None and all(
                    d in supported_dtypes(name, device_type) for d in dtypes):
                return ("ok", name)
        return ("ok", "torch")
    if requested not in BACKENDS:
        source = f" (from {ENV_VAR})" if requested != backend else ""
        return ("ValueError", f"backend must be 'auto' or one of {BACKENDS}; got {requested!r}{source}")
    why = _unavailable_reason(requested, device_type)
    if why is not None:
        return ("RuntimeError", f"backend {requested!r} is not available for {device_type} tensors: {why}")
    ok = supported_dtypes(requested, device_type)
    for d in dtypes:
        if d not in ok:
            return ("TypeError", f"backend {requested!r} on {device_type} does not support dtype {d}; "
                                 f"it takes {', '.join(str(t) for t in ok)}")
    return ("ok", requested)
