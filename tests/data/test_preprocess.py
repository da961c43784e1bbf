"""Preprocessing (canonical, spacing, fit, percentiles) and its inverse; NIfTI I/O."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import nibabel as nib

from vicl_fast.data.io import (
    BadImageError,
    OutputError,
    UnreadableFileError,
    is_dicom_dir,
    load_nifti,
    load_volume,
    save_nifti,
)
from vicl_fast.data.metrics import dice
from vicl_fast.data.preprocess import (
    check_grid,
    labels_to_original,
    normalize_intensity,
    plan_grid,
    preprocess_image,
    preprocess_label,
    to_original,
)


def _oblique_affine(zooms=(0.9, 1.3, 3.0), angles=(20, -35, 110), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    A = np.eye(4)
    A[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(zooms)
    A[:3, 3] = origin
    return A


def _world(A: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return (ijk @ A[:3, :3].T + A[:3, 3]).reshape(*shape, 3)


def _phantom(A: np.ndarray, shape, radius: float = 14.0):
    """A smooth image and a ball label defined in WORLD coordinates (so any grid sees the same object)."""
    xyz = _world(A, shape)
    centre = (A @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0])[:3]
    r = np.linalg.norm(xyz - centre, axis=-1)
    img = 100.0 * np.exp(-r / 25.0) + 5.0 * np.cos(xyz[..., 0] / 9.0)
    return img.astype(np.float32), (r < radius).astype(np.uint8)


def test_round_trip_oblique_anisotropic():
    A = _oblique_affine()
    shape = (40, 50, 30)
    img, lab = _phantom(A, shape)
    im, li = nib.Nifti1Image(img, A), nib.Nifti1Image(lab, A)
    vol, m = preprocess_image(im, spacing=1.0, grid=96)
    assert vol.shape == (96, 96, 96) and vol.dtype == np.float32
    assert 0.0 <= vol.min() and vol.max() <= 1.0
    assert m.scale == 1.0 and np.allclose(m.spacing, 1.0)
    glab, _ = preprocess_label(li, mapping=m)
    back_lab = to_original(glab, m, kind="label")
    back_img = to_original(vol, m, kind="image")
    assert back_lab.shape == shape and back_img.shape == shape
    assert dice(back_lab, lab) > 0.98
    ref, _ = normalize_intensity(img)
    err = np.abs(back_img - ref)
    assert err.mean() < 0.01 and np.median(err) < 0.005
    # The model grid is 1 mm along world-space directions of the canonical voxel axes.
    assert np.allclose(np.linalg.norm(m.grid_affine[:3, :3], axis=0), 1.0)
    assert (nib.orientations.io_orientation(m.grid_affine)[:, 1] == 1).all()  # RAS-closest


def test_round_trip_fit_downscales_isotropically():
    A = _oblique_affine()
    shape = (40, 50, 30)  # 36 x 65 x 90 mm: too big for 48^3 at 1 mm
    img, lab = _phantom(A, shape, radius=18.0)
    vol, m = preprocess_image(nib.Nifti1Image(img, A), spacing=1.0, grid=48, crop=False)
    assert m.scale == pytest.approx(90.0 / 48.0)
    assert np.allclose(m.spacing, m.spacing[0])  # one factor: aspect ratio kept
    ones, _ = preprocess_label(nib.Nifti1Image(np.ones(shape, np.uint8), A), mapping=m)
    occupied = np.argwhere(ones)
    ext = occupied.max(0) - occupied.min(0) + 1
    assert ext.max() == 48 and ext.min() < 48  # fitted along the longest axis, padded elsewhere
    glab, _ = preprocess_label(nib.Nifti1Image(lab, A), mapping=m)
    back = to_original(glab, m, kind="label")
    assert back.shape == shape and dice(back, lab) > 0.9  # coarser grid: boundary voxels differ


def test_crop_to_foreground_keeps_resolution():
    """A small head in a large field of view: cropping keeps 1 mm; outside the box maps back to 0."""
    A = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = (90, 80, 70)
    r = np.linalg.norm(np.indices(shape) - np.array([40.0, 45.0, 30.0])[:, None, None, None], axis=0)
    img = np.where(r < 18, 50.0 + 30.0 * np.cos(r / 3.0), 0.0).astype(np.float32)
    lab = (r < 10).astype(np.uint8)
    _, full = preprocess_image(nib.Nifti1Image(img, A), spacing=1.0, grid=48, crop=False)
    vol, m = preprocess_image(nib.Nifti1Image(img, A), spacing=1.0, grid=48)
    assert full.scale == pytest.approx(90 / 48) and m.scale == 1.0
    lo, hi = m.box
    assert np.all(lo <= np.array([22, 27, 12])) and np.all(hi >= np.array([58, 63, 48]))
    assert np.all(hi - lo + 1 <= 48)
    glab, _ = preprocess_label(nib.Nifti1Image(lab, A), mapping=m)
    back = to_original(glab, m, "label")
    assert dice(back, lab) > 0.99
    ones = to_original(np.ones(m.grid_shape, np.uint8), m, "label")
    box = np.zeros(shape, bool)
    box[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    np.testing.assert_array_equal(ones.astype(bool), box)


def _linear_on_grid(m, a: np.ndarray, b: float) -> np.ndarray:
    """``a . w + b`` at the world position w of every model-grid voxel of mapping ``m``."""
    return (_world(m.grid_affine, m.grid_shape) @ a + b).astype(np.float32)


def _interior(m, shape, rim: int = 10) -> np.ndarray:
    """Original voxels whose model-grid coordinates lie at least ``rim`` voxels inside the grid: there a
    cubic B-spline reproduces a linear function exactly (its edge handling decays as 0.27^distance)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    u = ijk @ m.inverse_map[:3, :3].T + m.inverse_map[:3, 3]
    return np.all((u >= rim) & (u <= np.asarray(m.grid_shape) - 1 - rim), axis=1).reshape(shape)


