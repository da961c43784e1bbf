"""Batched exact linear sum assignment: vicl_fast vs SciPy, lap, lapx and torch-linear-assignment.

Grid: B in {16, 64, 256} matrices of N x N, N in {64, 256, 1024}, three cost
structures (notes/hungarian.md: structure changes run time 5-7x):

- ``cosine``: -cos of random 768-d unit vectors (isotropic tokens);
- ``planted``: -cos(a_i, b_j) with b a noisy permutation of a (similar anatomy
  in prompt and query: the column-reduction warm start solves most of it);
- ``uniform``: U(0, 1).

Every solver gets the same float32 (B, N, N) costs and is timed on the whole
batch; the summary reports ms per matrix (best round). Columns:
``vicl cpu 1t`` / ``vicl cpu all`` (the C++ kernel on 1 / all threads),
``vicl scipy-pool`` (our SciPy fallback, thread pool over the batch),
``scipy`` (one thread, loop), ``lap lapjv`` (loop), ``lapx lapjvr`` (loop) and
``lapx lapjvr_batch`` (its thread pool, all threads), ``tla cpu``
(torch-linear-assignment's CPU path), and on CUDA ``vicl cuda`` / ``tla cuda``.

Runs (N=1024 at B > 16 is marked slow):
    pytest benchmarks/bench_assignment.py --benchmark-only [--bench-full]
    VICL_FAST_BENCH_MD=/tmp/lsa.md pytest benchmarks/bench_assignment.py --benchmark-only -q
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable

import numpy as np
import pytest
import torch

from vicl_fast import _ext
from vicl_fast.ops import assignment as A

HAS_CUDA = torch.cuda.is_available()
NCPU = os.cpu_count() or 1
D = 768

try:  # lapx installs into the `lap` package; its Rust solvers live in lap._lapjv_rh
    from lap._lapjv_rh import lapjvr, lapjvr_batch
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from lap import lapjvr, lapjvr_batch  # type: ignore[attr-defined,no-redef]
    except ImportError:
        lapjvr = lapjvr_batch = None
try:
    from lap import lapjv
except ImportError:  # pragma: no cover
    lapjv = None
try:
    import torch_linear_assignment as tla
except ImportError:  # pragma: no cover
    tla = None


# ----------------------------------------------------------------------------- costs
@lru_cache(maxsize=4)
def make_costs(kind: str, B: int, N: int, seed: int = 0) -> torch.Tensor:
    """(B, N, N) float32 contiguous costs of the given structure."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(B, N, N)
    for s in range(0, B, 16):  # chunks keep the (b, N, D) features small
        b = min(16, B - s)
        if kind == "uniform":
            out[s:s + b] = torch.rand(b, N, N, generator=g)
            continue
        x = torch.nn.functional.normalize(torch.randn(b, N, D, generator=g), dim=-1)
        if kind == "cosine":
            y = torch.nn.functional.normalize(torch.randn(b, N, D, generator=g), dim=-1)
        elif kind == "planted":
            perm = torch.argsort(torch.rand(b, N, generator=g), dim=1)
            y = x.gather(1, perm[..., None].expand(-1, -1, D))
            y = torch.nn.functional.normalize(y + 0.5 * torch.randn(b, N, D, generator=g) / D ** 0.5, dim=-1)
        else:
            raise KeyError(kind)
        out[s:s + b] = -(x @ y.transpose(1, 2))
    return out


# ----------------------------------------------------------------------------- solvers
def _with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        prev = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(prev)
    return run


