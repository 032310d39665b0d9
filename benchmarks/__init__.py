"""The dre-kernels benchmark suite: `python -m benchmarks.run --help`, `python -m benchmarks.bench_step --help`."""
