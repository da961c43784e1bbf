"""Our own checkpoints: safetensors files with the model name and config in the metadata.

``save_checkpoint(model, path)`` writes atomically (a temporary file in the same
folder, fsync, then ``os.replace``), so a crash never leaves a half-written
checkpoint under the final name. ``load_checkpoint(path)`` rebuilds the model
with :func:`vicl_fast.models.create_model` and loads the weights; no pickle is
involved anywhere (safetensors stores raw tensors and JSON metadata only).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "load_state_dict_file", "read_metadata", "read_preprocessing",
           "PREPROCESSING_KEY"]

_NAME_KEY, _CONFIG_KEY, _FORMAT_KEY = "vicl_fast.model", "vicl_fast.config", "format"
#: Metadata key of the JSON dict saying how the model's training data were prepared: ``grid``
#: (3 ints), ``spacing`` (mm, 3 floats), ``crop`` (fit the head's bounding box), ``intensity``,
#: ``tasks``, ``training_data``, ``recipe_hash``. :mod:`vicl_fast.inference` predicts with them.
PREPROCESSING_KEY = "vicl_fast.preprocessing"


def _default_name(model: nn.Module) -> str | None:
    from vicl_fast.models.neuroverse3d import Neuroverse3D

    if isinstance(model, Neuroverse3D):
        return "neuroverse3d"
    return getattr(model, "registry_name", None)


def save_checkpoint(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike, *,
                    model_name: str | None = None, config: dict[str, Any] | None = None,
                    extra_metadata: dict[str, str] | None = None) -> None:
    """Save weights (and how to rebuild the model) to a safetensors file, atomically.

    Args:
        model: a module (its ``state_dict``) or a state dict.
        path: destination ``.safetensors`` file.
        model_name: registry name (default: ``"neuroverse3d"`` for Neuroverse3D).
        config: factory kwargs (default: ``model.config`` when present).
        extra_metadata: more string -> string metadata.
    """
    if isinstance(model, nn.Module):
        sd = model.state_dict()
        model_name = model_name or _default_name(model)
        config = config if config is not None else getattr(model, "config", None)
    else:
        sd = dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {_FORMAT_KEY: "pt"}
    if model_name:
        meta[_NAME_KEY] = model_name
    if config is not None:
        meta[_CONFIG_KEY] = json.dumps(config)
    meta.update(extra_metadata or {})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        from vicl_fast.data.io import default_file_mode

        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_preprocessing(path: str | os.PathLike) -> dict[str, Any] | None:
    """The :data:`PREPROCESSING_KEY` metadata of a checkpoint (None when it has none)."""
    raw = read_metadata(path).get(PREPROCESSING_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{os.fspath(path)}: metadata {PREPROCESSING_KEY!r} is not valid JSON") from None
    return meta if isinstance(meta, dict) else None


def load_state_dict_file(path: str | os.PathLike,
                         device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    return load_file(os.fspath(path), device=str(device))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """Rebuild and load a model saved by :func:`save_checkpoint`.

    ``overrides`` are extra factory kwargs (e.g. ``fast=False``). Raises a
    ValueError when the file lacks the model name or the weights do not fit.
    """
    from vicl_fast.models import create_model

    meta = read_metadata(path)
    name = meta.get(_NAME_KEY)
    if not name:
        raise ValueError(f"{os.fspath(path)} has no '{_NAME_KEY}' metadata: it holds weights only; "
                         "build the model yourself and use load_state_dict_file()")
    config = json.loads(meta.get(_CONFIG_KEY, "{}"))
    model = create_model(name, **{**config, **overrides})
    sd = load_state_dict_file(path, device)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)} does not fit {name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.preprocessing = read_preprocessing(path)  # how its training data were prepared (or None)
    return model.to(device)
