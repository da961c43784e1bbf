"""Adaptive Parallel-Sequential Processing (APSP) for Neuroverse3D.

The context set of L (image, label) pairs is cut into n = ceil(L / l) contiguous
mini-contexts of size l (the last may be smaller). Each mini-context runs
through the context U-Net in parallel; its per-stage features are summed over
its contexts into running sums, and the means (sum / L, i.e. the running mean
weighted by mini-context size of the paper's Algorithm 1) feed the target
decoder. The result does not depend on l or on the order (up to rounding).

Inference: contexts may live on the CPU; each mini-context is copied to the
model's device when needed (CUDA: through pinned staging buffers on a side
stream, one mini-context ahead, so the copy overlaps the compute).

Training, when a graph is recorded (``mode``):

- ``"exact"``: forward every mini-context without a graph and keep only the
  running sums; the backward pass recomputes each mini-context with a graph and
  back-propagates its share ``g / L`` of the means' gradient into the
  parameters and into the target features (the target encoder feeds every
  mini-context through the Target-to-Context fusion). Exact full-context
  gradient; peak memory of one mini-context; costs one more context forward.
- ``"scaled"`` (the paper): mini-contexts in random order, the first n-1 without
  a graph, the last keeps its graph and its gradient is scaled by n (unbiased:
  the average over which mini-context is last is the full gradient).
- ``"full"``: every mini-context keeps its graph (memory grows with L).

The model must provide ``encode_target``, ``target_context``, ``encode_contexts``
(called with ``tctx=``, once per mini-context) and ``decode`` (see
:class:`vicl_fast.models.neuroverse3d.Neuroverse3D`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

__all__ = [
    "apsp_forward", "context_means", "mini_context_chunks", "chunk_order", "auto_mini_context",
    "free_memory_bytes", "estimate_memory", "ContextStream", "MemoryPlan", "plan_inference_memory",
]

_MODES = ("exact", "scaled", "full")


# --------------------------------------------------------------------- chunks
def mini_context_chunks(L: int, l: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges of size ``l`` covering ``range(L)`` (last one shorter)."""
    if L < 1:
        raise ValueError("zero contexts: L must be >= 1")
    if isinstance(l, bool) or not isinstance(l, int) or l < 1:
        raise ValueError(f"mini-context size l must be a positive int, None or 'auto', got {l!r}")
    return [(a, min(a + l, L)) for a in range(0, L, l)]


def chunk_order(n: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                order: Sequence[int] | None = None) -> list[int]:
    """Processing order of the n mini-contexts: ``order`` if given, a random one if ``shuffle``,
    else 0..n-1."""
    if order is not None:
        order = [int(i) for i in order]
        if sorted(order) != list(range(n)):
            raise ValueError(f"order must be a permutation of range({n}), got {order}")
        return order
    if shuffle:
        return torch.randperm(n, generator=generator).tolist()
    return list(range(n))


def resolve_mini_context(model, l: int | str | None, target: torch.Tensor, context_in: torch.Tensor,
                         *, training: bool = False) -> int:
    """Mini-context size from ``l``: None -> L, ``"auto"`` -> :func:`auto_mini_context`, int -> min(l, L)."""
    L = context_in.shape[1]
    if l is None:
        return L
    if isinstance(l, str):
        if l != "auto":
            raise ValueError(f"l must be an int, None or 'auto', got {l!r}")
        return auto_mini_context(model, target, context_in, training=training)
    if isinstance(l, bool) or not isinstance(l, int) or l < 1:
        raise ValueError(f"mini-context size l must be a positive int, None or 'auto', got {l!r}")
    return min(l, L)


# --------------------------------------------------------------- free memory
def free_memory_bytes(device: torch.device) -> int:
    """Memory available for new tensors on ``device``.

    CUDA: free device memory (``cudaMemGetInfo``) plus what PyTorch's caching
    allocator holds but does not use. CPU: ``MemAvailable`` of /proc/meminfo
    (what the kernel can give without swapping), else physical pages free;
    capped by the room left under a cgroup memory limit (containers).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
            free = 8 << 30
    cg = _cgroup_free_bytes()
    return free if cg is None else min(free, cg)


def _cgroup_free_bytes() -> int | None:
    """Room left under this process's cgroup memory limit (containers), or None when unlimited."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                raw = f.read().strip()
            with open(usage_f) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None
        return max(0, int(raw) - usage)
    return None