def test_labels_to_original_puts_borders_between_model_voxels():
    """A probability linear in world coordinates is reproduced exactly by the cubic B-spline resampling, so
    the label border must lie where that plane crosses the threshold, not on the coarse grid's voxel steps."""
    A = _oblique_affine()
    shape = (40, 50, 30)
    img, _ = _phantom(A, shape)
    _, m = preprocess_image(nib.Nifti1Image(img, A), spacing=2.0, grid=48, crop=False)
    a = np.array([0.6, -0.3, 0.74]) / 60.0
    centre = (A @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0])[:3]
    b = 0.5 - float(centre @ a)
    probs = _linear_on_grid(m, a, b)[None]
    out = labels_to_original([(probs, m)], [1], threshold=0.5)
    exact = _world(A, shape) @ a + b
    sure = _interior(m, shape) & (np.abs(exact - 0.5) > 1e-4)
    assert sure.sum() > 0.2 * out.size and out.dtype == np.uint8
    np.testing.assert_array_equal(out[sure], (exact[sure] > 0.5).astype(np.uint8))
    # The old way (nearest neighbour on the model grid's label map) snaps the border to model voxels.
    snapped = to_original((probs[0] > 0.5).astype(np.uint8), m, kind="label")
    assert (snapped[sure] != out[sure]).sum() > 100


def test_labels_to_original_averages_scales_and_picks_the_most_probable_label():
    A = _oblique_affine()
    shape = (40, 50, 30)
    img, _ = _phantom(A, shape)
    im = nib.Nifti1Image(img, A)
    _, m1 = preprocess_image(im, spacing=2.0, grid=48, crop=False)
    _, m2 = preprocess_image(im, spacing=1.5, grid=64, crop=False)  # the same field of view, 4/3 finer
    centre = (A @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0])[:3]
    planes = {  # label -> (a, b) on grid 1, (a, b) on grid 2: a . (w - centre) + b
        3: ((np.array([1.0, 0.2, 0.0]) / 50, 0.5), (np.array([0.6, -0.4, 0.3]) / 50, 0.4)),
        300: ((np.array([-0.5, 0.8, 0.1]) / 50, 0.45), (np.array([0.0, 0.3, -0.9]) / 50, 0.55)),
    }
    planes = {k: tuple((a, b - float(centre @ a)) for a, b in v) for k, v in planes.items()}
    outputs = [(np.stack([_linear_on_grid(m, *planes[k][i]) for k in (3, 300)]), m) for i, m in enumerate((m1, m2))]
    out = labels_to_original(outputs, [3, 300], threshold=0.45)
    w = _world(A, shape)
    mean = np.stack([sum(w @ a + b for a, b in planes[k]) / 2 for k in (3, 300)])
    expected = np.where(mean.max(0) > 0.45, np.array([3, 300])[mean.argmax(0)], 0)
    sure = (_interior(m1, shape) & _interior(m2, shape) & (np.abs(mean.max(0) - 0.45) > 1e-4)
            & (np.abs(mean[0] - mean[1]) > 1e-4))
    assert out.dtype == np.uint16 and sure.sum() > 0.2 * out.size
    assert {0, 3, 300} <= set(np.unique(expected[sure]).tolist())
    np.testing.assert_array_equal(out[sure], expected[sure])
    with pytest.raises(ValueError, match="different shapes"):
        _, other = preprocess_image(nib.Nifti1Image(img[:30], A), spacing=1.5, grid=64, crop=False)
        labels_to_original([(outputs[0][0], m1), (outputs[1][0], other)], [3, 300])


