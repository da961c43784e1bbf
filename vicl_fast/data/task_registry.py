"""The task registry: every in-context task of both model families, defined once.

One :class:`TaskDef` per task holds what used to be spread over task synthesis, the losses, the
training config and the trainer: its name, the dimensionalities it exists in, whether it is a
segmentation or a generation task, the loss and validation metrics of each family, and the
Neuroverse3D supplement's Table 3 sampling rate and loss weight.

Names: ONE name per task for 2D and 3D, the Neuroverse3D family names (``gaussian_noise``,
``modality_transform``, ...). RandP's former 2D names ``denoising`` and ``synthesis`` are
deprecated aliases: :func:`get_task` and :func:`canonical_names` accept them with a
:class:`DeprecatedTaskNameWarning` (a ``FutureWarning``, shown by default), so existing configs
still load.

Readers: :mod:`vicl_fast.data.tasks3d` (the 3D families, rates, overlays),
:mod:`vicl_fast.data.tasks2d` (the 2D families and their order = RandP's task-head ids),
:mod:`vicl_fast.losses` (weights and losses), :mod:`vicl_fast.training.config` and
:mod:`vicl_fast.training.datasets` (defaults, name checks), :mod:`vicl_fast.training.trainer`
(kinds, metrics) and :mod:`vicl_fast.main_job`. The synthesis of a task is the family of that
name in ``tasks3d`` (``3 in dims``) and in ``tasks2d`` (``2 in dims``).

Pure Python on purpose (no numpy / torch): the config and the losses import it at no cost.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Literal, Mapping, Sequence

__all__ = [
    "TaskDef",
    "TASKS",
    "ALIASES",
    "DeprecatedTaskNameWarning",
    "get_task",
    "canonical_name",
    "canonical_names",
    "task_names",
    "default_tasks",
    "overlay_tasks",
    "family_dims",
]

Kind = Literal["seg", "gen"]


class DeprecatedTaskNameWarning(FutureWarning):
    """A task was named by a deprecated alias (e.g. RandP's ``denoising`` for ``gaussian_noise``)."""


@dataclass(frozen=True)
class TaskDef:
    """One in-context task.

    Attributes:
        name: canonical name, the family key of ``tasks3d`` / ``tasks2d``.
        kind: ``"seg"`` (binary mask output) or ``"gen"`` (image output).
        dims: spatial dimensionalities the task exists in (``{3}``: Neuroverse3D only,
            ``{2, 3}``: also a RandP 2D task).
        table3_row: the row of the Neuroverse3D supplement's Table 3.
        rate: Table 3 sampling rate (3D training).
        weight: Table 3 loss weight (3D training; the official code's "50 x" for segmentation).
        loss_3d: Neuroverse3D loss, a key of :data:`vicl_fast.losses.LOSSES`: ``"modified_smooth_l1"``
            (Eq. 6, segmentation) or ``"generation"`` (Eq. 7).
        metrics_3d: Neuroverse3D validation metrics (Dice or PSNR).
        rate_2d, weight_2d: RandP's sampling rate and loss weight (equal for every task: the paper
            gives none); meaningful only when ``2 in dims``.
        loss_2d: RandP loss (smooth-L1 for every task, plus the family's task-classification CE).
        metrics_2d: RandP validation metrics (Dice, or PSNR and SSIM).
        overlay: also overlaid on the input of other generation tasks with p = 0.05 (Neuroverse3D
            B.3, random task overlap).
        aliases: deprecated names accepted with a warning.
        summary: ``input -> output``.
    """

    name: str
    kind: Kind
    dims: frozenset[int]
    table3_row: str
    rate: float
    weight: float
    loss_3d: str
    metrics_3d: tuple[str, ...]
    rate_2d: float = 1.0
    weight_2d: float = 1.0
    loss_2d: str = "smooth_l1"
    metrics_2d: tuple[str, ...] = ()
    overlay: bool = False
    aliases: tuple[str, ...] = ()
    summary: str = ""

    def loss(self, dims: int) -> str:
        """Loss key for a ``dims``-D model (:data:`vicl_fast.losses.LOSSES`)."""
        return self.loss_3d if self._check_dims(dims) == 3 else self.loss_2d

    def metrics(self, dims: int) -> tuple[str, ...]:
        """Validation metrics of a ``dims``-D model (names of :mod:`vicl_fast.data.metrics`)."""
        return self.metrics_3d if self._check_dims(dims) == 3 else self.metrics_2d

    def rate_for(self, dims: int) -> float:
        return self.rate if self._check_dims(dims) == 3 else self.rate_2d

    def weight_for(self, dims: int) -> float:
        return self.weight if self._check_dims(dims) == 3 else self.weight_2d

    def _check_dims(self, dims: int) -> int:
        if dims not in self.dims:
            have = " and ".join(f"{d}D" for d in sorted(self.dims))
            raise ValueError(f"task {self.name!r} exists in {have} only, not in {dims}D")
        return dims


def _seg(name: str, row: str, rate: float, weight: float, dims: Iterable[int], summary: str) -> TaskDef:
    return TaskDef(name, "seg", frozenset(dims), row, rate, weight, "modified_smooth_l1", ("dice",),
                   metrics_2d=("dice",), summary=summary)


def _gen(name: str, row: str, rate: float, weight: float, dims: Iterable[int], summary: str, *,
         overlay: bool = False, aliases: tuple[str, ...] = ()) -> TaskDef:
    return TaskDef(name, "gen", frozenset(dims), row, rate, weight, "generation", ("psnr",),
                   metrics_2d=("psnr", "ssim"), overlay=overlay, aliases=aliases, summary=summary)


# Table 3 of the Neuroverse3D supplement, in its row order (also the order of tasks3d's rate draw
# and of the overlays). The 2D tasks in this order are RandP's four tasks in its task-head order.
_DEFS: tuple[TaskDef, ...] = (
    _seg("segmentation", "Segmentation", 2.0, 50.0, (2, 3),
         "image -> binary mask of a structure or a group of label classes"),
    _gen("bias_field", "Bias Remove", 1.0, 1.0, (3,),
         "image x smooth Legendre bias field -> image", overlay=True),
    _gen("gaussian_noise", "Gaussian Noise Remove", 1.0, 1.0, (2, 3),
         "image + Gaussian noise (3D sigma U(0.15, 0.25), 2D U(0.05, 0.15)) -> image",
         overlay=True, aliases=("denoising",)),
    _gen("salt_pepper", "Salt & Pepper Noise Remove", 1.0, 1.0, (3,),
         "image with salt and pepper (p = 0.04 each) -> image", overlay=True),
    _gen("slices_to_volume", "2D to 3D Generation", 1.0, 0.5, (3,),
         "the three central orthogonal slices -> volume"),
    _gen("inpainting", "Inpainting", 1.0, 1.0, (3,),
         "image with a Perlin-noise region set to 0 -> image", overlay=True),
    _gen("super_resolution", "Super-Resolution", 1.0, 1.0, (2, 3),
         "x2 block average, linear back to the grid -> image", overlay=True),
    _gen("skull_stripping", "Skull Stripping", 1.0, 1.0, (3,),
         "head image -> image inside the brain mask"),
    _gen("modality_transform", "Modality Transform", 1.0, 1.0, (2, 3),
         "modality A -> registered modality B (or a fixed random-convolution contrast of A)",
         aliases=("synthesis",)),
)

#: Every task by canonical name, in Table 3 order (read-only).
TASKS: Mapping[str, TaskDef] = MappingProxyType({t.name: t for t in _DEFS})
#: Deprecated name -> canonical name (read-only).
ALIASES: Mapping[str, str] = MappingProxyType({a: t.name for t in _DEFS for a in t.aliases})

_FAMILY_DIMS = {"neuroverse3d": 3, "randp": 2}


def family_dims(family: str) -> int:
    """Spatial dims of a model family: ``"neuroverse3d"`` -> 3, ``"randp"`` (every 2D model) -> 2."""
    try:
        return _FAMILY_DIMS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(_FAMILY_DIMS)}") from None


