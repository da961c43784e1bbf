"""Triton kernels of vicl_fast.

Nothing here is imported by ``import vicl_fast``: the ops modules import the
kernel modules lazily, only when a CUDA tensor (or the Triton CPU interpreter,
``TRITON_INTERPRET=1``) asks for them, so CPU-only machines never import triton.

- :mod:`vicl_fast.kernels.fusion_conv`: the Neuroverse3D fusion block
  ``GELU(x + conv1x1(x) + b + extra)`` (forward, backward, autograd).
"""
from __future__ import annotations

__all__: list[str] = []
