"""Official weights: fixture outputs, key round trip, Lightning files, safe loading, mismatches;
our safetensors checkpoints."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from vicl_fast import checkpoint as ckpt
from vicl_fast.models.neuroverse3d import Neuroverse3D
from vicl_fast.models.official import (infer_official_config, load_official_neuroverse3d,
                                       to_official_state_dict)


def _fixture_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "fixtures" / "neuroverse3d"  # the repo's own copy, never ../shared


@pytest.fixture(scope="module")
def fx():
    return torch.load(_fixture_dir() / "official_tiny_seed0.pt", weights_only=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fast", [True, False])
def test_outputs_equal_official_for_every_mini_context(fx, fast):
    m = load_official_neuroverse3d(fx, fast=fast)
    assert m.channels == tuple(fx["inner_channels"])
    for l, ref in fx["outputs_by_mini_context"].items():
        y = m.predict(fx["target_in"], fx["context_in"], fx["context_out"], l)
        assert y.dtype == torch.float32
        assert _rel(y, ref) <= 1e-5, (l, _rel(y, ref))


def test_key_round_trip(fx):
    m = load_official_neuroverse3d(fx["state_dict"])  # plain state dict: config from the shapes
    sd = to_official_state_dict(m)
    assert list(sd) == list(fx["state_dict"])
    for k, v in fx["state_dict"].items():
        assert torch.equal(sd[k], v), k
    lsd = to_official_state_dict(m, lightning_prefix=True)
    assert all(k.startswith("net.") for k in lsd) and len(lsd) == 132
    m2 = load_official_neuroverse3d(lsd)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert infer_official_config(fx["state_dict"]) == dict(
        in_channels=1, out_channels=1, channels=[4, 8, 16, 32, 64], convs_per_stage=2, spatial_dims=3)


def _lightning(fx, hparams):
    sd = {"net." + k: v for k, v in fx["state_dict"].items()}
    sd["loss_fn.some_buffer"] = torch.zeros(1)  # non-network keys of a LightningModule are ignored
    return {"epoch": 3, "global_step": 10, "state_dict": sd, "hyper_parameters": hparams}


def test_lightning_checkpoint_file_loads(fx, tmp_path):
    path = tmp_path / "nv3d.ckpt"
    torch.save(_lightning(fx, {"nb_inner_channels": [4, 8, 16, 32, 64], "nb_conv_layers_per_stage": 2,
                               "lr": 1e-4}), path)
    m = load_official_neuroverse3d(str(path))
    y = m.predict(fx["target_in"], fx["context_in"], fx["context_out"], 2)
    assert _rel(y, fx["outputs_by_mini_context"][2]) <= 1e-5


def test_pickled_objects_need_explicit_trust(fx, tmp_path):
    path = tmp_path / "nv3d_pickled.ckpt"
    hp = argparse.Namespace(nb_inner_channels=[4, 8, 16, 32, 64], nb_conv_layers_per_stage=2)
    torch.save(_lightning(fx, hp), path)
    with pytest.raises(ValueError, match="trust_checkpoint=True") as e:
        load_official_neuroverse3d(path)
    assert "arbitrary code" in str(e.value)
    m = load_official_neuroverse3d(path, trust_checkpoint=True)
    assert m.channels == (4, 8, 16, 32, 64)


def test_inconsistent_hparams_rejected(fx):
    with pytest.raises(ValueError, match="does not match its tensors"):
        load_official_neuroverse3d(_lightning(fx, {"nb_inner_channels": [8, 16, 32, 64, 128]}))


def test_tampered_checkpoint_lists_mismatches(fx, tmp_path):
    sd = dict(fx["state_dict"])
    k_ren = "context_unet.dec_blocks.1.context_conv.module.layers.2.weight"
    sd[k_ren.replace("layers.2", "layers.9")] = sd.pop(k_ren)
    k_shape = "target_decoder.upsample_blocks.0.target_conv_layer.bias"
    sd[k_shape] = torch.zeros(7)
    path = tmp_path / "tampered.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_official_neuroverse3d(path)
    msg = str(e.value)
    assert f"missing key {k_ren}" in msg
    assert "unexpected key " + k_ren.replace("layers.2", "layers.9") in msg
    assert f"shape mismatch {k_shape}: checkpoint (7,) vs model (32,)" in msg
    assert "3 problems" in msg
    with pytest.raises(ValueError, match="not a Neuroverse3D state dict"):
        load_official_neuroverse3d({"foo.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_official_neuroverse3d(tmp_path / "nope.ckpt")


def test_safetensors_checkpoint_round_trip_and_atomic(fx, tmp_path, monkeypatch):
    m = load_official_neuroverse3d(fx)
    path = tmp_path / "sub" / "m.safetensors"
    ckpt.save_checkpoint(m, path)
    assert ckpt.read_metadata(path)["vicl_fast.model"] == "neuroverse3d"
    m2 = ckpt.load_checkpoint(path, fast=False)
    assert isinstance(m2, Neuroverse3D) and m2.channels == m.channels and not m2.fast
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(Neuroverse3D(channels=(2, 4)), path)
    assert path.read_bytes() == before  # the old file survives a failed save
    assert sorted(os.listdir(path.parent)) == ["m.safetensors"]  # no temp file left
    monkeypatch.undo()
    ckpt.save_checkpoint(m.state_dict(), tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="weights only"):
        ckpt.load_checkpoint(tmp_path / "weights.safetensors")


def test_saved_checkpoint_is_readable_by_others(tmp_path):
    """mkstemp makes 0600 files; an exported checkpoint must follow the umask like any other file."""
    import os

    from vicl_fast.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        path = tmp_path / "w.safetensors"
        save_checkpoint({"w": torch.zeros(2)}, path)
        assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
