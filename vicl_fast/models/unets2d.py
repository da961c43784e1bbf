"""RandP with U-Net-style backbones (RandP paper Sec. 3 "Extending Visual ICL via RandP + U-Net Variants").

The RandP module (:class:`vicl_fast.models.randp.RandPFusion`) turns
``(prompt_image, prompt_label, query_image)`` into fused query tokens
``(B, N, D)`` at stride 16. A U-Net backbone then processes the query image
alone and receives the prompt information through one of three fusion
strategies (paper Table 6):

- ``"bottleneck"`` (default, best in the paper): tokens -> ``(B, D, h, w)`` ->
  1x1 conv to the bottleneck's channels -> added element-wise to the encoder
  feature map at the 16x-downsampled stage.
- ``"first"``: 1x1 conv to ``first_chans * 16 * 16`` channels, pixel shuffle
  x16 to full resolution, concatenated with the query image at the first
  encoder stage (the backbone gets ``in_chans + first_chans`` input channels).
- ``"multi"``: one 1x1 conv per encoder stage (at stride 16, cheap) then
  bilinear upsampling to that stage's stride, added to the stage's output.

Strides. The fused tokens are 16x downsampled. Where each backbone receives them:

- 2D SwinUNETR (MONAI): patch embedding (x2) + 3 patch mergings give the
  stride-16 map (``8 * feature_size`` channels); MONAI adds a 4th merging to
  stride 32. Fusion is added to the stride-16 map *inside* the Swin encoder,
  so both the stride-16 skip and the stride-32 stage see the prompt.
- 2D UX-Net: stem (x2) + 3 downsamplings = stride 16, the bottleneck of 3D
  UX-Net (``encoder5`` -> ``hidden_size`` channels); fusion is added there.
- Restormer (AMIR configuration): its latent level is at stride 8 (3
  pixel-unshuffle downsamplings). The fused tokens are brought to stride 8 by
  the 1x1 conv to ``4 * C`` channels followed by a x2 pixel shuffle (the
  paper's own upsampling operator for first-stage fusion) and added to the
  latent input.

What is reused from MONAI (monai>=1.3, tested with 1.6.1): the whole
``monai.networks.nets.SwinUNETR(spatial_dims=2)`` module (its ``swinViT``,
``encoder1..4``, ``encoder10``, ``decoder1..5`` and ``out`` submodules are
called in the order of ``SwinUNETR.forward``; only the stride-16 addition is
inserted), and MONAI's ``UnetrBasicBlock`` / ``UnetrUpBlock`` /
``UnetOutBlock`` for the UX-Net decoder (the blocks 3D UX-Net itself imports
from MONAI). UX-Net's encoder (depthwise 7x7 ``ux_block``) and Restormer
(MDTA + GDFN) are written here; MONAI has neither.

Every model: ``forward(prompt_image, prompt_label, query_image) -> (B, out_chans, H, W)``,
``forward_with_logits -> (prediction, task_logits (B, num_tasks))`` and
``last_task_logits`` after a forward.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.randp import RandPFusion, TaskHead, VICL2DModel
from vicl_fast.models.registry import register_model

__all__ = [
    "FUSION_MODES", "FusionPoint", "SwinUNETR2D", "UXNet2D", "Restormer", "RandPUNet",
    "randp_swinunetr", "randp_uxnet", "randp_restormer",
    "randp_swinunetr_tiny", "randp_uxnet_tiny", "randp_restormer_tiny",
]

FUSION_MODES = ("bottleneck", "first", "multi")
RANDP_STRIDE = 16  # the RandP module's token stride (patch size 16)


class FusionPoint:
    """Where a backbone accepts an additive feature: ``stride`` and ``channels`` of that map."""

    __slots__ = ("stride", "channels")

    def __init__(self, stride: int, channels: int) -> None:
        self.stride = int(stride)
        self.channels = int(channels)

    def __repr__(self) -> str:
        return f"FusionPoint(stride={self.stride}, channels={self.channels})"


def _monai(module: str, name: str, model: str) -> Any:
    """``monai.<module>.<name>``, or an ImportError that says how to get MONAI (an optional dependency)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"monai.{module}"), name)
    except ImportError:
        raise ImportError(f"{model} is built from MONAI's blocks, and MONAI is not installed: "
                          "pip install 'monai>=1.3' (or pip install 'vicl_fast[unets]')") from None


