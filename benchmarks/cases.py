"""What the suite measures: ops x shapes (sweeps), providers, modes, and how each measurement is built.

Ops: residual_encode_soft, residual_encode_hard, contrastive_loss, bank_gather, bank_update_, kmeans.
Providers: `reference`, `torch`, `torch_compile` (the public op with backend="torch" under
torch.compile(fullgraph=False): the torch backend graph-breaks on .tolist() of the offsets and loops over slides
in Python, so fullgraph=True is impossible; default automatic dynamic shapes, see `_compiled`; compile time is
excluded by an extra warm-up call), and every kernel backend dre_kernels.available_backends(device) lists
(`triton` on CPU only when asked for with --providers: it runs in the interpreter).
Modes: `fwd` (the training forward: inputs require grad, so the autograd graph is built), `bwd` (the backward of
one forward, retain_graph=True so it can be repeated), `fwd+bwd`. bank_gather, bank_update_ and kmeans have no
backward and run `fwd` only.

Shapes. residual_encode: B slides, each `fresh` fresh rows (x, requires grad) + `rows - fresh` bank rows gathered
by a random permutation from a bank of exactly that many rows; K codewords (float32, like AMP parameters), D
width, x in `dtype`, bank in `bank_dtype`, soft scale (0.5 + U[0,1)) / D. contrastive_loss: a, b (B, P) both
require grad, normalize=True, labels=None, logit_scale a 0-dim tensor that requires grad. bank_gather: B * rows
distinct rows of a bank of that many rows. bank_update_: the same rows, float32 values, momentum 0.5.
kmeans: `rows` rows (N, D), k = K, 5 Lloyd iterations after k-means++ (the init runs on the CPU in every backend).

Bytes (for GB/s), per op and mode, counted as the rows a fused kernel must touch, in their dtypes:
residual_encode: fresh rows + gathered bank rows + codewords read, once per pass (fwd: 1, bwd: 1, the backward
recomputes the assignments from the rows; fwd+bwd: 2). contrastive_loss: a + b read once per pass.
bank_gather: rows read + written. bank_update_: bank rows read + values read + bank rows written.
kmeans: N rows read per iteration.

Memory estimates (`estimate_bytes`) are rough upper bounds used only to skip a provider/shape whose intermediates
cannot fit (e.g. `reference` materialises N x K x D residuals per slide and keeps them for the backward).
"""

from __future__ import annotations

import dataclasses
import math

import torch

import dre_kernels
from dre_kernels import bank_gather, bank_update_, contrastive_loss, kmeans, residual_encode

