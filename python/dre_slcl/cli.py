"""The ``dre-slcl`` command line tool.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; the parser it adds sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dre_slcl import __version__

# Modules that provide subcommands, in the order `--help` lists them.
SUBCOMMAND_MODULES: list[str] = [
    "dre_slcl.commands.info",
    "dre_slcl.commands.synth",
    "dre_slcl.commands.tile",
    "dre_slcl.commands.train",
    "dre_slcl.commands.embed",
    "dre_slcl.commands.evaluate",
    "dre_slcl.commands.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dre-slcl",
        description="DRE-SLCL: end-to-end whole-slide-image representation learning with fused dre_kernels ops.",
    )
    parser.add_argument("--version", action="version", version=f"dre-slcl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