def test_labels_to_original_predicts_nothing_outside_the_fitted_box():
    A = np.eye(4)
    shape = (90, 80, 70)
    r = np.linalg.norm(np.indices(shape) - np.array([40.0, 45.0, 30.0])[:, None, None, None], axis=0)
    img = np.where(r < 18, 50.0 + 30.0 * np.cos(r / 3.0), 0.0).astype(np.float32)
    _, m = preprocess_image(nib.Nifti1Image(img, A), spacing=1.0, grid=48)
    out = labels_to_original([(np.full((1, 48, 48, 48), 0.2, np.float32), m)], [5], threshold=-1.0)
    lo, hi = m.box
    box = np.zeros(shape, bool)
    box[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    np.testing.assert_array_equal(out, np.where(box, 5, 0))


def test_written_output_has_original_grid_and_header(tmp_path):
    A = _oblique_affine()
    img, lab = _phantom(A, (24, 28, 20))
    src = nib.Nifti1Image(img, A)
    src.header["descrip"] = b"scanner X"
    src.header["cal_max"] = 999.0  # the scan's display window must not carry over to a label map
    src.set_qform(A, code=1)
    src.set_sform(A, code=2)
    vol, m = preprocess_image(src, spacing=2.0, grid=32)
    glab, _ = preprocess_label(nib.Nifti1Image(lab, A), mapping=m)
    out = save_nifti(
        to_original(glab, m, "label").astype(np.uint8), A, tmp_path / "seg.nii.gz", header=src.header
    )
    back = nib.load(str(out))
    assert back.shape == src.shape
    assert np.allclose(back.affine, src.affine, atol=1e-5)
    assert back.header["descrip"].tobytes().startswith(b"scanner X")
    assert int(back.header["sform_code"]) == 2 and int(back.header["qform_code"]) == 1
    assert back.get_data_dtype() == np.uint8 and float(back.header["cal_max"]) == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]  # no temp file left


def test_orientation_invariance():
    """The same world content stored RAS, LPS or axis-permuted preprocesses to the same volume."""
    A = np.diag([1.0, 1.2, 2.0, 1.0])
    A[:3, 3] = [-20, -25, -15]
    shape = (30, 36, 20)
    img, _ = _phantom(A, shape)
    ref, _ = preprocess_image(nib.Nifti1Image(img, A), spacing=1.5, grid=48)
    # LPS: flip x and y.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    lps, _ = preprocess_image(nib.Nifti1Image(img[::-1, ::-1].copy(), A @ flip), spacing=1.5, grid=48)
    np.testing.assert_allclose(lps, ref, atol=1e-5)
    # Permuted axes (z, x, y storage).
    P = np.zeros((4, 4))
    P[0, 1] = P[1, 2] = P[2, 0] = P[3, 3] = 1.0
    perm, _ = preprocess_image(
        nib.Nifti1Image(np.transpose(img, (2, 0, 1)).copy(), A @ P), spacing=1.5, grid=48
    )
    np.testing.assert_allclose(perm, ref, atol=1e-5)


def test_labels_keep_their_values():
    A = np.diag([1.0, 1.0, 1.0, 1.0])
    lab = np.zeros((20, 20, 20), np.int16)
    lab[2:8, 2:8, 2:8] = 3
    lab[10:18, 10:18, 10:18] = 117
    out, m = preprocess_label(nib.Nifti1Image(lab, A), spacing=1.0, grid=32)
    assert set(np.unique(out).tolist()) == {0, 3, 117} and out.dtype == np.int16
    assert (out == 117).sum() == 8**3 and (out == 3).sum() == 6**3  # integer shift: exact
    np.testing.assert_array_equal(to_original(out, m, "label"), lab)


