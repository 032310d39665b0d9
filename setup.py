"""Build dre-kernels: the Python packages and the compiled extension ``dre_kernels._C``.

    pip install --no-build-isolation .            # C++ CPU kernels, plus CUDA kernels when possible

The C++ CPU sources (csrc/ops.cpp, csrc/value_checks.cpp, csrc/cpu/*.cpp) are always compiled. The CUDA sources (csrc/cuda/*.cu and
their host glue csrc/cuda/*.cpp) are compiled too when torch is a CUDA build and nvcc is found. Switches:

    DRE_KERNELS_SKIP_CUDA=1          build the CPU extension only
    DRE_KERNELS_CUDA_ARCHS="80;90"   compute capabilities to compile for (default 80;90)
    DRE_KERNELS_SKIP_EXTENSION=1     build no extension at all (pure Python install; `native` unavailable)
    MAX_JOBS=2                       parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    with open(os.path.join(ROOT, "dre_kernels", "version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_includes():
    """CUDA headers torch's own headers need (cusparse.h, ...) ship inside the nvidia-* wheels, not with nvcc."""
    dirs = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if not site or not os.path.isdir(os.path.join(site, "nvidia")):
            continue
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _toolkit_root(nvcc):
    """The CUDA toolkit holding `nvcc` (resolving wrapper scripts such as /usr/local/bin/nvcc -> exec .../bin/nvcc),
    recognised by its include/cuda_runtime.h; None if not found."""
    cands = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            cands += [os.path.dirname(os.path.dirname(p.decode())) for p in re.findall(rb"(/\S+/bin/nvcc)", head)]
    except OSError:
        pass
    cands += ["/usr/local/cuda"]
    for root in cands:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    root = _toolkit_root(nvcc) if nvcc else None
    if root is not None and not _env_flag("DRE_KERNELS_SKIP_CUDA"):
        # before torch.utils.cpp_extension is imported: it fixes its CUDA_HOME (include and lib64 dirs) at import
        os.environ["CUDA_HOME"] = root
        return os.path.join(root, "bin", "nvcc")
    return nvcc


def _extensions():
    if _env_flag("DRE_KERNELS_SKIP_EXTENSION"):
        print("dre-kernels: DRE_KERNELS_SKIP_EXTENSION=1, building no extension", file=sys.stderr)
        return [], {}
    nvcc = _find_nvcc()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("dre-kernels: torch is not importable at build time (use --no-build-isolation); "
              "building no extension", file=sys.stderr)
        return [], {}

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpu_sources = rel([os.path.join(ROOT, "csrc", f) for f in ("ops.cpp", "python_module.cpp", "value_checks.cpp")]
                      + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cuda_host_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))

    with_cuda = bool(cu_sources) and torch.version.cuda is not None and nvcc is not None \
        and not _env_flag("DRE_KERNELS_SKIP_CUDA")
    if cu_sources and not with_cuda:
        why = ("DRE_KERNELS_SKIP_CUDA=1" if _env_flag("DRE_KERNELS_SKIP_CUDA")
               else "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found")
        print(f"dre-kernels: building the CPU extension only ({why})", file=sys.stderr)

    # no -std here: torch.utils.cpp_extension adds the standard its headers need (C++17, or C++20 from 2.10 on)
    cxx_flags = ["-O3", "-fopenmp" if sys.platform.startswith("linux") else "-O3"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link_args = ["-fopenmp"] if sys.platform.startswith("linux") else []
    sources = list(cpu_sources)
    ext_cls = cpp_extension.CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        archs = [a.strip().replace(".", "") for a in
                 os.environ.get("DRE_KERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        sources += cuda_host_sources + cu_sources
        # the toolkit's own headers first: the nvidia-* wheels' include dirs (for the cusparse.h, cublas.h... that
        # torch's CUDA headers want and a bare nvcc install lacks) hold a partial cuda_runtime_api.h without crt/
        include_dirs += [os.path.join(os.environ["CUDA_HOME"], "include")] + _nvidia_wheel_includes()
        define_macros.append(("DRE_WITH_CUDA", "1"))
        extra_compile_args = {"cxx": cxx_flags + ["-DDRE_WITH_CUDA"],
                              "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                                       "-DDRE_WITH_CUDA"] + gencode}
        ext_cls = cpp_extension.CUDAExtension
        # torch's arch env var would add its own -gencode flags on top of ours
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)

    ext = ext_cls(
        name="dre_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class build_py(_build_py):
    """Also ships csrc/cuda/*.cu, *.cuh in the package as dre_kernels/csrc_cuda/, where the cupy backend compiles
    them with NVRTC at run time (dre_kernels.cupy_kernels.source_dir)."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "dre_kernels", "csrc_cuda")
        os.makedirs(dst, exist_ok=True)
        for pattern in ("*.cu", "*.cuh"):
            for src in glob.glob(os.path.join(ROOT, "csrc", "cuda", pattern)):
                self.copy_file(src, os.path.join(dst, os.path.basename(src)))


ext_modules, cmdclass = _extensions()
cmdclass = dict(cmdclass, build_py=build_py)

setup(
    name="dre-kernels",
    version=_read_version(),
    description="Fused Triton/CUDA/C++ kernels and a trainer for DRE-SLCL whole-slide-image representation learning",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dre_kernels", "dre_kernels.*"])
    + ["dre_slcl" + ("." + p if p else "") for p in [""] + find_packages("python/dre_slcl")],
    package_dir={"dre_kernels": "dre_kernels", "dre_slcl": "python/dre_slcl"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "cupy": ["cupy-cuda13x"],  # torch cu13 builds; on CUDA 12.x: pip install cupy-cuda12x
        "slcl": ["timm>=1.0", "openslide-python>=1.4", "openslide-bin>=4.0", "tifffile", "h5py", "safetensors",
                 "tqdm", "matplotlib", "tomli>=1.1; python_version < '3.11'"],
        "test": ["pytest", "pytest-benchmark", "expecttest"],
    },
    entry_points={"console_scripts": ["dre-slcl=dre_slcl.cli:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    zip_safe=False,
)
