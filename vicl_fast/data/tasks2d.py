"""2D tasks for RandP from slices of the same 3D sources, and the paper's 2x2 grid.

RandP (Sec. 3, "Unifying Input and Output Spaces"): prompt image, prompt
label, query image and query label are each ``(3, H, W)`` and are tiled as

    +---------------+---------------+
    | prompt image  | prompt label  |
    +---------------+---------------+
    | query image   | query label   |     -> X in R^{3 x 2H x 2W}
    +---------------+---------------+

Segmentation labels are drawn with one RGB colour per class and decoded back
by the nearest colour (L2), turning segmentation into image-to-image
translation; low-level tasks stay in intensity space (grey repeated on 3
channels). Families here, all from slices of :class:`~vicl_fast.data.tasks3d.Subject`,
named as their 3D counterparts (:mod:`vicl_fast.data.task_registry`; RandP's former
names ``denoising`` and ``synthesis`` are deprecated aliases):

* ``segmentation`` - a mask (or a label map's classes, each its own colour);
* ``gaussian_noise`` - Gaussian noise, sigma ~ U(0.05, 0.15) by default (RandP's
  data is low-dose CT; this is a synthetic stand-in on MRI slices);
* ``super_resolution`` - x``factor`` block average, bilinear back;
* ``modality_transform`` - a registered second modality, or (the demo has none) a
  fixed random-convolution contrast of the slice: a synthetic "modality" (RandP's
  PET synthesis).

Slices are ``(3, H, W)`` float32 in [0, 1], resized to ``size`` x ``size``
(:mod:`vicl_fast.data.resample`: bilinear with anti-aliasing, labels by nearest
voxel centre).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from vicl_fast.data.augment import GinParams, apply_gin, sample_gin
from vicl_fast.data.resample import resize_image, resize_label
from vicl_fast.data.task_registry import canonical_name, task_names
from vicl_fast.data.tasks3d import Subject, downsample_upsample

__all__ = [
    "FAMILIES_2D",
    "TaskSpec2D",
    "label_palette",
    "to_rgb",
    "colorize",
    "decode_colors",
    "make_grid",
    "split_grid",
    "extract_slice",
    "sample_task_2d",
    "make_pair_2d",
    "sample_episode_2d",
]

#: The 2D families in registry order, which is the order of RandP's task-head ids.
FAMILIES_2D: tuple[str, ...] = task_names(2)


@dataclass
class TaskSpec2D:
    """Task-level choices shared by the prompt and the query of one 2D episode."""

    family: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.family = canonical_name(self.family)  # a spec written with a deprecated name still runs


def label_palette(n_classes: int) -> np.ndarray:
    """RGB colours in [0, 1], (n_classes, 3): class 0 black, class 1 white when binary, else distinct hues."""
    from vicl_fast.preview import label_colors

    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if n_classes == 2:
        return np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    pal = label_colors(n_classes).astype(np.float64) / 255.0
    pal[0] = 0.0
    return pal


def to_rgb(x: np.ndarray) -> np.ndarray:
    """Grey (H, W) -> (3, H, W) float32."""
    return np.repeat(np.asarray(x, dtype=np.float32)[None], 3, axis=0)


def colorize(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Integer (H, W) label map -> (3, H, W) colour image (palette row = class index)."""
    lab = np.asarray(label_map).astype(np.int64)
    if lab.min() < 0 or lab.max() >= len(palette):
        raise ValueError(f"label values must lie in [0, {len(palette) - 1}], got [{lab.min()}, {lab.max()}]")
    return np.asarray(palette, dtype=np.float32)[lab].transpose(2, 0, 1).copy()


def decode_colors(rgb: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) colours -> class indices of the nearest palette colour (L2)."""
    x = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
    pal = np.asarray(palette, dtype=np.float64)
    xc = np.moveaxis(x.astype(np.float64), -3, -1)  # (..., H, W, 3)
    d = ((xc[..., None, :] - pal) ** 2).sum(-1)
    return d.argmin(-1)


def make_grid(prompt_image, prompt_label, query_image, query_label=None):
    """Tile four (C, H, W) (or (B, C, H, W)) arrays/tensors into (C, 2H, 2W); query label 0 when None."""
    is_t = isinstance(prompt_image, torch.Tensor)
    cat = torch.cat if is_t else np.concatenate
    if query_label is None:
        query_label = torch.zeros_like(query_image) if is_t else np.zeros_like(query_image)
    shapes = {tuple(a.shape) for a in (prompt_image, prompt_label, query_image, query_label)}
    if len(shapes) != 1:
        raise ValueError(f"make_grid: all four parts must share one shape, got {sorted(shapes)}")
    top = cat([prompt_image, prompt_label], -1)
    bottom = cat([query_image, query_label], -1)
    return cat([top, bottom], -2)


def split_grid(grid):
    """Inverse of :func:`make_grid`: ``(pi, pl, qi, ql)`` each (..., C, H, W)."""
    H, W = grid.shape[-2] // 2, grid.shape[-1] // 2
    return (grid[..., :H, :W], grid[..., :H, W:], grid[..., H:, :W], grid[..., H:, W:])


def extract_slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice of a (D, H, W) volume along ``axis``, oriented with the first remaining axis as rows."""
    return np.take(vol, int(index), axis=int(axis))


