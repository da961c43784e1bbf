"""Task synthesis (3D Neuroverse3D, 2D RandP) and augmentation: each corruption is measured back."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre
from scipy import ndimage

from vicl_fast.data import augment as aug
from vicl_fast.data import tasks2d as t2
from vicl_fast.data import tasks3d as t3
from vicl_fast.data.demo_data import load_demo_subjects


@pytest.fixture(scope="module")
def subjects():
    return load_demo_subjects(size=32)


def _smooth(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        np.clip(ndimage.gaussian_filter(rng.random(shape), 2.0) * 3 - 1, 0, 1).astype(np.float32) * 0.8 + 0.1
    )


def test_gaussian_noise_sigma_measured_back():
    x = _smooth((40, 40, 40))
    rng = np.random.default_rng(1)
    noisy, s = t3.add_gaussian_noise(x, rng, sigma=0.2)
    assert s == 0.2
    d = noisy - x
    assert abs(d.mean()) < 0.002 and d.std() == pytest.approx(0.2, rel=0.01)
    draws = [t3.add_gaussian_noise(x[:4, :4, :4], rng)[1] for _ in range(200)]
    assert 0.15 <= min(draws) and max(draws) <= 0.25 and np.ptp(draws) > 0.08  # U(0.15, 0.25)


def test_salt_and_pepper_rate():
    x = np.full((50, 50, 50), 0.5, np.float32)
    noisy, salt, pepper = t3.add_salt_pepper(x, np.random.default_rng(2), p=0.04)
    assert (noisy == 1).mean() == pytest.approx(0.04 * 0.96, abs=0.003)  # salt not overwritten by pepper
    assert (noisy == 0).mean() == pytest.approx(0.04, abs=0.003)
    assert np.all(noisy[~salt & ~pepper] == 0.5)
    assert np.all(noisy[pepper] == 0) and np.all(noisy[salt & ~pepper] == 1)


def test_bias_field_is_a_legendre_polynomial_in_log_space():
    shape = (20, 22, 24)
    x = _smooth(shape)
    out, fld = t3.apply_bias_field(x, np.random.default_rng(3), order=3)
    np.testing.assert_allclose(out, x * fld, rtol=1e-6)
    logr = np.log(out.astype(np.float64) / x)
    # Independent fit: least squares on the full tensor Legendre basis of total degree <= 3.
    xs = [np.linspace(-1, 1, s) for s in shape]
    cols = []
    for i in range(4):
        for j in range(4 - i):
            for k in range(4 - i - j):
                P = [legendre.legval(x_, np.eye(4)[d]) for x_, d in zip(xs, (i, j, k))]
                cols.append((P[0][:, None, None] * P[1][None, :, None] * P[2][None, None, :]).ravel())
    B = np.stack(cols, 1)
    coef, *_ = np.linalg.lstsq(B, logr.ravel(), rcond=None)
    assert np.abs(B @ coef - logr.ravel()).max() < 1e-5
    assert logr.std() > 0.05  # a real, non-constant field
    assert abs(coef[0]) < 1e-5  # centred on 1 (no constant term)


def test_perlin_mask_blobs_and_inpainting():
    shape = (32, 32, 32)
    rng = np.random.default_rng(4)
    mask = t3.perlin_mask(shape, rng, fraction=0.15)
    assert mask.any() and mask.mean() == pytest.approx(0.15, abs=0.01)
    # Blobs, not salt: most mask voxels have all 6 neighbours in the mask (random: ~0.15^6).
    cross = ndimage.generate_binary_structure(3, 1)
    inner = ndimage.binary_erosion(mask, cross)
    salt = rng.random(shape) < 0.15
    assert inner.sum() / mask.sum() > 0.25 > 100 * ndimage.binary_erosion(salt, cross).sum() / salt.sum()
    x = _smooth(shape)
    inp = t3.inpaint(x, mask)
    assert np.all(inp[mask] == 0) and np.array_equal(inp[~mask], x[~mask])
    region = np.zeros(shape, bool)
    region[8:24, 8:24, 8:24] = True
    m2 = t3.perlin_mask(shape, rng, fraction=0.2, region=region)
    assert m2.any() and not (m2 & ~region).any() and m2.sum() == pytest.approx(0.2 * region.sum(), rel=0.05)


def test_super_resolution_shapes_and_block_means():
    x = _smooth((33, 32, 30), seed=5)
    inp, low = t3.downsample_upsample(x, 2)
    assert low.shape == (17, 16, 15) and inp.shape == x.shape
    xp = np.pad(x, ((0, 1), (0, 0), (0, 0)), mode="edge")
    ref_low = xp.reshape(17, 2, 16, 2, 15, 2).mean((1, 3, 5))
    np.testing.assert_allclose(low, ref_low, atol=1e-6)
    # A linear ramp is reproduced exactly in the interior (block means + trilinear interpolation).
    ramp = np.add.outer(np.add.outer(np.arange(16.0), 2 * np.arange(16.0)), -np.arange(16.0)).astype(
        np.float32
    )
    up, _ = t3.downsample_upsample(ramp, 2)
    np.testing.assert_allclose(up[2:-2, 2:-2, 2:-2], ramp[2:-2, 2:-2, 2:-2], atol=1e-4)


def test_central_slices_and_skull_strip():
    x = _smooth((20, 24, 22)) + 0.1
    out = t3.central_slices(x, (5, 12, 9))
    nz = np.argwhere(out)
    assert np.all((nz[:, 0] == 5) | (nz[:, 1] == 12) | (nz[:, 2] == 9))
    np.testing.assert_array_equal(out[5], x[5])
    np.testing.assert_array_equal(out[:, :, 9], x[:, :, 9])
    brain = np.zeros(x.shape, bool)
    brain[5:15, 5:20, 5:18] = True
    y = t3.skull_strip(x, brain)
    assert not y[~brain].any() and np.array_equal(y[brain], x[brain])


def test_label_task_transforms():
    lab = np.zeros((9, 9, 9), np.int32)
    lab[4, 4, 4] = 3
    lab[0:2, 0:2, 0:2] = 5
    assert t3.group_classes(lab, [3]).sum() == 1 and t3.group_classes(lab, [3, 5]).sum() == 9
    one = lab == 3
    assert t3.dilate_mask(one).sum() == 7  # 6-connected: the voxel and its 6 faces
    cube = np.zeros((9, 9, 9), bool)
    cube[2:7, 2:7, 2:7] = True
    assert t3.erode_mask(cube).sum() == 27 and t3.dilate_mask(cube).sum() == 125 + 6 * 25
    assert t3.invert_mask(cube).sum() == 729 - 125
    sob = t3.sobel_label(cube)
    assert sob.max() == pytest.approx(1.0) and sob[4, 4, 4] == 0 and sob[0, 0, 8] == 0
    assert np.all(sob[cube ^ t3.erode_mask(cube)] > 0)  # the boundary lights up


@pytest.mark.parametrize("family", t3.FAMILIES_3D)
def test_every_3d_family_runs_and_is_seeded(subjects, family):
    rng = np.random.default_rng(10)
    pool = [s for s in subjects if s.has_skull] if family == "skull_stripping" else subjects
    spec = t3.sample_task(pool, rng, family=family)
    a = t3.apply_task(spec, pool[0], np.random.default_rng(7))
    b = t3.apply_task(spec, pool[0], np.random.default_rng(7))
    for u, v in zip(a, b):
        assert u.shape == (32, 32, 32) and u.dtype == np.float32 and np.isfinite(u).all()
        np.testing.assert_array_equal(u, v)  # same seed, same pair
    inp, out = a
    if family == "segmentation":
        assert set(np.unique(out)) <= {0.0, 1.0} or spec.params["sobel"]
        assert out.any()
    else:
        assert not np.array_equal(inp, out)  # a real corruption / transformation


def test_skull_stripping_needs_skull(subjects):
    icbm = [s for s in subjects if not s.has_skull]
    with pytest.raises(ValueError, match="skull"):
        t3.sample_task(icbm, np.random.default_rng(0), family="skull_stripping")


def test_task_overlap_and_episode(subjects):
    rng = np.random.default_rng(11)
    spec = t3.sample_task(subjects, rng, family="gaussian_noise", overlay_p=1.0)
    assert set(spec.overlays) == set(t3.OVERLAY_FAMILIES) - {"gaussian_noise"}
    ep = t3.sample_episode(
        subjects, rng, n_context=3, spec=t3.sample_task(subjects, rng, family="segmentation", classes=None)
    )
    assert ep.target_in.shape == (1, 32, 32, 32) and ep.context_in.shape == (3, 1, 32, 32, 32)
    assert ep.context_out.shape == (3, 1, 32, 32, 32) and len(ep.names) == 4
    # Grouped classes are shared by every pair of the episode.
    spec = t3.sample_task(subjects, np.random.default_rng(3), family="segmentation", seg_probs={"group": 1.0})
    assert spec.params["source"] == "label_map" and 1 <= len(spec.params["classes"]) <= 10


def test_segmentation_task_augmentations(subjects):
    s = subjects[1]
    base = dict(source="mask", name="wm", sobel=False, invert=False, dilate=False, erode=False)
    m = s.masks["wm"]
    for flag, expect in (("invert", ~m), ("dilate", t3.dilate_mask(m)), ("erode", t3.erode_mask(m))):
        spec = t3.TaskSpec("segmentation", {**base, flag: True})
        _, out = t3.apply_task(spec, s, np.random.default_rng(0), augment=False)
        np.testing.assert_array_equal(out.astype(bool), expect)


def test_augmentation_reproducible_and_aligned():
    r = np.linalg.norm(np.indices((24, 24, 24)) - np.array([11, 12, 10.5])[:, None, None, None], axis=0)
    img = np.clip(1.0 - r / 16.0, 0, 1).astype(np.float32)  # smooth ball: threshold 0.5 -> radius 8
    lab = (img > 0.5).astype(np.uint8)
    probs = {k: 1.0 for k in aug.PAPER_PROBS}
    a = aug.augment_subject(img, [lab], np.random.default_rng(5), probs)
    b = aug.augment_subject(img, [lab], np.random.default_rng(5), probs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][0], b[1][0])
    assert set(a[3]) == set(aug.PAPER_PROBS)
    # Flips are exact and move image and label together.
    M = aug.random_flip_matrix(np.random.default_rng(0), img.shape)
    (fi,), (fl,) = aug.apply_spatial([img], [lab], M)
    axes = tuple(i for i in range(3) if M[i, i] < 0)
    np.testing.assert_allclose(fi, np.flip(img, axes), atol=1e-6)
    np.testing.assert_array_equal(fl, np.flip(lab, axes))
    # Same warp on image and label: the warped label is the threshold of the warped image (up to interp.).
    M = aug.random_affine_matrix(np.random.default_rng(1), img.shape)
    d = aug.elastic_displacement(np.random.default_rng(2), img.shape)
    (wi,), (wl,) = aug.apply_spatial([img], [lab], M, d)
    agree = ((wi > 0.5) == wl.astype(bool)).mean()
    assert agree > 0.97 and not np.array_equal(wl, lab)


def test_gin_and_intensity_ops():
    x = _smooth((16, 16, 16))
    rng = np.random.default_rng(0)
    p = aug.sample_gin(rng, ndim=3)
    g1, g2 = aug.apply_gin(x, p), aug.apply_gin(x, p)
    np.testing.assert_array_equal(g1, g2)
    assert g1.min() == 0.0 and g1.max() == pytest.approx(1.0)
    assert not np.allclose(g1, (x - x.min()) / np.ptp(x), atol=1e-3) or p.alpha < 0.05
    inv = aug.intensity_inversion(x)
    np.testing.assert_allclose(inv + x, x.max() + x.min(), rtol=1e-6)


def test_2d_grid_layout_and_colors():
    H = 8
    parts = [np.full((3, H, H), v, np.float32) for v in (1, 2, 3, 4)]
    g = t2.make_grid(*parts)
    assert g.shape == (3, 2 * H, 2 * H)
    assert g[0, 0, 0] == 1 and g[0, 0, H] == 2 and g[0, H, 0] == 3 and g[0, H, H] == 4
    for a, b in zip(t2.split_grid(g), parts):
        np.testing.assert_array_equal(a, b)
    assert t2.make_grid(*parts[:3])[:, H:, H:].sum() == 0  # masked query label
    pal = t2.label_palette(6)
    lab = np.random.default_rng(0).integers(0, 6, size=(10, 12))
    rgb = t2.colorize(lab, pal)
    noisy = rgb + np.random.default_rng(1).normal(0, 0.05, rgb.shape)
    np.testing.assert_array_equal(t2.decode_colors(noisy, pal), lab)


@pytest.mark.parametrize("family", t2.FAMILIES_2D)
def test_2d_tasks(subjects, family):
    rng = np.random.default_rng(3)
    ep = t2.sample_episode_2d(subjects, rng, family=family, size=48)
    for k in ("prompt_image", "prompt_label", "query_image", "query_label"):
        assert ep[k].shape == (3, 48, 48) and ep[k].dtype == np.float32
    assert ep["grid"].shape == (3, 96, 96)
    if family == "segmentation":
        assert set(np.unique(ep["query_label"])) <= {0.0, 1.0} and ep["query_label"].any()
    elif family == "gaussian_noise":
        d = ep["query_image"] - ep["query_label"]
        assert 0.05 <= d.std() <= 0.15
    else:
        assert not np.allclose(ep["query_image"], ep["query_label"])


def test_modality_transformation_real_pair_and_synthetic(subjects):
    """A registered second modality is the output when every subject has it (spatial augmentation moves
    both together); without one, a fixed GIN contrast stands in (synthetic)."""
    import dataclasses

    paired = [
        dataclasses.replace(s, modalities={"inv": (1.0 - s.image).astype(np.float32)}) for s in subjects
    ]
    spec = t3.sample_task(paired, np.random.default_rng(0), family="modality_transform", overlay_p=0.0)
    spec.params.pop("shared_gin", None)
    assert spec.params["modality"] == "inv" and not spec.params.get("synthetic")
    s = paired[1]
    inp, out = t3.apply_task(spec, s, np.random.default_rng(1), augment=False)
    np.testing.assert_array_equal(inp, s.image)
    np.testing.assert_array_equal(out, s.modalities["inv"])
    flip_only = {k: 0.0 for k in aug.PAPER_PROBS} | {"flip": 1.0}
    inp, out = t3.apply_task(spec, s, np.random.default_rng(2), aug_probs=flip_only)
    assert not np.array_equal(inp, s.image)
    np.testing.assert_allclose(out, 1.0 - inp, atol=1e-6)  # the same flip on both modalities
    syn = t3.sample_task(subjects, np.random.default_rng(0), family="modality_transform", overlay_p=0.0)
    assert syn.params["synthetic"] and "modality" not in syn.params
    inp, out = t3.apply_task(syn, subjects[0], np.random.default_rng(1), augment=False)
    if "shared_gin" not in syn.params:
        np.testing.assert_array_equal(out, aug.apply_gin(subjects[0].image, syn.params["gin"]))
    # 2D modality_transform uses the same registered modality, slice for slice.
    spec2 = t2.sample_task_2d(paired, np.random.default_rng(0), family="modality_transform")
    assert spec2.params["modality"] == "inv"
    qi, ql = t2.make_pair_2d(spec2, s, np.random.default_rng(0), size=32, index=16)
    np.testing.assert_allclose(ql, np.clip(1.0 - qi, 0, 1), atol=1e-5)


def test_overlaid_corruption_is_applied_to_the_input(subjects):
    """Random task overlap: an overlay (here Gaussian noise) is added on top of the family's own input."""
    s = subjects[0]
    base = t3.TaskSpec("slices_to_volume", {"centre": [16, 16, 16]})
    over = t3.TaskSpec("slices_to_volume", {"centre": [16, 16, 16]}, overlays=("gaussian_noise",))
    a_in, a_out = t3.apply_task(base, s, np.random.default_rng(0), augment=False)
    b_in, b_out = t3.apply_task(over, s, np.random.default_rng(0), augment=False)
    np.testing.assert_array_equal(a_in, t3.central_slices(s.image, [16, 16, 16]))
    np.testing.assert_array_equal(a_out, b_out)  # the ground truth stays clean
    assert 0.15 <= (b_in - a_in).std() <= 0.25  # the paper's sigma range, measured back
