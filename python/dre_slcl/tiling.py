"""Whole-slide tiling: tissue mask, tile grid at a target mpp, per-slide HDF5 coordinates and a manifest.

Per slide (OpenSlide):

1. level-0 mpp from ``openslide.mpp-x/y``; else ``--mpp``; else ``10 / objective-power`` with a warning; else
   the slide is reported as an error.
2. Tissue mask at a low-resolution level (about 16 mask pixels per tile side): Otsu on HSV saturation (never
   below ``sat_floor``, so an empty slide stays empty), closing then opening, connected components smaller than
   ``min_area`` tiles dropped.
3. Grid of non-overlapping ``patch_size_level0`` squares from the origin, fully inside the slide; a tile is kept
   when the mask covers at least ``min_tissue`` of it.
4. ``<out>/patches/<slide_id>.h5``: ``coords`` (N, 2) int64 level-0 (x, y) of the top-left corners with the
   CLAM/TRIDENT attributes (patch_size, patch_size_level0, target_mpp, level0_mpp, level0_width, level0_height,
   patch_level, ...), ``tissue_fraction`` (N,) and the ``tissue_mask``. Written atomically: a file that exists
   is complete, which is what resuming relies on.

:func:`tile_slides` runs that over many slides in worker processes and keeps ``<out>/manifest.csv`` (slide,
slide_id, tiles, status, error, ...). A slide that cannot be read, even one that kills its worker, becomes a
manifest row with status ``error`` or ``unsupported``; the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dre_slcl.atomic import atomic_path, write_text_atomic

# File name endings OpenSlide reads (DICOM is left out: one slide spans many .dcm files; pass one explicitly).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")
MANIFEST_FIELDS = ["slide", "slide_id", "tiles", "status", "error", "warning", "h5", "level0_mpp", "mpp_source",
                   "width", "height", "patch_level", "seconds"]
H5_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TilingParams:
    """How slides are tiled. Units: mpp in um/px, areas in tiles (one tile = patch_size_level0 squared)."""

    target_mpp: float = 0.5
    patch_size: int = 256
    min_tissue: float = 0.5  # fraction of a tile the mask must cover
    min_area: float = 1.0  # smallest tissue component kept
    sat_floor: int = 20  # lowest saturation threshold (0-255): white glass never counts as tissue
    mask_px_per_tile: int = 16  # mask resolution: mask pixels along one tile side
    close_radius: int = 2  # morphology radius in mask pixels
    fallback_mpp: float | None = None  # level-0 mpp for slides that do not record one

    def validate(self) -> None:
        if not (self.target_mpp > 0 and math.isfinite(self.target_mpp)):
            raise ValueError(f"target_mpp: expected a positive number, got {self.target_mpp}")
        if not (isinstance(self.patch_size, int) and self.patch_size >= 8):
            raise ValueError(f"patch_size: expected an int >= 8, got {self.patch_size!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue: expected a fraction in [0, 1], got {self.min_tissue}")
        if self.min_area < 0:
            raise ValueError(f"min_area: expected >= 0 (in tiles), got {self.min_area}")
        if not 0 <= self.sat_floor <= 255:
            raise ValueError(f"sat_floor: expected 0..255, got {self.sat_floor}")
        if self.mask_px_per_tile < 2:
            raise ValueError(f"mask_px_per_tile: expected >= 2, got {self.mask_px_per_tile}")
        if self.close_radius < 0:
            raise ValueError(f"close_radius: expected >= 0, got {self.close_radius}")
        if self.fallback_mpp is not None and not (self.fallback_mpp > 0 and math.isfinite(self.fallback_mpp)):
            raise ValueError(f"fallback_mpp (--mpp): expected a positive number, got {self.fallback_mpp}")

    def fingerprint(self) -> str:
        """What a finished HDF5 must have been made with to be reused on resume."""
        d = asdict(self)
        return json.dumps(d, sort_keys=True)


# -------------------------------------------------------------------------------------------------- mask helpers


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an (..., 3) uint8 image, as uint8 0-255."""
    rgb = rgb.astype(np.int16)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    s = np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0)
    return s.astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold t of uint8 values: the class split {<= t}, {> t} maximising between-class variance."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    p = hist / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = np.where(denom > 0, (mu_t * omega - mu) ** 2 / denom, 0.0)
    best = sigma_b.max()
    if best <= 0:
        return 0  # a constant image: no split
    # Every t in an empty gap between the modes scores the same; take the middle of that plateau rather than the
    # first value, which would hug the lower mode.
    ties = np.nonzero(sigma_b >= best * (1 - 1e-12))[0]
    return int((ties[0] + ties[-1]) // 2)


def _shift_or(m: np.ndarray, r: int, axis: int) -> np.ndarray:
    n = m.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    p = np.pad(m, pad)
    out = np.zeros_like(m)
    for d in range(2 * r + 1):
        out |= p[d:d + n, :] if axis == 0 else p[:, d:d + n]
    return out


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-square (separable, outside the image counts as background)."""
    if r <= 0:
        return mask.copy()
    return _shift_or(_shift_or(mask, r, 1), r, 0)


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1)-square; outside the image counts as background."""
    if r <= 0:
        return mask.copy()
    return ~dilate(np.pad(~mask, r, constant_values=True), r)[r:-r, r:-r]


def closing(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation then erosion, computed with an r-pixel background margin so the image edge adds nothing."""
    if r <= 0:
        return mask.copy()
    p = np.pad(mask, r)
    return erode(dilate(p, r), r)[r:-r, r:-r]


def opening(mask: np.ndarray, r: int) -> np.ndarray:
    """Erosion then dilation: removes pieces thinner than 2r+1 pixels."""
    return dilate(erode(mask, r), r)


def label_runs(mask: np.ndarray):
    """8-connected components of a bool mask by run-length union-find (no scipy).

    Returns ``(rows, starts, ends, comp)``: every horizontal run of True pixels (end exclusive) and its component
    id (0..n-1).
    """
    h, w = mask.shape
    d = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    n = len(rows)
    parent = np.arange(n)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_ptr = np.searchsorted(rows, np.arange(h + 1))
    st, en = starts.tolist(), ends.tolist()
    for r in range(1, h):
        a, a1 = int(row_ptr[r - 1]), int(row_ptr[r])
        b, b1 = int(row_ptr[r]), int(row_ptr[r + 1])
        # Two pointers over the runs of rows r-1 and r; 8-connectivity: [s, e) touches [s', e') if s <= e' and s' <= e.
        while a < a1 and b < b1:
            if st[a] <= en[b] and st[b] <= en[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if en[a] < en[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, comp = np.unique(roots, return_inverse=True)
    return rows, starts, ends, comp.reshape(-1)


def remove_small_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask.copy()
    rows, starts, ends, comp = label_runs(mask)
    area = np.bincount(comp, weights=ends - starts)
    keep = area[comp] >= min_px
    h, w = mask.shape
    acc = np.zeros((h, w + 1), np.int32)
    np.add.at(acc, (rows[keep], starts[keep]), 1)
    np.add.at(acc, (rows[keep], ends[keep]), -1)
    return np.cumsum(acc, axis=1)[:, :w] > 0


def _integral(mask: np.ndarray) -> np.ndarray:
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    return s


def grid_coords(mask: np.ndarray, scale: tuple[float, float], width: int, height: int, patch0: int,
                min_tissue: float) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of ``patch0`` level-0 px on a grid from (0, 0), inside the slide, with mask coverage >= min_tissue.

    ``scale`` = level-0 pixels per mask pixel (x, y). Returns coords (N, 2) int64 (x, y) and coverage (N,).
    """
    xs = np.arange(0, width - patch0 + 1, patch0, dtype=np.int64)
    ys = np.arange(0, height - patch0 + 1, patch0, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int64), np.zeros((0,), np.float32)
    mh, mw = mask.shape
    sx, sy = scale
    c0 = np.clip(np.rint(xs / sx), 0, mw).astype(np.int64)
    c1 = np.clip(np.rint((xs + patch0) / sx), 0, mw).astype(np.int64)
    r0 = np.clip(np.rint(ys / sy), 0, mh).astype(np.int64)
    r1 = np.clip(np.rint((ys + patch0) / sy), 0, mh).astype(np.int64)
    c1, r1 = np.maximum(c1, np.minimum(c0 + 1, mw)), np.maximum(r1, np.minimum(r0 + 1, mh))
    integ = _integral(mask)
    R0, C0 = np.meshgrid(r0, c0, indexing="ij")
    R1, C1 = np.meshgrid(r1, c1, indexing="ij")
    inside = integ[R1, C1] - integ[R0, C1] - integ[R1, C0] + integ[R0, C0]
    area = np.maximum((R1 - R0) * (C1 - C0), 1)
    cover = inside / area
    keep = cover >= max(min_tissue, 1e-9)  # min_tissue 0 still needs some tissue
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([X[keep], Y[keep]], axis=1).astype(np.int64)
    return coords, cover[keep].astype(np.float32)


# ------------------------------------------------------------------------------------------------- slide helpers


def resolve_mpp(properties, fallback_mpp: float | None = None) -> tuple[float, str, str]:
    """Level-0 um/px of a slide: ``(mpp, source, warning)``. Raises ValueError when nothing gives one."""

    def num(key):
        try:
            v = float(properties.get(key, ""))
        except (TypeError, ValueError):
            return None
        return v if v > 0 and math.isfinite(v) else None

    mx, my = num("openslide.mpp-x"), num("openslide.mpp-y")
    if mx is not None or my is not None:
        mx, my = mx or my, my or mx
        warn = ""
        if abs(mx - my) > 0.01 * max(mx, my):
            warn = f"non-square pixels (mpp-x {mx:g}, mpp-y {my:g}); using their mean"
        return (mx + my) / 2, "slide", warn
    if fallback_mpp is not None:
        return float(fallback_mpp), "argument", ""
    power = num("openslide.objective-power")
    if power is not None:
        mpp = 10.0 / power
        return mpp, "objective-power", f"no mpp in the slide; assuming {mpp:g} um/px from objective power {power:g}x"
    raise ValueError("no mpp: the slide records neither mpp nor objective power; pass --mpp")


def best_level(slide, downsample: float) -> int:
    """Highest-resolution level whose downsample is at most ``downsample`` (1 % tolerance for rounded sizes)."""
    return int(slide.get_best_level_for_downsample(downsample * 1.01))


def read_level_rgb_reduced(slide, level: int, factor: int, strip_pixels: int = 1 << 22) -> np.ndarray:
    """Read a whole level in strips, composite over white, and block-average by ``factor``: (h, w, 3) uint8.

    Memory stays bounded by one strip even on slides whose coarsest level is large.
    """
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    mw, mh = -(-lw // factor), -(-lh // factor)
    out = np.empty((mh, mw, 3), np.uint8)
    step = max(factor, (max(1, strip_pixels // lw) // factor) * factor)  # rows per strip, a multiple of factor
    for y in range(0, lh, step):
        rows = min(step, lh - y)
        # read_region takes level-0 coordinates for the origin and level pixels for the size.
        reg = np.asarray(slide.read_region((0, int(round(y * ds))), level, (lw, rows)), dtype=np.float32)
        a = reg[..., 3:4] / 255.0
        rgb = reg[..., :3] * a + 255.0 * (1.0 - a)  # transparent (no data) reads as white glass
        ph, pw = -(-rows // factor) * factor - rows, mw * factor - lw
        if ph or pw:
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
        blk = rgb.reshape(rgb.shape[0] // factor, factor, mw, factor, 3).mean(axis=(1, 3))
        out[y // factor:y // factor + blk.shape[0]] = np.clip(blk + 0.5, 0, 255).astype(np.uint8)
    return out


def tissue_mask(slide, patch0: int, params: TilingParams):
    """Tissue mask for a slide: ``(mask bool (h, w), (sx, sy) level-0 px per mask px, threshold, level)``."""
    w0, h0 = slide.dimensions
    # ~mask_px_per_tile mask pixels per tile side, but never a mask longer than 8192 px.
    ds = max(patch0 / params.mask_px_per_tile, max(w0, h0) / 8192.0, 1.0)
    level = best_level(slide, ds)
    lds = slide.level_downsamples[level]
    factor = max(1, int(ds / lds))
    rgb = read_level_rgb_reduced(slide, level, factor)
    sat = saturation(rgb)
    thr = max(otsu_threshold(sat), params.sat_floor)
    mask = sat > thr
    lw, lh = slide.level_dimensions[level]
    sx = w0 / lw * factor
    sy = h0 / lh * factor
    r = params.close_radius
    mask = closing(mask, r)  # bridge gaps between nuclei
    mask = opening(mask, r)  # drop specks thinner than the kernel
    min_px = params.min_area * patch0 * patch0 / (sx * sy)
    mask = remove_small_components(mask, min_px)
    return mask, (sx, sy), thr, level


# ------------------------------------------------------------------------------------------------- per slide


def slide_id_of(path: str | os.PathLike) -> str:
    """The slide id: the file name without its last extension."""
    return Path(path).stem


def h5_path_for(out_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(out_dir) / "patches" / f"{slide_id}.h5"


def finished_tiles(h5_path: Path, params: TilingParams) -> int | None:
    """Tile count of a finished HDF5 made with ``params``, else None (missing, unreadable or other params)."""
    if not h5_path.is_file():
        return None
    try:
        import h5py

        with h5py.File(h5_path, "r") as f:
            if f["coords"].attrs.get("tiling_params") != params.fingerprint():
                return None
            return int(f["coords"].shape[0])
    except Exception:  # a damaged file is re-made, not trusted
        return None


def _looks_like_tiff(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def _row(path, slide_id, **kw) -> dict:
    row = {k: "" for k in MANIFEST_FIELDS}
    row.update(slide=str(path), slide_id=slide_id)
    row.update(kw)
    return row


def tile_slide(path: str | os.PathLike, out_dir: str | os.PathLike, params: TilingParams = TilingParams(), *,
               slide_id: str | None = None) -> dict:
    """Tile one slide into ``<out_dir>/patches/<slide_id>.h5``; returns its manifest row. Never raises on a bad
    slide: the row has status ``unsupported`` or ``error`` and the message."""
    t0 = time.perf_counter()
    slide_id = slide_id or slide_id_of(path)
    try:
        import openslide
    except ImportError as e:  # pragma: no cover - environment problem, reported per slide
        return _row(path, slide_id, status="error", tiles=0, error=f"openslide unavailable: {e}")
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        why = f"unsupported format: {e or 'not a slide'}"
        if _looks_like_tiff(path):
            why += " (a TIFF OpenSlide cannot parse: truncated, corrupt, or not a whole-slide layout)"
        return _row(path, slide_id, status="unsupported", tiles=0, error=why)
    except Exception as e:
        return _row(path, slide_id, status="error", tiles=0, error=f"cannot open: {type(e).__name__}: {e}")
    try:
        return _tile_open_slide(slide, path, slide_id, out_dir, params, t0)
    except Exception as e:
        return _row(path, slide_id, status="error", tiles=0, error=f"{type(e).__name__}: {e}",
                    seconds=round(time.perf_counter() - t0, 3))
    finally:
        slide.close()


def _tile_open_slide(slide, path, slide_id, out_dir, params: TilingParams, t0: float) -> dict:
    import h5py

    mpp, source, warn = resolve_mpp(slide.properties, params.fallback_mpp)
    w0, h0 = slide.dimensions
    patch0 = max(1, int(round(params.patch_size * params.target_mpp / mpp)))
    mask, (sx, sy), thr, mask_level = tissue_mask(slide, patch0, params)
    coords, cover = grid_coords(mask, (sx, sy), w0, h0, patch0, params.min_tissue)
    level = best_level(slide, patch0 / params.patch_size)
    read_size = max(1, int(round(patch0 / slide.level_downsamples[level])))
    if len(coords):
        # Touch one tile so a slide whose pixel data is damaged fails here, not later inside a DataLoader.
        slide.read_region(tuple(int(v) for v in coords[len(coords) // 2]), level, (read_size, read_size))
    h5 = h5_path_for(out_dir, slide_id)
    with atomic_path(h5, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=coords.astype(np.int64), maxshape=(None, 2))
            a = d.attrs
            a["patch_size"] = params.patch_size  # px of the tile at target_mpp (what the encoder sees)
            a["patch_size_level0"] = patch0  # the same tile in level-0 px
            a["target_mpp"] = float(params.target_mpp)
            a["level0_mpp"] = float(mpp)
            a["level0_width"], a["level0_height"] = int(w0), int(h0)
            a["patch_level"] = level  # CLAM: level the tiles are read from
            a["read_size"] = read_size  # px read at patch_level before resizing to patch_size
            a["level0_magnification"] = 10.0 / mpp  # TRIDENT keeps magnifications (10 / mpp convention)
            a["target_magnification"] = 10.0 / params.target_mpp
            a["overlap"] = 0
            a["name"] = slide_id
            a["slide_path"] = str(Path(path).resolve())
            a["mpp_source"] = source
            a["tiling_params"] = params.fingerprint()
            a["format_version"] = H5_FORMAT_VERSION
            f.create_dataset("tissue_fraction", data=cover)
            m = f.create_dataset("tissue_mask", data=mask.astype(np.uint8), compression="gzip")
            m.attrs["downsample_x"], m.attrs["downsample_y"] = sx, sy
            m.attrs["saturation_threshold"] = thr
            m.attrs["level"] = mask_level
    return _row(path, slide_id, status="ok", tiles=len(coords), warning=warn, h5=str(h5), level0_mpp=f"{mpp:.6g}",
                mpp_source=source, width=w0, height=h0, patch_level=level,
                seconds=round(time.perf_counter() - t0, 3))


# ------------------------------------------------------------------------------------------------- many slides


def find_slides(inputs, *, recursive: bool = False, extensions=SLIDE_EXTENSIONS) -> list[Path]:
    """Expand files and directories into slide paths (directories: files whose name ends in ``extensions``)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    exts = tuple(e.lower() for e in extensions)
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            out += sorted(q for q in it if q.is_file() and q.name.lower().endswith(exts) and not q.name.startswith("."))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"SLIDE_OR_DIR: {p} does not exist")
    return out


def read_manifest(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_manifest(path: str | os.PathLike, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r["slide_id"]):
        w.writerow(r)
    write_text_atomic(path, buf.getvalue())


def _job(args) -> dict:
    path, out_dir, params, slide_id = args
    return tile_slide(path, out_dir, params, slide_id=slide_id)


def tile_slides(inputs, out_dir: str | os.PathLike, params: TilingParams = TilingParams(), *, workers: int = 0,
                overwrite: bool = False, progress: bool = True, recursive: bool = False,
                extensions=SLIDE_EXTENSIONS) -> list[dict]:
    """Tile every slide in ``inputs`` (files and/or directories) into ``out_dir``; returns this run's rows.

    ``workers`` = 0 tiles in this process; >= 1 uses that many worker processes (spawned: a crash in OpenSlide
    takes down only a worker, and the slide is retried alone once before it is reported). Slides whose HDF5
    already exists with the same parameters are skipped (status ``skipped``) unless ``overwrite``.
    ``<out_dir>/manifest.csv`` is rewritten after every slide, merged with rows of earlier runs.
    """
    params.validate()
    if workers < 0:
        raise ValueError(f"workers: expected >= 0, got {workers}")
    out_dir = Path(out_dir)
    (out_dir / "patches").mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.csv"
    table = {r["slide_id"]: r for r in read_manifest(manifest)}
    slides = find_slides(inputs, recursive=recursive, extensions=extensions)

    rows: list[dict] = []
    early: list[dict] = []  # duplicates and finished slides, recorded before any work
    jobs = []
    seen: dict[str, Path] = {}
    for p in slides:
        sid = slide_id_of(p)
        if sid in seen:
            early.append(_row(p, sid + f"@{p}", status="error", tiles=0,
                             error=f"duplicate slide_id {sid!r} (also {seen[sid]}); rename one"))
            continue
        seen[sid] = p
        n = None if overwrite else finished_tiles(h5_path_for(out_dir, sid), params)
        if n is not None:
            old = table.get(sid, {})
            early.append({**_row(p, sid), **{k: old.get(k, "") for k in MANIFEST_FIELDS}, "slide": str(p),
                         "slide_id": sid, "tiles": n, "status": "skipped", "error": "",
                         "h5": str(h5_path_for(out_dir, sid))})
        else:
            # A run killed hard (SIGKILL, power loss) can leave its temp file; it is never mistaken for a result
            # (only <slide_id>.h5 counts) but would pile up.
            for stale in (out_dir / "patches").glob(f".{sid}.h5.*.tmp"):
                stale.unlink(missing_ok=True)
            jobs.append((str(p), str(out_dir), params, sid))

    from tqdm import tqdm

    bar = tqdm(total=len(slides), desc="tile", unit="slide", disable=not progress, dynamic_ncols=True)

    def record(row):
        rows.append(row)
        table[row["slide_id"]] = row
        write_manifest(manifest, list(table.values()))
        bar.update(1)
        if row.get("warning"):
            warnings.warn(f"{row['slide_id']}: {row['warning']}", stacklevel=3)
        bar.set_postfix(tiles=sum(int(r["tiles"] or 0) for r in rows), failed=sum(
            r["status"] in ("error", "unsupported") for r in rows))

    for r in early:
        record(r)
    try:
        if workers == 0:
            for job in jobs:
                record(_job(job))
        else:
            _run_pool(jobs, workers, record)
    finally:
        bar.close()
    return rows


def _run_pool(jobs, workers: int, record, fn=_job) -> None:
    """Run ``fn(job)`` with at most ``workers`` in flight, passing each result row to ``record``. Jobs in flight
    when a worker dies are retried one at a time, so only the slide that kills its worker is reported."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # Not fork: it would copy the parent's threads and any OpenSlide state. A fork server starts one clean
    # process that imports this module once (importing dre_slcl pulls in torch: seconds) and forks workers off it,
    # so neither the first pool nor one rebuilt after a crash pays that import per worker.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    workers = max(1, min(workers, len(jobs)))
    pending = deque(jobs)
    suspects: deque = deque()
    while pending:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            inflight = {}
            broken = False
            while (pending or inflight) and not broken:
                while pending and len(inflight) < workers:
                    job = pending.popleft()
                    inflight[ex.submit(fn, job)] = job
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = inflight.pop(fut)
                    try:
                        record(fut.result())
                    except BrokenProcessPool:
                        broken = True
                        suspects.append(job)
                    except Exception as e:
                        record(_row(job[0], job[3], status="error", tiles=0, error=f"{type(e).__name__}: {e}"))
            if broken:  # every job still in flight may be the culprit
                suspects.extend(inflight.values())
    for job in suspects:
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                record(ex.submit(fn, job).result())
        except BrokenProcessPool:
            record(_row(job[0], job[3], status="error", tiles=0,
                        error="the worker process died while reading this slide (crash in the slide reader)"))
