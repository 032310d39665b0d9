"""dre_kernels: fused kernels for DRE-SLCL whole-slide-image representation learning.

Ops (every one takes backend= "auto" | "reference" | "torch" | "triton" | "native" | "cupy"):
    residual_encode   residual aggregation of each slide's fresh and memory-bank rows against K codewords
    contrastive_loss  CLIP-style in-batch contrastive loss, multi-positive labels, no B x B at any B (kernels)
    bank_gather       rows of the memory bank
    bank_update_      momentum update of bank rows with L2 normalisation, in place
    kmeans            Lloyd's k-means whose step is residual_encode(hard)
available_backends(device) lists the backends that run here; unavailable_backends(device) says why the others
do not. The environment variable DRE_KERNELS_BACKEND overrides "auto".
"""

from dre_kernels._backend import BACKENDS, available_backends, unavailable_backends
from dre_kernels.bank import bank_gather, bank_update_
from dre_kernels.contrastive_loss import contrastive_loss
from dre_kernels.kmeans import kmeans
from dre_kernels.residual_encode import residual_encode
from dre_kernels.version import __version__

try:  # the `triton` backend registers its dre::triton_* operators when the triton package is importable
    import dre_kernels.triton_kernels  # noqa: F401
except ImportError as _e:  # only a missing triton package is silent; a broken backend must not hide
    if (_e.name or "").split(".")[0] != "triton":
        raise

try:  # the `cupy` backend registers its dre::cupy_* operators when the cupy package is importable
    import dre_kernels.cupy_backend  # noqa: F401
except ImportError as _e:  # only a missing cupy package is silent; a broken backend must not hide
    if (_e.name or "").split(".")[0] != "cupy":
        raise

__all__ = [
    "BACKENDS",
    "__version__",
    "available_backends",
    "bank_gather",
    "bank_update_",
    "contrastive_loss",
    "kmeans",
    "residual_encode",
    "unavailable_backends",
]
