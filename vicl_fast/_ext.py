"""Loading of the compiled extension ``vicl_fast._C`` and backend reporting.

Importing vicl_fast never fails because the extension is missing: the load
error is kept and reported by :func:`available_backends`, and every op falls
back to its pure PyTorch/SciPy reference.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

_EXT = None
_EXT_ERROR: str | None = None


def _load_extension() -> None:
    global _EXT, _EXT_ERROR
    if os.environ.get("VICL_FAST_DISABLE_EXT", "0") == "1":
        _EXT_ERROR = "disabled by VICL_FAST_DISABLE_EXT=1"
        return
    try:
        _EXT = importlib.import_module("vicl_fast._C")
    except ImportError as exc:  # not built, or built against another torch
        _EXT_ERROR = (
            f"vicl_fast._C could not be imported ({exc}); rebuild with "
            "`pip install -e . --no-build-isolation` against the installed torch"
        )


_load_extension()


def extension_loaded() -> bool:
    """True when ``vicl_fast._C`` was imported and its ops are registered."""
    return _EXT is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled op ``vicl_fast::<op>`` has a kernel for ``dispatch_key`` ("CPU"/"CUDA")."""
    if _EXT is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"vicl_fast::{op}", dispatch_key))
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Backend:
    name: str
    available: bool
    reason: str  # why not available, or what it is when available


def _triton_status() -> Backend:
    if importlib.util.find_spec("triton") is None:
        return Backend("triton", False, "triton is not installed (pip install triton)")
    if not torch.cuda.is_available():
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        return Backend("triton", interp, "TRITON_INTERPRET=1 (CPU interpreter)" if interp
                       else "no CUDA device (set TRITON_INTERPRET=1 to run the interpreter on CPU)")
    return Backend("triton", True, "CUDA device present")


def available_backends() -> dict[str, Backend]:
    """Report every backend and why it is (not) usable.

    Returns a dict name -> :class:`Backend` for ``cpp`` (compiled CPU kernels),
    ``cuda`` (compiled CUDA kernels), ``triton`` and ``reference`` (pure
    PyTorch/SciPy, always available).
    """
    cpp_ok = has_kernel("linear_sum_assignment", "CPU")
    cuda_ok = has_kernel("linear_sum_assignment", "CUDA")
    if _EXT is None:
        cpp_reason = cuda_reason = _EXT_ERROR or "extension not loaded"
    else:
        cpp_reason = "compiled" if cpp_ok else "extension built without CPU kernels"
        if cuda_ok:
            cuda_reason = "compiled" if torch.cuda.is_available() else "compiled, but no CUDA device is visible"
        elif torch.version.cuda is None:
            cuda_reason = "torch is a CPU build; reinstall a CUDA torch and rebuild (FORCE_CUDA=1)"
        else:
            cuda_reason = "extension built without CUDA kernels (no CUDA toolchain at build time; FORCE_CUDA=1)"
    return {
        "cpp": Backend("cpp", cpp_ok, cpp_reason),
        "cuda": Backend("cuda", cuda_ok and torch.cuda.is_available(), cuda_reason),
        "triton": _triton_status(),
        "reference": Backend("reference", True, "pure PyTorch / SciPy"),
    }


def backends_report() -> str:
    """Human-readable summary of :func:`available_backends` (one line each)."""
    lines = [f"vicl_fast backends (torch {torch.__version__}, CUDA build: {torch.version.cuda})"]
    for b in available_backends().values():
        lines.append(f"  {b.name:9s} {'yes' if b.available else 'no ':3s}  {b.reason}")
    return "\n".join(lines)
