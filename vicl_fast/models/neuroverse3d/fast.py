"""Fast execution paths of Neuroverse3D: the reference maths (model.py) with less work.

Same parameters and the same results up to rounding as
:class:`~vicl_fast.models.neuroverse3d.model.ReferencePath`, whose methods these
classes implement; :meth:`Neuroverse3D._path` picks one per call of a model part
with :func:`select_fast_path` when ``fast=True`` (the default).

- :class:`FastPath` (any device, with or without a graph):

  - Target-to-Context fusion: ``Conv1x1(concat[c, t]) = W_c c + W_t t + b``
    with ``W_t t`` computed once per forward (``target_context``) and broadcast
    over the contexts by :func:`vicl_fast.ops.fusion.fusion_block` instead of
    materialising t L times; Context-to-Target fusion through the same block.
  - Decoder ``Conv1x1(concat[upsample(x), skip])``: the upsampled half of the
    1x1 conv runs at low resolution *before* the (tri)linear upsample (a 1x1
    conv and its bias commute with it: interpolation weights sum to one), which
    saves 7/8 of those MACs and the high-resolution concat.
  - In-place GELU/add when no graph is recorded; channels-last activations on
    CUDA (or when the model's ``channels_last`` asks for them).

- :class:`OneDNNPath` (CPU float32 inference, :func:`use_mkldnn_fusion`): every
  conv through oneDNN with its post-ops fused (conv+GELU, conv+residual add, the
  fusion blocks' 1x1 conv + add) on channels-last activations
  (:mod:`vicl_fast.ops.fusion`); measured 1.6x faster than the reference path
  at 64^3 (benchmarks/RESULTS.md).

Shapes: N is B in the target branch and B*L in the context U-Net; S is the
level's spatial size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.ops.fusion import conv_add, conv_gelu, conv_mkldnn, fusion_block, use_mkldnn_fusion

if TYPE_CHECKING:
    from vicl_fast.models.neuroverse3d.model import ResidualUnit

__all__ = ["FastPath", "OneDNNPath", "select_fast_path"]

_CONV_F = {2: F.conv2d, 3: F.conv3d}
_INTERP = {2: "bilinear", 3: "trilinear"}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


class FastPath:
    """Reordered reference maths; ``inplace`` reuses buffers (only valid without autograd)."""

    def __init__(self, inplace: bool):
        self.inplace = inplace

    def _channels_last_default(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def layout(self, x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
        """x (N, C, *S) in channels-last memory when ``channels_last`` (None: where it is faster)."""
        if channels_last is None:
            channels_last = self._channels_last_default(x)
        return x.contiguous(memory_format=_CHANNELS_LAST[x.dim() - 2]) if channels_last else x

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return conv(x)

    def conv1x1(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """1x1 conv with a slice of a fused conv's weight: x (N, C_in, *S), w (C_out, C_in, 1, ...)."""
        return _CONV_F[x.dim() - 2](x, w, b)

    def residual(self, unit: ResidualUnit, x: torch.Tensor) -> torch.Tensor:
        if not self.inplace:
            return unit(x)
        h = x
        for i, conv in enumerate(unit.convs()):
            if i:
                h = torch.ops.aten.gelu_(h)
            h = conv(h)
        return torch.ops.aten.gelu_(h.add_(x))

    def up(self, conv: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``Conv1x1(concat[upsample(x), skip])`` with x's half of the conv at low resolution."""
        y = self._up_low(conv, x)
        s = self.conv1x1(skip, conv.weight[:, x.shape[1]:], None)
        return y.add_(s) if self.inplace else y + s

    def _up_low(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """upsample(W_x x + b): (N, C_{k+1}, *S/2) -> (N, C_k, *S)."""
        y = self.conv1x1(x, conv.weight[:, :x.shape[1]], conv.bias)
        return F.interpolate(y, scale_factor=2, mode=_INTERP[x.dim() - 2], align_corners=False)

    def target_context(self, conv: nn.Module, s: torch.Tensor) -> torch.Tensor:
        """``W_t s_k`` (B, 1, C_k, *S_k): the target half of the fusion's 1x1 conv, no bias."""
        return self.conv1x1(s, conv.weight[:, s.shape[1]:], None).unsqueeze(1)

    def fuse_t2c(self, conv: nn.Module, c: torch.Tensor, t: torch.Tensor, B: int) -> torch.Tensor:
        """``GELU(c + W_c c + b + W_t t)``: c (B*L, C, *S), t = W_t t (B, 1, C, *S) -> (B*L, C, *S)."""
        C = c.shape[1]
        x = c.unflatten(0, (B, -1))
        return fusion_block(x, conv.weight[:, :C].contiguous(), conv.bias, t).flatten(0, 1)

    def fuse_c2t(self, conv: nn.Module, t: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
        """``GELU(t + W_t t + b + W_c c_mean)``; t, cm: (B, C, *S)."""
        C = t.shape[1]
        extra = self.conv1x1(cm, conv.weight[:, :C], None).unsqueeze(1)
        return fusion_block(t.unsqueeze(1), conv.weight[:, C:].contiguous(), conv.bias, extra).squeeze(1)


class OneDNNPath(FastPath):
    """:class:`FastPath` for CPU float32 inference, every conv a oneDNN call with fused post-ops.

    oneDNN's direct channels-last kernels need no layout reorders (measured
    1.3x faster per residual unit), hence channels-last by default here.
    """

    def __init__(self):
        super().__init__(inplace=True)

    def _channels_last_default(self, x: torch.Tensor) -> bool:
        return True

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return conv_mkldnn(x, conv.weight, conv.bias, conv.padding[0], conv.stride[0])

    def conv1x1(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return conv_mkldnn(x, w.contiguous(), b)

    def residual(self, unit: ResidualUnit, x: torch.Tensor) -> torch.Tensor:
        """Every conv but the last one conv+GELU, the last one conv+residual add, then one
        in-place GELU: 2 fewer memory passes per conv than conv, GELU, add."""
        convs = unit.convs()
        h = x
        for conv in convs[:-1]:
            h = conv_gelu(h, conv.weight, conv.bias, conv.padding[0])
        last = convs[-1]
        return torch.ops.aten.gelu_(conv_add(h, x, last.weight, last.bias, last.padding[0]))

    def up(self, conv: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # skip's half of the 1x1 conv adds into the upsampled x's half in one oneDNN call
        y = self._up_low(conv, x)
        return conv_add(skip, y, conv.weight[:, x.shape[1]:].contiguous(), None, 0)


# Stateless apart from ``inplace``: shared by every model (and constants to torch.compile).
_GRAPH, _INPLACE, _ONEDNN = FastPath(inplace=False), FastPath(inplace=True), OneDNNPath()


def select_fast_path(x: torch.Tensor) -> FastPath:
    """The fast path for a model part whose input is x (device, dtype) in the current grad mode."""
    if use_mkldnn_fusion(x):
        return _ONEDNN
    return _GRAPH if torch.is_grad_enabled() else _INPLACE
