"""Model registry: ``@register_model`` and ``create_model(name, **kwargs)`` (timm style)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a model factory under ``name`` (default: the function's name)."""

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model name {key!r} is registered twice")
        _REGISTRY[key] = f
        return f

    return deco(fn) if fn is not None else deco


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _import_all()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` passed to its factory."""
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def _import_all() -> None:
    # Importing the model modules runs their @register_model decorators.
    import importlib
    import pkgutil

    import vicl_fast.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "registry":
            importlib.import_module(f"vicl_fast.models.{mod.name}")
