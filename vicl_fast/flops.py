"""Multiply-accumulate (MAC) counter over a model's forward (and optionally backward).

Convention. The RandP paper's "FLOPs" (Table 2) are MACs: ViT-L/16 on a
1024-token canvas is 360.8 G there, which is the number of multiply-adds of
its matmuls. This module therefore reports **MACs** and **FLOPs = 2 x MACs**
side by side, and counts only the operations that carry multiply-adds:

- matmuls (``mm``, ``addmm``, ``bmm``, ``baddbmm``; ``einsum`` / ``matmul`` /
  ``linear`` reach these after dispatch),
- convolutions of every kind (grouped and depthwise included: the count is
  ``C_out * (C_in / groups) * prod(kernel) * prod(out_spatial)`` per sample;
  transposed convolutions counted on the input grid),
- scaled dot-product attention: ``2 * B * heads * L_q * L_k * d`` MACs (QK^T
  and PV), whichever backend runs it.

Not counted (as in fvcore-style MAC tables): biases, normalisation,
activations, softmax, element-wise adds, pooling, interpolation, gathers and
the Hungarian matching (integer work, not multiply-adds). Causal masks are
ignored (full L_q x L_k is counted).

What PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode` misses
and this module adds: the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` dispatches to on CPU
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: PyTorch
counts 0 for it) and the "overrideable" fused SDPA entry point used by
out-of-tree backends. Depthwise/grouped convolutions and transposed
convolutions are counted correctly by PyTorch (checked in tests/test_flops.py).

Conventions of the RandP paper's Table 2 (see ``benchmarks/RESULTS.md``,
"RandP Table 2"). Its Painter/MVG figure, 429 G, is exactly the MACs of the
*matrix products* (linear layers + attention) of ONE ViT-L/16 stream on the
1024-token canvas (360.8 G) plus Painter's head Linear over the whole canvas
(68.7 G): convolutions (patch embedding, the head's 3x3 conv) and the second
stream of blocks 0-2 are left out. Its RandP figure, 258 G, matches *two
times* the same matrix-product MACs of RandP ViT-L (2 x 128.9 G = 257.8 G),
i.e. FLOPs, not MACs. :func:`macs_by_kind` splits a report into matrix
products and convolutions so both figures can be reproduced from one count;
:attr:`MacReport.macs` itself always counts everything listed above.

Shape-only counting. :func:`count_macs_meta` builds a model on the ``meta``
device (no memory, no arithmetic; ViT-L counts in about a second on one CPU
core) and counts a forward on meta inputs; models whose constructor needs real
values (MONAI's SwinUNETR) are built on the CPU and moved to ``meta``.

Example::

    >>> import torch, torch.nn as nn
    >>> from vicl_fast.flops import count_macs
    >>> rep = count_macs(nn.Linear(8, 4), torch.randn(2, 8))
    >>> rep.macs, rep.flops
    (64, 128)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils import flop_counter as _fc

__all__ = ["MacReport", "count_macs", "count_macs_meta", "macs_by_kind", "meta_model", "extra_flop_formulas",
           "format_count"]


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Same formula PyTorch uses for its CUDA SDPA kernels (2 FLOPs per MAC).
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for aten ops that ``FlopCounterMode`` leaves at zero.

    Returns a mapping ``op overload packet -> formula(shapes...) -> FLOPs``,
    only for ops that exist in the running torch (so torch 2.11 and 2.13 both
    work) and that the built-in registry does not already cover.
    """
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    candidates = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_cpu_backward_flops,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_forward_flops,
    }
    for name, fn in candidates.items():
        if not hasattr(aten, name):
            continue
        op = getattr(aten, name)
        if op in _fc.flop_registry:
            continue  # a later torch counts it already; never count twice
        formulas[op] = fn
    return formulas


