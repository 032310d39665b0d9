"""pytest-benchmark entry points for the CPU cases: `pytest benchmarks/ --benchmark-only`.

Every op x CPU provider (reference, torch, and the kernel backends available here; not torch_compile, whose
compile time would dominate) at the small shapes of the quick sweep, mode fwd+bwd for the differentiable ops.
Each test uses benchmark.pedantic with a fixed number of rounds, so without --benchmark-only it also runs cheaply
(and once under --benchmark-disable). The tests check the op's result is finite: a benchmark of a broken op fails.
Not collected by `pytest tests` (the suite's testpaths is tests/).
"""

import math

import pytest
import torch

from benchmarks import cases as C

DEVICE = torch.device("cpu")
PROVIDERS = [p for p in C.default_providers(DEVICE) if p != "torch_compile"]


def _small_cases():
    by_op = {}
    for c in C.make_cases("quick"):
        by_op.setdefault(c.op, c)  # the first (smallest) shape of each op
    return list(by_op.values())


CASES = _small_cases()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.op for c in CASES])
def test_op(benchmark, case, provider):
    mode = "fwd+bwd" if case.op in C.DIFFERENTIABLE else "fwd"
    inputs = C.make_inputs(case, DEVICE)
    fn = C.build(case, provider, mode, inputs)
    benchmark.group = f"{case.op} {mode} {case.label()}"
    benchmark.extra_info.update(op=case.op, provider=provider, mode=mode, bytes=C.bytes_moved(case, mode))
    out = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    outs = out if isinstance(out, (tuple, list)) else [out]
    for t in outs:
        assert torch.isfinite(t.float()).all(), f"{case.op} on {provider} gave non-finite values"
    assert not math.isnan(C.bytes_moved(case, mode))
