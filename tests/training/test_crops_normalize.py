"""Training episodes on random windows of the grid (``data.crop``) and normalised as inference normalises
(``data.normalize``): the demo model's recipe (train/configs/demo_cpu.yaml)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.training._toy import _nv_raw, _write_dataset
from vicl_fast.data.preprocess import normalize_intensity
from vicl_fast.data.tasks3d import random_crop_start
from vicl_fast.training import ConfigError, config_from_dict
from vicl_fast.training.datasets import EpisodeDataset, build_sources, resolve_tasks


def _dataset(tmp_path, split="train", **data):
    raw = _nv_raw(_write_dataset(tmp_path / "d", n=5, shape=(30, 34, 28)), tmp_path / "run")
    raw["data"].update(grid=[32, 32, 32], **data)
    cfg = config_from_dict(raw)
    sources = build_sources(cfg)
    tasks, providers = resolve_tasks(cfg, sources)
    return EpisodeDataset(cfg, sources, tasks, providers, split=split), tasks


def test_crop_gives_windows_and_validation_stays_whole(tmp_path):
    ds, tasks = _dataset(tmp_path, crop=[16, 16, 16])
    seg = [i for i, t in enumerate(tasks) if t.name == "segmentation"][0]
    fg = []
    for step in range(12):
        ep = ds[(step, 0)]
        assert ep["target_in"].shape == (1, 16, 16, 16) and ep["context_in"].shape[2:] == (16, 16, 16)
        if ep["task"] == seg:
            fg.append(float(ep["target_out"].mean()))
    assert fg and max(fg) > 0  # windows do show the structure
    val, _ = _dataset(tmp_path / "v", split="val", crop=[16, 16, 16])
    assert val[(0, 0)]["target_in"].shape == (1, 32, 32, 32)


def test_normalize_maps_percentiles_to_unit_range_as_inference_does(tmp_path):
    ds, tasks = _dataset(tmp_path, normalize=True)
    raw, _ = _dataset(tmp_path / "r", normalize=False)
    gen = [i for i, t in enumerate(tasks) if t.name == "gaussian_noise"][0]
    seen = 0
    for step in range(16):
        ep, ep_raw = ds[(step, 0)], raw[(step, 0)]
        x, x_raw = ep["target_in"].numpy(), ep_raw["target_in"].numpy()
        # The same draw (the flag only adds the normalisation): the normalised input is the raw one,
        # normalised on its own 2 / 98 percentiles.
        np.testing.assert_allclose(x, normalize_intensity(x_raw)[0], atol=1e-6)
        if ep["task"] == gen:
            seen += 1
            assert x_raw.min() < 0  # the noise leaves [0, 1] before normalisation
            assert x.min() >= 0 and x.max() <= 1
            np.testing.assert_allclose(ep["target_out"].numpy(), normalize_intensity(ep_raw["target_out"].numpy())[0],
                                       atol=1e-6)
        else:  # segmentation labels are left as they are
            np.testing.assert_array_equal(ep["target_out"].numpy(), ep_raw["target_out"].numpy())
    assert seen


def test_random_crop_start_is_inside_and_centred_on_the_focus():
    rng = np.random.default_rng(0)
    focus = np.zeros((64, 64, 64), bool)
    focus[40, 20, 33] = True
    assert random_crop_start((64, 64, 64), (32, 32, 32), rng, focus) == (24, 4, 17)
    focus[:] = False
    focus[63, 0, 5] = True  # near a corner: the window is clamped inside
    assert random_crop_start((64, 64, 64), (32, 32, 32), rng, focus) == (32, 0, 0)
    for _ in range(20):
        s = random_crop_start((40, 50, 60), (16, 32, 48), rng)
        assert all(0 <= a <= n - c for a, n, c in zip(s, (40, 50, 60), (16, 32, 48)))
    with pytest.raises(ValueError, match="larger than the volume"):
        random_crop_start((16, 16, 16), (32, 32, 32), rng)


@pytest.mark.parametrize("crop", [[20, 16, 16], [16, 16], [48, 16, 16]])
def test_bad_crop_is_a_config_error(tmp_path, crop):
    raw = _nv_raw(tmp_path / "d", tmp_path / "run")
    raw["data"].update(grid=[32, 32, 32], crop=crop)
    with pytest.raises(ConfigError, match="data.crop"):
        config_from_dict(raw)
