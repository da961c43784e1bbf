"""Augmentation (Neuroverse3D supplement Sec. B.3): rates, seeding, geometry, GIN vs a SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vicl_fast.data import augment as aug


def _ball(shape=(20, 22, 18), centre=(8.0, 11.0, 9.5), radius=5.0):
    r = np.linalg.norm(np.indices(shape) - np.asarray(centre)[:, None, None, None], axis=0)
    return (r < radius).astype(np.float32)


def test_paper_probabilities_are_the_drawn_rates():
    """Over many seeded draws, each transform fires at its Sec. B.3 rate (binomial 4-sigma band)."""
    n = 3000
    counts = dict.fromkeys(aug.PAPER_PROBS, 0)
    rng = np.random.default_rng(0)
    x = np.full((4, 4), 0.5, np.float32)  # tiny: only the draws matter
    for _ in range(n):
        _, a1 = aug.augment_intensity(x, rng)
        _, _, a2 = aug.augment_spatial([x], [], rng)
        for k in a1 + a2:
            counts[k] += 1
    for k, p in aug.PAPER_PROBS.items():
        tol = 4 * np.sqrt(p * (1 - p) / n)
        assert abs(counts[k] / n - p) < tol, (k, counts[k] / n, p)


def test_probabilities_zero_is_identity_and_seeds_reproduce():
    x = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    lab = (x > 0.5).astype(np.int16)
    off = {k: 0.0 for k in aug.PAPER_PROBS}
    img, labs, extra, applied = aug.augment_subject(x, [lab], np.random.default_rng(1), off, extra_images=[x])
    assert applied == [] and np.array_equal(img, x) and np.array_equal(labs[0], lab)
    on = {k: 1.0 for k in aug.PAPER_PROBS}
    a = aug.augment_subject(x, [lab], np.random.default_rng(7), on, extra_images=[x])
    b = aug.augment_subject(x, [lab], np.random.default_rng(7), on, extra_images=[x])
    c = aug.augment_subject(x, [lab], np.random.default_rng(8), on, extra_images=[x])
    for u, v in ((a[0], b[0]), (a[1][0], b[1][0]), (a[2][0], b[2][0])):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    assert a[1][0].dtype == np.int16 and set(np.unique(a[1][0])) <= {0, 1}  # nearest keeps values
    # The extra image (e.g. a second modality) gets the SAME warp as the image's spatial part.
    sp_img, _, _ = aug.augment_spatial([x, x], [], np.random.default_rng(3), on)
    assert np.array_equal(sp_img[0], sp_img[1])


def test_rotation_is_rigid_about_the_centre():
    rng = np.random.default_rng(4)
    shape = (21, 21, 21)
    M = aug.random_rotation_matrix(rng, shape, max_deg=30.0)
    R = M[:3, :3]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    c = (np.asarray(shape) - 1) / 2
    np.testing.assert_allclose(M @ np.r_[c, 1.0], np.r_[c, 1.0], atol=1e-12)  # centre fixed
    # M maps output voxels to input voxels: a blob at input point q appears at M^-1 q.
    q = c + np.array([4.0, -3.0, 2.0])
    blob = np.exp(-((np.indices(shape) - q[:, None, None, None]) ** 2).sum(0) / (2 * 1.5**2))
    (rot,), _ = aug.apply_spatial([blob], [], M)
    centroid = (np.indices(shape) * rot).reshape(3, -1).sum(1) / rot.sum()
    np.testing.assert_allclose(centroid, (np.linalg.inv(M) @ np.r_[q, 1.0])[:3], atol=0.1)
    assert rot.sum() == pytest.approx(blob.sum(), rel=0.02)  # rigid: mass kept
    M2 = aug.random_rotation_matrix(np.random.default_rng(5), (30, 40), max_deg=10.0)
    assert M2.shape == (3, 3) and abs(np.degrees(np.arctan2(M2[1, 0], M2[0, 0]))) <= 10.0


def test_affine_parameters_within_bounds():
    rng = np.random.default_rng(6)
    for _ in range(20):
        M = aug.random_affine_matrix(rng, (32, 32, 32), max_deg=10.0, scale=(0.9, 1.1), shear=0.05)
        sv = np.linalg.svd(M[:3, :3], compute_uv=False)
        assert 0.85 < sv.min() and sv.max() < 1.16  # scale x shear stays near 1
        assert np.all(np.abs(M[:3, 3] - (np.eye(3) - M[:3, :3]) @ np.full(3, 15.5)) <= 0.05 * 32 + 1e-9)


@pytest.mark.parametrize("size", [24, 64])
def test_elastic_displacement_smooth_and_never_folds(size):
    shape = (size,) * 3
    d = aug.elastic_displacement(np.random.default_rng(0), shape, control_points=6, magnitude=3.0)
    assert d.shape == (3, *shape) and 0.1 < d.std() < 3.0
    # Jacobian of x -> x + u(x) by central differences: positive determinant everywhere (no folding).
    J = np.stack([np.stack(np.gradient(d[i]), 0) for i in range(3)], 0)  # (3, 3, *shape): du_i/dx_j
    J = np.moveaxis(J, (0, 1), (-2, -1)) + np.eye(3)
    assert np.linalg.det(J).min() > 0.05
    assert max(np.abs(np.diff(d, axis=a)).max() for a in (1, 2, 3)) <= 0.3 + 1e-9
    img = _ball(shape, centre=((size - 1) / 2,) * 3, radius=size / 3)
    (warped,), _ = aug.apply_spatial([img], [], None, d)
    assert 0.8 < warped.sum() / img.sum() < 1.25 and not np.allclose(warped, img)


@pytest.mark.parametrize("shape", [(96, 96, 96), (20, 22, 18), (40, 56), (17, 23, 1)])
def test_elastic_field_is_the_nd_bspline_zoom_of_its_control_points(shape):
    """The separable (axis by axis) field equals one n-D cubic B-spline ``ndimage.zoom`` of the same draws."""
    d = aug.elastic_displacement(np.random.default_rng(3), shape, control_points=6, magnitude=3.0,
                                 max_gradient=np.inf)
    coarse = np.random.default_rng(3).normal(0.0, 3.0, size=(len(shape),) + (6,) * len(shape))
    ref = np.stack([ndimage.zoom(c, [s / 6 for s in shape], order=3, mode="nearest", grid_mode=True,
                                 prefilter=False)[tuple(slice(0, s) for s in shape)] for c in coarse])
    assert d.shape == ref.shape
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-12)


def test_intensity_ops_measured_back():
    x = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    for seed in range(5):
        s = aug.intensity_shift(x, np.random.default_rng(seed)) - x
        assert np.ptp(s) < 1e-6 and abs(s.mean()) <= 0.1 + 1e-6  # one constant in [-0.1, 0.1]
        k = aug.intensity_scale(x, np.random.default_rng(seed)) / np.maximum(x, 1e-3)
        assert np.ptp(k[x > 0.01]) < 1e-3 and 0.9 - 1e-6 <= k[x > 0.01].mean() <= 1.1 + 1e-6
        n = aug.gaussian_noise(x, np.random.default_rng(seed)) - x
        rng = np.random.default_rng(seed)
        expect = rng.uniform(0.0, 0.05)  # the same first draw: the noise std
        assert n.std() == pytest.approx(expect, rel=0.02, abs=1e-4) and abs(n.mean()) < 0.01
    inv = aug.intensity_inversion(x)
    assert inv.max() == pytest.approx(x.max(), abs=1e-6) and inv.min() == pytest.approx(x.min(), abs=1e-6)
    assert np.corrcoef(inv.ravel(), x.ravel())[0, 1] == pytest.approx(-1.0)


def _gin_reference(x: np.ndarray, p: aug.GinParams) -> np.ndarray:
    """GIN with SciPy correlations in float64: zero-padded 'same' convs, leaky ReLU 0.2 between layers,
    Frobenius renormalisation to the input, alpha mixing, min-max scaling."""
    h = [x.astype(np.float64)]
    for i, (w, b) in enumerate(zip(p.weights, p.biases)):
        out = []
        for co in range(w.shape[0]):
            acc = sum(
                ndimage.correlate(h[ci], w[co, ci].astype(np.float64), mode="constant")
                for ci in range(w.shape[1])
            )
            out.append(acc + b[co])
        if i < len(p.weights) - 1:
            out = [np.where(o > 0, o, 0.2 * o) for o in out]
        h = out
    g = h[0] * (np.linalg.norm(x) / np.linalg.norm(h[0]))
    m = p.alpha * g + (1 - p.alpha) * x
    return (m - m.min()) / (m.max() - m.min())


@pytest.mark.parametrize("shape", [(12, 13, 11), (20, 17)])
def test_gin_matches_scipy_reference(shape):
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    p = aug.sample_gin(np.random.default_rng(2), ndim=len(shape), kernel_sizes=(3,))
    assert all(w.shape[-1] == 3 for w in p.weights)  # odd kernels: 'same' padding is centred
    got = aug.apply_gin(x, p)
    np.testing.assert_allclose(got, _gin_reference(x, p), atol=2e-5)
    p1 = aug.sample_gin(np.random.default_rng(3), ndim=len(shape))  # mixed 1/3 kernels
    np.testing.assert_allclose(aug.apply_gin(x, p1), _gin_reference(x, p1), atol=2e-5)


def test_2d_augmentation():
    img = _ball((32, 32, 1), centre=(12.0, 18.0, 0.0), radius=6.0)[..., 0]
    lab = img.astype(bool)
    on = {k: 1.0 for k in aug.PAPER_PROBS}
    out, labs, _, applied = aug.augment_subject(img, [lab], np.random.default_rng(0), on)
    assert out.shape == (32, 32) and labs[0].dtype == np.bool_ and labs[0].any()
    assert {"affine", "elastic", "flip", "rotate", "gin"} <= set(applied)


def test_masks_follow_the_linearly_interpolated_image_and_label_maps_keep_their_values():
    rng = np.random.default_rng(11)
    shape = (24, 26, 22)
    M = aug.random_affine_matrix(rng, shape)
    d = aug.elastic_displacement(rng, shape)
    mask = np.zeros(shape, bool)
    mask[6:17, 5:20, 4:15] = True
    labels = np.zeros(shape, np.int16)
    labels[mask] = 3
    labels[:5] = 7
    (img,), (wmask, wlab) = aug.apply_spatial([mask.astype(np.float64)], [mask, labels], M, d)
    assert wmask.dtype == np.bool_ and np.array_equal(wmask, img >= 0.5)  # the mask's border = the image's
    assert wlab.dtype == np.int16 and set(np.unique(wlab)) <= {0, 3, 7}  # no blended class values
    _, (nearest,) = aug.apply_spatial([], [mask.astype(np.int16)], M, d)  # the same mask as a label map
    assert (wmask != nearest.astype(bool)).any()  # the two rules differ on the border voxels
