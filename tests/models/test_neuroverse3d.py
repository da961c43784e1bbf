"""Neuroverse3D model: layout, fast == reference path, FLOPs, input errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests._oracles import count_forward_flops
from vicl_fast.models import create_model
from vicl_fast.models.neuroverse3d import fast as nv3d_fast
from vicl_fast.models.neuroverse3d import Neuroverse3D
from vicl_fast.ops import fusion


def _fixture_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "fixtures" / "neuroverse3d"  # the repo's own copy, never ../shared


def _inputs(B=1, L=3, S=(16, 16, 16), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, 1, *S, generator=g, dtype=dtype)
    ci = torch.rand(B, L, 1, *S, generator=g, dtype=dtype)
    co = (torch.rand(B, L, 1, *S, generator=g) > 0.5).to(dtype)
    return t, ci, co


def _tiny(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw.setdefault("channels", (3, 5, 7))
    return Neuroverse3D(**kw).to(dtype)


def test_default_layout_matches_official_keys():
    with torch.device("meta"):
        m = Neuroverse3D()
    assert sum(p.numel() for p in m.parameters()) == 70_854_913
    official = json.loads((_fixture_dir() / "keys_full.json").read_text())
    assert official["n_params"] == 70_854_913
    ours = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert ours == official["state_dict_shapes"]
    # the split of the notes: context U-Net / target encoder / target decoder
    assert sum(p.numel() for p in m.context_unet.parameters()) == 35_137_376
    assert sum(p.numel() for p in m.target_encoder.parameters()) == 15_843_264
    assert sum(p.numel() for p in m.target_decoder.parameters()) == 19_874_273


def test_registry():
    with torch.device("meta"):
        assert isinstance(create_model("neuroverse3d"), Neuroverse3D)
    tiny = create_model("neuroverse3d_tiny")
    assert tiny.channels == (4, 8, 16, 32, 64)


@pytest.mark.parametrize("spatial_dims,S,convs", [(3, (8, 12, 16), 2), (3, (8, 8, 8), 3), (2, (12, 20), 2)])
def test_fast_equals_reference_values_and_grads(spatial_dims, S, convs):
    m = _tiny(spatial_dims=spatial_dims, convs_per_stage=convs)
    t, ci, co = _inputs(B=2, L=3, S=S)
    t.requires_grad_(True)
    outs, grads = [], []
    for fast in (True, False):
        m.zero_grad(set_to_none=True)
        t.grad = None
        y = m(t, ci, co, fast=fast)
        assert y.shape == t.shape
        (y.sin().sum()).backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in m.parameters()] + [t.grad.clone()])
    assert y.abs().max() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-11, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_inference_inplace_and_channels_last_match_graph_path():
    m = _tiny(channels_last=True)
    t, ci, co = _inputs(L=2)
    ref = m(t, ci, co, fast=False).detach()
    with torch.no_grad():
        y_ng = m(t, ci, co, 1)
    y_inf = m.predict(t, ci, co, l=2)
    torch.testing.assert_close(y_ng, ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(y_inf, ref, rtol=1e-11, atol=1e-12)
    assert not torch.equal(ref, torch.zeros_like(ref))


@pytest.mark.skipif(not fusion.mkldnn_fusion_available()[0], reason="oneDNN fusions unavailable")
@pytest.mark.parametrize("spatial_dims,S", [(3, (8, 16, 8)), (2, (16, 12))])
def test_cpu_fp32_inference_fused_path(monkeypatch, spatial_dims, S):
    """CPU fp32 predict runs the oneDNN fusions (spied), keeps channels-last and equals the
    float64 reference path; VICL_FAST_DISABLE_MKLDNN=1 switches them off."""
    m64 = _tiny(channels=(4, 8, 16), spatial_dims=spatial_dims)
    m32 = _tiny(torch.float32, channels=(4, 8, 16), spatial_dims=spatial_dims)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    t, ci, co = _inputs(B=2, L=3, S=S)
    ref = m64.predict(t, ci, co, fast=False)
    calls = {"gelu": 0, "add": 0, "layout_lost": 0}
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last

    def spy(name, fn):
        def wrapped(x, *a):
            calls[name] += 1
            calls["layout_lost"] += x.shape[1] > 1 and not x.is_contiguous(memory_format=fmt)
            return fn(x, *a)
        return wrapped

    monkeypatch.setattr(nv3d_fast, "conv_gelu", spy("gelu", nv3d_fast.conv_gelu))
    monkeypatch.setattr(nv3d_fast, "conv_add", spy("add", nv3d_fast.conv_add))
    ys = [m32.predict(t.float(), ci.float(), co.float(), l) for l in (1, 2)]
    assert calls["gelu"] > 0 and calls["add"] > 0 and calls["layout_lost"] == 0, calls
    for y in ys:
        assert y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    n = dict(calls)
    monkeypatch.setenv("VICL_FAST_DISABLE_MKLDNN", "1")
    y_off = m32.predict(t.float(), ci.float(), co.float(), 2)
    assert calls == n
    torch.testing.assert_close(y_off, ys[1], rtol=1e-5, atol=1e-6)


def test_l_positional_keyword_and_auto():
    m = _tiny()
    t, ci, co = _inputs(L=4)
    with torch.no_grad():
        a = m(t, ci, co, 3)
        b = m(t, ci, co, l=1)
        c = m(t, ci, co, "auto")
        d = m(t, ci, co, l=100)  # larger than L: one mini-context
    for x in (b, c, d):
        torch.testing.assert_close(x, a, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_close_to_fp32():
    m = _tiny(torch.float32, channels=(4, 8, 16))
    t, ci, co = _inputs(L=2, dtype=torch.float32)
    with torch.no_grad():
        ref = m(t, ci, co, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(t, ci, co, 1)
    assert torch.isfinite(y).all()
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, err


def _bad(m, t, ci, co, match, exc=ValueError):
    with pytest.raises(exc, match=match):
        m(t, ci, co)


def test_input_errors():
    m = _tiny()
    t, ci, co = _inputs(L=2, S=(8, 8, 8))
    _bad(m, t[..., :6], ci[..., :6], co[..., :6], "not divisible by 2\\^\\(stages-1\\) = 4")
    _bad(m, t, ci, co[:, :, :, :4], "context images and labels differ")
    _bad(m, t, ci[:, :1], co, "context images and labels differ")
    _bad(m, t, ci[:, :0], co[:, :0], "zero contexts")
    _bad(m, t[0], ci, co, "must have 5 dims")
    _bad(m, t, ci[:, 0], co, "must have 6 dims")
    _bad(m, torch.cat([t, t], 1), ci, co, "in_channels=1")
    _bad(m, t, ci, torch.cat([co, co], 2), "out_channels=1")
    _bad(m, t[..., :4], ci, co, "spatial sizes differ")
    _bad(m, t.repeat(2, 1, 1, 1, 1), ci, co, "batch sizes differ")
    _bad(m, t.long(), ci, co, "floating-point", TypeError)
    bad = ci.clone()
    bad[0, 1, 0, 2, 2, 2] = float("nan")
    _bad(m, t, bad, co, "context_in contains NaN or Inf")
    tinf = t.clone()
    tinf[0, 0, 0, 0, 0] = float("inf")
    _bad(m, tinf, ci, co, "target_in contains NaN or Inf")
    m.check_finite = False
    with torch.no_grad():
        assert torch.isnan(m(t, bad, co)).any()  # check disabled: NaN propagates, no error
    with pytest.raises(ValueError, match="mini-context size l"):
        m(t, ci, co, 0)
    with pytest.raises(ValueError, match="'auto'"):
        m(t, ci, co, "all")


def test_conv_macs_formula_matches_flop_counter():
    # Count the real convs of a forward (meta tensors: no compute) with FlopCounterMode directly
    # and compare with conv_macs (vicl_fast.flops), both paths, target part and per-context part.
    with torch.device("meta"):
        m = Neuroverse3D()
    S = (64, 64, 64)
    counted, _ = count_forward_flops(m, S[0])
    for fast in (False, True):
        macs = m.conv_macs(S, 1, fast=fast)
        per_ctx = (counted[fast, 2] - counted[fast, 1]) // 2
        target = (counted[fast, 1] - 2 * per_ctx) // 2
        assert per_ctx == macs["per_context"], (fast, per_ctx, macs)
        assert target == macs["target"], (fast, target, macs)
    # the notes: ~1.29 TFLOP target branch + ~1.054 TFLOP per context at 128^3 (authors' order)
    ref = m.conv_macs((128,) * 3, 8, fast=False)
    assert math.isclose(2 * ref["target"] / 1e12, 1.29, rel_tol=0.01), ref
    assert math.isclose(2 * ref["per_context"] / 1e12, 1.054, rel_tol=0.01), ref
    assert math.isclose(2 * ref["total"] / 1e12, 9.7, rel_tol=0.01), ref
    fast = m.conv_macs((128,) * 3, 8, fast=True)
    assert fast["total"] < ref["total"]


@pytest.mark.slow  # inductor's C++ compile: ~15 s warm, ~60 s with a cold cache on 2 shared cores
def test_compile_parts_matches_eager():
    m = _tiny(torch.float32, channels=(4, 8, 16))
    t, ci, co = _inputs(L=3, dtype=torch.float32)
    ref = m.predict(t, ci, co, 2)
    m.compile_parts(dynamic=False)
    y = m.predict(t, ci, co, 2)
    m.uncompile_parts()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_compile_parts_traces_without_graph_breaks():
    """Dynamo + AOTAutograd (no code generation, fast) trace every part in one graph
    (inference; training recompiles the same code with grad); the oneDNN eager
    fusions are skipped while compiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    m = _tiny(torch.float32, channels=(4, 8, 16))
    t, ci, co = _inputs(L=3, S=(8, 8, 8), dtype=torch.float32)
    ref = m.predict(t, ci, co, 2)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    m.compile_parts(backend=counter, fullgraph=True)
    try:
        y = m.predict(t, ci, co, 2)
    finally:
        m.uncompile_parts()
        torch._dynamo.reset()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert counter.frame_count >= 4  # encode_target, target_context, encode_contexts, decode


@pytest.mark.gpu
def test_gpu_fast_equals_reference_and_bf16():
    torch.manual_seed(0)
    m = Neuroverse3D(channels=(8, 16, 32)).cuda()
    t, ci, co = (x.float().cuda() for x in _inputs(B=2, L=3, S=(16, 16, 16), dtype=torch.float32))
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = m.predict(t, ci, co, 2, fast=False)
    y = m.predict(t, ci, co, 2, fast=True)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb = m.predict(t, ci, co, 1)
        yb_ref = m.predict(t, ci, co, 1, fast=False)
    # flash-attention's rule: the error of the fast path at most 2x (+eps) that of the reference path in bf16
    assert (yb.float() - ref).abs().max() <= 2 * (yb_ref.float() - ref).abs().max() + 1e-3
