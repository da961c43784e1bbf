"""Exact batched linear sum assignment (vicl_fast.ops.assignment) against independent oracles.

Oracles: SciPy's solver (total cost, float64 sum of the upcast costs) and a
plain-Python transcription of docs/design.md "Solver" (identical indices: the
tie policy the CPU and CUDA kernels share).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vicl_fast import _ext
from vicl_fast.ops import linear_sum_assignment, lsa_backend, matching_permutation
from vicl_fast.ops import assignment as A

HAS_OP = _ext.has_kernel("linear_sum_assignment", "CPU")
needs_op = pytest.mark.skipif(not HAS_OP, reason="vicl_fast._C CPU kernel not built")


# ----------------------------------------------------------------------------- cost generators
def make_cost(kind: str, b: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """(b, n, m) float32 costs of a given structure."""
    if kind == "cosine":  # -cos of random unit vectors (isotropic, RandP-like)
        x = torch.nn.functional.normalize(torch.randn(b, n, 32, generator=gen, dtype=torch.float64), dim=-1)
        y = torch.nn.functional.normalize(torch.randn(b, m, 32, generator=gen, dtype=torch.float64), dim=-1)
        return (-(x @ y.transpose(1, 2))).float()
    if kind == "planted":  # rows are a noisy permutation of the columns
        y = torch.randn(b, m, 16, generator=gen, dtype=torch.float64)
        idx = torch.stack([torch.randperm(m, generator=gen)[: n] if n <= m else
                           torch.randint(0, m, (n,), generator=gen) for _ in range(b)])
        x = y.gather(1, idx[..., None].expand(-1, -1, 16)) + 0.3 * torch.randn(b, n, 16, generator=gen,
                                                                                 dtype=torch.float64)
        return torch.cdist(x, y).float()
    if kind == "uniform":
        return torch.rand(b, n, m, generator=gen)
    if kind == "int_ties":  # few distinct values: many ties
        return torch.randint(0, 4, (b, n, m), generator=gen).float()
    if kind == "constant":
        return torch.full((b, n, m), 2.5)
    if kind == "with_inf":  # ~30% forbidden pairs (may be infeasible; then both must say so)
        c = torch.rand(b, n, m, generator=gen)
        return c.masked_fill(torch.rand(b, n, m, generator=gen) < 0.3, math.inf)
    raise KeyError(kind)


KINDS = ["cosine", "planted", "uniform", "int_ties", "constant", "with_inf"]


# ----------------------------------------------------------------------------- oracles
def scipy_solve(x: np.ndarray, maximize: bool = False):
    """SciPy on one float64 matrix: (status, total) with the op's status codes."""
    if np.isnan(x).any() or (np.isposinf(x) if maximize else np.isneginf(x)).any():
        return A.STATUS_INVALID, None
    try:
        r, c = scipy.optimize.linear_sum_assignment(x, maximize=maximize)
    except ValueError:
        return A.STATUS_INFEASIBLE, None
    return A.STATUS_OK, float(x[r, c].sum())


def upcast(cost: torch.Tensor) -> np.ndarray:
    """The costs the solver optimises: float64 stays, other floats go through float32 (exact)."""
    return (cost if cost.dtype == torch.float64 else cost.float()).double().numpy()


def assert_optimal(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, maximize: bool = False):
    """rows/cols (B, K) form a valid matching of cost (B, N, M) with SciPy's optimal total."""
    x = upcast(cost)
    b, n, m = x.shape
    k = min(n, m)
    assert rows.shape == cols.shape == (b, k)
    assert rows.dtype == cols.dtype == torch.int64
    for i in range(b):
        st, ref = scipy_solve(x[i], maximize)
        assert st == A.STATUS_OK, f"oracle says matrix {i} has status {st}"
        r, c = rows[i].numpy(), cols[i].numpy()
        assert (np.diff(r) > 0).all(), "row_ind must be strictly ascending"
        assert len(set(c.tolist())) == k, "a column is used twice"
        assert ((r >= 0) & (r < n)).all() and ((c >= 0) & (c < m)).all()
        got = float(x[i][r, c].sum())
        scale = max(1.0, float(np.abs(x[i][np.isfinite(x[i])]).max(initial=0.0))) * max(k, 1)
        assert math.isfinite(got)
        assert abs(got - ref) <= 1e-12 * scale, f"matrix {i}: total {got!r} != SciPy {ref!r}"


