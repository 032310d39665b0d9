"""SPEC.md 'Bad input': one test per error, each checking the exception type and that it names the argument."""

import pytest
import torch

from dre_kernels import bank_gather, bank_update_, contrastive_loss, kmeans, residual_encode

ALL = ["reference", "torch", "auto"]


def re_args(**over):
    args = dict(x=torch.randn(5, 4), x_offsets=torch.tensor([0, 2, 5]), codewords=torch.randn(3, 4),
                scale=torch.ones(3), bank=torch.randn(6, 4), bank_index=torch.tensor([0, 5, 1]),
                bank_offsets=torch.tensor([0, 1, 3]))
    args.update(over)
    return args


def call_re(backend="auto", assignment="soft", **over):
    a = re_args(**over)
    return residual_encode(a.pop("x"), a.pop("x_offsets"), a.pop("codewords"), a.pop("scale"),
                           assignment=assignment, backend=backend, **a)


RESIDUAL_ENCODE_ERRORS = [
    # (id, overrides, extra kwargs, exception, words the message must contain)
    ("x_int", dict(x=torch.ones(5, 4, dtype=torch.int64)), {}, TypeError, ["x", "floating"]),
    ("x_complex", dict(x=torch.randn(5, 4, dtype=torch.complex64)), {}, TypeError, ["x"]),
    ("x_1d", dict(x=torch.randn(5)), {}, ValueError, ["x", "2-D"]),
    ("x_not_tensor", dict(x=[[1.0]]), {}, TypeError, ["x"]),
    ("codewords_width", dict(codewords=torch.randn(3, 5)), {}, ValueError, ["codewords", "D"]),
    ("too_many_codewords", dict(codewords=torch.randn(257, 4), scale=torch.ones(257)), {}, ValueError, ["K", "256"]),
    ("too_wide", dict(x=torch.randn(5, 4097), codewords=torch.randn(3, 4097), bank=torch.randn(6, 4097)), {},
     ValueError, ["D", "4096"]),
    ("offsets_float", dict(x_offsets=torch.tensor([0.0, 2.0, 5.0])), {}, TypeError, ["x_offsets", "int"]),
    ("offsets_start", dict(x_offsets=torch.tensor([1, 2, 5])), {}, ValueError, ["x_offsets", "0"]),
    ("offsets_decrease", dict(x_offsets=torch.tensor([0, 4, 3, 5]), bank_offsets=torch.tensor([0, 1, 2, 3])), {},
     ValueError, ["x_offsets", "non-decreasing"]),
    ("offsets_end", dict(x_offsets=torch.tensor([0, 2, 4])), {}, ValueError, ["x_offsets", "5"]),
    ("offsets_empty", dict(x_offsets=torch.tensor([], dtype=torch.int64)), {}, ValueError, ["x_offsets"]),
    ("offsets_2d", dict(x_offsets=torch.tensor([[0, 2, 5]])), {}, ValueError, ["x_offsets", "1-D"]),
    ("bank_offsets_end", dict(bank_offsets=torch.tensor([0, 1, 2])), {}, ValueError, ["bank_offsets", "3"]),
    ("bank_offsets_len", dict(bank_offsets=torch.tensor([0, 3])), {}, ValueError, ["bank_offsets", "B+1"]),
    ("bank_index_range", dict(bank_index=torch.tensor([0, 6, 1])), {}, IndexError, ["bank_index", "6"]),
    ("bank_index_negative", dict(bank_index=torch.tensor([0, -1, 1])), {}, IndexError, ["bank_index", "-1"]),
    ("bank_index_float", dict(bank_index=torch.tensor([0.0, 1.0, 1.0])), {}, TypeError, ["bank_index"]),
    ("bank_partly", dict(bank_offsets=None), {}, ValueError, ["bank_offsets", "together"]),
    ("bank_width", dict(bank=torch.randn(6, 3)), {}, ValueError, ["bank", "D"]),
    ("bank_int", dict(bank=torch.ones(6, 4, dtype=torch.int32)), {}, TypeError, ["bank"]),
    ("scale_missing", dict(scale=None), {}, ValueError, ["scale", "soft"]),
    ("scale_shape", dict(scale=torch.ones(4)), {}, ValueError, ["scale", "(3,)"]),
    ("assignment", {}, dict(assignment="fuzzy"), ValueError, ["assignment", "fuzzy"]),
    ("backend_unknown", {}, dict(backend="cuda-magic"), ValueError, ["backend", "cuda-magic"]),
]


@pytest.mark.parametrize("case", RESIDUAL_ENCODE_ERRORS, ids=[c[0] for c in RESIDUAL_ENCODE_ERRORS])
@pytest.mark.parametrize("backend", ALL)
def test_residual_encode_errors(case, backend):
    _, over, extra, exc, words = case
    extra = dict(extra)
    extra.setdefault("backend", backend)
    with pytest.raises(exc) as e:
        call_re(**extra, **over)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_hard_ignores_scale():
    call_re(assignment="hard", scale=None)
    call_re(assignment="hard", scale="anything")


