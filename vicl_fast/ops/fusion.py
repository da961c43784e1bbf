"""Neuroverse3D fusion block: ``GELU(x + conv1x1(x; W) + b + extra)``.

The Target-to-Context fusion of the paper, ``c = GELU(c + Conv1x1(concat[c, t]))``,
equals ``GELU(c + W_c c + b + W_t t)``: ``extra = W_t t`` is computed once per
stage and broadcast over the L contexts instead of being concatenated per
context. This module holds the reference (the CPU path and the test oracle);
the Triton kernel (vicl_fast/kernels/fusion_conv.py) is dispatched to on CUDA.

Dispatch of :func:`fusion_block` (:mod:`vicl_fast.ops._dispatch`, op
``fusion_block``; ``vicl-fast info --explain`` shows each backend's reasons),
first that fits:

1. ``triton``: the Triton kernel, for float32/float16/bfloat16 CUDA tensors (or
   CPU tensors with ``TRITON_INTERPRET=1``: triton's CPU interpreter, which is
   how the tests check the kernel) when triton imports, unless
   ``VICL_FAST_DISABLE_TRITON=1``;
2. ``onednn``: CPU float32 inference (no graph recorded, no autocast, not inside
   ``torch.compile``, 2 or 3 spatial dims, weight in x's dtype) when
   :func:`mkldnn_fusion_available`, unless ``VICL_FAST_DISABLE_MKLDNN=1``: one
   oneDNN 1x1 convolution with a fused ``add`` post-op writes
   ``W x + b + (x + extra)``, then one in-place GELU (3 memory passes instead
   of the reference's ~6 and no permuted einsum copies; channels-last inputs
   stay channels-last);
3. ``reference``: plain PyTorch.

triton is imported lazily (only when the first rule's other conditions hold),
so ``import vicl_fast`` and CPU runs never import it.

:func:`conv_gelu` and :func:`conv_add` are the same oneDNN post-op fusions for
the 3x3(x3) convolutions of the residual units (``GELU(conv(x))`` and
``conv(h) + x``), used by the model's CPU inference path.
Whether they apply is the dispatcher's op ``conv_fusion`` (:func:`use_mkldnn_fusion`);
``VICL_FAST_DISABLE_MKLDNN=1`` turns the oneDNN fusions off (plain
PyTorch ops instead; same results up to rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vicl_fast.ops._dispatch import select

__all__ = ["fusion_block", "fusion_block_reference", "conv1x1", "triton_fusion_available",
           "mkldnn_fusion_available", "use_mkldnn_fusion", "conv_mkldnn", "conv_gelu", "conv_add"]

_triton_import_error: str | None = None
_triton_checked = False
_mkldnn_status: tuple[bool, str] | None = None


def fusion_block_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           extra: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch fusion block.

    Args:
        x: (B, L, C, *S) features (S: 2 or 3 spatial dims).
        weight: (C, C) or (C, C, 1, ...) 1x1 conv weight applied to ``x``.
        bias: (C,) or None.
        extra: None or (B, 1|L, C, *S), added before the GELU (e.g. ``W_t t``).
    Returns:
        (B, L, C, *S)
    """
    w = weight.reshape(weight.shape[0], weight.shape[1])
    # einsum over the channel axis == 1x1 conv, for any number of spatial dims.
    y = torch.einsum("oc,blc...->blo...", w, x)
    if bias is not None:
        y = y + bias.view(1, 1, -1, *([1] * (x.dim() - 3)))
    y = x + y
    if extra is not None:
        y = y + extra
    return F.gelu(y)


def triton_fusion_available() -> tuple[bool, str]:
    """(True, "") if the Triton kernel module imports, else (False, reason). Cached."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import vicl_fast.kernels.fusion_conv  # noqa: F401  (imports triton)
        except Exception as e:  # ImportError, or a triton build that fails to initialise
            _triton_import_error = f"{type(e).__name__}: {e}"
        _triton_checked = True
    return _triton_import_error is None, _triton_import_error or ""


def _fusion_backend(x: torch.Tensor, weight_dtype: torch.dtype) -> str:
    """Name of the dispatcher's fusion_block backend for ``x``: "triton", "onednn" or "reference"."""
    return select("fusion_block", device=x.device, dtype=x.dtype, weight_dtype=weight_dtype,
                  spatial_dims=x.dim() - 3, grad_enabled=torch.is_grad_enabled(),
                  cpu_autocast=torch.is_autocast_enabled("cpu")).name


def _use_triton(x: torch.Tensor) -> bool:
    """Whether :func:`fusion_block` runs the Triton kernel for ``x`` (with a weight of x's dtype)."""
    return _fusion_backend(x, x.dtype) == "triton"


# ----------------------------------------------------------- oneDNN (CPU) post-op fusions
def _pointwise_ops():
    mk = torch.ops.mkldnn
    return mk._convolution_pointwise.default, mk._convolution_pointwise.binary


