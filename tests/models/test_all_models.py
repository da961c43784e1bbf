"""One generic test over every registered model (timm style): forward, backward, every parameter
gets a finite gradient.

Every name of ``vicl_fast.models.list_models()`` is built through ``create_model`` at its smallest
sensible size and trained for one step's worth of autograd on a tiny random input:

- ``*_tiny`` models as registered (they are the test-size configurations).
- Full-size models with the registered preset (width, heads, RandP module, backbone, decoder
  sizes) and only depth and image size reduced (:data:`SMALL`): the factory's own configuration
  is what is checked, at a cost of seconds instead of minutes. Neuroverse3D is cheap enough at
  16^3 to run exactly as registered.
- Neuroverse3D once more with ``spatial_dims=2`` (its 2D form, same factory).

Interfaces (the model families' documented forwards):

- 2D vICL models (``vicl_2d = True``): ``forward_with_logits(prompt_image, prompt_label,
  query_image)``, each (B, in_chans, S, S) -> (pred (B, out_chans, S, S), logits (B, T) | None).
- Neuroverse3D: ``forward(target_in (B, C_in, *S), context_in (B, L, C_in, *S), context_out
  (B, L, C_out, *S))`` -> (B, C_out, *S).

Models that need MONAI (an optional dependency: ``pip install 'vicl_fast[unets]'``) are skipped
with that reason when it is missing.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from vicl_fast.models import create_model, list_models

# Full-size model -> overrides that make it cheap without changing what its factory configures
# (embed_dim, num_heads, merge_idx, RandP module, backbone, decoder widths stay as registered).
_VIT_SMALL = dict(depth=4, img_size=32)  # 4 blocks: the decoder's 4 evenly spaced taps are distinct blocks
SMALL: dict[str, dict] = {
    "randp_vit_l": _VIT_SMALL,
    "randp_vit_b": _VIT_SMALL,
    "randp_vit_s": _VIT_SMALL,
    "painter_vit_l": _VIT_SMALL,  # merge_idx 2 (the preset) < depth 4
    "painter_vit_b": _VIT_SMALL,
    "promptgip_vit_l": dict(depth=2, decoder_depth=1, img_size=32),
    "mae_vqgan_vit_l": dict(depth=2, decoder_depth=1, img_size=32),
    # RandP-U-Nets: backbone and 2-layer 1024-d RandP module as registered, at the smallest image
    # size: 2 RandP patches per side, and for SwinUNETR a stride-32 stage > 1x1 (MONAI's instance
    # norm needs more than one value per channel in training).
    "randp_swinunetr": dict(img_size=64),
    "randp_uxnet": dict(img_size=32),
    "randp_restormer": dict(img_size=32),
    "neuroverse3d": {},  # as released (70.9 M parameters): one forward at 16^3 takes about a second
}

# Parameters a model legitimately leaves out of the graph in this test's forward (train mode,
# no query label), by model name, each with the reason. Empty: every model uses all of its
# parameters. An entry must never hide a parameter that the forward should reach.
UNUSED: dict[str, set[str]] = {}

CASES = [pytest.param(name, {}, id=name) for name in list_models()]
CASES.append(pytest.param("neuroverse3d_tiny", {"spatial_dims": 2}, id="neuroverse3d_tiny-2d"))

_BATCH, _CONTEXTS = 2, 2


def _build(name: str, extra: dict) -> torch.nn.Module:
    if not name.endswith("_tiny") and name not in SMALL:
        pytest.fail(f"{name} is a full-size model without an entry in SMALL: add the overrides that "
                    f"make it cheap (depth, image size), or register it as {name}_tiny if it is one")
    try:
        return create_model(name, **SMALL.get(name, {}), **extra)
    except ImportError as e:
        if importlib.util.find_spec("monai") is None and "monai" in str(e).lower():
            pytest.skip(f"{name} needs MONAI (optional): pip install 'vicl_fast[unets]'")
        raise


def _forward(model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
    """(prediction, every output, the prediction's expected shape) on a tiny random input."""
    B, L = _BATCH, _CONTEXTS
    if getattr(model, "vicl_2d", False):
        S = getattr(model, "test_img_size", None) or model.img_size
        pi, pl, qi = (torch.rand(B, model.in_chans, S, S, generator=g) for _ in range(3))
        pred, logits = model.forward_with_logits(pi, pl, qi)
        outs = [pred] if logits is None else [pred, logits]
        if logits is not None:
            assert logits.dim() == 2 and logits.shape[0] == B, tuple(logits.shape)
        return pred, outs, (B, getattr(model, "out_chans", 3), S, S)
    # Neuroverse3D (2D or 3D): the smallest size its stages allow (2^(stages-1) per axis)
    S = (model.multiple,) * model.spatial_dims
    t = torch.rand(B, model.in_channels, *S, generator=g)
    ci = torch.rand(B, L, model.in_channels, *S, generator=g)
    co = (torch.rand(B, L, model.out_channels, *S, generator=g) > 0.5).float()
    pred = model(t, ci, co)
    return pred, [pred], (B, model.out_channels, *S)


@pytest.mark.parametrize("name, extra", CASES)
def test_forward_backward_every_parameter_gets_a_finite_gradient(name, extra):
    model = _build(name, extra).train()
    g = torch.Generator().manual_seed(0)
    pred, outs, shape = _forward(model, g)
    assert tuple(pred.shape) == shape, f"{name}: output {tuple(pred.shape)}, expected {shape}"
    for o in outs:
        assert torch.isfinite(o).all(), f"{name}: non-finite output of shape {tuple(o.shape)}"
    loss = sum(o.float().square().mean() for o in outs)  # a scalar that depends on every output
    assert loss.dim() == 0
    loss.backward()
    allowed = UNUSED.get(name, set())
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params, f"{name} has no trainable parameters"
    missing = [n for n, p in params if p.grad is None and n not in allowed]
    assert not missing, f"{name}: {len(missing)} of {len(params)} parameters got no gradient: {missing}"
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad}"
    stale = sorted(n for n in allowed if dict(params)[n].grad is not None)
    assert not stale, f"{name}: UNUSED lists parameters that do get a gradient now: {stale}"


def test_every_registered_model_is_a_case():
    """New registrations are covered automatically; full-size ones must say how to shrink them."""
    names = list_models()
    assert {c.values[0] for c in CASES} == set(names)
    assert {"neuroverse3d", "neuroverse3d_tiny", "randp_vit_tiny"} <= set(names)
    assert set(SMALL) <= set(names), f"SMALL names unregistered models: {sorted(set(SMALL) - set(names))}"
    assert set(UNUSED) <= set(names)
