"""Strip the skull of a target whose contexts have none (morphological brain extraction).

The shipped model, like most in-context training sets, saw only brain-extracted heads. A raw T1
with its skull and scalp then gets its white matter Dice cut from 0.85 to 0.62 (colin27, 64^3).
:class:`vicl_fast.inference.Predictor` therefore compares the target's head with its contexts'
(:func:`head_volume_ml`) and, when the target's is much larger (:data:`SKULL_RATIO`), keeps only
its brain (:func:`brain_mask`) before the usual preprocessing.

The brain is found on a fixed 2 mm working grid, so the same radii work for 1 mm, anisotropic
and coarse scans:

1. tissue = voxels above the Otsu threshold of the percentile-normalised volume;
2. erode it by ``r`` mm (Euclidean distance > r): the thin bridges of dura, bone and skin between
   brain and scalp break, and the largest piece left is the brain's core;
3. dilate the core back by ``r`` mm within the tissue, and fill its holes (ventricles, sulci).

Too small an ``r`` leaves the scalp attached, too large a one cuts the brain into pieces; the
right ``r`` depends on the scan's resolution and on the gap between brain and scalp. The
contexts say how large a brain is: the smallest ``r`` (from :data:`RADII_MM`) whose mask is no
larger than :data:`VOLUME_SLACK` x the contexts' median head volume is taken.

Measured (Dice against the reference brain masks; see ``tests/data/test_skull_strip.py``):
colin27 at 1 mm against ``ch2bet`` 0.949, at 1x1x4 mm 0.950, at 3 mm 0.944; the embedded colin27
at 2.25 mm 0.926, with 6.75 mm slices 0.930 and at 3.4 mm 0.899 against its brain mask. A
heuristic for adult T1 scans, not a trained brain extractor: for other contrasts or for heads
unlike the contexts, give brain-extracted targets and ``skull_strip="no"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["RADII_MM", "SKULL_RATIO", "VOLUME_SLACK", "WORK_MM", "otsu_threshold", "head_mask",
           "head_volume_ml", "has_extra_head", "brain_mask"]

#: Working grid of the brain extraction (mm).
WORK_MM = 2.0
#: Erosion radii tried, smallest first (mm).
RADII_MM: tuple[float, ...] = (4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 14.0)
#: The target is stripped when its head volume exceeds the contexts' median by this factor
#: (colin27 with its skull: 1.55-1.6 x brain-extracted icbm152 copies, without it 0.91 x; warped copies
#: of one head differ by +-15 %).
SKULL_RATIO = 1.3
#: The brain mask may exceed the contexts' median head volume by this factor (warped copies of
#: one head differ by +-15 % in volume).
VOLUME_SLACK = 1.1


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the values of ``x`` (maximum between-class variance over ``bins``
    histogram bins; equals ``skimage.filters.threshold_otsu``)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = np.cumsum(hist[::-1])[::-1]
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.cumsum((hist * centres)[::-1]) / np.maximum(w1[::-1], 1))[::-1]
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def _zooms(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel sizes (mm) of a voxel-to-world affine."""
    from nibabel.affines import voxel_sizes

    return tuple(float(v) for v in voxel_sizes(np.asarray(affine, float)))


def head_mask(data: np.ndarray) -> np.ndarray:
    """Everything above the Otsu threshold, holes filled: the head (or the brain of a
    brain-extracted scan). ``(X, Y, Z)`` -> bool ``(X, Y, Z)``."""
    from scipy import ndimage as ndi

    x = np.asarray(data, dtype=np.float32)
    return ndi.binary_fill_holes(x > otsu_threshold(x))


def head_volume_ml(data: np.ndarray, affine: np.ndarray) -> float:
    """Volume of :func:`head_mask` in millilitres (voxel sizes from ``affine``), measured on every
    k-th voxel so that the voxels it counts are about :data:`WORK_MM` wide (a 1 mm scan: 0.1 s, not 0.8 s)."""
    zooms = _zooms(affine)
    step = tuple(max(1, int(WORK_MM // z)) for z in zooms)
    sub = np.asarray(data)[:: step[0], :: step[1], :: step[2]]
    return float(head_mask(sub).sum()) * float(np.prod(np.multiply(zooms, step))) / 1000.0


def has_extra_head(target_ml: float, context_mls: Sequence[float]) -> bool:
    """Whether the target shows much more head than its contexts (a skull the contexts lack)."""
    return bool(context_mls) and target_ml > SKULL_RATIO * float(np.median(context_mls))


def brain_mask(data: np.ndarray, affine: np.ndarray, max_volume_ml: float) -> tuple[np.ndarray, float]:
    """Brain of a T1 volume with skull (see the module docstring).

    Args:
        data: ``(X, Y, Z)`` intensities.
        affine: its voxel-to-world matrix (the voxel sizes matter, not the orientation).
        max_volume_ml: the brain's expected upper volume; the smallest erosion radius whose mask
            is at most this large wins (the largest radius when none is).
    Returns:
        ``(mask (X, Y, Z) bool, radius in mm)``.
    """
    from scipy import ndimage as ndi

    from vicl_fast.data.preprocess import normalize_intensity
    from vicl_fast.data.resample import resize_image

    x = np.asarray(data, dtype=np.float32)
    zooms = _zooms(affine)
    shape = x.shape
    work = tuple(max(8, int(round(n * z / WORK_MM))) for n, z in zip(shape, zooms))
    w = resize_image(normalize_intensity(x, 0.005, 0.995)[0], work)
    wz = tuple(n * z / m for n, z, m in zip(shape, zooms, work))
    voxel_ml = float(np.prod(wz)) / 1000.0
    tissue = w > otsu_threshold(w)
    depth = ndi.distance_transform_edt(tissue, sampling=wz)
    mask, radius = tissue, RADII_MM[-1]
    for r in RADII_MM:
        lab, n = ndi.label(depth > r)
        if n == 0:
            break
        sizes = ndi.sum_labels(np.ones_like(lab), lab, np.arange(1, n + 1))
        core = lab == 1 + int(np.argmax(sizes))
        m = ndi.binary_fill_holes((ndi.distance_transform_edt(~core, sampling=wz) <= r) & tissue)
        mask, radius = m, r
        if m.sum() * voxel_ml <= max_volume_ml:
            break
    # back on the scan's grid: the mask interpolated linearly, kept where >= 0.5
    return resize_image(mask.astype(np.float32), shape) >= 0.5, float(radius)
