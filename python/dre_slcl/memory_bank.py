"""The memory bank: one L2-normalised feature per tile of every slide, slides as CSR offsets.

    features (T, D) in float32 / float16 / bfloat16, on CPU or GPU
    offsets  (S+1,) int64: slide s owns rows offsets[s]:offsets[s+1] (the tile order of TileDataset)
    filled   (T,) bool: rows written at least once (the no-grad init pass is resumable)

Each training step takes, per slide, some fresh tiles (encoded with gradient) and the slide's other rows from the
bank (`sample_bank_rows`); afterwards the fresh features are written back (`update_`, through
dre_kernels.bank_update_ with momentum and L2 normalisation). Saved with safetensors, atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dre_kernels import bank_update_
from dre_slcl.atomic import atomic_path

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in BANK_DTYPES.values():
            raise ValueError(f"dtype: the bank holds float32, float16 or bfloat16; got {dtype}")
        return dtype
    if dtype not in BANK_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(BANK_DTYPES)}; got {dtype!r}")
    return BANK_DTYPES[dtype]


class MemoryBank:
    """Tile features of every slide; see the module docstring."""

    def __init__(self, offsets, dim: int, *, dtype="float32", device="cpu", slide_ids=None):
        offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu().reshape(-1)
        if offsets.numel() < 1 or offsets[0] != 0 or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets: expected a non-decreasing 1-D sequence starting at 0")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int; got {dim!r}")
        self.offsets = offsets
        self.dtype = parse_dtype(dtype)
        self.features = torch.zeros(int(offsets[-1]), dim, dtype=self.dtype, device=device)
        self.filled = torch.zeros(int(offsets[-1]), dtype=torch.bool)
        self.slide_ids = list(map(str, slide_ids)) if slide_ids is not None else [str(i) for i in
                                                                                  range(len(offsets) - 1)]
        if len(self.slide_ids) != len(offsets) - 1:
            raise ValueError(f"slide_ids: expected {len(offsets) - 1} ids; got {len(self.slide_ids)}")

    # ------------------------------------------------------------------------------------------- properties
    @property
    def num_rows(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def num_slides(self) -> int:
        return len(self.offsets) - 1

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device) -> MemoryBank:
        self.features = self.features.to(device)
        return self

    def slide_rows(self, s: int) -> torch.Tensor:
        return torch.arange(int(self.offsets[s]), int(self.offsets[s + 1]))

    # ------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_(self, encode, dataset, *, batch_size: int = 64, num_workers: int = 0, progress: bool = True,
              checkpoint_path=None, checkpoint_every: int = 50, device=None) -> MemoryBank:
        """Fill every row not yet filled with `encode(images)` (which must return L2-normalised (n, D) rows).

        Batched over the tiles of `dataset` (a TileDataset whose item i is row i); with `checkpoint_path`, the
        partial bank is saved every `checkpoint_every` batches, so a killed init resumes where it stopped.
        """
        from torch.utils.data import DataLoader, Subset
        from tqdm import tqdm

        if len(dataset) != self.num_rows:
            raise ValueError(f"dataset: expected {self.num_rows} tiles (one per bank row); got {len(dataset)}")
        todo = torch.nonzero(~self.filled).flatten().tolist()
        if not todo:
            return self
        loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, num_workers=num_workers, shuffle=False)
        device = device or self.device
        for n, (images, index, _) in enumerate(tqdm(loader, desc="bank init", unit="batch", disable=not progress)):
            feats = encode(images.to(device, non_blocking=True)).float()
            self.features[index.to(self.device)] = feats.to(self.device, self.dtype)
            self.filled[index] = True
            if checkpoint_path is not None and (n + 1) % checkpoint_every == 0:
                self.save(checkpoint_path)
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        return self

    # ------------------------------------------------------------------------------------------- sampling
    def sample_bank_rows(self, slides, fresh_index, fresh_offsets, *, max_rows: int | None = None,
                         generator: torch.Generator | None = None):
        """Bank rows for each of `slides`: its rows minus that step's fresh rows, all of them or a random `max_rows`.

        slides (B,): slide numbers; fresh_index (M,) global row numbers of the fresh tiles, split by fresh_offsets
        (B+1,). Returns (bank_index (Mb,) int64, bank_offsets (B+1,) int64) on the bank's device.
        """
        slides = torch.as_tensor(slides).cpu().tolist()
        fresh_index = torch.as_tensor(fresh_index).cpu()
        fresh_offsets = torch.as_tensor(fresh_offsets).cpu().tolist()
        if len(fresh_offsets) != len(slides) + 1:
            raise ValueError(f"fresh_offsets: expected {len(slides) + 1} entries; got {len(fresh_offsets)}")
        parts, counts = [], [0]
        for b, s in enumerate(slides):
            if not 0 <= s < self.num_slides:
                raise IndexError(f"slides: slide {s} out of range for {self.num_slides} slides")
            lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
            keep = torch.ones(hi - lo, dtype=torch.bool)
            fresh = fresh_index[fresh_offsets[b]:fresh_offsets[b + 1]]
            if bool(((fresh < lo) | (fresh >= hi)).any()):
                raise ValueError(f"fresh_index: rows of slide position {b} lie outside slide {s}")
            keep[fresh - lo] = False
            rows = torch.nonzero(keep).flatten() + lo
            if max_rows is not None and rows.numel() > max_rows:
                pick = torch.randperm(rows.numel(), generator=generator)[:max_rows]
                rows = rows[pick.sort().values]
            parts.append(rows)
            counts.append(counts[-1] + rows.numel())
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return index.to(self.device), torch.tensor(counts, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update_(self, index, values, *, momentum: float = 0.0, backend: str = "auto") -> None:
        """Write fresh features back: momentum * old + (1 - momentum) * new, L2-normalised (bank_update_).

        Duplicate indices keep their first occurrence (a slide drawn twice in one global batch).
        """
        index = torch.as_tensor(index, device=self.device).long()
        values = values.detach().to(self.device)
        if index.numel() > 1:
            uniq, inverse = torch.unique(index, return_inverse=True)
            if uniq.numel() != index.numel():
                first = torch.full((uniq.numel(),), index.numel(), dtype=torch.int64, device=self.device)
                first.scatter_reduce_(0, inverse, torch.arange(index.numel(), device=self.device), "amin")
                index, values = index[first], values[first]
        bank_update_(self.features, index, values, momentum=float(momentum), normalize=True, backend=backend)
        self.filled[index.cpu()] = True

    # ------------------------------------------------------------------------------------------- save / load
    def save(self, path) -> None:
        """safetensors file with features, offsets, filled; slide ids in its metadata. Atomic."""
        from safetensors.torch import save_file

        tensors = {"features": self.features.detach().cpu().contiguous(), "offsets": self.offsets.contiguous(),
                   "filled": self.filled.to(torch.uint8).contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"slide_ids": json.dumps(self.slide_ids), "format": "dre-slcl-bank-1"})

    @classmethod
    def load(cls, path, *, device="cpu", dtype=None) -> MemoryBank:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: memory bank file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if not {"features", "offsets"} <= keys:
                raise ValueError(f"path: {path} is not a memory bank (needs 'features' and 'offsets')")
            features, offsets = f.get_tensor("features"), f.get_tensor("offsets")
            filled = f.get_tensor("filled").bool() if "filled" in keys else torch.ones(features.shape[0], dtype=torch.bool)
        ids = json.loads(meta["slide_ids"]) if "slide_ids" in meta else None
        bank = cls(offsets, features.shape[1], dtype=dtype or features.dtype, device=device, slide_ids=ids)
        if features.shape[0] != bank.num_rows:
            raise ValueError(f"path: {path} has {features.shape[0]} rows but offsets end at {bank.num_rows}")
        bank.features.copy_(features.to(bank.dtype))
        bank.filled.copy_(filled)
        return bank

