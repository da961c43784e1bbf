"""Losses of the Neuroverse3D paper (Sec. 3.2, Table 3) for raw-regression outputs.

- Segmentation: the modified smooth-L1 (Eq. 6), cubic below 1:
  ``l(d) = |d|^3 / 3`` if ``|d| < 1`` else ``|d| - 2/3`` (continuous with a
  continuous first derivative at |d| = 1), averaged over voxels.
- Generation (Eq. 7): ``smoothL1(y_hat, y) / 2 + smoothL1(grad y_hat, grad y) / 2``
  with the standard smooth-L1 (beta = 1) and ``grad`` the intensity
  difference of each voxel to its next neighbour along every spatial axis
  (forward differences; the smooth-L1 of the differences is averaged per axis,
  then over axes).
- Task weights (Table 3): segmentation 50 (the released training multiplies the
  segmentation loss by 50), 2D-to-3D generation 0.5, every other task 1. They are
  keyed by the task family names of :mod:`vicl_fast.data.tasks3d` (one set of names
  for task synthesis, the trainer config and the losses).

All losses take ``(B, C, *S)`` predictions and targets (any number of spatial
dims) and return a scalar (``reduction="mean"``) or per-sample values
(``reduction="none"``: shape (B,)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TASK_WEIGHTS", "modified_smooth_l1", "smooth_l1", "intensity_difference", "segmentation_loss",
           "generation_loss", "task_loss", "task_weight"]

#: Supplement Table 3 (training weight per task), keyed by the family names of
#: ``vicl_fast.data.tasks3d.TASK_TABLE`` (the paper's row name in the comment).
#: Kept literal so that importing the losses needs only torch; tests/test_losses.py
#: checks it against ``TASK_TABLE`` and the trainer's defaults.
TASK_WEIGHTS: dict[str, float] = {
    "segmentation": 50.0,  # Segmentation
    "bias_field": 1.0,  # Bias Remove
    "gaussian_noise": 1.0,  # Gaussian Noise Remove
    "salt_pepper": 1.0,  # Salt & Pepper Noise Remove
    "slices_to_volume": 0.5,  # 2D to 3D Generation
    "inpainting": 1.0,  # Inpainting
    "super_resolution": 1.0,  # Super-Resolution
    "skull_stripping": 1.0,  # Skull Stripping
    "modality_transform": 1.0,  # Modality Transform
}
_SEGMENTATION_TASKS = {"segmentation"}


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 3:
        raise ValueError(f"expected (B, C, *S) tensors with at least one spatial dim, got {tuple(pred.shape)}")


def _reduce(per_voxel: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_voxel.mean()
    if reduction == "none":
        return per_voxel.flatten(1).mean(1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def modified_smooth_l1(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 6: ``|d|^3/3`` for ``|d| < 1``, ``|d| - 2/3`` otherwise, d = pred - target.

    Its gradient ``sign(d) min(d^2, 1)`` is small for small errors, so the easy
    voxels of sparse structures do not dominate (the paper's motivation).
    """
    _check(pred, target)
    a = (pred - target).abs()
    per = torch.where(a < 1, a.pow(3) / 3, a - 2.0 / 3.0)
    return _reduce(per, reduction)


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Standard smooth-L1 (beta = 1): ``d^2/2`` for ``|d| < 1``, ``|d| - 1/2`` otherwise."""
    _check(pred, target)
    return _reduce(F.smooth_l1_loss(pred, target, reduction="none", beta=1.0), reduction)


def intensity_difference(x: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences ``x[i+1] - x[i]`` along every spatial axis of (B, C, *S)."""
    return [torch.diff(x, dim=d) for d in range(2, x.dim())]


def generation_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 7: ``smoothL1(pred, y) / 2 + smoothL1(diff pred, diff y) / 2`` (diff averaged over axes)."""
    _check(pred, target)
    base = smooth_l1(pred, target, reduction)
    grads = [smooth_l1(dp, dt, reduction) for dp, dt in zip(intensity_difference(pred), intensity_difference(target))]
    return base / 2 + torch.stack(grads).mean(0) / 2


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Segmentation loss of the paper (Eq. 6), without the task weight."""
    return modified_smooth_l1(pred, target, reduction)


def task_weight(task: str) -> float:
    """Training weight of ``task`` (Table 3); ValueError naming the known tasks otherwise."""
    if task not in TASK_WEIGHTS:
        raise ValueError(f"unknown task {task!r}; known (vicl_fast.data.tasks3d families): "
                         f"{', '.join(TASK_WEIGHTS)}")
    return TASK_WEIGHTS[task]


def task_loss(pred: torch.Tensor, target: torch.Tensor, task: str, *, weighted: bool = True,
              reduction: str = "mean") -> torch.Tensor:
    """``lambda_task * L_task(pred, target)``: Eq. 6 for segmentation, Eq. 7 otherwise."""
    w = task_weight(task) if weighted else 1.0
    if task in _SEGMENTATION_TASKS:
        return w * segmentation_loss(pred, target, reduction)
    return w * generation_loss(pred, target, reduction)
