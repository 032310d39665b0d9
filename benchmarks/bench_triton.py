"""Benchmark of the `triton` backend against eager `torch` and torch.compile of the `torch` backend (CUDA only).

    python benchmarks/bench_triton.py [--quick] [--out benchmarks/results/triton_<device>.csv]

benchmarks/bench_cuda.py with the providers torch, torch.compile and triton: the same cases (residual_encode soft
and hard at the DRE-SLCL step shape and at 50k rows per slide, contrastive_loss at B=65536, P=512), measurement
and columns; its docstring says what they are.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import bench_cuda  # noqa: E402


def main(argv=None):
    return bench_cuda.main(argv, default_name="triton", default_providers=("torch", "torch.compile", "triton"))


if __name__ == "__main__":
    sys.exit(main())
