"""Shared synthetic slides for the dre_slcl data tests (test_slcl_*.py), generated once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

# name: (kind, width, height, mpp, app_mag). mpp None: no MPP field; app_mag 0: no AppMag either.
SLIDES = {
    "carc20x": ("carcinoma", 3072, 2560, 0.5, None),
    "lymph20x": ("lymphoid", 3072, 2560, 0.5, None),
    "carc40x": ("carcinoma", 3072, 2304, 0.25, None),  # target 0.5 um/px is read from pyramid level 1
    "wide": ("stroma", 4000, 1400, 0.5, None),  # non-square
    "blank": (None, 1024, 768, 0.5, None),  # no tissue
    "nompp": ("lymphoid", 1536, 1280, None, 20),  # objective power only
    "nothing": ("carcinoma", 1280, 1024, None, 0),  # neither mpp nor objective power
}
TISSUE = ["carc20x", "lymph20x", "carc40x", "wide"]

_cache: dict = {}


def make_slides(root: Path) -> dict:
    """Generate :data:`SLIDES` into ``root/slides`` (plus a truncated copy and a non-image file in
    ``root/bad``); returns {name: (SlideInfo, ground-truth mask)}. Cached for the session."""
    if "slides" in _cache:
        return _cache["slides"]
    from dre_slcl.synth import make_slide

    (root / "slides").mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, (kind, w, h, mpp, mag)) in enumerate(SLIDES.items()):
        info, mask = make_slide(root / "slides" / f"{name}.svs", slide_id=name, kind=kind, width=w, height=h,
                                mpp=mpp, app_mag=mag, seed=[123, i], render_mpp=0.5)
        out[name] = (info, mask)
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    data = (root / "slides" / "carc20x.svs").read_bytes()
    (bad / "truncated.svs").write_bytes(data[: len(data) // 2])
    (bad / "notes.svs").write_text("this is not a slide\n" * 20)
    shutil.copy(root / "slides" / "lymph20x.svs", bad / "good.svs")
    _cache["slides"] = out
    _cache["root"] = root
    return out


def tiled(root: Path) -> Path:
    """Tile ``root/slides`` (in-process, with --mpp-free defaults) into ``root/tiles``; cached."""
    if "tiles" in _cache:
        return _cache["tiles"]
    import warnings

    from dre_slcl.tiling import tile_slides

    make_slides(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tile_slides([root / "slides"], root / "tiles", workers=0, progress=False)
    _cache["tiles"] = root / "tiles"
    return root / "tiles"


def grid_truth(mask: np.ndarray, patch0: int, min_tissue: float = 0.5) -> int:
    """Tiles the tiler should keep according to the ground-truth level-0 mask."""
    h, w = mask.shape
    n = 0
    for y in range(0, h - patch0 + 1, patch0):
        for x in range(0, w - patch0 + 1, patch0):
            n += mask[y:y + patch0, x:x + patch0].mean() >= min_tissue
    return n


# ---------------------------------------------------------------------------------------------- shared fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = _cache.get("root") or tmp_path_factory.mktemp("slcl")
    make_slides(root)
    return root


@pytest.fixture(scope="session")
def tile_dir(data_root):
    return tiled(data_root)
