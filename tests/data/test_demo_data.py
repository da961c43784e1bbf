"""The embedded demo MRI: contents, labels, licence, loader options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import nibabel as nib

import vicl_fast.data as data_pkg
from vicl_fast.data.demo_data import AAL_GROUPS, DEMO_NAMES, load_demo_subjects, write_demo_nifti
from vicl_fast.data.metrics import dice

DATA = Path(data_pkg.__file__).parent


@pytest.fixture(scope="module")
def subjects():
    return load_demo_subjects()


def test_files_small_and_licensed():
    files = sorted(DATA.glob("demo_*.npz"))
    assert [f.name for f in files] == ["demo_colin27.npz", "demo_icbm152.npz"]
    assert sum(f.stat().st_size for f in files) < 5e6
    lic = (DATA / "LICENSE-DATA.txt").read_text()
    for needle in (
        "Louis Collins",
        "McGill University",
        "ICBM152",
        "Colin27",
        "Tzourio-Mazoyer",
        "BSD-3-clause",
    ):
        assert needle in lic


def test_two_real_heads(subjects):
    assert [s.name for s in subjects] == list(DEMO_NAMES)
    icbm, colin = subjects
    for s in subjects:
        assert s.image.shape == (96, 96, 96) and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert np.allclose(np.abs(np.diag(s.affine)[:3]), 2.25)
        brain = s.masks["brain"]
        assert 100_000 < brain.sum() < 250_000  # ~1.2-1.6 l of 11.4 mm^3 voxels
        assert not (s.masks["gm"] & s.masks["wm"]).any()
        assert ((s.masks["gm"] | s.masks["wm"]) & ~brain).sum() == 0
        assert not (brain & ~s.masks["head"]).any()
        for group in AAL_GROUPS:
            assert s.masks[group].sum() > 500
        assert 50 < s.masks["hippocampus"].sum() < 2000
        assert set(np.unique(s.label_maps["lobes"])) == set(range(len(AAL_GROUPS) + 1))
        assert s.image[brain].mean() > 3 * s.image[~s.masks["head"]].mean()  # tissue brighter than air
    assert colin.has_skull and not icbm.has_skull
    assert colin.masks["head"].sum() > 1.5 * colin.masks["brain"].sum()
    assert len(np.unique(colin.label_maps["aal"])) == 117  # 116 AAL regions + background
    # Both are in MNI space on one grid: their brains overlap well, but they are not the same head.
    assert 0.85 < dice(icbm.masks["brain"], colin.masks["brain"]) < 0.99
    assert np.array_equal(icbm.affine, colin.affine)


def test_resize_and_augmented_copies():
    subs = load_demo_subjects(size=32, n_augmented=2, seed=1)
    assert [s.name for s in subs] == ["icbm152", "colin27", "icbm152_aug0", "colin27_aug1"]
    for s in subs:
        assert s.image.shape == (32, 32, 32) and all(m.shape == (32, 32, 32) for m in s.masks.values())
    assert np.allclose(np.abs(np.diag(subs[0].affine)[:3]), 2.25 * 96 / 32)
    assert not np.array_equal(subs[2].masks["brain"], subs[0].masks["brain"])
    assert 0.7 < dice(subs[2].masks["brain"], subs[0].masks["brain"]) < 0.99
    again = load_demo_subjects(size=32, n_augmented=2, seed=1)
    np.testing.assert_array_equal(again[3].image, subs[3].image)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_demo_subjects(size=50)
    with pytest.raises(ValueError, match="unknown demo subject"):
        load_demo_subjects(names=["bob"])


def test_a_subset_of_masks_loads_the_same_volumes():
    full = load_demo_subjects(names=["icbm152"], size=32, n_augmented=2, seed=4)
    some = load_demo_subjects(names=["icbm152"], size=32, n_augmented=2, seed=4, masks=["wm", "head"])
    for f, s in zip(full, some):
        assert sorted(s.masks) == ["head", "wm"] and s.label_maps == {}
        np.testing.assert_array_equal(s.image, f.image)
        for k in ("wm", "head"):
            np.testing.assert_array_equal(s.masks[k], f.masks[k])
    with pytest.raises(ValueError, match="unknown mask"):
        load_demo_subjects(names=["icbm152"], size=32, masks=["wm", "liver"])


def test_write_demo_nifti(tmp_path):
    subs = load_demo_subjects(names=["colin27"], size=32)
    ((ip, lp),) = write_demo_nifti(tmp_path, label="lobes", subjects=subs)
    img, lab = nib.load(str(ip)), nib.load(str(lp))
    assert img.shape == lab.shape == (32, 32, 32)
    assert np.allclose(img.affine, subs[0].affine)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), subs[0].label_maps["lobes"])
    with pytest.raises(ValueError, match="not in subject"):
        write_demo_nifti(tmp_path, label="tumour", subjects=subs)
