"""DRE-SLCL: end-to-end whole-slide-image representation learning on dre_kernels.

Dynamic Residual Encoding with Slide-Level Contrastive Learning (arXiv 2511.05034): WSI tiling, synthetic slides,
datasets, memory bank, model, trainer and evaluation, with the command line tool ``dre-slcl``.
"""

from dre_kernels.version import __version__

__all__ = ["__version__"]
