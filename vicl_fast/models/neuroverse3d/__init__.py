"""Neuroverse3D: 3D in-context learning with two U-Nets and U-shaped fusion.

- :mod:`.model`: the paper's architecture and its reference execution path
  (:class:`Neuroverse3D`, :class:`ResidualUnit`, :class:`ReferencePath`),
  registered as ``neuroverse3d`` / ``neuroverse3d_tiny``.
- :mod:`.fast`: the fast execution paths (broadcast fusions, low-resolution
  decoder convs, in-place ops, oneDNN CPU inference), same maths.
- :mod:`.inputs`: argument checks (stage widths, input tensors).

APSP (:mod:`vicl_fast.apsp`) drives the model's parts; the authors' checkpoints
load with :func:`vicl_fast.models.official.load_official_neuroverse3d`.
"""
from __future__ import annotations

from vicl_fast.models.neuroverse3d.model import (Neuroverse3D, ReferencePath, ResidualUnit, neuroverse3d,
                                                 neuroverse3d_tiny, parse_stage_channels)

__all__ = ["Neuroverse3D", "ReferencePath", "ResidualUnit", "neuroverse3d", "neuroverse3d_tiny",
           "parse_stage_channels"]
