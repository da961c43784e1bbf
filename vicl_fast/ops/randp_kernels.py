"""RandP's two dense kernels: cosine cost matrix and reorder-gather (+ add).

RandP (seeds/000_*.txt, Appendix A) matches prompt tokens to query tokens with
an exact assignment on the cosine cost, then moves the prompt tokens to their
matched query positions and fuses them. The two dense steps around the solver
are here:

* :func:`cosine_cost` ``(B, P, D), (B, Q, D) -> (B, P, Q)`` float32:
  ``-(normalize(a) @ normalize(b)^T)``. The matching is a constant, so the
  result is detached (no gradient).
* :func:`gather_rows_add` ``(B, P, D), (B, Q), (B, Q, D) -> (B, Q, D)``:
  ``out[b, q] = src[b, index[b, q]] + add[b, q]``, differentiable in ``src``
  and ``add``; the gradient of ``src`` accumulates over repeated indices
  (greedy matching may repeat a prompt token).

Each op has a pure PyTorch reference (``*_reference``: the CPU path and the
test oracle) and dispatches (:mod:`vicl_fast.ops._dispatch`, backends ``cuda``
then ``reference``) to the compiled CUDA ops ``torch.ops.vicl_fast.
cosine_cost`` / ``gather_rows_add`` / ``scatter_rows_add`` (csrc/randp/
retrieve_cuda.cu) when the input is on CUDA and the extension has them.

Index checks: out-of-range indices raise ``ValueError``. On CPU the check is a
cheap min/max. On CUDA it needs a device-to-host copy (a synchronisation), so it
runs only when debug checks are on (:func:`set_index_checks` or the
environment variable ``VICL_FAST_CHECK_INDEX=1``); without it the CUDA kernel
writes NaN rows for out-of-range indices instead of reading out of bounds, and
so does the reference path on CUDA (it gathers a valid row in their place and
blanks it, rather than hit PyTorch's device-side assert of ``gather``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from vicl_fast.ops._dispatch import env_flag, select

__all__ = [
    "cosine_cost", "cosine_cost_reference",
    "gather_rows_add", "gather_rows_add_reference",
    "scatter_rows_add_reference", "set_index_checks", "clamp_row_index",
]

_CHECK_INDEX_ON_CUDA = env_flag("VICL_FAST_CHECK_INDEX")


def set_index_checks(enabled: bool) -> None:
    """Turn the (synchronising) out-of-range index check on CUDA inputs on or off."""
    global _CHECK_INDEX_ON_CUDA
    _CHECK_INDEX_ON_CUDA = bool(enabled)


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"vicl_fast::{name}", "")
        return True
    except RuntimeError:
        return False


def _use_cuda_kernel(op: str, t: torch.Tensor) -> bool:
    """Whether the dispatcher picks the compiled CUDA backend of ``op`` for ``t`` ("cosine_cost" or
    "gather_rows_add"; the latter's backward is the compiled ``scatter_rows_add``)."""
    return select(op, device=t.device).name == "cuda"


# ----------------------------------------------------------------------------- validation

def _check_float3d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B, N, D), got shape {tuple(t.shape)}; "
                         "add a batch dimension with .unsqueeze(0)")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_cosine_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_float3d("a", a)
    _check_float3d("b", b)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a (B, P, D) and b (B, Q, D) must agree in B and D, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")


