"""Neuroverse3D: 3D in-context learning with two U-Nets and U-shaped fusion.

Architecture (paper: ../shared/seeds/003_*.txt; layer facts of the authors'
release: ../shared/notes/neuroverse3d-official.md). Default: 5 stages with
32/64/128/256/512 channels, 2 convs per residual unit, exact GELU, no
normalisation, all convs with bias, no output activation; 70,854,913 parameters.

- Target encoder: 1x1 embedding, then per stage ``ResidualUnit -> downsample``.
  The shortcut of stage k is taken after the residual unit:
  ``tfeats = [s_0, ..., s_{n-2}, bottom]``.
- Downsampling from stage k to k+1 (both U-Net encoders), the authors' rule
  (``UnetDownsampleAndCreateShortcutBlock``): a strided conv (kernel 4, stride 2,
  padding 1) when ``C_k != C_{k+1}``, a weightless MaxPool (kernel 2, stride 2)
  when the widths are equal; a pool has no state-dict keys (its
  ``downsample_blocks.k`` entry holds ``*_pooling_layer`` instead of
  ``*_linear_layer``), and 0 MACs in :meth:`Neuroverse3D.conv_macs`.
- Context U-Net (one per context, shared weights): input ``concat[image, label]``,
  1x1 embedding; encoder stage k < n-1: ``ResidualUnit``, then Target-to-Context
  fusion ``c = GELU(c + Conv1x1(concat[c, s_k]))``; bottleneck ``ResidualUnit``;
  decoder: ``upsample -> concat[up, skip] -> Conv1x1 -> ResidualUnit``. It returns
  the bottleneck and every decoder output (n features, coarse to fine).
- Target decoder: bottleneck ``ResidualUnit`` + Context-to-Target fusion
  ``t = GELU(t + Conv1x1(concat[mean_c, t]))``, then per level ``upsample ->
  concat[up, s_k] -> Conv1x1 -> ResidualUnit -> fusion``; head
  ``ResidualUnit -> Conv1x1(C0 -> out)``.

Parameter names are exactly the authors' (``context_unet.enc_blocks.0.context_conv.
module.layers.0.weight`` ...), so their state dicts load with ``load_state_dict``.
The ``.module`` levels come from their per-context wrappers; here they are
plain containers (:class:`_Wrap`) because the batching over contexts is done in
:meth:`Neuroverse3D._context_branch`.

Two computation paths (``fast`` flag, same parameters, same maths):

- reference (``fast=False``): the authors' order: per context
  ``Conv1x1(concat[c, t])`` with ``t`` materialised L times, and
  ``Conv1x1(concat[upsample(x), skip])`` at full resolution.
- fast (default): ``Conv1x1(concat[c, t]) = W_c c + W_t t + b`` with ``W_t t``
  computed once per stage and per forward (:meth:`target_context`) and broadcast
  over contexts by :func:`vicl_fast.ops.fusion.fusion_block`; the upsampled
  part of the decoder 1x1 convs runs at low resolution *before* the
  (tri)linear upsample (a 1x1 conv and its bias commute with it: interpolation
  weights sum to one), which saves 7/8 of those MACs and the high-resolution
  concat; in-place GELU/add when no graph is recorded; optional channels-last.
  CPU float32 inference additionally runs every conv through oneDNN with its
  post-ops fused (conv+GELU, conv+residual add, the fusion blocks' 1x1 conv +
  add) on channels-last activations (:mod:`vicl_fast.ops.fusion`); measured
  1.6x faster than the reference path at 64^3 (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.registry import register_model
from vicl_fast.ops.fusion import conv_add, conv_gelu, conv_mkldnn, fusion_block, use_mkldnn_fusion

__all__ = ["Neuroverse3D", "ResidualUnit", "neuroverse3d", "neuroverse3d_tiny", "parse_stage_channels"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_F = {2: F.conv2d, 3: F.conv3d}
_INTERP = {2: "bilinear", 3: "trilinear"}
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_POOL_F = {2: F.max_pool2d, 3: F.max_pool3d}


def parse_stage_channels(channels: int | Sequence[int], stages: int | None = None) -> tuple[int, ...]:
    """Stage widths from any form the authors' constructor accepts (their ``parse_channels``).

    An int is every stage's width (``stages`` required). A sequence is the
    widths themselves; with ``stages`` given, a one-element sequence is repeated
    ``stages`` times (as the authors do) and a longer one must have ``stages``
    entries. (Without ``stages``, ``[c]`` is one stage, as in their Lightning
    module, which passes ``stages=len(nb_inner_channels)``.)
    """
    if isinstance(channels, numbers.Integral):
        if stages is None:
            raise ValueError(f"a single width channels={channels} needs stages= (the number of stages), "
                             f"as in the authors' constructor")
        channels = [channels]
    channels = [int(c) for c in channels]
    if stages is not None:
        stages = int(stages)
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if len(channels) == 1:
            channels = channels * stages
        elif len(channels) != stages:
            raise ValueError(f"channels {tuple(channels)} give {len(channels)} stages, but stages={stages}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels needs >= 1 positive stage widths, got {tuple(channels)}")
    return tuple(channels)


class _Wrap(nn.Module):
    """Container whose only job is the authors' ``<name>.module.<param>`` key level."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not used by the model
        return self.module(x)


