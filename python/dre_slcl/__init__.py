"""DRE-SLCL: end-to-end whole-slide-image representation learning on dre_kernels.

Dynamic Residual Encoding with Slide-Level Contrastive Learning (arXiv 2511.05034): WSI tiling, synthetic slides,
datasets, memory bank, model, trainer and evaluation, with the command line tool ``dre-slcl``.
"""


def _version() -> str:
    # read dre_kernels/version.py without importing dre_kernels (which imports torch: seconds per worker process)
    import importlib.util
    import os
    import re

    spec = importlib.util.find_spec("dre_kernels")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "version.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)
    return "unknown"


__version__ = _version()

__all__ = ["__version__"]
