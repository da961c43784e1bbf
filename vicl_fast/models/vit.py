"""Plain ViT building blocks shared by the 2D models (RandP, Painter, ...).

Small reusable layers in one place (timm style):

* :class:`PatchEmbed` ``(B, C, H, W) -> (B, h*w, D)`` (conv with stride = patch).
* :class:`Attention` / :class:`Block`: pre-norm transformer block. The
  attention backend is the dispatcher's op ``attention``
  (:mod:`vicl_fast.ops._dispatch`), first that fits: xformers'
  ``memory_efficient_attention`` when xformers is importable, the input is on
  CUDA and a test run for the dtype works (never required); else
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory
  efficient kernels chosen by PyTorch); the explicit maths
  (``softmax(q k^T / sqrt(d)) v``) when ``fused_attn=False`` (the reference).
* :class:`ViTBlocks`: a stack of blocks that returns the (normed) features of
  the requested ``out_indices`` (by default 4 evenly spaced layers, e.g.
  5/11/17/23 for 24 blocks).
* :class:`PixelDecoder`: the pixel decoder of RandP (Sec. 3, "a simple
  prediction head with two convolutional layers, taking the concatenated
  feature maps from four different layers of ViT") in Painter's form
  (peers.md): ``concat(4 x D) -> Linear(4D -> p*p*64)`` (a per-token
  projection to a p x p x 64 pixel patch, i.e. a pixel shuffle)
  ``-> conv3x3(64) + LayerNorm + GELU -> conv1x1(3)``.
* :data:`VIT_PRESETS`: ViT-L/16 (24 x 1024, 16 heads), ViT-B, ViT-S and a tiny
  configuration for tests.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.ops._dispatch import select

__all__ = [
    "VIT_PRESETS", "PatchEmbed", "Attention", "Mlp", "Block", "ViTBlocks", "LayerNorm2d",
    "PixelDecoder", "evenly_spaced_indices", "interpolate_pos_grid", "xformers_available", "xformers_works",
]

# name -> (embed_dim, depth, num_heads). Patch 16, MLP ratio 4 for all.
VIT_PRESETS: dict[str, dict[str, int]] = {
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "tiny": dict(embed_dim=32, depth=4, num_heads=2),
}

_XFORMERS: bool | None = None


def xformers_available() -> bool:
    """Whether ``xformers.ops.memory_efficient_attention`` can be imported (checked once)."""
    global _XFORMERS
    if _XFORMERS is None:
        _XFORMERS = False
        if importlib.util.find_spec("xformers") is not None:
            try:
                import xformers.ops  # noqa: F401
                _XFORMERS = True
            except Exception:  # a broken xformers build must never break the model
                _XFORMERS = False
    return _XFORMERS


_XFORMERS_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def xformers_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers' attention runs for this CUDA device type and dtype: probed once on tiny
    tensors, because a wheel built for another torch imports but then raises "No operator found"
    (or lacks fp32 kernels); SDPA is used instead, with one warning. The last check of the
    dispatcher's ``attention`` backend ``xformers``."""
    key = (device.type, dtype)
    if key not in _XFORMERS_WORKS:
        if not xformers_available() or torch.compiler.is_compiling():
            return False
        try:
            import xformers.ops as xops

            q = torch.randn(1, 8, 1, 16, device=device, dtype=dtype)
            xops.memory_efficient_attention(q, q, q)
            _XFORMERS_WORKS[key] = True
        except Exception as e:  # noqa: BLE001 - any failure: the PyTorch kernel instead
            warnings.warn(f"xformers attention unusable for {dtype} on {device.type} ({type(e).__name__}); "
                          "using PyTorch's scaled_dot_product_attention", RuntimeWarning, stacklevel=2)
            _XFORMERS_WORKS[key] = False
    return _XFORMERS_WORKS[key]


