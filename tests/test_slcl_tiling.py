"""dre_slcl.tiling: tissue mask, tile grid at the target mpp, HDF5 coordinates, manifest, bad files, resume."""

import csv
import os
from collections import deque

import numpy as np
import pytest
import slcl_helpers

h5py = pytest.importorskip("h5py")
openslide = pytest.importorskip("openslide")

from dre_slcl import tiling  # noqa: E402
from dre_slcl.tiling import (TilingParams, closing, erode, grid_coords, label_runs,  # noqa: E402
                             opening, otsu_threshold, remove_small_components, tile_slide, tile_slides)


from slcl_helpers import data_root, tile_dir  # noqa: E402,F401  (session fixtures)


def manifest_rows(out):
    with open(out / "manifest.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------ mask pieces


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(10, 3, 5000), rng.normal(120, 10, 2000)]).clip(0, 255).astype(np.uint8)
    t = otsu_threshold(v)
    assert 25 < t < 100
    assert otsu_threshold(np.full(100, 7, np.uint8)) == 0  # constant: no split


def _flood_count(mask):
    """Reference 8-connected component sizes by BFS."""
    seen = np.zeros_like(mask)
    sizes = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        q, n = deque([(y0, x0)]), 0
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            n += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        q.append((yy, xx))
        sizes.append(n)
    return sorted(sizes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_flood_fill(seed):
    mask = np.random.default_rng(seed).random((40, 53)) < 0.45
    rows, starts, ends, comp = label_runs(mask)
    sizes = sorted(np.bincount(comp, weights=ends - starts).astype(int).tolist())
    assert sizes == _flood_count(mask)
    kept = remove_small_components(mask, 5)
    assert _flood_count(kept) == [s for s in _flood_count(mask) if s >= 5]


def test_morphology():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    m[9, 9] = False  # a pinhole: closing fills it
    m[1, 1] = True  # a speck: opening removes it
    closed = closing(m, 1)
    assert closed[9, 9] and closed.sum() == 101  # pinhole filled, nothing grown at the image edge
    opened = opening(closed, 1)
    assert not opened[1, 1] and opened[5:15, 5:15].all() and opened.sum() == 100
    edge = np.zeros((8, 8), bool)
    edge[:, :3] = True  # tissue touching the image edge survives both
    assert (opening(closing(edge, 1), 1) == edge).all()
    assert erode(np.ones((5, 5), bool), 1).sum() == 9  # erosion treats outside as background


def test_grid_coverage():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half
    coords, cover = grid_coords(mask, (10.0, 10.0), 100, 100, 20, 0.5)
    # tissue covers level-0 x < 50: tiles at x = 0, 20 fully, x = 40 half (kept at min_tissue 0.5)
    assert set(map(tuple, coords.tolist())) == {(x, y) for x in (0, 20, 40) for y in range(0, 81, 20)}
    assert sorted(set(cover.tolist())) == [0.5, 1.0]
    assert len(grid_coords(mask, (10.0, 10.0), 100, 100, 20, 0.6)[0]) == 10
    assert len(grid_coords(mask, (10.0, 10.0), 30, 30, 20, 0.5)[0]) == 1  # only tiles fully inside the slide


# ------------------------------------------------------------------------------------------------ whole slides


@pytest.mark.parametrize("name", slcl_helpers.TISSUE)
def test_tiles_match_tissue_area_and_stay_inside(data_root, tile_dir, name):
    info, mask = slcl_helpers.make_slides(data_root)[name]
    with h5py.File(tile_dir / "patches" / f"{name}.h5") as f:
        coords = f["coords"][...]
        a = dict(f["coords"].attrs)
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2
    patch0 = int(round(256 * 0.5 / info.mpp))
    assert a["patch_size"] == 256 and a["patch_size_level0"] == patch0 and a["target_mpp"] == 0.5
    assert a["level0_mpp"] == pytest.approx(info.mpp)
    assert (a["level0_width"], a["level0_height"]) == (info.width, info.height)
    assert (coords >= 0).all() and (coords[:, 0] + patch0 <= info.width).all()
    assert (coords[:, 1] + patch0 <= info.height).all()
    assert (coords % patch0 == 0).all() and len(np.unique(coords, axis=0)) == len(coords)
    # Stated tolerance: the tile count is the tissue area in tiles within 20 % + 2 tiles (boundary tiles count
    # when half covered), and within 1 tile (or 5 %) of the grid cells the ground-truth mask half covers.
    expected = info.tissue_area_px / patch0**2
    assert abs(len(coords) - expected) <= 0.2 * expected + 2, (len(coords), expected)
    truth = slcl_helpers.grid_truth(mask, patch0)
    assert abs(len(coords) - truth) <= max(1, 0.05 * truth), (len(coords), truth)
    # every kept tile really is mostly tissue
    cover = [mask[y:y + patch0, x:x + patch0].mean() for x, y in coords]
    assert min(cover) > 0.3


def test_40x_slide_reads_from_level_1(tile_dir):
    with h5py.File(tile_dir / "patches" / "carc40x.h5") as f:
        a = dict(f["coords"].attrs)
    assert a["patch_size_level0"] == 512 and a["patch_level"] == 1 and a["read_size"] == 256


def test_non_square_slide(data_root, tile_dir):
    rows = manifest_rows(tile_dir)
    assert rows["wide"]["status"] == "ok" and (rows["wide"]["width"], rows["wide"]["height"]) == ("4000", "1400")
    with h5py.File(tile_dir / "patches" / "wide.h5") as f:
        mask = f["tissue_mask"]
        assert mask.shape[1] > 2 * mask.shape[0]  # the mask keeps the aspect ratio


def test_blank_slide_gives_zero_tiles(tile_dir):
    row = manifest_rows(tile_dir)["blank"]
    assert row["status"] == "ok" and row["tiles"] == "0" and row["error"] == ""
    with h5py.File(tile_dir / "patches" / "blank.h5") as f:
        assert f["coords"].shape == (0, 2)


def test_slide_without_mpp(data_root, tmp_path):
    slides = data_root / "slides"
    with pytest.warns(UserWarning, match="objective power 20"):
        rows = tile_slides([slides / "nompp.svs", slides / "nothing.svs"], tmp_path, workers=0, progress=False)
    by = {r["slide_id"]: r for r in rows}
    assert by["nompp"]["status"] == "ok" and by["nompp"]["mpp_source"] == "objective-power"
    assert float(by["nompp"]["level0_mpp"]) == pytest.approx(0.5) and by["nompp"]["tiles"] > 0
    assert by["nothing"]["status"] == "error" and "--mpp" in by["nothing"]["error"]
    # --mpp gives the missing scale
    row = tile_slide(slides / "nothing.svs", tmp_path, TilingParams(fallback_mpp=0.5))
    assert row["status"] == "ok" and row["mpp_source"] == "argument" and row["tiles"] > 0
    with h5py.File(tmp_path / "patches" / "nothing.h5") as f:
        assert f["coords"].attrs["level0_mpp"] == 0.5


def test_bad_files_reported_and_skipped(data_root, tmp_path):
    from dre_slcl.cli import main

    bad = data_root / "bad"
    (tmp_path / "readme.txt").write_text("not listed: wrong extension")
    rc = main(["tile", str(bad), "--out", str(tmp_path / "t"), "--workers", "2", "--no-progress"])
    assert rc == 0
    rows = manifest_rows(tmp_path / "t")
    assert set(rows) == {"truncated", "notes", "good"}
    assert rows["good"]["status"] == "ok" and int(rows["good"]["tiles"]) > 0
    for name in ("truncated", "notes"):
        assert rows[name]["status"] in ("unsupported", "error") and rows[name]["error"]
        assert rows[name]["tiles"] == "0"
        assert not (tmp_path / "t" / "patches" / f"{name}.h5").exists()
    assert "truncated" in rows["truncated"]["error"] or "Short read" in rows["truncated"]["error"]
    leftovers = [p for p in (tmp_path / "t").rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temp files left behind


def test_corrupt_tile_data_is_an_error(data_root, tmp_path):
    # Keep the TIFF structure, zero out the middle of level 0's pixel data: opening works, reading fails.
    import tifffile

    src = data_root / "slides" / "carc20x.svs"
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(str(src)) as t:
        offs, counts = t.pages[0].dataoffsets, t.pages[0].databytecounts
    for o, c in zip(offs, counts):
        data[o:o + c] = b"\0" * c
    (tmp_path / "corrupt.svs").write_bytes(bytes(data))
    row = tile_slide(tmp_path / "corrupt.svs", tmp_path / "out")
    assert row["status"] == "error" and row["error"]


def _crash_on_notes(job):
    if job[3] == "notes":
        os._exit(3)  # a worker dying as if the slide reader crashed
    return tiling._job(job)


def test_worker_crash_is_isolated(data_root, tmp_path):
    bad = data_root / "bad"
    jobs = [(str(bad / f"{n}.svs"), str(tmp_path), TilingParams(), n) for n in ("good", "notes", "truncated")]
    rows = []
    tiling._run_pool(jobs, 2, rows.append, fn=_crash_on_notes)
    by = {r["slide_id"]: r for r in rows}
    assert set(by) == {"good", "notes", "truncated"}
    assert by["good"]["status"] == "ok"
    assert by["notes"]["status"] == "error" and "died" in by["notes"]["error"]


def test_resume_after_interruption(data_root, tmp_path, monkeypatch):
    slides = data_root / "slides"
    inputs = [slides / f"{n}.svs" for n in ("carc20x", "lymph20x", "wide", "blank")]
    calls = []
    real = tiling.tile_slide

    def interrupted(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third slide
        return real(path, *a, **k)

    monkeypatch.setattr(tiling, "tile_slide", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tile_slides(inputs, tmp_path, workers=0, progress=False)
    monkeypatch.setattr(tiling, "tile_slide", real)
    (tmp_path / "patches" / ".wide.h5.x1y2.h5.tmp").write_bytes(b"half a file")  # as left by a SIGKILL
    done = sorted(p.stem for p in (tmp_path / "patches").glob("*.h5"))
    assert done == ["carc20x", "lymph20x"]  # files are tiled in the order given
    assert len(manifest_rows(tmp_path)) == 2  # the manifest is kept up to date slide by slide

    rows = tile_slides(inputs, tmp_path, workers=0, progress=False)
    status = {r["slide_id"]: r["status"] for r in rows}
    assert status == {"carc20x": "skipped", "lymph20x": "skipped", "wide": "ok", "blank": "ok"}
    m = manifest_rows(tmp_path)
    assert set(m) == {"blank", "carc20x", "lymph20x", "wide"} and int(m["carc20x"]["tiles"]) > 0
    assert not list((tmp_path / "patches").glob(".*"))  # the stale temp file is gone
    # Different settings are not "finished": they re-tile. --overwrite re-tiles too.
    rows = tile_slides(inputs[:1], tmp_path, TilingParams(patch_size=128), workers=0, progress=False)
    assert rows[0]["status"] == "ok"
    rows = tile_slides(inputs[:1], tmp_path, TilingParams(patch_size=128), workers=0, progress=False,
                       overwrite=True)
    assert rows[0]["status"] == "ok"
    assert tile_slides(inputs[:1], tmp_path, TilingParams(patch_size=128), workers=0,
                       progress=False)[0]["status"] == "skipped"


def test_bad_arguments_are_named(tmp_path):
    from dre_slcl.cli import main

    with pytest.raises(ValueError, match="target_mpp"):
        tile_slides([tmp_path], tmp_path / "o", TilingParams(target_mpp=0))
    with pytest.raises(ValueError, match="min_tissue"):
        TilingParams(min_tissue=2).validate()
    with pytest.raises(ValueError, match="workers"):
        tile_slides([tmp_path], tmp_path / "o", workers=-1)
    assert main(["tile", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        main(["tile", str(tmp_path), "--out", str(tmp_path / "o"), "--target-mpp", "0"])
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2  # no slides in it


def test_strip_reading_matches_one_read(data_root):
    osr = openslide.OpenSlide(str(data_root / "slides" / "wide.svs"))
    whole = tiling.read_level_rgb_reduced(osr, 1, 3, strip_pixels=1 << 30)
    strips = tiling.read_level_rgb_reduced(osr, 1, 3, strip_pixels=5000)  # a few rows per strip
    lw, lh = osr.level_dimensions[1]
    assert whole.shape == (-(-lh // 3), -(-lw // 3), 3)
    assert np.array_equal(whole, strips)
    osr.close()
