"""``dre-slcl tile SLIDE_OR_DIR --out DIR``: tissue mask and tile coordinates for whole-slide images."""

from __future__ import annotations

import os

from dre_slcl.commands._args import fraction, int_at_least, nonneg_float, positive_float


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tile", help="tile whole-slide images: tissue mask, tile coordinates (HDF5) and a manifest",
        description="For each slide: Otsu tissue mask on saturation at a low-resolution level, a grid of tiles at "
                    "--target-mpp, and DIR/patches/<slide_id>.h5 with `coords` (N x 2 int64, level-0 px) and "
                    "CLAM/TRIDENT attributes. DIR/manifest.csv lists every slide with its status (ok, skipped, "
                    "unsupported, error). Slides already finished with the same settings are skipped.")
    p.add_argument("inputs", nargs="+", metavar="SLIDE_OR_DIR", help="slide files and/or directories of slides")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--target-mpp", type=positive_float, default=0.5, help="tile resolution in um/px (default 0.5)")
    p.add_argument("--patch-size", type=int_at_least(8), default=256, help="tile size in px at --target-mpp (256)")
    p.add_argument("--min-tissue", type=fraction, default=0.5,
                   help="keep tiles whose tissue coverage is at least this fraction (default 0.5)")
    p.add_argument("--min-area", type=nonneg_float, default=1.0,
                   help="drop tissue pieces smaller than this many tiles (default 1.0)")
    p.add_argument("--mpp", type=positive_float, default=None,
                   help="level-0 um/px for slides that record no mpp (otherwise objective power is used, with a "
                        "warning)")
    p.add_argument("--workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="worker processes; 0 tiles in this process (default min(4, cores))")
    p.add_argument("--overwrite", action="store_true", help="re-tile slides that are already finished")
    p.add_argument("--recursive", action="store_true", help="search directories recursively")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    import warnings

    from dre_slcl.tiling import TilingParams, tile_slides

    params = TilingParams(target_mpp=args.target_mpp, patch_size=args.patch_size, min_tissue=args.min_tissue,
                          min_area=args.min_area, fallback_mpp=args.mpp)
    for item in args.inputs:
        if not os.path.exists(item):
            print(f"dre-slcl tile: error: argument SLIDE_OR_DIR: {item} does not exist", file=sys.stderr)
            return 2

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        rows = tile_slides(args.inputs, args.out, params, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.no_progress, recursive=args.recursive)
    if not rows:
        print(f"dre-slcl tile: error: argument SLIDE_OR_DIR: no slides found in {' '.join(args.inputs)}",
              file=sys.stderr)
        return 2
    by = {}
    for r in rows:
        by[r["status"]] = by.get(r["status"], 0) + 1
    tiles = sum(int(r["tiles"] or 0) for r in rows)
    print(f"{len(rows)} slides, {tiles} tiles: " + ", ".join(f"{n} {s}" for s, n in sorted(by.items())) +
          f"; manifest {os.path.join(args.out, 'manifest.csv')}")
    for r in rows:
        if r["status"] in ("error", "unsupported"):
            print(f"  {r['status']}: {r['slide']}: {r['error']}", file=sys.stderr)
    return 0
