"""``dre-slcl synth OUT``: write a small synthetic whole-slide data set (pyramidal Aperio TIFFs and reports)."""

from __future__ import annotations

from dre_slcl.commands._args import int_at_least, positive_float


def add_parser(subparsers) -> None:
    from dre_slcl.synth import KIND_NAMES

    p = subparsers.add_parser(
        "synth", help="write synthetic pyramidal TIFF slides and a reports table",
        description="Write OUT/slides/*.svs (tiled pyramidal Aperio-style TIFFs with MPP and AppMag), "
                    "OUT/reports.csv (slide_id, label, kind, report), OUT/slides.csv (ground truth) and "
                    "OUT/report_embeddings.safetensors (hashed bag-of-words, --embedding-dim 0 to skip). "
                    "Deterministic given --seed.")
    p.add_argument("out", metavar="OUT", help="output directory (created)")
    p.add_argument("--slides", type=int_at_least(0), default=8, help="slides with tissue (default 8)")
    p.add_argument("--blank", type=int_at_least(0), default=0, help="extra slides with no tissue (default 0)")
    p.add_argument("--width", type=int_at_least(256), default=4096, help="level-0 width in px, +-10%% (default 4096)")
    p.add_argument("--height", type=int_at_least(256), default=3072, help="level-0 height in px (default 3072)")
    p.add_argument("--mpp", type=positive_float, default=0.5,
                   help="level-0 um/px written as MPP; AppMag is 10/mpp (default 0.5, i.e. 20x)")
    p.add_argument("--kinds", default=",".join(KIND_NAMES),
                   help=f"comma-separated tissue kinds, one label each (default {','.join(KIND_NAMES)})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--embedding-dim", type=int_at_least(0), default=256,
                   help="width of the hashed report embeddings; 0 writes none (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from dre_slcl.synth import KIND_NAMES, synth_dataset

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KIND_NAMES]
    if not kinds or bad:
        print(f"dre-slcl synth: error: argument --kinds: expected some of {','.join(KIND_NAMES)}, got "
              f"{args.kinds!r}", file=sys.stderr)
        return 2
    infos = synth_dataset(args.out, n_slides=args.slides, width=args.width, height=args.height, mpp=args.mpp,
                          kinds=kinds, blank=args.blank, seed=args.seed, embedding_dim=args.embedding_dim,
                          progress=not args.no_progress)
    total = sum(i.file_bytes for i in infos)
    print(f"wrote {len(infos)} slides ({total / 1e6:.1f} MB) and reports.csv to {args.out}")
    return 0
