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
  segmentation loss by 50), 2D-to-3D generation 0.5, every other task 1. Weights,
  names and which loss a task uses are read from :mod:`vicl_fast.data.task_registry`
  (one set of names for task synthesis, the trainer config and the losses).

All losses take ``(B, C, *S)`` predictions and targets (any number of spatial
dims) and return a scalar (``reduction="mean"``) or per-sample values
(``reduction="none"``: shape (B,)).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vicl_fast.data.task_registry import get_task

__all__ = ["LOSSES", "modified_smooth_l1", "smooth_l1", "intensity_difference", "segmentation_loss",
           "soft_dice_loss", "generation_loss", "task_loss", "task_weight"]


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


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1)`` per sample, ``p = clamp(pred, 0, 1)``.

    The +1 (one voxel) makes an empty target with an empty prediction a perfect score. Not in the
    paper: a training option (``data.tasks[].dice_weight``) added to Eq. 6, whose gradient ``d^2``
    fades as a voxel nears its target, so that a small model trained briefly stays at soft outputs
    near 0.5 on borders and small structures (on the demo's colin27 its Dice then moved by up to 0.4
    between nearby training steps, as outputs crossed 0.5). The Dice term pushes whole structures
    towards confident outputs whatever their size.
    """
    _check(pred, target)
    p, y = pred.clamp(0, 1).flatten(1), target.flatten(1)
    per = 1 - (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)
    return per.mean() if reduction == "mean" else _reduce(per[:, None], reduction)


#: Loss by the key a task names in ``vicl_fast.data.task_registry`` (``TaskDef.loss(dims)``); each
#: takes ``(pred, target, reduction)``.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "modified_smooth_l1": segmentation_loss,  # Eq. 6 (Neuroverse3D segmentation)
    "generation": generation_loss,  # Eq. 7 (Neuroverse3D generation)
    "smooth_l1": smooth_l1,  # RandP, every task
}


def task_weight(task: str) -> float:
    """Training weight of the 3D ``task`` (Table 3, ``task_registry``); ValueError naming the known
    tasks otherwise."""
    return get_task(task).weight


def task_loss(pred: torch.Tensor, target: torch.Tensor, task: str, *, weighted: bool = True,
              reduction: str = "mean") -> torch.Tensor:
    """``lambda_task * L_task(pred, target)`` of Neuroverse3D: Eq. 6 for segmentation, Eq. 7 otherwise."""
    t = get_task(task)
    w = t.weight if weighted else 1.0
    return w * LOSSES[t.loss(3)](pred, target, reduction)
