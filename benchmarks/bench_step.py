"""End-to-end benchmark: one DRE-SLCL-like training step with each backend; step time, peak memory, dre-op share.

    python -m benchmarks.bench_step                      # defaults for the device present
    python -m benchmarks.bench_step --fresh 128 --tile 64 --encoder vit_small_patch16_224   # the GPU default

The trainer of the project (issue 7) is not used; the step is built here from the same parts:
  tiles (B*fresh, 3, tile, tile) random -> timm encoder (pretrained=False, no download) -> L2-normalised fresh rows x
  E = residual_encode(x, codewords, scale, bank rows of each slide)  (soft, K codewords, D width)      [dre]
  slide = Linear(K*D -> P)(E);  report = Linear(R -> P)(random report embeddings (B, R))
  loss = contrastive_loss(slide, report, exp(log_scale), normalize=True)                           [dre]
  backward; AdamW step; bank_update_(bank, rows of the fresh tiles, x)                               [dre]
Bank: every slide owns fresh + bank_rows rows of a bank (bf16 by default); each step takes a random `fresh` of a
slide's rows as fresh tiles and the rest as that slide's bank rows (so the headline is 128 fresh + 8192 bank rows).

Two measurements per backend:
  - step: the plain step, timed end to end (median of --steps after --warmup); peak memory of one step above what
    is resident before it (model, optimiser state, bank): torch.cuda.max_memory_allocated on GPU, the profiler's
    allocation events on CPU (see benchmarks/common.py; exact for tensor memory, blind to non-tensor scratch).
  - breakdown: the same step with the autograd graph cut (detach + requires_grad_) at the boundaries of the dre ops,
    each segment's forward and backward timed separately (synchronised), so the dre ops' forward and backward time
    is attributed exactly; share = dre time / segmented step time. The cuts add a few synchronisations only.
Defaults. GPU: headline shape B=16 slides, 128 fresh + 8192 bank rows, K=64, D=384, bf16 bank, encoder
vit_small_patch16_224 at 64 px tiles (384-d), bf16 autocast. CPU (reduced, 2 cores): the same B, bank rows, K, D
and bank, but 16 fresh tiles per slide of 32 px through vit_tiny_patch16_224 with a 384-d head, float32.
`reference` is skipped where its N x K x D intermediates would not fit (benchmarks/cases.py estimates).
Writes step.csv and step.md next to the op results (benchmarks/results/<device-slug>/).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import math
import os
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dre_kernels  # noqa: E402
from benchmarks import cases as C  # noqa: E402
from benchmarks import common  # noqa: E402
from dre_kernels import bank_update_, contrastive_loss, residual_encode  # noqa: E402

GPU_DEFAULTS = dict(fresh=128, tile=64, encoder="vit_small_patch16_224", amp=True, warmup=3, steps=10)
CPU_DEFAULTS = dict(fresh=16, tile=32, encoder="vit_tiny_patch16_224", amp=False, warmup=1, steps=3)


class Step:
    """Model, optimiser, bank and a batch sampler for one backend."""

    def __init__(self, a, device, backend):
        import timm

        self.a, self.device, self.backend = a, device, backend
        torch.manual_seed(0)
        self.encoder = timm.create_model(a.encoder, pretrained=False, img_size=a.tile, num_classes=0).to(device)
        feat = self.encoder.num_features
        self.adapter = torch.nn.Linear(feat, a.D).to(device) if feat != a.D else torch.nn.Identity()
        self.codewords = torch.nn.Parameter(0.1 * torch.randn(a.K, a.D, device=device))
        self.scale = torch.nn.Parameter(torch.full((a.K,), 1.0, device=device))
        self.head = torch.nn.Linear(a.K * a.D, a.P).to(device)
        self.report_proj = torch.nn.Linear(a.report_dim, a.P).to(device)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
        params = [*self.encoder.parameters(), *self.adapter.parameters(), self.codewords, self.scale,
                  *self.head.parameters(), *self.report_proj.parameters(), self.log_scale]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.per_slide = a.fresh + a.bank_rows
        T = a.slides * self.per_slide
        self.bank = F.normalize(torch.randn(T, a.D, device=device), dim=1).to(C.DTYPES[a.bank_dtype])
        self.reports = torch.randn(a.slides, a.report_dim, device=device)
        self.gen = torch.Generator().manual_seed(1)

    def batch(self):
        a = self.a
        fresh_idx, bank_idx = [], []
        for b in range(a.slides):
            perm = torch.randperm(self.per_slide, generator=self.gen) + b * self.per_slide
            fresh_idx.append(perm[: a.fresh])
            bank_idx.append(perm[a.fresh:])
        dev = self.device
        return dict(
            tiles=torch.randn(a.slides * a.fresh, 3, a.tile, a.tile, device=dev),
            fresh_index=torch.cat(fresh_idx).to(dev),
            x_offsets=torch.arange(0, a.slides * a.fresh + 1, a.fresh, device=dev),
            bank_index=torch.cat(bank_idx).to(dev),
            bank_offsets=torch.arange(0, a.slides * a.bank_rows + 1, a.bank_rows, device=dev),
        )

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.a.amp)

    def encode(self, tiles):
        with self.autocast():
            return F.normalize(self.adapter(self.encoder(tiles)).float(), dim=1)

    def residual(self, x, bt):
        return residual_encode(x, bt["x_offsets"], self.codewords, self.scale, bank=self.bank,
                               bank_index=bt["bank_index"], bank_offsets=bt["bank_offsets"], assignment="soft",
                               backend=self.backend)

    def project(self, E):
        with self.autocast():
            return self.head(E.flatten(1)).float(), self.report_proj(self.reports).float()

    def loss(self, slide, report):
        return contrastive_loss(slide, report, self.log_scale.exp(), normalize=True, backend=self.backend)

    def write_back(self, x, bt):
        bank_update_(self.bank, bt["fresh_index"], x.detach(), momentum=0.0, backend=self.backend)

    def step(self, bt):
        """The plain training step."""
        self.opt.zero_grad(set_to_none=True)
        x = self.encode(bt["tiles"])
        loss = self.loss(*self.project(self.residual(x, bt)))
        loss.backward()
        self.opt.step()
        self.write_back(x, bt)
        return loss.detach()

    def step_segmented(self, bt, t):
        """The same step, graph cut at the dre ops; t[name] += seconds of each segment."""
        sync = lambda: common.sync(self.device)  # noqa: E731

        def timed(name, fn):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            t[name] = t.get(name, 0.0) + time.perf_counter() - t0
            return out

        self.opt.zero_grad(set_to_none=True)
        x = timed("encoder fwd", lambda: self.encode(bt["tiles"]))
        x_cut = x.detach().requires_grad_()
        E = timed("dre residual_encode fwd", lambda: self.residual(x_cut, bt))
        E_cut = E.detach().requires_grad_()
        slide, report = timed("head fwd", lambda: self.project(E_cut))
        s_cut, r_cut = slide.detach().requires_grad_(), report.detach().requires_grad_()
        loss = timed("dre contrastive_loss fwd", lambda: self.loss(s_cut, r_cut))
        timed("dre contrastive_loss bwd", lambda: loss.backward())
        timed("head bwd", lambda: torch.autograd.backward([slide, report], [s_cut.grad, r_cut.grad]))
        timed("dre residual_encode bwd", lambda: E.backward(E_cut.grad))
        timed("encoder bwd", lambda: x.backward(x_cut.grad))
        timed("optimizer", lambda: self.opt.step())
        timed("dre bank_update_", lambda: self.write_back(x, bt))
        return loss.detach()


def estimate_bytes(a, backend):
    case = C.Case("residual_encode_soft", "step", a.slides, rows=a.fresh + a.bank_rows, fresh=a.fresh, K=a.K,
                  D=a.D, dtype="float32", bank_dtype=a.bank_dtype)
    return C.estimate_bytes(case, backend, "fwd+bwd")


def run_backend(a, device, backend, budget):
    est = estimate_bytes(a, backend)
    if est > budget:
        return dict(status=f"skipped: estimated {est / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB")
    try:
        s = Step(a, device, backend)
        for _ in range(a.warmup):
            s.step(s.batch())
        times = []
        for _ in range(a.steps):
            bt = s.batch()
            common.sync(device)
            t0 = time.perf_counter()
            s.step(bt)
            common.sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
        bt = s.batch()
        peak = common.peak_mb(lambda: s.step(bt), device)
        total = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else math.nan
        seg: dict[str, float] = {}
        for _ in range(a.steps):
            s.step_segmented(s.batch(), seg)
        seg = {k: 1e3 * v / a.steps for k, v in seg.items()}
        seg_total = sum(seg.values())
        dre = sum(v for k, v in seg.items() if k.startswith("dre"))
        return dict(status="ok", step_ms=statistics.median(times), step_min_ms=min(times), peak_extra_mb=peak,
                    peak_total_mb=total, segmented_ms=seg_total, dre_ms=dre, dre_share=dre / seg_total,
                    segments=seg)
    except Exception as e:  # noqa: BLE001
        if common.is_oom(e):
            return dict(status="oom", step_ms=math.inf, peak_extra_mb=math.inf)
        return dict(status=f"error: {' '.join(f'{type(e).__name__}: {e}'.split())[:200]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", help="default: every available backend (triton not on CPU)")
    p.add_argument("--slides", type=int, default=16)
    p.add_argument("--fresh", type=int, help="fresh tiles per slide (GPU 128, CPU 16)")
    p.add_argument("--bank-rows", type=int, default=8192, help="bank rows per slide")
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--D", type=int, default=384)
    p.add_argument("--P", type=int, default=512, help="embedding width of the loss")
    p.add_argument("--report-dim", type=int, default=4096, help="width of the (random) report embeddings")
    p.add_argument("--bank-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tile", type=int, help="tile size in px (GPU 64, CPU 32)")
    p.add_argument("--encoder", help="timm model name, pretrained=False (GPU vit_small_patch16_224, CPU vit_tiny)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (GPU default)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--mem-budget-gb", type=float)
    p.add_argument("--out", help="folder for step.csv / step.md (default benchmarks/results/<device-slug>)")
    p.add_argument("--note", action="append", default=[])
    a = p.parse_args(argv)
    defaults = GPU_DEFAULTS if a.device.startswith("cuda") else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    backends = a.backends or [b for b in dre_kernels.available_backends(device)
                              if not (device.type == "cpu" and b == "triton")]
    if a.mem_budget_gb is not None:
        budget = a.mem_budget_gb * 1e9
    elif device.type == "cuda":
        budget = 0.8 * common.device_memory_bytes(device)
    else:
        budget = min(6e9, common.device_memory_bytes(device) / 2)
    env = common.environment(device)
    load_before = common.load_average()
    shape = (f"B={a.slides} slides x ({a.fresh} fresh {a.tile}px tiles + {a.bank_rows} {a.bank_dtype} bank rows), "
             f"K={a.K}, D={a.D}, P={a.P}, encoder {a.encoder}, amp={'bf16' if a.amp else 'off'}")
    print(f"{env['device']}: {shape}")
    results = {}
    try:
        from tqdm import tqdm
        it = tqdm(backends, unit="backend")
    except ImportError:  # pragma: no cover
        it = backends
    for b in it:
        results[b] = run_backend(a, device, b, budget)
    torch_ms = results.get("torch", {}).get("step_ms", math.nan)
    out_dir = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    common.device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    cols = ["device", "torch", "triton", "cuda", "commit", "threads", "backend", "slides", "fresh", "bank_rows", "K",
            "D", "P", "tile", "encoder", "amp", "bank_dtype", "step_ms", "step_min_ms", "peak_extra_mb",
            "peak_total_mb", "segmented_ms", "dre_ms", "dre_share", "speedup_vs_torch", "status"]
    segment_names = list(dict.fromkeys(k for r in results.values() for k in r.get("segments", {})))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + [f"{n} ms" for n in segment_names])
    for b, r in results.items():
        vals = dict(env, backend=b, slides=a.slides, fresh=a.fresh, bank_rows=a.bank_rows, K=a.K, D=a.D, P=a.P,
                    tile=a.tile, encoder=a.encoder, amp=a.amp, bank_dtype=a.bank_dtype, **r)
        vals["speedup_vs_torch"] = torch_ms / r["step_ms"] if r.get("status") == "ok" else math.nan
        w.writerow([_fmt(vals.get(c, "")) for c in cols] + [_fmt(r.get("segments", {}).get(n, "")) for n in
                                                             segment_names])
    common.write_text(os.path.join(out_dir, "step.csv"), buf.getvalue())
    common.write_autotune_csv(os.path.join(out_dir, "step_autotune.csv"))
    load_after = common.load_average()
    lines = [f"# DRE-SLCL training step: {env['device']}", "",
             f"- {shape}", f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit "
             f"{env['commit']}, {env['threads']} threads; {datetime.datetime.now():%Y-%m-%d %H:%M}",
             f"- {a.steps} timed steps after {a.warmup} warm-up; load average {load_before:.2f} before, "
             f"{load_after:.2f} after, on {os.cpu_count()} cores"]
    if max(load_before, load_after) > 0.5 * (os.cpu_count() or 1):
        lines.append(f"- **Noisy: the machine was busy (load average {max(load_before, load_after):.1f}); "
                     "indicative only.**")
    lines += [f"- **{n}**" for n in a.note]
    lines += ["", "| backend | step ms (p50) | vs torch | peak extra MB | dre ops ms | dre share | status |",
              "|---|---|---|---|---|---|---|"]
    for b, r in results.items():
        ok = r.get("status") == "ok"
        lines.append(f"| {b} | {_fmt(r.get('step_ms', math.nan))} | "
                     f"{_fmt(torch_ms / r['step_ms']) + 'x' if ok else ''} | {_fmt(r.get('peak_extra_mb', math.nan))} | "
                     f"{_fmt(r.get('dre_ms', math.nan))} | "
                     f"{_pct(r.get('dre_share')) if ok else ''} | {r.get('status')} |")
    if segment_names:
        lines += ["", "Segments of the step (ms, mean of the segmented steps):", "",
                  "| backend | " + " | ".join(segment_names) + " |", "|---|" + "---|" * len(segment_names)]
        for b, r in results.items():
            if r.get("segments"):
                lines.append(f"| {b} | " + " | ".join(_fmt(r["segments"].get(n, math.nan), 3) for n in segment_names)
                             + " |")
    common.write_text(os.path.join(out_dir, "step.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _pct(v):
    return f"{100 * v:.1f}%"


def _fmt(v, digits=4):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.{digits}g}")
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