def test_a_volume_already_on_the_grid_is_not_resampled_and_matches_interpolation():
    from vicl_fast.data.preprocess import _resample
    from vicl_fast.data.resample import affine_resample

    rng = np.random.default_rng(5)
    vols = [rng.random((16, 32, 16)).astype(np.float32), rng.random((16, 32, 16)),
            rng.integers(0, 7, (16, 32, 16)).astype(np.int16), rng.random((16, 32, 16)) > 0.5]
    for v in vols:
        order = 1 if v.dtype.kind == "f" else 0
        fast = _resample(v, np.eye(4), v.shape, order=order, antialias=True)
        slow = affine_resample(v, np.eye(4), v.shape, order=order, mode="nearest", antialias=True)
        assert fast.dtype == slow.dtype and np.array_equal(fast, slow)
        assert not np.shares_memory(fast, v)
    # end to end: an image on the model grid comes back unchanged (normalised), and so does its label
    img = vols[0] * 100
    out, m = preprocess_image(nib.Nifti1Image(img, np.eye(4)), spacing=1.0, grid=(16, 32, 16), crop=False)
    assert np.array_equal(m.index_map, np.eye(4))
    np.testing.assert_array_equal(to_original(out, m, "image"), out)
    lab, _ = preprocess_label(nib.Nifti1Image(vols[2], np.eye(4)), mapping=m)
    np.testing.assert_array_equal(lab, vols[2])


def test_normalize_intensity_matches_quantiles():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 3.0, size=(17, 19, 23))
    out, (lo, hi) = normalize_intensity(x)
    q2, q98 = np.quantile(x, [0.02, 0.98])
    assert (lo, hi) == pytest.approx((q2, q98))
    np.testing.assert_allclose(out, np.clip((x - q2) / (q98 - q2), 0, 1), rtol=1e-6, atol=1e-6)
    assert (out == 0).mean() == pytest.approx(0.02, abs=0.002) and (out == 1).mean() == pytest.approx(
        0.02, abs=0.002
    )
    z, _ = normalize_intensity(np.full((4, 4, 4), 7.0))
    assert not z.any()


def test_plan_grid_validation():
    with pytest.raises(ValueError, match="multiples of 16"):
        check_grid(100)
    with pytest.raises(ValueError, match="spacing"):
        plan_grid(np.eye(4), (10, 10, 10), spacing=0.0, grid=32)
    assert check_grid((32, 48, 64)) == (32, 48, 64)


def test_load_nifti_errors(tmp_path):
    with pytest.raises(UnreadableFileError, match="not found"):
        load_nifti(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(UnreadableFileError, match="cannot read"):
        load_nifti(bad)
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    with pytest.raises(UnreadableFileError, match="not a NIfTI"):
        load_nifti(other)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), str(four))
    with pytest.raises(BadImageError, match="3D"):
        load_nifti(four)
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(single))
    assert load_nifti(single).shape == (4, 5, 6)


