"""Neuroverse3D fusion block: ``GELU(x + conv1x1(x; W) + b + extra)``.

The Target-to-Context fusion of the paper, ``c = GELU(c + Conv1x1(concat[c, t]))``,
equals ``GELU(c + W_c c + b + W_t t)``: ``extra = W_t t`` is computed once per
stage and broadcast over the L contexts instead of being concatenated per
context. This module holds the reference (the CPU path and the test oracle);
the Triton kernel (vicl_fast/kernels/fusion_conv.py) is dispatched to on CUDA.

Dispatch of :func:`fusion_block`: the Triton kernel runs when

- ``VICL_FAST_DISABLE_TRITON`` is not ``1``,
- x is a CUDA tensor (or ``TRITON_INTERPRET=1`` is set: then CPU tensors go
  through the Triton CPU interpreter, which is how the tests check the kernel),
- x is float32/float16/bfloat16 (float64 takes the reference), and
- triton imports.

Otherwise the plain-PyTorch reference runs. triton is imported lazily, so
``import vicl_fast`` never imports it.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["fusion_block", "fusion_block_reference", "conv1x1", "triton_fusion_available"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_import_error: str | None = None
_triton_checked = False


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


def triton_fusion_available() -> tuple[bool, str]:
    """(True, "") if the Triton kernel module imports, else (False, reason). Cached."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import vicl_fast.kernels.fusion_conv  # noqa: F401  (imports triton)
        except Exception as e:  # ImportError, or a triton build that fails to initialise
            _triton_import_error = f"{type(e).__name__}: {e}"
        _triton_checked = True
    return _triton_import_error is None, _triton_import_error or ""


def _use_triton(x: torch.Tensor) -> bool:
    if os.environ.get("VICL_FAST_DISABLE_TRITON", "0") == "1":
        return False
    if x.dtype not in _TRITON_DTYPES:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")):
        return False
    return triton_fusion_available()[0]


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  extra: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 4:
        raise ValueError(f"fusion_block: x must be a (B, L, C, *S) tensor with at least one spatial dim, "
                         f"got shape {tuple(getattr(x, 'shape', ()))}; add the L axis with x.unsqueeze(1)")
    if not x.is_floating_point():
        raise TypeError(f"fusion_block: x must be floating point, got {x.dtype}")
    C = x.shape[2]
    if weight.dim() < 2 or weight.shape[:2] != (C, C) or any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f"fusion_block: weight must be (C, C) or (C, C, 1, ...) with C={C} "
                         f"(x's channel axis 2), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"fusion_block: bias must be ({C},), got {tuple(bias.shape)}")
    if extra is not None:
        ok = extra.dim() == x.dim() and all(e == s or e == 1 for e, s in zip(extra.shape, x.shape))
        if not ok or extra.shape[2] != C:
            raise ValueError(f"fusion_block: extra must broadcast to x {tuple(x.shape)} "
                             f"(e.g. (B, 1, C, *S)), got {tuple(extra.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("extra", extra)):
        if t is not None and t.device != x.device:
            raise ValueError(f"fusion_block: {name} is on {t.device} but x is on {x.device}; "
                             f"move them to one device")


def fusion_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """``GELU(x + conv1x1(x; W) + b + extra)``, fused Triton kernel on CUDA, reference elsewhere.

    Args:
        x: (B, L, C, *S). Channels-last memory (C contiguous per voxel; e.g. a
            ``channels_last_3d`` (B*L, C, D, H, W) tensor viewed as 6D) is the
            fast layout for the Triton kernel; contiguous works without a copy too.
        weight: (C, C) or (C, C, 1, ...).
        bias: (C,) or None.
        extra: None or broadcastable to x, e.g. (B, 1, C, *S) (``W_t t`` shared by
            the L contexts: read with stride 0, never expanded in memory).
    Returns:
        (B, L, C, *S), same dtype (under autocast: the autocast dtype) and layout as x.

    Example:
        >>> x = torch.randn(1, 2, 8, 4, 4, 4)
        >>> fusion_block(x, torch.randn(8, 8), torch.zeros(8), torch.randn(1, 1, 8, 4, 4, 4)).shape
        torch.Size([1, 2, 8, 4, 4, 4])
    """
    _check_inputs(x, weight, bias, extra)
    if not _use_triton(x):
        return fusion_block_reference(x, weight, bias, extra)
    from vicl_fast.kernels.fusion_conv import FusionBlockFunction, fusion_block_forward

    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Behave like the conv it replaces: compute in the autocast dtype. The
        # casts are differentiable, so gradients come back in the callers' dtypes.
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        extra = extra.to(dt) if extra is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, extra))
    if not needs_grad:  # inference (no_grad / inference_mode): no autograd node, nothing saved
        return fusion_block_forward(x, weight, bias, extra)
    return FusionBlockFunction.apply(x, weight, bias, extra)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution of (B, C_in, *S) -> (B, C_out, *S) for 1, 2 or 3 spatial dims.

    Uses ``F.conv{1,2,3}d`` (cuDNN on GPU, honours channels-last and autocast).

    Args:
        x: (B, C_in, *S).
        weight: (C_out, C_in) or (C_out, C_in, 1, ...).
        bias: (C_out,) or None.
    """
    nsp = x.dim() - 2
    if nsp not in (1, 2, 3):
        raise ValueError(f"conv1x1: x must be (B, C, *S) with 1-3 spatial dims, got shape {tuple(x.shape)}")
    if weight.dim() < 2 or weight.shape[1] != x.shape[1] or any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f"conv1x1: weight must be (C_out, {x.shape[1]}) or (C_out, {x.shape[1]}, 1, ...), "
                         f"got {tuple(weight.shape)}")
    w = weight.reshape(weight.shape[0], weight.shape[1], *([1] * nsp))
    conv = (F.conv1d, F.conv2d, F.conv3d)[nsp - 1]
    return conv(x, w, bias)