class ResidualUnit(nn.Module):
    """``GELU(x + conv(GELU(conv(x))))`` with ``convs`` 3^d convs (keys ``layers.0``, ``layers.2``, ...).

    Args:
        channels: C, input and output channels.
        convs: number of 3x3(x3) convs (GELU between them).
        spatial_dims: 2 or 3.
    Shapes: (N, C, *S) -> (N, C, *S).
    """

    def __init__(self, channels: int, convs: int = 2, spatial_dims: int = 3):
        super().__init__()
        conv = _CONV[spatial_dims]
        layers: list[nn.Module] = []
        for i in range(convs):
            if i:
                layers.append(nn.GELU())
            layers.append(conv(channels, channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def convs(self) -> list[nn.Module]:
        return [m for m in self.layers if not isinstance(m, nn.GELU)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(self, x, inplace=False)


def _residual(unit: ResidualUnit, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """ResidualUnit forward; ``inplace`` reuses buffers (only valid without autograd).

    CPU fp32 inference (``inplace`` and :func:`use_mkldnn_fusion`): every conv
    but the last is one oneDNN conv+GELU, the last one conv+residual add, then
    one in-place GELU: 2 fewer memory passes per conv than conv, GELU, add.
    """
    convs = unit.convs()
    if inplace and use_mkldnn_fusion(x):
        h = x
        for conv in convs[:-1]:
            h = conv_gelu(h, conv.weight, conv.bias, conv.padding[0])
        last = convs[-1]
        return torch.ops.aten.gelu_(conv_add(h, x, last.weight, last.bias, last.padding[0]))
    h = x
    for i, conv in enumerate(convs):
        if i:
            h = torch.ops.aten.gelu_(h) if inplace else F.gelu(h)
        h = conv(h)
    if inplace:
        return torch.ops.aten.gelu_(h.add_(x))
    return F.gelu(x + h)


def _all_finite(x: torch.Tensor, per_context: bool) -> bool:
    """Whether x has no NaN/Inf; (B, L, ...) inputs checked one context at a time.

    ``torch.isfinite(x).all()`` makes ~5 bytes of temporaries per element: for
    a whole context set (L=64 at 128^3: ~0.7 GB) that grows with L and was the
    peak of CPU inference in the 24^3 memory test. One context at a time keeps
    it O(1) in L; the flags are combined on x's device, so a GPU syncs once.
    """
    if not per_context or x.dim() < 2 or x.shape[1] <= 1:
        return bool(torch.isfinite(x).all())
    flags = torch.stack([torch.isfinite(x[:, i]).all() for i in range(x.shape[1])])
    return bool(flags.all())


class Neuroverse3D(nn.Module):
    """Neuroverse3D in-context model (see the module docstring for the layout).

    Args:
        in_channels: channels of the target and context images (1 in the release).
        out_channels: channels of the labels and of the output (1 in the release).
        channels: channels per stage, e.g. ``(32, 64, 128, 256, 512)``; the number
            of stages is ``len(channels)``. As in the authors' constructor, an int
            (or a one-element sequence) with ``stages`` means that width at every
            stage. Neighbouring stages of equal width are joined by a MaxPool,
            others by a strided conv (see the module docstring).
        stages: number of stages (needed only with a single width; must agree otherwise).
        convs_per_stage: convs per residual unit (the authors' ``nb_conv_layers_per_stage``).
        spatial_dims: 3 (volumes, ``(B, L, C, D, H, W)``) or 2 (images, ``(B, L, C, H, W)``).
        fast: default computation path (see module docstring); ``forward(..., fast=)`` overrides.
        apsp_mode: how gradients go through a mini-context loop when a graph is
            recorded: ``"exact"`` (full-context gradient, memory of one
            mini-context, recomputation), ``"scaled"`` (the paper: only the last
            shuffled mini-context keeps its graph, gradient scaled by n) or
            ``"full"`` (every mini-context keeps its graph; memory grows with L).
        channels_last: use channels-last activations in the fast path;
            ``None`` = only on CUDA.
        check_finite: reject non-finite inputs with a ValueError (one pass over
            the inputs; set False to skip it).

    Example (3D, tiny)::

        >>> m = Neuroverse3D(channels=(4, 8, 16))
        >>> y = m(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 3, 1, 16, 16, 16),
        ...       torch.rand(1, 3, 1, 16, 16, 16), l=2)
        >>> tuple(y.shape)
        (1, 1, 16, 16, 16)
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1,
                 channels: int | Sequence[int] = (32, 64, 128, 256, 512), convs_per_stage: int = 2,
                 spatial_dims: int = 3, *, stages: int | None = None, fast: bool = True,
                 apsp_mode: str = "exact", channels_last: bool | None = None, check_finite: bool = True):
        super().__init__()
        channels = parse_stage_channels(channels, stages)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        if apsp_mode not in ("exact", "scaled", "full"):
            raise ValueError(f"apsp_mode must be 'exact', 'scaled' or 'full', got {apsp_mode!r}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, channels=list(channels),
                           convs_per_stage=convs_per_stage, spatial_dims=spatial_dims)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels, self.stages, self.spatial_dims = channels, len(channels), spatial_dims
        self.convs_per_stage = convs_per_stage
        self.fast, self.apsp_mode = fast, apsp_mode
        self.channels_last, self.check_finite = channels_last, check_finite
        conv, pool = _CONV[spatial_dims], _POOL[spatial_dims]
        n, C = self.stages, channels
        # the authors' rule: MaxPool between stages of equal width, strided conv otherwise
        self.downsample_pool = tuple(C[k] == C[k + 1] for k in range(n - 1))

        def ru(c: int) -> ResidualUnit:
            return ResidualUnit(c, convs_per_stage, spatial_dims)

        # ---- context U-Net (per-context modules wrapped: keys contain ".module.")
        cu = nn.Module()
        cu.context_embedding = _Wrap(conv(in_channels + out_channels, C[0], 1))
        cu.enc_blocks = nn.ModuleList()
        for k in range(n):
            b = nn.Module()
            b.context_conv = _Wrap(ru(C[k]))
            if k < n - 1:
                b.combine_conv_context = _Wrap(conv(2 * C[k], C[k], 1))
            cu.enc_blocks.append(b)
        cu.downsample_blocks = nn.ModuleList()
        for k in range(n - 1):
            b = nn.Module()
            if self.downsample_pool[k]:
                b.context_pooling_layer = _Wrap(pool(kernel_size=2))
            else:
                b.context_linear_layer = _Wrap(conv(C[k], C[k + 1], 4, stride=2, padding=1))
            cu.downsample_blocks.append(b)
        cu.dec_blocks, cu.upsample_blocks = nn.ModuleList(), nn.ModuleList()
        for j in range(n - 1):
            k = n - 2 - j  # level of the decoder block
            b = nn.Module()
            b.context_conv = _Wrap(ru(C[k]))
            cu.dec_blocks.append(b)
            u = nn.Module()
            u.context_conv_layer = _Wrap(conv(C[k + 1] + C[k], C[k], 1))
            cu.upsample_blocks.append(u)
        self.context_unet = cu

        # ---- target encoder
        te = nn.Module()
        te.target_embedding = conv(in_channels, C[0], 1)
        te.enc_blocks, te.downsample_blocks = nn.ModuleList(), nn.ModuleList()
        for k in range(n - 1):
            b = nn.Module()
            b.target_conv = ru(C[k])
            te.enc_blocks.append(b)
            d = nn.Module()
            if self.downsample_pool[k]:
                d.target_pooling_layer = pool(kernel_size=2)
            else:
                d.target_linear_layer = conv(C[k], C[k + 1], 4, stride=2, padding=1)
            te.downsample_blocks.append(d)
        self.target_encoder = te

        # ---- target decoder
        td = nn.Module()
        b = nn.Module()
        b.target_conv = ru(C[n - 1])
        b.combine_conv_target = _Wrap(conv(2 * C[n - 1], C[n - 1], 1))
        td.enc_blocks = nn.ModuleList([b])
        td.dec_blocks, td.upsample_blocks = nn.ModuleList(), nn.ModuleList()
        for j in range(n - 1):
            k = n - 2 - j
            b = nn.Module()
            b.target_conv = ru(C[k])
            b.combine_conv_target = _Wrap(conv(2 * C[k], C[k], 1))
            td.dec_blocks.append(b)
            u = nn.Module()
            u.target_conv_layer = conv(C[k + 1] + C[k], C[k], 1)
            td.upsample_blocks.append(u)
        ob = nn.Module()
        ob.block = nn.Sequential(ru(C[0]), conv(C[0], out_channels, 1))
        td.output_block = ob
        self.target_decoder = td

    # ------------------------------------------------------------------ helpers
    @property
    def multiple(self) -> int:
        """Every spatial size must be a multiple of this (2^(stages-1))."""
        return 2 ** (self.stages - 1)

    def _use_fast(self, fast: bool | None) -> bool:
        return self.fast if fast is None else bool(fast)

    def _mf(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        """Channels-last conversion of a conv input (fast path only).

        Default (``channels_last=None``): on CUDA, and on the CPU where the
        oneDNN fused inference path runs (its direct channels-last kernels
        need no layout reorders: measured 1.3x faster per residual unit).
        """
        cl = self.channels_last
        if cl is None:
            cl = x.is_cuda or (x.device.type == "cpu" and use_mkldnn_fusion(x))
        if fast and cl:
            return x.contiguous(memory_format=_CHANNELS_LAST[self.spatial_dims])
        return x

    def _conv1x1(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """1x1 conv of the fast path (oneDNN in CPU inference, see :func:`conv_mkldnn`)."""
        if use_mkldnn_fusion(x):
            return conv_mkldnn(x, w.contiguous(), b)
        return _CONV_F[self.spatial_dims](x, w, b)

    def _conv(self, conv: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
        """``conv(x)`` of a layer used by both paths; oneDNN in fast CPU inference."""
        if fast and use_mkldnn_fusion(x):
            return conv_mkldnn(x, conv.weight, conv.bias, conv.padding[0], conv.stride[0])
        return conv(x)

    def _down(self, k: int, x: torch.Tensor, fast: bool, context: bool) -> torch.Tensor:
        """Downsampling from stage k to k+1: (N, C_k, *S) -> (N, C_{k+1}, *S/2).

        Strided conv (oneDNN in fast CPU inference), or, between stages of equal
        width, max pooling (kernel 2, stride 2; keeps x's memory format, so the
        channels-last oneDNN chain goes on unbroken).
        """
        if self.downsample_pool[k]:
            return _POOL_F[self.spatial_dims](x, 2)
        if context:
            conv = self.context_unet.downsample_blocks[k].context_linear_layer.module
        else:
            conv = self.target_encoder.downsample_blocks[k].target_linear_layer
        return self._conv(conv, x, fast)

    def _up(self, conv: nn.Module, x: torch.Tensor, skip: torch.Tensor, fast: bool) -> torch.Tensor:
        """``Conv1x1(concat[upsample(x), skip])``; fast: conv of x at low resolution first.

        x: (N, C_{k+1}, *S/2), skip: (N, C_k, *S) -> (N, C_k, *S).
        """
        mode = _INTERP[self.spatial_dims]
        if not fast:
            up = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
            return conv(torch.cat([up, skip], dim=1))
        cin = x.shape[1]
        w = conv.weight
        y = F.interpolate(self._conv1x1(x, w[:, :cin], conv.bias), scale_factor=2, mode=mode,
                          align_corners=False)
        if use_mkldnn_fusion(skip):  # CPU inference: skip's 1x1 conv adds into y in one oneDNN call
            return conv_add(skip, y, w[:, cin:].contiguous(), None, 0)
        s = self._conv1x1(skip, w[:, cin:], None)
        return y.add_(s) if not torch.is_grad_enabled() else y + s

    def _fuse_t2c(self, conv: nn.Module, c: torch.Tensor, t: torch.Tensor, B: int,
                  fast: bool) -> torch.Tensor:
        """Target-to-Context fusion ``GELU(c + Conv1x1(concat[c, t]))``.

        c: (B*L, C, *S). t: reference path (B, C, *S) target feature; fast path
        (B, 1, C, *S) = ``W_t t`` from :meth:`target_context`. Returns (B*L, C, *S).
        """
        C = c.shape[1]
        if not fast:
            L = c.shape[0] // B
            tt = t.unsqueeze(1).expand(B, L, *t.shape[1:]).reshape(B * L, *t.shape[1:])
            return F.gelu(c + conv(torch.cat([c, tt], dim=1)))
        x = c.unflatten(0, (B, -1))
        return fusion_block(x, conv.weight[:, :C].contiguous(), conv.bias, t).flatten(0, 1)

    def _fuse_c2t(self, conv: nn.Module, t: torch.Tensor, cm: torch.Tensor, fast: bool) -> torch.Tensor:
        """Context-to-Target fusion ``GELU(t + Conv1x1(concat[c_mean, t]))``; t, cm: (B, C, *S)."""
        C = t.shape[1]
        cm = cm.to(t.dtype)  # fp32 running mean -> the features' dtype (what autocast would do)
        if not fast:
            return F.gelu(t + conv(torch.cat([cm, t], dim=1)))
        extra = self._conv1x1(cm, conv.weight[:, :C], None).unsqueeze(1)
        return fusion_block(t.unsqueeze(1), conv.weight[:, C:].contiguous(), conv.bias, extra).squeeze(1)

    # ------------------------------------------------------------- three parts
    def encode_target(self, target: torch.Tensor, *, fast: bool | None = None) -> list[torch.Tensor]:
        """Target encoder.

        Args:
            target: (B, C_in, *S).
        Returns:
            ``[s_0, ..., s_{n-2}, bottom]``: s_k (B, C_k, *S/2^k), bottom (B, C_{n-1}, *S/2^(n-1)).
        """
        fast = self._use_fast(fast)
        inplace = fast and not torch.is_grad_enabled()
        te = self.target_encoder
        # after the embedding: a 1-channel input has no distinct channels-last layout
        t = self._mf(self._conv(te.target_embedding, target, fast), fast)
        feats = []
        for k in range(self.stages - 1):
            t = _residual(te.enc_blocks[k].target_conv, t, inplace)
            feats.append(t)
            t = self._down(k, t, fast, context=False)
        feats.append(t)
        return feats

    def target_context(self, tfeats: Sequence[torch.Tensor], *,
                       fast: bool | None = None) -> list[torch.Tensor]:
        """What the context branch consumes from the target, once per forward.

        Fast path: ``W_t s_k`` (B, 1, C_k, *S_k), the target half of each
        Target-to-Context 1x1 conv (no bias). Reference path: ``s_k`` (B, C_k, *S_k).
        """
        if not self._use_fast(fast):
            return list(tfeats[: self.stages - 1])
        out = []
        for k in range(self.stages - 1):
            conv = self.context_unet.enc_blocks[k].combine_conv_context.module
            C = self.channels[k]
            out.append(self._conv1x1(tfeats[k], conv.weight[:, C:], None).unsqueeze(1))
        return out

    def encode_contexts(self, context_in: torch.Tensor, context_out: torch.Tensor,
                        tfeats: Sequence[torch.Tensor] | None = None, *,
                        tctx: Sequence[torch.Tensor] | None = None,
                        fast: bool | None = None) -> list[torch.Tensor]:
        """Context U-Net over a (mini-)context.

        Args:
            context_in: (B, L', C_in, *S) context images.
            context_out: (B, L', C_out, *S) context labels.
            tfeats: output of :meth:`encode_target` (used when ``tctx`` is None).
            tctx: output of :meth:`target_context` (pass it to reuse it across mini-contexts).
        Returns:
            n per-context features, coarse to fine: (B, L', C_{n-1}, *S/2^(n-1)), ..., (B, L', C_0, *S).
            APSP averages them over L'.
        """
        fast = self._use_fast(fast)
        if tctx is None:
            if tfeats is None:
                raise ValueError("encode_contexts needs tfeats (from encode_target) or tctx")
            tctx = self.target_context(tfeats, fast=fast)
        return self._context_branch(context_in, context_out, tctx, fast)

    def _context_branch(self, ci: torch.Tensor, co: torch.Tensor, tctx: Sequence[torch.Tensor],
                        fast: bool) -> list[torch.Tensor]:
        B, L = ci.shape[:2]
        n = self.stages
        inplace = fast and not torch.is_grad_enabled()
        cu = self.context_unet
        x = torch.cat([ci, co.to(ci.dtype)], dim=2).flatten(0, 1)  # (B*L, Cin+Cout, *S)
        c = self._conv(cu.context_embedding.module, self._mf(x, fast), fast)
        del x
        skips = []
        for k in range(n - 1):
            blk = cu.enc_blocks[k]
            c = _residual(blk.context_conv.module, c, inplace)
            c = self._fuse_t2c(blk.combine_conv_context.module, c, tctx[k], B, fast)
            skips.append(c)
            c = self._down(k, c, fast, context=True)
        c = _residual(cu.enc_blocks[n - 1].context_conv.module, c, inplace)
        outs = [c.unflatten(0, (B, L))]
        for j in range(n - 1):
            c = self._up(cu.upsample_blocks[j].context_conv_layer.module, c, skips.pop(), fast)
            c = _residual(cu.dec_blocks[j].context_conv.module, c, inplace)
            outs.append(c.unflatten(0, (B, L)))
        return outs

    def decode(self, tfeats: Sequence[torch.Tensor], context_means: Sequence[torch.Tensor], *,
               fast: bool | None = None) -> torch.Tensor:
        """Target decoder.

        Args:
            tfeats: output of :meth:`encode_target`.
            context_means: n mean context features (B, C_k, *S_k), coarse to fine.
        Returns:
            (B, C_out, *S), raw regression output (no activation).
        """
        fast = self._use_fast(fast)
        inplace = fast and not torch.is_grad_enabled()
        n = self.stages
        td = self.target_decoder
        blk = td.enc_blocks[0]
        t = _residual(blk.target_conv, tfeats[n - 1], inplace)
        t = self._fuse_c2t(blk.combine_conv_target.module, t, context_means[0], fast)
        for j in range(n - 1):
            t = self._up(td.upsample_blocks[j].target_conv_layer, t, tfeats[n - 2 - j], fast)
            blk = td.dec_blocks[j]
            t = _residual(blk.target_conv, t, inplace)
            t = self._fuse_c2t(blk.combine_conv_target.module, t, context_means[j + 1], fast)
        t = _residual(td.output_block.block[0], t, inplace)
        return self._conv(td.output_block.block[1], t, fast)

    # ------------------------------------------------------------------ forward
    def validate_inputs(self, target_in: torch.Tensor, context_in: torch.Tensor,
                        context_out: torch.Tensor) -> None:
        """Raise ValueError/TypeError naming the problem (see :meth:`forward` for shapes)."""
        sd = self.spatial_dims
        for name, x, nd in (("target_in", target_in, 2 + sd), ("context_in", context_in, 3 + sd),
                            ("context_out", context_out, 3 + sd)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != nd:
                want = "(B, C, " if name == "target_in" else "(B, L, C, "
                want += "D, H, W)" if sd == 3 else "H, W)"
                raise ValueError(f"{name} must have {nd} dims {want} for spatial_dims={sd}, "
                                 f"got shape {tuple(x.shape)}")
            if not (x.is_floating_point() or name == "context_out"):
                raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if target_in.shape[1] != self.in_channels:
            raise ValueError(f"target_in has {target_in.shape[1]} channels, the model expects "
                             f"in_channels={self.in_channels}")
        if context_in.shape[2] != self.in_channels:
            raise ValueError(f"context_in has {context_in.shape[2]} channels (dim 2), the model expects "
                             f"in_channels={self.in_channels}")
        if context_out.shape[2] != self.out_channels:
            raise ValueError(f"context_out has {context_out.shape[2]} channels (dim 2), the model expects "
                             f"out_channels={self.out_channels}")
        if context_in.shape[1] == 0:
            raise ValueError("zero contexts: context_in has L=0; pass at least one (image, label) pair")
        if context_in.shape[:2] != context_out.shape[:2] or context_in.shape[3:] != context_out.shape[3:]:
            raise ValueError(f"context images and labels differ in shape: context_in "
                             f"{tuple(context_in.shape)} vs context_out {tuple(context_out.shape)} "
                             f"(need the same B, L and spatial size)")
        if context_in.shape[0] != target_in.shape[0]:
            raise ValueError(f"batch sizes differ: target_in B={target_in.shape[0]}, "
                             f"context_in B={context_in.shape[0]}")
        if tuple(context_in.shape[3:]) != tuple(target_in.shape[2:]):
            raise ValueError(f"spatial sizes differ: target_in {tuple(target_in.shape[2:])} vs contexts "
                             f"{tuple(context_in.shape[3:])}; resample them to one grid")
        m = self.multiple
        bad = [s for s in target_in.shape[2:] if s % m]
        if bad:
            fix = tuple(int(math.ceil(s / m) * m) for s in target_in.shape[2:])
            raise ValueError(f"spatial size {tuple(target_in.shape[2:])} is not divisible by "
                             f"2^(stages-1) = {m}; pad or resize to e.g. {fix}")
        if self.check_finite:
            named = (("target_in", target_in), ("context_in", context_in), ("context_out", context_out))
            for name, x in named:
                if x.is_floating_point() and not _all_finite(x, per_context=name != "target_in"):
                    raise ValueError(f"{name} contains NaN or Inf values; clean the input (or set "
                                     f"model.check_finite = False to skip this check)")

    def forward(self, target_in: torch.Tensor, context_in: torch.Tensor, context_out: torch.Tensor,
                l: int | str | None = None, *, fast: bool | None = None, apsp_mode: str | None = None,
                shuffle: bool | None = None, generator: torch.Generator | None = None,
                order: Sequence[int] | None = None) -> torch.Tensor:
        """Predict the target's label from the context.

        Args:
            target_in: (B, C_in, D, H, W) target image (on the model's device or moved there).
            context_in: (B, L, C_in, D, H, W) context images; may stay on the CPU
                (streamed one mini-context at a time).
            context_out: (B, L, C_out, D, H, W) context labels.
            l: mini-context size; None = all L contexts at once; ``"auto"`` = the
                largest that fits the free memory (:func:`vicl_fast.apsp.auto_mini_context`).
            fast: override the model's computation path.
            apsp_mode: override ``self.apsp_mode`` when a graph is recorded.
            shuffle, generator: process mini-contexts in a random order (the
                output is order-invariant up to rounding). Default: deterministic,
                except in "scaled" training, which needs a random last mini-context.
            order: explicit processing order of the mini-contexts (a permutation of range(n)).
        Returns:
            (B, C_out, D, H, W).
        """
        from vicl_fast import apsp

        self.validate_inputs(target_in, context_in, context_out)
        return apsp.apsp_forward(self, target_in, context_in, context_out, l, fast=fast,
                                 mode=apsp_mode or self.apsp_mode, shuffle=shuffle, generator=generator,
                                 order=order, validate=False)

    @torch.inference_mode()
    def predict(self, target_in: torch.Tensor, context_in: torch.Tensor, context_out: torch.Tensor,
                l: int | str | None = None, **kwargs) -> torch.Tensor:
        """:meth:`forward` under ``torch.inference_mode`` (no graph, buffers reused in place)."""
        return self.forward(target_in, context_in, context_out, l, **kwargs)

    def compile_parts(self, **compile_kwargs) -> "Neuroverse3D":
        """``torch.compile`` the parts that APSP calls; the mini-context loop stays eager.

        ``compile_kwargs`` go to :func:`torch.compile` (e.g. ``mode="max-autotune"``).
        The last, smaller mini-context and a change of grad mode trigger one
        recompilation each. :meth:`uncompile_parts` restores the eager methods.
        Returns ``self``.
        """
        for name in ("encode_target", "target_context", "_context_branch", "decode"):
            eager = getattr(type(self), name).__get__(self)
            self.__dict__[name] = torch.compile(eager, **compile_kwargs)
        return self

    def uncompile_parts(self) -> "Neuroverse3D":
        """Undo :meth:`compile_parts`."""
        for name in ("encode_target", "target_context", "_context_branch", "decode"):
            self.__dict__.pop(name, None)
        return self

    # ------------------------------------------------------------- accounting
    def conv_macs(self, spatial: Sequence[int], contexts: int = 1, *,
                  fast: bool | None = None) -> dict[str, int]:
        """Multiply-accumulates of every conv for one sample (batch 1), analytically.

        Args:
            spatial: the input spatial size, e.g. (128, 128, 128).
            contexts: L.
        Returns:
            ``{"target": ..., "per_context": ..., "total": ...}`` in MACs (FLOPs = 2 x MACs).
            Reference path: the authors' order; fast path: ``W_t t`` once, the upsampled
            half of the decoder 1x1 convs at low resolution.
        """
        fast = self._use_fast(fast)
        C, n, k3 = self.channels, self.stages, 3 ** self.spatial_dims
        k4 = 4 ** self.spatial_dims
        V = [math.prod(s // 2 ** k for s in spatial) for k in range(n)]
        ru = [self.convs_per_stage * k3 * C[k] * C[k] * V[k] for k in range(n)]
        # strided convs; a MaxPool between stages of equal width has no MACs
        ds = [0 if self.downsample_pool[k] else k4 * C[k] * C[k + 1] * V[k + 1] for k in range(n - 1)]

        def up(k: int) -> int:  # decoder 1x1 conv producing level k from level k+1
            if fast:
                return C[k + 1] * C[k] * V[k + 1] + C[k] * C[k] * V[k]
            return (C[k + 1] + C[k]) * C[k] * V[k]

        # target branch: encoder, decoder incl. both halves of the C2T fusions, head
        tgt = self.in_channels * C[0] * V[0] + sum(ru[:-1]) + sum(ds)
        tgt += ru[-1] + sum(ru[:-1]) + sum(up(k) for k in range(n - 1))
        tgt += sum(2 * C[k] * C[k] * V[k] for k in range(n))  # C2T fusion 1x1 (2C -> C)
        tgt += ru[0] + C[0] * self.out_channels * V[0]
        if fast:  # W_t t of the T2C fusions, once per forward
            tgt += sum(C[k] * C[k] * V[k] for k in range(n - 1))
        ctx = (self.in_channels + self.out_channels) * C[0] * V[0] + sum(ru) + sum(ds)
        ctx += sum(ru[:-1]) + sum(up(k) for k in range(n - 1))
        ctx += sum((1 if fast else 2) * C[k] * C[k] * V[k] for k in range(n - 1))
        return {"target": tgt, "per_context": ctx, "total": tgt + contexts * ctx}


def _build(**kwargs) -> Neuroverse3D:
    return Neuroverse3D(**kwargs)


@register_model
def neuroverse3d(**kwargs) -> Neuroverse3D:
    """Neuroverse3D as released: channels 32..512, 2 convs per stage, 3D (70,854,913 parameters)."""
    return _build(**kwargs)


@register_model
def neuroverse3d_tiny(**kwargs) -> Neuroverse3D:
    """A tiny Neuroverse3D (channels 4..64, like the official test fixture) for tests and demos."""
    kwargs.setdefault("channels", (4, 8, 16, 32, 64))
    return _build(**kwargs)
