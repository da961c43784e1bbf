"""Neuroverse3D inference/training: time, peak memory and conv FLOPs, fast vs reference path.

Runs:
    pytest benchmarks/bench_neuroverse3d.py --benchmark-only              # CPU subset (+ GPU grid with CUDA)
    pytest benchmarks/bench_neuroverse3d.py --benchmark-only --bench-full
        # + big cells (L >= 16, CPU memory scaling)

Grids (default model: channels 32..512, random weights, batch 1):

- GPU (``gpu`` marker): 128^3, L in {1, 2, 4, 8, 16, 32, 64}, l in {1, 2, 4, 8}
  (l <= L), fp32 and bf16 autocast, fast and reference path; contexts on the
  GPU. Time = median of CUDA-synchronised calls; peak memory =
  ``torch.cuda.max_memory_allocated`` of the call. Plus one case with the
  contexts in pinned CPU memory (streamed per mini-context).
- CPU (default): 64^3, L in {2, 4}, l in {1, 2}, fp32, fast and reference
  path (bf16 convs have no fast CPU kernels here, so no bf16 cells), the two
  paths interleaved in each round (3 rounds; medians and the ratio in
  ``extra_info`` and printed with ``-s``). Peak memory: peak RSS of the call
  above the RSS before it, with glibc serving every allocation >= 64 KiB by
  mmap (``mallopt(M_MMAP_THRESHOLD)``, so freed tensors leave the RSS at once)
  and the kernel's high-water mark reset through ``/proc/self/clear_refs``.
- CPU memory scaling (slow): peak memory of an exact-mode training step and of
  inference at L=2 and L=32, l=1, 64^3, each in a fresh process (the claim:
  L=32 costs at most 1.15x L=2).

Every cell records conv FLOPs (2 x MACs, :meth:`Neuroverse3D.conv_macs`) and
the achieved FLOP rate in ``extra_info``; the session summary prints the tables.
"""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vicl_fast.models.neuroverse3d import Neuroverse3D

HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]

GPU_SIDE, GPU_L, GPU_l = 128, (1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8)
CPU_SIDE, CPU_L, CPU_l, CPU_ROUNDS = 64, (2, 4), (1, 2), 3


# ------------------------------------------------------------------ helpers
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class _CpuPeak:
    """Peak RSS of a block above the RSS at its start (Linux; see the module docstring)."""

    _configured = False

    def __init__(self):
        if not _CpuPeak._configured:
            try:  # M_MMAP_THRESHOLD = -3: fixed threshold, no dynamic growth
                ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
            except OSError:
                pass
            _CpuPeak._configured = True
        self.ok = Path("/proc/self/clear_refs").exists()

    def start(self) -> None:
        self.base = _status("VmRSS:")
        if self.ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        return _status("VmHWM:") - self.base if self.ok else -1


def _inputs(side: int, L: int, device: str, pin: bool = False):
    g = torch.Generator().manual_seed(0)
    S = (side,) * 3
    t = torch.rand(1, 1, *S, generator=g)
    ci = torch.rand(1, L, 1, *S, generator=g)
    co = (torch.rand(1, L, 1, *S, generator=g) > 0.5).float()
    if pin:
        return t.to(device), ci.pin_memory(), co.pin_memory()
    return t.to(device), ci.to(device), co.to(device)


_MODELS: dict[str, Neuroverse3D] = {}


def _model(device: str) -> Neuroverse3D:
    if device not in _MODELS:
        torch.manual_seed(0)
        m = Neuroverse3D(check_finite=False).to(device).eval()
        if device == "cuda":
            m = m.to(memory_format=torch.channels_last_3d)
        _MODELS[device] = m
    return _MODELS[device]


def _record(benchmark, record_per_item, table, row, col, seconds, peak, flops):
    benchmark.extra_info.update(peak_mem_gib=peak / 2 ** 30 if peak >= 0 else None,
                                conv_tflop=flops / 1e12, tflops_per_s=flops / seconds / 1e12)
    record_per_item(benchmark, table, row, col, 1)


def _cuda_peak_after_warmup(run) -> int:
    """Bytes allocated above the resident state during one call of ``run``, after a warm-up
    call (cuDNN algorithm choice, allocator growth)."""
    run()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    return torch.cuda.max_memory_allocated() - base


def _cases(Ls, ls):
    return [(L, l) for L in Ls for l in ls if l <= L]


# ------------------------------------------------------------------- GPU grid
@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("L,l", [pytest.param(L, l, marks=[pytest.mark.slow] if L >= 16 else [])
                                 for L, l in _cases(GPU_L, GPU_l)])
def test_gpu_inference_128(benchmark, record_per_item, L, l, dtype, path):
    m = _model("cuda")
    t, ci, co = _inputs(GPU_SIDE, L, "cuda")
    fast = path == "fast"
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run():
        with amp:
            m.predict(t, ci, co, l, fast=fast)
        torch.cuda.synchronize()

    peak = _cuda_peak_after_warmup(run)
    benchmark.pedantic(run, rounds=3, iterations=1)
    flops = 2 * m.conv_macs((GPU_SIDE,) * 3, L, fast=fast)["total"]
    _record(benchmark, record_per_item, f"Neuroverse3D 128^3 {dtype} (GPU)", f"L={L} l={l}", path,
            benchmark.stats.stats.median, peak, flops)


