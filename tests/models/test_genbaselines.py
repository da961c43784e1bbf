"""PromptGIP-style and MAE-VQGAN-style baselines (vicl_fast/models/genbaselines.py).

References used here are independent of the code under test: MAE's NumPy
sin-cos tables (copied formulas of facebookresearch/mae ``pos_embed.py`` and
PromptGIP's ``get_sinusoid_encoding_table``), canvases built by concatenating
images, and the documented token counts of the two layouts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vicl_fast.models import create_model
from vicl_fast.models.genbaselines import MAEVQGANViT, PromptGIPViT, random_keep, sincos_1d, sincos_2d


def _imgs(B=2, S=32, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, S, S, generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- positions (NumPy references)

def _np_sinusoid_table(n_position, d_hid):  # PromptGIP / "Attention is all you need"
    def angle_vec(pos):
        return [pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)]

    table = np.array([angle_vec(p) for p in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


def _np_mae_2d(embed_dim, gh, gw):  # MAE get_2d_sincos_pos_embed (non-square grid)
    def from_grid_1d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    return np.concatenate([from_grid_1d(embed_dim // 2, grid[0]), from_grid_1d(embed_dim // 2, grid[1])], axis=1)


def test_sincos_tables_match_upstream_numpy():
    np.testing.assert_allclose(sincos_1d(37, 24).numpy(), _np_sinusoid_table(37, 24), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sincos_2d(4, 6, 16).numpy(), _np_mae_2d(16, 4, 6), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


# ----------------------------------------------------------------------------- PromptGIP

def _encoder_tokens(model, *args, method="forward"):
    seen = []
    h = model.mae.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    d = model.mae.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        out = getattr(model, method)(*args)
    finally:
        h.remove()
        d.remove()
    return out, seen


def test_promptgip_inference_layout_and_backward():
    m = create_model("promptgip_vit_tiny").train()
    pi, pl, qi = _imgs()
    n = (32 // 16) ** 2
    pred, seen = _encoder_tokens(m, pi, pl, qi)
    # encoder: class token + the 3 visible images; decoder: class token + all 4 images
    assert seen == [torch.Size([2, 1 + 3 * n, 32]), torch.Size([2, 1 + 4 * n, 16])]
    assert pred.shape == (2, 3, 32, 32) and torch.isfinite(pred).all()
    F.l1_loss(pred, torch.rand_like(pred)).backward()
    no_grad = [k for k, p in m.named_parameters() if p.grad is None]
    # the class token's output is dropped before decoder_pred, but it reaches the others through attention
    assert not no_grad, no_grad
    # the encoder-mask-token variant runs the encoder on all 4n positions
    m2 = create_model("promptgip_vit_tiny", encoder_mask_tokens=True).eval()
    with torch.no_grad():
        _, seen2 = _encoder_tokens(m2, pi, pl, qi)
    assert seen2[0] == torch.Size([2, 1 + 4 * n, 32])


def test_promptgip_sequence_order_is_pi_pl_qi_ql():
    m = create_model("promptgip_vit_tiny").eval()
    pi, pl, qi = _imgs()
    tok = m._tokens([pi, pl, qi])
    ref = torch.cat([m.patch_embed(x) for x in (pi, pl, qi)], dim=1)
    torch.testing.assert_close(tok, ref)


def test_promptgip_mim_masks_only_label_tokens_and_trains():
    torch.manual_seed(0)
    m = create_model("promptgip_vit_tiny").train()
    pi, pl, qi, ql = _imgs(n=4, S=64)
    n = (64 // 16) ** 2
    g = torch.Generator().manual_seed(1)
    (out, seen) = _encoder_tokens(m, pi, pl, qi, ql, 0.75, g, method="forward_mim")
    masked = out["masked"]
    labels = set(range(n, 2 * n)) | set(range(3 * n, 4 * n))
    assert masked.shape == (2, round(0.75 * 2 * n))
    assert all(set(row.tolist()) <= labels for row in masked)
    # visible: all of pi, qi + 25% of the labels, plus the class token
    assert seen[0] == torch.Size([2, 1 + 2 * n + (2 * n - masked.shape[1]), 32])
    assert out["pred_query_label"].shape == ql.shape
    expect = F.l1_loss(out["pred_prompt_label"], pl) + F.l1_loss(out["pred_query_label"], ql)
    torch.testing.assert_close(out["loss"], expect)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        opt.zero_grad()
        loss = m.forward_mim(pi, pl, qi, ql, generator=torch.Generator().manual_seed(step))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- MAE-VQGAN

def test_mae_vqgan_canvas_tokens_equal_patch_embedding_of_the_real_canvas():
    m = create_model("mae_vqgan_vit_tiny").eval()
    pi, pl, qi, ql = _imgs(n=4)
    h = w = 2
    canvas = torch.cat([torch.cat([pi, pl], 3), torch.cat([qi, ql], 3)], 2)  # (B, 3, 64, 64)
    torch.testing.assert_close(m._canvas_tokens([pi, pl, qi, ql], h, w), m.patch_embed(canvas))
    ids = torch.cat([MAEVQGANViT.quadrant_ids(h, w, q) for q in range(4)])
    assert torch.equal(ids.sort().values, torch.arange(16))
    assert MAEVQGANViT.quadrant_ids(h, w, 3).tolist() == [10, 11, 14, 15]


def test_mae_vqgan_forward_is_the_argmax_code_decoding_with_straight_through_grad():
    torch.manual_seed(0)
    m = create_model("mae_vqgan_vit_tiny").train()
    pi, pl, qi = _imgs()
    img, seen = _encoder_tokens(m, pi, pl, qi)
    assert seen[0] == torch.Size([2, 1 + 3 * 4, 32]) and seen[1] == torch.Size([2, 1 + 4 * 4, 16])
    logits = m.last_code_logits
    assert logits.shape == (2, 4, 64)
    with torch.no_grad():
        ref = m.vqgan.decode_codes(logits.argmax(-1), 2, 2)
    torch.testing.assert_close(img, ref, rtol=1e-5, atol=1e-6)
    img.mean().backward()
    assert m.mae.decoder_pred.weight.grad is not None and m.mae.decoder_pred.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.vqgan.parameters())  # the tokenizer is frozen


def test_mae_vqgan_mim_code_loss_and_training():
    torch.manual_seed(0)
    m = create_model("mae_vqgan_vit_tiny").train()
    pi, pl, qi, ql = _imgs(n=4)
    out = m.forward_mim(pi, pl, qi, ql, generator=torch.Generator().manual_seed(0))
    L = 16
    assert out["masked"].shape == (2, L) and out["masked"].sum(1).tolist() == [12, 12]  # 75%
    canvas = torch.cat([torch.cat([pi, pl], 3), torch.cat([qi, ql], 3)], 2)
    codes = m.vqgan.encode_codes(canvas)
    ce = F.cross_entropy(out["code_logits"].transpose(1, 2), codes, reduction="none")
    torch.testing.assert_close(out["loss"], ce[out["masked"]].mean())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):
        opt.zero_grad()
        loss = m.forward_mim(pi, pl, qi, ql, generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_random_keep_counts():
    cand, always = torch.arange(4, 12), torch.arange(0, 4)
    keep, masked = random_keep(3, cand, always, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 4 + 2) and masked.shape == (3, 6)
    for k, mk in zip(keep, masked):
        assert set(k.tolist()) | set(mk.tolist()) == set(range(12)) and not set(k.tolist()) & set(mk.tolist())
        assert torch.equal(k, k.sort().values)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_keep(1, cand, always, 1.0)


def test_errors():
    with pytest.raises(ValueError, match="patch_size must be 16"):
        MAEVQGANViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_dim=16,
                    decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="out_chans must equal in_chans"):
        MAEVQGANViT(img_size=32, out_chans=1, embed_dim=32, depth=1, num_heads=2, decoder_dim=16,
                    decoder_depth=1, decoder_heads=2)
    m = create_model("promptgip_vit_tiny")
    pi, pl, qi = _imgs()
    with pytest.raises(ValueError, match="query_label"):
        m.forward_mim(pi, pl, qi, qi[..., :16, :16])
    with pytest.raises(ValueError, match="multiple of 16"):
        m(*(t[..., :24, :24] for t in (pi, pl, qi)))
    assert isinstance(m, PromptGIPViT)


@pytest.mark.parametrize("name, lo, hi", [("promptgip_vit_l", 3.25e8, 3.35e8), ("mae_vqgan_vit_l", 3.25e8, 3.35e8)])
def test_full_size_parameter_counts(name, lo, hi):
    """~329 M in the upstream models (ViT-L encoder + 8 x 512 decoder), peers.md."""
    with torch.device("meta"):
        m = create_model(name)
    n = sum(p.numel() for k, p in m.named_parameters() if not k.startswith("vqgan."))
    assert lo < n < hi, n