OPS = ("residual_encode_soft", "residual_encode_hard", "contrastive_loss", "bank_gather", "bank_update_", "kmeans")
MODES = ("fwd", "bwd", "fwd+bwd")
DIFFERENTIABLE = ("residual_encode_soft", "residual_encode_hard", "contrastive_loss")
KMEANS_ITERS = 5

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Sweep sizes per scale. "gpu" is the full sweep of the issue; "cpu" the default on a CPU (2 cores: B=4 slides, rows
# per slide up to 8320, K/D sweeps at 2048 rows per slide, loss B up to 4096), "quick" the one-minute subset.
SCALES = {
    "gpu": dict(B=16, fresh=128, rows=[1024, 2048, 4096, 8320, 16384, 32768, 65536], base_rows=8320,
                K=[16, 32, 64, 128, 256], base_K=64, D=[128, 256, 384, 512, 1024], base_D=384,
                dtypes=["float32", "bfloat16", "float16"], loss_B=[64, 256, 1024, 4096, 16384, 65536],
                base_loss_B=4096, P=512, headline=True),
    "cpu": dict(B=4, fresh=128, rows=[1024, 2048, 4096, 8320], base_rows=2048,
                K=[16, 64, 256], base_K=64, D=[128, 384, 1024], base_D=384,
                dtypes=["float32", "bfloat16"], loss_B=[64, 256, 1024, 4096], base_loss_B=1024, P=512,
                headline=True),
    "quick": dict(B=2, fresh=64, rows=[256, 1024], base_rows=1024, K=[16], base_K=16, D=[128], base_D=128,
                  dtypes=[], loss_B=[64, 256], base_loss_B=256, P=128, headline=False),
}

# The headline shape of SPEC.md ("DRE-SLCL step").
HEADLINE = dict(B=16, fresh=128, rows=128 + 8192, K=64, D=384, dtype="float32", bank_dtype="bfloat16")

# The reference bank ops loop over rows in Python: past this many rows a call takes minutes on a GPU.
REFERENCE_MAX_LOOP_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    sweep: str                  # which sweep it belongs to: rows, K, D, dtype, B, headline
    B: int                      # slides (residual_encode, bank ops) or loss batch (contrastive_loss)
    rows: int = 0               # rows per slide (fresh + bank); kmeans: rows clustered
    fresh: int = 0              # fresh rows per slide
    K: int = 0
    D: int = 0
    P: int = 0
    dtype: str = "float32"      # x / a, b / values / kmeans rows
    bank_dtype: str = ""

    @property
    def key(self):
        """Identity of the measured shape (the sweep it came from does not matter)."""
        return (self.op, self.B, self.rows, self.fresh, self.K, self.D, self.P, self.dtype, self.bank_dtype)

    def label(self) -> str:
        if self.op == "contrastive_loss":
            return f"B={self.B} P={self.P} {self.dtype}"
        if self.op == "kmeans":
            return f"N={self.rows} k={self.K} D={self.D} {self.dtype}"
        if self.op.startswith("residual_encode"):
            return (f"B={self.B} rows={self.fresh}+{self.rows - self.fresh} K={self.K} D={self.D} "
                    f"x={self.dtype} bank={self.bank_dtype}")
        return f"{self.B}x{self.rows} rows D={self.D} bank={self.bank_dtype}"


def modes_of(op: str):
    return MODES if op in DIFFERENTIABLE else ("fwd",)


def make_cases(scale: str, ops=OPS) -> list[Case]:
    s = SCALES[scale]
    B, fresh, bank_dt = s["B"], s["fresh"], "bfloat16"
    base_dt = "float32"
    cases: list[Case] = []

    def re(op, sweep, rows, K, D, dt):
        return Case(op, sweep, B, rows=rows, fresh=min(fresh, rows // 2), K=K, D=D, dtype=dt, bank_dtype=bank_dt)

    for op in ops:
        if op.startswith("residual_encode"):
            cases += [re(op, "rows", r, s["base_K"], s["base_D"], base_dt) for r in s["rows"]]
            cases += [re(op, "K", s["base_rows"], k, s["base_D"], base_dt) for k in s["K"]]
            cases += [re(op, "D", s["base_rows"], s["base_K"], d, base_dt) for d in s["D"]]
            cases += [re(op, "dtype", s["base_rows"], s["base_K"], s["base_D"], dt) for dt in s["dtypes"]]
        elif op == "contrastive_loss":
            cases += [Case(op, "B", b, P=s["P"], dtype=base_dt) for b in s["loss_B"]]
            cases += [Case(op, "dtype", s["base_loss_B"], P=s["P"], dtype=dt) for dt in s["dtypes"]]
        elif op in ("bank_gather", "bank_update_"):
            cases += [Case(op, "rows", B, rows=r, D=s["base_D"], dtype=base_dt, bank_dtype=bank_dt)
                      for r in s["rows"]]
            cases += [Case(op, "dtype", B, rows=s["base_rows"], D=s["base_D"], dtype=base_dt, bank_dtype=dt)
                      for dt in s["dtypes"]]
        elif op == "kmeans":
            cases += [Case(op, "rows", 1, rows=r, K=s["base_K"], D=s["base_D"], dtype=base_dt) for r in s["rows"]]
            cases += [Case(op, "K", 1, rows=s["base_rows"], K=k, D=s["base_D"], dtype=base_dt) for k in s["K"]]
        else:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    if s["headline"]:
        cases += headline_cases(ops, s["P"])
    seen, out = set(), []
    for c in cases:  # the base shape appears in several sweeps: measure it once
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def headline_cases(ops=OPS, P=512) -> list[Case]:
    """Each op at the headline shape: the step's residual encoding and loss, its bank gather (B x 8192 rows) and
    write-back (B x 128 rows). kmeans has none (it runs once, not per step)."""
    h, out = HEADLINE, []
    for op in ops:
        if op.startswith("residual_encode"):
            out.append(Case(op, "headline", h["B"], rows=h["rows"], fresh=h["fresh"], K=h["K"], D=h["D"],
                            dtype=h["dtype"], bank_dtype=h["bank_dtype"]))
        elif op == "contrastive_loss":
            out.append(Case(op, "headline", h["B"], P=P, dtype=h["dtype"]))
        elif op in ("bank_gather", "bank_update_"):
            rows = h["rows"] - h["fresh"] if op == "bank_gather" else h["fresh"]
            out.append(Case(op, "headline", h["B"], rows=rows, D=h["D"], dtype=h["dtype"], bank_dtype=h["bank_dtype"]))
    return out


def default_providers(device: torch.device, explicit=None) -> list[str]:
    if explicit:
        return list(explicit)
    kernels = [b for b in dre_kernels.available_backends(device) if b not in ("reference", "torch")]
    if device.type == "cpu":
        kernels = [b for b in kernels if b != "triton"]  # the Triton interpreter is a test tool, not a provider
    return ["reference", "torch", "torch_compile"] + kernels


# ---------------------------------------------------------------------------------------------- sizes
def _nbytes(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def bytes_moved(c: Case, mode: str) -> float:
    passes = 2 if mode == "fwd+bwd" else 1
    if c.op.startswith("residual_encode"):
        M, Mb = c.B * c.fresh, c.B * (c.rows - c.fresh)
        return passes * (M * c.D * _nbytes(c.dtype) + Mb * c.D * _nbytes(c.bank_dtype) + c.K * c.D * 4)
    if c.op == "contrastive_loss":
        return passes * 2 * c.B * c.P * _nbytes(c.dtype)
    n = c.B * c.rows
    if c.op == "bank_gather":
        return 2 * n * c.D * _nbytes(c.bank_dtype)
    if c.op == "bank_update_":
        return n * c.D * (2 * _nbytes(c.bank_dtype) + _nbytes(c.dtype))
    if c.op == "kmeans":
        return KMEANS_ITERS * c.rows * c.D * _nbytes(c.dtype)
    raise ValueError(c.op)


def input_bytes(c: Case) -> float:
    if c.op.startswith("residual_encode"):
        M, Mb = c.B * c.fresh, c.B * (c.rows - c.fresh)
        return M * c.D * _nbytes(c.dtype) + Mb * (c.D * _nbytes(c.bank_dtype) + 8) + c.K * c.D * 4
    if c.op == "contrastive_loss":
        return 2 * c.B * c.P * _nbytes(c.dtype)
    n = c.B * c.rows
    if c.op in ("bank_gather", "bank_update_"):
        return n * (c.D * (_nbytes(c.bank_dtype) + _nbytes(c.dtype)) + 8)
    return c.rows * c.D * _nbytes(c.dtype)


def estimate_bytes(c: Case, provider: str, mode: str) -> float:
    """Rough peak of inputs + intermediates (bytes); only used to skip what cannot fit."""
    base = input_bytes(c)
    f4 = 4
    if c.op.startswith("residual_encode"):
        N, Ntot, M = c.rows, c.B * c.rows, c.B * c.fresh
        if provider == "reference":  # (N, K, D) residuals per slide, kept for the backward of every slide
            return base + 3 * Ntot * c.K * c.D * f4 + 3 * N * c.K * c.D * f4
        if provider in ("torch", "torch_compile"):  # gathered rows in float32 and the N x K scores, kept by autograd
            return base + 3 * Ntot * c.D * f4 + 6 * Ntot * c.K * f4
        return base + 4 * c.B * c.K * c.D * f4 + 2 * M * c.D * f4
    if c.op == "contrastive_loss":
        if provider in ("reference", "torch", "torch_compile"):  # B x B logits and softmaxes (+ their grads)
            return base + (3 if mode == "fwd" else 5) * c.B * c.B * f4
        return base + 8 * c.B * c.P * f4
    if c.op in ("bank_gather", "bank_update_"):
        return base + 3 * c.B * c.rows * c.D * f4
    if c.op == "kmeans":
        if provider == "reference":
            return base + 3 * c.rows * c.K * c.D * f4
        return base + 4 * c.rows * (c.K + c.D) * f4
    raise ValueError(c.op)


def skip_reason(c: Case, provider: str, mode: str, budget_bytes: float) -> str | None:
    if provider == "torch_compile" and c.op == "kmeans":
        return "skipped: kmeans is a host loop over residual_encode(hard) steps (see residual_encode_hard)"
    if (provider == "reference" and c.op in ("bank_gather", "bank_update_")
            and c.B * c.rows > REFERENCE_MAX_LOOP_ROWS):
        return f"skipped: reference loops over rows in Python (> {REFERENCE_MAX_LOOP_ROWS} rows)"
    est = estimate_bytes(c, provider, mode)
    if est > budget_bytes:
        return f"skipped: estimated {est / 1e9:.1f} GB > budget {budget_bytes / 1e9:.1f} GB"
    return None


# ---------------------------------------------------------------------------------------------- inputs
def make_inputs(c: Case, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[c.dtype]

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if c.op.startswith("residual_encode"):
        M, nb = c.B * c.fresh, c.rows - c.fresh
        Mb = c.B * nb
        return dict(
            x=(0.5 * randn(M, c.D)).to(dt).requires_grad_(),
            x_offsets=torch.arange(0, M + 1, max(c.fresh, 1), device=device)[: c.B + 1],
            codewords=(0.5 * randn(c.K, c.D)).requires_grad_(),
            scale=((0.5 + torch.rand(c.K, generator=g)) / c.D).to(device).requires_grad_(),
            bank=torch.nn.functional.normalize(randn(Mb, c.D), dim=1).to(DTYPES[c.bank_dtype]),
            bank_index=torch.randperm(Mb, generator=g).to(device),
            bank_offsets=torch.arange(0, Mb + 1, max(nb, 1), device=device)[: c.B + 1],
        )
    if c.op == "contrastive_loss":
        return dict(a=randn(c.B, c.P, dtype=dt).requires_grad_(), b=randn(c.B, c.P, dtype=dt).requires_grad_(),
                    logit_scale=torch.tensor(14.3, device=device).requires_grad_())
    if c.op in ("bank_gather", "bank_update_"):
        n = c.B * c.rows
        return dict(bank=torch.nn.functional.normalize(randn(n, c.D), dim=1).to(DTYPES[c.bank_dtype]),
                    index=torch.randperm(n, generator=g).to(device), values=randn(n, c.D, dtype=dt))
    if c.op == "kmeans":
        return dict(x=randn(c.rows, c.D, dtype=dt))
    raise ValueError(c.op)


# ---------------------------------------------------------------------------------------------- callables
def _op_fn(c: Case, backend: str):
    """A function of the case's tensors (positional) that calls the public op with `backend`."""
    if c.op.startswith("residual_encode"):
        assignment = c.op.rsplit("_", 1)[1]

        def f(x, x_offsets, codewords, scale, bank, bank_index, bank_offsets):
            return residual_encode(x, x_offsets, codewords, scale, bank=bank, bank_index=bank_index,
                                   bank_offsets=bank_offsets, assignment=assignment, backend=backend)
        names = ("x", "x_offsets", "codewords", "scale", "bank", "bank_index", "bank_offsets")
    elif c.op == "contrastive_loss":
        def f(a, b, logit_scale):
            return contrastive_loss(a, b, logit_scale, normalize=True, backend=backend)
        names = ("a", "b", "logit_scale")
    elif c.op == "bank_gather":
        def f(bank, index):
            return bank_gather(bank, index, backend=backend)
        names = ("bank", "index")
    elif c.op == "bank_update_":
        def f(bank, index, values):
            return bank_update_(bank, index, values, momentum=0.5, backend=backend)
        names = ("bank", "index", "values")
    elif c.op == "kmeans":
        def f(x):
            return kmeans(x, c.K, iters=KMEANS_ITERS, seed=0, backend=backend)
        names = ("x",)
    else:
        raise ValueError(c.op)
    return f, names


def _wrt(c: Case, inputs: dict):
    if c.op == "residual_encode_soft":
        return [inputs["x"], inputs["codewords"], inputs["scale"]]
    if c.op == "residual_encode_hard":
        return [inputs["x"], inputs["codewords"]]
    if c.op == "contrastive_loss":
        return [inputs["a"], inputs["b"], inputs["logit_scale"]]
    return []


_LIMITS_RAISED = []


def _compiled(op: str, f):
    """torch.compile(f, fullgraph=False): the torch backend graph-breaks on .tolist() of the offsets.

    Dynamo caches compiled code on the code object of f, which every case of an op shares (guards tell the
    backend/assignment closures apart), so with the default automatic dynamic shapes the first shape compiles
    static and the first change of shape recompiles once with dynamic shapes: two compiles per op, mode and
    dtype instead of one per shape. The recompile limit is raised so a sweep never exhausts it (past it dynamo
    silently falls back to eager). Donated buffers are off: they forbid retain_graph=True, which mode `bwd` needs
    to repeat one backward (they only let the backward reuse saved activations' memory).
    """
    if not _LIMITS_RAISED:
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 512))
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        _LIMITS_RAISED.append(True)
    return torch.compile(f, fullgraph=False)


def build(c: Case, provider: str, mode: str, inputs: dict):
    """A zero-argument callable running one measurement of (case, provider, mode)."""
    backend = "torch" if provider == "torch_compile" else provider
    f, names = _op_fn(c, backend)
    if provider == "torch_compile":
        f = _compiled(c.op, f)
    args = [inputs[n] for n in names]
    if mode == "fwd":
        return lambda: f(*args)
    wrt = _wrt(c, inputs)
    if not wrt:
        raise ValueError(f"{c.op} has no backward")
    if mode == "bwd":
        out = f(*args)
        grad = torch.randn_like(out) if out.dim() else None
        return lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True)
    if mode == "fwd+bwd":
        grad = None  # contrastive_loss: a 0-dim loss
        if c.op.startswith("residual_encode"):
            x, cw = inputs["x"], inputs["codewords"]
            grad = torch.randn(c.B, c.K, c.D, device=x.device, dtype=torch.promote_types(x.dtype, cw.dtype))
        return lambda: torch.autograd.grad(f(*args), wrt, grad)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def warmup_calls(provider: str) -> int:
    """torch_compile's first call compiles: one more warm-up call so it is not timed."""
    return 2 if provider == "torch_compile" else 1


def gbs(c: Case, mode: str, ms: float) -> float:
    if not (ms > 0) or math.isinf(ms):
        return math.nan
    return bytes_moved(c, mode) / (ms * 1e-3) / 1e9
