"""Grow a trained Neuroverse3D to more channels per stage without changing what it computes.

Training a wider model from scratch costs hours on a CPU; widening keeps every learnt weight:

- each old channel keeps its index order inside its stage (and inside the two-stage concatenations
  of the fusions, ``[c, t]`` / ``[c_mean, t]``, and of the decoder's ``[upsampled, skip]``);
- the new channels' incoming weights keep the wider model's fresh initialisation;
- the weights from new channels into old ones are zero, so old channels, and hence the output,
  are exactly what they were (the model has no normalisation layers that would mix channels).

Training then moves the zero weights first (their gradient is not zero), and the new channels join.
The stage widths must keep the authors' rule (max pooling between stages of equal width, strided
convs otherwise) of the old model, so a stage that changes width must stay unequal to its
neighbours where it was, and equal where it was.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["old_entries", "widen_state_dict"]


def _segments(name: str, axis: int, size: int, out_size: int, old: Sequence[int]) -> list[tuple[str, int]]:
    """How one weight axis is made of stages: ``[("stage", k) | ("raw", n), ...]``, in concat order."""
    stage = {c: k for k, c in enumerate(old)}
    if axis == 1 and "combine_conv" in name:  # Target-to-Context / Context-to-Target fusion: 2 x C_k
        return [("stage", stage[out_size])] * 2
    if axis == 1 and "conv_layer" in name:  # decoder step: [upsampled C_{k+1}, skip C_k]
        k = stage[out_size]
        return [("stage", k + 1), ("stage", k)]
    if axis == 1 and "embedding" in name:  # image (+ label) channels
        return [("raw", size)]
    return [("stage", stage[size])] if size in stage else [("raw", size)]


def _index(segments: list[tuple[str, int]], old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Positions of the old entries along an axis of the wide weight."""
    idx, offset = [], 0
    for kind, v in segments:
        n_old, n_new = (v, v) if kind == "raw" else (old[v], new[v])
        idx.extend(range(offset, offset + n_old))
        offset += n_new
    return torch.tensor(idx, dtype=torch.long)


def _check(old: Sequence[int], new: Sequence[int], narrow_keys, wide_keys) -> None:
    if len(old) != len(new) or any(n < o for o, n in zip(old, new)):
        raise ValueError(f"cannot widen channels {old} to {new}: same number of stages, each at least as wide")
    if len(set(old)) != len(old):
        raise ValueError(f"channels {old}: widening needs a different width per stage (to tell weights apart)")
    same = [a == b for a, b in zip(old, old[1:])]
    if same != [a == b for a, b in zip(new, new[1:])]:
        raise ValueError(f"channels {old} -> {new} changes which stages are joined by pooling")
    if set(narrow_keys) != set(wide_keys):
        raise ValueError(f"the two models' keys differ: {sorted(set(narrow_keys) ^ set(wide_keys))[:4]}")


def _placement(name: str, old_shape: Sequence[int], old: Sequence[int], new: Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows (output channels) and, for weights, columns (input channels) of the old entries."""
    rows = _index(_segments(name, 0, old_shape[0], old_shape[0], old), old, new)
    if len(old_shape) == 1:
        return rows, None
    return rows, _index(_segments(name, 1, old_shape[1], old_shape[0], old), old, new)


def old_entries(narrow_shapes: dict[str, Sequence[int]], old_channels: Sequence[int], new_channels: Sequence[int],
                wide_shapes: dict[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Where the narrow model's weights sit in the wide one: ``name -> bool tensor`` of the wide shape.
    Shapes only (e.g. of a model built on the meta device); :func:`widen_state_dict` checks the arguments."""
    old, new = list(old_channels), list(new_channels)
    _check(old, new, narrow_shapes, wide_shapes)
    out = {}
    for name, shape in narrow_shapes.items():
        is_old = torch.zeros(tuple(wide_shapes[name]), dtype=torch.bool)
        rows, cols = _placement(name, shape, old, new)
        if cols is None:
            is_old[rows] = True
        else:
            is_old[rows.unsqueeze(1), cols.unsqueeze(0)] = True
        out[name] = is_old
    return out


def widen_state_dict(narrow: dict[str, torch.Tensor], old_channels: Sequence[int], new_channels: Sequence[int],
                     wide_init: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights of a Neuroverse3D with ``old_channels`` per stage, placed in one with ``new_channels``.

    Args:
        narrow: the trained model's state dict.
        old_channels, new_channels: channels per stage (same number of stages, each new >= old, and
            with the same stages of equal width, so that pooling and strided convs stay where they are).
        wide_init: a freshly initialised wide model's state dict (the new channels' incoming weights).
    Returns:
        ``(wide state dict, old)``: ``old[name]`` is True where an entry holds a weight of the narrow model
        (:func:`old_entries`).
    Raises:
        ValueError: stage lists that cannot be widened into each other, or a key missing.
    """
    was_old = old_entries({k: v.shape for k, v in narrow.items()}, old_channels, new_channels,
                          {k: v.shape for k, v in wide_init.items()})
    old, new = list(old_channels), list(new_channels)
    out = {}
    for name, w_old in narrow.items():
        w = wide_init[name].detach().clone().to(w_old.dtype)
        rows, _ = _placement(name, w_old.shape, old, new)
        w[rows] = 0  # into old channels: nothing from new ones; the old weights are placed next
        w[was_old[name]] = w_old.flatten()  # both in row-major order (the positions only increase)
        out[name] = w
    return out, was_old
