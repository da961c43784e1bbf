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
- The mean over the L contexts is taken by APSP (:mod:`vicl_fast.apsp`), which
  drives the three parts :meth:`~Neuroverse3D.encode_target`,
  :meth:`~Neuroverse3D.encode_contexts` (once per mini-context) and
  :meth:`~Neuroverse3D.decode`.

Parameter names are exactly the authors' (``context_unet.enc_blocks.0.context_conv.
module.layers.0.weight`` ...), so their state dicts load with ``load_state_dict``.
The ``.module`` levels come from their per-context wrappers; here they are
plain containers (:class:`_Wrap`) because the contexts are batched by
flattening ``(B, L)`` into one batch axis in :meth:`Neuroverse3D.encode_contexts`.

Execution paths. The layers whose computation can be reordered or fused are
called through one object, ``p = self._path(fast, x)``: :class:`ReferencePath`
below (``fast=False``, the authors' order of operations, what this file
documents) or a fast path of :mod:`vicl_fast.models.neuroverse3d.fast` (the
default; same parameters, same maths, less work). Both give the same results up
to rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.neuroverse3d.fast import FastPath, select_fast_path
from vicl_fast.models.neuroverse3d.inputs import parse_stage_channels, validate_inputs
from vicl_fast.models.registry import register_model

