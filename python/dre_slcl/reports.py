"""Pathology reports: slide_id -> report text, precomputed report embeddings, and text encoders.

- :func:`load_reports` reads CSV (columns ``slide_id`` and ``report`` or ``text``) or JSONL (the same keys).
- :func:`load_report_embeddings` reads safetensors (an ``embeddings`` (N, P) tensor with the slide ids in the
  metadata, or one 1-D tensor per slide id) or ``.npy`` (N, P) with the ids from a sidecar ``<stem>.ids.txt``,
  from ``slide_ids``, or row order. Any width P.
- :func:`encode_reports` uses sentence-transformers when it is installed; it is optional and never imported
  otherwise. :func:`hashed_text_embeddings` is a dependency-free deterministic fallback (bag of word n-grams
  hashed into P buckets) for demos and tests.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from dre_slcl.atomic import atomic_path

TEXT_COLUMNS = ("report", "text")


def _text_of(row: dict, path, where: str) -> str:
    for key in TEXT_COLUMNS:
        if key in row and row[key] is not None:
            return str(row[key])
    raise ValueError(f"path: {path} {where} has no 'report' or 'text' field (got {sorted(row)})")


def load_report_table(path: str | os.PathLike) -> list[dict]:
    """All rows of a CSV or JSONL reports file as dicts (``slide_id``, ``report``/``text``, any other columns)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: reports file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"path: {path} line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"path: {path} line {n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ValueError(f"path: expected a .csv, .tsv or .jsonl reports file, got {path.name}")
    return rows


def load_reports(path: str | os.PathLike) -> dict[str, str]:
    """Read slide_id -> report text from CSV/TSV or JSONL. Duplicate slide ids are an error."""
    out: dict[str, str] = {}
    for n, row in enumerate(load_report_table(path), 1):
        if "slide_id" not in row:
            raise ValueError(f"path: {path} row {n} has no 'slide_id' field (got {sorted(row)})")
        sid = str(row["slide_id"])
        if sid in out:
            raise ValueError(f"path: {path} lists slide_id {sid!r} twice")
        out[sid] = _text_of(row, path, f"row {n}")
    return out


def load_report_labels(path: str | os.PathLike, column: str = "label") -> dict[str, int]:
    """Read slide_id -> integer label from a reports table that has a ``label`` column."""
    out = {}
    for n, row in enumerate(load_report_table(path), 1):
        if column not in row:
            raise ValueError(f"column: {path} row {n} has no {column!r} field")
        out[str(row["slide_id"])] = int(row[column])
    return out


# ----------------------------------------------------------------------------------------------------- embeddings


def save_report_embeddings(path: str | os.PathLike, slide_ids: list[str], embeddings) -> None:
    """Save (N, P) embeddings as safetensors (``embeddings`` tensor, slide ids in metadata), atomically."""
    from safetensors.numpy import save_file

    emb = np.ascontiguousarray(np.asarray(embeddings if not hasattr(embeddings, "numpy") else
                                          embeddings.detach().cpu().numpy()))
    if emb.ndim != 2 or emb.shape[0] != len(slide_ids):
        raise ValueError(f"embeddings: expected shape ({len(slide_ids)}, P), got {emb.shape}")
    if len(set(slide_ids)) != len(slide_ids):
        raise ValueError("slide_ids: duplicate slide ids")
    with atomic_path(path) as tmp:
        save_file({"embeddings": emb}, str(tmp), metadata={"slide_ids": json.dumps(list(map(str, slide_ids)))})


def load_report_embeddings(path: str | os.PathLike, slide_ids: list[str] | None = None):
    """Load report embeddings; returns ``(ids, tensor (N, P) float32)``.

    With ``slide_ids`` the rows are returned in that order (a missing id is an error); for a ``.npy`` file without
    a ``<stem>.ids.txt`` sidecar, ``slide_ids`` names the rows in file order.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: embeddings file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if "embeddings" in keys:
                emb = f.get_tensor("embeddings")
                if emb.ndim != 2:
                    raise ValueError(f"path: {path} 'embeddings' must be 2-D, got shape {emb.shape}")
                if "slide_ids" in meta:
                    ids = [str(s) for s in json.loads(meta["slide_ids"])]
                elif slide_ids is not None and len(slide_ids) == emb.shape[0]:
                    ids, slide_ids = list(map(str, slide_ids)), None
                else:
                    raise ValueError(f"path: {path} has no 'slide_ids' metadata; pass slide_ids naming its rows")
            else:  # one tensor per slide id
                ids = keys
                rows = [f.get_tensor(k).reshape(-1) for k in keys]
                widths = {r.shape[0] for r in rows}
                if len(widths) > 1:
                    raise ValueError(f"path: {path} per-slide tensors have different widths {sorted(widths)}")
                emb = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    elif suffix == ".npy":
        emb = np.load(path, allow_pickle=False)  # never unpickle: the file may come from anywhere
        if emb.ndim != 2:
            raise ValueError(f"path: {path} must hold a 2-D (N, P) array, got shape {emb.shape}")
        sidecar = path.with_suffix(".ids.txt")
        if sidecar.is_file():
            ids = [s for s in sidecar.read_text(encoding="utf-8").splitlines() if s.strip()]
        elif slide_ids is not None:
            ids, slide_ids = list(map(str, slide_ids)), None
        else:
            raise ValueError(f"path: {path} needs slide ids: a {sidecar.name} sidecar or the slide_ids argument")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"path: {path} has {emb.shape[0]} rows but {len(ids)} slide ids")
    else:
        raise ValueError(f"path: expected a .safetensors or .npy embeddings file, got {path.name}")
    if len(ids) != emb.shape[0]:
        raise ValueError(f"path: {path} has {emb.shape[0]} rows but {len(ids)} slide ids")
    t = torch.from_numpy(np.ascontiguousarray(emb)).float()
    if slide_ids is not None:
        pos = {s: i for i, s in enumerate(ids)}
        missing = [s for s in slide_ids if str(s) not in pos]
        if missing:
            raise KeyError(f"slide_ids: {len(missing)} not in {path}, e.g. {missing[:3]}")
        t = t[[pos[str(s)] for s in slide_ids]]
        ids = list(map(str, slide_ids))
    return ids, t


# -------------------------------------------------------------------------------------------------- text encoders


def _tokens(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words + [a + " " + b for a, b in zip(words, words[1:])]


def hashed_text_embeddings(texts: list[str], dim: int = 256):
    """Deterministic L2-normalised bag of word uni/bi-grams hashed into ``dim`` signed buckets; (N, dim) float32.

    No model, no download: enough for reports whose wording depends on the tissue kind (the synthetic ones).
    """
    import torch

    if dim < 1:
        raise ValueError(f"dim: expected >= 1, got {dim}")
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        for tok in _tokens(str(text)):
            h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return torch.from_numpy(out / np.maximum(norm, 1e-12))


def text_encoder_available() -> bool:
    """Whether sentence-transformers is importable."""
    import importlib.util

    return importlib.util.find_spec("sentence_transformers") is not None


def encode_reports(texts: list[str], model: str = "sentence-transformers/all-MiniLM-L6-v2", *,
                   device: str | None = None, batch_size: int = 64, normalize: bool = True):
    """Embed report texts with sentence-transformers (only if installed); returns (N, P) float32 tensor.

    ``model`` is a model name or local directory, loaded by sentence-transformers (it may download weights).
    """
    import torch

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise RuntimeError("encode_reports: sentence-transformers is not installed; install it, use precomputed "
                           "embeddings (load_report_embeddings) or hashed_text_embeddings") from None
    enc = SentenceTransformer(model, device=device)
    emb = enc.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=normalize,
                     show_progress_bar=False)
    return torch.from_numpy(np.asarray(emb, np.float32))
