"""Models of vicl_fast, built by name with :func:`create_model`."""
from __future__ import annotations

from vicl_fast.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
