"""MAC counter (vicl_fast/flops.py) against hand counts.

Every expected number here is written from the layer sizes (the formulas of
the module docstring: a Linear(i -> o) on n rows is n*i*o MACs, a conv is
C_out * C_in/groups * prod(k) * prod(out spatial) per sample, attention is
2 * B * heads * Lq * Lk * d), never read back from the counter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vicl_fast.flops import count_macs, count_macs_meta, format_count, macs_by_kind, meta_model
from vicl_fast.models import create_model


# ----------------------------------------------------------------------------- hand formulas

def lin(rows: int, i: int, o: int) -> int:
    return rows * i * o


def conv(cout: int, cin: int, k: int, out_hw: int, groups: int = 1) -> int:
    return cout * (cin // groups) * k * k * out_hw


def block(n: int, d: int, mlp_ratio: float = 4.0) -> int:
    """Pre-norm ViT block on n tokens of width d: qkv + proj + MLP + QK^T + PV."""
    hidden = int(d * mlp_ratio)
    return lin(n, d, 3 * d) + lin(n, d, d) + lin(n, d, hidden) + lin(n, hidden, d) + 2 * n * n * d


def randp_vit_hand(B: int, S: int, D: int, depth: int, fusion_depth: int, dec: int, num_tasks: int,
                   p: int = 16, in_chans: int = 3, out_chans: int = 3) -> dict[str, int]:
    n = (S // p) ** 2
    parts = {
        "patch_embed": B * 3 * conv(D, in_chans, p, n),           # pi, pl, qi (ql is the [MASK] token)
        "shallow_vit": B * fusion_depth * block(4 * n, D),        # over [pi, pl, qi, ql]
        "cosine": B * n * n * D,                                  # similarity (B, P, Q)
        "fuse": B * lin(n, 4 * D, D),                             # Linear(4D -> D)
        "backbone": B * depth * block(n, D),                      # on the n fused tokens only
        "decoder": B * (lin(n, 4 * D, p * p * dec) + conv(dec, dec, 3, S * S) + conv(out_chans, dec, 1, S * S)),
        "task_head": B * lin(1, D, num_tasks),
    }
    return parts


def painter_hand(B: int, S: int, D: int, depth: int, merge_idx: int, dec: int, p: int = 16) -> dict[str, int]:
    n = (S // p) ** 2
    canvas = 4 * n  # 2x2 grid
    return {
        "patch_embed": B * 3 * conv(D, 3, p, n),
        "blocks": B * (depth * block(canvas, D) + (merge_idx + 1) * block(canvas, D)),  # 2nd stream to the merge
        "decoder": B * (lin(n, 4 * D, p * p * dec) + conv(dec, dec, 3, S * S) + conv(3, dec, 1, S * S)),
    }


def promptgip_hand(B: int, S: int, D: int, depth: int, Dd: int, ddepth: int, head: int, p: int = 16) -> int:
    n = (S // p) ** 2
    enc_tokens, dec_tokens = 1 + 3 * n, 1 + 4 * n  # class token + visible (pi, pl, qi); all positions
    return B * (3 * conv(D, 3, p, n) + depth * block(enc_tokens, D) + lin(enc_tokens, D, Dd)
                + ddepth * block(dec_tokens, Dd) + lin(n, Dd, p * p * 3)
                + conv(head, 3, 3, S * S) + conv(head, head, 3, S * S) + conv(3, head, 3, S * S))


# ----------------------------------------------------------------------------- primitive ops

def test_linear_forward_and_backward():
    rep = count_macs(nn.Linear(8, 4), torch.randn(2, 8))
    assert rep.macs == 2 * 8 * 4 and rep.flops == 2 * rep.macs
    # backward: grad_input (2x4 @ 4x8) + grad_weight (4x2 @ 2x8) = 2x the forward
    rep = count_macs(nn.Linear(8, 4), torch.randn(2, 8, requires_grad=True), backward=True)
    assert rep.macs == 3 * 64


def test_grouped_depthwise_and_transposed_conv():
    x = torch.randn(1, 4, 5, 5)
    assert count_macs(nn.Conv2d(4, 6, 3, padding=1, groups=2), x).macs == conv(6, 4, 3, 25, groups=2)
    assert count_macs(nn.Conv2d(4, 4, 7, padding=3, groups=4), x).macs == conv(4, 4, 7, 25, groups=4)
    assert count_macs(nn.Conv2d(4, 6, 2, stride=2), x[..., :4, :4]).macs == conv(6, 4, 2, 4)
    # transposed conv x2: every input pixel meets every kernel tap once
    assert count_macs(nn.ConvTranspose2d(4, 6, 2, stride=2), torch.randn(1, 4, 3, 3)).macs == 4 * 6 * 4 * 9


def test_sdpa_on_cpu_is_counted():
    # PyTorch's own FlopCounterMode counts 0 for the CPU flash kernel; ours must not.
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    rep = count_macs(F.scaled_dot_product_attention, q, k, v)
    assert rep.macs == 2 * 3 * 2 * 5 * 5 * 4
    qk = torch.randn(3, 2, 7, 4)
    assert count_macs(F.scaled_dot_product_attention, qk, torch.randn(3, 2, 9, 4), torch.randn(3, 2, 9, 4)).macs \
        == 2 * 3 * 2 * 7 * 9 * 4


def test_vit_block_hand_count_fused_and_explicit_attention():
    from vicl_fast.models.vit import Block

    x = torch.randn(2, 10, 16)
    for fused in (True, False):
        assert count_macs(Block(16, 2, fused_attn=fused), x).macs == 2 * block(10, 16)


def test_macs_by_kind_splits_conv_and_matmul():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    rep = count_macs(model, torch.randn(2, 3, 6, 6))
    kinds = macs_by_kind(rep)
    assert kinds == {"conv": 2 * conv(4, 3, 3, 36), "matmul": 2 * lin(1, 144, 5)}
    assert sum(kinds.values()) == rep.macs


def test_format_count_and_by_module():
    assert format_count(360_777_252_864) == "360.78 G"
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rep = count_macs(model, torch.randn(3, 4), by_module=True)
    assert rep.by_module[""] == rep.macs == 3 * (32 + 16)
    assert rep.by_module["0"] == 96 and rep.by_module["2"] == 48


# ----------------------------------------------------------------------------- models

def _inputs(S: int, B: int = 2):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(B, 3, S, S, generator=g) for _ in range(3)]


def test_randp_vit_tiny_equals_hand_count_by_part():
    model = create_model("randp_vit_tiny").eval()  # D 32, depth 4, shallow 2, decoder 8, 32x32
    hand = randp_vit_hand(B=2, S=32, D=32, depth=4, fusion_depth=2, dec=8, num_tasks=4)
    rep = count_macs(model, *_inputs(32), by_module=True)
    assert rep.macs == sum(hand.values())
    assert rep.by_module["fusion"] == hand["patch_embed"] + hand["shallow_vit"] + hand["cosine"] + hand["fuse"]
    assert rep.by_module["backbone"] == hand["backbone"]
    assert rep.by_module["decoder"] == hand["decoder"]


def test_randp_vit_l_equals_hand_count_and_paper_convention():
    rep = count_macs_meta(lambda: create_model("randp_vit_l"), *[(1, 3, 256, 256)] * 3)
    hand = randp_vit_hand(B=1, S=256, D=1024, depth=24, fusion_depth=2, dec=64, num_tasks=4)
    assert rep.macs == sum(hand.values())  # 131.95 G
    # Matrix products only, times 2 (FLOPs): the paper's 258 G.
    matmul = macs_by_kind(rep)["matmul"]
    assert matmul == rep.macs - hand["patch_embed"] - 256 * 256 * (64 * 64 * 9 + 3 * 64)
    assert round(2 * matmul / 1e9) == 258


def test_painter_tiny_and_vit_l_equal_hand_count():
    model = create_model("painter_vit_tiny").eval()  # D 32, depth 4, merge after block 1
    rep = count_macs(model, *_inputs(32))
    assert rep.macs == sum(painter_hand(2, 32, 32, 4, 1, 8).values())
    rep_l = count_macs_meta(lambda: create_model("painter_vit_l"), *[(1, 3, 256, 256)] * 3)
    hand = painter_hand(1, 256, 1024, 24, 2, 64)
    assert rep_l.macs == sum(hand.values())
    assert 24 * block(1024, 1024) == 360_777_252_864  # the paper's ViT-L/16 on the 1024-token canvas
    assert abs(rep_l.macs / 429e9 - 1) < 0.01


def test_promptgip_tiny_equals_hand_count():
    model = create_model("promptgip_vit_tiny").eval()
    assert count_macs(model, *_inputs(32)).macs == promptgip_hand(2, 32, 32, 2, 16, 1, 8)


def test_randp_unet_parts_equal_hand_count():
    """RandP module + injector 1x1 convs per fusion mode (the backbones themselves are library code)."""
    D, S, B = 32, 64, 1
    n = (S // 16) ** 2
    randp = randp_vit_hand(B, S, D, depth=0, fusion_depth=1, dec=0, num_tasks=0)
    randp_macs = randp["patch_embed"] + randp["shallow_vit"] + randp["cosine"] + randp["fuse"]
    for fusion, expect in (
        ("bottleneck", conv(48, D, 1, n)),                                        # uxnet hidden_size 48
        ("multi", sum(conv(c, D, 1, n) for c in (8, 16, 24, 32))),                # 1x1 at stride 16, then upsampled
        ("first", None),
    ):
        model = create_model("randp_uxnet_tiny", fusion=fusion).eval()
        rep = count_macs(model, *_inputs(S, B), by_module=True)
        assert rep.by_module["randp"] == randp_macs
        assert rep.by_module["task_head"] == B * lin(1, D, 4)
        if expect is not None:  # the ModuleDict itself is never called: sum its members
            got = sum(m for k, m in rep.by_module.items() if k.startswith("injectors.") and k.count(".") == 1)
            assert got == B * expect
        else:  # 1x1 conv to first_chans * 16 * 16 channels, pixel-shuffled to full resolution
            assert rep.by_module["first"] == B * conv(4 * 16 * 16, D, 1, n)


@pytest.mark.parametrize("name", ["randp_vit_tiny", "painter_vit_tiny", "promptgip_vit_tiny", "mae_vqgan_vit_tiny",
                                  "randp_uxnet_tiny", "randp_restormer_tiny", "randp_swinunetr_tiny"])
def test_meta_count_equals_real_count(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    S = model.img_size
    real = count_macs(model, *_inputs(S))
    meta = count_macs_meta(lambda: create_model(name).eval(), *[(2, 3, S, S)] * 3)
    assert meta.macs == real.macs > 0
    # On meta, SDPA runs its math decomposition (bmm) instead of the CPU flash kernel: same MACs.
    assert macs_by_kind(meta) == macs_by_kind(real)


def test_meta_backward_count_equals_real_math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = create_model("randp_vit_tiny").train()
    with sdpa_kernel(SDPBackend.MATH):  # what meta runs (see count_macs_meta)
        real = count_macs(model, *_inputs(32), backward=True)
    meta = count_macs_meta(lambda: create_model("randp_vit_tiny").train(), *[(2, 3, 32, 32)] * 3, backward=True)
    assert meta.macs == real.macs
    fwd = count_macs(model, *_inputs(32)).macs
    assert 2.5 * fwd < real.macs < 3.1 * fwd  # backward ~2x forward (first conv needs no grad_input)


def test_count_macs_meta_errors():
    with pytest.raises(ValueError, match="meta device"):
        count_macs_meta(nn.Linear(2, 2), (1, 2))
    with pytest.raises(TypeError, match="tuple of non-negative ints"):
        count_macs_meta(lambda: nn.Linear(2, 2), "1x2")
    with pytest.raises(TypeError, match="factory"):
        count_macs_meta(3, (1, 2))
    # meta_model falls back to a CPU build for constructors that need values
    m = meta_model(lambda: nn.Linear(2, 2))
    assert m.weight.device.type == "meta"
