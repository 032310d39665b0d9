"""The torch.library glue: schemas, fake kernels, autograd, opcheck and torch.compile, and the backend dispatch.

The glue of dre_kernels/_library.py is shared by every kernel backend. It is tested here on each kernel backend
available, and always on an eager test backend ("eagertest") whose six operators are written with the torch
backend, so the registration itself is covered even on a machine where no kernel backend is built.
"""

import importlib
import os
import re

import pytest
import torch

import dre_kernels
from conftest import assert_close
from dre_kernels import _backend, _library
from dre_kernels.contrastive_loss import contrastive_loss_backward_torch, contrastive_loss_parts_torch
from dre_kernels.residual_encode import residual_encode_backward_torch, residual_encode_torch

re_mod = importlib.import_module("dre_kernels.residual_encode")
bank_mod = importlib.import_module("dre_kernels.bank")


# ------------------------------------------------------------------------------------ the eager test backend
def _re_fwd(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard):
    with torch.no_grad():
        E, mass = residual_encode_torch(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard)
    return E.contiguous(), mass.contiguous()


def _re_bwd(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, mass, hard, nx, nc, ns):
    g = residual_encode_backward_torch(grad_E, x, x_offsets, codewords, scale, bank, bank_index, bank_offsets, hard,
                                       mass)
    return tuple(t.contiguous() for t in g)


def _cl_fwd(a, b, s, labels, normalize):
    with torch.no_grad():
        return tuple(t.contiguous() for t in contrastive_loss_parts_torch(a, b, s, labels, normalize))


def _cl_bwd(g, a, b, s, labels, normalize, row_lse, col_lse, row_loss, col_loss):
    ga, gb, gs = contrastive_loss_backward_torch(g, a, b, s, labels, normalize, row_lse, col_lse, row_loss, col_loss)
    return ga.contiguous(), gb.contiguous(), gs.reshape(()).clone()


def _gather(bank, index):
    return bank.index_select(0, index).clone()


def _update(bank, index, values, momentum, normalize):
    bank_mod.bank_update_torch_(bank, index, values, momentum, normalize)


if "eagertest" not in _library.PREFIXES:
    _library.define_python_backend(
        "eagertest",
        {"residual_encode_fwd": _re_fwd, "residual_encode_bwd": _re_bwd, "contrastive_loss_fwd": _cl_fwd,
         "contrastive_loss_bwd": _cl_bwd, "bank_gather": _gather, "bank_update_": _update},
        dispatch_keys=("CPU",), prefix="eagertest_")

KERNEL_BACKENDS = ["eagertest"] + [b for b in dre_kernels.available_backends("cpu") if b in _library.PREFIXES]


def op(backend, name):
    return _backend.kernel(backend, name)


def sample_inputs(hard=False, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=dtype).requires_grad_(requires_grad)
    off = torch.tensor([0, 3, 3, 7])
    c = torch.randn(4, 5, generator=g, dtype=dtype).requires_grad_(requires_grad)
    s = None if hard else (0.2 + torch.rand(4, generator=g, dtype=dtype)).requires_grad_(requires_grad)
    bank = torch.randn(9, 5, generator=g).to(torch.bfloat16)
    bi = torch.tensor([1, 8, 8, 0, 2], dtype=torch.int32)
    bo = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    return x, off, c, s, bank, bi, bo


# ------------------------------------------------------------------------------------ schemas
def test_native_schemas_match_python():
    if _library.native_error is not None:
        pytest.skip(f"dre_kernels._C not loaded: {_library.native_error}")
    for name, schema in _library.SCHEMAS.items():
        assert str(getattr(torch.ops.dre, name).default._schema) == f"dre::{name}{schema}"


def test_ops_cpp_holds_the_same_schemas():
    """csrc/ops.cpp is compiled by CI; compare its text with SCHEMAS even where it is not built."""
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "ops.cpp")
    text = open(path).read()
    defs = ["".join(re.findall(r'"([^"]*)"', body)) for body in re.findall(r"m\.def\((.*?)\);", text, re.S)]
    assert sorted(defs) == sorted(f"{name}{schema}" for name, schema in _library.SCHEMAS.items())


