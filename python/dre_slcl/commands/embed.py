"""``dre-slcl embed OUT_DIR``: slide embeddings of a trained model, to safetensors."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("embed", help="write slide embeddings of a trained model (safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the training output directory (holds checkpoint.pt)")
    p.add_argument("--output", default=None, help="file to write (default OUT_DIR/slide_embeddings.safetensors)")
    p.add_argument("--refresh-bank", action="store_true",
                   help="re-encode every tile with the final encoder before aggregating")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from dre_slcl.evaluate import embed_slides, save_embeddings

    try:
        ids, emb = embed_slides(args.out_dir, refresh_bank=args.refresh_bank, device=args.device,
                                progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"dre-slcl embed: error: {e}", file=sys.stderr)
        return 2
    path = Path(args.output or Path(args.out_dir) / "slide_embeddings.safetensors")
    save_embeddings(path, ids, emb)
    print(f"wrote {emb.shape[0]} slide embeddings of width {emb.shape[1]} to {path}")
    return 0
