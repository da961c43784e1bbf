"""RandP + U-Net backbones (vicl_fast/models/unets2d.py): every backbone x fusion mode x matching mode.

Checks shapes, that gradients reach every trainable parameter, that the prompt
reaches the prediction only through the fusion path (zeroed injectors give the
backbone's own output on the query image), the matching modes at model level
(Hungarian one-to-one and equal to SciPy, greedy = argmax and repeating,
Painter-style merge = aligned average), MONAI's SwinUNETR forward reproduced
by our composition, and clear errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

from vicl_fast.models import create_model
from vicl_fast.models.randp import randp_loss
from vicl_fast.models.unets2d import FUSION_MODES, SwinUNETR2D

BACKBONES = ["swinunetr", "uxnet", "restormer"]


def _imgs(B=2, H=64, W=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, 3, H, W, generator=g) for _ in range(3)]


def _model(backbone, **kw):
    torch.manual_seed(0)
    return create_model(f"randp_{backbone}_tiny", **kw)


def _size(backbone):  # non-square sizes: multiples of 32 for SwinUNETR, 16 otherwise
    return (64, 96) if backbone == "swinunetr" else (48, 80)


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_every_parameter_gets_a_gradient(backbone, fusion):
    m = _model(backbone, fusion=fusion).train()
    H, W = _size(backbone)
    pi, pl, qi = _imgs(H=H, W=W)
    pred, logits = m.forward_with_logits(pi, pl, qi)
    assert pred.shape == (2, 3, H, W) and logits.shape == (2, 4)
    assert torch.isfinite(pred).all()
    randp_loss(pred, torch.rand_like(pred), logits, torch.tensor([0, 3])).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without (non-zero) gradient: {missing}"
    # the injectors exist exactly for the chosen fusion
    if fusion == "first":
        assert m.first is not None and len(m.injectors) == 0
    else:
        keys = set(m.injectors)
        assert keys == ({m.backbone.bottleneck} if fusion == "bottleneck" else set(m.backbone.multi_stage))


@pytest.mark.parametrize("fusion", ["bottleneck", "multi"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_prompt_reaches_prediction_only_through_the_injectors(backbone, fusion):
    m = _model(backbone, fusion=fusion).eval()
    pi, pl, qi = _imgs()
    with torch.no_grad():
        a = m(pi, pl, qi)
        b = m(pi, 1 - pl, qi)  # another prompt label
        assert (a - b).abs().max() > 1e-6, "the prompt label must change the prediction"
        for inj in m.injectors.values():
            for p in inj.parameters():
                p.zero_()
        alone = m.backbone(qi)
        torch.testing.assert_close(m(pi, pl, qi), alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m(pi, 1 - pl, qi), alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_first_stage_fusion_feeds_the_upsampled_tokens_as_extra_channels(backbone):
    m = _model(backbone, fusion="first").eval()
    pi, pl, qi = _imgs()
    seen = {}
    h = m.backbone.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        m(pi, pl, qi)
        fmap = m.fused_map(pi, pl, qi)  # (B, D, 4, 4) at stride 16
        extra = F.pixel_shuffle(F.conv2d(fmap, m.first[0].weight, m.first[0].bias), 16)
    h.remove()
    x = seen["x"]
    assert x.shape == (2, 3 + 4, 64, 64)
    torch.testing.assert_close(x[:, :3], qi)
    torch.testing.assert_close(x[:, 3:], extra, rtol=1e-5, atol=1e-6)


def _scipy_perm(xp, xq):
    s = (F.normalize(xp.double(), dim=-1) @ F.normalize(xq.double(), dim=-1).transpose(1, 2)).numpy()
    out = []
    for sb in s:
        r, c = scipy_lsa(-sb)
        p = np.empty(sb.shape[1], dtype=np.int64)
        p[c] = r
        out.append(p)
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_hungarian_one_to_one_equals_scipy_and_greedy_argmax(backbone):
    pi, pl, qi = _imgs(B=3)
    m = _model(backbone, mode="hungarian").eval()
    with torch.no_grad():
        m(pi, pl, qi)
        x_pi, _, x_qi, _ = m.randp.encode(*m.randp.embed(pi, pl, qi))
    perm = m.randp.last_perm
    N = x_qi.shape[1]
    for b in range(3):  # every prompt token used exactly once
        assert torch.equal(perm[b].sort().values, torch.arange(N))
    assert torch.equal(perm, _scipy_perm(x_pi, x_qi))

    g = _model(backbone, mode="greedy").eval()
    with torch.no_grad():
        g(pi, pl, qi)
        x_pi, _, x_qi, _ = g.randp.encode(*g.randp.embed(pi, pl, qi))
    sim = F.normalize(x_pi.double(), dim=-1) @ F.normalize(x_qi.double(), dim=-1).transpose(1, 2)
    assert torch.equal(g.randp.last_perm, sim.argmax(dim=1))


def test_greedy_repeats_where_hungarian_cannot():
    """Identical prompt tokens (constant prompt, no positions): greedy picks one of them for every query
    token, Hungarian still uses each exactly once."""
    pi, pl, qi = _imgs()
    pi = torch.full_like(pi, 0.5)
    perms = {}
    for mode in ("greedy", "hungarian"):
        m = _model("uxnet", mode=mode).eval()
        with torch.no_grad():
            m.randp.pos_embed.zero_()
            out = m(pi, pl, qi)
        assert torch.isfinite(out).all()
        perms[mode] = m.randp.last_perm
    assert all(len(p.unique()) < p.numel() for p in perms["greedy"])
    assert all(torch.equal(p.sort().values, torch.arange(p.numel())) for p in perms["hungarian"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merge_mode_is_the_painter_style_aligned_average(backbone):
    m = _model(backbone, mode="merge").train()
    pi, pl, qi = _imgs()
    fmap = m.fused_map(pi, pl, qi)
    assert m.randp.last_perm is None and m.randp.fuse is None
    xs = m.randp.encode(*m.randp.embed(pi, pl, qi))
    ref = (sum(xs) / 4).transpose(1, 2).reshape(fmap.shape)
    torch.testing.assert_close(fmap, ref, rtol=1e-5, atol=1e-6)
    pred, logits = m.forward_with_logits(pi, pl, qi)
    randp_loss(pred, torch.rand_like(pred), logits, torch.tensor([1, 2])).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_swinunetr2d_composition_equals_monai_forward():
    """Without fusion additions our re-composed forward is MONAI's SwinUNETR.forward."""
    torch.manual_seed(0)
    bb = SwinUNETR2D(in_chans=3, out_chans=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                     window_size=2).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), bb.net(x), rtol=1e-5, atol=1e-6)


