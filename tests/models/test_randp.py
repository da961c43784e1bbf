"""RandP module and ViT model: matching on X / Z, fusion maths, presets, loss, training, prompts, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment as scipy_lsa

import vicl_fast.ops.retrieve as retrieve_mod
from vicl_fast.models import create_model
from vicl_fast.models.randp import RandPFusion, randp_loss
from vicl_fast.prompting import LearnedPrompts, PatchEmbedEncoder, PromptSelector, fit_learned_prompts


def _imgs(B=2, C=3, H=32, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, C, H, W, generator=g) for _ in range(3)]


def _scipy_perm(a, b):
    an, bn = F.normalize(a.detach().double(), dim=-1), F.normalize(b.detach().double(), dim=-1)
    out = []
    for s in (an @ bn.transpose(1, 2)).numpy():
        r, c = scipy_lsa(-s)
        p = np.empty(s.shape[1], dtype=np.int64)
        p[c] = r
        out.append(p)
    return torch.from_numpy(np.stack(out))


def _tiny_fusion(**kw):
    return RandPFusion(img_size=32, embed_dim=16, depth=2, num_heads=2, **kw).double()


@pytest.mark.parametrize("mode", ["hungarian", "greedy", "merge"])
@pytest.mark.parametrize("match_on", ["x", "z"])
def test_fusion_shapes(mode, match_on):
    f = RandPFusion(img_size=32, embed_dim=16, depth=2, num_heads=2, mode=mode, match_on=match_on)
    out = f(*_imgs(H=32, W=48))
    assert out.shape == (2, 2 * 3, 16) and f.grid_size(32, 48) == (2, 3)
    assert torch.isfinite(out).all()
    assert (f.last_perm is None) == (mode == "merge")
    assert (f.fuse is None) == (mode == "merge")


@pytest.mark.parametrize("match_on", ["x", "z"])
def test_fusion_equals_independent_recomputation(match_on):
    """Eq. 1-4 recomputed by hand (own patchify, own attention, SciPy matching) in float64."""
    f = _tiny_fusion(match_on=match_on)
    pi, pl, qi = (t.double() for t in _imgs(H=48, W=32))
    out = f(pi, pl, qi)
    B, p, D = 2, 16, 16
    h, w = 3, 2

    def patchify(x):  # "B C (h p) (w q) -> B (h w) (C p q)" then the conv as a matmul
        x = x.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, 3 * p * p)
        return x @ f.patch_embed.proj.weight.reshape(D, -1).T + f.patch_embed.proj.bias

    pos = F.interpolate(f.pos_embed[0].reshape(4, 2, 2, D).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).reshape(4, h * w, D)
    z = [patchify(pi) + pos[0], patchify(pl) + pos[1], patchify(qi) + pos[2],
         (f.mask_token + pos[3]).expand(B, -1, -1)]
    x = torch.cat(z, 1)
    for blk in f.blocks:
        a = blk.attn
        y = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = (y @ a.qkv.weight.T + a.qkv.bias).reshape(B, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
        x = x + att.transpose(1, 2).reshape(B, -1, D) @ a.proj.weight.T + a.proj.bias
        y = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        x = x + F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    xs = F.layer_norm(x, (D,), f.norm.weight, f.norm.bias, 1e-6).split(h * w, 1)
    perm = _scipy_perm(*((xs[0], xs[2]) if match_on == "x" else (z[0], z[2])))
    assert torch.equal(f.last_perm, perm)
    idx = perm[..., None].expand(-1, -1, D)
    ref = torch.cat([xs[0].gather(1, idx), xs[1].gather(1, idx), xs[2], xs[3]], -1) @ f.fuse.weight.T + f.fuse.bias
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_fusion_uses_stored_pos_at_base_size_and_interpolates_otherwise():
    f = _tiny_fusion()
    torch.testing.assert_close(f.pos_for(2, 2), f.pos_embed[0])
    assert f.pos_for(3, 5).shape == (4, 15, 16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        f.grid_size(40, 32)


@pytest.mark.parametrize("name", ["randp_vit_l", "randp_vit_b", "randp_vit_s"])
def test_presets_parameter_count_matches_hand_count(name):
    with torch.device("meta"):
        m = create_model(name)
    D, L = m.fusion.embed_dim, len(m.backbone.blocks)
    block = 12 * D * D + 13 * D  # qkv, proj, fc1, fc2 (+ biases) and two LayerNorms
    fusion = 3 * 256 * D + D + 4 * 256 * D + D + 2 * block + 2 * D + 4 * D * D + D
    backbone = L * block + 2 * D
    decoder = 4 * D * 16384 + 16384 + 64 * 64 * 9 + 64 + 2 * 64 + 64 * 3 + 3
    head = 2 * D + 4 * D + 4
    assert sum(p.numel() for p in m.parameters()) == fusion + backbone + decoder + head
    assert (D, L, m.backbone.blocks[0].attn.num_heads) == {
        "randp_vit_l": (1024, 24, 16), "randp_vit_b": (768, 12, 12), "randp_vit_s": (384, 12, 6)}[name]
    if name == "randp_vit_l":
        assert m.backbone.out_indices == (5, 11, 17, 23)


@pytest.mark.parametrize("mode", ["hungarian", "greedy", "merge"])
def test_randp_vit_tiny_shapes_and_logits(mode):
    m = create_model("randp_vit_tiny", fusion_mode=mode, num_tasks=5)
    pred, logits = m.forward_with_logits(*_imgs(H=32, W=64))
    assert pred.shape == (2, 3, 32, 64) and logits.shape == (2, 5)
    out = m(*_imgs(H=32, W=64))
    assert torch.equal(out, pred) and torch.equal(m.last_task_logits, logits)
    m0 = create_model("randp_vit_tiny", num_tasks=0)
    assert m0.forward_with_logits(*_imgs())[1] is None


def test_model_matching_cost_is_float32_under_autocast(monkeypatch):
    seen = []
    real = retrieve_mod._matching_permutation
    monkeypatch.setattr(retrieve_mod, "_matching_permutation", lambda c: (seen.append(c.dtype), real(c))[1])
    m = create_model("randp_vit_tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = m(*_imgs())
    assert pred.dtype == torch.bfloat16 and seen == [torch.float32]
    assert torch.isfinite(pred.float()).all()


def test_randp_loss_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=g) * 2, torch.randn(2, 3, 4, 4, generator=g)
    logits, task = torch.randn(2, 4, generator=g), torch.tensor([1, 3])
    d = (pred - target).abs()
    sl1 = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    ce = -(logits.log_softmax(-1)[torch.arange(2), task]).mean()
    torch.testing.assert_close(randp_loss(pred, target, logits, task), sl1 + 0.1 * ce)
    torch.testing.assert_close(randp_loss(pred, target), sl1)
    with pytest.raises(ValueError, match="both logits and task"):
        randp_loss(pred, target, logits)
    with pytest.raises(ValueError, match="same shape"):
        randp_loss(pred, target[:, :1])


def _synthetic_batch(B=4, S=32, seed=0):
    """Two tasks on random blobs: 0 = threshold (segmentation-like), 1 = invert (translation-like)."""
    g = torch.Generator().manual_seed(seed)
    imgs = F.avg_pool2d(torch.rand(2 * B, 1, S, S, generator=g), 5, 1, 2).expand(-1, 3, -1, -1)
    task = torch.arange(B) % 2
    lab = torch.where(task.repeat(2)[:, None, None, None] == 0, (imgs > 0.5).float(), 1 - imgs)
    return imgs[:B], lab[:B], imgs[B:], lab[B:], task


def test_training_steps_reduce_loss():
    m = create_model("randp_vit_tiny", num_tasks=2)
    pi, pl, qi, ql, task = _synthetic_batch()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        pred, logits = m.forward_with_logits(pi, pl, qi)
        loss = randp_loss(pred, ql, logits, task)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_learned_prompts_freeze_model_and_reduce_loss():
    m = create_model("randp_vit_tiny", num_tasks=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _, _, qi, ql, task = _synthetic_batch()
    prompts = LearnedPrompts(2, 3, 32)
    hist = fit_learned_prompts(m, prompts, [(qi, ql, task)], epochs=15, lr=1e-2)
    assert hist[-1] < hist[0]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # the model is frozen
    assert all(p.requires_grad for p in m.parameters()) and m.training  # flags restored
    pi, pl = prompts(task)
    assert pi.shape == (4, 3, 32, 32) and torch.equal(pi[0], prompts.prompt_image[0])
    with pytest.raises(ValueError, match="task ids"):
        prompts(torch.tensor([2]))


def test_prompt_selection_picks_most_similar_pair():
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 3, 32, 32, generator=g)
    labels = torch.rand(6, 3, 32, 32, generator=g)
    tasks = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = pool[[4, 1]] + 0.01 * torch.randn(2, 3, 32, 32, generator=g)
    for enc in (None, PatchEmbedEncoder(create_model("randp_vit_tiny"))):
        sel = PromptSelector(enc).build(pool, labels, tasks)
        pi, pl, idx = sel.select(queries)
        assert idx.tolist() == [4, 1] and torch.equal(pl, labels[[4, 1]])
        _, _, idx = sel.select(queries, task=torch.tensor([0, 1]))  # restricted to the query's task
        assert tasks[idx].tolist() == [0, 1]
        _, _, idx = sel.select(queries, exclude=torch.tensor([4, 1]))
        assert idx.tolist() != [4, 1]
        pi, _, idx = sel.select(queries, k=2)
        assert pi.shape == (2, 2, 3, 32, 32) and idx[:, 0].tolist() == [4, 1]


@pytest.mark.parametrize("bad,match", [
    (lambda a, b, c: (a, b[:, :, :16], c), "differs from query_image"),
    (lambda a, b, c: (a[..., :40, :40], b[..., :40, :40], c[..., :40, :40]), "multiple of 16"),
    (lambda a, b, c: (a[:, :1], b, c), "channels"),
    (lambda a, b, c: (a[0], b, c), "4-D"),
])
def test_clear_errors(bad, match):
    m = create_model("randp_vit_tiny")
    with pytest.raises(ValueError, match=match):
        m(*bad(*_imgs(H=48, W=48)))
    with pytest.raises(TypeError, match="floating"):
        a, b, c = _imgs()
        m((a * 255).to(torch.uint8), b, c)
    with pytest.raises(ValueError, match="match_on"):
        RandPFusion(match_on="y")
    with pytest.raises(ValueError, match="mode"):
        RandPFusion(mode="soft")