@dataclass
class MacReport:
    """Result of :func:`count_macs`.

    Attributes:
        macs: total multiply-accumulates of the counted call(s).
        by_op: MACs per aten op (e.g. ``{"aten.addmm": ..., "aten.convolution": ...}``).
        by_module: MACs per module path, inclusive of children (``""`` is the
            whole model; ``"blocks.0.attn"`` etc.), or ``None`` when no
            breakdown was asked for.
    """

    macs: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] | None = None

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs (one multiply + one add per MAC)."""
        return 2 * self.macs

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def table(self, max_depth: int | None = None, min_share: float = 0.0) -> str:
        """A text table of the per-module breakdown (``max_depth`` levels below the root)."""
        if self.by_module is None:
            return f"total: {format_count(self.macs)} MACs ({format_count(self.flops)} FLOPs)"
        rows = []
        for name, m in self.by_module.items():
            depth = 0 if name == "" else name.count(".") + 1
            if max_depth is not None and depth > max_depth:
                continue
            if self.macs and m / self.macs < min_share:
                continue
            rows.append(f"{'  ' * depth}{name or '<model>'}: {format_count(m)} MACs")
        return "\n".join(rows)


def format_count(n: float) -> str:
    """``360777252864 -> '360.78 G'``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _module_breakdown(raw: Mapping[str, Mapping[Any, int]], model: nn.Module) -> dict[str, int]:
    """Turn FlopCounterMode's ``{"Global"|"Cls"|"Cls.a.b": {op: flops}}`` into ``{"a.b": macs}``.

    FlopCounterMode names the root module by its class name; strip it so keys
    match ``model.named_modules()``.
    """
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, ops in raw.items():
        if key == "Global":
            continue
        if key == root:
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1:]
        else:  # a module reached outside the root (e.g. passed as a callable): keep its name
            name = key
        out[name] = out.get(name, 0) + sum(ops.values()) // 2
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "", kv[0])))


def count_macs(
    model: nn.Module | Callable[..., Any],
    *inputs: Any,
    kwargs: Mapping[str, Any] | None = None,
    backward: bool = False,
    by_module: bool = False,
    fake: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> MacReport:
    """Count the MACs of ``model(*inputs, **kwargs)``.

    Args:
        model: an ``nn.Module`` (or any callable; the per-module breakdown
            needs a module).
        *inputs: positional inputs, e.g. ``(prompt_image (B,C,H,W), prompt_label, query_image)``.
            MACs scale with B: divide by B for a per-image figure.
        kwargs: keyword inputs.
        backward: also count the backward of ``output.float().sum()`` (training
            cost; the forward is run with gradients enabled).
        by_module: fill ``MacReport.by_module`` (MACs per submodule, inclusive).
        fake: run under ``FakeTensorMode`` (shapes only, no arithmetic): counting
            ViT-L takes milliseconds instead of seconds. Parameters stay real
            (``allow_non_fake_inputs``); inputs are converted. Models whose
            forward needs actual values (e.g. a CPU solver reading the
            similarity matrix) must be counted with ``fake=False``.
        autocast_dtype: count under ``torch.autocast(device_type of the inputs,
            dtype)``; MACs do not depend on dtype, this only checks the forward
            runs in that mode.

    Returns:
        :class:`MacReport` with ``macs``, ``flops`` (= 2 x macs), ``by_op``
        and optionally ``by_module``.
    """
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    if by_module and not isinstance(model, nn.Module):
        raise TypeError("by_module=True needs an nn.Module (its submodule names label the breakdown)")
    kwargs = dict(kwargs or {})
    counter = _fc.FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())

    device_type = "cpu"
    for t in list(inputs) + list(kwargs.values()):
        if isinstance(t, torch.Tensor):
            device_type = t.device.type
            break

    stack = contextlib.ExitStack()
    with stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            inputs = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs)
            kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            stack.enter_context(mode)
        stack.enter_context(torch.enable_grad() if backward else torch.no_grad())
        if autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type=device_type, dtype=autocast_dtype))
        with counter:
            out = model(*inputs, **kwargs)
            if backward:
                loss = _sum_outputs(out)
                loss.backward()
    raw = counter.get_flop_counts()
    total = counter.get_total_flops() // 2
    by_op = {str(op): f // 2 for op, f in raw.get("Global", {}).items()}
    report = MacReport(macs=int(total), by_op=by_op)
    if by_module:
        report.by_module = _module_breakdown(raw, model)  # type: ignore[arg-type]
    return report


def _sum_outputs(out: Any) -> torch.Tensor:
    """Scalar to backpropagate from a forward's output (tensor, tuple/list or dict of tensors)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, Sequence):
        parts = [o.float().sum() for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
        if parts:
            return torch.stack(parts).sum()
    raise TypeError("backward=True needs the forward to return a tensor (or tensors) that requires grad")


# ----------------------------------------------------------------------------- kinds, shape-only counting

_CONV_OPS = ("aten.convolution", "aten.convolution_backward", "aten._convolution", "aten.conv")


def macs_by_kind(report: MacReport) -> dict[str, int]:
    """Split a report's MACs into ``{"matmul": ..., "conv": ...}``.

    ``matmul`` = every matrix product (``mm``/``addmm``/``bmm``/``baddbmm``:
    linear layers, explicit attention, cosine similarities) plus the fused
    attention kernels (SDPA); ``conv`` = every convolution (patch embeddings,
    conv heads, U-Net layers) and its backward. ``matmul + conv == report.macs``.
    ``matmul`` is the convention of the RandP paper's Painter figure (see the
    module docstring).
    """
    conv = sum(m for op, m in report.by_op.items() if op.startswith(_CONV_OPS))
    return {"matmul": report.macs - conv, "conv": conv}


def meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the ``meta`` device (parameters without storage).

    Constructors that need real values (e.g. MONAI's SwinUNETR calls
    ``.item()`` at init) are run on the CPU and the module is moved to ``meta``.
    """
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError):
        return build().to("meta")