def test_save_nifti_atomic_on_failure(tmp_path):
    with pytest.raises(ValueError):
        save_nifti(np.zeros((2, 2)), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(OutputError, match="does not exist"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "nope" / "x.nii.gz")

    # A failure inside the writer (unsupported dtype) leaves no partial or temporary file.
    with pytest.raises(nib.spatialimages.HeaderDataError):
        save_nifti(np.zeros((2, 2, 2), dtype=object), np.eye(4), tmp_path / "y.nii.gz")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- DICOM (optional pydicom)
# pydicom is not a dependency and is not installed here, so these tests put a minimal stand-in module
# in sys.modules: ``dcmread`` unpickles the attributes written by ``_write_series``. The geometry is
# checked against the DICOM standard's per-pixel formula, not against the reader's own affine code.


def _fake_pydicom() -> types.ModuleType:
    mod = types.ModuleType("pydicom")

    def dcmread(path, **_):
        raw = Path(path).read_bytes()
        if raw[128:132] != b"DICM":
            raise ValueError("not DICOM")
        return types.SimpleNamespace(**pickle.loads(raw[132:]))

    mod.dcmread = dcmread
    return mod


def _series_geometry(tilt: float = 0.0):
    R = Rotation.from_euler("xyz", (15, -25, 40), degrees=True).as_matrix()
    row_cos, col_cos = R[:, 0], R[:, 1]
    normal = np.cross(row_cos, col_cos)
    step = 2.5 * normal + tilt * row_cos  # tilt: gantry-tilted (sheared) series
    s0 = np.array([-80.0, 60.0, -30.0])
    return row_cos, col_cos, step, s0


def _write_series(
    folder: Path, vol: np.ndarray, tilt=0.0, uid="1.2.3", positions=None, slope=2.0, inter=-10.0
):
    """Slices of ``vol (columns, rows, slices)`` as DICOM-like files, in shuffled name order."""
    folder.mkdir(parents=True, exist_ok=True)
    row_cos, col_cos, step, s0 = _series_geometry(tilt)
    n = vol.shape[2]
    names = np.random.default_rng(0).permutation(n)
    for k in range(n):
        ipp = s0 + k * step if positions is None else positions[k]
        attrs = {
            "ImagePositionPatient": [str(v) for v in ipp],
            "ImageOrientationPatient": list(row_cos) + list(col_cos),
            "PixelSpacing": [0.8, 0.6],  # between rows, between columns
            "Rows": vol.shape[1],
            "Columns": vol.shape[0],
            "RescaleSlope": slope,
            "RescaleIntercept": inter,
            "SeriesInstanceUID": uid,
            "PixelData": b"...",
            "pixel_array": vol[:, :, k].T.copy(),  # (rows, columns)
        }
        (folder / f"IM{names[k]:04d}").write_bytes(b"\0" * 128 + b"DICM" + pickle.dumps(attrs))
    return folder


@pytest.mark.parametrize("tilt", [0.0, 0.4])
def test_dicom_series_geometry_and_values(tmp_path, monkeypatch, tilt):
    monkeypatch.setitem(sys.modules, "pydicom", _fake_pydicom())
    vol = np.random.default_rng(1).integers(0, 500, size=(7, 5, 6)).astype(np.int16)
    d = _write_series(tmp_path / "series", vol, tilt=tilt)
    assert is_dicom_dir(d) and not is_dicom_dir(tmp_path)
    img = load_volume(d, "target")
    assert img.shape == vol.shape
    np.testing.assert_allclose(np.asarray(img.dataobj), vol * 2.0 - 10.0)
    row_cos, col_cos, step, s0 = _series_geometry(tilt)
    for c, r, k in [(0, 0, 0), (6, 4, 5), (3, 1, 2), (5, 0, 4)]:
        # PS3.3 C.7.6.2.1.1: P = S_k + X_r * (column spacing) * c + X_c * (row spacing) * r, in LPS.
        lps = (s0 + k * step) + row_cos * 0.6 * c + col_cos * 0.8 * r
        ras = lps * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose((img.affine @ [c, r, k, 1.0])[:3], ras, atol=1e-6)
    assert int(img.header["sform_code"]) == 1
    # The image preprocesses and maps back like any NIfTI.
    vol01, m = preprocess_image(img, spacing=2.0, grid=32)
    assert to_original(vol01, m).shape == vol.shape


def test_dicom_errors(tmp_path, monkeypatch):
    vol = np.ones((4, 3, 3), np.int16)
    d = _write_series(tmp_path / "s", vol)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(UnreadableFileError, match="pip install pydicom"):
        load_volume(d, "target")
    monkeypatch.setitem(sys.modules, "pydicom", _fake_pydicom())
    two = _write_series(tmp_path / "two", vol)
    first = sorted(two.iterdir())[0]
    attrs = pickle.loads(first.read_bytes()[132:])
    attrs["SeriesInstanceUID"] = "9.9"  # one slice of another series in the folder
    first.write_bytes(b"\0" * 128 + b"DICM" + pickle.dumps(attrs))
    with pytest.raises(BadImageError, match="2 DICOM series"):
        load_volume(two, "target")
    same = [np.zeros(3)] * 3
    with pytest.raises(BadImageError, match="share one position"):
        load_volume(_write_series(tmp_path / "4d", vol, positions=same), "target")
    gappy = [np.zeros(3), np.array([0, 0, 2.5]), np.array([0, 0, 7.5])]
    row_cos, col_cos, _, _ = _series_geometry()
    normal = np.cross(row_cos, col_cos)
    gappy = [g[2] * normal for g in gappy]
    with pytest.raises(BadImageError, match="irregular"):
        load_volume(_write_series(tmp_path / "gap", vol, positions=gappy), "target")
    with pytest.raises(UnreadableFileError, match="DICOM slices"):
        load_nifti(d, "target")  # the NIfTI reader names the DICOM alternative
