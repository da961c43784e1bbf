"""vicl_fast: fast medical visual in-context learning (RandP 2D, Neuroverse3D 3D).

``import vicl_fast`` always works: the compiled extension is optional and
every op has a pure PyTorch/SciPy fallback. See :func:`available_backends`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from vicl_fast._ext import available_backends, backends_report  # noqa: E402
from vicl_fast import ops  # noqa: E402,F401

__all__ = ["available_backends", "backends_report", "ops", "__version__"]