def test_full_size_backbone_geometry():
    """Full-size configurations (meta where possible): fusion points at the documented strides/widths."""
    with torch.device("meta"):
        ux = create_model("randp_uxnet")
        rs = create_model("randp_restormer")
    assert ux.backbone.points["bottleneck"].stride == 16 and ux.backbone.points["bottleneck"].channels == 768
    assert [ux.backbone.points[k].channels for k in ux.backbone.multi_stage] == [48, 96, 192, 384]
    assert rs.backbone.points["s8"].channels == 336 and rs.backbone.bottleneck == "s8"
    # Restormer's latent is at stride 8: 1x1 conv to 4x336 channels + pixel shuffle x2
    inj = rs.injectors["s8"]
    assert inj[0].out_channels == 4 * 336 and inj[1].upscale_factor == 2
    assert ux.randp.embed_dim == rs.randp.embed_dim == 1024 and len(ux.randp.blocks) == 2
    assert ux.size_divisor == 16 and rs.size_divisor == 16


def test_clear_errors():
    from vicl_fast.models.unets2d import RandPUNet

    with pytest.raises(ValueError, match="backbone must be one of"):
        RandPUNet(backbone="resnet", img_size=64, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="randp_<backbone>"):
        create_model("randp_uxnet_tiny", backbone="restormer")
    with pytest.raises(ValueError, match="fusion must be one of"):
        create_model("randp_uxnet_tiny", fusion="late")
    with pytest.raises(ValueError, match="first_chans"):
        create_model("randp_uxnet_tiny", fusion="first", first_chans=0)
    sw = _model("swinunetr").eval()
    assert sw.size_divisor == 32
    with pytest.raises(ValueError, match="multiple of 32"):
        sw(*_imgs(H=48, W=64))
    ux = _model("uxnet").eval()
    pi, pl, qi = _imgs()
    with pytest.raises(ValueError, match="channels"):
        ux(pi[:, :1], pl[:, :1], qi[:, :1])
    with pytest.raises(ValueError, match="differs from query_image"):
        ux(pi[:1], pl[:1], qi)
    with pytest.raises(TypeError, match="floating"):
        ux((pi * 255).to(torch.uint8), pl, qi)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_steps_reduce_loss(backbone):
    """A tiny synthetic task (the label is the inverted query image): a few Adam steps lower the loss."""
    torch.manual_seed(0)
    m = _model(backbone, fusion="bottleneck").train()
    S = 64 if backbone == "swinunetr" else 32  # MONAI's instance norm needs > 1 pixel at stride 32
    pi, _, qi = _imgs(B=2, H=S, W=S)
    pl, ql = 1 - pi, 1 - qi
    task = torch.tensor([1, 1])
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        pred, logits = m.forward_with_logits(pi, pl, qi)
        loss = randp_loss(pred, ql, logits, task)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_swinunetr_refuses_images_whose_deepest_stage_is_1x1():
    """32x32 is a multiple of SwinUNETR's 32 but its stride-32 stage is 1x1 (instance norm fails in training)."""
    from vicl_fast.models import create_model

    model = create_model("randp_swinunetr_tiny")
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="at least 64x64"):
        model(x, x, x)
    x = torch.rand(1, 3, 64, 64)
    assert model(x, x, x).shape == (1, 3, 64, 64)
