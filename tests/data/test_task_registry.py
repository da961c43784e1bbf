"""The task registry (one definition per task, one name across 2D and 3D) and the resampling module."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from vicl_fast.data import resample as rs
from vicl_fast.data import task_registry as reg

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "neuroverse3d_table3.txt"


# ------------------------------------------------------------------- registry
def test_every_task_has_its_fields():
    from vicl_fast.data import metrics, tasks2d, tasks3d
    from vicl_fast.losses import LOSSES

    assert list(reg.TASKS) == [t.name for t in reg.TASKS.values()]
    for name, t in reg.TASKS.items():
        assert isinstance(t, reg.TaskDef) and t.name == name and t.summary and t.table3_row
        assert t.kind in ("seg", "gen") and t.dims and t.dims <= {2, 3}
        assert t.rate > 0 and t.weight > 0 and t.rate_2d > 0 and t.weight_2d > 0
        for d in t.dims:
            assert t.loss(d) in LOSSES
            assert t.metrics(d) and all(hasattr(metrics, m) for m in t.metrics(d))
        # the synthesis of a task is the family of its name in tasks3d / tasks2d
        assert (name in tasks3d.FAMILIES_3D) == (3 in t.dims)
        assert (name in tasks2d.FAMILIES_2D) == (2 in t.dims)
        with pytest.raises(dataclasses.FrozenInstanceError):
            t.weight = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        reg.TASKS["new"] = reg.TASKS["segmentation"]  # type: ignore[index]
    seg, noise = reg.TASKS["segmentation"], reg.TASKS["gaussian_noise"]
    assert (seg.loss(3), seg.metrics(3), seg.loss(2), seg.metrics(2)) == (
        "modified_smooth_l1", ("dice",), "smooth_l1", ("dice",))
    assert (noise.loss(3), noise.metrics(3), noise.metrics(2)) == ("generation", ("psnr",), ("psnr", "ssim"))
    with pytest.raises(ValueError, match="3D only"):
        reg.TASKS["slices_to_volume"].loss(2)


def test_table3_values_are_the_papers():
    """Rates and weights of every 3D task equal the supplement's Table 3 (tests/fixtures), row by row."""
    rows = {}
    for line in FIXTURE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            row, rate, weight = line.rsplit(" ", 2)
            rows[row] = (float(rate), float(weight))
    assert len(rows) == 9
    assert [t.table3_row for t in reg.TASKS.values()] == list(rows)  # every row, in the paper's order
    for t in reg.TASKS.values():
        assert (t.rate, t.weight) == rows[t.table3_row], t.name
    assert reg.default_tasks(3) == tuple((t.name, *rows[t.table3_row]) for t in reg.TASKS.values())
    assert reg.default_tasks(3, ["gaussian_noise", "segmentation"]) == (
        ("gaussian_noise", 1.0, 1.0), ("segmentation", 2.0, 50.0))


def test_one_name_per_task_across_2d_and_3d():
    assert reg.task_names(2) == ("segmentation", "gaussian_noise", "super_resolution", "modality_transform")
    assert set(reg.task_names(2)) < set(reg.task_names(3)) == set(reg.TASKS)
    assert reg.default_tasks(2) == tuple((n, 1.0, 1.0) for n in reg.task_names(2))
    assert dict(reg.ALIASES) == {"denoising": "gaussian_noise", "synthesis": "modality_transform"}
    assert reg.overlay_tasks() == (
        "bias_field", "gaussian_noise", "salt_pepper", "inpainting", "super_resolution")
    assert (reg.family_dims("neuroverse3d"), reg.family_dims("randp")) == (3, 2)
    with pytest.raises(ValueError, match="unknown task 'denoise'.*gaussian_noise"):
        reg.get_task("denoise")


def test_old_names_are_accepted_with_a_warning():
    with pytest.warns(reg.DeprecatedTaskNameWarning, match="'denoising' -> 'gaussian_noise'"):
        assert reg.get_task("denoising") is reg.TASKS["gaussian_noise"]
    with pytest.warns(reg.DeprecatedTaskNameWarning) as rec:
        names = reg.canonical_names(["synthesis", "segmentation", "denoising", "synthesis"])
    assert names == ["modality_transform", "segmentation", "gaussian_noise", "modality_transform"]
    assert len(rec) == 1 and "'synthesis' -> 'modality_transform'" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # canonical names never warn
        assert reg.canonical_names(reg.task_names(3)) == list(reg.task_names(3))


def test_old_names_in_a_config_and_in_2d_task_synthesis():
    from vicl_fast.data import tasks2d
    from vicl_fast.training import config_from_dict

    raw = {"model": {"name": "randp_vit_tiny"},
           "data": {"datasets": [{"name": "d", "path": "demo", "tasks": ["denoising", "segmentation"]}],
                    "grid": [32, 32], "tasks": [{"name": "denoising"}, {"name": "synthesis", "rate": 2}]}}
    with pytest.warns(reg.DeprecatedTaskNameWarning) as rec:
        cfg = config_from_dict(raw)
    assert len([w for w in rec if issubclass(w.category, reg.DeprecatedTaskNameWarning)]) == 1
    assert [(t.name, t.rate) for t in cfg.data.tasks] == [
        ("gaussian_noise", 1.0), ("modality_transform", 2.0)]
    assert cfg.data.datasets[0].tasks == ["gaussian_noise", "segmentation"]
    from vicl_fast.data.tasks3d import Subject

    subj = [Subject("a", np.zeros((8, 8, 8), np.float32))]
    with pytest.warns(reg.DeprecatedTaskNameWarning):
        old = tasks2d.sample_task_2d(subj, np.random.default_rng(4), family="denoising")
    new = tasks2d.sample_task_2d(subj, np.random.default_rng(4), family="gaussian_noise")
    assert old == new and old.family == "gaussian_noise"


