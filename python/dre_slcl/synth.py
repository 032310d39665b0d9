"""Synthetic whole-slide images: real pyramidal Aperio-style TIFFs that OpenSlide opens like scanner output.

Each slide is a white glass background with a few tissue fragments of one *kind* (its slide-level label), holes
(lumens, tears) inside the fragments, a little debris outside them and a margin kept free of everything (no pen
marks). Kinds differ in stain colour and texture so that tiles of different kinds are separable:

- ``carcinoma``: pink eosinophilic background, large irregular purple nuclei.
- ``lymphoid``: lilac background, dense small round dark-blue nuclei.
- ``stroma``: pale pink wavy collagen fibres, sparse spindle nuclei.

The TIFF holds every pyramid level as its own tiled page (256 px tiles, zlib with a horizontal predictor, which
needs no imagecodecs) and an Aperio ImageDescription with ``AppMag`` and ``MPP``, so OpenSlide reports
``openslide.mpp-x`` and ``openslide.objective-power``. Everything is deterministic given the seed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dre_slcl.atomic import atomic_path, write_text_atomic

BACKGROUND = (243, 243, 241)


@dataclass(frozen=True)
class TissueKind:
    name: str
    base: tuple[int, int, int]  # cytoplasm / matrix colour
    nucleus: tuple[int, int, int]
    nucleus_radius_um: tuple[float, float]  # semi-axis range
    nucleus_elongation: tuple[float, float]  # ratio of long to short axis
    nucleus_spacing_um: float  # mean distance between nuclei
    fibres: bool
    reports: tuple[str, ...]  # findings: variants that share the kind's vocabulary


KINDS: tuple[TissueKind, ...] = (
    TissueKind(
        name="carcinoma",
        base=(232, 150, 196),
        nucleus=(112, 58, 150),
        nucleus_radius_um=(3.5, 6.0),
        nucleus_elongation=(1.0, 1.6),
        nucleus_spacing_um=13.0,
        fibres=False,
        reports=(
            "Invasive carcinoma: sheets of atypical epithelial cells with large "
            "pleomorphic nuclei and eosinophilic cytoplasm.",
            "Carcinoma with large pleomorphic nuclei and abundant eosinophilic "
            "cytoplasm in sheets of atypical epithelial cells.",
            "Atypical epithelial cells with large pleomorphic nuclei and "
            "eosinophilic cytoplasm, consistent with invasive carcinoma.",
        ),
    ),
    TissueKind(
        name="lymphoid",
        base=(188, 158, 214),
        nucleus=(58, 34, 112),
        nucleus_radius_um=(2.4, 3.4),
        nucleus_elongation=(1.0, 1.15),
        nucleus_spacing_um=7.5,
        fibres=False,
        reports=(
            "Lymphoid tissue: dense sheets of small round lymphocytes with dark "
            "hyperchromatic nuclei and scant cytoplasm.",
            "Dense small round lymphocytes with dark hyperchromatic nuclei and "
            "scant cytoplasm, in keeping with lymphoid tissue.",
            "Sheets of small lymphocytes with round dark hyperchromatic nuclei and scant cytoplasm; lymphoid tissue.",
        ),
    ),
    TissueKind(
        name="stroma",
        base=(246, 200, 220),
        nucleus=(96, 52, 134),
        nucleus_radius_um=(1.3, 2.0),
        nucleus_elongation=(3.0, 5.0),
        nucleus_spacing_um=28.0,
        fibres=True,
        reports=(
            "Benign fibrous stroma: wavy collagen fibres with sparse bland spindle cells. No malignancy.",
            "Wavy collagen fibres and sparse bland spindle cells in benign fibrous stroma; no malignancy.",
            "Benign paucicellular fibrous stroma of wavy collagen fibres with bland spindle cells. No malignancy.",
        ),
    ),
)
KIND_NAMES = tuple(k.name for k in KINDS)
# The specimen sentence does not depend on the kind, so only the findings tell reports of different kinds apart.
SPECIMEN = (
    "{n} tissue fragment(s), the largest {size} mm.",
    "Received as {n} fragment(s) measuring up to {size} mm.",
    "Specimen: {n} fragment(s), largest dimension {size} mm.",
)
BLANK_REPORT = "Slide contains no tissue; glass only. Non-diagnostic."


@dataclass
class SlideInfo:
    """One generated slide, as written to ``slides.csv``."""

    slide_id: str
    path: str
    kind: str  # a KIND_NAMES entry or "blank"
    label: int  # index into the kinds used, -1 for blank
    width: int
    height: int
    mpp: float | None
    app_mag: float | None
    tissue_area_px: int  # level-0 pixels of tissue in the ground-truth mask
    fragments: int
    holes: int
    file_bytes: int
    report: str


# ----------------------------------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1] of shape (h, w) with features about ``cell`` pixels wide."""
    gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC), dtype=np.float32).clip(-1, 1)


