"""MAE-based vICL baselines of RandP's Table 2: PromptGIP-style and MAE-VQGAN-style layouts.

Both are masked autoencoders (He et al. 2022): a ViT-L/16 encoder (24 x 1024,
16 heads) on the *visible* tokens plus a class token, then a light decoder
(8 x 512, 16 heads) over all tokens with a learnable mask token in the masked
positions, fixed sin-cos positional encodings. They differ in the layout and
the output:

* **PromptGIP** (Liu et al. 2024, lyh-18/PromptGIP ``models_mae_PromptGIP_CNN_Head``):
  the four 256 x 256 images [prompt image, prompt label, query image, query
  label] are patch-embedded separately and concatenated into ONE sequence of
  4 x 256 = 1024 tokens (1D sinusoid positions over the whole sequence) plus
  the class token. The decoder regresses 16 x 16 x 3 pixels per token; the
  unpatchified label image goes through PromptGIP's small CNN head
  (``Simple_Head``: conv3x3 3->64, LReLU, conv3x3 64->64, LReLU, conv3x3 64->3).
  Training masks 75% of the tokens of the two label images (``forward_mim``),
  L1 loss on the CNN-head outputs, as upstream.
* **MAE-VQGAN** (Bar et al. 2022, amirbar/visual_prompting ``models_mae``): the
  2x2 grid canvas (512 x 512: pi | pl / qi | ql), 32 x 32 = 1024 tokens, 2D
  sin-cos positions. The decoder predicts, per patch, logits over the 1024
  codes of a VQGAN codebook (cross-entropy against the VQGAN encoder's codes);
  the chosen codes are decoded to pixels by the frozen VQGAN decoder.
  Training: MAE random masking (75%) over the whole canvas.

**VQGAN stand-in.** The real tokenizer (taming-transformers VQGAN f16, 1024
codes of dim 256, ImageNet weights fine-tuned on the task data) is not
bundled: :class:`VQGANStandIn` is a small, frozen, randomly initialised conv
encoder/decoder with the same interface and code geometry (stride 16, 1024 x
256 codebook). It makes the layout run end to end; its pixels are meaningless
until real VQGAN weights are loaded into a real VQGAN, and its cost (about
1.7 GMACs per 256 x 256 image) is far below the real decoder's. Table 2
compares the transformer, which is exact here.

Inference ("standard", the vICL setting): prompt pair and query image fully
visible, the whole query label masked, so the encoder sees 3 x 256 visible
tokens + class token (MAE behaviour, as both upstream codes do at test time).
``encoder_mask_tokens=True`` instead feeds the masked positions to the encoder
as a learnable mask token (SimMIM/Painter style, 1024 + 1 encoder tokens);
that variant is what "the transformer at 1024 tokens" (~400 GMACs) refers to
in the notes on the paper's 664 / 670 G, which neither layout reproduces.

Both: ``forward(prompt_image, prompt_label, query_image) -> (B, 3, H, W)``
(the predicted query label), ``forward_with_logits -> (pred, task logits or None)``
(``num_tasks=0`` by default: the baselines have no task head), ``last_task_logits``.
MAE-VQGAN also keeps the code logits of the last forward in ``last_code_logits``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.models.randp import TaskHead, VICL2DModel
from vicl_fast.models.registry import register_model
from vicl_fast.models.vit import Block, PatchEmbed, init_vit_weights

__all__ = [
    "sincos_1d", "sincos_2d", "MAEEncoderDecoder", "PromptGIPViT", "MAEVQGANViT", "VQGANStandIn",
    "PromptGIPHead", "promptgip_vit_l", "promptgip_vit_tiny", "mae_vqgan_vit_l", "mae_vqgan_vit_tiny",
]


# ----------------------------------------------------------------------------- positions

def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoid table (L, dim): even channels sin, odd channels cos (PromptGIP's table)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.empty(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """MAE's 2D sin-cos table (h*w, dim), row-major: half the channels encode the row, half the column.

    Channel layout as MAE's ``get_2d_sincos_pos_embed``: [sin(w*ω), cos(w*ω)] for
    the column coordinate then the same for the row, ω = 1 / 10000^(k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")

    def enc(coord: torch.Tensor) -> torch.Tensor:
        out = coord.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([enc(gx), enc(gy)], dim=1).float()


# ----------------------------------------------------------------------------- shared MAE core

class MAEEncoderDecoder(nn.Module):
    """MAE encoder (visible tokens + class token) and decoder (all tokens).

    Args:
        embed_dim, depth, num_heads: encoder (ViT-L: 1024, 24, 16).
        decoder_dim, decoder_depth, decoder_heads: decoder (512, 8, 16).
        out_dim: per-token output of ``decoder_pred`` (16*16*3 pixels or 1024 code logits).
        mlp_ratio: 4.
        encoder_mask_tokens: masked positions enter the encoder as a learnable
            mask token instead of being dropped.
    Forward:
        tokens (B, L, D) patch embeddings (no positions; masked entries are ignored),
        enc_pos (L, D), dec_pos (L, Dd) fixed positions, cls_pos (D,), dec_cls_pos (Dd,),
        ids_keep (B, K) visible token indices (ascending), ids_out (M,) or (B, M)
        positions to predict -> (B, M, out_dim).
    """

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, out_dim: int = 768, mlp_ratio: float = 4.0,
                 encoder_mask_tokens: bool = False, fused_attn: bool = True) -> None:
        super().__init__()
        self.encoder_mask_tokens = encoder_mask_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if encoder_mask_tokens else None
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, fused_attn=fused_attn)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio, fused_attn=fused_attn)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, out_dim)
        init_vit_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.enc_mask_token is not None:
            nn.init.normal_(self.enc_mask_token, std=0.02)

    def encode(self, tokens: torch.Tensor, enc_pos: torch.Tensor, cls_pos: torch.Tensor,
               ids_keep: torch.Tensor) -> torch.Tensor:
        """-> (B, 1 + K, D) encoder output (K = visible tokens, or L with encoder mask tokens)."""
        B, L, D = tokens.shape
        x = tokens + enc_pos.to(tokens.dtype)
        if self.enc_mask_token is not None:
            visible = torch.zeros(B, L, dtype=torch.bool, device=tokens.device)
            visible.scatter_(1, ids_keep, True)
            masked_tok = (self.enc_mask_token.to(x.dtype) + enc_pos.to(x.dtype)).expand(B, -1, -1)
            x = torch.where(visible[..., None], x, masked_tok)
        else:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, D))
        cls = (self.cls_token + cls_pos.to(self.cls_token.dtype)).to(x.dtype).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decode(self, latent: torch.Tensor, dec_pos: torch.Tensor, dec_cls_pos: torch.Tensor,
               ids_keep: torch.Tensor, L: int, ids_out: torch.Tensor) -> torch.Tensor:
        """-> (B, M, out_dim) predictions at ``ids_out``."""
        x = self.decoder_embed(latent)
        B, _, C = x.shape
        cls, body = x[:, :1], x[:, 1:]
        if self.enc_mask_token is not None:
            full = body  # the encoder ran on all L positions already
            visible = torch.zeros(B, L, dtype=torch.bool, device=x.device)
            visible.scatter_(1, ids_keep, True)
            full = torch.where(visible[..., None], full, self.mask_token.to(x.dtype).expand(B, L, -1))
        else:
            # MAE: mask tokens everywhere, visible tokens scattered back to their positions.
            full = self.mask_token.to(x.dtype).expand(B, L, C).scatter(1, ids_keep[..., None].expand(-1, -1, C), body)
        full = full + dec_pos.to(x.dtype)
        x = torch.cat([cls + dec_cls_pos.to(x.dtype), full], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, 1:]
        if ids_out.dim() == 1:
            x = x.index_select(1, ids_out)
        else:
            x = x.gather(1, ids_out[..., None].expand(-1, -1, x.shape[-1]))
        # Only the positions asked for are projected (the others would be discarded).
        return self.decoder_pred(x)


