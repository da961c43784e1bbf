"""Brain extraction of a target whose contexts have no skull (vicl_fast.data.skull_strip), against
the reference brain masks of the embedded colin27 and, where the apt package mricron-data is
installed, of the 1 mm colin27 (``ch2bet``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vicl_fast.data import skull_strip as ss
from vicl_fast.data.demo_data import load_demo_subjects
from vicl_fast.data.metrics import dice
from vicl_fast.data.resample import resize_image, resize_label

MRICRON = Path("/usr/share/mricron/templates")


@pytest.fixture(scope="module")
def context_ml() -> float:
    """Median head volume of brain-extracted contexts: warped icbm152 copies (96^3, 2.25 mm)."""
    subs = load_demo_subjects(names=["icbm152"], n_augmented=4, seed=3, masks=["brain"])[1:]
    return float(np.median([ss.head_volume_ml(s.image, s.affine) for s in subs]))


@pytest.fixture(scope="module")
def colin():
    return load_demo_subjects(names=["colin27"], masks=["brain"])[0]  # 96^3, 2.25 mm, with its skull


def test_otsu_threshold_equals_scikit_image():
    skf = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(0)
    for n in (50, 5000):
        x = np.concatenate([rng.normal(0, 1, n), rng.normal(4, 2, n // 2)]).astype(np.float32)
        assert ss.otsu_threshold(x) == pytest.approx(skf.threshold_otsu(x), abs=1e-6)
    assert ss.otsu_threshold(np.full(10, 3.0)) == 3.0


def test_a_skull_is_told_from_brain_extracted_contexts(colin, context_ml):
    raw = ss.head_volume_ml(colin.image, colin.affine)
    brain = ss.head_volume_ml(colin.image * colin.masks["brain"], colin.affine)
    assert ss.has_extra_head(raw, [context_ml]) and not ss.has_extra_head(brain, [context_ml]), (raw, brain, context_ml)
    assert not ss.has_extra_head(raw, [raw * 0.95, raw * 1.05])  # contexts with their skull: nothing to strip
    assert not ss.has_extra_head(raw, [])


@pytest.mark.parametrize("zooms,min_dice", [((2.25, 2.25, 2.25), 0.91), ((2.25, 2.25, 6.75), 0.9),
                                             ((3.375, 3.375, 3.375), 0.87)])
def test_brain_mask_of_the_embedded_colin27(colin, context_ml, zooms, min_dice):
    """At its own 2.25 mm, with 6.75 mm slices, and at the shipped model's 3.375 mm (0.926, 0.930 and
    0.899 when written)."""
    shape = tuple(int(round(96 * 2.25 / z)) for z in zooms)
    img = resize_image(colin.image, shape)
    ref = resize_label(colin.masks["brain"].astype(np.uint8), shape) > 0
    affine = np.diag([*zooms, 1.0])
    mask, radius = ss.brain_mask(img, affine, ss.VOLUME_SLACK * context_ml)
    assert mask.shape == shape and mask.dtype == bool and radius in ss.RADII_MM
    assert dice(mask, ref) >= min_dice, (dice(mask, ref), radius)


@pytest.mark.skipif(not (MRICRON / "ch2bet.nii.gz").exists(), reason="needs the apt package mricron-data")
def test_brain_mask_of_colin27_at_1mm_against_ch2bet(context_ml):
    import nibabel as nib

    img = nib.load(MRICRON / "ch2.nii.gz")
    ref = np.asanyarray(nib.load(MRICRON / "ch2bet.nii.gz").dataobj) > 0
    mask, _ = ss.brain_mask(np.asanyarray(img.dataobj), img.affine, ss.VOLUME_SLACK * context_ml)
    assert dice(mask, ref) >= 0.93  # 0.949 when written