def evenly_spaced_indices(depth: int, n: int = 4) -> tuple[int, ...]:
    """``n`` evenly spaced block indices ending at the last block.

    depth 24 -> (5, 11, 17, 23) (Painter / ViTDet); depth 12 -> (2, 5, 8, 11);
    depth 2 -> (0, 0, 1, 1) (a block may be used twice when depth < n).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return tuple(max(0, math.ceil((k + 1) * depth / n) - 1) for k in range(n))


def interpolate_pos_grid(pos: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a learnable positional grid (bicubic, as timm/Painter do).

    Args:
        pos: (..., src_h * src_w, D).
        src_hw: (src_h, src_w) the grid the parameter was made for.
        dst_hw: (h, w) the grid wanted.
    Returns:
        (..., h * w, D); ``pos`` itself when the sizes agree.
    """
    if tuple(src_hw) == tuple(dst_hw):
        return pos
    lead = pos.shape[:-2]
    d = pos.shape[-1]
    grid = pos.reshape(-1, src_hw[0], src_hw[1], d).permute(0, 3, 1, 2)
    # bicubic is not implemented for half types on every backend: resize those in float32.
    work = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid
    grid = F.interpolate(work, size=tuple(dst_hw), mode="bicubic", align_corners=False)
    return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(*lead, dst_hw[0] * dst_hw[1], d)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``(B, C, H, W) -> (B, (H/p)*(W/p), D)``, row-major."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention ``(B, N, D) -> (B, N, D)``.

    ``fused_attn=True`` (default) uses SDPA, or xformers on CUDA when installed;
    ``fused_attn=False`` the explicit maths (reference, used by the tests).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, fused_attn: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        backend = select("attention", device=x.device, dtype=qkv.dtype, fused=self.fused_attn).name
        if backend == "xformers":
            import xformers.ops as xops
            q, k, v = qkv.unbind(2)  # (B, N, H, hd): xformers' layout, no transpose
            out = xops.memory_efficient_attention(q, k, v).reshape(B, N, D)
            return self.proj(out)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
        if backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """``Linear(D -> hidden) -> GELU -> Linear(hidden -> D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``; (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 fused_attn: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTBlocks(nn.Module):
    """A stack of :class:`Block` returning the LayerNorm-ed features of ``out_indices``.

    Args:
        embed_dim, depth, num_heads, mlp_ratio: the usual ViT sizes.
        out_indices: blocks whose outputs are returned (default: 4 evenly
            spaced, :func:`evenly_spaced_indices`). Each returned feature goes
            through one shared final LayerNorm, as in Painter.
        grad_checkpointing: recompute block activations in backward (memory).
    Forward:
        x (B, N, D) -> list of len(out_indices) tensors (B, N, D).
    """

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 out_indices: Sequence[int] | None = None, fused_attn: bool = True,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices) if out_indices is not None else evenly_spaced_indices(depth)
        bad = [i for i in self.out_indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"out_indices {bad} are outside [0, {depth - 1}] for depth {depth}")
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, fused_attn=fused_attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = grad_checkpointing

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Apply block ``i`` (with activation checkpointing when enabled and training)."""
        blk = self.blocks[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: dict[int, torch.Tensor] = {}
        wanted = set(self.out_indices)
        last = max(self.out_indices)
        for i in range(last + 1):  # blocks past the last requested feature would be dead weight
            x = self.run_block(i, x)
            if i in wanted:
                feats[i] = self.norm(x)
        return [feats[i] for i in self.out_indices]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of ``(B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PixelDecoder(nn.Module):
    """Pixel decoder (RandP Sec. 3 / Painter head): 4 feature maps -> image.

    ``concat(features) (B, h*w, n*D) -> Linear(n*D -> p*p*Cd)`` -> pixel shuffle to
    ``(B, Cd, h*p, w*p)`` -> ``conv3x3(Cd -> Cd) -> LayerNorm2d -> GELU -> conv1x1(Cd -> out_chans)``.
    With D = 1024, n = 4, p = 16, Cd = 64 this is Painter's head (4096 -> 16384).

    Args:
        embed_dim: D of each feature; num_features: n (4); patch_size: p;
        decoder_dim: Cd (64); out_chans: 3.
    Forward:
        feats: list of n tensors (B, h*w, D) (row-major token grid), hw: (h, w)
        -> (B, out_chans, h*p, w*p).
    """

    def __init__(self, embed_dim: int = 1024, num_features: int = 4, patch_size: int = 16,
                 decoder_dim: int = 64, out_chans: int = 3) -> None:
        super().__init__()
        self.num_features = num_features
        self.patch_size = patch_size
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(embed_dim * num_features, patch_size * patch_size * decoder_dim)
        self.conv = nn.Conv2d(decoder_dim, decoder_dim, kernel_size=3, padding=1)
        self.norm = LayerNorm2d(decoder_dim, eps=1e-6)
        self.act = nn.GELU()
        self.pred = nn.Conv2d(decoder_dim, out_chans, kernel_size=1)

    def forward(self, feats: Sequence[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
        if len(feats) != self.num_features:
            raise ValueError(f"PixelDecoder expects {self.num_features} feature maps, got {len(feats)}")
        h, w = hw
        p, c = self.patch_size, self.decoder_dim
        x = self.embed(torch.cat(list(feats), dim=-1))  # (B, h*w, p*p*c)
        B = x.shape[0]
        # "B (h w) (p q c) -> B c (h p) (w q)": each token becomes a p x p pixel patch.
        x = x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, h * p, w * p)
        return self.pred(self.act(self.norm(self.conv(x))))


def init_vit_weights(module: nn.Module) -> None:
    """timm/MAE init: trunc-normal(0.02) linears, zero biases, unit LayerNorms; xavier patch conv."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
