"""Shared fixtures: every backend that runs here, per-dtype tolerances, and random ragged inputs.

Op tests are parametrised over `backend_device`: every (backend, device) pair available here except `reference`,
which they compare against. A new backend joins the suite by becoming available.
"""

import os

import pytest
import torch

# Triton decides at decoration time whether kernels run in its interpreter; on a machine without a GPU the
# triton backend is only testable that way, so switch it on before dre_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dre_kernels  # noqa: E402

# Every kernel the interpreter runs is bounds- and race-checked (tests/triton_memcheck.py): an access outside a
# launch's tensors, which would fault or read another allocation on a GPU, or a race between its programs, fails the
# test here.
MEMCHECKED = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("DRE_KERNELS_TRITON_MEMCHECK", "1") != "0"


@pytest.fixture(autouse=True, scope="session")
def _triton_memchecked():
    if not MEMCHECKED:
        yield
        return
    import triton_memcheck

    with triton_memcheck.checked():
        yield


def _pairs():
    pairs = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for b in dre_kernels.available_backends(device):
            if b != "reference":
                marks = [pytest.mark.cuda] if device == "cuda" else []
                pairs.append(pytest.param((b, device), id=f"{b}-{device}", marks=marks))
    return pairs


BACKEND_DEVICE_PAIRS = _pairs()


@pytest.fixture(params=BACKEND_DEVICE_PAIRS)
def backend_device(request):
    return request.param


def supports_float64(backend: str, device: str) -> bool:
    return torch.float64 in dre_kernels._backend.supported_dtypes(backend, device)


# Tolerances on outputs of magnitude ~1 against the float32/float64 reference computed from the same rounded
# inputs: half-precision outputs get their own rounding error on top of float32 accumulation.
TOLERANCES = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def tol(dtype):
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """Compare in float64 with the tolerance of `dtype` (default: actual's), relative to the size of `expected`."""
    t = tol(dtype or actual.dtype)
    mag = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(),
                               atol=t["atol"] * mag * scale, rtol=t["rtol"] * scale, msg=msg or None)


def make_offsets(lengths, dtype=torch.int64, device="cpu"):
    off = [0]
    for n in lengths:
        off.append(off[-1] + n)
    return torch.tensor(off, dtype=dtype, device=device)


def value_check_inputs(**over):
    """Small residual_encode arguments (B=2, K=3, D=4, a 6-row bank) for the value-check tests; `over` replaces any."""
    g = torch.Generator().manual_seed(0)
    a = dict(x=torch.randn(5, 4, generator=g), x_offsets=torch.tensor([0, 2, 5]),
             codewords=torch.randn(3, 4, generator=g), scale=torch.rand(3, generator=g) + 0.5,
             bank=torch.randn(6, 4, generator=g), bank_index=torch.tensor([0, 5, 1]),
             bank_offsets=torch.tensor([0, 1, 3]))
    a.update(over)
    return a


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