# ------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_opcheck_residual_encode(backend, hard):
    args = sample_inputs(hard)
    torch.library.opcheck(op(backend, "residual_encode_fwd"), (*args, hard))
    x, off, c, s, bank, bi, bo = sample_inputs(hard, requires_grad=False)
    grad_E = torch.randn(3, 4, 5)
    mass = op(backend, "residual_encode_fwd")(x, off, c, s, bank, bi, bo, hard)[1] if hard else None
    torch.library.opcheck(op(backend, "residual_encode_bwd"), (grad_E, x, off, c, s, bank, bi, bo, mass, hard, True,
                                                                True, not hard))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 0, 2, 1])], ids=["no_labels", "labels"])
def test_opcheck_contrastive_loss(backend, labels):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 3, generator=g, requires_grad=True)
    b = torch.randn(5, 3, generator=g, requires_grad=True)
    s = torch.tensor(1.7, requires_grad=True)
    torch.library.opcheck(op(backend, "contrastive_loss_fwd"), (a, b, s, labels, True))
    saved = op(backend, "contrastive_loss_fwd")(a.detach(), b.detach(), s.detach(), labels, True)[1:]
    torch.library.opcheck(op(backend, "contrastive_loss_bwd"),
                          (torch.randn(5), a.detach(), b.detach(), s.detach(), labels, True, *saved))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_bank_ops(backend):
    bank = torch.randn(10, 4)
    torch.library.opcheck(op(backend, "bank_gather"), (bank, torch.tensor([3, 3, 9])))
    torch.library.opcheck(op(backend, "bank_gather"), (bank.clone().requires_grad_(), torch.tensor([3, 3, 9])))
    torch.library.opcheck(op(backend, "bank_update_"), (bank, torch.tensor([4, 1]), torch.randn(2, 4), 0.5, True))


# ------------------------------------------------------------------------------------ autograd glue
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_registered_autograd_matches_reference(backend, hard):
    x, off, c, s, bank, bi, bo = sample_inputs(hard)
    E, mass = op(backend, "residual_encode_fwd")(x, off, c, s, bank, bi, bo, hard)
    assert not mass.requires_grad
    E_ref = dre_kernels.residual_encode(x, off, c, s, bank=bank, bank_index=bi, bank_offsets=bo,
                                        assignment="hard" if hard else "soft", backend="reference")
    gE = torch.randn_like(E)
    wrt = [x, c] + ([s] if not hard else [])
    for a, b in zip(torch.autograd.grad(E, wrt, gE), torch.autograd.grad(E_ref, wrt, gE)):
        assert_close(a, b)


# ------------------------------------------------------------------------------------ torch.compile
def _compile_target(backend):
    def step(x, off, c, s, bank, bi, bo, a, b, logit_scale):
        E = dre_kernels.residual_encode(x, off, c, s, bank=bank, bank_index=bi, bank_offsets=bo, backend=backend)
        slide = E.flatten(1)[:, : a.shape[1]]
        return dre_kernels.contrastive_loss(slide + a, b, logit_scale, normalize=True, backend=backend)
    return step


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "eagertest"] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="no kernel backend built here"))])
def test_torch_compile_fullgraph(backend):
    x, off, c, s, bank, bi, bo = sample_inputs()
    a = torch.randn(3, 6, requires_grad=True)
    b = torch.randn(3, 6)
    logit_scale = torch.tensor(2.0, requires_grad=True)
    eager = _compile_target(backend)(x, off, c, s, bank, bi, bo, a, b, logit_scale)
    torch._dynamo.reset()
    compiled = torch.compile(_compile_target(backend), fullgraph=True, backend="aot_eager")
    out = compiled(x, off, c, s, bank, bi, bo, a, b, logit_scale)
    assert_close(out, eager)
    g1 = torch.autograd.grad(out, [x, c, s, a, logit_scale])
    g2 = torch.autograd.grad(eager, [x, c, s, a, logit_scale])
    for u, v in zip(g1, g2):
        assert_close(u, v)


