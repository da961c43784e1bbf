"""Triton kernel of the Neuroverse3D fusion block ``y = GELU(x + x W^T + b + extra)``.

Shapes: ``x`` (B, L, C, *S), ``W`` (C, C), ``b`` (C,), ``extra`` broadcastable to
``x`` (typically (B, 1, C, *S): ``W_t t`` computed once per stage and read with
stride 0 over the L contexts). Every voxel p of the B*L*prod(S) positions is one
row of a (P, C) x (C, C) matrix product; one program computes a tile of
BLOCK_P voxels x BLOCK_N output channels, reducing over C with ``tl.dot`` in
fp32, then adds the residual, bias and ``extra`` and applies the exact (erf)
GELU before the single store. Nothing but ``y`` is written to memory.

Layouts: the kernel takes strides, so both the contiguous ``(B, L, C, *S)``
layout and the channels-last one (``channels_last_3d`` of the (B*L, C, D, H, W)
tensor viewed as 6D; the C channels of a voxel contiguous) run without copies.
Channels-last is the fast one on a GPU: a (BLOCK_P, BLOCK_K) tile of x is then
one contiguous block and ``W`` tiles stay in L2. The contiguous layout is also
coalesced (voxels are contiguous for a channel) but every row of the tile is a
separate memory segment. The only requirement is that the spatial dims be
flattenable with a single stride (true for both layouts and their slices over
B and L); anything else is copied to contiguous first.

Backward (:class:`FusionBlockFunction`): the pre-activation is *recomputed*
rather than stored (memory-optimal: the forward saves only its inputs, which
the graph keeps alive anyway). One launch of the same kernel in ``MODE_GELU_GRAD``
recomputes ``pre`` and writes ``g = grad_out * GELU'(pre)`` (GELU', residual and
bias fused, one pass); a second launch in ``MODE_LINEAR`` with ``W^T`` gives
``grad_x = g + g W`` (the 1x1 conv transposed plus the residual, again one pass);
``grad_W = g^T x`` and ``grad_b = sum g`` are reductions over the voxels done by
cuBLAS / torch; ``grad_extra`` is ``g`` summed over the axes ``extra`` was
broadcast over.

fp32 inputs use IEEE fp32 products unless ``torch.get_float32_matmul_precision()``
is "high"/"medium" (then TF32, like cuBLAS); bf16/fp16 inputs multiply in their
own type with fp32 accumulation. Configs are autotuned on a GPU, keyed by C, the
volume size bucket (:func:`size_bucket`), the mode and whether ``extra`` is given,
after pruning the configs whose shared memory exceeds the device's limit for the
dtype; under the Triton CPU interpreter (``TRITON_INTERPRET=1``) one fixed small
config runs. ``VICL_FAST_TRITON_AUTOTUNE=0`` skips autotuning (one heuristic config per
shape: each compiles once, which keeps a correctness run short).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from vicl_fast.ops._dispatch import env, env_flag  # the documented environment variables

MODE_GELU = 0  # y = GELU(x + x W^T + b + extra)                  (forward)
MODE_LINEAR = 1  # y = x + x W^T                                    (grad_x with W^T)
MODE_GELU_GRAD = 2  # y = grad_out * GELU'(x + x W^T + b + extra)  (backward g)


@triton.jit
def _fusion_block_forward_kernel(
    x_ptr, w_ptr, b_ptr, e_ptr, go_ptr, y_ptr,
    L, N, C, N_BUCKET,
    sxb, sxl, sxc, sxs,
    swo, swc,
    seb, sel, sec, ses,
    sgb, sgl, sgc, sgs,
    syb, syl, syc, sys,
    HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr, MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_P voxels) x (BLOCK_N output channels) tile of one (b, l) slab.

    ``N_BUCKET`` (:func:`size_bucket` of N) is unused by the body: it is an autotuning key only.

    Program order: output-channel tile fastest, then l, then the spatial tile,
    then b, so the programs that read the same x tile (all n tiles) and the same
    broadcast ``extra`` tile (all l) run next to each other and hit L2.
    """
    pid = tl.program_id(0)
    num_n = (C + BLOCK_N - 1) // BLOCK_N
    num_s = (N + BLOCK_P - 1) // BLOCK_P
    pid_n = pid % num_n
    rest = pid // num_n
    l_idx = (rest % L).to(tl.int64)  # int64: l * stride_l can pass 2^31 (L=64, C=32, 128^3)
    rest = rest // L
    pid_s = rest % num_s
    b_idx = (rest // num_s).to(tl.int64)

    offs_p = (pid_s * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < N
    mask_n = offs_n < C
    mask_pn = mask_p[:, None] & mask_n[None, :]

    x_base = x_ptr + b_idx * sxb + l_idx * sxl
    # tl.full, not tl.zeros, and no tl.cdiv: those are @jit helpers that break the
    # interpreter when triton was imported before TRITON_INTERPRET was set.
    acc = tl.full((BLOCK_P, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        a = tl.load(x_base + offs_p[:, None] * sxs + offs_k[None, :] * sxc,
                    mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        # (BLOCK_K, BLOCK_N) tile of W^T: wt[k, n] = W[n, k]
        wt = tl.load(w_ptr + offs_k[:, None] * swc + offs_n[None, :] * swo,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:  # exact: bf16 products are exact in fp32
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc=acc, input_precision=INPUT_PRECISION)

    # residual x[:, n]: same voxels, this tile's channels (an L1/L2 hit)
    acc += tl.load(x_base + offs_p[:, None] * sxs + offs_n[None, :] * sxc,
                   mask=mask_pn, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_EXTRA:
        e_base = e_ptr + b_idx * seb + l_idx * sel
        acc += tl.load(e_base + offs_p[:, None] * ses + offs_n[None, :] * sec,
                       mask=mask_pn, other=0.0).to(tl.float32)

    if MODE == 0:
        out = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif MODE == 1:
        out = acc
    else:
        go_base = go_ptr + b_idx * sgb + l_idx * sgl
        go = tl.load(go_base + offs_p[:, None] * sgs + offs_n[None, :] * sgc,
                     mask=mask_pn, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        pdf = tl.exp(-0.5 * acc * acc) * 0.3989422804014327
        out = go * (cdf + acc * pdf)

    y_base = y_ptr + b_idx * syb + l_idx * syl
    tl.store(y_base + offs_p[:, None] * sys + offs_n[None, :] * syc,
             out.to(y_ptr.dtype.element_ty), mask=mask_pn)


# --------------------------------------------------------------------------- configs

# (BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages); pruned by C below. Small C
# (32, 64: the first stages, memory bound) wants the whole channel range in one
# tile so x is read once; larger C trades that for register pressure.
_GPU_CONFIGS = [
    (64, 16, 16, 4, 2),
    (128, 32, 32, 4, 3),
    (256, 32, 32, 8, 3),
    (128, 64, 64, 4, 3),
    (256, 64, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 3),
    (128, 256, 32, 8, 3),
]
_INTERPRET_CONFIG = dict(BLOCK_P=16, BLOCK_N=16, BLOCK_K=16)


_SMEM_FALLBACK = 101376  # bytes per block (sm_86's opt-in limit) when the device cannot be asked
_smem_limits: dict[int, int] = {}


def _smem_limit(device_index: int) -> int:
    """Opt-in shared memory per block of a CUDA device (227 KiB on H100/H200), cached."""
    if device_index not in _smem_limits:
        try:
            props = torch.cuda.get_device_properties(device_index)
            _smem_limits[device_index] = int(getattr(props, "shared_memory_per_block_optin", 0)) or _SMEM_FALLBACK
        except Exception:  # noqa: BLE001 - no device / old torch: the conservative limit
            _smem_limits[device_index] = _SMEM_FALLBACK
    return _smem_limits[device_index]


def _config_smem(cfg, elem_bytes: int) -> int:
    """Shared memory a config's main loop needs: num_stages buffers of one x tile and one W^T tile
    (Triton pipelines both through shared memory), plus 10% for layout conversions."""
    kw = cfg.kwargs
    tiles = kw["BLOCK_P"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]
    return int(1.1 * cfg.num_stages * tiles * elem_bytes)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much wider than C (tl.dot needs >= 16 per side on GPU) and configs whose shared
    memory exceeds the device's limit for this dtype (fp32 tiles take twice bf16's: a config that
    fits for bf16 can fail to launch for fp32, which autotuning reports as an error, not a skip)."""
    cap = max(16, triton.next_power_of_2(int(named_args["C"])))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= cap and c.kwargs["BLOCK_K"] <= cap]
    if cap > 16:  # 16-wide tiles only for the tiny-C (test) shapes
        kept = [c for c in kept if c.kwargs["BLOCK_N"] > 16] or kept
    x = named_args.get("x_ptr")
    if isinstance(x, torch.Tensor):
        limit = _smem_limit(x.device.index or 0) if x.is_cuda else _SMEM_FALLBACK
        fits = [c for c in kept if _config_smem(c, x.element_size()) <= limit]
        kept = fits or sorted(kept, key=lambda c: _config_smem(c, x.element_size()))[:1]
    return kept or configs[:1]


def size_bucket(n_voxels: int) -> int:
    """Autotuning key of the volume size: floor(log2(voxels per (b, l) slab) / 3), so each bucket
    spans 8x in voxels (2x per side): 32^3 and 128^3 stages tune apart, 64^3 and 100^3 together."""
    return max(0, (max(1, int(n_voxels)).bit_length() - 1) // 3)


def gpu_configs() -> list:
    """``_GPU_CONFIGS`` as ``triton.Config`` objects (the autotuner's candidates)."""
    return [triton.Config(dict(BLOCK_P=p, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
            for p, n, k, w, s in _GPU_CONFIGS]


def config_tuple(cfg) -> tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages) of a ``triton.Config``."""
    kw = cfg.kwargs
    return kw["BLOCK_P"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages


@functools.lru_cache(maxsize=None)
def _heuristic_config(C: int, dtype: torch.dtype, device_index: int) -> tuple[int, int, int, int, int]:
    """One config without autotuning (``VICL_FAST_TRITON_AUTOTUNE=0``: every shape compiles once,
    e.g. for correctness runs): the whole channel range in one tile up to 128 wide, else the
    first config that survives :func:`_prune_configs`. Cached: it is looked up at every launch."""
    cap = max(16, triton.next_power_of_2(int(C)))
    want = {16: (64, 16, 16, 4, 2), 32: (128, 32, 32, 4, 3), 64: (128, 64, 64, 4, 3)}.get(cap, (128, 128, 32, 8, 4))
    probe = torch.empty(0, dtype=dtype, device=f"cuda:{device_index}")
    kept = [config_tuple(c) for c in _prune_configs(gpu_configs(), {"C": C, "x_ptr": probe})]
    return want if want in kept else kept[0]


_forced_config: tuple[int, int, int, int, int] | None = None


@contextlib.contextmanager
def forced_config(cfg: tuple[int, int, int, int, int]):
    """Run every launch inside with ``cfg`` = (BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages),
    no autotuning (the GPU tests check each entry of ``_GPU_CONFIGS`` this way)."""
    global _forced_config
    prev, _forced_config = _forced_config, tuple(cfg)
    try:
        yield
    finally:
        _forced_config = prev


_autotuned = None


def _get_autotuned():
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(gpu_configs(), key=["C", "N_BUCKET", "MODE", "HAS_EXTRA"],
                                     prune_configs_by={"early_config_prune": _prune_configs},
                                     )(_fusion_block_forward_kernel)
    return _autotuned


def _interpreting() -> bool:
    return env_flag("TRITON_INTERPRET")


# --------------------------------------------------------------------------- layout helpers

def _spatial_stride(t: torch.Tensor) -> int | None:
    """Stride of the flattened spatial index of ``t`` (B, L, C, *S), or None.

    The spatial dims must be nested like a row-major block (``stride[k] ==
    stride[k+1] * size[k+1]``, size-1 dims ignored); then voxel s of the slab
    is at ``s * stride[-1]``.
    """
    dims = [(n, s) for n, s in zip(t.shape[3:], t.stride()[3:]) if n != 1]
    if not dims:
        return 1
    inner = dims[-1][1]
    expect = inner
    for n, s in reversed(dims):
        if s != expect:
            return None
        expect = s * n
    return inner


def _flattenable(t: torch.Tensor) -> torch.Tensor:
    return t if _spatial_stride(t) is not None else t.contiguous()


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], _spatial_stride(t)


def _empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised tensor with x's shape and (when dense) x's memory layout."""
    y = torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)
    if _spatial_stride(y) is None:
        y = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return y


def _input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot precision for fp32 operands (None: the default, only meaningful for fp32)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"


def _launch(mode: int, x: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None,
            extra: torch.Tensor | None, grad_out: torch.Tensor | None, y: torch.Tensor) -> None:
    """Launch the kernel on prepared tensors (spatially flattenable, w2 (C, C) in x.dtype)."""
    B, L, C = x.shape[:3]
    N = 1
    for n in x.shape[3:]:
        N *= n
    if x.numel() == 0:
        return
    sx = _strides4(x)
    sy = _strides4(y)
    se = _strides4(extra) if extra is not None else (0, 0, 0, 0)
    sg = _strides4(grad_out) if grad_out is not None else (0, 0, 0, 0)
    args = (x, w2, bias if bias is not None else x, extra if extra is not None else x,
            grad_out if grad_out is not None else x, y,
            L, N, C, size_bucket(N), *sx, w2.stride(0), w2.stride(1), *se, *sg, *sy)
    consts = dict(HAS_BIAS=bias is not None, HAS_EXTRA=extra is not None, MODE=mode,
                  INPUT_PRECISION=_input_precision(x.dtype),
                  # triton 3.9's CPU interpreter multiplies the raw bits of bf16 in tl.dot
                  # (garbage results); fp32 operands give the same products exactly.
                  UPCAST_DOT=_interpreting() and x.dtype == torch.bfloat16)
    if _interpreting() or not x.is_cuda:
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(C, cfg["BLOCK_N"]) * L * triton.cdiv(N, cfg["BLOCK_P"]) * B,)
        _fusion_block_forward_kernel[grid](*args, **consts, **cfg)
    elif _forced_config is not None or env("VICL_FAST_TRITON_AUTOTUNE") == "0":
        p, n, k, warps, stages = _forced_config or _heuristic_config(C, x.dtype, x.device.index or 0)
        grid = (triton.cdiv(C, n) * L * triton.cdiv(N, p) * B,)
        with torch.cuda.device(x.device):
            _fusion_block_forward_kernel[grid](*args, **consts, BLOCK_P=p, BLOCK_N=n, BLOCK_K=k,
                                               num_warps=warps, num_stages=stages)
    else:
        def grid(meta):
            return (triton.cdiv(C, meta["BLOCK_N"]) * L * triton.cdiv(N, meta["BLOCK_P"]) * B,)
        with torch.cuda.device(x.device):
            _get_autotuned()[grid](*args, **consts)


def _prepare(x: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor | None):
    C = x.shape[2]
    x = _flattenable(x)
    w2 = weight.reshape(C, C).to(x.dtype)
    if extra is not None:
        extra = _flattenable(extra.expand(x.shape))  # broadcast axes get stride 0
    return x, w2, extra


# --------------------------------------------------------------------------- launchers

def fusion_block_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         extra: torch.Tensor | None) -> torch.Tensor:
    """``GELU(x + conv1x1(x; W) + b + extra)`` with one Triton launch (no autograd).

    Args:
        x: (B, L, C, *S), float32/float16/bfloat16, any layout (see module doc).
        weight: (C, C) or (C, C, 1, ...), cast to x.dtype.
        bias: (C,) or None.
        extra: None or broadcastable to x (e.g. (B, 1, C, *S)).
    Returns:
        (B, L, C, *S) in x.dtype and x's memory layout.
    """
    x, w2, extra = _prepare(x, weight, extra)
    y = _empty_like_layout(x)
    _launch(MODE_GELU, x, w2, bias, extra, None, y)
    return y


def fusion_block_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, extra: torch.Tensor | None,
                          needs: tuple[bool, bool, bool, bool] = (True, True, True, True)):
    """Gradients of :func:`fusion_block_forward` w.r.t. (x, weight, bias, extra).

    Recomputes the pre-activation (nothing but the inputs was saved).

    Args:
        grad_out: (B, L, C, *S).
        needs: which of (x, weight, bias, extra) need a gradient.
    Returns:
        (grad_x (B, L, C, *S) | None, grad_weight (weight.shape) | None,
        grad_bias (C,) | None, grad_extra (extra.shape) | None)
    """
    extra_shape = extra.shape if extra is not None else None
    x, w2, extra_e = _prepare(x, weight, extra)
    grad_out = _flattenable(grad_out)
    B, L, C = x.shape[:3]

    # g = grad_out * GELU'(pre), in x's layout and dtype; pre recomputed in registers.
    g = _empty_like_layout(x)
    _launch(MODE_GELU_GRAD, x, w2, bias, extra_e, grad_out.to(x.dtype), g)

    grad_x = grad_w = grad_b = grad_e = None
    if needs[0]:
        # grad_x = g + g W: the same kernel with W^T (a stride swap, no copy).
        grad_x = _empty_like_layout(x)
        _launch(MODE_LINEAR, g, w2.t(), None, None, None, grad_x)
    if needs[1]:
        g_pc, x_pc = _as_voxel_rows(g), _as_voxel_rows(x)
        if g_pc is not None and x_pc is not None:
            gw = g_pc.t() @ x_pc  # (C, P) @ (P, C): one cuBLAS GEMM with split-K over voxels
        else:
            g3 = g.reshape(B * L, C, -1)
            x3 = x.reshape(B * L, C, -1)
            gw = torch.bmm(g3, x3.transpose(1, 2)).float().sum(0)
        grad_w = gw.to(weight.dtype).reshape(weight.shape)
    if needs[2] and bias is not None:
        dims = [0, 1, *range(3, x.dim())]
        grad_b = g.sum(dim=dims, dtype=torch.float32).to(bias.dtype)
    if needs[3] and extra is not None:
        dims = [i for i in range(x.dim()) if extra_shape[i] == 1 and x.shape[i] != 1]
        if dims:
            grad_e = g.sum(dim=dims, keepdim=True, dtype=torch.float32).to(extra.dtype)
        else:
            grad_e = g.to(extra.dtype)
        grad_e = grad_e.reshape(extra_shape)
    return grad_x, grad_w, grad_b, grad_e


def _as_voxel_rows(t: torch.Tensor) -> torch.Tensor | None:
    """(P, C) view of a channels-last (B, L, C, *S) tensor, or None if that needs a copy."""
    t_cl = t.movedim(2, -1)
    if t_cl.is_contiguous():
        return t_cl.view(-1, t.shape[2])
    return None


class FusionBlockFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, recompute-based fused backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                extra: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias, extra)
        return fusion_block_forward(x, weight, bias, extra)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, bias, extra = ctx.saved_tensors
        return fusion_block_backward(grad_out, x, weight, bias, extra, tuple(ctx.needs_input_grad))