def _blob_polygon(rng, cx, cy, rx, ry, angle, wobble, n=48):
    """A closed irregular ellipse (list of (x, y)) centred at (cx, cy)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    # Low-order Fourier wobble keeps the outline organic without self-intersections.
    r = np.ones(n)
    for order in (2, 3, 5):
        r += wobble / order * rng.uniform(-1, 1) * np.cos(order * t + rng.uniform(0, 2 * np.pi))
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return list(zip((cx + ca * x - sa * y).tolist(), (cy + sa * x + ca * y).tolist()))


def _tissue_mask(rng, width, height, mpp, margin):
    """Ground-truth level-0 tissue mask (bool, H x W), number of fragments and holes."""
    f = 8  # draw at 1/8 resolution, then upsample with smoothing: organic outlines at little cost
    lw, lh = max(1, width // f), max(1, height // f)
    m = margin / f
    canvas = Image.new("L", (lw, lh), 0)
    draw = ImageDraw.Draw(canvas)
    n_frag = int(rng.integers(1, 4))
    holes = 0
    avail_w, avail_h = lw - 2 * m, lh - 2 * m
    for _ in range(n_frag):
        rx = rng.uniform(0.16, 0.30) * avail_w
        ry = rng.uniform(0.20, 0.38) * avail_h
        # The wobble can push the outline ~20 % out and the fragment may be rotated: keep the bounding circle
        # (radius rmax) inside the margins.
        rx, ry = min(rx, avail_h / 2 / 1.25), min(ry, avail_h / 2 / 1.25, avail_w / 2 / 1.25)
        rx = min(rx, avail_w / 2 / 1.25)
        rmax = max(rx, ry) * 1.25
        cx = rng.uniform(m + rmax, lw - m - rmax) if lw - 2 * m > 2 * rmax else lw / 2
        cy = rng.uniform(m + rmax, lh - m - rmax) if lh - 2 * m > 2 * rmax else lh / 2
        draw.polygon(_blob_polygon(rng, cx, cy, rx, ry, rng.uniform(0, np.pi), 0.25), fill=255)
        # Holes: lumens and tears of 80-240 um across, inside the fragment (skipped on fragments too small).
        for _ in range(int(rng.integers(1, 4))):
            hr = rng.uniform(40, 120) / mpp / f
            if hr * 2.5 > min(rx, ry):
                continue
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
            hx, hy = cx + d * rx * math.cos(a), cy + d * ry * math.sin(a)
            draw.polygon(_blob_polygon(rng, hx, hy, hr, hr * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), 0.2),
                         fill=0)
            holes += 1
    canvas = canvas.filter(ImageFilter.GaussianBlur(1.0))
    mask = np.asarray(canvas.resize((width, height), Image.BILINEAR)) >= 128
    # Pen-free margins: nothing at all within `margin` of the edge.
    mi = int(margin)
    mask[:mi, :] = False
    mask[height - mi:, :] = False
    mask[:, :mi] = False
    mask[:, width - mi:] = False
    return mask, n_frag, holes


def _draw_nuclei(rng, img: Image.Image, mask: np.ndarray, kind: TissueKind, mpp: float, angle_field=None):
    h, w = mask.shape
    spacing = kind.nucleus_spacing_um / mpp
    n = int(mask.sum() / (spacing * spacing))
    if n == 0:
        return
    # Propose uniformly over the slide, keep centres inside tissue (oversample by the inverse tissue fraction).
    frac = max(mask.mean(), 1e-6)
    cand = int(n / frac * 1.05) + 16
    xs = rng.uniform(0, w, cand)
    ys = rng.uniform(0, h, cand)
    keep = mask[ys.astype(np.int64).clip(0, h - 1), xs.astype(np.int64).clip(0, w - 1)]
    xs, ys = xs[keep][:n], ys[keep][:n]
    n = len(xs)
    r0, r1 = kind.nucleus_radius_um
    ry = rng.uniform(r0, r1, n) / mpp
    rx = ry * rng.uniform(*kind.nucleus_elongation, n)
    if angle_field is not None:  # spindle nuclei follow the fibres
        ang = angle_field[ys.astype(np.int64).clip(0, h - 1), xs.astype(np.int64).clip(0, w - 1)]
    else:
        ang = rng.uniform(0, np.pi, n)
    t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    wob = 1 + 0.12 * rng.uniform(-1, 1, (n, 10))
    px = rx[:, None] * wob * np.cos(t)
    py = ry[:, None] * wob * np.sin(t)
    ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
    X = xs[:, None] + ca * px - sa * py
    Y = ys[:, None] + sa * px + ca * py
    base = np.array(kind.nucleus, dtype=np.float64)
    cols = (base[None, :] * rng.uniform(0.85, 1.15, (n, 1))).clip(0, 255).astype(np.int64)
    draw = ImageDraw.Draw(img)
    for i in range(n):
        draw.polygon(list(zip(X[i].tolist(), Y[i].tolist())), fill=tuple(cols[i].tolist()))


def render_slide(width: int, height: int, kind: TissueKind | None, mpp: float, seed) -> tuple[np.ndarray, np.ndarray,
                                                                                                dict]:
    """Render level 0: RGB uint8 (H, W, 3), tissue mask bool (H, W) and {fragments, holes}. ``kind=None``: blank."""
    rng = np.random.default_rng(seed)
    margin = max(32, int(0.06 * min(width, height)))
    if kind is None:
        mask, n_frag, holes = np.zeros((height, width), bool), 0, 0
        layer = None
    else:
        mask, n_frag, holes = _tissue_mask(rng, width, height, mpp, margin)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[...] = BACKGROUND
    if kind is not None:
        # Stain layer: base colour, slow intensity variation (section thickness) and fine grain.
        shade = _smooth_noise(rng, height, width, 200 / mpp)
        grain = rng.normal(0.0, 4.0, size=(height, width)).astype(np.float32)
        layer = np.asarray(kind.base, np.float32)[None, None, :] * (1 + 0.06 * shade[..., None]) + grain[..., None]
        angle_field = None
        if kind.fibres:
            # Wavy collagen: stripes along a slowly rotating direction, ~12 um apart.
            warp = _smooth_noise(rng, height, width, 120 / mpp)
            theta = rng.uniform(0, np.pi)
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * np.pi * mpp / 12.0) + 6.0 * warp
            stripes = (np.sin(phase) > 0.35).astype(np.float32)
            fibre = np.array([222, 138, 182], np.float32)
            layer += stripes[..., None] * (fibre - np.asarray(kind.base, np.float32))
            # Stripes run perpendicular to theta; spindle nuclei lie along them.
            angle_field = (theta + np.pi / 2) + 0.6 * warp
            del yy, xx, phase, stripes
        layer = layer.clip(0, 255).astype(np.uint8)
        img = Image.fromarray(layer)
        _draw_nuclei(rng, img, mask, kind, mpp, angle_field)
        layer = np.asarray(img)
        rgb[mask] = layer[mask]
    # Debris: a few small grey-brown specks (10-25 um) on the glass, away from the margins. Far below the minimum
    # tissue area, so tiling must drop them.
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        r = rng.uniform(5, 12) / mpp
        x = rng.uniform(margin + r, width - margin - r)
        y = rng.uniform(margin + r, height - margin - r)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(150, 120, 110))
    rgb = np.asarray(img).copy()
    return rgb, mask, {"fragments": n_frag, "holes": holes}


# ------------------------------------------------------------------------------------------------------ writing


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 mean pooling; odd sizes are padded by edge replication (level size = ceil(size / 2))."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    h, w = a.shape[:2]
    s = a.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
    return ((s + 2) >> 2).astype(np.uint8)


def aperio_description(width: int, height: int, mpp: float | None, app_mag: float | None, slide_id: str,
                       tile: int = 256) -> str:
    """An Aperio ImageDescription; OpenSlide parses the ``key = value`` fields after the first ``|``."""
    fields = [f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) ZLIB"]
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    fields += ["ScanScope ID = DRE-SYNTH", f"Filename = {slide_id}", "Title = dre-slcl synthetic slide"]
    return "|".join(fields)


def write_pyramidal_tiff(path: str | os.PathLike, level0: np.ndarray, *, mpp: float | None, app_mag: float | None,
                         slide_id: str = "slide", tile: int = 256, min_level_size: int = 1024,
                         compression_level: int = 6) -> list[tuple[int, int]]:
    """Write ``level0`` (H, W, 3 uint8) as an Aperio-style tiled pyramidal TIFF, atomically.

    Levels halve until the longer side is at most ``min_level_size``; each level is its own tiled page (not a
    SubIFD) so OpenSlide lists them all. Returns the level sizes (width, height).
    """
    import tifffile

    if level0.ndim != 3 or level0.shape[2] != 3 or level0.dtype != np.uint8:
        raise ValueError(f"level0: expected an (H, W, 3) uint8 array, got {level0.shape} {level0.dtype}")
    levels = [level0]
    while max(levels[-1].shape[:2]) > min_level_size and min(levels[-1].shape[:2]) >= 2 * tile:
        levels.append(_halve(levels[-1]))
    h0, w0 = level0.shape[:2]
    bigtiff = level0.nbytes * 4 // 3 > 2**31  # classic TIFF offsets are 32-bit
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for i, lev in enumerate(levels):
            h, w = lev.shape[:2]
            desc = (aperio_description(w0, h0, mpp, app_mag, slide_id, tile) if i == 0
                    else f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} -> {w}x{h} ZLIB")
            tw.write(lev, tile=(tile, tile), photometric="rgb", compression="zlib",
                     compressionargs={"level": compression_level}, predictor=True, description=desc,
                     metadata=None, subfiletype=0 if i == 0 else 1, maxworkers=os.cpu_count())
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


# ----------------------------------------------------------------------------------------------------- data sets


def _report(rng, kind: TissueKind | None, info: dict, mask: np.ndarray, mpp: float) -> str:
    if kind is None:
        return BLANK_REPORT
    ys, xs = np.nonzero(mask[::16, ::16])
    extent = 0.0 if len(xs) == 0 else max(np.ptp(xs), np.ptp(ys)) * 16 * mpp / 1000.0
    finding = kind.reports[int(rng.integers(len(kind.reports)))]
    specimen = SPECIMEN[int(rng.integers(len(SPECIMEN)))].format(n=info["fragments"], size=f"{extent:.1f}")
    holes = f" {info['holes']} small space(s) within the tissue." if info["holes"] else ""
    return f"{finding} {specimen}{holes}"


def make_slide(path: str | os.PathLike, *, slide_id: str, kind: str | None, width: int, height: int,
               mpp: float | None = 0.25, app_mag: float | None = None, seed=0, label: int = -1,
               render_mpp: float | None = None) -> tuple[SlideInfo, np.ndarray]:
    """Render and write one slide; returns its :class:`SlideInfo` and the ground-truth level-0 tissue mask.

    ``kind`` is a :data:`KIND_NAMES` entry or ``None`` for a slide with no tissue. ``mpp=None`` writes no MPP
    field (a slide without mpp); ``app_mag`` defaults to ``10 / mpp`` rounded, ``app_mag=0`` omits it too.
    ``render_mpp`` is the physical scale used for drawing when ``mpp`` is None (default 0.25).
    """
    if width < 256 or height < 256:
        raise ValueError(f"width/height: expected at least 256 px, got {width}x{height}")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp: expected a positive float or None, got {mpp}")
    k = None
    if kind is not None:
        if kind not in KIND_NAMES:
            raise ValueError(f"kind: expected one of {KIND_NAMES} or None, got {kind!r}")
        k = KINDS[KIND_NAMES.index(kind)]
    if app_mag is None:
        app_mag = round(10.0 / mpp) if mpp is not None else None
    elif app_mag == 0:
        app_mag = None
    draw_mpp = mpp if mpp is not None else (render_mpp or 0.25)
    rgb, mask, info = render_slide(width, height, k, draw_mpp, seed)
    write_pyramidal_tiff(path, rgb, mpp=mpp, app_mag=app_mag, slide_id=slide_id)
    report = _report(np.random.default_rng([*np.atleast_1d(seed).tolist(), 7]), k, info, mask, draw_mpp)
    si = SlideInfo(slide_id=slide_id, path=str(path), kind=kind or "blank", label=label, width=width, height=height,
                   mpp=mpp, app_mag=app_mag, tissue_area_px=int(mask.sum()), fragments=info["fragments"],
                   holes=info["holes"], file_bytes=os.path.getsize(path), report=report)
    return si, mask


def write_table(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> None:
    """Write rows as CSV atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_text_atomic(path, buf.getvalue())


