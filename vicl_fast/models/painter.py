"""Painter / MVG baseline (Wang et al. 2023; Ren et al. 2024), re-implemented on our ViT layers.

Painter's mechanism (peers.md): an *image canvas* and a *label canvas* are
embedded separately (one shared patch embedding, each stream with its own
segment token, both with the positional encoding), run as a doubled batch
through blocks 0..``merge_idx`` (0-2), merged by an element-wise average
``(x + y) / 2`` ("patch merging"), then the remaining blocks run on the merged
canvas; prompt and query interact only through global self-attention. The head
is Painter's: features of blocks 5/11/17/23 (LayerNorm-ed) concatenated to 4D
-> Linear(4D -> 16*16*64) -> conv3x3(64) + LN + GELU -> conv1x1(3)
(:class:`vicl_fast.models.vit.PixelDecoder`).

Layouts (``layout=``):

* ``"grid"`` (default): the 512 x 512 2x2 grid-like image of the RandP paper
  (top-left pi, top-right pl, bottom-left qi, bottom-right ql), 1024 tokens for
  256 x 256 inputs. The image stream holds the images in the left column and
  blank (zero) pixels in the right column; the label stream holds the labels in
  the right column and blank pixels in the left column. With the query-label
  quadrant decoded only at inference, ViT-L/16 costs 24 blocks x 1024 tokens
  + 3 blocks for the doubled stream + the head on 256 tokens
  = 360.8 + 45.1 + 19.6 ~ 425.5 GMACs, in line with the paper's 429 G.
* ``"vertical"``: Painter's own geometry: image canvas [pi; qi], label canvas
  [pl; ql] (2N tokens); image and label of a pair share a token position.

Masking. Training (``model.train()`` with ``query_label``) masks random blocks
(BEiT block masking) of the label stream: ``mask_scope="labels"`` (Painter: a
``mask_ratio`` = 50% of the label canvas, prompt label and query label alike)
or ``"query_label"`` (only the query-label quadrant). Masked label tokens are
replaced by the learnable mask token. Inference modes (Table 1, ``mode=``):

* ``"standard"``: prompt pair and query image fully visible, the whole query
  label masked (the real vICL setting; ``query_label`` not needed).
* ``"training_like"``: the training masking; the unmasked query-label patches
  show the ground truth (score only on ``last_mask``).
* ``"modified"``: the training masking, with the unmasked query-label patches
  replaced by black (zero) patches.

``forward`` returns the query-label quadrant ``(B, 3, H, W)``; ``last_mask``
``(B, h, w)`` holds which query-label patches were masked.
:meth:`PainterViT.training_loss` is Painter's loss: smooth-L1 (beta 0.01) on
the pixels of the masked label patches.
"""
from __future__ import annotations

import math
import random
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.randp import TaskHead, VICL2DModel, check_vicl_inputs
from vicl_fast.models.registry import register_model
from vicl_fast.models.vit import PatchEmbed, PixelDecoder, ViTBlocks, init_vit_weights, interpolate_pos_grid

__all__ = ["PainterViT", "block_mask", "INFERENCE_MODES", "painter_vit_l", "painter_vit_b", "painter_vit_tiny"]

INFERENCE_MODES = ("standard", "training_like", "modified")