def design_reference(work: list[list[float]]):
    """Plain-Python transcription of docs/design.md "Solver" steps 2-4 on a work matrix R x C (R <= C).

    Returns (status, col4row, row4col). Python floats are IEEE doubles and the
    expressions keep the design's order, so the answer must match bit for bit.
    """
    R, C = len(work), len(work[0]) if work else 0
    inf = math.inf
    if any(math.isnan(x) or x == -inf for row in work for x in row):
        return 1, None, None
    u, v = [0.0] * R, [0.0] * C
    row4col, col4row = [-1] * C, [-1] * R
    if R == C:
        for j in range(C):
            best, arg = inf, -1
            for i in range(R):
                if work[i][j] < best:
                    best, arg = work[i][j], i
            v[j] = best
            if arg < 0:
                return 2, None, None
            if col4row[arg] < 0:
                col4row[arg], row4col[j] = j, arg
    else:
        for i in range(R):
            best, arg = inf, -1
            for j in range(C):
                if work[i][j] < best:
                    best, arg = work[i][j], j
            u[i] = best
            if arg < 0:
                return 2, None, None
            if row4col[arg] < 0:
                row4col[arg], col4row[i] = i, arg
    for cur in range(R):
        if col4row[cur] >= 0:
            continue
        d, path, scanned, order = [inf] * C, [-1] * C, [False] * C, []
        min_val, i = 0.0, cur
        while True:
            for j in range(C):
                if not scanned[j]:
                    r = ((min_val + work[i][j]) - u[i]) - v[j]
                    if r < d[j]:
                        d[j], path[j] = r, i
            js = min((j for j in range(C) if not scanned[j]), key=lambda j: (d[j], row4col[j] != -1, j))
            if d[js] == inf:
                return 2, None, None
            min_val = d[js]
            scanned[js] = True
            order.append(js)
            if row4col[js] == -1:
                sink = js
                break
            i = row4col[js]
        u[cur] += min_val
        for j in order[:-1]:
            u[row4col[j]] += min_val - d[j]
        for j in order:
            v[j] -= min_val - d[j]
        j = sink
        while True:
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    return 0, col4row, row4col


