"""Build script for vicl_fast and its compiled extension ``vicl_fast._C``.

* With torch installed, the C++ CPU kernels in ``csrc/`` are always built.
* The CUDA kernels (``csrc/**/*.cu``) are added when torch is a CUDA build and
  a CUDA toolchain is found, or when ``FORCE_CUDA=1``.
* ``VICL_FAST_NO_EXT=1`` skips the extension (pure PyTorch/SciPy fallbacks).

Install with ``pip install -e . --no-build-isolation`` so the build uses the
torch that is already installed (never an isolated copy pulled from PyPI).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if os.environ.get("VICL_FAST_NO_EXT", "0") == "1":
        print("vicl_fast: VICL_FAST_NO_EXT=1, skipping the compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("vicl_fast: torch not importable at build time; building without the extension", file=sys.stderr)
        return [], {}

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    cpp = _sources("csrc/**/*.cpp")
    cu = _sources("csrc/**/*.cu")
    # No -ffast-math anywhere: the assignment solver relies on IEEE arithmetic
    # to be exact and to give identical results on CPU and CUDA.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    define_macros = []
    if use_cuda:
        define_macros.append(("VICL_FAST_WITH_CUDA", "1"))
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
        ext = CUDAExtension(
            "vicl_fast._C", cpp + cu, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "vicl_fast._C", cpp, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["vicl_fast", "vicl_fast.*"]),
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
