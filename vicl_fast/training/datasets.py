"""Training data: folders of NIfTI pairs and the embedded demo set, sampled as in-context episodes.

Folder layout (one folder per dataset; file names match across sub-folders)::

    my_dataset/
      images/   case001.nii.gz  case002.nii.gz ...   the scans (3D, any orientation/voxel size)
      labels/   case001.nii.gz  case002.nii.gz ...   integer label maps on the same grid (0 = background)
      masks/    (optional) brain masks; their presence means images/ shows the skull
                and enables the skull_stripping task
      targets/  (optional) a registered second modality; enables real modality_transform
                pairs (without it the task uses a synthetic GIN contrast, as tasks3d does)

Every volume is preprocessed once per worker (canonical orientation, ``spacing``
mm, fitted into the model grid, intensities to [0, 1] on the 0.02/0.98
percentiles: :mod:`vicl_fast.data.preprocess`) and cached in memory.

Episodes (Neuroverse3D supplement B.2): a task is drawn with the configured
sampling rates, then a dataset that supports it with equal probability, then
L + 1 distinct subjects (with replacement only when the dataset is smaller);
the task-level choices are shared by the episode and the per-pair randomness
(noise, augmentations) is drawn per pair (:mod:`vicl_fast.data.tasks3d`).

Determinism: episode ``(step, slot)`` is a pure function of ``(seed, step,
slot)``: its generator is ``numpy.random.default_rng([seed, stream, step,
slot])``. Which DataLoader worker builds it, how many workers there are and
whether the run was resumed do not change a single voxel, and the same holds
on 1 or N processes (slot = rank * batch_size + b).
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from vicl_fast.data.resample import resize_image, resize_label
from vicl_fast.data.task_registry import default_tasks, get_task
from vicl_fast.training.config import Config, ConfigError, DatasetConfig, TaskConfig

__all__ = [
    "SubjectSource", "FolderSource", "DemoSource", "build_sources", "resolve_tasks",
    "EpisodeDataset", "StepBatchSampler", "context_size_for_step", "make_loader", "seed_worker",
]

log = logging.getLogger("vicl_fast.training")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_STREAM_TRAIN, _STREAM_VAL, _STREAM_L = 0, 1, 2


def _stem(name: str) -> str | None:
    low = name.lower()
    for suf in NIFTI_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        s = _stem(p.name)
        if s is not None and p.is_file():
            out[s] = p
    return out


# ------------------------------------------------------------------ sources
class SubjectSource:
    """A named pool of subjects on the model grid; ``subject(i)`` -> ``tasks3d.Subject``."""

    name: str
    names: list[str]
    has_labels: bool = True
    has_skull_masks: bool = False

    def __len__(self) -> int:
        return len(self.names)

    def subject(self, i: int):  # pragma: no cover - interface
        raise NotImplementedError

    def supports(self, task: str, spatial_dims: int) -> bool:
        if spatial_dims not in get_task(task).dims:  # e.g. slices_to_volume is 3D only
            return False
        if task == "segmentation":
            return self.has_labels
        if task == "skull_stripping":
            return self.has_skull_masks
        return True


class FolderSource(SubjectSource):
    """A dataset folder of NIfTI pairs (layout in the module docstring); checked at construction.

    Args:
        cfg: the dataset entry of the config.
        grid: (D, H, W) model grid of the volumes.
        spacing: mm before fitting into the grid (None: keep the voxel size).
        cache: keep preprocessed subjects in memory.
    Raises:
        ConfigError naming the dataset when the folder, images/ or labels/ is missing, when no
        image has a label of the same name, or when a file is not a readable 3D NIfTI.
    """

    def __init__(self, cfg: DatasetConfig, grid: Sequence[int], spacing: float | None, cache: bool = True):
        self.name, self.grid, self.spacing, self.cache = cfg.name, tuple(grid), spacing, cache
        root = Path(cfg.path).expanduser()
        where = f"dataset {cfg.name!r}"
        if not root.is_dir():
            raise ConfigError(f"{where}: data folder {root} does not exist (data.datasets[].path)")
        img_dir, lab_dir = root / "images", root / "labels"
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise ConfigError(f"{where}: {root} has no {d.name}/ sub-folder; the layout is "
                                  f"{root}/images/*.nii.gz and {root}/labels/*.nii.gz with matching names")
        images, labels = _nifti_files(img_dir), _nifti_files(lab_dir)
        names = sorted(set(images) & set(labels))
        if cfg.max_subjects is not None:
            names = names[: cfg.max_subjects]
        if not names:
            ex_i = ", ".join(list(images)[:3]) or "none"
            ex_l = ", ".join(list(labels)[:3]) or "none"
            raise ConfigError(f"{where}: no usable image/label pairs in {root}: images/ has {len(images)} "
                              f"NIfTI files (e.g. {ex_i}), labels/ has {len(labels)} (e.g. {ex_l}); a pair "
                              "needs the same file name in both")
        if len(names) < 2:
            raise ConfigError(f"{where}: only one image/label pair in {root}; in-context training needs "
                              "at least 2 (a target and a context)")
        unpaired = sorted(set(images) - set(labels))
        if unpaired:
            log.warning("dataset %r: %d images without a label are ignored (e.g. %s)", cfg.name, len(unpaired),
                        ", ".join(unpaired[:3]))
        self.names = names
        self.images = {n: images[n] for n in names}
        self.labels = {n: labels[n] for n in names}
        masks = _nifti_files(root / "masks") if (root / "masks").is_dir() else {}
        targets = _nifti_files(root / "targets") if (root / "targets").is_dir() else {}
        self.masks = {n: masks[n] for n in names if n in masks} if len(masks) else {}
        self.targets = {n: targets[n] for n in names if n in targets} if len(targets) else {}
        self.has_skull_masks = len(self.masks) == len(names)
        self._check_headers(where)
        self._cache: dict[int, Any] = {}

    def _check_headers(self, where: str) -> None:
        import nibabel as nib

        for n in self.names:
            shapes = {}
            for kind, files in (("image", self.images), ("label", self.labels), ("mask", self.masks),
                                ("target", self.targets)):
                if n not in files:
                    continue
                try:
                    shp = tuple(nib.load(str(files[n])).shape)  # header only: cheap
                except Exception as exc:
                    raise ConfigError(f"{where}: cannot read {kind} {files[n]}: {type(exc).__name__}: {exc}") \
                        from None
                if len(shp) > 3 and all(s == 1 for s in shp[3:]):
                    shp = shp[:3]
                if len(shp) != 3:
                    raise ConfigError(f"{where}: {kind} {files[n]} has shape {shp}; expected a 3D volume")
                shapes[kind] = shp
            if len(set(shapes.values())) != 1:
                raise ConfigError(f"{where}: subject {n!r} has volumes of different shapes {shapes}; image, "
                                  "label, mask and target must share one grid")

    def _load(self, i: int):
        from vicl_fast.data import preprocess as pp
        from vicl_fast.data.io import load_nifti
        from vicl_fast.data.tasks3d import Subject

        n = self.names[i]
        img, mapping = pp.preprocess_image(load_nifti(self.images[n], "image"), spacing=self.spacing,
                                           grid=self.grid)
        lab, _ = pp.preprocess_label(load_nifti(self.labels[n], "label"), mapping=mapping)
        masks, mods = {}, {}
        if n in self.masks:
            m, _ = pp.preprocess_label(load_nifti(self.masks[n], "mask"), mapping=mapping)
            masks["brain"] = m > 0
        if n in self.targets:
            t, _ = pp.preprocess_image(load_nifti(self.targets[n], "target"), mapping=mapping)
            mods["target"] = t
        return Subject(n, img.astype(np.float32), masks=masks, label_maps={"label": lab.astype(np.int32)},
                       modalities=mods, has_skull=bool(masks), source=self.name)

    def subject(self, i: int):
        if i in self._cache:
            return self._cache[i]
        s = self._load(i)
        if self.cache:
            self._cache[i] = s
        return s


class DemoSource(SubjectSource):
    """The embedded demo MRI (``vicl_fast.data.demo_data.load_demo_subjects()``), resized to the grid."""

    def __init__(self, cfg: DatasetConfig, grid: Sequence[int]):
        self.name, self.grid = cfg.name, tuple(grid)
        try:
            from vicl_fast.data.demo_data import load_demo_subjects
        except ImportError as exc:
            raise ConfigError(f"dataset {cfg.name!r}: the embedded demo set is not available in this install "
                              f"(vicl_fast.data.demo_data: {exc})") from None
        g = self.grid
        size = g[0] if len(set(g)) == 1 and g[0] % 16 == 0 else None  # else resized below
        subs = list(load_demo_subjects(size=size, n_augmented=cfg.augmented, seed=0))
        if cfg.max_subjects is not None:
            subs = subs[: cfg.max_subjects]
        if len(subs) < 2:
            raise ConfigError(f"dataset {cfg.name!r}: the demo set has {len(subs)} subject(s); need >= 2")
        self._subjects = [self._fit(s) for s in subs]
        self.names = [s.name for s in self._subjects]
        self.has_labels = all(s.masks or s.label_maps for s in self._subjects)
        self.has_skull_masks = all(s.has_skull and "brain" in s.masks for s in self._subjects)

    def _fit(self, s):
        """``s`` on the model grid (only non-cubic grids need it: cubic ones come resampled from
        ``load_demo_subjects``): trilinear images clipped to [0, 1], labels by torch's legacy
        ``"nearest"`` rule (``rule="floor"``), with which these grids have always been built."""
        from vicl_fast.data.tasks3d import Subject

        g = self.grid

        def image(v: np.ndarray) -> np.ndarray:
            return resize_image(np.asarray(v, np.float32), g, clip=(0.0, 1.0))

        def label(v: np.ndarray) -> np.ndarray:
            return resize_label(np.asarray(v), g, rule="floor")

        return Subject(s.name, image(s.image),
                       masks={k: label(v).astype(bool) for k, v in s.masks.items()},
                       label_maps={k: label(v) for k, v in s.label_maps.items()},
                       modalities={k: image(v) for k, v in s.modalities.items()},
                       affine=s.affine, has_skull=s.has_skull, source=self.name)

    def subject(self, i: int):
        return self._subjects[i]


def build_sources(cfg: Config) -> list[SubjectSource]:
    """Open and check every dataset of the config (start-up errors name the dataset)."""
    grid = _volume_grid(cfg)
    out: list[SubjectSource] = []
    for ds in cfg.data.datasets:
        if ds.path == "demo":
            out.append(DemoSource(ds, grid))
        else:
            out.append(FolderSource(ds, grid, cfg.data.spacing, cfg.data.cache))
    return out


def _volume_grid(cfg: Config) -> tuple[int, int, int]:
    g = list(cfg.data.grid or [])
    if len(g) == 2:  # RandP: S^3 volumes (square grid, config.validate), sliced along any axis by tasks2d
        return (g[0], g[1], g[0])
    return tuple(g)  # type: ignore[return-value]


def resolve_tasks(cfg: Config, sources: Sequence[SubjectSource]) -> tuple[list[TaskConfig], dict[str, list[int]]]:
    """The tasks to train on and, per task, the datasets that can provide it.

    With ``data.tasks`` unset, the family's table is used and tasks that no dataset supports are
    dropped (logged); with it set, such a task stops the run naming it.
    """
    explicit = cfg.data.tasks is not None
    dims = cfg.spatial_dims
    if explicit:
        tasks = list(cfg.data.tasks)
    else:  # Table 3 (3D) or RandP's equal rates (2D): vicl_fast.data.task_registry
        tasks = [TaskConfig(n, r, w) for n, r, w in default_tasks(dims)]
    providers: dict[str, list[int]] = {}
    kept = []
    for t in tasks:
        idx = [i for i, (src, dc) in enumerate(zip(sources, cfg.data.datasets))
               if (dc.tasks is None or t.name in dc.tasks) and src.supports(t.name, dims)]
        if not idx:
            if explicit:
                raise ConfigError(f"task {t.name!r}: no dataset can provide it (segmentation needs labels/, "
                                  "skull_stripping needs masks/; per-dataset 'tasks' lists may exclude it)")
            log.info("task %s skipped: no dataset provides it", t.name)
            continue
        providers[t.name] = idx
        kept.append(t)
    if not kept:
        raise ConfigError("no task can be drawn from the configured datasets")
    return kept, providers


# ----------------------------------------------------------------- episodes
def context_size_for_step(cfg: Config, step: int) -> tuple[int, int | None]:
    """``(L, mini_context)`` of a training step: L ~ U{min..max} of the phase in force, drawn
    from ``(seed, step)`` so that every rank and every slot of the step agree."""
    phase = [p for p in cfg.data.context_phases if p.from_step <= step][-1]
    rng = np.random.default_rng([cfg.train.seed, _STREAM_L, step])
    L = int(rng.integers(phase.min, phase.max + 1))
    return L, phase.mini_context


#: Augmentation probabilities without the spatial transforms (``data.spatial_augment: false``: e.g. when
#: the subjects are already warped copies, whose per-episode warping would dominate the step time).
_NO_SPATIAL = {"affine": 0.0, "elastic": 0.0, "flip": 0.0, "rotate": 0.0}


class EpisodeDataset(torch.utils.data.Dataset):
    """Map-style dataset of in-context episodes indexed by ``(step, slot)`` (see module docstring).

    Item (Neuroverse3D): ``target_in (1, *S)``, ``target_out (1, *S)``, ``context_in (L, 1, *S)``,
    ``context_out (L, 1, *S)``, ``task`` (int index into ``tasks``), ``weight`` (float).
    Item (RandP, 2D): ``prompt_image``, ``prompt_label``, ``query_image``, ``query_label``, each
    ``(3, S, S)`` (the quadrants of the paper's 2x2 grid; :mod:`vicl_fast.data.tasks2d`), ``task``
    (id of the task-classification head), ``weight``. The query label is only a target: the
    model never sees it (RandP's training-inference aligned masking, Fig. 2 (d)).

    Args:
        split: "train" (augmented, train subjects) or "val" (no augmentation, target from the
            held-out subjects, contexts from the train subjects, fixed context size).
    """

    def __init__(self, cfg: Config, sources: Sequence[SubjectSource], tasks: Sequence[TaskConfig],
                 providers: dict[str, list[int]], split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.sources, self.tasks, self.providers, self.split = cfg, list(sources), list(tasks), providers, split
        self.family = cfg.family
        rates = np.array([t.rate for t in tasks], dtype=np.float64)
        self.rates = rates / rates.sum()
        self.train_idx, self.val_idx = [], []
        for src in self.sources:  # deterministic split: the last val_fraction of the sorted names
            n = len(src)
            n_val = int(round(cfg.data.val_fraction * n)) if n >= 3 else 0
            if cfg.data.val_fraction > 0 and n >= 3:
                n_val = max(1, n_val)
            self.train_idx.append(list(range(n - n_val)))
            self.val_idx.append(list(range(n - n_val, n)))

    def __len__(self) -> int:  # indices are (step, slot) tuples; the length is nominal
        return 2 ** 62

    def has_val(self) -> bool:
        return any(self.val_idx[i] for i in range(len(self.sources)))

    # ---------------------------------------------------------------------
    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        step, slot = int(index[0]), int(index[1])
        stream = _STREAM_TRAIN if self.split == "train" else _STREAM_VAL
        rng = np.random.default_rng([self.cfg.train.seed, stream, step, slot])
        if self.split == "train":
            L = context_size_for_step(self.cfg, step)[0]
        else:
            L = self.cfg.data.val_context_size if self.family == "neuroverse3d" else 1
        for _attempt in range(20):
            try:
                return self._episode(rng, L)
            except _Resample:
                continue
        raise RuntimeError("could not draw a valid episode in 20 attempts (e.g. no label class shared by "
                           "the drawn subjects); check the datasets' labels")

    def _pick(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(task index, source index, -) by the task rates, then a providing dataset uniformly."""
        val = self.split == "val"
        while True:
            ti = int(rng.choice(len(self.tasks), p=self.rates))
            cands = [s for s in self.providers[self.tasks[ti].name] if not val or self.val_idx[s]]
            if cands:
                return ti, cands[int(rng.integers(len(cands)))], 0
            if val and not any(self.val_idx[s] for p in self.providers.values() for s in p):
                raise RuntimeError("no held-out subjects for validation (data.val_fraction = 0 or datasets "
                                   "with fewer than 3 subjects)")

    def _episode(self, rng: np.random.Generator, L: int) -> dict[str, Any]:
        from vicl_fast.data import tasks3d

        ti, si, _ = self._pick(rng)
        task = self.tasks[ti]
        src = self.sources[si]
        pool = self.train_idx[si]
        if self.split == "train":
            k = L + 1
            idx = rng.choice(pool, size=k, replace=len(pool) < k).tolist()
        else:
            tgt = int(rng.choice(self.val_idx[si]))
            idx = [tgt] + rng.choice(pool, size=L, replace=len(pool) < L).tolist()
        subjects = [src.subject(int(i)) for i in idx]
        augment = self.split == "train" and self.cfg.data.augment
        if self.family == "randp":
            return self._randp_item(subjects, rng, augment, ti, task)
        kw: dict[str, Any] = {}
        if task.name == "segmentation":
            p = self.cfg.data.random_foreground_p if augment else 0.0
            kw["seg_probs"] = {"group": p} if augment else {"group": p, "sobel": 0.0, "invert": 0.0,
                                                              "dilate": 0.0, "erode": 0.0}
        if not augment:
            kw["overlay_p"] = 0.0
        try:
            spec = tasks3d.sample_task(subjects, rng, task.name, **kw)
        except ValueError as exc:  # e.g. no label class present in every drawn subject
            raise _Resample(str(exc)) from None
        probs = None if self.cfg.data.spatial_augment else _NO_SPATIAL
        pairs = [tasks3d.apply_task(spec, s, rng, augment=augment, aug_probs=probs) for s in subjects]
        if self.cfg.data.normalize:  # what vicl_fast.inference does to every input and context output
            from vicl_fast.data.preprocess import normalize_intensity

            seg = spec.is_segmentation
            pairs = [(normalize_intensity(a)[0], b if seg else normalize_intensity(b)[0]) for a, b in pairs]
        if self.cfg.data.crop and self.split == "train":  # one window for the whole episode
            focus = tasks3d.crop_focus(spec, subjects[0], rng)
            start = tasks3d.random_crop_start(subjects[0].image.shape, self.cfg.data.crop, rng, focus)
            win = tuple(slice(a, a + n) for a, n in zip(start, self.cfg.data.crop))
            pairs = [(a[win], b[win]) for a, b in pairs]
        ins = np.stack([a for a, _ in pairs])[:, None]
        outs = np.stack([b for _, b in pairs])[:, None]
        return {
            "target_in": torch.from_numpy(np.ascontiguousarray(ins[0])),
            "target_out": torch.from_numpy(np.ascontiguousarray(outs[0])),
            "context_in": torch.from_numpy(np.ascontiguousarray(ins[1:])),
            "context_out": torch.from_numpy(np.ascontiguousarray(outs[1:])),
            "task": ti, "weight": float(task.weight),
        }

    def _randp_item(self, subjects, rng: np.random.Generator, augment: bool, ti: int, task: TaskConfig
                    ) -> dict[str, Any]:
        """2D episode by the task synthesis of :mod:`vicl_fast.data.tasks2d` (RandP, Sec. 3).

        Query = ``subjects[0]``, prompt = ``subjects[1]`` (distinct subjects unless the pool is
        smaller). One :class:`~vicl_fast.data.tasks2d.TaskSpec2D` is shared by the pair (slice
        axis, structure, noise range, contrast), each side gets its own slice and noise draw
        (:func:`~vicl_fast.data.tasks2d.make_pair_2d`). Segmentation: a binary structure shared
        by both subjects, a mask or, from a label map, one class (with probability
        ``data.random_foreground_p`` a random group of up to 10 classes, supplement B.3),
        drawn as the paper's black/white colour label. With ``augment``, the subjects first get
        the 3D image augmentation of :func:`vicl_fast.data.augment.augment_subject` (structure and
        second modality warped jointly). The four images are (3, S, S), the quadrants of the
        paper's 2x2 grid (``tasks2d.make_grid``); ``task`` is the task id of the task head.
        """
        from vicl_fast.data import tasks2d

        size = int(self.cfg.data.grid[0])
        pair = list(subjects[:2])
        seg = task.name == "segmentation"
        pick = self._seg_structure(pair, rng, augment) if seg else None
        pair = [self._subject_2d(s, rng, augment, pick) for s in pair]
        try:
            spec = tasks2d.sample_task_2d(pair, rng, task.name, **({"mask": "_fg"} if seg else {}))
        except ValueError as exc:
            raise _Resample(str(exc)) from None
        qi, ql = tasks2d.make_pair_2d(spec, pair[0], rng, size)
        pi, pl = tasks2d.make_pair_2d(spec, pair[1], rng, size)

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

        return {"prompt_image": t(pi), "prompt_label": t(pl), "query_image": t(qi), "query_label": t(ql),
                "task": ti, "weight": float(task.weight)}

    def _seg_structure(self, subjects, rng: np.random.Generator, augment: bool) -> tuple[str, str, list[int]]:
        """``(kind, name, classes)`` of a structure present in every subject: ``("mask", name, [])`` or
        ``("map", name, classes)``; masks and label maps are equally likely when both exist."""
        masks = sorted(set.intersection(*[set(s.masks) for s in subjects]))
        maps = sorted(set.intersection(*[set(s.label_maps) for s in subjects]))
        if maps and (not masks or rng.random() < 0.5):
            name = maps[int(rng.integers(len(maps)))]
            present = sorted(set.intersection(*[set(np.unique(s.label_maps[name]).tolist())
                                                for s in subjects]) - {0})
            if not present:
                raise _Resample(f"label map {name!r}: no class present in every drawn subject")
            group = augment and rng.random() < self.cfg.data.random_foreground_p
            k = int(rng.integers(1, min(10, len(present)) + 1)) if group else 1
            return "map", name, sorted(int(c) for c in rng.choice(present, size=k, replace=False))
        if not masks:
            raise _Resample("no mask or label map is shared by the drawn subjects")
        return "mask", masks[int(rng.integers(len(masks)))], []

    @staticmethod
    def _subject_2d(s, rng: np.random.Generator, augment: bool, pick: tuple[str, str, list[int]] | None):
        """A light copy of subject ``s`` for tasks2d: the (augmented) image, its modalities, and for
        segmentation the structure ``pick`` as the only mask ``"_fg"``."""
        from vicl_fast.data.augment import augment_subject
        from vicl_fast.data.tasks3d import Subject

        labels = []
        if pick is not None:
            kind, name, classes = pick
            labels = [s.masks[name] if kind == "mask" else s.label_maps[name]]
        mods = sorted(s.modalities)
        img, extra = s.image, [s.modalities[k] for k in mods]
        if augment:
            img, labels, extra, _ = augment_subject(img, labels, rng, extra_images=extra)
        masks = {}
        if pick is not None:
            lab = np.asarray(labels[0])
            masks["_fg"] = lab.astype(bool) if pick[0] == "mask" else np.isin(lab, pick[2])
        return Subject(s.name, np.asarray(img, np.float32), masks=masks,
                       modalities={k: np.asarray(v, np.float32) for k, v in zip(mods, extra)},
                       affine=s.affine, has_skull=s.has_skull, source=s.source)


class _Resample(Exception):
    pass


# ---------------------------------------------------------------- loading
class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for each step in ``[start, stop)``, the batch ``[(step, rank*B + b) for b < B]``."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0):
        self.start, self.stop, self.B, self.rank = start, stop, batch_size, rank

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield [(step, self.rank * self.B + b) for b in range(self.B)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy/torch per worker from torch's per-worker base seed (deterministic given the
    DataLoader generator); episodes do not depend on it, third-party transforms might."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)
    torch.set_num_threads(1)  # workers x threads must not oversubscribe the cores


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif k == "task":
            out[k] = torch.tensor(vals, dtype=torch.long)
        elif k == "weight":
            out[k] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[k] = vals
    return out


def make_loader(dataset: EpisodeDataset, sampler: torch.utils.data.Sampler, num_workers: int, seed: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a batch sampler; workers seeded by :func:`seed_worker`."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        worker_init_fn=seed_worker if num_workers else None, generator=g, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
        multiprocessing_context=("fork" if num_workers and os.name == "posix" and not _cuda_initialised()
                                 else None),
    )


def _cuda_initialised() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()