def count_macs_meta(
    build: Callable[[], nn.Module] | nn.Module,
    *input_shapes: Sequence[int],
    dtype: torch.dtype = torch.float32,
    kwargs: Mapping[str, Any] | None = None,
    backward: bool = False,
    by_module: bool = False,
) -> MacReport:
    """Count MACs shape-only: model and inputs on the ``meta`` device, no arithmetic.

    Args:
        build: a zero-argument model factory (e.g. ``lambda: create_model("randp_vit_l")``),
            built through :func:`meta_model`; or a module already on ``meta``
            (``model.to("meta")``).
        *input_shapes: one shape per positional input, e.g. three ``(B, 3, 256, 256)``.
        dtype: dtype of the meta inputs.
        kwargs, backward, by_module: as in :func:`count_macs`.
    Returns:
        :class:`MacReport` (equal to a real count: tests/test_flops.py checks it).

    On meta, ``scaled_dot_product_attention`` runs its math decomposition
    (``bmm``): the forward MACs equal the fused kernels', the backward counts
    4 attention products where flash kernels recompute QK^T (5).

    Models whose forward reads tensor values on the host (``.item()``,
    ``.tolist()``) cannot run on meta; RandP's matching and index checks skip
    themselves on meta tensors.
    """
    if isinstance(build, nn.Module):
        model = build
        dev = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("meta"))
        if dev.type != "meta":
            raise ValueError(f"count_macs_meta needs a model on the meta device, got one on {dev}; "
                             "pass a factory (lambda: create_model(name)) or model.to('meta')")
    elif callable(build):
        model = meta_model(build)
    else:
        raise TypeError(f"build must be a model factory or an nn.Module on meta, got {type(build).__name__}")
    for s in input_shapes:
        if not (isinstance(s, (tuple, list, torch.Size)) and all(isinstance(d, int) and d >= 0 for d in s)):
            raise TypeError(f"each input shape must be a tuple of non-negative ints, got {s!r}")
    inputs = tuple(torch.empty(tuple(s), dtype=dtype, device="meta") for s in input_shapes)
    return count_macs(model, *inputs, kwargs=kwargs, backward=backward, by_module=by_module)