def random_keep(B: int, candidates: torch.Tensor, always: torch.Tensor, mask_ratio: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE random masking restricted to ``candidates``: returns (ids_keep (B, K) ascending, masked (B, M)).

    ``always`` positions are kept; ``round(len(candidates) * (1 - mask_ratio))``
    random candidates are kept per sample, the rest masked.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n = candidates.numel()
    n_keep = int(round(n * (1.0 - mask_ratio)))
    noise = torch.rand(B, n, generator=generator).to(candidates.device)
    order = noise.argsort(dim=1)
    keep_c = candidates[order[:, :n_keep]]
    masked = candidates[order[:, n_keep:]].sort(dim=1).values
    keep = torch.cat([always.expand(B, -1), keep_c], dim=1).sort(dim=1).values
    return keep, masked


# ----------------------------------------------------------------------------- PromptGIP

class PromptGIPHead(nn.Module):
    """PromptGIP's ``Simple_Head`` (scale 1): conv3x3 c->nf, LReLU(0.1), conv3x3 nf->nf, LReLU, conv3x3 nf->c."""

    def __init__(self, in_chans: int = 3, out_chans: int = 3, nf: int = 64) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(in_chans, nf, 3, padding=1)
        self.hr_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, out_chans, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.act(self.hr_conv(self.act(self.conv_first(x)))))


