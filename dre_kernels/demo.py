"""Run every op on every available backend on the embedded default shapes; print max error against `reference`.

    python -m dre_kernels.demo [--device cpu|cuda] [--repeat N]

Errors are max |out - reference| over outputs (and gradients, for the differentiable ops), relative to the
largest reference magnitude. Times are the median of --repeat runs after one warm-up (wall clock, synchronised
on CUDA); the benchmark suite in benchmarks/ measures properly, this is a smoke test with numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dre_kernels
from dre_kernels import bank_gather, bank_update_, contrastive_loss, kmeans, residual_encode

# The embedded default shapes: small enough for `reference` (which materialises N x K x D) on a laptop CPU.
DEMO_SHAPES = dict(B=4, fresh_per_slide=64, bank_per_slide=1024, K=16, D=128, bank_rows=16384,
                   loss_B=256, loss_P=512, gather_rows=4096, kmeans_rows=4096, kmeans_k=16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeat):
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel_err(outs, refs):
    err, mag = 0.0, 1e-30
    for o, r in zip(outs, refs):
        err = max(err, float((o.double() - r.double()).abs().max()) if o.numel() else 0.0)
        mag = max(mag, float(r.double().abs().max()) if r.numel() else 0.0)
    return err / max(mag, 1.0)


def make_inputs(device, s=DEMO_SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, K, D = s["B"], s["K"], s["D"]
    M, Mb = B * s["fresh_per_slide"], B * s["bank_per_slide"]
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        x=(0.5 * t(M, D)).to(device),
        x_offsets=torch.arange(0, M + 1, s["fresh_per_slide"]).to(device),
        codewords=(0.5 * t(K, D)).to(device),
        scale=((0.5 + torch.rand(K, generator=g)) / D).to(device),
        bank=torch.nn.functional.normalize(t(s["bank_rows"], D), dim=1).to(torch.bfloat16).to(device),
        bank_index=torch.randint(s["bank_rows"], (Mb,), generator=g).to(device),
        bank_offsets=torch.arange(0, Mb + 1, s["bank_per_slide"]).to(device),
        a=t(s["loss_B"], s["loss_P"]).to(device),
        b=t(s["loss_B"], s["loss_P"]).to(device),
        labels=torch.randint(s["loss_B"] // 4, (s["loss_B"],), generator=g).to(device),
        gather_index=torch.randint(s["bank_rows"], (s["gather_rows"],), generator=g).to(device),
        update_index=torch.randperm(s["bank_rows"], generator=g)[: s["gather_rows"]].to(device),
        values=t(s["gather_rows"], D).to(device),
        kmeans_x=t(s["kmeans_rows"], D).to(device),
    )


def _cases(inp):
    """op name -> callable(backend) returning the tensors to compare (outputs, then gradients)."""

    def re(assignment):
        def run(backend):
            x = inp["x"].clone().requires_grad_()
            c = inp["codewords"].clone().requires_grad_()
            s = inp["scale"].clone().requires_grad_(assignment == "soft")
            E, mass = residual_encode(x, inp["x_offsets"], c, s, bank=inp["bank"], bank_index=inp["bank_index"],
                                      bank_offsets=inp["bank_offsets"], assignment=assignment, return_mass=True,
                                      backend=backend)
            wrt = [x, c] + ([s] if assignment == "soft" else [])
            return [E, mass, *torch.autograd.grad(E, wrt, torch.ones_like(E))]
        return run

    def loss(backend):
        a = inp["a"].clone().requires_grad_()
        s = torch.tensor(14.3, device=a.device, requires_grad=True)
        out = contrastive_loss(a, inp["b"], s, labels=inp["labels"], normalize=True, backend=backend)
        return [out, *torch.autograd.grad(out, [a, s])]

    def gather(backend):
        return [bank_gather(inp["bank"], inp["gather_index"], backend=backend)]

    def update(backend):
        bank = inp["bank"].clone()
        return [bank_update_(bank, inp["update_index"], inp["values"], momentum=0.5, backend=backend)]

    def km(backend):
        return [kmeans(inp["kmeans_x"], DEMO_SHAPES["kmeans_k"], iters=5, seed=0, backend=backend)]

    return {"residual_encode soft fwd+bwd": re("soft"), "residual_encode hard fwd+bwd": re("hard"),
            "contrastive_loss fwd+bwd": loss, "bank_gather": gather, "bank_update_": update, "kmeans (5 iters)": km}


def run_demo(device="cpu", repeat=3, out=print):
    device = torch.device(device)
    inp = make_inputs(device)
    backends = dre_kernels.available_backends(device)
    s = DEMO_SHAPES
    out(f"dre-kernels {dre_kernels.__version__} | torch {torch.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    out(f"shapes: B={s['B']} slides x ({s['fresh_per_slide']} fresh + {s['bank_per_slide']} bf16 bank rows), "
        f"K={s['K']}, D={s['D']}; loss B={s['loss_B']}, P={s['loss_P']}; gather/update {s['gather_rows']} of "
        f"{s['bank_rows']} rows; kmeans {s['kmeans_rows']} rows, k={s['kmeans_k']}")
    for name, why in dre_kernels.unavailable_backends(device).items():
        out(f"  (not here: {name}: {why})")
    header = f"{'op':<30} {'backend':<10} {'max rel err':>12} {'time ms':>10}"
    out(header)
    out("-" * len(header))
    rows = []
    for op, fn in _cases(inp).items():
        ref = [t.detach() for t in fn("reference")]
        for backend in backends:
            got = [t.detach() for t in fn(backend)]
            err = _rel_err(got, ref)
            ms = 1e3 * _time(lambda: fn(backend), device, repeat)
            rows.append((op, backend, err, ms))
            out(f"{op:<30} {backend:<10} {err:>12.2e} {ms:>10.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    run_demo(args.device, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
