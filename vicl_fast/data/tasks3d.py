"""3D task synthesis of Neuroverse3D (supplement Sec. B.2-B.3), seeded.

An in-context *task* maps an input volume to an output volume; an *episode*
is one target pair plus ``L`` context pairs of the same task. Task-level
choices (which classes form the foreground, the Sobel / inversion / dilation
/ erosion switches, the GIN contrast of a modality pair, the overlaid
corruptions) are drawn once per episode in :func:`sample_task`; per-sample
randomness (noise realisations, bias fields, Perlin masks, augmentations) is
drawn per pair in :func:`apply_task`, as in the paper's training.

Families (name: input -> output; names, rates and loss weights are those of
:mod:`vicl_fast.data.task_registry`, Table 3 of the supplement):

==================  ==========================================================
segmentation        image -> binary mask of one class or a random group of
                    up to 10 classes (p=0.5); task augmentations: Sobel-
                    filtered label (0.05), mask inversion (0.05), dilation /
                    erosion by 1 voxel (0.05 each, 6-connected)
bias_field          image * exp(Legendre polynomial field, order 3) -> image
gaussian_noise      image + N(0, sigma^2), sigma ~ U(0.15, 0.25) -> image
salt_pepper         salt (1) and pepper (0) each with p = 0.04 -> image
inpainting          image with a 3D Perlin-noise mask set to 0 -> image
super_resolution    x2 block average, trilinear back to the grid -> image
slices_to_volume    the three central slices only (2D-to-3D) -> image
skull_stripping     head image -> image * brain mask
modality_transform  modality A -> registered modality B (or a fixed GIN
                    contrast of A when no real pair exists: synthetic)
==================  ==========================================================

Random task overlap (Sec. B.3): for generation tasks each of bias field,
Gaussian noise, salt-and-pepper, inpainting and super-resolution is also
overlaid on the input with p = 0.05, independently.

All volumes are (D, H, W) float32 in [0, 1] (the model grid); masks are bool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial import legendre
from scipy import ndimage

from vicl_fast.data.augment import apply_gin, augment_subject, sample_gin
from vicl_fast.data.resample import resize_image
from vicl_fast.data.task_registry import TASKS, canonical_name, overlay_tasks, task_names

__all__ = [
    "Subject",
    "random_crop_start",
    "crop_focus",
    "TaskSpec",
    "Episode",
    "FAMILIES_3D",
    "GENERATION_FAMILIES",
    "OVERLAY_FAMILIES",
    "legendre_bias_field",
    "apply_bias_field",
    "add_gaussian_noise",
    "add_salt_pepper",
    "perlin_noise",
    "perlin_mask",
    "inpaint",
    "downsample_upsample",
    "central_slices",
    "skull_strip",
    "group_classes",
    "invert_mask",
    "dilate_mask",
    "erode_mask",
    "sobel_label",
    "sample_task",
    "apply_task",
    "sample_episode",
]


#: The 3D families in Table 3 order (sampling rates and loss weights: ``task_registry.TASKS``).
FAMILIES_3D: tuple[str, ...] = task_names(3)
GENERATION_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES_3D if TASKS[f].kind == "gen")
#: Corruptions of the random task overlap (B.3), in the order their coins are drawn.
OVERLAY_FAMILIES: tuple[str, ...] = overlay_tasks()


@dataclass
class Subject:
    """One registered head on the model grid.

    Attributes:
        name: identifier.
        image: (D, H, W) float32 in [0, 1], the main scan (T1; with skull when ``masks["brain"]``
            exists and the scan has one).
        masks: binary structures, (D, H, W) bool, e.g. ``"brain"``, ``"gm"``, ``"wm"``, ``"frontal"``.
        label_maps: integer atlases, (D, H, W), e.g. ``"aal"`` (0 = background).
        modalities: other registered scans (D, H, W) float32 in [0, 1] for modality transformation.
        affine: (4, 4) world affine of the grid (mm).
        has_skull: whether ``image`` shows the skull (skull stripping needs it).
    """

    name: str
    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    label_maps: dict[str, np.ndarray] = field(default_factory=dict)
    modalities: dict[str, np.ndarray] = field(default_factory=dict)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    has_skull: bool = False
    source: str = ""


@dataclass
class TaskSpec:
    """Task-level choices shared by every pair of an episode (see :func:`sample_task`)."""

    family: str
    params: dict[str, Any] = field(default_factory=dict)
    overlays: tuple[str, ...] = ()

    @property
    def is_segmentation(self) -> bool:
        return self.family == "segmentation"


@dataclass
class Episode:
    """One in-context problem: shapes ``(1, D, H, W)`` for the target, ``(L, 1, D, H, W)`` for contexts."""

    target_in: np.ndarray
    target_out: np.ndarray
    context_in: np.ndarray
    context_out: np.ndarray
    spec: TaskSpec
    names: list[str]


# --------------------------------------------------------------------------- corruptions


def _norm_coords(shape: Sequence[int]) -> list[np.ndarray]:
    return [np.linspace(-1.0, 1.0, s) for s in shape]


def legendre_bias_field(
    shape: Sequence[int], rng: np.random.Generator, order: int = 3, max_coeff: float = 0.5
) -> np.ndarray:
    """Smooth multiplicative field ``exp(sum c_ijk P_i(x) P_j(y) P_k(z))``, ``i+j+k <= order``.

    Coefficients ~ U(-max_coeff, max_coeff) (the constant term is 0 so the field is centred on 1),
    as TorchIO's RandomBiasField. Returns (D, H, W) float64 > 0.
    """
    xs = _norm_coords(shape)
    basis = [[legendre.legval(x, np.eye(order + 1)[i]) for i in range(order + 1)] for x in xs]
    logf = np.zeros(tuple(shape))
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                if i == j == k == 0:
                    continue
                c = rng.uniform(-max_coeff, max_coeff)
                logf += (
                    c * basis[0][i][:, None, None] * basis[1][j][None, :, None] * basis[2][k][None, None, :]
                )
    return np.exp(logf)


def apply_bias_field(
    x: np.ndarray, rng: np.random.Generator, order: int = 3, max_coeff: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """``x * field``; returns ``(corrupted float32, field)``."""
    fld = legendre_bias_field(x.shape, rng, order, max_coeff)
    return (x * fld).astype(np.float32), fld


def add_gaussian_noise(
    x: np.ndarray,
    rng: np.random.Generator,
    sigma: float | None = None,
    sigma_range: tuple[float, float] = (0.15, 0.25),
) -> tuple[np.ndarray, float]:
    """``x + N(0, sigma^2)`` (not clipped); ``sigma ~ U(sigma_range)`` when not given."""
    s = float(rng.uniform(*sigma_range)) if sigma is None else float(sigma)
    return (x + rng.normal(0.0, s, size=x.shape)).astype(np.float32), s


def add_salt_pepper(
    x: np.ndarray, rng: np.random.Generator, p: float = 0.04
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Salt (value 1) and pepper (value 0) drawn separately, each with probability ``p``.

    Where both land, pepper wins (drawn second). Returns ``(noisy, salt mask, pepper mask)``.
    """
    salt = rng.random(x.shape) < p
    pepper = rng.random(x.shape) < p
    out = np.array(x, dtype=np.float32, copy=True)
    out[salt] = 1.0
    out[pepper] = 0.0
    return out, salt, pepper


