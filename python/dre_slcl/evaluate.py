"""Slide embeddings for downstream use, and their evaluation.

embed: for each slide, the trained model aggregates all of its tiles from the memory bank (optionally
re-encoded by the final encoder first) into one embedding (P,), saved with the slide ids to safetensors.

evaluate:
- linear probe on slide labels: multinomial logistic regression on L2-normalised embeddings, stratified k-fold
  cross-validation; accuracy and macro one-vs-rest AUC (Mann-Whitney form) of the held-out predictions.
- report retrieval: cosine similarity of each slide embedding to every report embedding; top-1/top-5 of the
  slide's own report, and of a report with the slide's label.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dre_slcl.atomic import atomic_path, write_text_atomic


@torch.no_grad()
def embed_slides(out_dir, *, refresh_bank: bool = False, device: str = "auto", batch_size: int = 64,
                 progress: bool = True):
    """(slide_ids, embeddings (S, P) float32) from the checkpoint in out_dir."""
    from dre_slcl.config import TrainConfig
    from dre_slcl.memory_bank import MemoryBank
    from dre_slcl.train import CHECKPOINT, build_model, load_data, resolve_device

    out = Path(out_dir)
    ckpt = out / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"out_dir: no {CHECKPOINT} in {out}; train first")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = TrainConfig(**state["config"])
    dev = resolve_device(device)
    ds, reports = load_data(cfg)
    model = build_model(cfg, reports.shape[1]).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    bank = MemoryBank.load(out / state["bank_file"], device=dev)
    if refresh_bank:
        bank.filled.zero_()
        bank.init_(model.encode_tiles, ds, batch_size=batch_size, progress=progress, device=dev)
    embs = []
    empty = torch.zeros(0, model.dim, device=dev)
    for s in range(bank.num_slides):
        rows = bank.slide_rows(s).to(dev)
        z = model.slide_embeddings(empty, torch.zeros(2, dtype=torch.int64, device=dev), bank.features, rows,
                                   torch.tensor([0, rows.numel()], device=dev))
        embs.append(z.float().cpu())
    return list(bank.slide_ids), torch.cat(embs)


def save_embeddings(path, slide_ids, embeddings) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata={"slide_ids": json.dumps(slide_ids)})


def load_embeddings(path):
    from dre_slcl.reports import load_report_embeddings

    return load_report_embeddings(path)


# ---------------------------------------------------------------------------------------------- metrics
def auc_binary(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = scores[positive], scores[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def macro_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    classes = labels.unique()
    if classes.numel() == 2:
        return auc_binary(probs[:, 1], labels == classes[1])
    vals = [auc_binary(probs[:, int(c)], labels == c) for c in classes]
    vals = [v for v in vals if v == v]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                 iters: int = 200) -> torch.Tensor:
    """Multinomial logistic regression (weights (D+1, C)) by L-BFGS with L2 regularisation."""
    Xb = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    W = torch.zeros(Xb.shape[1], num_classes, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xb @ W, y) + weight_decay * (W[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def linear_probe(embeddings: torch.Tensor, labels: torch.Tensor, *, folds: int = 5, seed: int = 0) -> dict:
    """Stratified k-fold linear probe; folds shrink to the smallest class count (at least 2)."""
    keep = labels >= 0
    X = F.normalize(embeddings[keep].double(), dim=1)
    y = labels[keep].long()
    classes, y = torch.unique(y, return_inverse=True)
    C = classes.numel()
    if C < 2:
        raise ValueError(f"labels: a linear probe needs at least 2 classes; got {C}")
    counts = torch.bincount(y)
    k = int(min(folds, int(counts.min())))
    if k < 2:
        raise ValueError("labels: every class needs at least 2 slides for cross-validation")
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty_like(y)
    for c in range(C):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        fold_of[idx] = torch.arange(idx.numel()) % k
    probs = torch.zeros(y.numel(), C, dtype=torch.float64)
    for f in range(k):
        test = fold_of == f
        W = fit_logistic(X[~test], y[~test], C)
        Xt = torch.cat([X[test], torch.ones(int(test.sum()), 1, dtype=X.dtype)], 1)
        probs[test] = torch.softmax(Xt @ W, 1)
    acc = float((probs.argmax(1) == y).double().mean())
    return {"probe_accuracy": acc, "probe_auc": macro_auc(probs, y), "probe_folds": k, "probe_slides": int(y.numel()),
            "probe_classes": C, "chance_accuracy": float(counts.max()) / y.numel()}


def retrieval(embeddings: torch.Tensor, report_embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Slide -> report retrieval by cosine similarity: top-1/top-5 of its own report (and of its label)."""
    sim = F.normalize(embeddings.double(), dim=1) @ F.normalize(report_embeddings.double(), dim=1).T
    n = sim.shape[0]
    rank = torch.argsort(sim, dim=1, descending=True)
    own = rank == torch.arange(n)[:, None]
    out = {"retrieval_top1": float(own[:, :1].any(1).double().mean()),
           "retrieval_top5": float(own[:, :5].any(1).double().mean()), "retrieval_chance_top1": 1.0 / n}
    if labels is not None:
        keep = labels >= 0
        same = labels[rank] == labels[:, None]
        out["label_retrieval_top1"] = float(same[keep, :1].any(1).double().mean())
        out["label_retrieval_top5"] = float(same[keep, :5].any(1).double().mean())
    return out


def evaluate(slide_ids, embeddings, *, labels: dict | None = None, reports=None, folds: int = 5) -> dict:
    """labels: slide_id -> int (-1 = none); reports: (ids, (N, P)) report embeddings."""
    metrics = {"slides": len(slide_ids)}
    lab = None
    if labels is not None:
        missing = [s for s in slide_ids if s not in labels]
        if missing:
            raise KeyError(f"labels: no label for {len(missing)} slides, e.g. {missing[:3]}")
        lab = torch.tensor([int(labels[s]) for s in slide_ids])
        metrics.update(linear_probe(embeddings, lab, folds=folds))
    if reports is not None:
        ids, emb = reports
        pos = {s: i for i, s in enumerate(ids)}
        missing = [s for s in slide_ids if s not in pos]
        if missing:
            raise KeyError(f"reports: no report embedding for {len(missing)} slides, e.g. {missing[:3]}")
        metrics.update(retrieval(embeddings, emb[[pos[s] for s in slide_ids]], lab))
    return metrics


def write_metrics(path, metrics: dict) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
