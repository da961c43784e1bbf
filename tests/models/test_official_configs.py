"""Every configuration the authors' Neuroverse3D constructor accepts, in particular EQUAL
neighbouring stage widths, where they downsample with a weightless MaxPool (kernel 2,
stride 2; ``UnetDownsampleAndCreateShortcutBlock``) instead of the strided conv:
fixture outputs and gradients, config inference from the state dict alone, export,
the MaxPool on every computation path, and its (zero) MACs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests._oracles import count_forward_flops
from vicl_fast.models.neuroverse3d import fast as nv3d_fast
from vicl_fast.models.neuroverse3d import Neuroverse3D
from vicl_fast.models.official import (infer_official_config, load_official_neuroverse3d,
                                       to_official_state_dict)
from vicl_fast.ops import fusion

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "neuroverse3d"
# fixture file -> its stage widths (the file's ``inner_channels`` is the constructor argument:
# a list for the first, the int 8 for the second)
OFFICIAL = {"official_equalwidth_seed1.pt": [4, 4, 8, 16, 16],
            "official_constant8_seed2.pt": [8, 8, 8, 8, 8]}


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def fx(request):
    d = torch.load(FIXTURES / request.param, weights_only=True)
    d["_channels"] = OFFICIAL[request.param]
    return d


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ds_keys(sd):
    return sorted(k for k in sd if "downsample_blocks" in k)


# ----------------------------------------------------------------- official fixtures
def test_fixture_inner_channels_as_documented(fx):
    # guards the table above: the second file holds the authors' int form
    ic = fx["inner_channels"]
    assert (ic if isinstance(ic, list) else [ic] * 5) == fx["_channels"]


@pytest.mark.parametrize("fast", [True, False])
def test_outputs_equal_official_for_every_mini_context(fx, fast):
    # the fixture dict loads (its int / list inner_channels is cross-checked with the shapes) ...
    assert list(load_official_neuroverse3d(fx).channels) == fx["_channels"]
    # ... and the plain state dict alone (no configuration given) gives the official outputs
    m = load_official_neuroverse3d(fx["state_dict"], fast=fast)
    assert list(m.channels) == fx["_channels"]
    assert sorted(fx["outputs_by_mini_context"]) == [1, 2, 3]
    for l, ref in fx["outputs_by_mini_context"].items():
        y = m.predict(fx["target_in"], fx["context_in"], fx["context_out"], l)
        assert y.dtype == torch.float32
        assert _rel(y, ref) <= 1e-5, (l, _rel(y, ref))


@pytest.mark.parametrize("fast,l", [(True, 3), (True, 1), (False, 2)])
def test_gradients_equal_official(fx, fast, l):
    """The fixture's gradients are of mean(y**2) with the whole context in one mini-context;
    "exact" APSP mode reproduces them for any l."""
    m = load_official_neuroverse3d(fx["state_dict"], fast=fast)
    m.zero_grad(set_to_none=True)
    y = m(fx["target_in"], fx["context_in"], fx["context_out"], l, apsp_mode="exact")
    (y ** 2).mean().backward()
    assert _rel(y.detach(), fx["outputs_by_mini_context"][3]) <= 1e-5
    names = [k for k, _ in m.named_parameters()]
    assert sorted(names) == sorted(fx["grads"])
    num = sum(((p.grad - fx["grads"][k]) ** 2).sum() for k, p in m.named_parameters())
    den = sum((g ** 2).sum() for g in fx["grads"].values())
    assert (num / den).sqrt().item() <= 1e-4
    for k, p in m.named_parameters():
        g = fx["grads"][k]
        assert ((p.grad - g).norm() / g.norm()).item() <= 1e-4, k


def test_config_inferred_and_export_round_trip(fx):
    sd = fx["state_dict"]
    assert infer_official_config(sd) == dict(in_channels=1, out_channels=1, channels=fx["_channels"],
                                             convs_per_stage=2, spatial_dims=3)
    m = load_official_neuroverse3d(sd)
    out = to_official_state_dict(m)
    assert list(out) == list(sd)  # same keys, same order (the authors' module order)
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    lsd = to_official_state_dict(m, lightning_prefix=True)
    ckpt = {"state_dict": lsd, "hyper_parameters": {"nb_inner_channels": fx["_channels"],
                                                    "nb_conv_layers_per_stage": 2}}
    m2 = load_official_neuroverse3d(ckpt)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="does not match its tensors"):
        bad = [c * 2 for c in fx["_channels"]]
        load_official_neuroverse3d({"state_dict": lsd, "hyper_parameters": {"nb_inner_channels": bad}})


def test_fixture_pool_transitions_have_no_weights(fx):
    C = fx["_channels"]
    convs = [k for k in range(4) if C[k] != C[k + 1]]
    want = sorted(f"{p}.downsample_blocks.{k}.{name}.{w}" for k in convs for w in ("weight", "bias")
                  for p, name in (("context_unet", "context_linear_layer.module"),
                                  ("target_encoder", "target_linear_layer")))
    assert _ds_keys(fx["state_dict"]) == want
    m = load_official_neuroverse3d(fx)
    for k in range(4):
        for blk in (m.context_unet.downsample_blocks[k], m.target_encoder.downsample_blocks[k]):
            assert (sum(p.numel() for p in blk.parameters()) == 0) == (k not in convs)


# ----------------------------------------------------------------- constructor forms
def test_channels_forms_of_the_authors_constructor():
    # int + stages, one-element list + stages, a full list (stages optional, must agree)
    assert Neuroverse3D(channels=3, stages=4).channels == (3, 3, 3, 3)
    assert Neuroverse3D(channels=[3], stages=3).channels == (3, 3, 3)
    assert Neuroverse3D(channels=(2, 2, 4), stages=3).channels == (2, 2, 4)
    assert Neuroverse3D(channels=[5], stages=1).channels == (5,)  # one stage: no downsampling
    assert Neuroverse3D(channels=[5]).channels == (5,)  # a list is the widths (their Lightning module)
    assert Neuroverse3D(**Neuroverse3D(channels=[5]).config).channels == (5,)
    with pytest.raises(ValueError, match="stages"):
        Neuroverse3D(channels=8)
    with pytest.raises(ValueError, match="stages"):
        Neuroverse3D(channels=(2, 4), stages=3)
    with pytest.raises(ValueError):
        Neuroverse3D(channels=4, stages=0)
    m = Neuroverse3D(channels=3, stages=3)
    assert m.config["channels"] == [3, 3, 3]
    assert Neuroverse3D(**m.config).channels == m.channels  # the config rebuilds the model
    assert m.downsample_pool == (True, True)
    assert Neuroverse3D(channels=(2, 2, 4, 4, 2)).downsample_pool == (True, False, True, False)


# ----------------------------------------------------------------- configurations of our own
CONFIGS = [
    dict(channels=(4, 4, 8, 16, 16)),
    dict(channels=(3, 6, 6, 3)),  # widths going down again, a pool in the middle
    dict(channels=5, stages=3),  # the authors' int form
    dict(channels=(6, 6)),
    dict(channels=(4,), stages=1),
    dict(channels=(2, 2, 4), convs_per_stage=1),
    dict(channels=(2, 4, 4), convs_per_stage=3, in_channels=2, out_channels=3),
    dict(channels=(3, 3, 5), spatial_dims=2),
]


def _ids(cfg):
    return "-".join(f"{k}{v}" for k, v in cfg.items()).replace(" ", "")


def _model(dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    return Neuroverse3D(**cfg).to(dtype)


def _inputs(m, B=2, L=3, side=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = (max(side, m.multiple),) * m.spatial_dims
    t = torch.rand(B, m.in_channels, *S, generator=g, dtype=dtype)
    ci = torch.rand(B, L, m.in_channels, *S, generator=g, dtype=dtype)
    co = (torch.rand(B, L, m.out_channels, *S, generator=g) > 0.5).to(dtype)
    return t, ci, co


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_state_dict_keys_round_trip_through_inference(cfg):
    m = _model(**cfg)
    sd = m.state_dict()
    n, C = m.stages, m.channels
    n_conv = sum(C[k] != C[k + 1] for k in range(n - 1))
    assert len(_ds_keys(sd)) == 4 * n_conv  # weight + bias, context and target branch
    assert m.downsample_pool == tuple(C[k] == C[k + 1] for k in range(n - 1))
    inferred = infer_official_config(sd)
    assert inferred == m.config
    m2 = load_official_neuroverse3d(to_official_state_dict(m, lightning_prefix=True))
    assert list(m2.state_dict()) == list(sd)
    for k, v in sd.items():
        assert torch.equal(m2.state_dict()[k], v), k


class _SpyPath:
    """An execution path that records what its residual units and Target-to-Context fusions see."""

    def __init__(self, path, seen):
        self._path, self._seen = path, seen

    def __getattr__(self, name):
        return getattr(self._path, name)

    def residual(self, unit, x):
        x0 = x.clone()  # before the call: the in-place paths may reuse x's buffer
        out = self._path.residual(unit, x)
        self._seen[id(unit)] = (x0, out.clone())
        return out

    def fuse_t2c(self, conv, *a, **k):
        out = self._path.fuse_t2c(conv, *a, **k)
        self._seen[id(conv)] = (None, out.clone())
        return out


def _spy_pool_inputs(monkeypatch, m):
    """Record the residual units' inputs/outputs and the Target-to-Context fusion outputs."""
    seen = {}
    real_path = m._path  # the one hook through which every part picks its execution path
    monkeypatch.setattr(m, "_path", lambda fast, x: _SpyPath(real_path(fast, x), seen))
    return seen


