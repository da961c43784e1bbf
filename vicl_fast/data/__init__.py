"""Medical image data: NIfTI I/O, the paper's preprocessing, task synthesis, metrics, demo MRI.

Modules (import the one you need; nothing heavy happens at import):

* :mod:`~vicl_fast.data.io` - validated NIfTI (optional DICOM series) reading, atomic writing, input errors.
* :mod:`~vicl_fast.data.preprocess` - canonical / 1 mm / fit-to-grid / percentile
  normalisation, and the exact inverse mapping back to the original grid.
* :mod:`~vicl_fast.data.resample` - every resampling: shape-to-shape resize (2D/3D) and affine maps.
* :mod:`~vicl_fast.data.task_registry` - every task once: name, 2D/3D, kind, loss, metrics, Table 3.
* :mod:`~vicl_fast.data.tasks3d` - Neuroverse3D task families and episodes.
* :mod:`~vicl_fast.data.tasks2d` - RandP 2D tasks and the 2x2 grid.
* :mod:`~vicl_fast.data.augment` - seeded spatial / intensity / GIN augmentation.
* :mod:`~vicl_fast.data.metrics` - Dice, PSNR, SSIM (2D/3D), evaluation protocol, copy baseline.
* :mod:`~vicl_fast.data.demo_data` - the embedded demo heads (two real scans).

The names below are imported on first use (PEP 562), so that light modules such as
``task_registry`` (read by the training config and the losses) do not pull in nibabel and SciPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vicl_fast.data.demo_data import load_demo_subjects, write_demo_nifti
    from vicl_fast.data.io import load_nifti, load_volume, save_nifti
    from vicl_fast.errors import InputError
    from vicl_fast.data.preprocess import (GridMapping, plan_grid, preprocess_image, preprocess_label,
                                           to_original)
    from vicl_fast.data.tasks3d import Episode, Subject, TaskSpec, apply_task, sample_episode, sample_task

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("load_demo_subjects", "write_demo_nifti"), "vicl_fast.data.demo_data"),
    **dict.fromkeys(("load_nifti", "load_volume", "save_nifti"), "vicl_fast.data.io"),
    "InputError": "vicl_fast.errors",
    **dict.fromkeys(("GridMapping", "plan_grid", "preprocess_image", "preprocess_label", "to_original"),
                    "vicl_fast.data.preprocess"),
    **dict.fromkeys(("Episode", "Subject", "TaskSpec", "apply_task", "sample_episode", "sample_task"),
                    "vicl_fast.data.tasks3d"),
}
_SUBMODULES = ("augment", "demo_data", "io", "metrics", "preprocess", "resample", "task_registry", "tasks2d",
               "tasks3d")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:  # ``vicl_fast.data.tasks3d`` as an attribute, as when __init__ imported it
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


__all__ = [
    "load_demo_subjects",
    "write_demo_nifti",
    "InputError",
    "load_nifti",
    "load_volume",
    "save_nifti",
    "GridMapping",
    "plan_grid",
    "preprocess_image",
    "preprocess_label",
    "to_original",
    "Episode",
    "Subject",
    "TaskSpec",
    "apply_task",
    "sample_episode",
    "sample_task",
]