def test_mixed_devices_raise_runtime_error():
    meta = torch.empty(5, 4, device="meta")
    with pytest.raises(RuntimeError, match="device"):
        call_re(x=meta)


def test_unavailable_backend_raises_runtime_error_naming_it():
    import dre_kernels

    missing = [b for b in dre_kernels.BACKENDS if b not in dre_kernels.available_backends("cpu")]
    assert "cupy" in missing  # CuPy never runs on CPU tensors
    for b in missing:
        with pytest.raises(RuntimeError, match=b):
            call_re(backend=b)


CONTRASTIVE_ERRORS = [
    ("a_int", dict(a=torch.ones(4, 3, dtype=torch.int64)), TypeError, ["a"]),
    ("shape_mismatch", dict(b=torch.randn(4, 5)), ValueError, ["a and b", "shape"]),
    ("empty_batch", dict(a=torch.randn(0, 3), b=torch.randn(0, 3)), ValueError, ["B >= 1"]),
    ("a_1d", dict(a=torch.randn(4), b=torch.randn(4)), ValueError, ["a", "2-D"]),
    ("scale_vector", dict(logit_scale=torch.ones(2)), ValueError, ["logit_scale", "0-dim"]),
    ("scale_str", dict(logit_scale="1.0"), TypeError, ["logit_scale"]),
    ("scale_int_tensor", dict(logit_scale=torch.tensor(1)), TypeError, ["logit_scale"]),
    ("labels_float", dict(labels=torch.zeros(4)), TypeError, ["labels"]),
    ("labels_shape", dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, ["labels", "(4,)"]),
    ("reduction", dict(reduction="sum"), ValueError, ["reduction", "sum"]),
    ("normalize_str", dict(normalize="yes"), TypeError, ["normalize"]),
]


@pytest.mark.parametrize("case", CONTRASTIVE_ERRORS, ids=[c[0] for c in CONTRASTIVE_ERRORS])
@pytest.mark.parametrize("backend", ALL)
def test_contrastive_loss_errors(case, backend):
    _, over, exc, words = case
    args = dict(a=torch.randn(4, 3), b=torch.randn(4, 3), logit_scale=1.0) | over
    with pytest.raises(exc) as e:
        contrastive_loss(args.pop("a"), args.pop("b"), args.pop("logit_scale"), backend=backend, **args)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


BANK_ERRORS = [
    ("index_range", dict(index=torch.tensor([0, 8])), IndexError, ["index", "8"]),
    ("index_float", dict(index=torch.tensor([0.0, 1.0])), TypeError, ["index"]),
    ("index_2d", dict(index=torch.tensor([[0, 1]])), ValueError, ["index", "1-D"]),
    ("bank_int", dict(bank=torch.ones(8, 3, dtype=torch.int64)), TypeError, ["bank"]),
]


@pytest.mark.parametrize("case", BANK_ERRORS, ids=[c[0] for c in BANK_ERRORS])
@pytest.mark.parametrize("backend", ALL)
def test_bank_gather_errors(case, backend):
    _, over, exc, words = case
    args = dict(bank=torch.randn(8, 3), index=torch.tensor([0, 1])) | over
    with pytest.raises(exc) as e:
        bank_gather(args["bank"], args["index"], backend=backend)
    for w in words:
        assert w in str(e.value)


BANK_UPDATE_ERRORS = BANK_ERRORS + [
    ("duplicates", dict(index=torch.tensor([3, 3])), ValueError, ["index", "repeat"]),
    ("values_shape", dict(values=torch.randn(3, 3)), ValueError, ["values", "(2, 3)"]),
    ("values_int", dict(values=torch.ones(2, 3, dtype=torch.int32)), TypeError, ["values"]),
    ("momentum_range", dict(momentum=1.5), ValueError, ["momentum", "[0, 1]"]),
    ("momentum_type", dict(momentum="0.1"), TypeError, ["momentum"]),
    ("bank_requires_grad", dict(bank=torch.randn(8, 3, requires_grad=True)), ValueError, ["bank", "grad"]),
]


@pytest.mark.parametrize("case", BANK_UPDATE_ERRORS, ids=[c[0] for c in BANK_UPDATE_ERRORS])
@pytest.mark.parametrize("backend", ALL)
def test_bank_update_errors(case, backend):
    _, over, exc, words = case
    args = dict(bank=torch.randn(8, 3), index=torch.tensor([0, 1]), values=torch.randn(2, 3), momentum=0.1) | over
    before = args["bank"].detach().clone()
    with pytest.raises(exc) as e:
        bank_update_(args["bank"], args["index"], args["values"], momentum=args["momentum"], backend=backend)
    for w in words:
        assert w in str(e.value)
    if args["bank"].dtype == before.dtype:
        assert torch.equal(args["bank"].detach(), before)  # checked before any write


def test_kmeans_too_few_rows():
    with pytest.raises(ValueError, match="at least k"):
        kmeans(torch.randn(3, 2), 4)


def test_kmeans_int_input():
    with pytest.raises(TypeError, match="x"):
        kmeans(torch.ones(10, 2, dtype=torch.int64), 2)
