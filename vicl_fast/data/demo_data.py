"""The embedded demo MRI set: two real heads, task-ready.

What there is, honestly: TWO real heads, both in MNI space, on one shared
96^3 grid of 2.25 mm voxels (``vicl_fast/data/demo_*.npz``, 0.8 MB, built by
``tools/build_demo_data.py``; licences in ``LICENSE-DATA.txt``):

* ``icbm152`` - the ICBM152 2009a symmetric T1 template, an AVERAGE of 152
  brains (so smoother than any single scan), brain-extracted (no skull).
* ``colin27`` - Colin27, ONE person scanned 27 times and averaged, with skull
  (skull stripping is possible on this head only).

GM/WM of both heads come from ONE rule, a 3-class Otsu split of the
brain-extracted scan (a crude intensity segmentation; ICBM152's probability
maps are not used, so that a model taught on one head and scored on the other
is not scored on how two labelling rules disagree).

The AAL (116 regions) and Brodmann atlases were drawn on Colin27; on ICBM152
they are read at the same MNI coordinates (approximate, not hand-drawn). Any
other "subject" is a derived variant (:func:`load_demo_subjects` with
``n_augmented``): a random affine + elastic warp and intensity change of one
of these two heads, not a new person. Good for demos, smoke tests and
training plumbing; far too few heads for a claim about generalisation.

Each :class:`~vicl_fast.data.tasks3d.Subject` carries:

* ``masks``: ``brain``, ``head``, ``gm``, ``wm`` and AAL groups ``frontal``,
  ``temporal``, ``parietal``, ``occipital``, ``limbic``, ``deep_grey``,
  ``cerebellum``, ``hippocampus`` (bool (D, H, W));
* ``label_maps``: ``aal`` (1..116), ``lobes`` (1..7, the groups above
  without ``hippocampus``), ``tissue`` (1 GM, 2 WM), ``brodmann``;
* ``image`` float32 in [0, 1], ``affine`` (MNI mm), ``has_skull``.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from vicl_fast.data.augment import augment_subject
from vicl_fast.data.io import save_nifti
from vicl_fast.data.preprocess import plan_grid
from vicl_fast.data.resample import affine_resample
from vicl_fast.data.tasks3d import Subject

__all__ = ["DEMO_NAMES", "AAL_GROUPS", "load_demo_subjects", "write_demo_nifti"]

DEMO_NAMES = ("icbm152", "colin27")
STORED_GRID = 96

#: AAL region name prefixes of each structure group (``lobes`` map value = position + 1).
AAL_GROUPS: dict[str, tuple[str, ...]] = {
    "frontal": (
        "Precentral",
        "Frontal",
        "Rolandic_Oper",
        "Supp_Motor_Area",
        "Olfactory",
        "Rectus",
        "Paracentral_Lobule",
    ),
    "temporal": ("Temporal", "Heschl", "Fusiform"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "limbic": ("Cingulum", "Hippocampus", "ParaHippocampal", "Amygdala", "Insula"),
    "deep_grey": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum", "Vermis"),
}


def _data_path(name: str) -> Path:
    return Path(str(resources.files("vicl_fast.data") / f"demo_{name}.npz"))


def _group_ids(names: Sequence[str], prefixes: Sequence[str]) -> list[int]:
    return [i + 1 for i, n in enumerate(names) if n.startswith(tuple(prefixes))]


def _load_one(name: str) -> Subject:
    path = _data_path(name)
    if not path.exists():
        raise FileNotFoundError(f"demo file {path} is missing; rebuild it with tools/build_demo_data.py")
    with np.load(path, allow_pickle=False) as z:
        arr = {k: z[k] for k in z.files}
    names = [str(n) for n in arr["aal_names"]]
    aal = arr["aal"]
    lobes = np.zeros_like(aal)
    masks = {
        "brain": arr["brain"].astype(bool),
        "head": arr["head"].astype(bool),
        "gm": arr["tissue"] == 1,
        "wm": arr["tissue"] == 2,
    }
    for v, (group, prefixes) in enumerate(AAL_GROUPS.items(), start=1):
        m = np.isin(aal, _group_ids(names, prefixes))
        lobes[m] = v
        masks[group] = m
    masks["hippocampus"] = np.isin(aal, _group_ids(names, ("Hippocampus",)))
    return Subject(
        name=name,
        image=arr["image"].astype(np.float32) / 255.0,
        masks=masks,
        label_maps={"aal": aal, "lobes": lobes, "tissue": arr["tissue"], "brodmann": arr["brodmann"]},
        affine=arr["affine"].astype(np.float64),
        has_skull=bool(arr["has_skull"]),
        source=str(arr["source"]),
    )


def _regrid(s: Subject, size: int) -> Subject:
    """The subject on ``size``^3 voxels covering the same field of view, with the matching affine.

    One affine resampling per volume (linear + anti-aliasing for images, nearest for labels). The
    padding mode is SciPy's ``"constant"`` (0 outside), not the ``"nearest"`` edge value of
    ``preprocess``: the demo subjects at every size (and the demo models trained on them) are
    defined by it.
    """
    stored_spacing = float(np.linalg.norm(s.affine[:3, 0]))
    m = plan_grid(s.affine, s.image.shape, spacing=stored_spacing * STORED_GRID / size, grid=size)
    Q, shp = m.index_map, m.grid_shape

    def image(v: np.ndarray) -> np.ndarray:
        return affine_resample(v, Q, shp, order=1, antialias=True)

    def label(v: np.ndarray) -> np.ndarray:
        return affine_resample(v, Q, shp, order=0)

    masks = {k: label(v).astype(bool) for k, v in s.masks.items()}
    maps = {k: label(v) for k, v in s.label_maps.items()}
    mods = {k: image(v) for k, v in s.modalities.items()}
    img = np.clip(image(s.image), 0, 1)
    return Subject(s.name, img, masks, maps, mods, m.grid_affine, s.has_skull, s.source)


def load_demo_subjects(
    names: Sequence[str] | None = None, size: int | None = None, n_augmented: int = 0, seed: int = 0,
    masks: Sequence[str] | None = None,
) -> list[Subject]:
    """Load the embedded heads (and optional augmented variants), ready for task synthesis.

    Args:
        names: subset of :data:`DEMO_NAMES` (default: both).
        size: grid edge (multiple of 16) to resample to, covering the same 216 mm field of view;
            ``None`` keeps the stored 96^3 (2.25 mm). E.g. 64 (3.375 mm) for fast CPU tests,
            128 (1.69 mm) for the paper's grid.
        n_augmented: number of derived variants appended, cycling over the real heads:
            random affine + elastic warp + intensity shift/scale (seeded by ``seed``).
            They are copies of the same two people, named ``"<head>_aug<i>"``.
        masks: keep only these masks and no label maps (``None``: all). The volumes kept are the
            same as with all of them (the random draws do not depend on how many are warped); fewer
            to resample makes loading faster (12 warped copies at 96^3: most of the time is masks).

    Returns:
        list of :class:`~vicl_fast.data.tasks3d.Subject`, real heads first.

    Example:
        >>> subs = load_demo_subjects(size=64)
        >>> [s.name for s in subs], subs[0].image.shape
        (['icbm152', 'colin27'], (64, 64, 64))
    """
    names = list(DEMO_NAMES if names is None else names)
    bad = [n for n in names if n not in DEMO_NAMES]
    if bad:
        raise ValueError(f"unknown demo subject(s) {bad}; available: {', '.join(DEMO_NAMES)}")
    if size is not None and (int(size) <= 0 or int(size) % 16):
        raise ValueError(f"size must be a positive multiple of 16 (e.g. 64, 96, 128), got {size}")
    subjects = [_load_one(n) for n in names]
    if masks is not None:
        unknown = sorted(set(masks) - set(subjects[0].masks))
        if unknown:
            raise ValueError(f"unknown mask(s) {unknown}; available: {', '.join(sorted(subjects[0].masks))}")
        subjects = [dataclasses.replace(s, masks={k: v for k, v in s.masks.items() if k in masks}, label_maps={})
                    for s in subjects]
    if size is not None and int(size) != STORED_GRID:
        subjects = [_regrid(s, int(size)) for s in subjects]
    rng = np.random.default_rng(seed)
    probs = {
        "affine": 1.0,
        "elastic": 1.0,
        "flip": 0.0,
        "rotate": 0.0,
        "shift": 1.0,
        "scale": 1.0,
        "noise": 0.0,
        "invert": 0.0,
        "gin": 0.0,
    }
    base = list(subjects)
    for i in range(int(n_augmented)):
        s = base[i % len(base)]
        mk, lk = sorted(s.masks), sorted(s.label_maps)
        labels = [s.masks[k] for k in mk] + [s.label_maps[k] for k in lk]
        img, labs, _, _ = augment_subject(s.image, labels, rng, probs)
        subjects.append(
            Subject(
                f"{s.name}_aug{i}",
                np.clip(img, 0, 1),
                dict(zip(mk, labs[: len(mk)])),
                dict(zip(lk, labs[len(mk) :])),
                {},
                s.affine.copy(),
                s.has_skull,
                s.source + " (augmented copy)",
            )
        )
    return subjects


def write_demo_nifti(
    out_dir: str | os.PathLike,
    label: str = "brain",
    subjects: Sequence[Subject] | None = None,
) -> list[tuple[Path, Path]]:
    """Export subjects as ``<name>_image.nii.gz`` / ``<name>_label.nii.gz`` pairs (inputs for the CLI).

    Args:
        label: a mask name (written 0/1) or a label-map name (written as is, e.g. ``"lobes"``).

    Returns:
        ``[(image path, label path), ...]``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for s in subjects if subjects is not None else load_demo_subjects():
        if label in s.masks:
            lab = s.masks[label].astype(np.uint8)
        elif label in s.label_maps:
            lab = s.label_maps[label].astype(np.uint16 if s.label_maps[label].max() > 255 else np.uint8)
        else:
            raise ValueError(
                f"label {label!r} not in subject {s.name}: masks {sorted(s.masks)}, "
                f"maps {sorted(s.label_maps)}"
            )
        ip, lp = out / f"{s.name}_image.nii.gz", out / f"{s.name}_label.nii.gz"
        save_nifti(s.image.astype(np.float32), s.affine, ip)
        save_nifti(lab, s.affine, lp)
        pairs.append((ip, lp))
    return pairs