def _add(feat: torch.Tensor, adds: Mapping[str, torch.Tensor] | None, key: str) -> torch.Tensor:
    """``feat + adds[key]`` when given (shapes must match exactly)."""
    if adds is None or key not in adds:
        return feat
    extra = adds[key]
    if extra.shape != feat.shape:
        raise ValueError(f"fusion feature for {key!r} has shape {tuple(extra.shape)}, "
                         f"the backbone map there is {tuple(feat.shape)}")
    return feat + extra.to(feat.dtype)


# --------------------------------------------------------------------------------------
# 2D SwinUNETR (MONAI)
# --------------------------------------------------------------------------------------
class SwinUNETR2D(nn.Module):
    """MONAI's SwinUNETR in 2D, with additive fusion points in its Swin encoder.

    Args:
        in_chans, out_chans: image channels in/out.
        feature_size: F (multiple of 12 in MONAI); stage widths F, 2F, 4F, 8F, 16F.
        depths, num_heads, window_size: Swin settings per stage.
        use_flash_attention: MONAI's SDPA path for window attention (used by
            MONAI only when gradients are off; the matmul path otherwise).
    Forward:
        x (B, in_chans, H, W) with H, W multiples of 32, ``adds`` {point: (B, C, H/s, W/s)}
        -> (B, out_chans, H, W).
    Fusion points: ``s2, s4, s8, s16`` (Swin stage outputs, widths F..8F);
    bottleneck ``s16`` (the "4x downsampled" map; MONAI's stride-32 stage follows it).
    """

    size_multiple = 32
    # The stride-32 stage must be > 1x1: MONAI's instance norm refuses one value per channel in training.
    min_size = 64

    def __init__(self, in_chans: int = 3, out_chans: int = 3, feature_size: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, use_flash_attention: bool = True, use_checkpoint: bool = False) -> None:
        super().__init__()
        SwinUNETR = _monai("networks.nets", "SwinUNETR", type(self).__name__)

        if feature_size % 12 != 0:
            raise ValueError(f"feature_size must be a multiple of 12 (MONAI SwinUNETR), got {feature_size}")
        kwargs: dict[str, Any] = dict(
            in_channels=in_chans, out_channels=out_chans, feature_size=feature_size, depths=tuple(depths),
            num_heads=tuple(num_heads), window_size=window_size, spatial_dims=2, use_checkpoint=use_checkpoint,
        )
        try:
            self.net = SwinUNETR(use_flash_attention=use_flash_attention, **kwargs)
        except TypeError:  # MONAI < 1.5 has no use_flash_attention
            self.net = SwinUNETR(**kwargs)
        if getattr(self.net.swinViT, "use_v2", False):
            raise ValueError("SwinUNETR2D composes the v1 encoder; use_v2 is not supported")
        f = feature_size
        self.points = {"s2": FusionPoint(2, f), "s4": FusionPoint(4, 2 * f), "s8": FusionPoint(8, 4 * f),
                       "s16": FusionPoint(16, 8 * f)}
        self.bottleneck = "s16"
        self.multi_stage = ("s2", "s4", "s8", "s16")

    def forward(self, x: torch.Tensor, adds: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        net, vit = self.net, self.net.swinViT
        norm = net.normalize
        # SwinTransformer.forward (v1) with the fusion additions after each stage.
        x0 = vit.pos_drop(vit.patch_embed(x))
        x0 = _add(x0, adds, "s2")
        x1 = _add(vit.layers1[0](x0.contiguous()), adds, "s4")
        x2 = _add(vit.layers2[0](x1.contiguous()), adds, "s8")
        x3 = _add(vit.layers3[0](x2.contiguous()), adds, "s16")
        x4 = vit.layers4[0](x3.contiguous())
        hs = [vit.proj_out(t, norm) for t in (x0, x1, x2, x3, x4)]
        # SwinUNETR.forward, unchanged.
        enc0 = net.encoder1(x)
        enc1 = net.encoder2(hs[0])
        enc2 = net.encoder3(hs[1])
        enc3 = net.encoder4(hs[2])
        dec4 = net.encoder10(hs[4])
        dec3 = net.decoder5(dec4, hs[3])
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        dec0 = net.decoder2(dec1, enc1)
        return net.out(net.decoder1(dec0, enc0))


# --------------------------------------------------------------------------------------
# 2D UX-Net
# --------------------------------------------------------------------------------------
class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over C of ``(B, C, H, W)`` (UX-Net's ``channels_first`` LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class UXBlock(nn.Module):
    """3D UX-Net's block in 2D: depthwise 7x7 conv -> LN -> depthwise-scaled MLP, residual.

    ``x + gamma * pw2(GELU(pw1(LN(dw7x7(x)))))`` where pw1 (C -> 4C) and pw2 (4C -> C)
    are 1x1 convs with ``groups=C`` (UX-Net's "depthwise convolution scaling"
    in place of ConvNeXt's dense MLP). (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, kernel_size: int = 7, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, kernel_size=1, groups=dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + y


class UXNet2D(nn.Module):
    """3D UX-Net (Lee et al. 2023) made 2D.

    Encoder: stem ``conv7x7 stride 2`` + LN, then ``[LN, conv2x2 stride 2]`` x 3;
    ``depths[i]`` :class:`UXBlock` per stage, widths ``dims`` at strides 2/4/8/16,
    a LN on each stage output. Decoder (MONAI blocks, as in UX-Net):
    ``encoder1..4`` (UnetrBasicBlock on the image and the stage outputs),
    ``encoder5`` (stage 4 -> ``hidden_size``: the stride-16 bottleneck),
    ``decoder5..2`` (UnetrUpBlock, transposed-conv x2 + skip), ``decoder1``, 1x1 out.

    Args:
        in_chans, out_chans; dims (48, 96, 192, 384); depths (2, 2, 2, 2);
        hidden_size 768; kernel_size 7 (the large depthwise kernel); norm_name "instance".
    Forward:
        x (B, in_chans, H, W), H, W multiples of 16 -> (B, out_chans, H, W).
    Fusion points: ``s2, s4, s8, s16`` (stage outputs, ``dims``) and
    ``bottleneck`` (``encoder5`` output: stride 16, ``hidden_size``).
    """

    size_multiple = 16

    def __init__(self, in_chans: int = 3, out_chans: int = 3, dims: Sequence[int] = (48, 96, 192, 384),
                 depths: Sequence[int] = (2, 2, 2, 2), hidden_size: int = 768, kernel_size: int = 7,
                 norm_name: str = "instance", layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        UnetOutBlock, UnetrBasicBlock, UnetrUpBlock = (
            _monai("networks.blocks", n, type(self).__name__) for n in ("UnetOutBlock", "UnetrBasicBlock", "UnetrUpBlock"))

        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"dims and depths need 4 entries (4 stages), got {dims} and {depths}")
        d = list(dims)
        self.downsample = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, d[0], kernel_size=7, stride=2, padding=3), LayerNormChannelsFirst(d[0]))])
        for i in range(3):
            self.downsample.append(nn.Sequential(LayerNormChannelsFirst(d[i]),
                                                 nn.Conv2d(d[i], d[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList([
            nn.Sequential(*[UXBlock(d[i], kernel_size, layer_scale_init_value) for _ in range(depths[i])])
            for i in range(4)])
        self.out_norms = nn.ModuleList([LayerNormChannelsFirst(d[i]) for i in range(4)])

        def basic(cin: int, cout: int) -> nn.Module:
            return UnetrBasicBlock(2, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        def up(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(2, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                res_block=True)

        self.encoder1 = basic(in_chans, d[0])
        self.encoder2 = basic(d[0], d[1])
        self.encoder3 = basic(d[1], d[2])
        self.encoder4 = basic(d[2], d[3])
        self.encoder5 = basic(d[3], hidden_size)
        self.decoder5 = up(hidden_size, d[3])
        self.decoder4 = up(d[3], d[2])
        self.decoder3 = up(d[2], d[1])
        self.decoder2 = up(d[1], d[0])
        self.decoder1 = basic(d[0], d[0])
        self.out = UnetOutBlock(2, d[0], out_chans)
        self.points = {f"s{2 ** (i + 1)}": FusionPoint(2 ** (i + 1), d[i]) for i in range(4)}
        self.points["bottleneck"] = FusionPoint(16, hidden_size)
        self.bottleneck = "bottleneck"
        self.multi_stage = ("s2", "s4", "s8", "s16")

    def forward(self, x: torch.Tensor, adds: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        outs = []
        h = x
        for i in range(4):
            h = self.stages[i](self.downsample[i](h))
            h = _add(h, adds, f"s{2 ** (i + 1)}")  # fed to the next stage as well
            outs.append(self.out_norms[i](h))
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        hidden = _add(self.encoder5(outs[3]), adds, "bottleneck")
        dec3 = self.decoder5(hidden, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0))


# --------------------------------------------------------------------------------------
# Restormer (AMIR configuration)
# --------------------------------------------------------------------------------------
class RestormerLayerNorm(nn.Module):
    """Restormer's 'WithBias' (or 'BiasFree') LayerNorm over C of ``(B, C, H, W)``."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)
        if self.bias is None:  # BiasFree: scale by 1/std without centring
            var = t.var(-1, keepdim=True, unbiased=False)
            t = t / torch.sqrt(var + 1e-5) * self.weight
        else:
            t = F.layer_norm(t, (t.shape[-1],), self.weight, self.bias, 1e-5)
        return t.permute(0, 3, 1, 2)


class MDTA(nn.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, cost linear in H*W.

    ``qkv = dw3x3(conv1x1(x))``; per head, q and k (C/heads, H*W) are L2-normalised
    over H*W; ``A = softmax(q k^T * temperature)`` is (C/heads x C/heads);
    ``out = conv1x1(A v)``. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        # "b (head c) h w -> b head c (h w)"
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class GDFN(nn.Module):
    """Gated-Dconv Feed-forward Network: ``conv1x1(GELU(x1) * x2)``, ``x1, x2 = dw3x3(conv1x1(x))``."""

    def __init__(self, dim: int, ffn_expansion_factor: float = 2.66, bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class RestormerBlock(nn.Module):
    """``x + MDTA(LN(x))``, then ``x + GDFN(LN(x))``; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layernorm_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = RestormerLayerNorm(dim, layernorm_bias)
        self.attn = MDTA(dim, num_heads, bias)
        self.norm2 = RestormerLayerNorm(dim, layernorm_bias)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Restormer(nn.Module):
    """Restormer (Zamir et al. 2022) in the configuration of AMIR (dim 42, blocks [5, 7, 7, 9], 4
    refinement blocks, heads [1, 2, 4, 8], GDFN expansion 2.66, no conv bias, WithBias LayerNorm).

    Levels: 1 (dim, stride 1), 2 (2 dim, stride 2), 3 (4 dim, stride 4), latent
    (8 dim, stride 8); downsampling ``conv3x3(C -> C/2) + PixelUnshuffle(2)``,
    upsampling ``conv3x3(C -> 2C) + PixelShuffle(2)``; skip concatenation with
    1x1 channel reduction at levels 3 and 2; the level-1 decoder and the
    refinement run at 2 dim; ``out = conv3x3(2 dim -> out_chans) + input``
    (global residual; on the first ``out_chans`` input channels when the
    input carries extra fusion channels).

    Forward:
        x (B, in_chans, H, W), H, W multiples of 8 -> (B, out_chans, H, W).
    Fusion points: ``s1, s2, s4`` (level inputs after embedding / downsampling)
    and ``s8`` (the latent input, the bottleneck).
    """

    size_multiple = 8

    def __init__(self, in_chans: int = 3, out_chans: int = 3, dim: int = 42,
                 num_blocks: Sequence[int] = (5, 7, 7, 9), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layernorm_type: str = "WithBias", residual: bool = True) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries, got {num_blocks} and {heads}")
        if layernorm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"layernorm_type must be 'WithBias' or 'BiasFree', got {layernorm_type!r}")
        ln_bias = layernorm_type == "WithBias"

        def level(c: int, n: int, h: int) -> nn.Sequential:
            return nn.Sequential(*[RestormerBlock(c, h, ffn_expansion_factor, bias, ln_bias) for _ in range(n)])

        def down(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

        def upsample(c: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

        if dim % 2:
            raise ValueError(f"Restormer dim must be even (pixel-unshuffle halves then quadruples C), got {dim}")
        self.out_chans = out_chans
        self.residual = residual
        self.patch_embed = nn.Conv2d(in_chans, dim, 3, padding=1, bias=bias)
        self.encoder_level1 = level(dim, num_blocks[0], heads[0])
        self.down1_2 = down(dim)
        self.encoder_level2 = level(dim * 2, num_blocks[1], heads[1])
        self.down2_3 = down(dim * 2)
        self.encoder_level3 = level(dim * 4, num_blocks[2], heads[2])
        self.down3_4 = down(dim * 4)
        self.latent = level(dim * 8, num_blocks[3], heads[3])
        self.up4_3 = upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = level(dim * 4, num_blocks[2], heads[2])
        self.up3_2 = upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = level(dim * 2, num_blocks[1], heads[1])
        self.up2_1 = upsample(dim * 2)
        self.decoder_level1 = level(dim * 2, num_blocks[0], heads[0])
        self.refinement = level(dim * 2, num_refinement_blocks, heads[0])
        self.output = nn.Conv2d(dim * 2, out_chans, 3, padding=1, bias=bias)
        self.points = {"s1": FusionPoint(1, dim), "s2": FusionPoint(2, dim * 2), "s4": FusionPoint(4, dim * 4),
                       "s8": FusionPoint(8, dim * 8)}
        self.bottleneck = "s8"
        self.multi_stage = ("s1", "s2", "s4", "s8")

    def forward(self, x: torch.Tensor, adds: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        e1 = self.encoder_level1(_add(self.patch_embed(x), adds, "s1"))
        e2 = self.encoder_level2(_add(self.down1_2(e1), adds, "s2"))
        e3 = self.encoder_level3(_add(self.down2_3(e2), adds, "s4"))
        lat = self.latent(_add(self.down3_4(e3), adds, "s8"))
        d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1)))
        d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], 1)))
        d1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(d2), e1], 1)))
        out = self.output(d1)
        if self.residual and x.shape[1] >= self.out_chans:
            out = out + x[:, : self.out_chans]
        return out


# --------------------------------------------------------------------------------------
# RandP + U-Net
# --------------------------------------------------------------------------------------
_BACKBONES = {"swinunetr": SwinUNETR2D, "uxnet": UXNet2D, "restormer": Restormer}


def _injector(embed_dim: int, point: FusionPoint, upsample: str) -> nn.Module:
    """(B, D, h, w) at stride 16 -> (B, C, h*r, w*r) at the point's stride (r = 16 / stride)."""
    if RANDP_STRIDE % point.stride:
        raise ValueError(f"fusion stride {point.stride} does not divide the RandP stride {RANDP_STRIDE}")
    r = RANDP_STRIDE // point.stride
    if r == 1:
        return nn.Conv2d(embed_dim, point.channels, kernel_size=1)
    if upsample == "pixel_shuffle":
        return nn.Sequential(nn.Conv2d(embed_dim, point.channels * r * r, kernel_size=1), nn.PixelShuffle(r))
    return nn.Sequential(nn.Conv2d(embed_dim, point.channels, kernel_size=1),
                         nn.Upsample(scale_factor=r, mode="bilinear", align_corners=False))


class RandPUNet(VICL2DModel):
    """RandP module + U-Net-style backbone (RandP-SwinUNETR / RandP-UX-Net / RandP-Restormer).

    Args:
        backbone: ``"swinunetr" | "uxnet" | "restormer"``.
        img_size: default H = W of each image (RandP's positional grid).
        in_chans: channels of every input image; out_chans: channels of the prediction (3).
        embed_dim, depth, num_heads, mlp_ratio: RandP module (patch 16, shallow ViT of ``depth`` layers).
        mode: ``"hungarian" | "greedy" | "merge"`` (RandP's prompt-query fusion, Table 6 top).
        match_on: ``"x" | "z"`` (matching on shallow-ViT outputs or patch embeddings; see randp.py).
        fusion: ``"bottleneck" | "first" | "multi"`` (Table 6 bottom).
        first_chans: channels the fused tokens become at full resolution for ``fusion="first"``.
        num_tasks: classes of the task head (CE term of the loss); 0 disables it.
        backbone_kwargs: passed to the backbone class (sizes).
    Forward:
        prompt_image, prompt_label, query_image: (B, in_chans, H, W), H and W
        multiples of 16 (32 for SwinUNETR) -> (B, out_chans, H, W);
        :meth:`forward_with_logits` -> (pred, task logits (B, num_tasks) | None).
    The task head (:class:`vicl_fast.models.randp.TaskHead`) reads the mean fused
    token: the prompt pair is what tells the model which task to perform.
    """

    def __init__(self, backbone: str = "uxnet", img_size: int = 256, in_chans: int = 3, out_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 2, num_heads: int = 16, mlp_ratio: float = 4.0,
                 mode: str = "hungarian", match_on: str = "x", fusion: str = "bottleneck",
                 first_chans: int = 4, num_tasks: int = 4, backbone_kwargs: Mapping[str, Any] | None = None,
                 fused_attn: bool = True) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {backbone!r}")
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        if fusion == "first" and first_chans < 1:
            raise ValueError(f"first_chans must be >= 1 for fusion='first', got {first_chans}")
        self.backbone_name = backbone
        self.fusion_mode = fusion
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.randp = RandPFusion(img_size, RANDP_STRIDE, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                 mode=mode, match_on=match_on, fused_attn=fused_attn)
        bb_in = in_chans + (first_chans if fusion == "first" else 0)
        self.backbone = _BACKBONES[backbone](in_chans=bb_in, out_chans=out_chans, **dict(backbone_kwargs or {}))
        pts = self.backbone.points
        self.first: nn.Module | None = None
        if fusion == "bottleneck":
            key = self.backbone.bottleneck
            self.injectors = nn.ModuleDict({key: _injector(embed_dim, pts[key], "pixel_shuffle")})
        elif fusion == "multi":
            self.injectors = nn.ModuleDict({k: _injector(embed_dim, pts[k], "bilinear")
                                            for k in self.backbone.multi_stage})
        else:
            self.injectors = nn.ModuleDict()
            self.first = _injector(embed_dim, FusionPoint(1, first_chans), "pixel_shuffle")
        self.task_head = TaskHead(embed_dim, num_tasks) if num_tasks > 0 else None
        self.size_divisor = math.lcm(RANDP_STRIDE, self.backbone.size_multiple)

    def fused_map(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                  query_image: torch.Tensor) -> torch.Tensor:
        """RandP's fused query tokens as a map: (B, D, H/16, W/16)."""
        tokens = self.randp(prompt_image, prompt_label, query_image)  # (B, h*w, D), row-major
        h, w = self.randp.grid_size(*query_image.shape[-2:])
        B, N, D = tokens.shape
        # "B (h w) D -> B D h w"
        return tokens.transpose(1, 2).reshape(B, D, h, w)

    def check_inputs(self, prompt_image, prompt_label, query_image) -> tuple[int, int, int]:
        """The shared checks, plus the backbone's smallest image size; returns (B, H, W)."""
        B, H, W = super().check_inputs(prompt_image, prompt_label, query_image)
        min_size = getattr(self.backbone, "min_size", 0)
        if min(H, W) < min_size:
            raise ValueError(f"randp_{self.backbone_name} needs images of at least {min_size}x{min_size} "
                             f"(its deepest stage would be 1x1), got {H}x{W}; resize the inputs or use "
                             f"randp_uxnet / randp_restormer for smaller images")
        return B, H, W

    def forward_with_logits(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                            query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (prediction (B, out_chans, H, W), task logits (B, num_tasks) or None)."""
        self.check_inputs(prompt_image, prompt_label, query_image)
        fmap = self.fused_map(prompt_image, prompt_label, query_image)
        logits = self.task_head(fmap) if self.task_head is not None else None
        adds = None
        if self.first is not None:
            x = torch.cat([query_image, self.first(fmap).to(query_image.dtype)], dim=1)
        else:
            x = query_image
            adds = {k: inj(fmap) for k, inj in self.injectors.items()}
        return self.backbone(x, adds), logits


# --------------------------------------------------------------------------------------
# Registered models
# --------------------------------------------------------------------------------------
_TINY_RANDP = dict(img_size=64, embed_dim=32, depth=1, num_heads=2)


def _build(backbone: str, defaults: Mapping[str, Any], bb_defaults: Mapping[str, Any], /,
           **kwargs: Any) -> RandPUNet:
    if "backbone" in kwargs:
        raise TypeError(f"this factory builds the {backbone!r} backbone; pick another with "
                        f"create_model('randp_<backbone>') ({', '.join(sorted(_BACKBONES))}) or "
                        f"RandPUNet(backbone=...), not backbone={kwargs['backbone']!r}")
    bb = dict(bb_defaults)
    bb.update(kwargs.pop("backbone_kwargs", None) or {})
    cfg = dict(defaults)
    cfg.update(kwargs)
    return RandPUNet(backbone=backbone, backbone_kwargs=bb, **cfg)


@register_model
def randp_swinunetr(**kwargs: Any) -> RandPUNet:
    """RandP (1024-d, 2 layers) + 2D SwinUNETR (MONAI, feature_size 48, depths 2/2/2/2, window 7)."""
    return _build("swinunetr", {}, dict(feature_size=48), **kwargs)


@register_model
def randp_uxnet(**kwargs: Any) -> RandPUNet:
    """RandP (1024-d, 2 layers) + 2D UX-Net (dims 48/96/192/384, depths 2/2/2/2, hidden 768, dw 7x7)."""
    return _build("uxnet", {}, {}, **kwargs)


@register_model
def randp_restormer(**kwargs: Any) -> RandPUNet:
    """RandP (1024-d, 2 layers) + Restormer in AMIR's configuration (dim 42, [5,7,7,9]+4, heads [1,2,4,8])."""
    return _build("restormer", {}, {}, **kwargs)


@register_model
def randp_swinunetr_tiny(**kwargs: Any) -> RandPUNet:
    """Test-size RandP-SwinUNETR (64x64 images, 32-d RandP, feature_size 12, window 2)."""
    return _build("swinunetr", _TINY_RANDP,
                  dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2), **kwargs)


@register_model
def randp_uxnet_tiny(**kwargs: Any) -> RandPUNet:
    """Test-size RandP-UX-Net (64x64 images, 32-d RandP, dims 8/16/24/32, 1 block per stage)."""
    return _build("uxnet", _TINY_RANDP, dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), hidden_size=48), **kwargs)


@register_model
def randp_restormer_tiny(**kwargs: Any) -> RandPUNet:
    """Test-size RandP-Restormer (64x64 images, 32-d RandP, dim 8, blocks 1/1/1/1 + 1)."""
    return _build("restormer", _TINY_RANDP,
                  dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 2, 4)), **kwargs)