@pytest.mark.gpu
def test_gpu_streamed_contexts_128(benchmark, record_per_item):
    """Contexts in pinned CPU memory, streamed one mini-context ahead on a side stream."""
    m = _model("cuda")
    t, ci, co = _inputs(GPU_SIDE, 8, "cuda", pin=True)

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m.predict(t, ci, co, 1)
        torch.cuda.synchronize()

    peak = _cuda_peak_after_warmup(run)
    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, record_per_item, "Neuroverse3D 128^3 bf16 (GPU)", "L=8 l=1 contexts on CPU", "fast",
            benchmark.stats.stats.median, peak, 2 * m.conv_macs((GPU_SIDE,) * 3, 8)["total"])


@pytest.mark.gpu
@pytest.mark.parametrize("L", [2, 32])
def test_gpu_train_exact_memory_128(benchmark, record_per_item, L):
    """Exact-mode training step at l=1: peak memory must not grow with L."""
    m = Neuroverse3D(check_finite=False).cuda().to(memory_format=torch.channels_last_3d).train()
    t, ci, co = _inputs(GPU_SIDE, L, "cuda")

    def run():
        m.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(t, ci, co, 1, apsp_mode="exact")
        y.float().square().mean().backward()
        torch.cuda.synchronize()

    peak = _cuda_peak_after_warmup(run)
    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, record_per_item, "Neuroverse3D 128^3 bf16 exact training step (GPU)",
            f"L={L} l=1", "fast",
            benchmark.stats.stats.median, peak, 2 * 3 * m.conv_macs((GPU_SIDE,) * 3, L)["total"])


# ------------------------------------------------------------------- CPU subset
@pytest.mark.parametrize("L,l", _cases(CPU_L, CPU_l))
def test_cpu_inference_64(benchmark, record_per_item, L, l):
    """Fast and reference path interleaved (fast, reference, fast, ...; CPU_ROUNDS each), so
    both see the same machine load; medians and their ratio go to ``extra_info``."""
    m = _model("cpu")
    t, ci, co = _inputs(CPU_SIDE, L, "cpu")
    meter = _CpuPeak()
    times: dict[str, list[float]] = {"fast": [], "reference": []}
    peaks: dict[str, int] = {}

    def run():
        for path in ("fast", "reference"):
            meter.start()
            t0 = time.perf_counter()
            m.predict(t, ci, co, l, fast=path == "fast")
            times[path].append(time.perf_counter() - t0)
            peaks[path] = max(peaks.get(path, -1), meter.peak())

    m.predict(t, ci, co, l)  # warm-up: oneDNN primitives, allocator
    benchmark.pedantic(run, rounds=CPU_ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    table = f"Neuroverse3D {CPU_SIDE}^3 fp32 (CPU, {torch.get_num_threads()} threads), median s"
    for path in ("fast", "reference"):
        flops = 2 * m.conv_macs((CPU_SIDE,) * 3, L, fast=path == "fast")["total"]
        benchmark.extra_info[f"{path}_median_s"] = med[path]
        benchmark.extra_info[f"{path}_seconds"] = times[path]
        benchmark.extra_info[f"{path}_peak_mib"] = peaks[path] / 2 ** 20
        benchmark.extra_info[f"{path}_conv_tflop"] = flops / 1e12
        print(f"\nCPU {CPU_SIDE}^3 L={L} l={l} {path}: median {med[path]:.2f} s {times[path]}, "
              f"peak {peaks[path] / 2 ** 20:.0f} MiB, {flops / 1e12:.3f} TFLOP")
    benchmark.extra_info["reference_over_fast"] = med["reference"] / med["fast"]
    print(f"CPU {CPU_SIDE}^3 L={L} l={l}: reference / fast = {med['reference'] / med['fast']:.2f}")
    record_per_item(benchmark, table, f"L={L} l={l}", "fast+reference (best round)", 1)


_MEM_SCRIPT = textwrap.dedent("""
    import json, sys, ctypes, torch
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    from vicl_fast.models.neuroverse3d import Neuroverse3D
    task, L, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    m = Neuroverse3D(check_finite=False)
    S = (side,) * 3
    t, ci = torch.rand(1, 1, *S), torch.rand(1, L, 1, *S)
    co = (torch.rand(1, L, 1, *S) > 0.5).float()
    def step(a, b):
        if task == "train":
            m.zero_grad(set_to_none=False)
            (m(t, a, b, 1, apsp_mode="exact") ** 2).mean().backward()
        else:
            m.predict(t, a, b, 1)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    step(ci[:, :2], co[:, :2])
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    import time; t0 = time.perf_counter()
    step(ci, co)
    print(json.dumps({"peak": status("VmHWM:") - base, "base": base, "seconds": time.perf_counter() - t0}))
""")


def _fresh_process_peak(task: str, L: int, side: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, task, str(L), str(side)], env=env,
                         capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("task", ["infer", "train"])
def test_cpu_memory_scaling_64(benchmark, task):
    """Peak memory of one step at L=32 vs L=2 (l=1, 64^3, default model), fresh process each."""
    res = {}

    def run():
        for L in (2, 32):
            res[L] = _fresh_process_peak(task, L, CPU_SIDE)

    benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = res[32]["peak"] / res[2]["peak"]
    benchmark.extra_info.update({f"peak_gib_L{L}": r["peak"] / 2 ** 30 for L, r in res.items()})
    benchmark.extra_info.update({f"seconds_L{L}": r["seconds"] for L, r in res.items()})
    benchmark.extra_info["ratio_32_over_2"] = ratio
    print(f"\n{task}: peak L=2 {res[2]['peak'] / 2**30:.3f} GiB, L=32 {res[32]['peak'] / 2**30:.3f} GiB, "
          f"ratio {ratio:.3f}; seconds {res[2]['seconds']:.1f} / {res[32]['seconds']:.1f}")
    assert ratio <= 1.15
