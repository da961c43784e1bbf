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


def _cuda_arch_default(env, gpu_visible, use_cuda):
    """Return ``(arch_list, message)`` to set as TORCH_CUDA_ARCH_LIST, or ``(None, None)``.

    Without TORCH_CUDA_ARCH_LIST torch compiles for the visible GPUs' archs, and
    with none visible (a build node, a container without GPUs) its arch
    detection fails (IndexError). Default to the project's target, Hopper,
    but only then: a user's TORCH_CUDA_ARCH_LIST (even "native") is never
    overridden. Pure (no torch, no os.environ) so tests can call it.
    """
    if not use_cuda or gpu_visible or env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return None, None
    why = "FORCE_CUDA=1" if env.get("FORCE_CUDA", "0") == "1" else "building the CUDA kernels"
    return "9.0", (f"vicl_fast: {why} with no visible GPU and no TORCH_CUDA_ARCH_LIST: building for sm_90 "
                   "(H100/H200); set TORCH_CUDA_ARCH_LIST to change it")


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
        gpu_visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        arch, message = _cuda_arch_default(os.environ, gpu_visible, use_cuda)
        if arch is not None:  # read by BuildExtension when it compiles, after this
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
            print(message, file=sys.stderr)
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
