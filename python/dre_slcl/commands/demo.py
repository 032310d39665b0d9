"""``dre-slcl demo OUT``: the end-to-end demo (synth -> tile -> bank init -> train -> embed -> eval)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on generated slides (minutes on a CPU)")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--backend", default="auto", help="dre_kernels backend for every hot op (default auto)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's 60)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from dre_slcl.demo import run_demo

    run_demo(args.out, backend=args.backend, steps=args.steps, progress=not args.no_progress)
    return 0
