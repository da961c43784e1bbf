"""Generic suite over every registered 2D vICL model (timm style).

A model is a 2D vICL model when its class sets ``vicl_2d = True`` (subclasses of
:class:`vicl_fast.models.randp.VICL2DModel` do). Every such model found through
``list_models()`` is covered: ``*_tiny`` models run forward / backward on CPU
at their own ``img_size`` (or ``test_img_size``); full-size models are built on
the meta device where possible (no memory) and must have a ``*_tiny`` sibling.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vicl_fast.models import create_model, list_models
from vicl_fast.models.randp import randp_loss


def _build_cheap(name: str) -> torch.nn.Module:
    """Build on the meta device (no memory); some libraries (MONAI's SwinUNETR calls .item()
    at init) cannot, and are built on the CPU instead."""
    try:
        with torch.device("meta"):
            return create_model(name)
    except (RuntimeError, NotImplementedError):
        return create_model(name)


@functools.lru_cache(maxsize=None)
def _model_class(name: str):
    return type(_build_cheap(name))


_NEEDS_MONAI: set[str] = set()  # models that cannot be built here because MONAI (optional) is missing


def _is_2d(name: str) -> bool:
    try:
        return bool(getattr(_model_class(name), "vicl_2d", False))
    except ImportError:  # only RandP's MONAI-built U-Net backbones (2D) need an optional library
        _NEEDS_MONAI.add(name)
        return True


def _cases(names):
    return [pytest.param(n, marks=pytest.mark.skip(reason="needs MONAI (optional): pip install "
                                                          "'vicl_fast[unets]'")) if n in _NEEDS_MONAI else n
            for n in names]


MODELS_2D = [n for n in list_models() if _is_2d(n)]
TINY = [n for n in MODELS_2D if n.endswith("_tiny")]
FULL = [n for n in MODELS_2D if not n.endswith("_tiny")]


def _inputs(model, B=2, seed=0):
    S = getattr(model, "test_img_size", None) or model.img_size
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, model.in_chans, S, S, generator=g) for _ in range(3)]


def test_suite_found_the_models():
    for name in ("randp_vit_l", "randp_vit_tiny", "painter_vit_l", "painter_vit_tiny"):
        assert name in MODELS_2D
    assert "neuroverse3d" not in MODELS_2D  # the 3D model has another interface


@pytest.mark.parametrize("name", _cases(FULL))
def test_full_size_model_builds_and_has_tiny_sibling(name):
    m = _build_cheap(name)
    assert sum(p.numel() for p in m.parameters()) > 1_000_000
    for attr in ("in_chans", "size_divisor", "img_size"):
        assert isinstance(getattr(m, attr), int), attr
    prefix = name.rsplit("_", 1)[0] + "_"
    assert name + "_tiny" in TINY or any(t.startswith(prefix) for t in TINY), \
        f"register a tiny variant of {name} (e.g. {name}_tiny) so the generic suite can run it"


@pytest.mark.parametrize("name", _cases(TINY))
def test_forward_backward_every_param_gets_a_gradient(name):
    model = create_model(name).train()
    pi, pl, qi = _inputs(model)
    pred, logits = model.forward_with_logits(pi, pl, qi)
    B, _, H, W = qi.shape
    assert pred.shape == (B, 3, H, W)
    assert torch.isfinite(pred).all()
    target = torch.rand_like(pred)
    if logits is not None:
        assert logits.dim() == 2 and logits.shape[0] == B and torch.isfinite(logits).all()
        loss = randp_loss(pred, target, logits, torch.arange(B) % logits.shape[1])
    else:
        loss = randp_loss(pred, target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("name", _cases(TINY))
def test_forward_sets_last_task_logits_and_is_deterministic(name):
    model = create_model(name).eval()
    x = _inputs(model)
    with torch.no_grad():
        a = model(*x)
        logits = model.last_task_logits
        b = model(*x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, logits2 = model.forward_with_logits(*x)
    assert (logits is None) == (logits2 is None)


@pytest.mark.parametrize("name", _cases(TINY))
def test_samples_are_independent(name):
    """Sample 0's output must not depend on the rest of the batch (catches batch-mixing bugs)."""
    model = create_model(name).eval()
    x = _inputs(model, B=3)
    with torch.no_grad():
        full = model(*x)
        one = model(*(t[:1] for t in x))
    torch.testing.assert_close(one[0], full[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", _cases(TINY))
def test_clear_errors_on_bad_inputs(name):
    model = create_model(name).eval()
    pi, pl, qi = _inputs(model)
    S, k = qi.shape[-1], model.size_divisor
    with pytest.raises(ValueError, match="differs from query_image"):
        model(pi[..., : S - k, : S - k], pl[..., : S - k, : S - k], qi)
    if k > 1:
        cut = S - k // 2
        with pytest.raises(ValueError, match=f"multiple of {k}"):
            model(pi[..., :cut, :cut], pl[..., :cut, :cut], qi[..., :cut, :cut])
    wrong = model.in_chans + 1
    with pytest.raises(ValueError, match="channels"):
        model(*(t[:, :1].expand(-1, wrong, -1, -1) for t in (pi, pl, qi)))


@pytest.mark.parametrize("works", [True, False])
def test_xformers_probe_falls_back_to_sdpa(monkeypatch, works):
    """An xformers that imports but cannot run (a wheel for another torch: "No operator found")
    is probed once per (device type, dtype) and replaced by SDPA with one warning."""
    import sys
    import types

    from vicl_fast.models import vit

    calls = []

    def mea(q, k, v):
        calls.append(q.dtype)
        if not works:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        return q

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=mea)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(vit, "_XFORMERS", True)
    monkeypatch.setattr(vit, "_XFORMERS_WORKS", {})
    dev = torch.device("cpu")
    if works:
        assert vit.xformers_works(dev, torch.float32) is True
    else:
        with pytest.warns(RuntimeWarning, match="xformers attention unusable"):
            assert vit.xformers_works(dev, torch.float32) is False
    assert vit.xformers_works(dev, torch.float32) is works  # cached: probed once
    assert calls == [torch.float32]
    monkeypatch.setattr(vit, "_XFORMERS", False)
    assert vit.xformers_works(dev, torch.bfloat16) is False  # not importable: no probe
