"""Painter/MVG baseline: canvas layouts, merge after block 2, masking and Table 1's inference modes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vicl_fast.models import create_model
from vicl_fast.models.painter import block_mask


def _imgs(n=4, B=2, H=32, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, H, W, generator=g) for _ in range(n)]


def _tiny(**kw):
    return create_model("painter_vit_tiny", **kw).double().eval()


def _reference_standard(m, pi, pl, qi):
    """Standard inference recomputed from pixel canvases (one conv over each whole canvas)."""
    B, _, H, W = qi.shape
    h, w, p = H // 16, W // 16, 16
    zeros = torch.zeros_like(qi)
    if m.layout == "grid":
        img_canvas = torch.cat([torch.cat([pi, zeros], 3), torch.cat([qi, zeros], 3)], 2)
        lab_canvas = torch.cat([torch.cat([zeros, pl], 3), torch.cat([zeros, zeros], 3)], 2)
        CH, CW = 2 * h, 2 * w
        qmask = torch.zeros(CH, CW, dtype=torch.bool)
        qmask[h:, w:] = True
    else:
        img_canvas, lab_canvas = torch.cat([pi, qi], 2), torch.cat([pl, zeros], 2)
        CH, CW = 2 * h, w
        qmask = torch.zeros(CH, CW, dtype=torch.bool)
        qmask[h:] = True
    emb = lambda c: F.conv2d(c, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=p).flatten(2).transpose(1, 2)  # noqa: E731
    x = emb(img_canvas) + m.segment_token_x + m.pos_embed
    y = emb(lab_canvas)
    y = torch.where(qmask.flatten()[None, :, None], m.mask_token, y) + m.segment_token_y + m.pos_embed
    t = torch.cat([x, y])
    feats = {}
    for i, blk in enumerate(m.vit.blocks):
        t = blk(t)
        if i == m.merge_idx:
            t = (t[:B] + t[B:]) / 2
        feats[i] = m.vit.norm(t if i >= m.merge_idx else (t[:B] + t[B:]) / 2)
    cat = torch.cat([feats[i] for i in m.vit.out_indices], -1)
    cat = cat.reshape(B, CH, CW, -1)[:, qmask.any(1)][:, :, qmask.any(0)].reshape(B, h * w, -1)
    d = m.decoder
    z = (cat @ d.embed.weight.T + d.embed.bias).reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    z = z.reshape(B, -1, H, W)
    z = F.conv2d(z, d.conv.weight, d.conv.bias, padding=1)
    z = F.layer_norm(z.permute(0, 2, 3, 1), (z.shape[1],), d.norm.weight, d.norm.bias, 1e-6).permute(0, 3, 1, 2)
    return F.conv2d(F.gelu(z), d.pred.weight, d.pred.bias)


@pytest.mark.parametrize("layout", ["grid", "vertical"])
def test_standard_inference_equals_canvas_reference(layout):
    m = _tiny(layout=layout)
    pi, pl, qi = (t.double() for t in _imgs(3, H=32, W=32))  # the base size: no pos interpolation
    out = m(pi, pl, qi)
    assert out.shape == (2, 3, 32, 32)
    assert m(*(t.double() for t in _imgs(3, H=32, W=48))).shape == (2, 3, 32, 48)
    torch.testing.assert_close(out, _reference_standard(m, pi, pl, qi), rtol=1e-9, atol=1e-9)
    assert m.last_mask.all()


def test_token_count_and_merge_after_block_2():
    m = create_model("painter_vit_tiny", depth=5, merge_idx=2).eval()
    assert m.pos_embed.shape[1] == 4 * 4  # 2x2 canvas of 2x2-token images
    batch_sizes = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: batch_sizes.append(out.shape[:2])) for b in m.vit.blocks]
    m(*_imgs(3, B=3))
    for hk in hooks:
        hk.remove()
    assert batch_sizes == [(6, 16)] * 3 + [(3, 16)] * 2  # doubled batch through blocks 0-2, then merged


def test_vit_l_layout_is_1024_tokens():
    with torch.device("meta"):
        m = create_model("painter_vit_l")
    assert m.pos_embed.shape == (1, 1024, 1024) and m.vit.out_indices == (5, 11, 17, 23)
    assert m.decoder.embed.weight.shape == (16384, 4096)


def test_inference_modes_use_the_query_label_as_documented():
    m = _tiny()
    pi, pl, qi, ql = (t.double() for t in _imgs(4))
    ql2 = torch.rand_like(ql)
    std = m(pi, pl, qi)
    torch.testing.assert_close(m(pi, pl, qi, query_label=ql), std)  # standard ignores the query label
    mask = torch.zeros(2, 4, 2, dtype=torch.bool)  # label region [pl; ql] of 4 x 2 tokens
    mask[:, 0, 0] = mask[:, 2, 1] = mask[:, 3, 0] = True  # one prompt-label patch, two query-label patches
    tl1 = m(pi, pl, qi, query_label=ql, mode="training_like", mask=mask)
    assert torch.equal(m.last_mask, mask[:, 2:])
    tl2 = m(pi, pl, qi, query_label=ql2, mode="training_like", mask=mask)
    assert not torch.allclose(tl1, tl2)  # visible ground truth leaks in
    md1 = m(pi, pl, qi, query_label=ql, mode="modified", mask=mask)
    md2 = m(pi, pl, qi, query_label=ql2, mode="modified", mask=mask)
    torch.testing.assert_close(md1, md2)  # visible patches are black, whatever the label
    assert not torch.allclose(md1, std)
    # Masked prompt-label patches are hidden: changing them does not change the output.
    pl_changed = pl.clone()
    pl_changed[..., :16, :16] = 0.0  # the patch at (0, 0), masked above
    torch.testing.assert_close(m(pi, pl_changed, qi, query_label=ql, mode="training_like", mask=mask), tl1)
    pl_changed[..., 16:, 16:] = 0.0  # a visible prompt-label patch
    assert not torch.allclose(m(pi, pl_changed, qi, query_label=ql, mode="training_like", mask=mask), tl1)


def test_training_mode_masks_blocks_and_loss_is_on_masked_patches():
    m = create_model("painter_vit_tiny", mask_ratio=0.5).train()
    pi, pl, qi, ql = _imgs(4, H=64, W=64)
    m(pi, pl, qi, query_label=ql)  # training with the label: random block masking
    region = m.random_mask(2, 4, 4)
    assert region.shape == (2, 8, 4) and int(region[0].sum()) == 16
    mask = torch.zeros(2, 8, 4, dtype=torch.bool)
    mask[:, 4:6] = True  # only query-label rows 0-1 masked
    loss = m.training_loss(pi, pl, qi, ql, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and m.mask_token.grad is not None
    # The loss only sees masked pixels: a visible prompt-label patch changed in the target alone
    # (same input) must not change it. Input and target are the same tensor, so check via
    # the query label's visible rows 2-3, which are both input (visible) and not in the loss.
    m.eval()
    ql_b = ql.clone()
    ql_b[..., 32:, :] = 0.0
    l_a = m.training_loss(pi, pl, qi, ql, mask=mask)
    l_b = m.training_loss(pi, pl, qi, ql_b, mask=mask)
    assert not torch.allclose(l_a, l_b)  # visible rows feed the model (training-like leak)
    m.train()
    out = m(pi, pl, qi)  # training without a query label: the whole query label is masked
    assert out.shape == (2, 3, 64, 64) and m.last_mask.all()


def test_training_loss_decreases():
    m = create_model("painter_vit_tiny")
    g = torch.Generator().manual_seed(0)
    imgs = F.avg_pool2d(torch.rand(4, 1, 32, 32, generator=g), 5, 1, 2).expand(-1, 3, -1, -1)
    pi, qi = imgs[:2], imgs[2:]
    pl, ql = 1 - pi, 1 - qi
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    mask = torch.ones(2, 4, 2, dtype=torch.bool)
    losses = []
    for _ in range(20):
        loss = m.training_loss(pi, pl, qi, ql, mask=mask, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_block_mask_counts_and_reproducibility():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = block_mask(3, 32, 16, 256, generator=g1), block_mask(3, 32, 16, 256, generator=g2)
    assert torch.equal(a, b) and a.sum((1, 2)).tolist() == [256] * 3
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    nb = torch.roll(a, 1, 1) | torch.roll(a, -1, 1) | torch.roll(a, 1, 2) | torch.roll(a, -1, 2)
    assert float((nb & a).sum()) / float(a.sum()) > 0.9
    assert block_mask(1, 2, 2, 3).sum() == 3  # tiny grids are completed patch by patch
    with pytest.raises(ValueError, match="num_masked"):
        block_mask(1, 2, 2, 5)


def test_errors():
    m = _tiny()
    pi, pl, qi, ql = (t.double() for t in _imgs(4))
    with pytest.raises(ValueError, match="query_label"):
        m(pi, pl, qi, mode="training_like")
    with pytest.raises(ValueError, match="mode must be"):
        m(pi, pl, qi, mode="inpaint")
    with pytest.raises(ValueError, match="mask must be bool"):
        m(pi, pl, qi, query_label=ql, mode="training_like", mask=torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout"):
        create_model("painter_vit_tiny", layout="diagonal")


def test_training_loss_equals_hand_masked_smooth_l1():
    m = _tiny(mask_scope="query_label")
    pi, pl, qi, ql = (t.double() for t in _imgs(4, H=32, W=48))
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 1] = mask[1, 1, 0] = mask[1, 1, 2] = True
    pred = m(pi, pl, qi, query_label=ql, mode="training_like", mask=mask)
    pix = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand(-1, 3, -1, -1)
    d = (pred - ql)[pix].abs()
    want = torch.where(d < 0.01, 0.5 * d ** 2 / 0.01, d - 0.005).mean()
    torch.testing.assert_close(m.training_loss(pi, pl, qi, ql, mask=mask), want)
