"""``dre-slcl train CONFIG``: train (or resume) a DRE-SLCL slide encoder; runs under torchrun for DDP."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from dre_slcl.config import add_config_flags

    p = subparsers.add_parser(
        "train", help="train a slide encoder end to end (resumes from OUT_DIR/checkpoint.pt)",
        description="Train DRE-SLCL from a TOML/JSON config; every option is also a flag and overrides the file. "
                    "Multi-GPU / multi-node: torchrun --nproc-per-node N -m dre_slcl train CONFIG.")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="config file (.toml or .json)")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from dre_slcl.config import config_from_args
    from dre_slcl.train import train

    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dre-slcl train: error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    if summary["rank"] == 0:
        last = f", last loss {summary['losses'][-1]:.4f}" if summary["losses"] else ""
        print(f"trained to step {summary['step']} in {summary['seconds']:.1f} s{last}; outputs in {summary['out_dir']}")
    return 0