def _largest_fit(budget: float, fixed: int, per: int, contexts: int) -> int:
    """Largest l in [0, contexts] with ``fixed + l * per <= budget``."""
    return int(max(0, min(contexts, (budget - fixed) // max(per, 1))))


def _elem_bytes(model, target: torch.Tensor) -> int:
    dev = target.device.type
    if torch.is_autocast_enabled(dev):
        return torch.finfo(torch.get_autocast_dtype(dev)).bits // 8
    p = next(model.parameters())
    return max(p.element_size(), 2)


def estimate_memory(model, spatial: Sequence[int], batch: int = 1, *, training: bool = False,
                    elem_bytes: int = 4) -> tuple[int, int]:
    """Estimated bytes ``(fixed, per_context)`` of one step beyond the model itself
    (heuristic, for ``l="auto"``; the parameters are already allocated when it is used).

    With ``sigma`` = sum over stages of C_k x voxels_k and ``top`` = C_0 x voxels_0
    (per sample): inference keeps per context its encoder skips and returned
    features (~sigma) plus ~2-3 full-resolution working buffers; fixed: target
    features, ``W_t t``, running sums and decoder buffers (~4 sigma). Measured
    on the CPU (fast path, fp32, 64^3, default model): 129 MB per context and
    130 MB fixed, vs 161 MB and 179 MB estimated here. Training with a graph
    keeps ~16 sigma per context (every conv, GELU and fusion input), ~24 sigma
    fixed plus one copy of the parameters for their gradients.
    """
    C = model.channels
    V = [math.prod(s // 2 ** k for s in spatial) for k in range(len(C))]
    sigma = sum(c * v for c, v in zip(C, V)) * batch
    top = C[0] * V[0] * batch
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if training:
        per = 16 * sigma * elem_bytes
        fixed = 24 * sigma * elem_bytes + params
    else:
        per = (sigma + 3 * top) * elem_bytes
        fixed = 4 * sigma * elem_bytes
    return int(fixed), int(per)


def auto_mini_context(model, target: torch.Tensor, context_in: torch.Tensor, *, training: bool = False,
                      safety: float = 0.8) -> int:
    """Largest l in [1, L] whose :func:`estimate_memory` fits ``safety`` x the free memory.

    Device: the model's (CUDA: free device memory; CPU: MemAvailable). Always
    returns at least 1 (the smallest possible working set).
    """
    device = next(model.parameters()).device
    fixed, per = estimate_memory(model, tuple(target.shape[2:]), target.shape[0], training=training,
                                 elem_bytes=_elem_bytes(model, target))
    return max(1, _largest_fit(safety * free_memory_bytes(device), fixed, per, context_in.shape[1]))


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_inference_memory` decided: the mini-context size and the numbers behind it."""

    l: int  #: mini-context size to run with
    need_bytes: int  #: estimated bytes of the run with ``l``
    min_bytes: int  #: estimated bytes with ``l = 1`` (the smallest working set)
    free_bytes: int  #: memory available on the device
    max_fit: int  #: largest l whose estimate fits ``free_bytes`` (0: not even 1)
    device: str

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.free_bytes


def plan_inference_memory(model, spatial: Sequence[int], contexts: int, *, batch: int = 1,
                          l: int | str | None = "auto", device: torch.device | str | None = None,
                          extra_bytes: int = 0, safety: float = 0.8) -> MemoryPlan:
    """Mini-context size and memory estimate of one inference pass, before running it.

    Bytes from :func:`estimate_memory` (the model's channels, the grid ``spatial``, ``batch``
    samples, the parameters' dtype) plus, per context, its image and label copied to the device,
    plus ``extra_bytes`` (what the caller will still allocate, e.g. its host buffers on the CPU).
    Available memory: :func:`free_memory_bytes`.

    ``l="auto"``: the largest l in [1, contexts] whose estimate fits ``safety`` x the available
    memory (at least 1); an int: ``min(l, contexts)``; None: all contexts at once. Whether the
    chosen l fits (``plan.fits``) compares the estimate with the whole available memory.
    """
    p0 = next(model.parameters())
    dev = torch.device(device) if device is not None else p0.device
    elem = max(p0.element_size(), 2)
    fixed, per = estimate_memory(model, tuple(spatial), batch, training=False, elem_bytes=elem)
    voxels = math.prod(int(s) for s in spatial)
    per += batch * (getattr(model, "in_channels", 1) + getattr(model, "out_channels", 1)) * voxels * elem
    fixed += int(extra_bytes)
    free = int(free_memory_bytes(dev))
    L = int(contexts)
    if l is None:
        size = L
    elif isinstance(l, str):
        if l != "auto":
            raise ValueError(f"l must be an int, None or 'auto', got {l!r}")
        size = max(1, _largest_fit(safety * free, fixed, per, L))
    else:
        size = max(1, min(int(l), L))
    max_fit = _largest_fit(free, fixed, per, L)
    return MemoryPlan(l=size, need_bytes=int(fixed + size * per), min_bytes=int(fixed + per),
                      free_bytes=free, max_fit=max_fit, device=str(dev))


# ------------------------------------------------------------------ streaming
class ContextStream:
    """Yields the mini-contexts ``(context_in[:, a:b], context_out[:, a:b])`` on ``device``.

    Same device (or CPU): plain slices. CPU -> CUDA: each mini-context is
    copied into one of two reusable pinned staging buffers (skipped when the
    source is already pinned and the slice contiguous), then to the device
    with ``non_blocking`` on a side stream, one mini-context ahead; the
    compute stream waits on an event before using it, so the copy of
    mini-context i+1 overlaps the compute of mini-context i.
    """

    def __init__(self, context_in: torch.Tensor, context_out: torch.Tensor,
                 chunks: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype | None = None):
        self.ci, self.co, self.chunks = context_in, context_out, list(chunks)
        self.device, self.dtype = torch.device(device), dtype
        self.overlap = (self.device.type == "cuda" and context_in.device.type == "cpu"
                        and torch.cuda.is_available())

    def _plain(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ci, co = self.ci[:, a:b], self.co[:, a:b]
        return ci.to(self.device, self.dtype), co.to(self.device, self.dtype)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if not self.overlap:
            for a, b in self.chunks:
                ci, co = self._plain(a, b)
                yield ci, co, b - a
            return
        yield from self._iter_cuda()

    def _iter_cuda(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        staging: list[list[torch.Tensor] | None] = [None, None]
        slot_event: list[torch.cuda.Event | None] = [None, None]

        def stage(i: int):
            a, b = self.chunks[i]
            srcs = [self.ci[:, a:b], self.co[:, a:b]]
            slot = i % 2
            if not all(s.is_pinned() and s.is_contiguous() for s in srcs):
                if slot_event[slot] is not None:
                    slot_event[slot].synchronize()  # the copy that last read this buffer is done
                buf = staging[slot]
                if buf is None or any(x.shape != s.shape or x.dtype != s.dtype for x, s in zip(buf, srcs)):
                    buf = [torch.empty(s.shape, dtype=s.dtype, pin_memory=True) for s in srcs]
                    staging[slot] = buf
                for x, s in zip(buf, srcs):
                    x.copy_(s)
                srcs = buf
            with torch.cuda.stream(side):
                dev = [s.to(self.device, non_blocking=True) for s in srcs]
                if self.dtype is not None:
                    dev = [d.to(self.dtype) for d in dev]
                ev = torch.cuda.Event()
                ev.record(side)
            slot_event[slot] = ev
            return dev, ev, b - a

        pending = stage(0) if self.chunks else None
        for i in range(len(self.chunks)):
            dev, ev, size = pending
            if i + 1 < len(self.chunks):
                pending = stage(i + 1)
            main.wait_event(ev)
            for d in dev:
                d.record_stream(main)  # allocated on the side stream, used on the main one
            yield dev[0], dev[1], size


# --------------------------------------------------------------- the loops
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sum_contexts(f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of (B, L', C, *S) over L' into ``out`` (in place) or a new (B, C, *S) accumulator.

    Context by context with in-place adds rather than ``f.sum(1)``: keeps f's
    memory layout (a reduction over dim 1 of a channels-last 6D view returns a
    contiguous tensor, ~2x slower on the CPU, and the layout mismatch then costs
    conversions downstream) and needs no temporary of the sum's size.
    Accumulates in float32 (float64 for float64 features).
    """
    start = 0
    if out is None:
        out = f[:, 0].to(_acc_dtype(f), copy=True)
        start = 1
    for i in range(start, f.shape[1]):
        out.add_(f[:, i])
    return out


def _accumulate(model, stream: Iterator, tctx: Sequence[torch.Tensor], fast: bool,
                sums: list[torch.Tensor] | None = None) -> list[torch.Tensor] | None:
    """Sum the context features of every mini-context of ``stream`` into ``sums`` (B, C_k, *S_k)."""
    for ci, co, _ in stream:
        feats = model.encode_contexts(ci, co, tctx=tctx, fast=fast)
        if sums is None:
            sums = [_sum_contexts(f) for f in feats]
        else:
            for i in range(len(sums)):  # no loop variable left holding the finest feature
                _sum_contexts(feats[i], sums[i])
        del feats  # before the next mini-context's features exist (memory of one mini-context)
    return sums


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``n`` (the paper's scaled APSP)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: float) -> torch.Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.n, None


class _ExactContextMeans(torch.autograd.Function):
    """Means of the context features over all L contexts, exact gradient, one mini-context of memory.

    forward(runner, n_tctx, *tctx, *params) -> n means (B, C_k, *S_k): no graph kept.
    backward: recompute each mini-context with a graph and back-propagate ``g / L``.
    """

    @staticmethod
    def forward(ctx, runner: "_Runner", n_tctx: int, *inputs: torch.Tensor):
        tctx = inputs[:n_tctx]
        dev = runner.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        with torch.no_grad():
            sums = _accumulate(runner.model, runner.stream(), tctx, runner.fast)
        ctx.runner, ctx.n_tctx = runner, n_tctx
        ctx.save_for_backward(*tctx)
        return tuple(s.div_(runner.L) for s in sums)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        runner: _Runner = ctx.runner
        tctx = ctx.saved_tensors
        params = runner.params
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tctx]
        wrt = [x for x in (*leaves, *params) if x.requires_grad]
        acc: list[torch.Tensor | None] = [None] * len(wrt)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(runner.device.type, dtype=dtype, enabled=enabled):
            for ci, co, _ in runner.stream():
                feats = runner.model.encode_contexts(ci, co, tctx=leaves, fast=runner.fast)
                # d mean / d feature of one context = 1 / L, broadcast over its L' contexts
                gouts = [(g / runner.L).to(f.dtype).unsqueeze(1).expand_as(f) for g, f in zip(grads, feats)]
                got = torch.autograd.grad(feats, wrt, gouts, allow_unused=True)
                for i in range(len(got)):
                    if got[i] is not None:
                        acc[i] = got[i] if acc[i] is None else acc[i].add_(got[i])
                del feats, got, gouts  # nothing of this mini-context survives into the next one
        it = iter(acc)
        out = [next(it) if x.requires_grad else None for x in (*leaves, *params)]
        return (None, None, *out)


class _Runner:
    """Everything the exact-mode autograd function needs to replay the mini-context loop."""

    def __init__(self, model, context_in, context_out, chunks, fast, device, L):
        self.model, self.ci, self.co, self.chunks = model, context_in, context_out, chunks
        self.fast, self.device, self.L = fast, device, L
        self.params = [p for p in model.context_unet.parameters()]
        self.dtype = self.params[0].dtype

    def stream(self) -> ContextStream:
        return ContextStream(self.ci, self.co, self.chunks, self.device, self.dtype)


def context_means(model, tctx: Sequence[torch.Tensor], context_in: torch.Tensor, context_out: torch.Tensor,
                  l: int, *, fast: bool = True, mode: str = "exact", grad: bool | None = None,
                  shuffle: bool | None = None, generator: torch.Generator | None = None,
                  order: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Mean context features over all L contexts, processed l at a time.

    Args:
        tctx: :meth:`target_context` output (carries the graph to the target encoder).
        context_in, context_out: (B, L, C, *S), any device.
        l: mini-context size (int >= 1).
        mode: "exact" | "scaled" | "full", used only when ``grad``.
        grad: record a graph (default: ``torch.is_grad_enabled()``).
        shuffle: random mini-context order (default: True in "scaled" mode, else False).
        order: explicit processing order of the mini-contexts (overrides shuffle).
    Returns:
        n tensors (B, C_k, *S_k), coarse to fine, float32 (float64 for a float64 model).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    L = context_in.shape[1]
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    chunks = mini_context_chunks(L, l)
    n = len(chunks)
    if grad is None:
        grad = torch.is_grad_enabled()
    if shuffle is None:  # the paper's scaled mode needs a random last mini-context to be unbiased
        shuffle = grad and mode == "scaled"
    chunks = [chunks[i] for i in chunk_order(n, shuffle=shuffle, generator=generator, order=order)]
    if grad and (context_in.requires_grad or context_out.requires_grad) and mode != "full" and n > 1:
        raise ValueError("gradients with respect to context_in/context_out need apsp_mode='full' "
                         "(or l=None); 'exact' and 'scaled' treat the contexts as constants")
    if not grad or mode == "full" or n == 1:
        sums = _accumulate(model, ContextStream(context_in, context_out, chunks, device, dtype), tctx, fast)
        return [s / L for s in sums] if grad else [s.div_(L) for s in sums]
    if mode == "scaled":
        with torch.no_grad():
            stream = ContextStream(context_in, context_out, chunks[:-1], device, dtype)
            sums = _accumulate(model, stream, tctx, fast)
        ci, co, _ = next(iter(ContextStream(context_in, context_out, chunks[-1:], device, dtype)))
        feats = model.encode_contexts(ci, co, tctx=tctx, fast=fast)
        return [(s + _ScaleGrad.apply(_sum_contexts(f), float(n))) / L for s, f in zip(sums, feats)]
    runner = _Runner(model, context_in, context_out, chunks, fast, device, L)
    return list(_ExactContextMeans.apply(runner, len(tctx), *tctx, *runner.params))


def apsp_forward(model, target_in: torch.Tensor, context_in: torch.Tensor, context_out: torch.Tensor,
                 l: int | str | None = None, *, fast: bool | None = None, mode: str = "exact",
                 shuffle: bool | None = None, generator: torch.Generator | None = None,
                 order: Sequence[int] | None = None, validate: bool = True) -> torch.Tensor:
    """Full Neuroverse3D forward with APSP.

    Args:
        target_in: (B, C_in, *S); moved to the model's device.
        context_in, context_out: (B, L, C, *S), may stay on the CPU.
        l: mini-context size: int, None (all at once) or "auto".
        fast: computation path (default: ``model.fast``).
        mode: gradient mode when a graph is recorded ("exact", "scaled", "full").
        shuffle, generator, order: mini-context order (see :func:`context_means`).
        validate: run ``model.validate_inputs`` first.
    Returns:
        (B, C_out, *S).
    """
    if validate:
        model.validate_inputs(target_in, context_in, context_out)
    if mode not in _MODES:
        raise ValueError(f"apsp mode must be one of {_MODES}, got {mode!r}")
    fast = model.fast if fast is None else bool(fast)
    p0 = next(model.parameters())
    device = p0.device
    target = target_in.to(device, p0.dtype)
    grad = torch.is_grad_enabled() and (
        target.requires_grad or context_in.requires_grad or context_out.requires_grad
        or any(p.requires_grad for p in model.parameters()))
    l = resolve_mini_context(model, l, target, context_in, training=grad)
    tfeats = model.encode_target(target, fast=fast)
    tctx = model.target_context(tfeats, fast=fast)
    means = context_means(model, tctx, context_in, context_out, l, fast=fast, mode=mode, grad=grad,
                          shuffle=shuffle, generator=generator, order=order)
    del tctx  # W_t t is no longer needed: free it before the decoder's peak
    return model.decode(tfeats, means, fast=fast)