__all__ = ["Neuroverse3D", "ReferencePath", "ResidualUnit", "neuroverse3d", "neuroverse3d_tiny",
           "parse_stage_channels"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_POOL_F = {2: F.max_pool2d, 3: F.max_pool3d}
_INTERP = {2: "bilinear", 3: "trilinear"}


# ------------------------------------------------------------------------ layers
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
        h = x
        for i, conv in enumerate(self.convs()):
            if i:
                h = F.gelu(h)
            h = conv(h)
        return F.gelu(x + h)


class ReferencePath:
    """The authors' order of operations (``fast=False``), layer by layer.

    The fast paths (:mod:`vicl_fast.models.neuroverse3d.fast`) implement the
    same methods with the same maths. N is B in the target branch and B*L in the
    context U-Net (contexts flattened into the batch axis); S is the level's
    spatial size.
    """

    def layout(self, x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
        """Memory format of the activations: left as it is here."""
        return x

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A conv that every path runs as it is (embeddings, strided convs, head)."""
        return conv(x)

    def residual(self, unit: ResidualUnit, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *S) -> (N, C, *S)."""
        return unit(x)

    def up(self, conv: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder step ``Conv1x1(concat[upsample(x), skip])``: x (N, C_{k+1}, *S/2), skip (N, C_k, *S)
        -> (N, C_k, *S)."""
        up = F.interpolate(x, scale_factor=2, mode=_INTERP[x.dim() - 2], align_corners=False)
        return conv(torch.cat([up, skip], dim=1))

    def target_context(self, conv: nn.Module, s: torch.Tensor) -> torch.Tensor:
        """What the Target-to-Context fusion with ``conv`` takes from the target: s_k (B, C_k, *S_k)."""
        return s

    def fuse_t2c(self, conv: nn.Module, c: torch.Tensor, t: torch.Tensor, B: int) -> torch.Tensor:
        """Target-to-Context fusion ``GELU(c + Conv1x1(concat[c, t]))``.

        c: (B*L, C, *S) context features; t: (B, C, *S) from :meth:`target_context`,
        repeated for each of the L contexts. Returns (B*L, C, *S).
        """
        L = c.shape[0] // B
        tt = t.unsqueeze(1).expand(B, L, *t.shape[1:]).reshape(B * L, *t.shape[1:])
        return F.gelu(c + conv(torch.cat([c, tt], dim=1)))

    def fuse_c2t(self, conv: nn.Module, t: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
        """Context-to-Target fusion ``GELU(t + Conv1x1(concat[c_mean, t]))``; t, cm: (B, C, *S)."""
        return F.gelu(t + conv(torch.cat([cm, t], dim=1)))


REFERENCE = ReferencePath()


# ------------------------------------------------------------------------- model
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
        fast: default execution path (fast, or :class:`ReferencePath`);
            ``forward(..., fast=)`` overrides.
        apsp_mode: how gradients go through a mini-context loop when a graph is
            recorded: ``"exact"`` (full-context gradient, memory of one
            mini-context, recomputation), ``"scaled"`` (the paper: only the last
            shuffled mini-context keeps its graph, gradient scaled by n) or
            ``"full"`` (every mini-context keeps its graph; memory grows with L).
        channels_last: use channels-last activations in the fast path;
            ``None`` = where it is faster (CUDA, oneDNN CPU inference).
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

    def _path(self, fast: bool | None, x: torch.Tensor) -> ReferencePath | FastPath:
        """The execution path of one part (see the module docstring); ``x``: the part's input.

        The fast paths depend on x's device and dtype and on the grad mode,
        which are the same for every tensor of a part.
        """
        return select_fast_path(x) if self._use_fast(fast) else REFERENCE

    def _down(self, k: int, x: torch.Tensor, p: ReferencePath | FastPath, context: bool) -> torch.Tensor:
        """Downsampling from stage k to k+1: (N, C_k, *S) -> (N, C_{k+1}, *S/2).

        Strided conv, or, between stages of equal width, max pooling (kernel 2,
        stride 2; keeps x's memory format on every path).
        """
        if self.downsample_pool[k]:
            return _POOL_F[self.spatial_dims](x, 2)
        if context:
            conv = self.context_unet.downsample_blocks[k].context_linear_layer.module
        else:
            conv = self.target_encoder.downsample_blocks[k].target_linear_layer
        return p.conv(conv, x)

    # ------------------------------------------------------------- three parts
    def encode_target(self, target: torch.Tensor, *, fast: bool | None = None) -> list[torch.Tensor]:
        """Target encoder.

        Args:
            target: (B, C_in, *S).
        Returns:
            ``[s_0, ..., s_{n-2}, bottom]``: s_k (B, C_k, *S/2^k), bottom (B, C_{n-1}, *S/2^(n-1)).
        """
        p = self._path(fast, target)
        te = self.target_encoder
        # layout after the embedding: a 1-channel input has no distinct channels-last layout
        t = p.layout(p.conv(te.target_embedding, target), self.channels_last)
        feats = []
        for k in range(self.stages - 1):
            t = p.residual(te.enc_blocks[k].target_conv, t)
            feats.append(t)
            t = self._down(k, t, p, context=False)
        feats.append(t)
        return feats

    def target_context(self, tfeats: Sequence[torch.Tensor], *,
                       fast: bool | None = None) -> list[torch.Tensor]:
        """What the context U-Net consumes from the target, computed once per forward.

        Args:
            tfeats: output of :meth:`encode_target`.
        Returns:
            n-1 tensors, one per Target-to-Context fusion. Reference path: s_k
            (B, C_k, *S_k). Fast path: ``W_t s_k`` (B, 1, C_k, *S_k), the target
            half of the fusion's 1x1 conv (no bias), shared by every context.
        """
        p = self._path(fast, tfeats[0])
        blocks = self.context_unet.enc_blocks
        return [p.target_context(blocks[k].combine_conv_context.module, tfeats[k])
                for k in range(self.stages - 1)]

    def encode_contexts(self, context_in: torch.Tensor, context_out: torch.Tensor,
                        tfeats: Sequence[torch.Tensor] | None = None, *,
                        tctx: Sequence[torch.Tensor] | None = None,
                        fast: bool | None = None) -> list[torch.Tensor]:
        """Context U-Net over a (mini-)context of L' (image, label) pairs, all in one batch.

        Args:
            context_in: (B, L', C_in, *S) context images.
            context_out: (B, L', C_out, *S) context labels (cast to the images' dtype).
            tfeats: output of :meth:`encode_target`; used only when ``tctx`` is None
                (then :meth:`target_context` is computed from it on every call).
            tctx: output of :meth:`target_context` with the same ``fast``. Nothing
                is cached inside the model: APSP computes ``tctx`` once per forward
                and passes it to every mini-context, so the target's share of the
                fusions (fast path: ``W_t s_k``) is computed once, not once per
                mini-context.
            fast: execution path (default: ``self.fast``).
        Returns:
            n per-context features, coarse to fine: the bottleneck (B, L', C_{n-1}, *S/2^(n-1)),
            then every decoder output down to (B, L', C_0, *S). APSP sums them over L'
            and divides by L for the target decoder's Context-to-Target fusions.
        """
        if tctx is None:
            if tfeats is None:
                raise ValueError("encode_contexts needs tfeats (from encode_target) or tctx")
            tctx = self.target_context(tfeats, fast=fast)
        B, L = context_in.shape[:2]
        n = self.stages
        cu = self.context_unet
        # (B*L', C_in+C_out, *S): the contexts share the U-Net's weights, so they share its batch axis
        x = torch.cat([context_in, context_out.to(context_in.dtype)], dim=2).flatten(0, 1)
        p = self._path(fast, x)
        c = p.conv(cu.context_embedding.module, p.layout(x, self.channels_last))
        del x
        skips = []
        for k in range(n - 1):
            blk = cu.enc_blocks[k]
            c = p.residual(blk.context_conv.module, c)
            c = p.fuse_t2c(blk.combine_conv_context.module, c, tctx[k], B)
            skips.append(c)
            c = self._down(k, c, p, context=True)
        c = p.residual(cu.enc_blocks[n - 1].context_conv.module, c)
        outs = [c.unflatten(0, (B, L))]
        for j in range(n - 1):
            c = p.up(cu.upsample_blocks[j].context_conv_layer.module, c, skips.pop())
            c = p.residual(cu.dec_blocks[j].context_conv.module, c)
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
        n = self.stages
        td = self.target_decoder
        p = self._path(fast, tfeats[n - 1])

        def fuse(blk: nn.Module, t: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
            # the fp32 running mean -> the features' dtype (what autocast would do)
            return p.fuse_c2t(blk.combine_conv_target.module, t, cm.to(t.dtype))

        blk = td.enc_blocks[0]
        t = fuse(blk, p.residual(blk.target_conv, tfeats[n - 1]), context_means[0])
        for j in range(n - 1):
            t = p.up(td.upsample_blocks[j].target_conv_layer, t, tfeats[n - 2 - j])
            blk = td.dec_blocks[j]
            t = fuse(blk, p.residual(blk.target_conv, t), context_means[j + 1])
        t = p.residual(td.output_block.block[0], t)
        return p.conv(td.output_block.block[1], t)

    # ------------------------------------------------------------------ forward
    def validate_inputs(self, target_in: torch.Tensor, context_in: torch.Tensor,
                        context_out: torch.Tensor) -> None:
        """Raise ValueError/TypeError naming the problem (see :meth:`forward` for shapes)."""
        validate_inputs(target_in, context_in, context_out, in_channels=self.in_channels,
                        out_channels=self.out_channels, spatial_dims=self.spatial_dims,
                        multiple=self.multiple, check_finite=self.check_finite)

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
            fast: override the model's execution path.
            apsp_mode: override ``self.apsp_mode`` when a graph is recorded.
            shuffle, generator: process mini-contexts in a random order (the
                output is order-invariant up to rounding). Default: deterministic,
                except in "scaled" training, which needs a random last mini-context.
            order: explicit processing order of the mini-contexts (a permutation of range(n)).
        Returns:
            (B, C_out, D, H, W).
        """
        from vicl_fast import apsp  # apsp drives this model's parts: imported when first needed

        self.validate_inputs(target_in, context_in, context_out)
        return apsp.apsp_forward(self, target_in, context_in, context_out, l, fast=fast,
                                 mode=apsp_mode or self.apsp_mode, shuffle=shuffle, generator=generator,
                                 order=order, validate=False)

    @torch.inference_mode()
    def predict(self, target_in: torch.Tensor, context_in: torch.Tensor, context_out: torch.Tensor,
                l: int | str | None = None, **kwargs) -> torch.Tensor:
        """:meth:`forward` under ``torch.inference_mode`` (no graph, buffers reused in place)."""
        return self.forward(target_in, context_in, context_out, l, **kwargs)

    _COMPILED_PARTS = ("encode_target", "target_context", "encode_contexts", "decode")

    def compile_parts(self, **compile_kwargs) -> "Neuroverse3D":
        """``torch.compile`` the parts that APSP calls; the mini-context loop stays eager.

        ``compile_kwargs`` go to :func:`torch.compile` (e.g. ``mode="max-autotune"``).
        The last, smaller mini-context and a change of grad mode trigger one
        recompilation each. :meth:`uncompile_parts` restores the eager methods.
        Returns ``self``.
        """
        for name in self._COMPILED_PARTS:
            eager = getattr(type(self), name).__get__(self)
            self.__dict__[name] = torch.compile(eager, **compile_kwargs)
        return self

    def uncompile_parts(self) -> "Neuroverse3D":
        """Undo :meth:`compile_parts`."""
        for name in self._COMPILED_PARTS:
            self.__dict__.pop(name, None)
        return self

    # ------------------------------------------------------------- accounting
    def conv_macs(self, spatial: Sequence[int], contexts: int = 1, *,
                  fast: bool | None = None) -> dict[str, int]:
        """Multiply-accumulates of every conv for one sample (batch 1), without computing anything.

        Counted by :func:`vicl_fast.flops.count_macs_meta` on a copy of this
        architecture on the ``meta`` device (shapes only), with one and with two
        contexts: what grows with L is the per-context part.

        Args:
            spatial: the input spatial size, e.g. (128, 128, 128) (a multiple of :attr:`multiple`).
            contexts: L.
            fast: execution path to count (default: ``self.fast``). Reference path:
                the authors' order; fast path: ``W_t t`` once, the upsampled half
                of the decoder 1x1 convs at low resolution.
        Returns:
            ``{"target": ..., "per_context": ..., "total": ...}`` in MACs (FLOPs = 2 x MACs).
        """
        from vicl_fast.flops import count_macs_meta  # imports torch's flop counter (~0.4 s): only here

        with torch.device("meta"):
            model = Neuroverse3D(**self.config, check_finite=False)
        spatial = tuple(int(s) for s in spatial)

        def macs(L: int) -> int:
            shapes = ((1, self.in_channels, *spatial), (1, L, self.in_channels, *spatial),
                      (1, L, self.out_channels, *spatial))
            return count_macs_meta(model, *shapes, kwargs={"fast": self._use_fast(fast)}).macs

        one = macs(1)
        per_context = macs(2) - one
        target = one - per_context
        return {"target": target, "per_context": per_context, "total": target + contexts * per_context}


# ---------------------------------------------------------------------- registry
@register_model
def neuroverse3d(**kwargs) -> Neuroverse3D:
    """Neuroverse3D as released: channels 32..512, 2 convs per stage, 3D (70,854,913 parameters)."""
    return Neuroverse3D(**kwargs)


@register_model
def neuroverse3d_tiny(**kwargs) -> Neuroverse3D:
    """A tiny Neuroverse3D (channels 4..64, like the official test fixture) for tests and demos."""
    kwargs.setdefault("channels", (4, 8, 16, 32, 64))
    return Neuroverse3D(**kwargs)