def test_torch_compile_fullgraph_on_the_registered_ops():
    """The eagertest ops (same fake kernels and autograd as every kernel backend) compile with fullgraph=True."""
    re_fwd, cl_fwd = op("eagertest", "residual_encode_fwd"), op("eagertest", "contrastive_loss_fwd")

    def step(x, off, c, s, bank, bi, bo, b, logit_scale):
        E, _ = re_fwd(x, off, c, s, bank, bi, bo, False)
        return cl_fwd(E.flatten(1)[:, :6], b, logit_scale, None, True)[0].mean()

    x, off, c, s, bank, bi, bo = sample_inputs()
    b, ls = torch.randn(3, 6), torch.tensor(2.0, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, off, c, s, bank, bi, bo, b, ls)
    want = step(x, off, c, s, bank, bi, bo, b, ls)
    assert_close(out, want)
    for u, v in zip(torch.autograd.grad(out, [x, c, s, ls]), torch.autograd.grad(want, [x, c, s, ls])):
        assert_close(u, v)


# ------------------------------------------------------------------------------------ dispatch
def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("DRE_KERNELS_BACKEND", "reference")
    assert _backend.resolve_backend("auto", "cpu") == "reference"
    assert _backend.resolve_backend("torch", "cpu") == "torch"  # an explicit backend= wins
    monkeypatch.setenv("DRE_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DRE_KERNELS_BACKEND"):
        _backend.resolve_backend("auto", "cpu")


def test_auto_on_cpu_takes_native_if_built_else_torch(monkeypatch):
    monkeypatch.delenv("DRE_KERNELS_BACKEND", raising=False)
    want = "native" if "native" in dre_kernels.available_backends("cpu") else "torch"
    assert _backend.resolve_backend("auto", "cpu", [torch.float32]) == want


def test_auto_falls_back_to_torch_for_unsupported_dtypes(monkeypatch):
    monkeypatch.delenv("DRE_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_unavailable_reason", lambda name, dev: None)
    # pretend every backend runs: float64 on CUDA is only for the eager backends
    assert _backend.resolve_backend("auto", "cuda", [torch.float64]) == "torch"
    assert _backend.resolve_backend("auto", "cuda", [torch.bfloat16]) == "native"
    with pytest.raises(TypeError, match="float64"):
        _backend.resolve_backend("triton", "cuda", [torch.float64])


def test_auto_on_cuda_takes_the_measured_faster_backend_of_each_op(monkeypatch):
    """H100 (benchmarks/results): triton is the faster for residual_encode and contrastive_loss, native for the
    bank ops; each falls back to the other, then to torch."""
    monkeypatch.delenv("DRE_KERNELS_BACKEND", raising=False)
    gone = set()
    monkeypatch.setattr(_backend, "_unavailable_reason", lambda name, dev: "gone" if name in gone else None)
    bf16 = [torch.bfloat16]
    assert _backend.resolve_backend("auto", "cuda", bf16, "residual_encode") == "triton"
    assert _backend.resolve_backend("auto", "cuda", bf16, "contrastive_loss") == "triton"
    assert _backend.resolve_backend("auto", "cuda", bf16, "bank_update_") == "native"
    assert _backend.resolve_backend("auto", "cpu", bf16, "residual_encode") == "native"
    gone.add("triton")
    assert _backend.resolve_backend("auto", "cuda", bf16, "residual_encode") == "native"
    gone.add("native")
    assert _backend.resolve_backend("auto", "cuda", bf16, "contrastive_loss") == "torch"
    monkeypatch.setenv("DRE_KERNELS_BACKEND", "cupy")
    gone.clear()
    assert _backend.resolve_backend("auto", "cuda", bf16, "residual_encode") == "cupy"  # the variable still wins


def test_available_and_unavailable_cover_every_backend():
    for device in ("cpu", "cuda"):
        avail, unavail = dre_kernels.available_backends(device), dre_kernels.unavailable_backends(device)
        assert sorted(avail + list(unavail)) == sorted(dre_kernels.BACKENDS)
        assert all(isinstance(why, str) and why for why in unavail.values())
    if not torch.cuda.is_available():
        assert dre_kernels.available_backends("cuda") == ["reference", "torch"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 0, 2, 1, 0])], ids=["no_labels", "labels"])