def _conv_args(weight: torch.Tensor, padding: int) -> tuple[list[int], list[int], list[int]]:
    nsp = weight.dim() - 2
    return [padding] * nsp, [1] * nsp, [1] * nsp


def mkldnn_fusion_available() -> tuple[bool, str]:
    """(True, "") if oneDNN's fused conv + GELU / conv + add ops work here, else (False, reason).

    Probed once on tiny tensors against plain PyTorch (an op missing from a
    build, or one that computes something else, turns the path off). Cached.
    """
    global _mkldnn_status
    if _mkldnn_status is None:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("torch was built without oneDNN (mkldnn)")
            unary, binary = _pointwise_ops()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, 3, 4, 5, generator=g)
            w = torch.randn(4, 4, 3, 3, 3, generator=g)
            w1 = torch.randn(4, 4, 1, 1, 1, generator=g)
            b = torch.randn(4, generator=g)
            other = torch.randn(2, 4, 3, 4, 5, generator=g)
            with torch.no_grad():
                y1 = unary(x, w, b, *_conv_args(w, 1), 1, "gelu", [], "none")
                y2 = binary(x, other, w1, b, *_conv_args(w1, 0), 1, "add", 1.0, None, [], None)
                r1 = F.gelu(F.conv3d(x, w, b, padding=1))
                r2 = F.conv3d(x, w1, b) + other
            err = max((y1 - r1).abs().max().item(), (y2 - r2).abs().max().item())
            if not err <= 1e-4:
                raise RuntimeError(f"oneDNN fused ops disagree with PyTorch (max err {err:.3g})")
            _mkldnn_status = (True, "")
        except Exception as e:  # missing op (old/other builds), unsupported CPU, wrong results
            _mkldnn_status = (False, f"{type(e).__name__}: {e}")
    return _mkldnn_status


def use_mkldnn_fusion(x: torch.Tensor) -> bool:
    """Whether the oneDNN post-op fusions apply to ``x``: CPU, float32, no graph, no autocast,
    not inside ``torch.compile`` (inductor fuses on its own, and these ops' fake kernels
    mispredict channels-last output strides), not ``VICL_FAST_DISABLE_MKLDNN=1``, and
    :func:`mkldnn_fusion_available` (the dispatcher's ``conv_fusion`` op picks ``onednn``)."""
    return select("conv_fusion", device=x.device, dtype=x.dtype, grad_enabled=torch.is_grad_enabled(),
                  cpu_autocast=torch.is_autocast_enabled("cpu")).name == "onednn"


def conv_mkldnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 0,
                stride: int = 1) -> torch.Tensor:
    """Plain convolution forced through oneDNN; CPU inference only.

    PyTorch sends 1x1 convs of a batch-1 input on one thread, and small 3x3 ones,
    to its own im2col kernel, which writes a contiguous output (measured 3.5x
    slower than oneDNN for a 1x1 32->32 conv at 64^3) and so breaks a
    channels-last chain. x: (N, C_in, *S) -> (N, C_out, *S / stride), x's memory format.
    """
    unary, _ = _pointwise_ops()
    pad, st, dil = _conv_args(weight, padding)
    return unary(_unit_batch_stride(x), weight, bias, pad, [stride] * len(st), dil, 1, "none", [], "")


def conv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """``GELU(conv(x))`` (stride 1, exact erf GELU) as one oneDNN call; CPU inference only.

    x: (N, C_in, *S), weight: (C_out, C_in, k, ...). Returns (N, C_out, *S) in x's memory format.
    """
    unary, _ = _pointwise_ops()
    return unary(_unit_batch_stride(x), weight, bias, *_conv_args(weight, padding), 1, "gelu", [], "none")


def conv_add(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             padding: int) -> torch.Tensor:
    """``conv(x) + other`` (stride 1) as one oneDNN call (``add`` post-op); CPU inference only.

    x: (N, C_in, *S), other: (N, C_out, *S) (same shape as the output). Returns a new tensor.
    """
    _, binary = _pointwise_ops()
    return binary(_unit_batch_stride(x), _unit_batch_stride(other), weight, bias,
                  *_conv_args(weight, padding), 1, "add", 1.0, None, [], None)


def _unit_batch_stride(t: torch.Tensor) -> torch.Tensor:
    """The same view with a canonical stride on a size-1 batch dim.

    Reshaping (1, 1, C, *S) channels-last to (1, C, *S) leaves the batch stride
    at C; PyTorch calls that channels-last but oneDNN's layout check does not,
    and silently writes a contiguous output (measured: the whole target decoder
    then ran without channels-last). A size-1 dim's stride never addresses memory.
    """
    if t.shape[0] == 1 and t.dim() > 1 and t.stride(0) != t.numel():
        return t.as_strided(t.shape, (t.numel(), *t.stride()[1:]), t.storage_offset())
    return t