def _alias_message(pairs: Sequence[tuple[str, str]], where: str) -> str:
    names = ", ".join(f"{old!r} -> {new!r}" for old, new in pairs)
    at = f"{where}: " if where else ""
    return (f"{at}deprecated task name(s) {names}: 2D and 3D now share one name per task "
            "(vicl_fast.data.task_registry); the old names will stop working in a later release")


def _warn(pairs: Sequence[tuple[str, str]], where: str) -> None:
    # stacklevel 3: the line that called the public function, not this module
    warnings.warn(_alias_message(pairs, where), DeprecatedTaskNameWarning, stacklevel=3)


def canonical_name(name: str, *, warn: bool = True, where: str = "") -> str:
    """The canonical name of ``name`` (itself, or the target of a deprecated alias, with a warning).

    Unknown names are returned unchanged: :func:`get_task` is the check that raises.
    """
    new = ALIASES.get(name, name)
    if warn and new != name:
        _warn([(name, new)], where)
    return new


def canonical_names(names: Iterable[str], *, where: str = "") -> list[str]:
    """:func:`canonical_name` of each name, with ONE warning listing every alias found."""
    names = list(names)
    out = [canonical_name(n, warn=False) for n in names]
    pairs = sorted({(a, b) for a, b in zip(names, out) if a != b})
    if pairs:
        _warn(pairs, where)
    return out


def get_task(name: str, *, warn: bool = True) -> TaskDef:
    """The :class:`TaskDef` of ``name`` (a deprecated alias warns); ValueError listing the names."""
    canon = canonical_name(name, warn=False)
    if warn and canon != name:
        _warn([(name, canon)], "")
    t = TASKS.get(canon)
    if t is None:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return t


def task_names(dims: int) -> tuple[str, ...]:
    """Canonical names of the ``dims``-D tasks in registry order (for 2D: RandP's task-head ids)."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    return tuple(t.name for t in _DEFS if dims in t.dims)


def default_tasks(dims: int, names: Iterable[str] | None = None) -> tuple[tuple[str, float, float], ...]:
    """``(name, rate, weight)`` rows a ``dims``-D model trains on by default: Neuroverse3D's Table 3
    (``dims=3``) or RandP's equal rates and weights (``dims=2``); ``names`` selects rows (in the
    order given)."""
    chosen = task_names(dims) if names is None else tuple(get_task(n).name for n in names)
    return tuple((n, TASKS[n].rate_for(dims), TASKS[n].weight_for(dims)) for n in chosen)


def overlay_tasks() -> tuple[str, ...]:
    """The corruptions overlaid on generation inputs (Neuroverse3D B.3), in registry order."""
    return tuple(t.name for t in _DEFS if t.overlay)
