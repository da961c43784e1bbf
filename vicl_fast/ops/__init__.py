"""Public ops of vicl_fast (compiled kernels with reference fallbacks)."""
from __future__ import annotations

__all__: list[str] = []