def unpatchify(x: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """(B, h*w, p*p*c) -> (B, c, h*p, w*p) ("B (h w) (p q c) -> B c (h p) (w q)", MAE's order)."""
    B = x.shape[0]
    return x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, h * p, w * p)


class _PatchMAEModel(VICL2DModel):
    """What PromptGIP- and MAE-VQGAN-style models share: patch embedding + MAE encoder-decoder
    whose decoder predicts ``out_dim`` values per patch (pixels or VQGAN code logits)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, out_chans: int, embed_dim: int,
                 depth: int, num_heads: int, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 out_dim: int, mlp_ratio: float, encoder_mask_tokens: bool, fused_attn: bool) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.size_divisor = in_chans, out_chans, patch_size
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.decoder_dim = embed_dim, decoder_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        init_vit_weights(self.patch_embed)
        self.mae = MAEEncoderDecoder(embed_dim, depth, num_heads, decoder_dim, decoder_depth, decoder_heads,
                                     out_dim, mlp_ratio, encoder_mask_tokens, fused_attn)


class PromptGIPViT(_PatchMAEModel):
    """PromptGIP-style vICL model (see the module docstring).

    Args:
        img_size: size of each of the four images (256); patch_size 16; in/out chans 3.
        embed_dim, depth, num_heads: encoder (ViT-L); decoder_dim, decoder_depth, decoder_heads: 512, 8, 16.
        head_dim: channels of the CNN head (64).
        encoder_mask_tokens: see the module docstring (False: MAE, upstream).
        num_tasks: optional task head on the encoder's class token (0: none).
    Forward:
        (prompt_image, prompt_label, query_image) (B, C, H, W) -> (B, out_chans, H, W).
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, out_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, mlp_ratio: float = 4.0, head_dim: int = 64,
                 encoder_mask_tokens: bool = False, num_tasks: int = 0, fused_attn: bool = True) -> None:
        super().__init__(img_size, patch_size, in_chans, out_chans, embed_dim, depth, num_heads, decoder_dim,
                         decoder_depth, decoder_heads, patch_size * patch_size * out_chans, mlp_ratio,
                         encoder_mask_tokens, fused_attn)
        self.head = PromptGIPHead(out_chans, out_chans, head_dim)
        self.task_head = TaskHead(embed_dim, num_tasks) if num_tasks > 0 else None
        self._pos_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """1D sinusoid tables over [cls, 4 x n tokens] for encoder (1+4n, D) and decoder (1+4n, Dd)."""
        key = (n, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = (sincos_1d(1 + 4 * n, self.embed_dim).to(device),
                                    sincos_1d(1 + 4 * n, self.decoder_dim).to(device))
        return self._pos_cache[key]

    def _tokens(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Embed k images (B, C, H, W) each -> (B, k*n, D) in sequence order (one conv call)."""
        B = images[0].shape[0]
        z = self.patch_embed(torch.cat(images, dim=0))  # (k*B, n, D)
        k, n = len(images), z.shape[1]
        return z.view(k, B, n, -1).permute(1, 0, 2, 3).reshape(B, k * n, -1)

    def _run(self, tokens: torch.Tensor, n: int, ids_keep: torch.Tensor, ids_out: torch.Tensor):
        enc_pos, dec_pos = self.positions(n, tokens.device)
        latent = self.mae.encode(tokens, enc_pos[1:], enc_pos[0], ids_keep)
        pred = self.mae.decode(latent, dec_pos[1:], dec_pos[0], ids_keep, 4 * n, ids_out)
        logits = self.task_head(latent[:, :1]) if self.task_head is not None else None
        return pred, logits

    def forward_with_logits(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                            query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, H, W = self.check_inputs(prompt_image, prompt_label, query_image)
        h, w, p = H // self.patch_size, W // self.patch_size, self.patch_size
        n = h * w
        dev = query_image.device
        z = self._tokens([prompt_image, prompt_label, query_image])  # (B, 3n, D)
        # The query label is fully masked: its n positions are never embedded.
        tokens = torch.cat([z, z.new_zeros(B, n, z.shape[-1])], dim=1)
        ids_keep = torch.arange(3 * n, device=dev).expand(B, -1)
        ids_out = torch.arange(3 * n, 4 * n, device=dev)
        pred, logits = self._run(tokens, n, ids_keep, ids_out)
        img = unpatchify(pred, h, w, p, self.out_chans)
        return self.head(img), logits

    def forward_mim(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor, query_image: torch.Tensor,
                    query_label: torch.Tensor, mask_ratio: float = 0.75,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """PromptGIP training step: mask ``mask_ratio`` of the two label images' tokens.

        Returns a dict with ``pred_prompt_label``, ``pred_query_label`` (B, C, H, W)
        (CNN-head outputs), ``masked`` (B, M) masked positions, and ``loss`` =
        L1(pred_pl, pl) + L1(pred_ql, ql) (upstream's loss).
        """
        B, H, W = self.check_inputs(prompt_image, prompt_label, query_image)
        if query_label.shape != query_image.shape:
            raise ValueError(f"query_label {tuple(query_label.shape)} must have the shape of query_image "
                             f"{tuple(query_image.shape)}")
        h, w, p = H // self.patch_size, W // self.patch_size, self.patch_size
        n = h * w
        dev = query_image.device
        tokens = self._tokens([prompt_image, prompt_label, query_image, query_label])
        ar = torch.arange(4 * n, device=dev)
        always = torch.cat([ar[:n], ar[2 * n:3 * n]])
        cand = torch.cat([ar[n:2 * n], ar[3 * n:]])
        ids_keep, masked = random_keep(B, cand, always, mask_ratio, generator)
        ids_out = torch.cat([ar[n:2 * n], ar[3 * n:]])
        pred, _ = self._run(tokens, n, ids_keep, ids_out)
        pred_pl = self.head(unpatchify(pred[:, :n], h, w, p, self.out_chans))
        pred_ql = self.head(unpatchify(pred[:, n:], h, w, p, self.out_chans))
        loss = F.l1_loss(pred_pl, prompt_label.to(pred_pl.dtype)) + F.l1_loss(pred_ql, query_label.to(pred_ql.dtype))
        return {"pred_prompt_label": pred_pl, "pred_query_label": pred_ql, "masked": masked, "loss": loss}


# ----------------------------------------------------------------------------- MAE-VQGAN

class VQGANStandIn(nn.Module):
    """Small frozen stand-in for the taming VQGAN f16 tokenizer (NOT the real VQGAN; see module docstring).

    Same interface and geometry: ``encode_codes(img (B, C, H, W)) -> (B, (H/16)*(W/16))``
    int64 codes (nearest of ``num_codes`` codebook vectors of ``code_dim``), and
    ``decode_codes`` / ``decode_embeddings`` ``(B, h*w, ...) -> (B, C, 16h, 16w)``.
    Encoder: 4 x (conv3x3 stride 2 + GELU), widths 32/64/128/code_dim;
    decoder: 1x1, then 4 x (nearest x2 + conv3x3 + GELU), widths 128/64/32/32,
    conv3x3 to C. Randomly initialised and frozen (``requires_grad=False``).
    """

    def __init__(self, in_chans: int = 3, num_codes: int = 1024, code_dim: int = 256,
                 widths: tuple[int, int, int, int] = (32, 64, 128, 32)) -> None:
        super().__init__()
        a, b, c, d = widths
        self.num_codes, self.code_dim = num_codes, code_dim
        self.codebook = nn.Embedding(num_codes, code_dim)
        enc: list[nn.Module] = []
        for cin, cout in ((in_chans, a), (a, b), (b, c), (c, code_dim)):
            enc += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
        self.encoder = nn.Sequential(*enc[:-1])
        dec: list[nn.Module] = [nn.Conv2d(code_dim, c, 1)]
        for cin, cout in ((c, c), (c, b), (b, a), (a, d)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), nn.GELU()]
        dec.append(nn.Conv2d(d, in_chans, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.requires_grad_(False)

    @torch.no_grad()
    def encode_codes(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, h*w) nearest-codebook indices (row-major)."""
        z = self.encoder(img.float()).flatten(2).transpose(1, 2)  # (B, h*w, code_dim)
        d = torch.cdist(z, self.codebook.weight.float()[None])     # (B, h*w, num_codes)
        return d.argmin(dim=-1)

    def decode_embeddings(self, emb: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, code_dim) -> (B, C, 16h, 16w)."""
        B = emb.shape[0]
        return self.decoder(emb.transpose(1, 2).reshape(B, self.code_dim, h, w))

    def decode_codes(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w) int codes -> (B, C, 16h, 16w)."""
        return self.decode_embeddings(self.codebook(codes), h, w)


class MAEVQGANViT(_PatchMAEModel):
    """MAE-VQGAN-style vICL model on the 2x2 canvas (see the module docstring).

    Args:
        img_size: size of each image (256; canvas 2*img_size); patch_size 16; in/out chans 3.
        embed_dim, depth, num_heads: encoder (ViT-L); decoder_dim, decoder_depth, decoder_heads: 512, 8, 16.
        num_codes, code_dim: VQGAN codebook (1024 x 256).
        encoder_mask_tokens: see the module docstring (False: MAE, upstream).
        num_tasks: optional task head on the encoder's class token (0: none).
    Forward:
        (prompt_image, prompt_label, query_image) (B, C, H, W) -> (B, out_chans, H, W),
        the VQGAN (stand-in) decoding of the argmax codes. The decoded pixels
        carry a straight-through gradient (softmax of the code logits) so the
        unified training API works; the upstream objective is :meth:`code_loss`.
    Attributes:
        last_code_logits: (B, h*w, num_codes) code logits of the query-label quadrant.
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, out_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, mlp_ratio: float = 4.0, num_codes: int = 1024,
                 code_dim: int = 256, vqgan_widths: tuple[int, int, int, int] = (32, 64, 128, 32),
                 encoder_mask_tokens: bool = False, num_tasks: int = 0, fused_attn: bool = True) -> None:
        if patch_size != 16:
            raise ValueError(f"MAE-VQGAN pairs one ViT patch with one VQGAN f16 code: patch_size must be 16, "
                             f"got {patch_size}")
        if out_chans != in_chans:
            raise ValueError("the VQGAN decodes images with the input's channels: out_chans must equal in_chans")
        super().__init__(img_size, patch_size, in_chans, out_chans, embed_dim, depth, num_heads, decoder_dim,
                         decoder_depth, decoder_heads, num_codes, mlp_ratio, encoder_mask_tokens, fused_attn)
        self.vqgan = VQGANStandIn(in_chans, num_codes, code_dim, vqgan_widths)
        self.task_head = TaskHead(embed_dim, num_tasks) if num_tasks > 0 else None
        self.last_code_logits: torch.Tensor | None = None
        self._pos_cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D sin-cos over the (2h, 2w) canvas with a zero class-token row: (1+4hw, D), (1+4hw, Dd)."""
        key = (h, w, str(device))
        if key not in self._pos_cache:
            def table(d: int) -> torch.Tensor:
                return torch.cat([torch.zeros(1, d), sincos_2d(2 * h, 2 * w, d)], dim=0).to(device)
            self._pos_cache[key] = (table(self.embed_dim), table(self.decoder_dim))
        return self._pos_cache[key]

    @staticmethod
    def quadrant_ids(h: int, w: int, q: int, device: torch.device | None = None) -> torch.Tensor:
        """Canvas token indices (row-major over 2h x 2w) of quadrant q (0 pi, 1 pl, 2 qi, 3 ql): (h*w,)."""
        r0, c0 = (q // 2) * h, (q % 2) * w
        rows = torch.arange(r0, r0 + h, device=device)[:, None]
        cols = torch.arange(c0, c0 + w, device=device)[None, :]
        return (rows * (2 * w) + cols).flatten()

    def _canvas_tokens(self, images: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Embed the quadrant images and lay their tokens out in canvas order: (B, 4hw, D).

        Patches never straddle a quadrant border (H, W multiples of 16), so this
        equals patch-embedding the 2H x 2W canvas; missing quadrants are zeros.
        """
        B = images[0].shape[0]
        z = self.patch_embed(torch.cat(images, dim=0)).view(len(images), B, h, w, -1)
        if len(images) == 3:
            z = torch.cat([z, z.new_zeros(1, B, h, w, z.shape[-1])], dim=0)
        top = torch.cat([z[0], z[1]], dim=2)      # (B, h, 2w, D): pi | pl
        bottom = torch.cat([z[2], z[3]], dim=2)   # qi | ql
        return torch.cat([top, bottom], dim=1).reshape(B, 4 * h * w, -1)

    def _run(self, tokens: torch.Tensor, h: int, w: int, ids_keep: torch.Tensor, ids_out: torch.Tensor):
        enc_pos, dec_pos = self.positions(h, w, tokens.device)
        latent = self.mae.encode(tokens, enc_pos[1:], enc_pos[0], ids_keep)
        pred = self.mae.decode(latent, dec_pos[1:], dec_pos[0], ids_keep, 4 * h * w, ids_out)
        logits = self.task_head(latent[:, :1]) if self.task_head is not None else None
        return pred, logits

    def forward_with_logits(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor,
                            query_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, H, W = self.check_inputs(prompt_image, prompt_label, query_image)
        h, w = H // self.patch_size, W // self.patch_size
        dev = query_image.device
        tokens = self._canvas_tokens([prompt_image, prompt_label, query_image], h, w)
        ql = self.quadrant_ids(h, w, 3, dev)
        # Visible = quadrants pi, pl, qi in canvas order (no data-dependent nonzero: fake/compile friendly).
        ids_keep = torch.cat([self.quadrant_ids(h, w, q, dev) for q in range(3)]).sort().values.expand(B, -1)
        code_logits, task_logits = self._run(tokens, h, w, ids_keep, ql)  # (B, hw, num_codes)
        self.last_code_logits = code_logits
        # Straight-through: the forward value is the argmax code's embedding (upstream inference),
        # the gradient that of the softmax expectation.
        probs = code_logits.float().softmax(dim=-1)
        hard = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        weights = hard + probs - probs.detach()
        emb = weights @ self.vqgan.codebook.weight.float()
        img = self.vqgan.decode_embeddings(emb.to(self.vqgan.codebook.weight.dtype), h, w)
        return img.to(query_image.dtype), task_logits

    def code_loss(self, code_logits: torch.Tensor, target_image: torch.Tensor,
                  positions_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream objective: CE between code logits (B, M, K) and the VQGAN codes of ``target_image``.

        ``target_image`` (B, C, H', W') with M = (H'/16)*(W'/16) codes;
        ``positions_mask`` (B, M) float/bool restricts the mean to masked patches.
        """
        codes = self.vqgan.encode_codes(target_image)
        if codes.shape != code_logits.shape[:2]:
            raise ValueError(f"target_image gives {tuple(codes.shape)} codes, logits are for "
                             f"{tuple(code_logits.shape[:2])} positions")
        ce = F.cross_entropy(code_logits.float().transpose(1, 2), codes, reduction="none")
        if positions_mask is None:
            return ce.mean()
        m = positions_mask.to(ce.dtype)
        return (ce * m).sum() / m.sum().clamp_min(1.0)

    def forward_mim(self, prompt_image: torch.Tensor, prompt_label: torch.Tensor, query_image: torch.Tensor,
                    query_label: torch.Tensor, mask_ratio: float = 0.75,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """MAE-VQGAN training step: MAE random masking over the whole canvas, CE on the masked codes.

        Returns ``code_logits`` (B, 4hw, K), ``masked`` (B, 4hw) bool and ``loss``.
        """
        B, H, W = self.check_inputs(prompt_image, prompt_label, query_image)
        if query_label.shape != query_image.shape:
            raise ValueError(f"query_label {tuple(query_label.shape)} must have the shape of query_image "
                             f"{tuple(query_image.shape)}")
        h, w = H // self.patch_size, W // self.patch_size
        L = 4 * h * w
        dev = query_image.device
        tokens = self._canvas_tokens([prompt_image, prompt_label, query_image, query_label], h, w)
        ar = torch.arange(L, device=dev)
        ids_keep, masked_ids = random_keep(B, ar, ar[:0], mask_ratio, generator)
        logits, _ = self._run(tokens, h, w, ids_keep, ar)
        masked = torch.zeros(B, L, dtype=torch.bool, device=dev)
        masked.scatter_(1, masked_ids, True)
        canvas = torch.cat([torch.cat([prompt_image, prompt_label], 3), torch.cat([query_image, query_label], 3)], 2)
        loss = self.code_loss(logits, canvas, masked)
        return {"code_logits": logits, "masked": masked, "loss": loss}


# ----------------------------------------------------------------------------- registry

def _cfg(defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(defaults)
    cfg.update(kwargs)
    return cfg


_VIT_L = dict(embed_dim=1024, depth=24, num_heads=16, decoder_dim=512, decoder_depth=8, decoder_heads=16)
_TINY = dict(embed_dim=32, depth=2, num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2, img_size=32)


@register_model
def promptgip_vit_l(**kwargs: Any) -> PromptGIPViT:
    """PromptGIP-style: MAE ViT-L/16 encoder + 8 x 512 decoder + CNN head, 4 x 256 tokens + class token."""
    return PromptGIPViT(**_cfg(_VIT_L, kwargs))


@register_model
def promptgip_vit_tiny(**kwargs: Any) -> PromptGIPViT:
    """Tiny PromptGIP for tests: encoder 2 x 32, decoder 1 x 16, head 8 channels, 32 x 32 inputs."""
    return PromptGIPViT(**_cfg(dict(_TINY, head_dim=8), kwargs))


@register_model
def mae_vqgan_vit_l(**kwargs: Any) -> MAEVQGANViT:
    """MAE-VQGAN-style: 2x2 canvas, MAE ViT-L/16 + 8 x 512 decoder -> 1024 VQGAN codes (stand-in VQGAN)."""
    return MAEVQGANViT(**_cfg(_VIT_L, kwargs))


@register_model
def mae_vqgan_vit_tiny(**kwargs: Any) -> MAEVQGANViT:
    """Tiny MAE-VQGAN for tests: encoder 2 x 32, decoder 1 x 16, 64 codes of 16, 32 x 32 inputs."""
    return MAEVQGANViT(**_cfg(dict(_TINY, num_codes=64, code_dim=16, vqgan_widths=(8, 8, 8, 8)), kwargs))