def synth_dataset(out: str | os.PathLike, *, n_slides: int = 6, width: int = 6144, height: int = 4096,
                  mpp: float = 0.25, kinds: tuple[str, ...] = KIND_NAMES, blank: int = 0, seed: int = 0,
                  embedding_dim: int = 256, progress: bool = True) -> list[SlideInfo]:
    """Generate a data set under ``out``: ``slides/<id>.svs``, ``reports.csv`` (slide_id, label, kind, report),
    ``slides.csv`` (ground truth) and, if ``embedding_dim`` > 0, ``report_embeddings.safetensors`` from the
    hashed bag-of-words encoder in :mod:`dre_slcl.reports`.

    Labels cycle over ``kinds`` in a seeded random order; slide sizes jitter by up to 10 % around
    ``width`` x ``height`` so the data set is not all one shape. ``blank`` extra slides have no tissue.
    """
    if n_slides < 0 or blank < 0:
        raise ValueError(f"n_slides/blank: expected >= 0, got {n_slides}/{blank}")
    if not kinds:
        raise ValueError("kinds: expected at least one kind")
    for k in kinds:
        if k not in KIND_NAMES:
            raise ValueError(f"kinds: unknown kind {k!r}, expected some of {KIND_NAMES}")
    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.arange(n_slides) % len(kinds)
    rng.shuffle(labels)
    jobs = [(f"synth_{i:03d}", kinds[int(labels[i])], int(labels[i])) for i in range(n_slides)]
    jobs += [(f"synth_blank_{i:03d}", None, -1) for i in range(blank)]
    infos: list[SlideInfo] = []
    from tqdm import tqdm

    for i, (sid, kind, label) in enumerate(tqdm(jobs, desc="synth", unit="slide", disable=not progress)):
        sw = int(width * rng.uniform(0.9, 1.1))
        sh = int(height * rng.uniform(0.9, 1.1))
        info, _ = make_slide(out / "slides" / f"{sid}.svs", slide_id=sid, kind=kind, width=sw, height=sh, mpp=mpp,
                             seed=[seed, i], label=label)
        info.path = os.path.relpath(info.path, out)
        infos.append(info)
    rows = [asdict(i) for i in infos]
    write_table(out / "reports.csv", rows, ["slide_id", "label", "kind", "report"])
    write_table(out / "slides.csv", rows, list(SlideInfo.__dataclass_fields__))
    if embedding_dim > 0:
        from dre_slcl.reports import hashed_text_embeddings, save_report_embeddings

        emb = hashed_text_embeddings([i.report for i in infos], dim=embedding_dim)
        save_report_embeddings(out / "report_embeddings.safetensors", [i.slide_id for i in infos], emb)
    return infos
