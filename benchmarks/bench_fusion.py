"""Benchmark of the Neuroverse3D fusion block at the stage sizes of a 128^3 input.

Three forms of the Target-to-Context fusion ``GELU(c + Conv1x1(concat[c, t]))``
(context features c: (B, L, C, s, s, s), target feature t: (B, C, s, s, s)):

- ``authors``: concatenate [c, t] per context, Conv 2C->C, add, GELU (their order);
- ``reference``: ``W_t t`` once (conv), then conv(c) + bias + c + extra, GELU
  (the plain-PyTorch composition, :func:`fusion_block_reference` with a conv);
- ``fused``: ``W_t t`` once (conv), then the Triton kernel (one pass over c);
- ``fused_kernel``: the Triton kernel alone (what the bytes/bandwidth column is for).

Stages (encoder T2C fusion at 0-3, the target decoder's bottleneck C2T fusion at 4):
C = 32, 64, 128, 256, 512 at s = 128, 64, 32, 16, 8; L in {1, 8}; fp32 and bf16;
channels-last 3D activations.

Runs:
    pytest benchmarks/bench_fusion.py --benchmark-only        # GPU cases need CUDA
    python benchmarks/bench_fusion.py                         # table (GPU if present, else the floors)

GPU cases time with ``triton.testing.do_bench`` (median, CUDA events) and report
achieved GB/s of the fused kernel = (bytes it must move) / time, against the
H100's ~3.35 TB/s. Without CUDA: a tiny CPU reference case and the three
forms at stage 0 of a 64^3 input (the CPU ``fused`` form is the oneDNN path).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vicl_fast.ops.fusion import fusion_block, fusion_block_reference

# (stage, channels, spatial side) at a 128^3 input
STAGES = [(0, 32, 128), (1, 64, 64), (2, 128, 32), (3, 256, 16), (4, 512, 8)]
H100_BW = 3.35e12  # bytes/s, HBM3 datasheet (SXM)
HAS_CUDA = torch.cuda.is_available()


def fused_bytes(C: int, side: int, L: int, dtype: torch.dtype, B: int = 1) -> int:
    """Fewest bytes the fused kernel must move: read x, write y (B*L*C*N each),
    read extra once (B*C*N: broadcast over L, L2 serves the repeats), weights+bias."""
    n = side ** 3
    e = torch.finfo(dtype).bits // 8
    return e * (2 * B * L * C * n + B * C * n + C * C) + 4 * C


def fused_flops(C: int, side: int, L: int, B: int = 1) -> int:
    return 2 * B * L * side ** 3 * C * C


def make_case(C: int, side: int, L: int, dtype: torch.dtype, device: str, B: int = 1):
    """Random channels-last features and weights of one stage."""
    g = torch.Generator(device="cpu").manual_seed(C * 1000 + side + L)
    S = (side, side, side)

    def cl(t):  # (N, C, D, H, W) channels_last_3d
        return t.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)

    c = cl(torch.randn(B * L, C, *S, generator=g))
    t = cl(torch.randn(B, C, *S, generator=g))
    w_full = (torch.randn(C, 2 * C, 1, 1, 1, generator=g) / math.sqrt(2 * C)).to(device, dtype)
    bias = torch.randn(C, generator=g).to(device, dtype)
    return c, t, w_full, bias


def forms(c, t, w_full, bias, B: int = 1):
    """The callables compared (all return (B*L, C, *S))."""
    C = c.shape[1]
    L = c.shape[0] // B
    w_c, w_t = w_full[:, :C].contiguous(), w_full[:, C:].contiguous()

    def authors():
        tt = t.unsqueeze(1).expand(B, L, *t.shape[1:]).reshape(B * L, *t.shape[1:])
        return F.gelu(c + F.conv3d(torch.cat([c, tt], dim=1), w_full, bias))

    def reference():
        extra = F.conv3d(t, w_t).unsqueeze(1)
        y = F.conv3d(c, w_c, bias).unflatten(0, (B, L)) + c.unflatten(0, (B, L)) + extra
        return F.gelu(y).flatten(0, 1)

    def fused():
        extra = F.conv3d(t, w_t).unsqueeze(1)
        return fusion_block(c.unflatten(0, (B, L)), w_c, bias, extra).flatten(0, 1)

    extra0 = F.conv3d(t, w_t).unsqueeze(1)

    def fused_kernel():
        return fusion_block(c.unflatten(0, (B, L)), w_c, bias, extra0)

    return dict(authors=authors, reference=reference, fused=fused, fused_kernel=fused_kernel)


# --------------------------------------------------------------------------- CPU (runs anywhere)

def test_cpu_reference_tiny(benchmark):
    """CPU reference composition at a tiny size (the CPU path of fusion_block)."""
    torch.set_num_threads(1)
    c, t, w_full, bias = make_case(32, 16, 2, torch.float32, "cpu")
    C = c.shape[1]
    extra = F.conv3d(t, w_full[:, C:]).unsqueeze(1)
    x = c.unflatten(0, (1, 2))
    y = benchmark(fusion_block_reference, x, w_full[:, :C], bias, extra)
    assert y.shape == x.shape
    benchmark.extra_info.update(C=32, side=16, L=2, dtype="float32")


@pytest.mark.parametrize("form", ["authors", "reference", "fused"])
def test_cpu_stage0_64(benchmark, form):
    """One T2C fusion at stage 0 of a 64^3 input (C=32, L=2, fp32, inference, 1 thread):
    on the CPU ``fused`` is the oneDNN 1x1 conv with a fused add + in-place GELU."""
    torch.set_num_threads(1)
    fn = forms(*make_case(32, 64, 2, torch.float32, "cpu"))[form]
    with torch.inference_mode():
        fn()
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(C=32, side=64, L=2, dtype="float32", threads=1)


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", [1, 8])
@pytest.mark.parametrize("stage", [s[0] for s in STAGES])
@pytest.mark.parametrize("form", ["fused_kernel", "fused", "reference", "authors"])
def test_gpu_stage(benchmark, form, stage, L, dtype):
    import triton.testing

    _, C, side = STAGES[stage]
    case = make_case(C, side, L, dtype, "cuda")
    fn = forms(*case)[form]
    with torch.inference_mode():
        fn()  # compile / autotune outside the timing
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    nbytes = fused_bytes(C, side, L, dtype)
    benchmark.extra_info.update(
        stage=stage, C=C, side=side, L=L, dtype=str(dtype).replace("torch.", ""), median_ms=ms,
        fused_bytes=nbytes, gbps_vs_fused_bytes=nbytes / ms / 1e6,
        floor_ms=nbytes / H100_BW * 1e3, tflops=fused_flops(C, side, L) / ms / 1e9)


# --------------------------------------------------------------------------- script

def _table(device: str) -> None:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for L in (1, 8):
            for stage, C, side in STAGES:
                nbytes = fused_bytes(C, side, L, dtype)
                row = dict(stage=stage, C=C, side=side, L=L, dtype=str(dtype).replace("torch.", ""),
                           MB=nbytes / 1e6, floor_ms=nbytes / H100_BW * 1e3,
                           GFLOP=fused_flops(C, side, L) / 1e9)
                if device == "cuda":
                    import triton.testing
                    fs = forms(*make_case(C, side, L, dtype, "cuda"))
                    with torch.inference_mode():
                        for name, fn in fs.items():
                            fn()
                            row[name] = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
                    row["GB/s"] = nbytes / row["fused_kernel"] / 1e6
                    torch.cuda.empty_cache()
                rows.append(row)
    keys = list(rows[0].keys())
    print(" | ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print(" | ".join(f"{r[k]:>12.4g}" if isinstance(r[k], float) else f"{r[k]!s:>12}" for k in keys))


if __name__ == "__main__":
    dev = "cuda" if HAS_CUDA else "cpu"
    if dev == "cpu":
        print("no CUDA device: H100 floors only (bytes the fused kernel must move / 3.35 TB/s)")
    _table(dev)
