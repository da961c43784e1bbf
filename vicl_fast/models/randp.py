"""RandP (seeds/000_*.txt): the retrieve-and-propagate fusion module, the ViT model and its loss.

* :class:`RandPFusion` - the RandP module (Fig. 3 (1), Algorithm 1): patch
  embedding + learnable positional encoding of the 2x2 grid, a learnable
  [MASK] token as the query label, a shallow ViT (2 blocks) over the four
  token sets, then :func:`vicl_fast.ops.retrieve.retrieve_and_propagate`
  (Hungarian / greedy matching or Painter-style patch merging). Output: the
  fused query tokens ``(B, N, D)``, N = (H/16)*(W/16) at stride 16, which the
  ViT backbone here or a U-Net bottleneck (vicl_fast/models/unets2d.py) consumes.
* :class:`RandPViT` - fusion + ViT backbone + pixel decoder + task head,
  registered as ``randp_vit_l`` (paper), ``randp_vit_b``, ``randp_vit_s``, ``randp_vit_tiny``.
* :class:`VICL2DModel` - the shared base of every 2D vICL model: input checks,
  ``forward_with_logits`` / ``last_task_logits``.
* :class:`TaskHead` and :func:`randp_loss` = smoothL1(query label) + 0.1 CE(task).

Matching on X (default) or Z. The paper gives both: Eq. 3 matches the patch
embeddings Z, Algorithm 1 the shallow-ViT outputs X. ``match_on="x"`` is the
default because (1) Algorithm 1 is the step-by-step specification and is
self-consistent: the tokens matched are the tokens reordered and fused
(Eq. 4 reorders X); (2) X is contextualised by two attention layers over all
four token sets and trained end to end, whereas Z is one linear projection of
raw pixels, so X is less sensitive to patient-to-patient intensity/contrast
shifts and to the many near-identical background patches of medical images;
(3) the cost is the same. ``match_on="z"`` (Eq. 3) is kept for the ablation;
it lets the matching start before the shallow ViT (the solver then overlaps
with the two blocks on an asynchronous device).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.registry import register_model
from vicl_fast.models.vit import (
    PatchEmbed, PixelDecoder, ViTBlocks, Block, init_vit_weights, interpolate_pos_grid,
)
from vicl_fast.ops.retrieve import MODES, match_tokens, retrieve_and_propagate

__all__ = [
    "VICL2DModel", "check_vicl_inputs", "RandPFusion", "TaskHead", "RandPViT", "randp_loss",
    "randp_vit_l", "randp_vit_b", "randp_vit_s", "randp_vit_tiny",
]


# ----------------------------------------------------------------------------- shared 2D API

def check_vicl_inputs(prompt_image: torch.Tensor, prompt_label: torch.Tensor, query_image: torch.Tensor,
                      in_chans: int, size_divisor: int) -> tuple[int, int, int]:
    """Validate the ``(prompt_image, prompt_label, query_image)`` triple of a 2D vICL model.

    Each must be a floating ``(B, in_chans, H, W)`` tensor, all three of one
    shape and device, with H and W multiples of ``size_divisor``.

    Returns:
        (B, H, W).
    Raises:
        TypeError / ValueError naming the argument and the fix.
    """
    named = (("prompt_image", prompt_image), ("prompt_label", prompt_label), ("query_image", query_image))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, C, H, W), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}"
                             + ("; add a batch dimension with .unsqueeze(0)" if t.dim() == 3 else ""))
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (e.g. float32 in [0, 1]), got {t.dtype}; "
                            "convert with .float()")
        if t.shape[1] != in_chans:
            raise ValueError(f"{name} has {t.shape[1]} channels but the model expects in_chans={in_chans}; "
                             f"repeat grey images to {in_chans} channels (x.expand(-1, {in_chans}, -1, -1)) "
                             f"or build the model with in_chans={t.shape[1]}")
    ref = query_image
    for name, t in named[:2]:
        if t.shape != ref.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from query_image {tuple(ref.shape)}: "
                             "prompt and query must have the same batch and size (resize the prompt pair)")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but query_image on {ref.device}: move all inputs "
                             "to one device")
    B, _, H, W = ref.shape
    if H % size_divisor or W % size_divisor or H == 0 or W == 0:
        raise ValueError(f"image size {H}x{W} must be a positive multiple of {size_divisor} (the patch "
                         f"size / total stride); resize or pad to e.g. "
                         f"{max(1, round(H / size_divisor)) * size_divisor}x"
                         f"{max(1, round(W / size_divisor)) * size_divisor}")
    return B, H, W


class VICL2DModel(nn.Module):
    """Base of every 2D vICL model: ``forward(prompt_image, prompt_label, query_image) -> (B, 3, H, W)``.

    Subclasses implement :meth:`forward_with_logits` returning ``(pred, logits | None)``;
    ``forward`` returns ``pred`` and keeps the logits in ``last_task_logits``.
    ``vicl_2d = True`` lets the generic test suite (tests/models/test_models_2d.py) find
    every 2D model; ``in_chans`` and ``size_divisor`` drive :meth:`check_inputs`.
    """

    vicl_2d = True
    in_chans: int = 3
    size_divisor: int = 16

    def __init__(self) -> None:
        super().__init__()
        self.last_task_logits: torch.Tensor | None = None

    def check_inputs(self, prompt_image, prompt_label, query_image) -> tuple[int, int, int]:
        """See :func:`check_vicl_inputs`; returns (B, H, W)."""
        return check_vicl_inputs(prompt_image, prompt_label, query_image, self.in_chans, self.size_divisor)

    def forward_with_logits(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                            query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                query_image: torch.Tensor) -> torch.Tensor:
        pred, logits = self.forward_with_logits(prompt_image, prompt_label, query_image)
        self.last_task_logits = logits
        return pred


class TaskHead(nn.Module):
    """Task classifier on pooled features: ``LayerNorm -> Linear(dim -> num_tasks)``.

    Forward: tokens (B, N, dim) (mean over N) or feature maps (B, dim, *S)
    (mean over the spatial axes) -> logits (B, num_tasks).
    """

    def __init__(self, dim: int, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks} (use no TaskHead for 0)")
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=1) if x.dim() == 3 else x.flatten(2).mean(dim=2)
        return self.fc(self.norm(pooled))


def randp_loss(pred: torch.Tensor, target: torch.Tensor, logits: torch.Tensor | None = None,
               task: torch.Tensor | None = None, ce_weight: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """RandP loss (Sec. 3): ``smoothL1(pred, target) + 0.1 * CE(logits, task)``.

    Args:
        pred, target: (B, 3, H, W) predicted and true query label.
        logits: (B, T) task logits or None (then no CE term).
        task: (B,) int64 task ids; required with ``logits``.
        ce_weight: weight of the CE term (0.1 in the paper).
        beta: smooth-L1 transition point (1.0: Girshick's smooth L1, which the
            paper cites; Painter uses 0.01).
    Returns:
        scalar loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    loss = F.smooth_l1_loss(pred, target.to(pred.dtype), beta=beta)
    if (logits is None) != (task is None):
        raise ValueError("pass both logits and task (for the CE term) or neither")
    if logits is not None:
        if task.dim() != 1 or task.shape[0] != logits.shape[0]:
            raise ValueError(f"task must be (B,) = ({logits.shape[0]},) class ids, got {tuple(task.shape)}")
        loss = loss + ce_weight * F.cross_entropy(logits.float(), task.long())
    return loss


