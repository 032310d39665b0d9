"""Tile datasets over tiled slides and a per-slide batch sampler.

:class:`TileDataset` indexes every tile of every slide (coordinates from the per-slide HDF5 files written by
:mod:`dre_slcl.tiling`) as one flat range; slide ``s`` owns tiles ``offsets[s]:offsets[s+1]`` (CSR, the layout
``dre_kernels`` ops and the memory bank use). OpenSlide handles cannot be pickled, so each process (the main
one or a DataLoader worker) opens its own lazily on first use and keeps at most ``max_open`` of them.

:class:`SlideBatchSampler` yields per step B slides with a random subset of each slide's tiles, grouped by slide;
:func:`collate_tiles` turns such a batch into images plus the ``offsets`` that split it by slide.

    ds = TileDataset.from_tile_dir("tiles/", image_size=224)
    dl = DataLoader(ds, batch_sampler=SlideBatchSampler(ds.offsets, 16, 128), num_workers=2,
                    collate_fn=collate_tiles)
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _read_h5(h5_path: Path) -> tuple[np.ndarray, dict]:
    import h5py

    with h5py.File(h5_path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"h5: {h5_path} has no 'coords' dataset")
        d = f["coords"]
        coords = np.asarray(d[...], dtype=np.int64).reshape(-1, 2)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in d.attrs.items()}
    for key in ("patch_size", "patch_size_level0"):
        if key not in attrs:
            raise ValueError(f"h5: {h5_path} 'coords' lacks the {key!r} attribute")
    return coords, attrs


class TileDataset(Dataset):
    """All tiles of a list of slides; item ``i`` is ``(image, i, slide_index)``.

    ``image`` is (3, S, S) with S = ``image_size`` (default: the tiling patch size): float32 normalised with
    ``mean``/``std`` when ``normalize``, else uint8 (normalise later, e.g. on the GPU). Tiles are read at the
    tiling's target mpp from the best pyramid level and resized (bilinear) only when the sizes differ.
    ``transform``, if given, is applied to that tensor.
    """

    def __init__(self, slides: Sequence[tuple[str | os.PathLike, str | os.PathLike]], *, image_size: int | None = None,
                 normalize: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, transform=None, max_open: int = 32,
                 slide_ids: Sequence[str] | None = None):
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
        if max_open < 1:
            raise ValueError(f"max_open: expected >= 1, got {max_open}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std: expected 3 values each, std > 0; got {mean}, {std}")
        slides = [(str(s), str(h)) for s, h in slides]
        if slide_ids is not None and len(slide_ids) != len(slides):
            raise ValueError(f"slide_ids: expected {len(slides)} ids, got {len(slide_ids)}")
        self.slide_paths: list[str] = []
        self.slide_ids: list[str] = []
        self.attrs: list[dict] = []
        coords, counts = [], []
        for i, (slide_path, h5_path) in enumerate(slides):
            c, a = _read_h5(Path(h5_path))
            self.slide_paths.append(slide_path)
            self.slide_ids.append(str(slide_ids[i]) if slide_ids is not None else str(a.get("name",
                                                                                          Path(h5_path).stem)))
            self.attrs.append(a)
            coords.append(c)
            counts.append(len(c))
        self.coords = np.concatenate(coords) if coords else np.zeros((0, 2), np.int64)
        self.offsets = torch.zeros(len(slides) + 1, dtype=torch.int64)
        self.offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
        self.tile_slide = np.repeat(np.arange(len(slides), dtype=np.int64), counts)
        sizes = {int(a["patch_size"]) for a in self.attrs}
        if image_size is None and len(sizes) > 1:
            raise ValueError(f"image_size: slides were tiled at different patch sizes {sorted(sizes)}; pass one")
        self.image_size = image_size or (sizes.pop() if sizes else 256)
        self.normalize = normalize
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # (x / 255 - mean) / std as one multiply-add per pixel.
        self._scale = (1.0 / (255.0 * np.asarray(self.std, np.float32))).astype(np.float32)
        self._bias = (-np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)).astype(np.float32)
        self.transform = transform
        self.max_open = max_open
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    @classmethod
    def from_tile_dir(cls, tile_dir: str | os.PathLike, *, slide_ids: Sequence[str] | None = None,
                      slide_dir: str | os.PathLike | None = None, include_empty: bool = False, **kwargs):
        """All slides tiled into ``tile_dir`` (``patches/*.h5``), sorted by id, or exactly ``slide_ids`` in order.

        The slide file is the one recorded at tiling time, or ``slide_dir/<its file name>`` when given (slides
        moved). Slides with no tiles are left out unless ``include_empty``.
        """
        patches = Path(tile_dir) / "patches"
        if not patches.is_dir():
            raise FileNotFoundError(f"tile_dir: {tile_dir} has no patches/ folder; run `dre-slcl tile` first")
        if slide_ids is None:
            h5s = sorted(patches.glob("*.h5"))
        else:
            h5s = [patches / f"{s}.h5" for s in slide_ids]
            missing = [str(p.stem) for p in h5s if not p.is_file()]
            if missing:
                raise KeyError(f"slide_ids: not tiled in {tile_dir}: {missing[:5]}")
        pairs, ids = [], []
        import h5py

        for h5 in h5s:
            with h5py.File(h5, "r") as f:
                d = f["coords"]
                n = d.shape[0]
                path = str(d.attrs.get("slide_path", ""))
            if n == 0 and not include_empty:
                continue
            if slide_dir is not None:
                path = str(Path(slide_dir) / Path(path).name)
            pairs.append((path, h5))
            ids.append(h5.stem)
        return cls(pairs, slide_ids=ids, **kwargs)

    # ----------------------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def num_slides(self) -> int:
        return len(self.slide_ids)

    def __getstate__(self):
        # OpenSlide handles cannot be pickled (DataLoader workers with spawn); each process opens its own.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _open(self, s: int):
        if self._pid != os.getpid():  # forked worker: the parent's handles are not ours to use
            self._handles = OrderedDict()
            self._pid = os.getpid()
        h = self._handles.get(s)
        if h is not None:
            self._handles.move_to_end(s)
            return h
        import openslide

        from dre_slcl.tiling import best_level

        try:
            osr = openslide.OpenSlide(self.slide_paths[s])
        except Exception as e:
            raise RuntimeError(f"slide {self.slide_ids[s]!r}: cannot open {self.slide_paths[s]}: {e}") from e
        a = self.attrs[s]
        p0, ps = float(a["patch_size_level0"]), float(a["patch_size"])
        level = best_level(osr, p0 / ps)
        read = max(1, int(round(p0 / osr.level_downsamples[level])))
        h = (osr, level, read)
        self._handles[s] = h
        while len(self._handles) > self.max_open:
            _, (old, _, _) = self._handles.popitem(last=False)
            old.close()
        return h

    def _drop(self, s: int) -> None:
        h = self._handles.pop(s, None)
        if h is not None:
            h[0].close()

    def read_tile(self, i: int) -> Image.Image:
        """Tile ``i`` as an RGB PIL image of ``image_size`` squared (transparent slide areas become white)."""
        s = int(self.tile_slide[i])
        x, y = (int(v) for v in self.coords[i])
        osr, level, read = self._open(s)
        try:
            img = osr.read_region((x, y), level, (read, read))
        except Exception as e:
            self._drop(s)  # an OpenSlide handle that failed once stays failed
            raise RuntimeError(f"slide {self.slide_ids[s]!r}: reading tile {i} at ({x}, {y}) level {level} "
                               f"failed: {e}") from e
        if img.getchannel("A").getextrema()[0] < 255:
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return img

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"tile index {i} out of range for {len(self)} tiles")
        i = int(i) % len(self)
        a = np.asarray(self.read_tile(i))  # (S, S, 3) uint8
        # numpy, not torch: torch's intra-op threads make tiny per-tile ops ~10x slower in the main process.
        if self.normalize:
            a = a.astype(np.float32) * self._scale + self._bias
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        if self.transform is not None:
            t = self.transform(t)
        return t, i, int(self.tile_slide[i])

    def close(self) -> None:
        """Close this process's OpenSlide handles."""
        for s in list(self._handles):
            self._drop(s)


# --------------------------------------------------------------------------------------------------- sampling


class SlideBatchSampler(Sampler):
    """Batch sampler: each step, ``slides_per_batch`` slides and up to ``tiles_per_slide`` random tiles of each.

    Yields lists of global tile indices grouped by slide (ascending within a slide). Slides are shuffled per epoch
    (``set_epoch``), deterministically from ``seed``; slides with no tiles are never drawn. A slide with fewer
    tiles gives all of them unless ``replacement``. For DDP, ``num_replicas``/``rank`` split the slides so every
    rank gets the same number of batches (slides are repeated to pad). ``set_epoch(e, skip_batches=k)`` starts the
    epoch at batch k (exact resume).
    """

    def __init__(self, offsets, slides_per_batch: int, tiles_per_slide: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, replacement: bool = False, num_replicas: int = 1, rank: int = 0):
        off = np.asarray(offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets, dtype=np.int64).reshape(-1)
        if len(off) < 1 or off[0] != 0 or np.any(np.diff(off) < 0):
            raise ValueError("offsets: expected a non-decreasing 1-D sequence starting at 0")
        if slides_per_batch < 1:
            raise ValueError(f"slides_per_batch: expected >= 1, got {slides_per_batch}")
        if tiles_per_slide < 1:
            raise ValueError(f"tiles_per_slide: expected >= 1, got {tiles_per_slide}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank/num_replicas: expected 0 <= rank < num_replicas, got {rank}/{num_replicas}")
        self.offsets = off
        self.counts = np.diff(off)
        self.nonempty = np.nonzero(self.counts > 0)[0]
        self.B, self.m = int(slides_per_batch), int(tiles_per_slide)
        self.shuffle, self.seed, self.drop_last, self.replacement = shuffle, int(seed), drop_last, replacement
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def _slide_order(self) -> np.ndarray:
        order = self.nonempty.copy()
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)  # same on every rank
        if self.num_replicas > 1 and len(order):
            total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
            order = np.resize(order, total)  # wraps around: pad by repeating slides
            order = order[self.rank::self.num_replicas]
        return order

    def __len__(self) -> int:
        n = len(self._slide_order())
        return (n // self.B if self.drop_last else math.ceil(n / self.B))

    def __iter__(self):
        order = self._slide_order()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        for b in range(len(self)):
            slides = order[b * self.B:(b + 1) * self.B]
            out = []
            for s in slides:
                n = int(self.counts[s])
                if self.replacement:
                    idx = np.sort(rng.integers(0, n, self.m))
                elif n <= self.m:
                    idx = np.arange(n)
                else:
                    idx = np.sort(rng.choice(n, self.m, replace=False))
                out.append(self.offsets[s] + idx)
            if b >= self.skip:  # draw skipped batches anyway so the random stream matches an unbroken epoch
                yield np.concatenate(out).tolist()


def collate_tiles(batch) -> dict:
    """Collate ``(image, index, slide)`` items grouped by slide into a dict: ``images`` (N, 3, S, S), ``index``
    (N,), ``slide`` (N,), ``slides`` (B,) and ``offsets`` (B+1,) with slide b owning rows offsets[b]:offsets[b+1]."""
    # numpy stacking: one plain copy, immune to torch intra-op thread contention in the main process
    images = torch.from_numpy(np.stack([np.asarray(b[0]) for b in batch]))
    index = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    slide = torch.tensor([b[2] for b in batch], dtype=torch.int64)
    slides, counts = torch.unique_consecutive(slide, return_counts=True)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return {"images": images, "index": index, "slide": slide, "slides": slides, "offsets": offsets}