def _fusion_block_mkldnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         extra: torch.Tensor | None) -> torch.Tensor:
    """oneDNN path of :func:`fusion_block`: ``GELU(conv1x1(x) + b + (x + extra))``, same shapes."""
    B, L, C = x.shape[:3]
    nsp = x.dim() - 3
    other = x
    if extra is not None:  # x + extra in x's layout (a plain x + extra may pick extra's layout, and a
        other = torch.empty_like(x)  # layout mismatch makes oneDNN fall back to an unfused conv + add)
        torch.add(x, extra, out=other)
    xf = x.reshape(B * L, C, *x.shape[3:])  # a view for contiguous and channels-last 6D views
    of = other.reshape(B * L, C, *x.shape[3:])
    w = weight.reshape(C, C, *([1] * nsp)).to(x.dtype)
    y = conv_add(xf, of, w, bias, 0)
    return torch.ops.aten.gelu_(y).unflatten(0, (B, L))


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  extra: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 4:
        raise ValueError(f"fusion_block: x must be a (B, L, C, *S) tensor with at least one spatial dim, "
                         f"got shape {tuple(getattr(x, 'shape', ()))}; add the L axis with x.unsqueeze(1)")
    if not x.is_floating_point():
        raise TypeError(f"fusion_block: x must be floating point, got {x.dtype}")
    C = x.shape[2]
    if weight.dim() < 2 or weight.shape[:2] != (C, C) or any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f"fusion_block: weight must be (C, C) or (C, C, 1, ...) with C={C} "
                         f"(x's channel axis 2), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"fusion_block: bias must be ({C},), got {tuple(bias.shape)}")
    if extra is not None:
        ok = extra.dim() == x.dim() and all(e == s or e == 1 for e, s in zip(extra.shape, x.shape))
        if not ok or extra.shape[2] != C:
            raise ValueError(f"fusion_block: extra must broadcast to x {tuple(x.shape)} "
                             f"(e.g. (B, 1, C, *S)), got {tuple(extra.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("extra", extra)):
        if t is not None and t.device != x.device:
            raise ValueError(f"fusion_block: {name} is on {t.device} but x is on {x.device}; "
                             f"move them to one device")


def fusion_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """``GELU(x + conv1x1(x; W) + b + extra)``, fused Triton kernel on CUDA, reference elsewhere.

    Args:
        x: (B, L, C, *S). Channels-last memory (C contiguous per voxel; e.g. a
            ``channels_last_3d`` (B*L, C, D, H, W) tensor viewed as 6D) is the
            fast layout for the Triton kernel; contiguous works without a copy too.
        weight: (C, C) or (C, C, 1, ...).
        bias: (C,) or None.
        extra: None or broadcastable to x, e.g. (B, 1, C, *S) (``W_t t`` shared by
            the L contexts: read with stride 0, never expanded in memory).
    Returns:
        (B, L, C, *S), same dtype (under autocast: the autocast dtype) and layout as x.

    Example:
        >>> x = torch.randn(1, 2, 8, 4, 4, 4)
        >>> fusion_block(x, torch.randn(8, 8), torch.zeros(8), torch.randn(1, 1, 8, 4, 4, 4)).shape
        torch.Size([1, 2, 8, 4, 4, 4])
    """
    _check_inputs(x, weight, bias, extra)
    backend = _fusion_backend(x, weight.dtype)
    if backend == "onednn":
        return _fusion_block_mkldnn(x, weight, bias, extra)
    if backend == "reference":
        return fusion_block_reference(x, weight, bias, extra)
    from vicl_fast.kernels.fusion_conv import FusionBlockFunction, fusion_block_forward

    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # Behave like the conv it replaces: compute in the autocast dtype. The
        # casts are differentiable, so gradients come back in the callers' dtypes.
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        extra = extra.to(dt) if extra is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, extra))
    if not needs_grad:  # inference (no_grad / inference_mode): no autograd node, nothing saved
        return fusion_block_forward(x, weight, bias, extra)
    return FusionBlockFunction.apply(x, weight, bias, extra)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution of (B, C_in, *S) -> (B, C_out, *S) for 1, 2 or 3 spatial dims.

    Uses ``F.conv{1,2,3}d`` (cuDNN on GPU, honours channels-last and autocast).

    Args:
        x: (B, C_in, *S).
        weight: (C_out, C_in) or (C_out, C_in, 1, ...).
        bias: (C_out,) or None.
    """
    nsp = x.dim() - 2
    if nsp not in (1, 2, 3):
        raise ValueError(f"conv1x1: x must be (B, C, *S) with 1-3 spatial dims, got shape {tuple(x.shape)}")
    if weight.dim() < 2 or weight.shape[1] != x.shape[1] or any(k != 1 for k in weight.shape[2:]):
        raise ValueError(f"conv1x1: weight must be (C_out, {x.shape[1]}) or (C_out, {x.shape[1]}, 1, ...), "
                         f"got {tuple(weight.shape)}")
    w = weight.reshape(weight.shape[0], weight.shape[1], *([1] * nsp))
    conv = (F.conv1d, F.conv2d, F.conv3d)[nsp - 1]
    return conv(x, w, bias)
