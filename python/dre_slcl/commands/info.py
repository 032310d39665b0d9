"""``dre-slcl info``: versions and the dre_kernels backends available on this machine."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="print versions and the available dre_kernels backends")
    p.set_defaults(func=run)


def run(args) -> int:
    import platform

    import torch

    import dre_kernels

    print(f"dre-kernels {dre_kernels.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"{device}: {', '.join(dre_kernels.available_backends(device))}")
        for name, why in dre_kernels.unavailable_backends(device).items():
            print(f"  {name}: unavailable ({why})")
    return 0
