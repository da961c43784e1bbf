"""Loading of the compiled extension ``vicl_fast._C`` and backend reporting.

Importing vicl_fast never fails because the extension is missing: the load
error is kept (:func:`extension_error`), the backend dispatcher
(:mod:`vicl_fast.ops._dispatch`) gives it as the reason each compiled backend
is off, and every op falls back to its pure PyTorch/SciPy reference.
``VICL_FAST_DISABLE_EXT=1`` (read here, at import) skips loading it.
"""
from __future__ import annotations

import importlib
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
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "vicl_fast._C":
            _EXT_ERROR = ("extension not built (pip install -e . --no-build-isolation; VICL_FAST_NO_EXT=1 "
                          "at build time skips it)")
        else:  # built against another torch, or a missing shared library
            _EXT_ERROR = (f"vicl_fast._C could not be imported ({exc}); rebuild with "
                          "`pip install -e . --no-build-isolation` against the installed torch")


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


def extension_error() -> str | None:
    """Why ``vicl_fast._C`` is not loaded (None when it is)."""
    return None if _EXT is not None else (_EXT_ERROR or "extension not loaded")


def missing_kernel_reason(op: str, dispatch_key: str) -> str | None:
    """None when ``vicl_fast::<op>`` has a ``dispatch_key`` ("CPU"/"CUDA") kernel, else why not (one sentence)."""
    if has_kernel(op, dispatch_key):
        return None
    if _EXT is None:
        return extension_error()
    if dispatch_key != "CUDA":
        return f"extension built without {dispatch_key} kernels"
    if torch.version.cuda is None:
        return "torch is a CPU build; reinstall a CUDA torch and rebuild (FORCE_CUDA=1)"
    return "extension built without CUDA kernels (no CUDA toolchain at build time; FORCE_CUDA=1)"


@dataclass(frozen=True)
class Backend:
    """One row of :func:`available_backends`."""

    name: str
    available: bool
    reason: str  # why not available, or what it is when available


def available_backends() -> dict[str, Backend]:
    """Report every backend and why it is (not) usable on this machine.

    Returns a dict name -> :class:`Backend` for ``cpp`` (compiled CPU kernels),
    ``cuda`` (compiled CUDA kernels), ``triton`` (the fusion-block kernel),
    ``onednn`` (fused CPU convolutions), ``xformers`` (ViT attention) and
    ``reference`` (pure PyTorch/SciPy, always available). The last four come
    from the dispatcher (:mod:`vicl_fast.ops._dispatch`) with typical inputs;
    ``vicl_fast.ops._dispatch.explain_all()`` gives the per-op detail.
    """
    from vicl_fast.ops import _dispatch  # the dispatcher imports this module

    cpp_ok = has_kernel("linear_sum_assignment", "CPU")
    cuda_ok = has_kernel("linear_sum_assignment", "CUDA")
    cpp_reason = missing_kernel_reason("linear_sum_assignment", "CPU") or "compiled"
    if cuda_ok:
        cuda_reason = "compiled" if torch.cuda.is_available() else "compiled, but no CUDA device is visible"
    else:
        cuda_reason = missing_kernel_reason("linear_sum_assignment", "CUDA") or "compiled"
    rows = {
        "cpp": Backend("cpp", cpp_ok, cpp_reason),
        "cuda": Backend("cuda", cuda_ok and torch.cuda.is_available(), cuda_reason),
    }
    for name, op in (("triton", "fusion_block"), ("onednn", "conv_fusion"), ("xformers", "attention")):
        rows[name] = Backend(name, *_dispatch.machine_status(op, name))
    rows["reference"] = Backend("reference", True, "pure PyTorch / SciPy")
    return rows


def backends_report() -> str:
    """Human-readable summary of :func:`available_backends` (one line each)."""
    lines = [f"vicl_fast backends (torch {torch.__version__}, CUDA build: {torch.version.cuda})"]
    for b in available_backends().values():
        lines.append(f"  {b.name:9s} {'yes' if b.available else 'no ':3s}  {b.reason}")
    return "\n".join(lines)
