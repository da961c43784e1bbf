"""CUDA linear_sum_assignment (csrc/lsa/lsa_cuda.cu) against the CPU op and SciPy.

The contract (docs/design.md, "Solver") is that the CUDA kernel returns the
SAME indices as the CPU kernel (same algorithm, same arithmetic, same tie
policy), not only an assignment of equal cost. Every test here needs a GPU and
both compiled kernels; they are skipped otherwise.

Sizes are chosen to hit every kernel variant: one warp per matrix with
K = 1, 2, 4, 8, 16 columns per lane (C <= 32, 64, 128, 256, 512), blocks of
4/8/16 warps (C <= 1024, 2048, 4096) and the global-memory variant (C > 4096),
square (column-reduction warm start) and rectangular both ways (row reduction,
transposed read for N > M).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from vicl_fast import _ext

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_ext.has_kernel("linear_sum_assignment", "CUDA")
                            and _ext.has_kernel("linear_sum_assignment", "CPU")),
                       reason="needs vicl_fast._C with both the CPU and the CUDA linear_sum_assignment kernels"),
]

op = torch.ops.vicl_fast.linear_sum_assignment


def make_cost(kind: str, b: int, n: int, m: int, seed: int) -> torch.Tensor:
    """(b, n, m) float32 costs of a given structure (CPU)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "cosine":
        x = torch.nn.functional.normalize(torch.randn(b, n, 64, generator=g), dim=-1)
        y = torch.nn.functional.normalize(torch.randn(b, m, 64, generator=g), dim=-1)
        return -(x @ y.transpose(1, 2))
    if kind == "planted":
        y = torch.randn(b, m, 16, generator=g)
        idx = torch.randint(0, m, (b, n), generator=g)
        x = y.gather(1, idx[..., None].expand(-1, -1, 16)) + 0.3 * torch.randn(b, n, 16, generator=g)
        return torch.cdist(x, y)
    if kind == "uniform":
        return torch.rand(b, n, m, generator=g)
    if kind == "int_ties":
        return torch.randint(0, 4, (b, n, m), generator=g).float()
    if kind == "constant":
        return torch.full((b, n, m), -1.5)
    if kind == "with_inf":  # may be infeasible: then both devices must say so
        c = torch.rand(b, n, m, generator=g)
        return c.masked_fill(torch.rand(b, n, m, generator=g) < 0.3, math.inf)
    if kind == "signed_zeros":  # -0.0 and +0.0 must tie exactly as on the CPU
        c = torch.randint(-1, 2, (b, n, m), generator=g).float()
        return torch.where(c == 0, torch.where(torch.rand(b, n, m, generator=g) < 0.5, -0.0, 0.0), c)
    raise KeyError(kind)


def assert_same_as_cpu(cost: torch.Tensor, maximize: bool = False) -> tuple[torch.Tensor, ...]:
    """Run both kernels; indices and status must be identical. Returns the CPU answer."""
    r_cpu, c_cpu, s_cpu = op(cost.cpu(), maximize)
    r_gpu, c_gpu, s_gpu = op(cost.cuda(), maximize)
    assert r_gpu.device.type == "cuda" and c_gpu.device.type == "cuda" and s_gpu.device.type == "cuda"
    assert r_gpu.dtype == torch.int64 and c_gpu.dtype == torch.int64 and s_gpu.dtype == torch.int32
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=0, atol=0)
    torch.testing.assert_close(r_gpu.cpu(), r_cpu, rtol=0, atol=0)
    torch.testing.assert_close(c_gpu.cpu(), c_cpu, rtol=0, atol=0)
    return r_cpu, c_cpu, s_cpu


def assert_optimal(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, status: torch.Tensor,
                   maximize: bool = False) -> None:
    """Total cost equals SciPy's (float64 sum of the upcast costs); failures agree with SciPy."""
    for b in range(cost.shape[0]):
        x = cost[b].double().numpy()
        if np.isnan(x).any() or (np.isposinf(x).any() if maximize else np.isneginf(x).any()):
            assert status[b] == 1
            continue
        try:
            r, c = scipy.optimize.linear_sum_assignment(x, maximize=maximize)
        except ValueError:
            assert status[b] == 2
            continue
        assert status[b] == 0
        assert np.all(np.diff(rows[b].numpy()) > 0), "row_ind must be ascending"
        assert len(set(cols[b].tolist())) == cols.shape[1], "columns must be distinct"
        assert x[rows[b].numpy(), cols[b].numpy()].sum() == pytest.approx(x[r, c].sum(), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("kind", ["cosine", "planted", "uniform", "int_ties", "constant", "with_inf",
                                  "signed_zeros"])
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (32, 32), (33, 33), (64, 64), (100, 100), (256, 256),
                                   (300, 300), (7, 40), (40, 7), (120, 512), (512, 120)])
def test_identical_to_cpu_and_optimal(kind, shape):
    n, m = shape
    cost = make_cost(kind, 3, n, m, seed=n * 1000 + m)
    rows, cols, status = assert_same_as_cpu(cost)
    assert_optimal(cost, rows, cols, status)