def _solver(name: str, cost: torch.Tensor) -> Callable[[], object]:
    """A no-argument callable that solves the whole batch ``cost`` with solver ``name``."""
    arr = cost.numpy()
    if name in ("vicl cpu 1t", "vicl cpu all"):
        if not _ext.has_kernel("linear_sum_assignment", "CPU"):
            pytest.skip("vicl_fast._C CPU kernel not built")
        op = torch.ops.vicl_fast.linear_sum_assignment
        return _with_threads(1 if name.endswith("1t") else NCPU, lambda: op(cost, False))
    if name == "vicl scipy-pool":
        return _with_threads(NCPU, lambda: A._scipy_solve(cost, False))
    if name == "scipy":
        from scipy.optimize import linear_sum_assignment as scipy_lsa
        return lambda: [scipy_lsa(c) for c in arr]
    if name == "lap lapjv":
        if lapjv is None:
            pytest.skip("lap not installed")
        return lambda: [lapjv(c) for c in arr]
    if name == "lapx lapjvr":
        if lapjvr is None:
            pytest.skip("lapx not installed")
        return lambda: [lapjvr(c, return_cost=False) for c in arr]
    if name == "lapx lapjvr_batch":
        if lapjvr_batch is None:
            pytest.skip("lapx not installed")
        return lambda: lapjvr_batch(arr, return_cost=False, n_threads=NCPU)
    if name == "tla cpu":
        if tla is None:
            pytest.skip("torch-linear-assignment not installed")
        return lambda: tla.batch_linear_assignment(cost)
    if name in ("vicl cuda", "tla cuda"):
        dev = cost.cuda()
        if name == "vicl cuda":
            if not _ext.has_kernel("linear_sum_assignment", "CUDA"):
                pytest.skip("vicl_fast._C built without the CUDA kernel")
            op = torch.ops.vicl_fast.linear_sum_assignment
            call = lambda: op(dev, False)  # noqa: E731
        else:
            if tla is None:
                pytest.skip("torch-linear-assignment not installed")
            call = lambda: tla.batch_linear_assignment(dev)  # noqa: E731

        def run():
            out = call()
            torch.cuda.synchronize()
            return out
        return run
    raise KeyError(name)


CPU_SOLVERS = ["vicl cpu 1t", "vicl cpu all", "vicl scipy-pool", "scipy", "lap lapjv", "lapx lapjvr",
               "lapx lapjvr_batch", "tla cpu"]
GPU_SOLVERS = ["vicl cuda", "tla cuda"]
SIZES = [(16, 64), (64, 64), (256, 64), (16, 256), (64, 256), (256, 256), (16, 1024),
         pytest.param(64, 1024, marks=pytest.mark.slow), pytest.param(256, 1024, marks=pytest.mark.slow)]
KINDS = ["cosine", "planted", "uniform"]
SOLVERS = CPU_SOLVERS + [pytest.param(s, marks=pytest.mark.gpu) for s in GPU_SOLVERS]


def _rounds(B: int, N: int, name: str) -> int:
    """Fewer rounds for the big cells so that the default grid stays affordable on 2 cores."""
    work = B * N * N * (1 if name.startswith("vicl") or "lapjvr" in name else 8)
    return int(np.clip(4e7 / work, 2, 30))


@pytest.mark.parametrize("solver", SOLVERS)  # varies fastest: the cached costs are reused
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,N", SIZES)
def test_lsa(benchmark, record_per_item, solver, B, N, kind):
    cost = make_costs(kind, B, N)
    run = _solver(solver, cost)
    run()  # warm-up (thread pools, CUDA context, Triton compile)
    benchmark.group = f"lsa {kind} B={B} N={N}"
    benchmark.pedantic(run, rounds=_rounds(B, N, solver), iterations=1)
    record_per_item(benchmark, f"{kind} costs: ms per matrix", f"B={B}, N={N}", solver, B)


def test_answers_agree():
    """Not a benchmark: the compiled op is optimal on the benchmark's inputs (guards the grid)."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa
    for kind in KINDS:
        cost = make_costs(kind, 4, 64, seed=1)
        rows, cols = A.linear_sum_assignment(cost)
        for b in range(4):
            x = cost[b].double().numpy()
            r, c = scipy_lsa(x)
            assert abs(x[rows[b].numpy(), cols[b].numpy()].sum() - x[r, c].sum()) < 1e-9