def sample_task_2d(
    subjects: Sequence[Subject], rng: np.random.Generator, family: str | None = None, **overrides: Any
) -> TaskSpec2D:
    """Draw a 2D task valid for every subject (uniform over :data:`FAMILIES_2D` when ``family`` is None;
    a deprecated alias such as ``"denoising"`` is accepted with a warning)."""
    family = canonical_name(family) if family else FAMILIES_2D[int(rng.integers(len(FAMILIES_2D)))]
    if family not in FAMILIES_2D:
        raise ValueError(f"unknown 2D family {family!r}; choose one of {', '.join(FAMILIES_2D)}")
    p: dict[str, Any] = {"axis": int(rng.integers(3))}
    if family == "segmentation":
        masks = sorted(set.intersection(*[set(s.masks) for s in subjects]))
        if not masks:
            raise ValueError("segmentation needs a mask shared by all subjects")
        p["mask"] = masks[int(rng.integers(len(masks)))]
    elif family == "gaussian_noise":
        p["sigma_range"] = (0.05, 0.15)
    elif family == "super_resolution":
        p["factor"] = 2
    elif family == "modality_transform":
        common = sorted(set.intersection(*[set(s.modalities) for s in subjects]))
        if common:
            p["modality"] = common[int(rng.integers(len(common)))]
        else:
            p["gin"] = sample_gin(rng, ndim=2)
    p.update(overrides)
    return TaskSpec2D(family, p)


def _resize_image(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W) slice -> (size, size) float32, bilinear with anti-aliasing (RandP's slices)."""
    return resize_image(x, (size, size), antialias=True)


def _pick_slice(s: Subject, axis: int, rng: np.random.Generator, mask: np.ndarray | None) -> int:
    ref = mask if mask is not None and mask.any() else (s.masks.get("brain", s.image > 0.05))
    idx = np.flatnonzero(np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1).any(1))
    if len(idx) == 0:
        return s.image.shape[axis] // 2
    lo, hi = idx.min(), idx.max()
    # Central 60 % of the structure's extent: slices with a meaningful amount of it.
    a, b = lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo)
    return int(np.clip(np.rint(rng.uniform(a, max(a, b))), lo, hi))


def make_pair_2d(
    spec: TaskSpec2D, subject: Subject, rng: np.random.Generator, size: int = 256, index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One (image (3, size, size), label (3, size, size)) pair of ``spec`` from a slice of ``subject``."""
    p, ax = spec.params, int(spec.params["axis"])
    mask3d = subject.masks[p["mask"]] if spec.family == "segmentation" else None
    i = _pick_slice(subject, ax, rng, mask3d) if index is None else int(index)
    img = np.clip(_resize_image(extract_slice(subject.image, ax, i), size), 0.0, 1.0)
    if spec.family == "segmentation":
        m = resize_label(extract_slice(mask3d, ax, i).astype(np.uint8), (size, size), rule="center")
        return to_rgb(img), colorize(m, label_palette(2))
    if spec.family == "gaussian_noise":
        sigma = p.get("sigma", rng.uniform(*p["sigma_range"]))
        return to_rgb(img + rng.normal(0.0, sigma, img.shape).astype(np.float32)), to_rgb(img)
    if spec.family == "super_resolution":
        return to_rgb(downsample_upsample(img, int(p["factor"]))[0]), to_rgb(img)
    if spec.family == "modality_transform":
        if "modality" in p:
            out = _resize_image(extract_slice(subject.modalities[p["modality"]], ax, i), size)
        else:
            gp: GinParams = p["gin"]
            out = apply_gin(img, gp)
        return to_rgb(img), to_rgb(np.clip(out, 0, 1))
    raise ValueError(f"unknown 2D family {spec.family!r}")


def sample_episode_2d(
    subjects: Sequence[Subject],
    rng: np.random.Generator,
    family: str | None = None,
    size: int = 256,
    spec: TaskSpec2D | None = None,
) -> dict[str, Any]:
    """Prompt pair + query pair of one 2D task, from two random subjects (may coincide: other slice).

    Returns:
        ``{"prompt_image", "prompt_label", "query_image", "query_label"}`` each (3, size, size),
        ``"grid"`` (3, 2 size, 2 size) with the query label shown, and ``"spec"``.
    """
    spec = spec or sample_task_2d(subjects, rng, family)
    a, b = (subjects[int(i)] for i in rng.integers(len(subjects), size=2))
    pi, pl = make_pair_2d(spec, a, rng, size)
    qi, ql = make_pair_2d(spec, b, rng, size)
    return {
        "prompt_image": pi,
        "prompt_label": pl,
        "query_image": qi,
        "query_label": ql,
        "grid": make_grid(pi, pl, qi, ql),
        "spec": spec,
    }
