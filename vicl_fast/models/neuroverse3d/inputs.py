"""Argument checks of Neuroverse3D: the constructor's stage widths and the forward's tensors."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

__all__ = ["parse_stage_channels", "validate_inputs"]


def parse_stage_channels(channels: int | Sequence[int], stages: int | None = None) -> tuple[int, ...]:
    """Stage widths from any form the authors' constructor accepts (their ``parse_channels``).

    An int is every stage's width (``stages`` required). A sequence is the
    widths themselves; with ``stages`` given, a one-element sequence is repeated
    ``stages`` times (as the authors do) and a longer one must have ``stages``
    entries. (Without ``stages``, ``[c]`` is one stage, as in their Lightning
    module, which passes ``stages=len(nb_inner_channels)``.)
    """
    if isinstance(channels, numbers.Integral):
        if stages is None:
            raise ValueError(f"a single width channels={channels} needs stages= (the number of stages), "
                             f"as in the authors' constructor")
        channels = [channels]
    channels = [int(c) for c in channels]
    if stages is not None:
        stages = int(stages)
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if len(channels) == 1:
            channels = channels * stages
        elif len(channels) != stages:
            raise ValueError(f"channels {tuple(channels)} give {len(channels)} stages, but stages={stages}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels needs >= 1 positive stage widths, got {tuple(channels)}")
    return tuple(channels)


def _all_finite(x: torch.Tensor, per_context: bool) -> bool:
    """Whether x has no NaN/Inf; (B, L, ...) inputs checked one context at a time.

    ``torch.isfinite(x).all()`` makes ~5 bytes of temporaries per element: for
    a whole context set (L=64 at 128^3: ~0.7 GB) that grows with L and was the
    peak of CPU inference in the 24^3 memory test. One context at a time keeps
    it O(1) in L; the flags are combined on x's device, so a GPU syncs once.
    """
    if not per_context or x.dim() < 2 or x.shape[1] <= 1:
        return bool(torch.isfinite(x).all())
    flags = torch.stack([torch.isfinite(x[:, i]).all() for i in range(x.shape[1])])
    return bool(flags.all())


def validate_inputs(target_in: torch.Tensor, context_in: torch.Tensor, context_out: torch.Tensor, *,
                    in_channels: int, out_channels: int, spatial_dims: int, multiple: int,
                    check_finite: bool) -> None:
    """Raise ValueError/TypeError naming the problem and its fix.

    Expected: target_in (B, C_in, *S), context_in (B, L, C_in, *S) floating point,
    context_out (B, L, C_out, *S), L >= 1, len(S) == spatial_dims, every size in S
    a multiple of ``multiple``; with ``check_finite`` no NaN/Inf.
    """
    sd = spatial_dims
    for name, x, nd in (("target_in", target_in, 2 + sd), ("context_in", context_in, 3 + sd),
                        ("context_out", context_out, 3 + sd)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != nd:
            want = "(B, C, " if name == "target_in" else "(B, L, C, "
            want += "D, H, W)" if sd == 3 else "H, W)"
            raise ValueError(f"{name} must have {nd} dims {want} for spatial_dims={sd}, "
                             f"got shape {tuple(x.shape)}")
        if not (x.is_floating_point() or name == "context_out"):
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if target_in.shape[1] != in_channels:
        raise ValueError(f"target_in has {target_in.shape[1]} channels, the model expects "
                         f"in_channels={in_channels}")
    if context_in.shape[2] != in_channels:
        raise ValueError(f"context_in has {context_in.shape[2]} channels (dim 2), the model expects "
                         f"in_channels={in_channels}")
    if context_out.shape[2] != out_channels:
        raise ValueError(f"context_out has {context_out.shape[2]} channels (dim 2), the model expects "
                         f"out_channels={out_channels}")
    if context_in.shape[1] == 0:
        raise ValueError("zero contexts: context_in has L=0; pass at least one (image, label) pair")
    if context_in.shape[:2] != context_out.shape[:2] or context_in.shape[3:] != context_out.shape[3:]:
        raise ValueError(f"context images and labels differ in shape: context_in "
                         f"{tuple(context_in.shape)} vs context_out {tuple(context_out.shape)} "
                         f"(need the same B, L and spatial size)")
    if context_in.shape[0] != target_in.shape[0]:
        raise ValueError(f"batch sizes differ: target_in B={target_in.shape[0]}, "
                         f"context_in B={context_in.shape[0]}")
    if tuple(context_in.shape[3:]) != tuple(target_in.shape[2:]):
        raise ValueError(f"spatial sizes differ: target_in {tuple(target_in.shape[2:])} vs contexts "
                         f"{tuple(context_in.shape[3:])}; resample them to one grid")
    bad = [s for s in target_in.shape[2:] if s % multiple]
    if bad:
        fix = tuple(int(math.ceil(s / multiple) * multiple) for s in target_in.shape[2:])
        raise ValueError(f"spatial size {tuple(target_in.shape[2:])} is not divisible by "
                         f"2^(stages-1) = {multiple}; pad or resize to e.g. {fix}")
    if check_finite:
        named = (("target_in", target_in), ("context_in", context_in), ("context_out", context_out))
        for name, x in named:
            if x.is_floating_point() and not _all_finite(x, per_context=name != "target_in"):
                raise ValueError(f"{name} contains NaN or Inf values; clean the input (or set "
                                 f"model.check_finite = False to skip this check)")