def _check_pool_transitions(m, seen):
    n, d = m.stages, m.spatial_dims
    pool = F.max_pool3d if d == 3 else F.max_pool2d
    checked = 0
    te, cu, td = m.target_encoder, m.context_unet, m.target_decoder
    for k in range(n - 1):
        if not m.downsample_pool[k]:
            continue
        # target encoder: stage k output -> next stage's residual unit input
        nxt = te.enc_blocks[k + 1].target_conv if k + 1 < n - 1 else td.enc_blocks[0].target_conv
        ref = pool(seen[id(te.enc_blocks[k].target_conv)][1], 2)
        assert torch.equal(seen[id(nxt)][0], ref), ("target", k)
        # context U-Net: stage k skip (after the fusion) -> stage k+1 residual unit input
        skip = seen[id(cu.enc_blocks[k].combine_conv_context.module)][1]
        assert torch.equal(seen[id(cu.enc_blocks[k + 1].context_conv.module)][0], pool(skip, 2)), ("ctx", k)
        checked += 1
    return checked


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_pool_transition_is_weightless_max_pool_on_every_path(cfg, monkeypatch):
    m64 = _model(**cfg)
    n = m64.stages
    for k in range(n - 1):
        for blk in (m64.context_unet.downsample_blocks[k], m64.target_encoder.downsample_blocks[k]):
            assert (sum(p.numel() for p in blk.parameters()) == 0) == m64.downsample_pool[k]
    t, ci, co = _inputs(m64)
    ref = m64.predict(t, ci, co, 2, fast=False)
    assert ref.abs().max() > 0
    # every path: reference, fast with a graph, fast in place, oneDNN fp32 CPU inference
    seen = _spy_pool_inputs(monkeypatch, m64)
    for fast in (False, True):
        seen.clear()
        y = m64(t, ci, co, 2, fast=fast)
        assert _check_pool_transitions(m64, seen) == sum(m64.downsample_pool)
        torch.testing.assert_close(y.detach(), ref, rtol=1e-11, atol=1e-12)
        seen.clear()
        y = m64.predict(t, ci, co, 1, fast=fast)
        _check_pool_transitions(m64, seen)
        torch.testing.assert_close(y, ref, rtol=1e-11, atol=1e-12)
    m32 = _model(torch.float32, **cfg)
    seen32 = _spy_pool_inputs(monkeypatch, m32)
    y32 = m32.predict(t.float(), ci.float(), co.float(), 2)
    assert _check_pool_transitions(m32, seen32) == sum(m32.downsample_pool)
    assert (y32.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.skipif(not fusion.mkldnn_fusion_available()[0], reason="oneDNN fusions unavailable")
def test_onednn_path_keeps_channels_last_across_pools(monkeypatch):
    m64 = _model(channels=(4, 4, 8, 8))
    m32 = _model(torch.float32, channels=(4, 4, 8, 8))
    assert m32.downsample_pool == (True, False, True)
    t, ci, co = _inputs(m64, L=2)
    ref = m64.predict(t, ci, co, fast=False)
    calls = {"gelu": 0, "layout_lost": 0}

    def spy(x, *a):
        calls["gelu"] += 1
        calls["layout_lost"] += not x.is_contiguous(memory_format=torch.channels_last_3d)
        return fusion.conv_gelu(x, *a)

    monkeypatch.setattr(nv3d_fast, "conv_gelu", spy)
    y = m32.predict(t.float(), ci.float(), co.float(), 1)
    assert calls["gelu"] > 0 and calls["layout_lost"] == 0, calls
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.get("stages", 2) > 1], ids=_ids)
def test_fast_equals_reference_gradients_with_pools(cfg):
    m = _model(**cfg)
    assert any(m.downsample_pool)  # every config here has a MaxPool transition
    t, ci, co = _inputs(m)
    t.requires_grad_(True)
    grads = []
    for fast in (True, False):
        m.zero_grad(set_to_none=True)
        t.grad = None
        m(t, ci, co, 2, fast=fast).sin().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()] + [t.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("channels", [(4, 4, 8, 16, 16), (8, 8, 8, 8, 8), (3, 6, 6, 3)])
def test_conv_macs_counts_nothing_for_pools(channels):
    with torch.device("meta"):
        m = Neuroverse3D(channels=channels)
    S = (32, 32, 32)
    counted, per_module = count_forward_flops(m, S[0])
    for (fast, L), per_mod in per_module.items():  # the strided convs count, the pools count nothing
        for k in range(len(channels) - 1):
            f = sum(sum(v.values()) for name, v in per_mod.items() if f"downsample_blocks.{k}." in name + ".")
            assert (f == 0) == (channels[k] == channels[k + 1]), (fast, L, k, f)
    for fast in (False, True):
        macs = m.conv_macs(S, 1, fast=fast)
        per_ctx = (counted[fast, 2] - counted[fast, 1]) // 2
        target = (counted[fast, 1] - 2 * per_ctx) // 2
        assert (per_ctx, target) == (macs["per_context"], macs["target"]), (fast, macs)


def test_missing_downsampling_conv_is_reported():
    m = _model(channels=(2, 4, 4, 8))
    sd = to_official_state_dict(m)
    gone = "target_encoder.downsample_blocks.2.target_linear_layer.weight"
    del sd[gone]
    with pytest.raises(ValueError, match=f"missing key {gone}"):
        load_official_neuroverse3d(sd)
    # a conv where the widths are equal (the authors would have a MaxPool) is not theirs
    sd = to_official_state_dict(m)
    sd["context_unet.downsample_blocks.1.context_linear_layer.module.weight"] = torch.zeros(4, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="unexpected key context_unet.downsample_blocks.1"):
        load_official_neuroverse3d(sd)