# ----------------------------------------------------------------------------- the RandP module

class RandPFusion(nn.Module):
    """The RandP module: prompt pair + query image -> fused query tokens.

    Args:
        img_size: H = W the positional encoding is made for (256); other sizes
            that are multiples of ``patch_size`` use a bicubically resized grid.
        patch_size: 16.
        in_chans: image channels (3).
        embed_dim: D (1024 for ViT-L).
        depth: blocks of the shallow ViT (2).
        num_heads, mlp_ratio: of the shallow ViT.
        mode: ``"hungarian"`` (paper), ``"greedy"`` or ``"merge"`` (Table 6).
        match_on: ``"x"`` (shallow-ViT outputs, Algorithm 1; default, see the
            module docstring) or ``"z"`` (patch embeddings + position, Eq. 3).
        fused_attn: SDPA (True) or the explicit attention maths.
    Forward:
        prompt_image, prompt_label, query_image: (B, in_chans, H, W)
        -> (B, N, D) fused query tokens, N = h*w, row-major over the (h, w) =
        :meth:`grid_size` grid (stride ``patch_size``).
    Attributes:
        last_perm: (B, N) int64 matching of the last forward (None for merge).

    The positional encoding is one learnable grid per quadrant of the 2x2
    grid-like image (order [pi, pl, qi, ql] = top-left, top-right,
    bottom-left, bottom-right), stored as ``pos_embed (1, 4, h0*w0, D)``; it
    also tells the shallow ViT which of the four token sets a token is in.
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 2, num_heads: int = 16, mlp_ratio: float = 4.0,
                 mode: Literal["hungarian", "greedy", "merge"] = "hungarian",
                 match_on: Literal["x", "z"] = "x", fused_attn: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if match_on not in ("x", "z"):
            raise ValueError(f"match_on must be 'x' (shallow-ViT outputs) or 'z' (patch embeddings), got {match_on!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.mode, self.match_on = embed_dim, mode, match_on
        g = img_size // patch_size
        self.base_grid = (g, g)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, g * g, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, fused_attn=fused_attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # Merge mode has no fusion Linear (an unused layer would never get a gradient).
        self.fuse = nn.Linear(4 * embed_dim, embed_dim) if mode != "merge" else None
        self.last_perm: torch.Tensor | None = None
        init_vit_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def grid_size(self, H: int, W: int) -> tuple[int, int]:
        """Token grid (h, w) = (H / patch, W / patch) of an H x W input."""
        p = self.patch_size
        if H % p or W % p or H <= 0 or W <= 0:
            raise ValueError(f"image size {H}x{W} must be a positive multiple of patch_size {p}")
        return H // p, W // p

    def pos_for(self, h: int, w: int) -> torch.Tensor:
        """Positional encodings of the four quadrants for an (h, w) grid: (4, h*w, D)."""
        return interpolate_pos_grid(self.pos_embed[0], self.base_grid, (h, w))

    def embed(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
              query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 1: Z = PatchEmbed(I) + P for pi, pl, qi, and [MASK] + P for ql; each (B, N, D)."""
        B, _, H, W = query_image.shape
        h, w = self.grid_size(H, W)
        # One conv over the three images stacked on the batch axis.
        z = self.patch_embed(torch.cat([prompt_image, prompt_label, query_image], dim=0))
        z = z.view(3, B, h * w, self.embed_dim)
        pos = self.pos_for(h, w).to(z.dtype)
        z_ql = (self.mask_token.to(z.dtype) + pos[3]).expand(B, -1, -1)
        return z[0] + pos[0], z[1] + pos[1], z[2] + pos[2], z_ql

    def encode(self, z_pi, z_pl, z_qi, z_ql) -> tuple[torch.Tensor, ...]:
        """Eq. 2: the shallow ViT over the concatenated four token sets; returns X_pi, X_pl, X_qi, X_ql."""
        n = z_pi.shape[1]
        x = torch.cat([z_pi, z_pl, z_qi, z_ql], dim=1)  # (B, 4N, D)
        for blk in self.blocks:
            x = blk(x)
        return tuple(self.norm(x).split(n, dim=1))

    def forward(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                query_image: torch.Tensor) -> torch.Tensor:
        check_vicl_inputs(prompt_image, prompt_label, query_image, self.in_chans, self.patch_size)
        z_pi, z_pl, z_qi, z_ql = self.embed(prompt_image, prompt_label, query_image)
        perm = None
        if self.mode != "merge" and self.match_on == "z":
            # Eq. 3: the matching needs only Z, so it is issued before the ViT blocks.
            perm = match_tokens(z_pi, z_qi, self.mode)
        x_pi, x_pl, x_qi, x_ql = self.encode(z_pi, z_pl, z_qi, z_ql)
        fused, perm = retrieve_and_propagate(
            x_pi, x_pl, x_qi, x_ql,
            None if self.fuse is None else self.fuse.weight,
            None if self.fuse is None else self.fuse.bias,
            mode=self.mode, perm=perm, return_perm=True)
        self.last_perm = perm
        return fused