@pytest.mark.parametrize("shape", [(600, 600), (1030, 1030), (16, 2100), (2100, 16), (9, 4500), (4500, 9)])
def test_block_and_global_memory_variants(shape):
    n, m = shape
    for kind in ("cosine", "int_ties"):
        cost = make_cost(kind, 2, n, m, seed=n + 7 * m)
        rows, cols, status = assert_same_as_cpu(cost)
        assert_optimal(cost, rows, cols, status)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_dtypes_and_maximize(dtype, maximize):
    for shape in [(64, 64), (50, 70), (70, 50)]:
        cost = make_cost("cosine", 4, *shape, seed=11).to(dtype)
        rows, cols, status = assert_same_as_cpu(cost, maximize)
        # Exact for the costs as given (the rounded dtype values).
        assert_optimal(cost.double(), rows, cols, status, maximize)


def test_batch_of_mixed_failures():
    cost = make_cost("uniform", 6, 20, 20, seed=3)
    cost[1, 4, 7] = float("nan")
    cost[2, 0, 3] = -math.inf
    cost[3, :, 5] = math.inf  # a forbidden column: infeasible at the warm start
    cost[4, :, :] = math.inf  # every row and column has a finite entry, but only row 0 reaches
    cost[4, :, 0] = torch.rand(20)  # columns 1..: infeasible in the search, not at the warm start
    cost[4, 0, :] = torch.rand(20)
    cost[5, 2, 2] = -math.inf
    cost[5, :, 9] = math.inf  # invalid takes precedence over infeasible
    rows, cols, status = assert_same_as_cpu(cost)
    assert status.tolist() == [0, 1, 1, 2, 2, 1]
    for b in range(1, 6):
        assert (rows[b] == -1).all() and (cols[b] == -1).all()
    assert_optimal(cost[:1], rows[:1], cols[:1], status[:1])
    # maximize: +inf is the invalid one, -inf forbidden.
    mx = -make_cost("uniform", 2, 8, 12, seed=5)
    mx[0, 1, 1] = math.inf
    mx[1, 2, :] = -math.inf
    _, _, st = assert_same_as_cpu(mx, maximize=True)
    assert st.tolist() == [1, 2]


@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 5), (3, 5, 0), (2, 0, 0), (0, 0, 0)])
def test_empty(shape):
    cost = torch.rand(*shape, device="cuda")
    rows, cols, status = op(cost, False)
    k = min(shape[1], shape[2])
    assert rows.shape == (shape[0], k) and cols.shape == (shape[0], k) and status.shape == (shape[0],)
    assert rows.device == cost.device
    assert (status == 0).all()


def test_non_contiguous_inputs():
    base = make_cost("cosine", 3, 80, 90, seed=8)
    views = [base.transpose(1, 2), base[:, ::2, 1::3], base[::2], base.permute(2, 0, 1).contiguous().permute(1, 2, 0)]
    for v in views:
        ref = op(v.contiguous(), False)
        for a, b in zip(ref, op(v.cuda(), False)):
            torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
    # a strided CUDA view (not a copy made on the host)
    dev = base.cuda()
    for v in (dev[:, ::2, 1::3], dev.transpose(1, 2), dev[:, :, :40]):
        ref = op(v.cpu(), False)
        for a, b in zip(ref, op(v, False)):
            torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


def test_deterministic():
    cost = make_cost("int_ties", 8, 200, 200, seed=9).cuda()
    first = op(cost, False)
    for _ in range(3):
        again = op(cost, False)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_current_stream_respected():
    """The op must run on the current stream: behind a long sleep and a copy on a side stream."""
    cost_cpu = make_cost("cosine", 16, 128, 128, seed=12)
    expected = op(cost_cpu, False)
    dev = torch.empty_like(cost_cpu, device="cuda").fill_(float("nan"))  # NaN -> status 1 if read early
    src = cost_cpu.cuda()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on this stream only
        dev.copy_(src)
        rows, cols, status = op(dev, False)
    s.synchronize()
    for a, b in zip(expected, (rows, cols, status)):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    cost = make_cost("uniform", 3, 40, 30, seed=13)
    got = op(cost.to("cuda:1"), False)
    assert all(t.device == torch.device("cuda:1") for t in got)
    for a, b in zip(op(cost, False), got):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


def test_opcheck_cuda():
    for shape in [(2, 6, 6), (2, 5, 8), (2, 8, 5)]:
        cost = torch.rand(*shape, device="cuda")
        torch.library.opcheck(op.default, (cost, False))
        torch.library.opcheck(op.default, (cost.half(), True))


def test_public_api_on_cuda():
    from vicl_fast.ops import linear_sum_assignment, matching_permutation

    cost = make_cost("cosine", 4, 30, 20, seed=14)
    r, c = linear_sum_assignment(cost.cuda())
    assert r.device.type == "cuda"
    rc, cc = linear_sum_assignment(cost)
    assert torch.equal(r.cpu(), rc) and torch.equal(c.cpu(), cc)
    perm = matching_permutation(cost.cuda())
    assert torch.equal(perm.cpu(), matching_permutation(cost))
    bad = cost.clone()
    bad[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"cost\[2\]"):
        linear_sum_assignment(bad.cuda())