def design_answer(cost2d: torch.Tensor, maximize: bool):
    """(status, row_ind, col_ind) of the design algorithm on one (N, M) matrix."""
    x = upcast(cost2d[None])[0]
    if maximize:
        x = -x
    n, m = x.shape
    k = min(n, m)
    work = x.T.tolist() if n > m else x.tolist()
    st, col4row, row4col = design_reference(work)
    if st != 0:
        return st, [-1] * k, [-1] * k
    if n <= m:
        return 0, list(range(k)), col4row
    pairs = [(j, r) for j, r in enumerate(row4col) if r >= 0]
    return 0, [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------- optimality
SHAPES = [(1, 1), (2, 2), (3, 3), (5, 5), (17, 17), (64, 64), (100, 100), (5, 9), (9, 5), (30, 64), (64, 30)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_total_cost_equals_scipy(kind, shape):
    gen = torch.Generator().manual_seed(1000 * KINDS.index(kind) + 31 * shape[0] + shape[1])
    cost = make_cost(kind, 4, *shape, gen)
    statuses = [scipy_solve(x)[0] for x in upcast(cost)]
    rows, cols = linear_sum_assignment(cost, check=False)
    ok = [i for i, s in enumerate(statuses) if s == A.STATUS_OK]
    for i, s in enumerate(statuses):
        if s != A.STATUS_OK:  # only with_inf can be infeasible
            assert (rows[i] == -1).all() and (cols[i] == -1).all()
    if ok:
        assert_optimal(cost[ok], rows[ok], cols[ok])


@pytest.mark.parametrize("kind,n", [("cosine", 512), ("uniform", 256), ("planted", 300), ("int_ties", 200)])
def test_large(kind, n):
    gen = torch.Generator().manual_seed(n)
    cost = make_cost(kind, 1, n, n, gen)
    assert_optimal(cost, *linear_sum_assignment(cost))


def test_large_rectangular_both_ways():
    gen = torch.Generator().manual_seed(7)
    cost = make_cost("cosine", 2, 120, 400, gen)
    assert_optimal(cost, *linear_sum_assignment(cost))
    cost_t = cost.transpose(1, 2).contiguous()
    assert_optimal(cost_t, *linear_sum_assignment(cost_t))


def test_offset_costs_stay_exact():
    # float32 duals fail here (notes/hungarian.md): costs offset by +1000.
    gen = torch.Generator().manual_seed(3)
    cost = make_cost("cosine", 8, 64, 64, gen) + 1000.0
    assert_optimal(cost, *linear_sum_assignment(cost))


@given(
    b=st.integers(0, 3), n=st.integers(0, 12), m=st.integers(0, 12), levels=st.integers(1, 6),
    p_inf=st.sampled_from([0.0, 0.0, 0.15, 0.4]), maximize=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_matches_design_reference_and_scipy(b, n, m, levels, p_inf, maximize, seed):
    """Small integer costs (many ties) with forbidden pairs: identical to the design, optimal as SciPy."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, levels, (b, n, m), generator=gen).float() * 0.5
    forbid = torch.rand(b, n, m, generator=gen) < p_inf
    cost = cost.masked_fill(forbid, -math.inf if maximize else math.inf)
    rows, cols = linear_sum_assignment(cost, maximize, check=False)
    k = min(n, m)
    assert rows.shape == cols.shape == (b, k)
    for i in range(b):
        st_ref, r_ref, c_ref = design_answer(cost[i], maximize)
        if HAS_OP:  # the SciPy fallback has SciPy's own tie policy
            assert rows[i].tolist() == r_ref and cols[i].tolist() == c_ref
        st_sp, total = scipy_solve(upcast(cost[i:i + 1])[0], maximize)
        assert st_sp == st_ref
        if st_sp == A.STATUS_OK and k:
            got = float(upcast(cost[i:i + 1])[0][rows[i].numpy(), cols[i].numpy()].sum())
            assert got == total


@needs_op
@pytest.mark.parametrize("kind", ["cosine", "uniform", "int_ties", "planted"])
@pytest.mark.parametrize("shape", [(12, 12), (7, 12), (12, 7)], ids=str)
def test_indices_match_design_reference_float(kind, shape):
    gen = torch.Generator().manual_seed(11)
    cost = make_cost(kind, 3, *shape, gen)
    rows, cols = linear_sum_assignment(cost)
    for i in range(3):
        st, r, c = design_answer(cost[i], False)
        assert st == 0 and rows[i].tolist() == r and cols[i].tolist() == c


def test_constant_matrix_gives_identity():
    # Tie policy: free columns first, then the lowest index (SciPy also returns the identity here).
    rows, cols = linear_sum_assignment(torch.ones(2, 6, 6))
    assert (rows == torch.arange(6)).all() and (cols == torch.arange(6)).all()


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)], ids=str)
def test_maximize(shape):
    gen = torch.Generator().manual_seed(5)
    cost = make_cost("uniform", 5, *shape, gen)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    assert_optimal(cost, rows, cols, maximize=True)
    # maximize == minimize the negation (identical answer by design).
    r2, c2 = linear_sum_assignment(-cost)
    assert torch.equal(rows, r2) and torch.equal(cols, c2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    gen = torch.Generator().manual_seed(6)
    cost = make_cost("cosine", 4, 40, 40, gen).to(dtype)
    rows, cols = linear_sum_assignment(cost)
    assert_optimal(cost, rows, cols)  # optimal for the upcast costs
    if dtype != torch.float64:  # half types compute on their exact float32 value
        r2, c2 = linear_sum_assignment(cost.float())
        assert torch.equal(rows, r2) and torch.equal(cols, c2)
    rect = make_cost("uniform", 3, 30, 12, gen).to(dtype).transpose(1, 2)  # (3, 12, 30) strided view
    rows, cols = linear_sum_assignment(rect, maximize=True)
    assert_optimal(rect, rows, cols, maximize=True)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    big = make_cost("uniform", 6, 40, 50, gen)
    views = {
        "transposed": big.transpose(1, 2),  # (6, 50, 40) read with strides
        "sliced": big[::2, 1::2, ::3],
        "expanded": big[:1].expand(3, -1, -1),  # batch stride 0
        "permuted": big.permute(1, 0, 2),
    }
    for name, v in views.items():
        assert not v.is_contiguous(), name
        rows, cols = linear_sum_assignment(v)
        r2, c2 = linear_sum_assignment(v.contiguous())
        assert torch.equal(rows, r2) and torch.equal(cols, c2), name
        assert_optimal(v.contiguous(), rows, cols)


def test_two_d_input():
    c = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = linear_sum_assignment(c)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]


@pytest.mark.parametrize("shape,k", [((0, 4, 4), 4), ((3, 0, 5), 0), ((3, 5, 0), 0), ((2, 0, 0), 0)])
def test_empty(shape, k):
    rows, cols = linear_sum_assignment(torch.zeros(shape))
    assert rows.shape == cols.shape == (shape[0], k) and rows.dtype == torch.int64
    r2, c2 = linear_sum_assignment(torch.zeros(shape[1:]))
    assert r2.shape == (k,)


# ----------------------------------------------------------------------------- bad inputs
def test_nan_and_neg_inf_raise_naming_the_matrix():
    cost = torch.rand(3, 4, 4)
    cost[1, 2, 3] = float("nan")
    # SciPy's text first, then the failed matrix.
    invalid = r"^matrix contains invalid numeric entries"
    with pytest.raises(ValueError, match=invalid + r" \(cost\[1\] contains NaN or -inf"):
        linear_sum_assignment(cost)
    cost = torch.rand(3, 4, 4)
    cost[2, 0, 0] = -math.inf
    with pytest.raises(ValueError, match=invalid + r" \(cost\[2\] contains NaN or -inf"):
        linear_sum_assignment(cost)
    cost = torch.rand(3, 4, 4)
    cost[0, 0, 0] = math.inf  # forbidden when minimising, invalid when maximising
    linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=invalid + r" \(cost\[0\] contains NaN or \+inf"):
        linear_sum_assignment(cost, maximize=True)
    with pytest.raises(ValueError, match=invalid + "$"):  # 2-D: SciPy's text exactly
        linear_sum_assignment(cost[0], maximize=True)


@pytest.mark.parametrize("which", ["inf_row", "inf_col", "hall", "rect_inf_row", "rect_hall"])
def test_infeasible_raises(which):
    n, m = (4, 4) if not which.startswith("rect") else (3, 6)
    cost = torch.rand(2, n, m)
    bad = cost[1]
    if which in ("inf_row", "rect_inf_row"):
        bad[1, :] = math.inf
    elif which == "inf_col":
        bad[:, 2] = math.inf
    else:  # rows 0 and 1 may only use column 0
        bad[0:2, 1:] = math.inf
    assert scipy_solve(upcast(cost)[1])[0] == A.STATUS_INFEASIBLE
    with pytest.raises(ValueError, match=r"^cost matrix is infeasible \(cost\[1\]"):
        linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=r"^cost matrix is infeasible$"):  # 2-D: SciPy's text exactly
        linear_sum_assignment(cost[1])
    rows, cols = linear_sum_assignment(cost, check=False)
    assert (rows[1] == -1).all() and (cols[1] == -1).all()
    assert_optimal(cost[:1], rows[:1], cols[:1])  # the other matrix is still solved


def test_invalid_takes_precedence_over_infeasible():
    cost = torch.rand(1, 3, 3)
    cost[0, :, 0] = math.inf
    cost[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_sum_assignment(cost)


def test_type_and_shape_errors():
    # Integer tensors and NumPy arrays are accepted since issue 14 (tests/ops/test_assignment_scipy.py);
    # complex tensors are refused, and shapes get SciPy's message.
    rows, cols = linear_sum_assignment(torch.ones(2, 3, 3, dtype=torch.int64))
    assert rows.shape == (2, 3) and rows.dtype == torch.int64
    rows, cols = linear_sum_assignment(np.ones((3, 3)))
    assert isinstance(rows, np.ndarray) and rows.dtype == np.int64
    with pytest.raises(TypeError, match="Cannot cast array data"):
        linear_sum_assignment(torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        matching_permutation(np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"^expected a matrix \(2-D array\), got a 1 array$"):
        linear_sum_assignment(torch.ones(3))
    with pytest.raises(ValueError, match=r"^expected a matrix \(2-D array\), got a 4 array.*\(B, N, M\)"):
        linear_sum_assignment(torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match="P >= Q"):
        matching_permutation(torch.ones(1, 3, 5))


def test_gradients_do_not_break_it():
    cost = torch.rand(2, 5, 5, requires_grad=True)
    rows, cols = linear_sum_assignment(cost)
    (cost[torch.arange(2)[:, None], rows, cols].sum()).backward()  # gradient flows through the gather
    assert cost.grad is not None and cost.grad.sum() == 10


# ----------------------------------------------------------------------------- matching_permutation
@pytest.mark.parametrize("p,q", [(16, 16), (20, 12)])
def test_matching_permutation_aligns_prompt_to_query(p, q):
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(3, q, 8, generator=gen)
    true = torch.stack([torch.randperm(p, generator=gen) for _ in range(3)])  # prompt[true[:, :q]] ~ query
    prompt = torch.randn(3, p, 8, generator=gen)
    prompt.scatter_(1, true[:, :q, None].expand(-1, -1, 8), query + 0.01 * torch.randn(3, q, 8, generator=gen))
    pn = torch.nn.functional.normalize(prompt, dim=-1)
    qn = torch.nn.functional.normalize(query, dim=-1)
    cost = -(pn @ qn.transpose(1, 2))  # (B, P, Q)
    perm = matching_permutation(cost)
    assert perm.shape == (3, q) and perm.dtype == torch.int64
    assert torch.equal(perm, true[:, :q])
    aligned = prompt.gather(1, perm[..., None].expand(-1, -1, 8))
    assert torch.allclose(aligned, query, atol=0.1)
    rows, cols = linear_sum_assignment(cost)
    assert torch.equal(perm.gather(1, cols), rows)  # same matching as linear_sum_assignment
    assert torch.equal(matching_permutation(-cost, maximize=True), perm)
    assert torch.equal(matching_permutation(cost[0]), perm[0])


def test_matching_permutation_check_false_marks_failures():
    cost = torch.rand(2, 4, 4)
    cost[0, 0, 0] = float("nan")
    perm = matching_permutation(cost, check=False)
    assert (perm[0] == -1).all() and sorted(perm[1].tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- backends
def test_scipy_fallback_agrees(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    cost = torch.cat([make_cost("cosine", 3, 30, 30, gen), make_cost("int_ties", 3, 30, 30, gen)])
    cost_rect = make_cost("uniform", 3, 12, 20, gen)
    ref = [linear_sum_assignment(c) for c in (cost, cost_rect, cost_rect.transpose(1, 2))]
    monkeypatch.setenv("VICL_FAST_LSA_BACKEND", "scipy")
    assert lsa_backend("cpu") == "scipy"
    for c, (r0, c0) in zip((cost, cost_rect, cost_rect.transpose(1, 2)), ref):
        rows, cols = linear_sum_assignment(c)
        assert_optimal(c, rows, cols)
        assert torch.equal(rows, r0)  # row_ind is the same canonical range
        x = upcast(c)
        for i in range(c.shape[0]):  # equal totals (indices may differ on ties)
            assert x[i][rows[i], cols[i]].sum() == pytest.approx(x[i][r0[i], c0[i]].sum(), rel=1e-12, abs=1e-12)
    # Same validation and statuses.
    bad = torch.rand(3, 4, 4)
    bad[1, 0, 0] = float("nan")
    bad[2, :, 1] = math.inf
    with pytest.raises(ValueError, match=r"^matrix contains invalid numeric entries \(cost\[1\] contains"):
        linear_sum_assignment(bad)
    _, _, status = A._solve(bad, False)
    assert status.tolist() == [0, 1, 2]
    monkeypatch.setenv("VICL_FAST_LSA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="VICL_FAST_LSA_BACKEND"):
        linear_sum_assignment(bad)


@needs_op
def test_op_status_codes():
    bad = torch.rand(3, 4, 4)
    bad[1, 0, 0] = float("nan")
    bad[2, :, 1] = math.inf
    rows, cols, status = torch.ops.vicl_fast.linear_sum_assignment(bad, False)
    assert status.dtype == torch.int32 and status.tolist() == [0, 1, 2]
    assert (rows[1:] == -1).all() and (cols[1:] == -1).all()


_ISA_SCRIPT = r"""
import hashlib, torch
torch.manual_seed(0)
h = hashlib.sha256()
for n, m in [(40, 40), (33, 70), (70, 33), (130, 130)]:
    for cost in (torch.randint(0, 3, (4, n, m)).float(), torch.rand(4, n, m), torch.randn(4, n, m).double()):
        r, c, s = torch.ops.vicl_fast.linear_sum_assignment(cost, False)
        h.update(r.numpy().tobytes()); h.update(c.numpy().tobytes()); h.update(s.numpy().tobytes())
print(h.hexdigest())
"""


@needs_op
def test_every_isa_gives_identical_answers():
    """The AVX-512, AVX2 and scalar inner loops must return the same bits (tie policy included)."""
    script = "import vicl_fast\n" + _ISA_SCRIPT
    digests = {}
    for isa in ("scalar", "avx2", "avx512"):
        env = {**os.environ, "VICL_FAST_LSA_ISA": isa, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        digests[isa] = out.stdout.strip()
    assert len(set(digests.values())) == 1, digests


@needs_op
def test_threads_give_identical_answers():
    gen = torch.Generator().manual_seed(12)
    cost = make_cost("int_ties", 8, 50, 50, gen)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_sum_assignment(cost)
        torch.set_num_threads(max(2, prev))
        many = linear_sum_assignment(cost)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_op
@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 4, 7), (2, 7, 4)], ids=str)
def test_opcheck(shape):
    cost = torch.rand(shape)
    torch.library.opcheck(torch.ops.vicl_fast.linear_sum_assignment.default, (cost, False))
    torch.library.opcheck(torch.ops.vicl_fast.linear_sum_assignment.default, (cost.double(), True))


@needs_op
def test_torch_compile():
    torch._dynamo.reset()

    def f(x):
        rows, cols = linear_sum_assignment(x, check=False)
        return x.gather(2, cols[..., None]).sum()

    def g(x):
        perm = matching_permutation(x)
        return perm * 2

    cost = torch.rand(2, 8, 8)
    full = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(full(cost), f(cost))
    cost2 = torch.rand(3, 10, 6)  # new shape: dynamic recompile with symbolic sizes
    assert torch.allclose(full(cost2), f(cost2))
    assert torch.equal(torch.compile(g, backend="aot_eager")(cost), g(cost))


@pytest.mark.gpu
def test_cuda_input_returns_cuda_output():
    cost = torch.rand(4, 20, 20)
    rows, cols = linear_sum_assignment(cost.cuda())
    assert rows.device.type == "cuda" and cols.device.type == "cuda"
    r0, c0 = linear_sum_assignment(cost)
    assert torch.equal(rows.cpu(), r0) and torch.equal(cols.cpu(), c0)