# ------------------------------------------------------------------- resampling
_LABEL_VALUES = np.array([0, 3, 7, 250])


@pytest.mark.parametrize("shape_in, shape_out", [((9, 7), (20, 5)), ((6, 5, 7), (11, 3, 9))])
@pytest.mark.parametrize("rule", ["center", "floor"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, bool])
def test_label_nearest_keeps_the_label_set(shape_in, shape_out, rule, dtype):
    lab = _LABEL_VALUES[np.random.default_rng(0).integers(0, 4, shape_in)]
    lab = (lab > 5) if dtype is bool else lab.astype(dtype)
    out = rs.resize_label(lab, shape_out, rule=rule)
    assert out.shape == shape_out and out.dtype == lab.dtype
    assert set(np.unique(out)) <= set(np.unique(lab))
    # reference: torch's own nearest modes on the float map
    mode = "nearest-exact" if rule == "center" else "nearest"
    ref = F.interpolate(torch.from_numpy(lab.astype(np.float32))[None, None], size=shape_out, mode=mode)[0, 0]
    np.testing.assert_array_equal(out.astype(np.float32), ref.numpy())
    assert rs.resize_label(lab, shape_in, rule=rule) is lab


@pytest.mark.parametrize("ndim", [2, 3])
def test_label_integer_upsampling_repeats_voxels(ndim):
    lab = _LABEL_VALUES[np.random.default_rng(1).integers(0, 4, (4,) * ndim)].astype(np.int64) + 2**40
    ref = lab
    for ax in range(ndim):
        ref = np.repeat(ref, 3, axis=ax)
    np.testing.assert_array_equal(rs.resize_label(lab, (12,) * ndim), ref)  # exact beyond float32's range


@pytest.mark.parametrize("shape_in, shape_out", [((7, 9), (15, 4)), ((12, 10), (5, 21)),
                                                 ((5, 6, 4), (9, 3, 8)), ((6, 6, 6), (3, 12, 6))])
def test_image_linear_matches_scipy_zoom(shape_in, shape_out):
    """Bilinear / trilinear with voxel centres aligned = SciPy's zoom in grid mode with edge replication."""
    x = np.random.default_rng(2).random(shape_in).astype(np.float32)
    out = rs.resize_image(x, shape_out)
    zoom = [o / i for o, i in zip(shape_out, shape_in)]
    ref = ndimage.zoom(x.astype(np.float64), zoom, order=1, grid_mode=True, mode="nearest")
    assert out.shape == shape_out and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(rs.resize_image(x, shape_in), x)


def test_image_antialias_2d_matches_pillow_and_batches():
    from PIL import Image

    x = np.random.default_rng(3).random((40, 30)).astype(np.float32)
    ref = np.asarray(Image.fromarray(x, "F").resize((11, 13), Image.BILINEAR))
    np.testing.assert_allclose(rs.resize_image(x, (13, 11), antialias=True), ref, atol=1e-6)
    rgb = np.stack([x, 1 - x, x * x])  # leading dims are resized independently
    out = rs.resize_image(rgb, (13, 11), antialias=True, clip=(0.1, 0.9))
    for c in range(3):
        one = rs.resize_image(rgb[c], (13, 11), antialias=True, clip=(0.1, 0.9))
        np.testing.assert_array_equal(out[c], one)
    assert out.min() >= 0.1 and out.max() <= 0.9
    with pytest.raises(ValueError, match="antialias"):
        rs.resize_image(np.zeros((4, 4, 4)), (2, 2, 2), antialias=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_resample_2d_and_3d(ndim):
    x = np.random.default_rng(4).random((6,) * ndim)
    shift = np.eye(ndim + 1)
    shift[:ndim, ndim] = 1  # output voxel v samples input voxel v + 1
    out = rs.affine_resample(x, shift, (5,) * ndim, order=1)
    np.testing.assert_allclose(out, x[(slice(1, None),) * ndim], atol=1e-6)
    lab = x > 0.5
    got = rs.affine_resample(lab, shift, (5,) * ndim, order=0)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, lab[(slice(1, None),) * ndim])
    half = np.diag([2.0] * ndim + [1.0])  # 2x downsampling: Gaussian sigma (2 - 1) / 2
    np.testing.assert_array_equal(rs.antialias_sigma(half), [0.5] * ndim)
    with pytest.raises(ValueError, match="index map"):
        rs.affine_resample(x, np.eye(ndim), (5,) * ndim, order=1)
    with pytest.raises(ValueError, match="order must be 0, 1 or 3"):
        rs.affine_resample(x, shift, (5,) * ndim, order=2)


@pytest.mark.parametrize("mode", ["nearest", "constant"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_cubic_affine_resample_equals_scipy(ndim, mode):
    """order=3: axis-aligned maps (zooms, flips, shifts) take the separable path, others SciPy's n-D one;
    both must equal SciPy's n-D cubic B-spline (prefiltered) in float64."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    x = rng.random((17, 23, 12)[:ndim])
    aligned = np.diag([0.7, -1.3, 1.1][:ndim] + [1.0])
    aligned[:ndim, ndim] = [0.3, 25.0, -0.2][:ndim]
    oblique = aligned.copy()
    oblique[0, 1] = 0.2
    for M in (aligned, oblique):
        out_shape = (21, 19, 14)[:ndim]
        got = rs.affine_resample(x, M, out_shape, order=3, mode=mode)
        ref = ndimage.affine_transform(x, M[:ndim, :ndim], offset=M[:ndim, ndim], output_shape=out_shape, order=3,
                                       mode=mode, prefilter=True)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-6)
        assert np.ptp(ref) > 0.5  # a real field, not a constant