# ----------------------------------------------------------------------------- RandP with a ViT backbone

class RandPViT(VICL2DModel):
    """RandP with a ViT backbone and the pixel decoder (Fig. 3 (1) + (2)).

    Args:
        img_size, patch_size, in_chans: input geometry (256, 16, 3).
        out_chans: channels of the predicted query label (3).
        embed_dim, depth, num_heads, mlp_ratio: ViT backbone (ViT-L/16: 1024, 24, 16, 4).
        fusion_depth: blocks of the shallow ViT in the RandP module (2).
        fusion_mode: ``"hungarian"`` | ``"greedy"`` | ``"merge"``.
        match_on: ``"x"`` (default) | ``"z"``.
        num_tasks: classes of the task head (4: segmentation, denoising,
            super-resolution, PET synthesis); 0 disables it.
        decoder_dim: channels of the pixel decoder (64).
        out_indices: backbone blocks feeding the decoder (default 4 evenly spaced).
        grad_checkpointing: activation checkpointing in the backbone.
    Forward:
        (prompt_image, prompt_label, query_image) each (B, in_chans, H, W) -> (B, out_chans, H, W);
        :meth:`forward_with_logits` -> (pred, logits (B, num_tasks) | None).
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, out_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 fusion_depth: int = 2, fusion_mode: str = "hungarian", match_on: str = "x",
                 num_tasks: int = 4, decoder_dim: int = 64, out_indices: Sequence[int] | None = None,
                 fused_attn: bool = True, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.size_divisor = patch_size
        self.img_size = img_size
        self.fusion = RandPFusion(img_size, patch_size, in_chans, embed_dim, fusion_depth, num_heads, mlp_ratio,
                                  mode=fusion_mode, match_on=match_on, fused_attn=fused_attn)
        self.backbone = ViTBlocks(embed_dim, depth, num_heads, mlp_ratio, out_indices=out_indices,
                                  fused_attn=fused_attn, grad_checkpointing=grad_checkpointing)
        self.decoder = PixelDecoder(embed_dim, len(self.backbone.out_indices), patch_size, decoder_dim, out_chans)
        self.task_head = TaskHead(embed_dim, num_tasks) if num_tasks > 0 else None
        init_vit_weights(self.backbone)
        init_vit_weights(self.decoder)
        if self.task_head is not None:
            init_vit_weights(self.task_head)

    def forward_with_logits(self, prompt_image, prompt_label, query_image):
        _, H, W = self.check_inputs(prompt_image, prompt_label, query_image)
        fused = self.fusion(prompt_image, prompt_label, query_image)  # (B, N, D)
        feats = self.backbone(fused)
        pred = self.decoder(feats, self.fusion.grid_size(H, W))
        # Task logits from the last block's (normed) tokens.
        logits = self.task_head(feats[-1]) if self.task_head is not None else None
        return pred, logits


def _randp_vit(preset: dict, **kwargs) -> RandPViT:
    cfg = dict(preset)
    cfg.update(kwargs)
    return RandPViT(**cfg)


@register_model
def randp_vit_l(**kwargs) -> RandPViT:
    """RandP, ViT-L/16 backbone (24 x 1024, 16 heads), 2-block RandP module, 256 x 256 inputs (the paper)."""
    return _randp_vit(dict(embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def randp_vit_b(**kwargs) -> RandPViT:
    """RandP, ViT-B/16 backbone (12 x 768, 12 heads)."""
    return _randp_vit(dict(embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def randp_vit_s(**kwargs) -> RandPViT:
    """RandP, ViT-S/16 backbone (12 x 384, 6 heads)."""
    return _randp_vit(dict(embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def randp_vit_tiny(**kwargs) -> RandPViT:
    """Tiny RandP for tests: 4 x 32, 2 heads, decoder 8 channels, 32 x 32 inputs."""
    return _randp_vit(dict(embed_dim=32, depth=4, num_heads=2, decoder_dim=8, img_size=32), **kwargs)