@pytest.mark.parametrize("normalize", [False, True])
def test_registered_contrastive_autograd_matches_reference(backend, labels, normalize):
    g = torch.Generator().manual_seed(6)
    dtype = torch.float64 if backend == "eagertest" or torch.float64 in _backend.supported_dtypes(backend, "cpu") \
        else torch.float32
    a = torch.randn(6, 4, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=dtype, requires_grad=True)
    s = torch.tensor(1.9, dtype=dtype, requires_grad=True)
    loss = op(backend, "contrastive_loss_fwd")(a, b, s, labels, normalize)[0]
    want = dre_kernels.contrastive_loss(a, b, s, labels=labels, normalize=normalize, reduction="none",
                                        backend="reference")
    w = torch.randn(6, generator=g, dtype=dtype)
    assert_close(loss, want)
    for u, v in zip(torch.autograd.grad((loss * w).sum(), [a, b, s]), torch.autograd.grad((want * w).sum(), [a, b, s])):
        assert_close(u, v)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_gets_no_zero_filled_grads_for_outputs_without_one(backend):
    """The outputs no loss depends on (mass; row_lse, col_lse, r, c) reach the registered backward as None: autograd
    would otherwise allocate and zero-fill a tensor for each (a fill kernel each on GPU, four per contrastive
    backward) that the backward never reads. Seen in torch.profiler as aten::zeros under the operator's autograd
    node."""
    from torch.profiler import ProfilerActivity, profile

    x, xo, c, s, bank, bi, bo = sample_inputs()
    g = torch.Generator().manual_seed(8)
    a = torch.randn(6, 4, generator=g, requires_grad=True)
    b = torch.randn(6, 4, generator=g, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op(backend, "residual_encode_fwd")(x, xo, c, s, bank, bi, bo, False)[0].sum().backward()
        op(backend, "contrastive_loss_fwd")(a, b, torch.tensor(2.0), None, False)[0].sum().backward()
    nodes = {e.name for e in prof.events() if e.name.endswith("Backward") and "_fwd" in e.name}
    assert any("residual_encode_fwd" in n for n in nodes) and any("contrastive_loss_fwd" in n for n in nodes), nodes
    fills = [e.cpu_parent.name for e in prof.events()
             if e.name in ("aten::zeros", "aten::zeros_like") and e.cpu_parent is not None
             and e.cpu_parent.name in nodes]
    assert not fills, fills


def test_package_imports_and_reports_backends_without_the_extension():
    """With dre_kernels._C missing (not built), the package imports, `native` is reported unavailable with the
    reason, and the eager backends work."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['dre_kernels._C'] = None\n"  # makes `from dre_kernels import _C` raise ImportError
        "import torch, dre_kernels\n"
        "print(dre_kernels.available_backends('cpu'))\n"
        "print(dre_kernels.unavailable_backends('cpu')['native'])\n"
        "E = dre_kernels.residual_encode(torch.randn(4, 3), torch.tensor([0, 4]), torch.randn(2, 3), torch.ones(2))\n"
        "print(tuple(E.shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DRE_KERNELS_BACKEND": "auto"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "native" not in lines[0] and "'torch'" in lines[0]
    assert "not built" in lines[1]
    assert lines[2] == "(1, 2, 3)"


def test_package_imports_on_a_machine_with_no_gpu_driver():
    """With the interpreter off and no GPU driver, the package imports and the CPU backends work: the Triton
    autotuners are built at the first GPU launch, not at import. triton < 3.3 builds an autotuner by asking for the
    active driver, which raises on a CPU machine ("0 active drivers"); emulated here by a triton.autotune that raises
    so, as any triton would on that machine."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = (
        "import triton\n"
        "def autotune(*args, **kwargs):\n"
        "    raise RuntimeError('0 active drivers ([]). There should only be one.')\n"
        "triton.autotune = autotune\n"
        "import torch, dre_kernels\n"
        "print(dre_kernels.available_backends('cpu'))\n"
        "print(dre_kernels.unavailable_backends('cpu')['triton'])\n"
        "E = dre_kernels.residual_encode(torch.randn(4, 3), torch.tensor([0, 4]), torch.randn(2, 3), torch.ones(2))\n"
        "print(tuple(E.shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "DRE_KERNELS_BACKEND": "auto"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "triton" not in lines[0] and "'torch'" in lines[0]
    assert "TRITON_INTERPRET" in lines[1]
    assert lines[2] == "(1, 2, 3)"
