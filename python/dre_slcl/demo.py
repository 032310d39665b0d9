"""The end-to-end demo on the embedded default data set (``make demo`` / ``dre-slcl demo OUT``).

synthetic slides -> OpenSlide tiling -> memory-bank init -> DRE-SLCL training on CPU with a small timm ViT ->
slide embeddings -> linear probe and report retrieval, compared with the same model before training; writes a
loss-curve PNG, metrics.json and summary.json under OUT and prints a summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# The embedded default: small enough to finish in minutes on a 2-core CPU.
DEMO_DATA = dict(n_slides=16, width=2048, height=1536, mpp=0.5, seed=0)
DEMO_TRAIN = dict(encoder="vit_tiny_patch16_224", image_size=64, num_codewords=16, layers=1, heads=3, steps=60,
                  slides_per_batch=8, fresh_per_slide=8, bank_rows_per_slide=None, lr=3e-4, warmup_steps=5,
                  weight_decay=0.05, ckpt_every=20, kmeans_iters=10, bank_momentum=0.0, seed=0)


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dre_slcl.atomic import atomic_path

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("DRE-SLCL demo: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run_demo(out, *, backend: str = "auto", steps: int | None = None, progress: bool = True, log=print) -> dict:
    from dre_slcl.atomic import write_text_atomic
    from dre_slcl.config import TrainConfig
    from dre_slcl.evaluate import embed_slides, evaluate, save_embeddings, write_metrics
    from dre_slcl.reports import load_report_embeddings, load_report_labels
    from dre_slcl.synth import synth_dataset
    from dre_slcl.tiling import TilingParams, tile_slides
    from dre_slcl.train import train

    out = Path(out)
    times = {}
    t = time.perf_counter()
    data = out / "data"
    if not (data / "reports.csv").is_file():
        synth_dataset(data, progress=progress, **DEMO_DATA)
    times["synth_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tile_slides([data / "slides"], out / "tiles", TilingParams(), progress=progress)
    times["tile_s"] = time.perf_counter() - t

    cfg = TrainConfig(tile_dir=str(out / "tiles"), reports=str(data / "report_embeddings.safetensors"),
                      out_dir=str(out / "run"), backend=backend, progress=progress, **DEMO_TRAIN)
    if steps is not None:
        cfg.steps = steps
        cfg.ckpt_every = min(cfg.ckpt_every, steps)
    cfg.validate()
    write_text_atomic(out / "run.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    labels = load_report_labels(data / "reports.csv")
    reports = load_report_embeddings(data / "report_embeddings.safetensors")

    # the same model before any training step: the baseline the trained embeddings must beat
    t = time.perf_counter()
    base_cfg = TrainConfig(**{**cfg.to_dict(), "out_dir": str(out / "untrained"), "steps": 1, "lr": 1e-12,
                              "warmup_steps": 0, "ckpt_every": 1})
    train(base_cfg)
    ids0, emb0 = embed_slides(base_cfg.out_dir, progress=False)
    before = evaluate(ids0, emb0, labels=labels, reports=reports)
    times["baseline_s"] = time.perf_counter() - t

    t = time.perf_counter()
    summary = train(cfg)
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ids, emb = embed_slides(cfg.out_dir, refresh_bank=True, progress=progress)
    save_embeddings(out / "run" / "slide_embeddings.safetensors", ids, emb)
    after = evaluate(ids, emb, labels=labels, reports=reports)
    times["eval_s"] = time.perf_counter() - t
    write_metrics(out / "metrics.json", {"before_training": before, "after_training": after})
    plot_losses(out / "run" / "metrics.jsonl", out / "loss_curve.png")

    losses = [json.loads(line)["loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    head = sum(losses[:5]) / max(1, len(losses[:5]))
    tail = sum(losses[-5:]) / max(1, len(losses[-5:]))
    result = {"slides": len(ids), "steps": summary["step"], "loss_first5": head, "loss_last5": tail,
              "before": before, "after": after, "times_s": times, "backend": backend}
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2) + "\n")
    log("")
    log(f"DRE-SLCL demo: {len(ids)} synthetic slides, {summary['step']} steps, backend={backend}")
    log(f"  loss: first 5 steps {head:.3f} -> last 5 steps {tail:.3f}   (curve: {out / 'loss_curve.png'})")
    log(f"  {'metric':<24}{'untrained':>10}{'trained':>10}{'chance':>10}")
    rows = [("probe accuracy", "probe_accuracy", "chance_accuracy"), ("probe AUC", "probe_auc", None),
            ("retrieval top-1 (own)", "retrieval_top1", "retrieval_chance_top1"),
            ("retrieval top-5 (own)", "retrieval_top5", None),
            ("retrieval top-1 (label)", "label_retrieval_top1", "chance_accuracy")]
    for name, key, chance in rows:
        ch = after[chance] if chance else (0.5 if key == "probe_auc" else float("nan"))
        log(f"  {name:<24}{before[key]:>10.3f}{after[key]:>10.3f}{ch:>10.3f}")
    log("  time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in times.items()))
    return result
