"""Throughput of the dre_slcl data path on this machine: synth -> tile -> TileDataset.

Measures, on freshly generated synthetic slides (20x, 0.5 um/px by default, so 256 px tiles at the default target
0.5 um/px):

- tiling time per slide (mask + grid + HDF5), in this process and with 2 worker processes;
- tiles per second read by the dataset (OpenSlide read, RGBA -> RGB, normalise) through a DataLoader over one
  shuffled pass (every tile read once, so OpenSlide's tile cache does not flatter the number) with 0 and 2
  workers, plus the per-slide sampler + collate path the trainer uses.

    python benchmarks/bench_tile_dataset.py                 # defaults: 6 slides of ~6144 x 4608 px
    python benchmarks/bench_tile_dataset.py --slides 2 --width 3072 --height 2304   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import dre_slcl  # noqa: F401
except ImportError:  # running from a checkout without installing
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "python"), str(root)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--width", type=int, default=6144)
    ap.add_argument("--height", type=int, default=4608)
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 um/px of the synthetic slides")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="0,2", help="DataLoader worker counts to measure")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

    if args.out:
        run(Path(args.out), args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_tile_dataset_") as d:
            run(Path(d), args)
    return 0


def run(work: Path, args) -> None:
    import platform

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from dre_slcl.data import SlideBatchSampler, TileDataset, collate_tiles
    from dre_slcl.synth import synth_dataset
    from dre_slcl.tiling import TilingParams, tile_slides

    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    res["loadavg_start"] = round(os.getloadavg()[0], 2)
    print(f"# bench_tile_dataset: {res['machine']}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {res['loadavg_start']} at start")

    t = time.perf_counter()
    meta = work / "data" / "bench.json"
    key = {k: getattr(args, k) for k in ("slides", "width", "height", "mpp")}
    if meta.is_file() and json.loads(meta.read_text()) == key:  # --out reused with the same slides
        import csv

        with open(work / "data" / "slides.csv", newline="") as f:
            infos = [argparse.Namespace(**r) for r in csv.DictReader(f)]
        synth_s = None
    else:
        infos = synth_dataset(work / "data", n_slides=args.slides, width=args.width, height=args.height,
                              mpp=args.mpp, seed=0, embedding_dim=0, progress=False)
        synth_s = time.perf_counter() - t
        meta.write_text(json.dumps(key))
    sizes = [int(i.file_bytes) / 1e6 for i in infos]
    res["slides"] = [{"slide_id": i.slide_id, "width": int(i.width), "height": int(i.height), "mpp": float(i.mpp),
                      "MB": round(int(i.file_bytes) / 1e6, 2)} for i in infos]
    gen = f", {synth_s / len(infos):.2f} s/slide to generate" if synth_s else " (reused)"
    print(f"synth: {len(infos)} slides ~{args.width}x{args.height} px at {args.mpp} um/px, "
          f"{min(sizes):.1f}-{max(sizes):.1f} MB each ({sum(sizes):.1f} MB){gen}")

    params = TilingParams(patch_size=args.patch_size)
    slides = work / "data" / "slides"
    for w in (0, 2):
        t = time.perf_counter()
        rows = tile_slides([slides], work / f"tiles_w{w}", params, workers=w, progress=False, overwrite=True)
        wall = time.perf_counter() - t
        per = [float(r["seconds"]) for r in rows]
        tiles = sum(int(r["tiles"]) for r in rows)
        res[f"tile_workers{w}"] = {"wall_s": round(wall, 3), "per_slide_s_mean": round(statistics.mean(per), 4),
                                   "per_slide_s_max": round(max(per), 4), "tiles": tiles}
        print(f"tile (workers={w}): {wall:.2f} s wall for {len(rows)} slides = {wall / len(rows):.3f} s/slide; "
              f"in-worker time per slide mean {statistics.mean(per):.3f} s, max {max(per):.3f} s; {tiles} tiles")

    ds = TileDataset.from_tile_dir(work / "tiles_w0")
    n = len(ds)
    res["tiles"] = n
    runs = [(int(x), None) for x in args.workers.split(",")]
    if 0 in [w for w, _ in runs] and torch.get_num_threads() > 1:
        runs.append((0, 1))  # workers=0 collates in this process: show the effect of torch's thread pool
    default_threads = torch.get_num_threads()
    for w, threads in runs:
        torch.set_num_threads(threads or default_threads)
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=w,
                            sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(w)))
        t0 = time.perf_counter()
        first = None
        seen = 0
        for images, _, _ in loader:
            seen += len(images)
            if first is None:
                first, first_n = time.perf_counter(), len(images)
        t1 = time.perf_counter()
        total = seen / (t1 - t0)
        steady = (seen - first_n) / (t1 - first) if seen > first_n else float("nan")
        key = f"dataset_workers{w}" + (f"_torch_threads{threads}" if threads else "")
        res[key] = {"tiles_per_s": round(total, 1), "tiles_per_s_after_first_batch": round(steady, 1),
                    "tiles": seen}
        note = f", torch threads {threads}" if threads else ""
        print(f"dataset (workers={w}{note}, {args.patch_size} px, float32 normalised): {total:.1f} tiles/s over "
              f"one shuffled pass of {seen} tiles ({steady:.1f} tiles/s after the first batch)")
    torch.set_num_threads(default_threads)

    sampler = SlideBatchSampler(ds.offsets, slides_per_batch=4, tiles_per_slide=32, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=collate_tiles)
    t0 = time.perf_counter()
    seen = sum(len(b["index"]) for b in loader)
    rate = seen / (time.perf_counter() - t0)
    res["slide_sampler_workers2"] = {"tiles_per_s": round(rate, 1), "tiles": seen}
    print(f"slide sampler (4 slides x 32 tiles per step, workers=2): {rate:.1f} tiles/s ({seen} tiles)")
    ds.close()
    res["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(f"load average at the end: {res['loadavg_end']} (other processes on the machine slow every number)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