def block_mask(batch: int, height: int, width: int, num_masked: int, *, min_patches: int = 4,
               min_aspect: float = 0.3, generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT-style random block masking (Painter's ``MaskingGenerator``).

    Rectangles of random area (>= ``min_patches``) and aspect ratio in
    [min_aspect, 1/min_aspect] are added until ``num_masked`` patches are
    masked; if the blocks cannot reach the count (tiny grids), random single
    patches complete it, so exactly ``num_masked`` patches are masked per sample.

    Args:
        batch, height, width: mask shape (B, h, w).
        num_masked: patches to mask per sample, in [0, h*w].
        generator: torch generator for reproducibility (default: the global RNG).
    Returns:
        (B, h, w) bool, True = masked.
    """
    n = height * width
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked must be in [0, {n}], got {num_masked}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = random.Random(seed)
    out = torch.zeros(batch, height, width, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for b in range(batch):
        m = out[b]
        count = 0
        while count < num_masked:
            left_to_mask = num_masked - count
            delta = 0
            if left_to_mask >= min_patches:
                for _ in range(10):
                    area = rng.uniform(min_patches, left_to_mask)
                    aspect = math.exp(rng.uniform(*log_aspect))
                    hh = int(round(math.sqrt(area * aspect)))
                    ww = int(round(math.sqrt(area / aspect)))
                    if 0 < hh <= height and 0 < ww <= width:
                        top, left = rng.randint(0, height - hh), rng.randint(0, width - ww)
                        patch = m[top:top + hh, left:left + ww]
                        new = int((~patch).sum())
                        if 0 < new <= left_to_mask:
                            patch.fill_(True)
                            delta = new
                            break
            if delta == 0:  # blocks no longer fit: finish with random single patches
                free = (~m).flatten().nonzero().flatten().tolist()
                for idx in rng.sample(free, left_to_mask):
                    m.view(-1)[idx] = True
                delta = left_to_mask
            count += delta
    return out


class PainterViT(VICL2DModel):
    """Painter/MVG-style vICL model (see the module docstring).

    Args:
        img_size: size of each of the four images (256); the canvas is 2x2 (grid) or 2x1 (vertical).
        patch_size, in_chans, out_chans: 16, 3, 3.
        embed_dim, depth, num_heads, mlp_ratio: ViT-L/16 by default.
        merge_idx: last block run on the doubled (image, label) batch (2).
        out_indices: blocks feeding the head (default evenly spaced: 5/11/17/23).
        decoder_dim: 64.
        layout: ``"grid"`` | ``"vertical"``.
        mask_ratio: fraction of the masked region masked in training (0.5).
        mask_scope: ``"labels"`` (both label quadrants, Painter) | ``"query_label"``.
        num_tasks: optional task head on the final tokens (0: none, as in Painter).
    Forward:
        (prompt_image, prompt_label, query_image) (B, C, H, W), optional
        ``query_label`` (B, C, H, W), ``mode`` in :data:`INFERENCE_MODES`,
        ``mask`` (B, R, w) bool to force a mask over the masked region (R = 2h
        for ``"labels"``, h for ``"query_label"``) -> (B, out_chans, H, W).
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, out_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 merge_idx: int = 2, out_indices: Sequence[int] | None = None, decoder_dim: int = 64,
                 layout: Literal["grid", "vertical"] = "grid", mask_ratio: float = 0.5,
                 mask_scope: Literal["labels", "query_label"] = "labels", num_tasks: int = 0,
                 fused_attn: bool = True, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if layout not in ("grid", "vertical"):
            raise ValueError(f"layout must be 'grid' or 'vertical', got {layout!r}")
        if mask_scope not in ("labels", "query_label"):
            raise ValueError(f"mask_scope must be 'labels' or 'query_label', got {mask_scope!r}")
        if not 0 <= merge_idx < depth:
            raise ValueError(f"merge_idx must be in [0, {depth - 1}], got {merge_idx}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.in_chans, self.size_divisor = in_chans, patch_size
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.layout, self.merge_idx = layout, merge_idx
        self.mask_ratio, self.mask_scope = mask_ratio, mask_scope
        g = img_size // patch_size
        self.base_canvas = self._canvas_hw(g, g)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_canvas[0] * self.base_canvas[1], embed_dim))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.vit = ViTBlocks(embed_dim, depth, num_heads, mlp_ratio, out_indices=out_indices,
                             fused_attn=fused_attn, grad_checkpointing=grad_checkpointing)
        self.decoder = PixelDecoder(embed_dim, len(self.vit.out_indices), patch_size, decoder_dim, out_chans)
        self.task_head = TaskHead(embed_dim, num_tasks) if num_tasks > 0 else None
        self.last_mask: torch.Tensor | None = None
        init_vit_weights(self)
        for p in (self.pos_embed, self.segment_token_x, self.segment_token_y, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ geometry
    def _canvas_hw(self, h: int, w: int) -> tuple[int, int]:
        return (2 * h, 2 * w) if self.layout == "grid" else (2 * h, w)

    def _quadrant(self, t: torch.Tensor, h: int, w: int, which: str) -> torch.Tensor:
        """Tokens of quadrant ``which`` ('pl' or 'ql') of a canvas (B, CH*CW, D) -> (B, h*w, D)."""
        CH, CW = self._canvas_hw(h, w)
        g = t.reshape(t.shape[0], CH, CW, t.shape[-1])
        r0 = 0 if which == "pl" else h
        c0 = w if self.layout == "grid" else 0
        return g[:, r0:r0 + h, c0:c0 + w].reshape(t.shape[0], h * w, t.shape[-1])

    def _canvas(self, prompt: torch.Tensor, query: torch.Tensor, blank: torch.Tensor,
                label_stream: bool) -> torch.Tensor:
        """One stream's canvas from its prompt / query (B, h, w, D) token grids -> (B, CH*CW, D).

        Grid layout: the image stream fills the left column, the label stream
        the right column; the other column holds ``blank`` (a zero patch's embedding).
        """
        if self.layout == "vertical":
            g = torch.cat([prompt, query], dim=1)
        else:
            blanks = blank.expand_as(prompt)
            left_top, left_bot = (blanks, blanks) if label_stream else (prompt, query)
            right_top, right_bot = (prompt, query) if label_stream else (blanks, blanks)
            g = torch.cat([torch.cat([left_top, right_top], dim=2), torch.cat([left_bot, right_bot], dim=2)], dim=1)
        return g.flatten(1, 2)

    # ------------------------------------------------------------------ masks
    def _region_hw(self, h: int, w: int) -> tuple[int, int]:
        """Shape of the maskable label region: [pl; ql] (2h, w) or ql (h, w)."""
        return (2 * h, w) if self.mask_scope == "labels" else (h, w)

    def random_mask(self, batch: int, h: int, w: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training mask over the label region, (B, R, w) bool (see :func:`block_mask`)."""
        R, C = self._region_hw(h, w)
        return block_mask(batch, R, C, int(round(self.mask_ratio * R * C)), generator=generator)

    def _split_region(self, mask: torch.Tensor, h: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Region mask (B, R, w) -> (prompt-label mask (B, h, w) | None, query-label mask (B, h, w))."""
        if self.mask_scope == "labels":
            return mask[:, :h], mask[:, h:]
        return None, mask

    # ------------------------------------------------------------------ forward
    def forward_features(self, prompt_image, prompt_label, query_image, query_label=None,
                         mode: str | None = None, mask: torch.Tensor | None = None):
        """Run the ViT on the canvases.

        Returns:
            feats: list of (B, CH*CW, D) canvas features (the head's inputs),
            (h, w), region mask (B, R, w) bool (True = masked).
        """
        B, H, W = self.check_inputs(prompt_image, prompt_label, query_image)
        h, w = H // self.patch_size, W // self.patch_size
        if mode is None:
            mode = "training_like" if (self.training and query_label is not None) else "standard"
        if mode not in INFERENCE_MODES:
            raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
        if mode != "standard":
            if query_label is None:
                raise ValueError(f"mode={mode!r} shows part of the query label: pass query_label (B, C, H, W)")
            check_vicl_inputs(prompt_image, prompt_label, query_label, self.in_chans, self.size_divisor)
        R, C = self._region_hw(h, w)
        dev = query_image.device
        if mode == "standard":
            region = torch.zeros(B, R, C, dtype=torch.bool, device=dev)
            region[:, R - h:] = True  # the whole query-label quadrant; the prompt label stays visible
        elif mask is not None:
            if mask.shape != (B, R, C) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool (B, R, w) = ({B}, {R}, {C}) over the maskable label "
                                 f"region (mask_scope={self.mask_scope!r}), got {mask.dtype} {tuple(mask.shape)}")
            region = mask.to(dev)
        else:
            region = self.random_mask(B, h, w).to(dev)
        pl_mask, ql_mask = self._split_region(region, h)

        # One patch embedding for every image (Painter shares it between streams).
        imgs = [prompt_image, prompt_label, query_image]
        if mode == "training_like":
            imgs.append(query_label)
        elif mode == "modified":
            imgs.append(torch.zeros_like(query_label))  # the visible query-label patches turn black
        tok = self.patch_embed(torch.cat(imgs, dim=0)).reshape(len(imgs), B, h, w, self.embed_dim)
        blank = self.patch_embed.proj.bias.to(tok.dtype).view(1, 1, 1, -1)  # embedding of a zero patch
        mtok = self.mask_token.to(tok.dtype).view(1, 1, 1, -1)
        z_pl = tok[1] if pl_mask is None else torch.where(pl_mask[..., None], mtok, tok[1])
        z_ql = mtok.expand(B, h, w, -1) if mode == "standard" else torch.where(ql_mask[..., None], mtok, tok[3])

        pos = interpolate_pos_grid(self.pos_embed, self.base_canvas, self._canvas_hw(h, w)).to(tok.dtype)
        x = self._canvas(tok[0], tok[2], blank, label_stream=False) + self.segment_token_x.to(tok.dtype) + pos
        y = self._canvas(z_pl, z_ql, blank, label_stream=True) + self.segment_token_y.to(tok.dtype) + pos

        vit = self.vit
        t = torch.cat([x, y], dim=0)  # doubled batch until the merge
        feats: dict[int, torch.Tensor] = {}
        wanted = set(vit.out_indices)
        for i in range(max(max(vit.out_indices), self.merge_idx) + 1):
            t = vit.run_block(i, t)
            if i == self.merge_idx:
                t = (t[:B] + t[B:]) * 0.5  # Painter's patch merging
            if i in wanted:
                # A feature taken before the merge (only in shallow test configs) is the streams' average.
                feats[i] = vit.norm(t if i >= self.merge_idx else (t[:B] + t[B:]) * 0.5)
        return [feats[i] for i in vit.out_indices], (h, w), region

    def forward_with_logits(self, prompt_image, prompt_label, query_image, query_label=None,
                            mode: str | None = None, mask: torch.Tensor | None = None):
        feats, (h, w), region = self.forward_features(prompt_image, prompt_label, query_image,
                                                      query_label, mode, mask)
        self.last_mask = self._split_region(region, h)[1]
        pred = self.decoder([self._quadrant(f, h, w, "ql") for f in feats], (h, w))
        logits = self.task_head(feats[-1]) if self.task_head is not None else None
        return pred, logits

    def forward(self, prompt_image, prompt_label, query_image, query_label=None,
                mode: str | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        pred, logits = self.forward_with_logits(prompt_image, prompt_label, query_image, query_label, mode, mask)
        self.last_task_logits = logits
        return pred

    def training_loss(self, prompt_image, prompt_label, query_image, query_label,
                      mask: torch.Tensor | None = None, beta: float = 0.01) -> torch.Tensor:
        """Painter's MIM loss: smooth-L1 (``beta``) over the pixels of the masked label patches.

        Both label quadrants are decoded (one decoder call on a 2B batch) when
        ``mask_scope="labels"``, the query label only otherwise.
        """
        feats, (h, w), region = self.forward_features(prompt_image, prompt_label, query_image, query_label,
                                                      "training_like", mask)
        pl_mask, ql_mask = self._split_region(region, h)
        ql_feats = [self._quadrant(f, h, w, "ql") for f in feats]
        if pl_mask is None:
            dec_in, target, pmask = ql_feats, query_label, ql_mask
        else:
            dec_in = [torch.cat([self._quadrant(f, h, w, "pl"), q], 0) for f, q in zip(feats, ql_feats)]
            target = torch.cat([prompt_label, query_label], 0)
            pmask = torch.cat([pl_mask, ql_mask], 0)
        pred = self.decoder(dec_in, (h, w))
        p = self.patch_size
        pix = pmask[:, None].repeat_interleave(p, 2).repeat_interleave(p, 3).to(pred.dtype)  # (B', 1, H, W)
        err = F.smooth_l1_loss(pred, target.to(pred.dtype), reduction="none", beta=beta)
        return (err * pix).sum() / (pix.sum() * pred.shape[1]).clamp_min(1)


def _painter(preset: dict, **kwargs) -> PainterViT:
    cfg = dict(preset)
    cfg.update(kwargs)
    return PainterViT(**cfg)


@register_model
def painter_vit_l(**kwargs) -> PainterViT:
    """Painter/MVG-style baseline, ViT-L/16 on the 512 x 512 2x2 canvas (1024 tokens), merge after block 2."""
    return _painter(dict(embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def painter_vit_b(**kwargs) -> PainterViT:
    """Painter-style baseline with a ViT-B/16 (12 x 768, 12 heads)."""
    return _painter(dict(embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def painter_vit_tiny(**kwargs) -> PainterViT:
    """Tiny Painter for tests: 4 x 32, 2 heads, merge after block 1, 32 x 32 inputs."""
    return _painter(dict(embed_dim=32, depth=4, num_heads=2, merge_idx=1, decoder_dim=8, img_size=32), **kwargs)
