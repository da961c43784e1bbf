"""Medical image data: NIfTI I/O, the paper's preprocessing, task synthesis, metrics, demo MRI.

Modules (import the one you need; nothing heavy happens at import):

* :mod:`~vicl_fast.data.io` - validated NIfTI (optional DICOM series) reading, atomic writing, input errors.
* :mod:`~vicl_fast.data.preprocess` - canonical / 1 mm / fit-to-grid / percentile
  normalisation, and the exact inverse mapping back to the original grid.
* :mod:`~vicl_fast.data.tasks3d` - Neuroverse3D task families and episodes.
* :mod:`~vicl_fast.data.tasks2d` - RandP 2D tasks and the 2x2 grid.
* :mod:`~vicl_fast.data.augment` - seeded spatial / intensity / GIN augmentation.
* :mod:`~vicl_fast.data.metrics` - Dice, PSNR, SSIM (2D/3D), evaluation protocol, copy baseline.
* :mod:`~vicl_fast.data.demo_data` - the embedded demo heads (two real scans).
"""

from __future__ import annotations

from vicl_fast.data.demo_data import load_demo_subjects, write_demo_nifti
from vicl_fast.data.io import InputError, load_nifti, load_volume, save_nifti
from vicl_fast.data.preprocess import GridMapping, plan_grid, preprocess_image, preprocess_label, to_original
from vicl_fast.data.tasks3d import Episode, Subject, TaskSpec, apply_task, sample_episode, sample_task

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