def _check_gather_inputs(src: torch.Tensor, index: torch.Tensor,
                         add: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes/dtypes; returns ``index`` as int64."""
    _check_float3d("src", src)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"index must be an integer tensor (int64), got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != src.shape[0]:
        raise ValueError(f"index must be (B, Q) with B = src.shape[0] = {src.shape[0]}, "
                         f"got shape {tuple(index.shape)}")
    if index.device != src.device:
        raise ValueError(f"index must be on src's device {src.device}, got {index.device}")
    if add is not None:
        _check_float3d("add", add)
        want = (src.shape[0], index.shape[1], src.shape[2])
        if tuple(add.shape) != want:
            raise ValueError(f"add must be (B, Q, D) = {want}, got {tuple(add.shape)}")
        if add.device != src.device:
            raise ValueError(f"add must be on src's device {src.device}, got {add.device}")
    return index.long()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _check_index_range(index: torch.Tensor, num_rows: int) -> None:
    if index.numel() == 0:
        return
    if index.is_cuda and not _CHECK_INDEX_ON_CUDA:
        return
    if index.device.type == "meta" or _is_fake(index):
        return  # shape-only run (MAC counting, tracing): there are no values to check
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_rows:
        raise ValueError(f"index holds values in [{lo}, {hi}] but src has {num_rows} rows: every index "
                         f"must be in [0, {num_rows - 1}]")


# ----------------------------------------------------------------------------- cosine cost

def cosine_cost_reference(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``-(normalize(a) @ normalize(b)^T)`` in float32, detached.

    Args:
        a: (B, P, D) any floating dtype.
        b: (B, Q, D) same B and D.
        eps: norm floor, as in ``F.normalize`` (``x / max(||x||, eps)``).
    Returns:
        (B, P, Q) float32 cost (minimise it to maximise similarity).
    """
    _check_cosine_inputs(a, b)
    # float32 whatever the input dtype, even under autocast (the solver needs
    # the costs, not a half-precision approximation of them).
    # (Devices without autocast, e.g. "meta" used for shape-only MAC counting, need no guard.)
    dev = a.device.type
    no_autocast = (torch.autocast(device_type=dev, enabled=False) if torch.amp.is_autocast_available(dev)
                   else contextlib.nullcontext())
    with torch.no_grad(), no_autocast:
        an = F.normalize(a.detach().float(), dim=-1, eps=eps)
        bn = F.normalize(b.detach().float(), dim=-1, eps=eps)
        return torch.bmm(an, bn.transpose(1, 2)).neg_()


def cosine_cost(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine cost matrix (see :func:`cosine_cost_reference`); fused CUDA kernel on CUDA.

    Args:
        a: (B, P, D), b: (B, Q, D), float16/bfloat16/float32/float64.
    Returns:
        (B, P, Q) float32, detached.
    """
    _check_cosine_inputs(a, b)
    if _use_cuda_kernel("cosine_cost", a):
        return torch.ops.vicl_fast.cosine_cost(a.detach(), b.detach(), float(eps))
    return cosine_cost_reference(a, b, eps)


# ----------------------------------------------------------------------------- gather / scatter

def clamp_row_index(index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index with every value outside [0, num_rows) replaced by 0, mask of the valid ones)``.

    The no-sync way to gather with indices that may be -1 (a failed matching): gather the clamped
    index, then blank the rows where the mask is False; a plain gather would hit PyTorch's
    device-side assert on CUDA. index: (B, Q) integer -> ((B, Q) int64, (B, Q) bool).
    """
    index = index.long()
    valid = (index >= 0) & (index < num_rows)
    return torch.where(valid, index, 0), valid


def gather_rows_add_reference(src: torch.Tensor, index: torch.Tensor,
                              add: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, q] = src[b, index[b, q]] (+ add[b, q])``, plain PyTorch (autograd via gather).

    Args:
        src: (B, P, D) floating.
        index: (B, Q) integer, values in [0, P). On CUDA without the index
            check, an index outside [0, P) gives a NaN row (as the CUDA
            kernel), not a device-side assert.
        add: None or (B, Q, D).
    Returns:
        (B, Q, D) in the promoted dtype of ``src`` and ``add``.
    """
    index = _check_gather_inputs(src, index, add)
    _check_index_range(index, src.shape[1])
    if index.is_cuda:
        # Unchecked indices (no host sync): gather a valid row in their place and
        # blank it; `add` still flows (and gets its gradient), as in the kernel.
        idx, valid = clamp_row_index(index, src.shape[1])
        out = torch.gather(src, 1, idx[..., None].expand(-1, -1, src.shape[2]))
        out = torch.where(valid[..., None], out, float("nan"))
    else:
        out = torch.gather(src, 1, index[..., None].expand(-1, -1, src.shape[2]))
    return out if add is None else out + add


def scatter_rows_add_reference(grad: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Adjoint of the gather: ``out[b, p] = sum over q with index[b, q] == p of grad[b, q]``.

    Args:
        grad: (B, Q, D); index: (B, Q) int64 in [0, num_rows).
    Returns:
        (B, num_rows, D), dtype of ``grad``.
    """
    out = grad.new_zeros(grad.shape[0], num_rows, grad.shape[2])
    return out.scatter_add_(1, index.long()[..., None].expand_as(grad), grad)


def gather_rows_add(src: torch.Tensor, index: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """Reorder-gather with residual add (see :func:`gather_rows_add_reference`).

    Differentiable in ``src`` and ``add`` on every path. On CUDA with the
    compiled ops: one vectorised gather kernel forward, a deterministic
    (atomic-free) segmented scatter backward.
    """
    index = _check_gather_inputs(src, index, add)
    if not _use_cuda_kernel("gather_rows_add", src):
        return gather_rows_add_reference(src, index, add)
    _check_index_range(index, src.shape[1])
    dtype = src.dtype if add is None else torch.promote_types(src.dtype, add.dtype)
    return torch.ops.vicl_fast.gather_rows_add(
        src.to(dtype), index, None if add is None else add.to(dtype))


# ----------------------------------------------------------------------------- registrations

def _register() -> None:
    """Fake (meta) impls and autograd formulas of the compiled ops, when they exist."""
    if _op_exists("cosine_cost"):
        @torch.library.register_fake("vicl_fast::cosine_cost")
        def _cosine_cost_fake(a, b, eps):
            return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.float32)

    if _op_exists("gather_rows_add") and _op_exists("scatter_rows_add"):
        @torch.library.register_fake("vicl_fast::gather_rows_add")
        def _gather_fake(src, index, add):
            return src.new_empty((src.shape[0], index.shape[1], src.shape[2]))

        @torch.library.register_fake("vicl_fast::scatter_rows_add")
        def _scatter_fake(grad, index, P):
            return grad.new_empty((grad.shape[0], P, grad.shape[2]))

        def _gather_setup(ctx, inputs, output):
            src, index, add = inputs
            ctx.save_for_backward(index)
            ctx.num_rows = src.shape[1]
            ctx.has_add = add is not None

        def _gather_backward(ctx, grad):
            (index,) = ctx.saved_tensors
            grad = grad.contiguous()
            grad_src = torch.ops.vicl_fast.scatter_rows_add(grad, index, ctx.num_rows)
            return grad_src, None, (grad if ctx.has_add else None)

        torch.library.register_autograd("vicl_fast::gather_rows_add", _gather_backward,
                                        setup_context=_gather_setup)

        def _scatter_setup(ctx, inputs, output):
            _, index, _ = inputs
            ctx.save_for_backward(index)

        def _scatter_backward(ctx, grad):  # double backward: the adjoint of the adjoint
            (index,) = ctx.saved_tensors
            return torch.ops.vicl_fast.gather_rows_add(grad.contiguous(), index, None), None, None

        torch.library.register_autograd("vicl_fast::scatter_rows_add", _scatter_backward,
                                        setup_context=_scatter_setup)


_register()
