"""Models of vicl_fast, built by name with :func:`create_model`.

>>> from vicl_fast.models import create_model, list_models
>>> model = create_model("neuroverse3d")          # 70,854,913 parameters
>>> official = load_official_neuroverse3d("neuroverse3d.ckpt")  # the authors' weights
"""
from __future__ import annotations

from vicl_fast.models.registry import create_model, list_models, register_model


def load_official_neuroverse3d(*args, **kwargs):
    """Load the authors' Neuroverse3D checkpoint (see :mod:`vicl_fast.models.official`)."""
    from vicl_fast.models.official import load_official_neuroverse3d as _load

    return _load(*args, **kwargs)


def to_official_state_dict(*args, **kwargs):
    """Our Neuroverse3D -> the authors' key names (see :mod:`vicl_fast.models.official`)."""
    from vicl_fast.models.official import to_official_state_dict as _to

    return _to(*args, **kwargs)


__all__ = ["create_model", "list_models", "register_model", "load_official_neuroverse3d", "to_official_state_dict"]
