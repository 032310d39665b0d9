"""The `cupy` backend: registers dre::cupy_* (CUDA dispatch key) from dre_kernels.cupy_kernels.

Imported by dre_kernels/__init__.py; the `import cupy` below makes that import fail (silently there) when CuPy is
not installed, so the backend exists exactly when CuPy does. Install: pip install 'dre-kernels[cupy]' (cupy-cuda13x
for CUDA 13 torch builds; on a CUDA 12.x image: pip install cupy-cuda12x).
"""

import cupy  # noqa: F401

from dre_kernels import cupy_kernels

cupy_kernels.register()