def perlin_noise(shape: Sequence[int], rng: np.random.Generator, res: Sequence[int] | int = 4) -> np.ndarray:
    """Gradient (Perlin) noise on a lattice of ``res`` cells per axis, 2D or 3D, values ~[-1, 1].

    Random unit gradients at the lattice nodes, dot products with the offsets to the
    cell corners, blended with the quintic fade ``6t^5 - 15t^4 + 10t^3``.
    """
    n = len(shape)
    res = np.broadcast_to(np.asarray(res, dtype=int), (n,))
    g = rng.normal(size=tuple(int(r) + 1 for r in res) + (n,))
    g /= np.linalg.norm(g, axis=-1, keepdims=True).clip(1e-12)
    # Continuous lattice coordinates of every voxel.
    coords = [np.linspace(0, r, s, endpoint=False) + 0.5 * r / s for r, s in zip(res, shape)]
    cell = [np.floor(c).astype(int) for c in coords]
    frac = [c - ci for c, ci in zip(coords, cell)]
    fade = [f**3 * (f * (f * 6 - 15) + 10) for f in frac]

    def bc(a: np.ndarray, axis: int) -> np.ndarray:
        sh = [1] * n
        sh[axis] = -1
        return a.reshape(sh)

    out = np.zeros(tuple(shape))
    for corner in np.ndindex(*(2,) * n):
        idx = tuple(bc(cell[a] + corner[a], a) for a in range(n))
        grad = g[idx]  # (*shape, n)
        dot = sum(grad[..., a] * bc(frac[a] - corner[a], a) for a in range(n))
        w = 1.0
        for a in range(n):
            w = w * bc(fade[a] if corner[a] else 1 - fade[a], a)
        out += w * dot
    return out


