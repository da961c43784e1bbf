"""PNG previews: three orthogonal slices of a volume with a label overlay or a second image.

Slices are shown in neurological convention (picture left = subject's left in
axial and coronal views, anterior up in the axial view, superior up otherwise),
with each slice stretched to its physical aspect ratio from the voxel sizes
(:mod:`vicl_fast.data.resample`: bilinear with anti-aliasing for the grey image,
nearest voxel centre for the labels). Pillow writes the PNG (no matplotlib).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

import nibabel as nib

from vicl_fast.data.io import atomic_write
from vicl_fast.data.resample import resize_image, resize_label

__all__ = ["label_colors", "render_preview", "save_preview"]


def label_colors(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8, (n, 3)), golden-ratio hue steps; index 0 = background."""
    import colorsys

    rgb = np.array([colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0) for k in range(n)]).reshape(
        n, 3
    )
    return (rgb * 255).astype(np.uint8)


def _window(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [1, 99]) if x.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _slices(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Sagittal, coronal, axial slices of a RAS volume, oriented for display (rows = up)."""
    i, j, k = centre
    sag = vol[i, :, :].T[::-1]  # rows superior -> inferior, columns posterior -> anterior
    cor = vol[:, j, :].T[::-1]  # rows superior -> inferior, columns subject left -> right
    axi = vol[:, :, k].T[::-1]  # rows anterior -> posterior, columns subject left -> right
    return [sag, cor, axi]


def _resize_grey(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> ``shape`` uint8, bilinear with anti-aliasing, rounded."""
    return np.clip(np.rint(resize_image(img, shape, antialias=True)), 0, 255).astype(np.uint8)


def render_preview(
    image: np.ndarray,
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
    labels: np.ndarray | None = None,
    second: np.ndarray | None = None,
    centre: Sequence[int] | None = None,
    alpha: float = 0.45,
    height: int = 192,
) -> np.ndarray:
    """Render a preview as an RGB array (rows, cols, 3) uint8.

    Args:
        image: (X, Y, Z) volume in RAS voxel order (use :func:`save_preview` for any NIfTI orientation).
        zooms: voxel sizes (mm) for the physical aspect ratio.
        labels: optional integer label map (X, Y, Z) drawn as a coloured overlay.
        second: optional second image (e.g. a restored scan) drawn as a second row.
        centre: voxel the three slices pass through (default: label centroid, else the middle).
    """
    vol = np.asarray(image, dtype=np.float64)
    if vol.ndim != 3:
        raise ValueError(f"render_preview: image must be 3D, got shape {vol.shape}")
    if centre is None:
        if labels is not None and np.any(labels):
            centre = np.rint(np.argwhere(labels).mean(0)).astype(int).tolist()
        else:
            centre = [s // 2 for s in vol.shape]
    zx, zy, zz = (float(z) for z in zooms)
    phys = [
        (vol.shape[2] * zz, vol.shape[1] * zy),
        (vol.shape[2] * zz, vol.shape[0] * zx),
        (vol.shape[1] * zy, vol.shape[0] * zx),
    ]
    rows = []
    grey = _window(vol)
    bases = _slices(grey, centre)
    over = _slices(np.asarray(labels), centre) if labels is not None else None
    sec = _slices(_window(np.asarray(second, dtype=np.float64)), centre) if second is not None else None
    colors = label_colors(int(np.max(labels)) + 1) if labels is not None and np.any(labels) else None
    for row_kind in ("image", "second") if sec is not None else ("image",):
        tiles = []
        for v, (h_mm, w_mm) in enumerate(phys):
            scale = height / max(h_mm, 1e-6)
            shape = (height, max(1, int(round(w_mm * scale))))
            g = (bases if row_kind == "image" else sec)[v]
            rgb = np.repeat(_resize_grey(g, shape)[..., None], 3, axis=2).astype(np.float64)
            if over is not None and colors is not None and row_kind == "image":
                lab = resize_label(over[v], shape, rule="center").astype(int)
                m = lab > 0
                rgb[m] = (1 - alpha) * rgb[m] + alpha * colors[np.clip(lab[m], 0, len(colors) - 1)]
            tiles.append(rgb.astype(np.uint8))
            tiles.append(np.zeros((height, 4, 3), np.uint8))
        rows.append(np.concatenate(tiles[:-1], axis=1))
    return np.concatenate(rows, axis=0)


def save_preview(
    path: str | os.PathLike,
    image: nib.spatialimages.SpatialImage,
    labels: np.ndarray | None = None,
    second: np.ndarray | None = None,
) -> None:
    """Write a PNG preview (atomic) of a NIfTI ``image`` with an overlay on the same voxel grid.

    ``labels`` / ``second`` are arrays on ``image``'s grid; everything is reoriented to the
    closest RAS axes for display.
    """
    from PIL import Image

    ornt = nib.orientations.io_orientation(image.affine)
    data = np.asanyarray(image.dataobj).reshape(image.shape[:3])

    def ras(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else nib.orientations.apply_orientation(np.asarray(a), ornt)

    zooms = np.empty(3)
    zooms[ornt[:, 0].astype(int)] = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(0))
    rgb = render_preview(ras(data), zooms, labels=ras(labels), second=ras(second))
    with atomic_write(path) as tmp:
        Image.fromarray(rgb, "RGB").save(tmp, format="PNG")