def perlin_mask(
    shape: Sequence[int],
    rng: np.random.Generator,
    fraction: float | None = None,
    region: np.ndarray | None = None,
    res: int | None = None,
) -> np.ndarray:
    """Blob-shaped occlusion mask: Perlin noise above its ``1 - fraction`` quantile.

    Args:
        fraction: share of ``region`` voxels occluded; ~U(0.05, 0.25) when None.
        region: optional bool mask (e.g. the head) the quantile is taken in and the mask limited to.
        res: lattice cells per axis; ~{2, 3, 4} when None.

    Returns:
        (D, H, W) bool, never empty.
    """
    frac = float(rng.uniform(0.05, 0.25)) if fraction is None else float(fraction)
    r = int(rng.integers(2, 5)) if res is None else int(res)
    noise = perlin_noise(shape, rng, r)
    reg = np.ones(tuple(shape), dtype=bool) if region is None or not region.any() else region.astype(bool)
    thr = np.quantile(noise[reg], 1.0 - frac)
    mask = (noise > thr) & reg
    if not mask.any():  # tiny regions: occlude the single highest voxel rather than nothing
        mask.flat[np.argmax(np.where(reg, noise, -np.inf))] = True
    return mask


def inpaint(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Set the masked voxels to 0 (the inpainting input)."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[mask] = 0.0
    return out


def downsample_upsample(x: np.ndarray, factor: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Super-resolution input: ``factor``-block average (edge-padded), linear back to ``x.shape``
    (:func:`vicl_fast.data.resample.resize_image`; 2D or 3D).

    Returns ``(input on x's grid float32, low-resolution volume of shape ceil(shape / factor))``.
    """
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    pad = []
    for s in reversed(x.shape):
        pad += [0, (-s) % factor]
    if any(pad):
        t = F.pad(t, pad, mode="replicate")
    pool = F.avg_pool3d if x.ndim == 3 else F.avg_pool2d
    low = pool(t, factor)[0, 0].numpy()
    # linear back to factor x the low-resolution grid (= the padded grid), then cropped to x's
    up = resize_image(low, [s * factor for s in low.shape])
    return np.array(up[tuple(slice(0, s) for s in x.shape)], dtype=np.float32), low


def central_slices(x: np.ndarray, centre: Sequence[int] | None = None) -> np.ndarray:
    """2D-to-3D input: zeros except the three orthogonal slices through ``centre`` (default: middle)."""
    c = [s // 2 for s in x.shape] if centre is None else [int(v) for v in centre]
    out = np.zeros_like(x, dtype=np.float32)
    out[c[0]] = x[c[0]]
    out[:, c[1]] = x[:, c[1]]
    out[:, :, c[2]] = x[:, :, c[2]]
    return out


def skull_strip(x: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Skull-stripping ground truth: the image inside the brain mask, 0 outside."""
    return np.where(brain_mask, x, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- label tasks


def group_classes(label_map: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Foreground = union of ``classes`` (random grouping of Sec. B.3); bool (D, H, W)."""
    return np.isin(label_map, np.asarray(classes))


def invert_mask(mask: np.ndarray) -> np.ndarray:
    """Swap foreground and background."""
    return ~mask.astype(bool)


_CROSS3 = ndimage.generate_binary_structure(3, 1)


def dilate_mask(mask: np.ndarray) -> np.ndarray:
    """Dilation by 1 voxel (6-connected cross in 3D, 4-connected in 2D)."""
    st = ndimage.generate_binary_structure(mask.ndim, 1)
    return ndimage.binary_dilation(mask, structure=st)


def erode_mask(mask: np.ndarray) -> np.ndarray:
    """Erosion by 1 voxel (structuring element of :func:`dilate_mask`); outside counts as background."""
    st = ndimage.generate_binary_structure(mask.ndim, 1)
    return ndimage.binary_erosion(mask, structure=st, border_value=0)


def sobel_label(mask: np.ndarray) -> np.ndarray:
    """Sobel-filtered label: gradient magnitude of the mask, scaled to a maximum of 1 (float32)."""
    m = mask.astype(np.float64)
    mag = np.sqrt(sum(ndimage.sobel(m, axis=a, mode="constant") ** 2 for a in range(m.ndim)))
    mx = mag.max()
    return (mag / mx if mx > 0 else mag).astype(np.float32)


# --------------------------------------------------------------------------- task sampling


def _segmentation_sources(subjects: Sequence[Subject]) -> tuple[list[str], list[str]]:
    masks = set.intersection(*[set(s.masks) for s in subjects])
    maps = set.intersection(*[set(s.label_maps) for s in subjects])
    return sorted(masks), sorted(maps)


def random_crop_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator,
                      focus: np.ndarray | None = None) -> tuple[int, ...]:
    """Start of a ``size`` window inside ``shape``, centred on a random voxel of ``focus`` (a (D, H, W)
    mask; the whole volume when None or empty), clamped so that the window stays inside."""
    shape, size = np.asarray(shape), np.asarray(size)
    if np.any(size > shape):
        raise ValueError(f"crop {tuple(size)} is larger than the volume {tuple(shape)}")
    idx = np.flatnonzero(focus) if focus is not None else np.empty(0, np.int64)
    if len(idx):
        centre = np.array(np.unravel_index(int(idx[int(rng.integers(len(idx)))]), tuple(shape)))
    else:
        centre = np.array([int(rng.integers(n)) for n in shape])
    return tuple(int(v) for v in np.clip(centre - size // 2, 0, shape - size))


def crop_focus(spec: TaskSpec, subject: Subject, rng: np.random.Generator) -> np.ndarray | None:
    """Where a training crop for ``spec`` is centred: half the time on the segmented structure (so that
    small structures are seen), else anywhere in the head."""
    p = spec.params
    if spec.family == "segmentation" and rng.random() < 0.5:
        if p.get("source") == "mask" and p.get("name") in subject.masks:
            return subject.masks[p["name"]]
        if p.get("source") == "label_map" and p.get("name") in subject.label_maps:
            return np.isin(subject.label_maps[p["name"]], p.get("classes", []))
    return _head_region(subject, subject.image)


def _choose(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def sample_task(
    subjects: Sequence[Subject],
    rng: np.random.Generator,
    family: str | None = None,
    overlay_p: float = 0.05,
    seg_probs: dict[str, float] | None = None,
    **overrides: Any,
) -> TaskSpec:
    """Draw one task, valid for every subject in ``subjects``.

    Args:
        subjects: the pool the episode's pairs come from (labels must exist in all).
        family: one of :data:`FAMILIES_3D`; drawn with the paper's sampling rates (Table 3,
            ``task_registry``) when None (families that the pool cannot support are skipped).
        overlay_p: probability of each overlaid corruption for generation tasks (paper: 0.05).
        seg_probs: overrides of the segmentation task augmentations
            ``{"group": 0.5, "sobel": .05, "invert": .05, "dilate": .05, "erode": .05}``.
        overrides: fixed values for entries of ``params`` (e.g. ``sigma=0.2``, ``classes=[3, 4]``).

    Returns:
        :class:`TaskSpec`.
    """
    if not subjects:
        raise ValueError("sample_task: subjects is empty; pass at least one Subject")
    feasible = [f for f in FAMILIES_3D if _feasible(f, subjects)]
    if family is not None:
        family = canonical_name(family)
    if family is None:
        rates = np.array([TASKS[f].rate for f in feasible])
        family = feasible[int(rng.choice(len(feasible), p=rates / rates.sum()))]
    elif family not in FAMILIES_3D:
        raise ValueError(f"unknown task family {family!r}; choose one of {', '.join(FAMILIES_3D)}")
    elif family not in feasible:
        raise ValueError(f"task {family!r} is not possible with these subjects: {_why_not(family)}")
    params: dict[str, Any] = {}
    overlays: tuple[str, ...] = ()
    if family == "segmentation":
        sp = {"group": 0.5, "sobel": 0.05, "invert": 0.05, "dilate": 0.05, "erode": 0.05, **(seg_probs or {})}
        masks, maps = _segmentation_sources(subjects)
        use_map = maps and (not masks or rng.random() < sp["group"])
        if use_map:
            name = _choose(rng, maps)
            present = sorted(
                set.intersection(*[set(np.unique(s.label_maps[name]).tolist()) for s in subjects]) - {0}
            )
            k = int(rng.integers(1, min(10, len(present)) + 1))
            classes = sorted(rng.choice(present, size=k, replace=False).tolist())
            params.update(source="label_map", name=name, classes=classes)
        else:
            params.update(source="mask", name=_choose(rng, masks))
        d = rng.random(4)
        params.update(
            sobel=bool(d[0] < sp["sobel"]),
            invert=bool(d[1] < sp["invert"]),
            dilate=bool(d[2] < sp["dilate"]),
            erode=bool(d[3] < sp["erode"]),
        )
    else:
        if family == "modality_transform":
            common = sorted(set.intersection(*[set(s.modalities) for s in subjects]))
            if common and not overrides.get("synthetic", False):
                params.update(modality=_choose(rng, common))
            else:
                params.update(gin=sample_gin(rng, ndim=3), synthetic=True)
            # Random Modalities (p=0.05): one shared GIN on inputs and outputs of every pair.
            if rng.random() < 0.05:
                params["shared_gin"] = sample_gin(rng, ndim=3)
        elif family == "super_resolution":
            params.update(factor=2)
        overlays = tuple(
            f
            for f, u in zip(OVERLAY_FAMILIES, rng.random(len(OVERLAY_FAMILIES)))
            if u < overlay_p and f != family
        )
    params.update(overrides)
    return TaskSpec(family, params, overlays)


def _feasible(family: str, subjects: Sequence[Subject]) -> bool:
    if family == "segmentation":
        masks, maps = _segmentation_sources(subjects)
        return bool(masks or maps)
    if family == "skull_stripping":
        return all(s.has_skull and "brain" in s.masks for s in subjects)
    return True


def _why_not(family: str) -> str:
    if family == "segmentation":
        return "no mask or label map is shared by all subjects"
    return "every subject needs an image with skull (has_skull) and a 'brain' mask"


def _corrupt(
    family: str, x: np.ndarray, rng: np.random.Generator, params: dict[str, Any], region: np.ndarray | None
) -> np.ndarray:
    if family == "bias_field":
        return apply_bias_field(x, rng)[0]
    if family == "gaussian_noise":
        return add_gaussian_noise(x, rng, params.get("sigma"))[0]
    if family == "salt_pepper":
        return add_salt_pepper(x, rng, params.get("p", 0.04))[0]
    if family == "inpainting":
        return inpaint(x, perlin_mask(x.shape, rng, params.get("fraction"), region=region))
    if family == "super_resolution":
        return downsample_upsample(x, int(params.get("factor", 2)))[0]
    raise ValueError(f"{family!r} is not a corruption")


def _head_region(s: Subject, x: np.ndarray) -> np.ndarray:
    if "head" in s.masks:
        return s.masks["head"]
    if "brain" in s.masks:
        return s.masks["brain"]
    return x > 0.05


def apply_task(
    spec: TaskSpec,
    subject: Subject,
    rng: np.random.Generator,
    augment: bool = True,
    aug_probs: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Make one (input, output) pair of ``spec`` from ``subject``.

    Args:
        augment: apply the image augmentations of Sec. B.3 first (spatial to all
            volumes of the subject jointly, intensity to the image only).

    Returns:
        ``(input (D, H, W) float32, output (D, H, W) float32)``; segmentation outputs are
        0/1 (or the Sobel magnitude in [0, 1]).
    """
    fam, p = spec.family, spec.params
    img = subject.image
    mask_names = sorted(subject.masks)
    map_names = sorted(subject.label_maps)
    mod_names = sorted(subject.modalities)
    labels = [subject.masks[k] for k in mask_names] + [subject.label_maps[k] for k in map_names]
    extra = [subject.modalities[k] for k in mod_names]
    if augment:
        img, labels, extra, _ = augment_subject(img, labels, rng, aug_probs, extra_images=extra)
    masks = dict(zip(mask_names, labels[: len(mask_names)]))
    maps = dict(zip(map_names, labels[len(mask_names) :]))
    mods = dict(zip(mod_names, extra))
    aug = Subject(subject.name, img, masks, maps, mods, subject.affine, subject.has_skull)

    if fam == "segmentation":
        if p["source"] == "mask":
            m = masks[p["name"]].astype(bool)
        else:
            m = group_classes(maps[p["name"]], p["classes"])
        if p.get("dilate"):
            m = dilate_mask(m)
        if p.get("erode"):
            m = erode_mask(m)
        if p.get("invert"):
            m = invert_mask(m)
        out = sobel_label(m) if p.get("sobel") else m.astype(np.float32)
        return img.astype(np.float32), out

    region = _head_region(aug, img)
    if fam in OVERLAY_FAMILIES:
        inp, out = _corrupt(fam, img, rng, p, region), img
    elif fam == "slices_to_volume":
        c = p.get("centre")
        if c is None:
            bb = np.argwhere(masks["brain"] if "brain" in masks else img > 0.05)
            c = ((bb.min(0) + bb.max(0)) // 2).tolist() if len(bb) else None
        inp, out = central_slices(img, c), img
    elif fam == "skull_stripping":
        inp, out = img, skull_strip(img, masks["brain"])
    elif fam == "modality_transform":
        if p.get("synthetic"):
            inp, out = img, apply_gin(img, p["gin"])
        else:
            inp, out = img, mods[p["modality"]]
        if "shared_gin" in p:
            inp, out = apply_gin(inp, p["shared_gin"]), apply_gin(out, p["shared_gin"])
    else:  # pragma: no cover - sample_task validates the family
        raise ValueError(f"unknown family {fam!r}")
    for ov in spec.overlays:
        inp = _corrupt(ov, inp, rng, {}, region)
    return inp.astype(np.float32), out.astype(np.float32)


def sample_episode(
    subjects: Sequence[Subject],
    rng: np.random.Generator,
    n_context: int = 3,
    family: str | None = None,
    spec: TaskSpec | None = None,
    augment: bool = True,
    **task_kwargs: Any,
) -> Episode:
    """One target + ``n_context`` context pairs of one task (Sec. B.2).

    Subjects are drawn with replacement when the pool is smaller than ``n_context + 1``
    (their augmentations differ). The target is the first draw.

    Returns:
        :class:`Episode` with ``target_* (1, D, H, W)`` and ``context_* (L, 1, D, H, W)``.
    """
    if n_context < 1:
        raise ValueError(f"n_context must be >= 1, got {n_context}")
    spec = spec or sample_task(subjects, rng, family, **task_kwargs)
    k = n_context + 1
    idx = rng.choice(len(subjects), size=k, replace=len(subjects) < k)
    pairs = [apply_task(spec, subjects[int(i)], rng, augment=augment) for i in idx]
    ins = np.stack([a for a, _ in pairs])[:, None]
    outs = np.stack([b for _, b in pairs])[:, None]
    return Episode(ins[0], outs[0], ins[1:], outs[1:], spec, [subjects[int(i)].name for i in idx])
