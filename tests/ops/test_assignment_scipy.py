"""vicl_fast.ops.linear_sum_assignment as a drop-in for scipy.optimize.linear_sum_assignment (issue 14).

Every case of SciPy's own tests of the function (scipy/optimize/tests/
test_linear_assignment.py, with the small cases it borrows from
scipy/sparse/csgraph/tests/test_matching.py), rewritten against our function
and run on the same input through SciPy: the same outcome (the same exception
type and text, or an optimal matching with SciPy's return types and total
cost). Input kinds: nested lists, NumPy arrays, torch tensors (SciPy accepts
all three; for NumPy and lists we return NumPy arrays, for tensors tensors).
Then what SciPy's tests leave out: integer and bool tensors, layouts and
dtypes of NumPy arrays, +-inf with and without ``maximize``, empty matrices,
``check=False`` and the batched messages.

Each test runs on both backends (the compiled op, where built, and the SciPy
fallback), whose validation and messages must agree.
"""
from __future__ import annotations

import math
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal
from scipy.optimize import linear_sum_assignment as scipy_lsa
from scipy.sparse import random_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from vicl_fast.ops import assignment as A
from vicl_fast.ops import linear_sum_assignment as lsa

INF = math.inf
KINDS = ("list", "numpy", "torch")
NOT_A_MATRIX = r"^expected a matrix \(2-D array\), got a {} array$"
INVALID = "matrix contains invalid numeric entries"
INFEASIBLE = "cost matrix is infeasible"


@pytest.fixture(autouse=True, params=["auto", "scipy"])
def backend(request, monkeypatch):
    monkeypatch.setenv("VICL_FAST_LSA_BACKEND", request.param)
    return request.param


# ----------------------------------------------------------------------------- helpers
def make(a, kind: str):
    """The matrix ``a`` (anything np.array takes) as a nested list, a NumPy array or a CPU tensor."""
    a = np.array(a)
    if kind == "list":
        return a.tolist()
    if kind == "numpy":
        return a
    return torch.from_numpy(a.copy())


def outcome(fn, x, **kw):
    """("ok", result) or ("raise", exception type, message)."""
    try:
        return ("ok", fn(x, **kw))
    except Exception as e:  # noqa: BLE001 - any exception must match SciPy's
        return ("raise", type(e), str(e))


def dense(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def like_scipy(x, maximize=False, **kw):
    """Solve ``x`` with us and with SciPy; assert the same outcome. Our (rows, cols) as NumPy, or None."""
    ref = outcome(scipy_lsa, x, maximize=maximize)
    got = outcome(lsa, x, maximize=maximize, **kw)
    if ref[0] == "raise":
        assert got == ref, f"SciPy raised {ref[1].__name__}({ref[2]!r}), we gave {got}"
        return None
    assert got[0] == "ok", f"SciPy solved it, we raised {got[1].__name__}({got[2]!r})"
    (r0, c0), (r, c) = ref[1], got[1]
    if isinstance(x, torch.Tensor):
        for t in (r, c):
            assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device == x.device
        r, c = r.cpu().numpy(), c.cpu().numpy()
    else:
        for t, t0 in ((r, r0), (c, c0)):
            assert type(t) is np.ndarray, type(t)  # plain arrays, as SciPy (even for np.matrix input)
            assert t.dtype == t0.dtype and t.shape == t0.shape and t.ndim == 1
    assert r.shape == c.shape == r0.shape
    cost = dense(x)
    assert (np.diff(r) > 0).all(), "row_ind must be strictly ascending"
    assert len(set(c.tolist())) == len(c), "a column is used twice"
    if len(r):
        assert r.min() >= 0 and r.max() < cost.shape[0] and c.min() >= 0 and c.max() < cost.shape[1]
    total, ref_total = math.fsum(cost[r, c]), math.fsum(cost[r0, c0])
    assert math.isfinite(total)
    assert math.isclose(total, ref_total, rel_tol=1e-12, abs_tol=1e-12), (total, ref_total)
    return r, c


def as_numpy(pair):
    return tuple(t.cpu().numpy() if isinstance(t, torch.Tensor) else t for t in pair)


# ------------------------------------------------------------------------ SciPy's test_linear_assignment.py
@pytest.mark.parametrize("kind", KINDS)
def test_input_shape(kind):
    # SciPy: a 1-D list is not a matrix.
    x = make([1, 2, 3], kind)
    with pytest.raises(ValueError, match=NOT_A_MATRIX.format(1)):
        lsa(x)
    like_scipy(x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(), (0,), (4,)], ids=str)
def test_input_shape_0d_1d(kind, shape):
    x = make(np.arange(math.prod(shape), dtype=float).reshape(shape), kind)
    with pytest.raises(ValueError, match=NOT_A_MATRIX.format(len(shape))):
        lsa(x)
    like_scipy(x)


@pytest.mark.parametrize("kind", ["list", "numpy"])
@pytest.mark.parametrize("shape", [(2, 3, 3), (0, 2, 2), (1, 1, 1, 1)], ids=str)
def test_input_shape_nd_numpy_and_list_follow_scipy(kind, shape):
    x = make(np.zeros(shape), kind)  # a (0, 2, 2) list is [], 1-D
    with pytest.raises(ValueError, match=NOT_A_MATRIX.format(np.asarray(x).ndim)):
        lsa(x)
    like_scipy(x)


def test_input_shape_torch_batches_and_4d():
    # A 3-D tensor stays a batch (our extension); 4-D gets SciPy's text plus the batch hint.
    rows, cols = lsa(torch.ones(2, 3, 3))
    assert rows.shape == cols.shape == (2, 3)
    with pytest.raises(ValueError, match=r"^expected a matrix \(2-D array\), got a 4 array.*\(B, N, M\)"):
        lsa(torch.ones(1, 2, 3, 3))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_input_object():
    # SciPy: a list, np.asarray of it and np.matrix of it give the same answer.
    C = [[1, 2, 3], [4, 5, 6]]
    from_list = lsa(C)
    assert_array_equal(from_list, lsa(np.asarray(C)))
    assert_array_equal(from_list, lsa(np.matrix(C)))
    assert_array_equal(from_list, as_numpy(lsa(torch.tensor(C))))
    assert_array_equal(from_list, lsa(tuple(tuple(r) for r in C)))
    for x in (C, np.asarray(C), np.matrix(C), torch.tensor(C), np.asarray(C, dtype=float).tolist()):
        like_scipy(x)


@pytest.mark.parametrize("kind", KINDS)
def test_input_bool(kind):
    # SciPy: a bool identity is solved like the float identity.
    I = np.identity(3)
    assert_array_equal(as_numpy(lsa(make(I.astype(np.bool_), kind))), as_numpy(lsa(make(I, kind))))
    like_scipy(make(I.astype(np.bool_), kind))
    like_scipy(make(I.astype(np.bool_), kind), maximize=True)
    rng = np.random.default_rng(0)
    b = rng.random((6, 9)) < 0.5
    like_scipy(make(b, kind))
    like_scipy(make(b.T, kind), maximize=True)


def test_input_string():
    # SciPy: a str array cannot be cast to float64 ("safe" rule).
    I = np.identity(3).astype(str)
    with pytest.raises(TypeError, match="Cannot cast array data"):
        lsa(I)
    like_scipy(I)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, object, np.longdouble, "datetime64[s]",
                                   "timedelta64[s]", "S3", "U1"], ids=str)
def test_numpy_dtypes_scipy_rejects(dtype):
    x = np.identity(3).astype(dtype)
    ref = outcome(scipy_lsa, x)
    if ref[0] == "ok":  # e.g. a platform where longdouble is float64
        like_scipy(x)
        return
    assert ref[1] is TypeError
    with pytest.raises(TypeError, match="^Cannot cast array data from dtype"):
        lsa(x)
    like_scipy(x)


@pytest.mark.parametrize("kind", KINDS)
def test_input_nan(kind):
    x = make(np.diag([np.nan, 1, 1]), kind)
    with pytest.raises(ValueError, match=f"^{INVALID}$"):
        lsa(x)
    like_scipy(x)
    like_scipy(x, maximize=True)


@pytest.mark.parametrize("kind", KINDS)
def test_input_neginf(kind):
    x = make(np.diag([1, -INF, 1]), kind)
    with pytest.raises(ValueError, match=f"^{INVALID}$"):
        lsa(x)
    like_scipy(x)


@pytest.mark.parametrize("kind", KINDS)
def test_input_inf(kind):
    I = np.identity(3)
    I[:, 0] = INF
    x = make(I, kind)
    with pytest.raises(ValueError, match=f"^{INFEASIBLE}$"):
        lsa(x)
    like_scipy(x)


@pytest.mark.parametrize("kind", KINDS)
def test_constant_cost_matrix(kind):
    # SciPy #11602: a constant matrix gives the identity.
    n = 8
    row_ind, col_ind = as_numpy(lsa(make(np.ones((n, n)), kind)))
    assert_array_equal(row_ind, np.arange(n))
    assert_array_equal(col_ind, np.arange(n))
    like_scipy(make(np.ones((n, n)), kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 0), (2, 0), (0, 3), (3, 0), (0, 2)], ids=str)
def test_trivial_cost(kind, shape):
    # SciPy: empty matrices give empty answers (a (0, k) matrix as a list is [], 1-D: SciPy's error).
    x = make(np.empty(shape), kind)
    res = like_scipy(x)
    if kind == "list" and shape[0] == 0:
        assert res is None
        return
    rows, cols = lsa(x)
    assert len(rows) == 0 and len(cols) == 0
    if kind == "torch":
        assert rows.dtype == cols.dtype == torch.int64 and rows.shape == (0,)
    else:
        r0, _ = scipy_lsa(x)
        assert type(rows) is np.ndarray and rows.dtype == cols.dtype == r0.dtype and rows.shape == (0,)


# SciPy's small cases (scipy/sparse/csgraph/tests/test_matching.py): cost, the cost of each row's match.
SMALL_CASES = [
    ([[400, 150, 400], [400, 450, 600], [300, 225, 300]], [150, 400, 300]),
    ([[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]], [150, 2, 300]),
    ([[10, 10, 8], [9, 8, 1], [9, 7, 4]], [10, 1, 7]),
    ([[10, 10, 8, 11], [9, 8, 1, 1], [9, 7, 4, 10]], [10, 1, 4]),
    ([[10, INF, INF], [INF, INF, 1], [INF, 7, INF]], [10, 1, 7]),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("case", range(len(SMALL_CASES)))
def test_small_inputs(kind, sign, case):
    cost, per_row = SMALL_CASES[case]
    a = sign * np.array(cost, dtype=np.float64)
    expected = sign * np.array(per_row, dtype=np.float64)
    maximize = sign == -1
    r, c = like_scipy(make(a, kind), maximize=maximize)
    assert_array_equal(r, np.sort(r))
    assert_array_equal(a[r, c], expected)
    # Transposed (for tensors a strided view, read without a copy).
    xt = make(a, kind).T if kind == "torch" else make(a.T, kind)
    r, c = like_scipy(xt, maximize=maximize)
    assert_array_equal(r, np.sort(r))
    assert_array_equal(np.sort(a.T[r, c]), np.sort(expected))


def test_two_methods_give_same_result_on_many_sparse_inputs():
    # SciPy: 100 sparse 100x100 problems (a third infeasible) against min_weight_full_bipartite_matching.
    rng = np.random.default_rng(12342309)
    mats, feasible = [], []
    for _ in range(100):
        sparse = random_array((100, 100), density=0.06, rng=rng,
                              data_sampler=lambda size: rng.integers(1, 100, size))
        full = np.full(sparse.shape, INF)  # csgraph's missing edges are forbidden pairs
        full[sparse.row, sparse.col] = sparse.data
        sparse = sparse.tocsr()
        try:
            r, c = lsa(full)
            ours = full[r, c].sum()
        except ValueError as e:
            assert str(e) == INFEASIBLE
            ours = None
        try:
            r, c = min_weight_full_bipartite_matching(sparse)
            theirs = sparse[r, c].sum()
        except ValueError:
            theirs = None
        assert (ours is None) == (theirs is None)
        if ours is not None:
            assert ours == theirs
        like_scipy(full)
        mats.append(full)
        feasible.append(ours is not None)
    assert 10 < sum(feasible) < 90  # both outcomes are exercised
    # The same problems as one batch: -1 exactly on the infeasible ones, and the first is named.
    batch = torch.from_numpy(np.stack(mats))
    rows, cols = lsa(batch, check=False)
    for i, ok in enumerate(feasible):
        if ok:
            assert (rows[i] >= 0).all() and (cols[i] >= 0).all()
        else:
            assert (rows[i] == -1).all() and (cols[i] == -1).all()
    first = feasible.index(False)
    with pytest.raises(ValueError, match=rf"^{INFEASIBLE} \(cost\[{first}\]"):
        lsa(batch)


# ----------------------------------------------------------------------------- beyond SciPy's tests
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                                   torch.int64])
def test_integer_and_bool_tensors(dtype):
    gen = torch.Generator().manual_seed(3)
    lo = 0 if dtype in (torch.bool, torch.uint8) else -50
    hi = 2 if dtype == torch.bool else 100
    for shape in [(7, 7), (5, 9), (9, 5)]:
        x = torch.randint(lo, hi, shape, generator=gen).to(dtype)
        for maximize in (False, True):
            like_scipy(x, maximize=maximize)
            rows, cols = lsa(x, maximize=maximize)
            r64, c64 = lsa(x.double(), maximize=maximize)  # ints are solved as float64, exactly
            assert torch.equal(rows, r64) and torch.equal(cols, c64)
    batch = torch.randint(lo, hi, (4, 6, 6), generator=gen).to(dtype)
    rows, cols = lsa(batch)
    r64, c64 = lsa(batch.double())
    assert torch.equal(rows, r64) and torch.equal(cols, c64)


def test_large_int64_tensor_is_exact_below_2_53():
    big = 2 ** 52
    x = torch.tensor([[big, big + 1], [big + 3, big]], dtype=torch.int64)
    rows, cols = lsa(x)
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]
    like_scipy(x)


def test_complex_tensor_is_rejected():
    # SciPy drops the imaginary part of a complex tensor (with a ComplexWarning); we refuse it, as SciPy
    # refuses complex NumPy arrays.
    with pytest.raises(TypeError, match=r"^Cannot cast array data from dtype\('complex64'\) to "
                                        r"dtype\('float64'\)"):
        lsa(torch.eye(3, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64,
                                   np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (7, 4)], ids=str)
def test_numpy_dtypes(dtype, shape):
    rng = np.random.default_rng(4)
    if np.dtype(dtype).kind in "biu":
        x = rng.integers(0, 2 if dtype == np.bool_ else 60, shape).astype(dtype)
    else:
        x = (rng.standard_normal(shape) * 10).astype(dtype)
    for maximize in (False, True):
        r, c = like_scipy(x, maximize=maximize)
        # The same answer as our tensor path on the exact float64 values.
        rt, ct = lsa(torch.from_numpy(x.astype(np.float64)), maximize=maximize)
        assert_array_equal(r, rt.numpy())
        assert_array_equal(c, ct.numpy())


@pytest.mark.parametrize("x", [
    [[1, 2], [3, 4]],
    ((1.5, 2), (3, -4)),
    [[True, False], [False, True]],
    [[1, None], [2, 3]],  # None -> NaN: invalid
    [["1", "2"], ["3", "4"]],  # numeric strings are converted, like float("1")
    [["a", "b"], ["c", "d"]],
    [[1, 2], [3]],  # ragged
    [[1j, 1], [2, 3]],
    [[10 ** 400, 1], [1, 1]],
    [[Decimal(1), Fraction(1, 3)], [Decimal("-2.5"), 4]],
    [[2 ** 70, 1], [1, 2]],
    [np.array([1, 2]), np.array([3, 4])],
    [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])],
    [[]],
    [],
    5.0,
    None,
    "ab",
    {1, 2},
], ids=lambda x: repr(x)[:24])
def test_array_likes_like_scipy(x):
    like_scipy(x)


def test_numpy_scalars_and_memoryview_like_scipy():
    for x in (np.float64(1.0), np.str_("a"), np.int64(3), memoryview(np.eye(3)), memoryview(np.arange(4.0))):
        like_scipy(x)


def test_numpy_return_types():
    x = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    rows, cols = lsa(x)
    r0, c0 = scipy_lsa(x)
    assert type(rows) is type(cols) is np.ndarray
    assert rows.dtype == r0.dtype == np.int64 and cols.dtype == c0.dtype
    assert rows.flags.c_contiguous and cols.flags.c_contiguous
    assert_array_equal(rows, r0)
    assert_array_equal(cols, c0)
    assert x[rows, cols].sum() == 5


LAYOUTS = {
    "fortran": lambda a: np.asfortranarray(a),
    "transposed": lambda a: np.ascontiguousarray(a.T).T,
    "sliced": lambda a: np.repeat(np.repeat(a, 2, 0), 3, 1)[::2, 1::3],
    "negative_strides": lambda a: np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1],
    "big_endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "read_only": lambda a: _read_only(a),
    "broadcast": lambda a: np.broadcast_to(a[:1], a.shape),
    "matrix": lambda a: np.asmatrix(a),
}


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int32])
@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)], ids=str)
def test_numpy_layouts(layout, dtype, shape):
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(shape) * 7).astype(dtype)
    x = LAYOUTS[layout](base)
    assert np.array_equal(np.asarray(x), base if layout != "broadcast" else np.broadcast_to(base[:1], shape))
    before = np.array(x, copy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable array" warning
        r, c = like_scipy(x)
    assert np.array_equal(np.asarray(x), before)  # the input is left alone
    r2, c2 = lsa(np.ascontiguousarray(x))
    assert_array_equal(r, r2)
    assert_array_equal(c, c2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("what", ["pos_inf", "neg_inf", "nan", "pos_and_neg_inf"])
def test_infinities_and_nan(kind, maximize, what):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((5, 6))
    if what in ("pos_inf", "pos_and_neg_inf"):
        a[1, 2] = a[3, 0] = INF
    if what in ("neg_inf", "pos_and_neg_inf"):
        a[0, 4] = a[2, 1] = -INF
    if what == "nan":
        a[4, 5] = np.nan
    x = make(a, kind)
    res = like_scipy(x, maximize=maximize)
    forbidden = INF if not maximize else -INF
    wrong = -forbidden
    if what == "nan" or (wrong in a):
        assert res is None
        with pytest.raises(ValueError, match=f"^{INVALID}$"):
            lsa(x, maximize)
    else:  # the forbidden infinity is avoided
        r, c = res
        assert np.isfinite(a[r, c]).all()
        like_scipy(make(a.T, kind), maximize=maximize)


INFEASIBLE_CASES = {
    "inf_row": ((4, 4), lambda a: a.__setitem__((1, slice(None)), INF)),
    "inf_col": ((4, 4), lambda a: a.__setitem__((slice(None), 2), INF)),
    "hall": ((4, 4), lambda a: a.__setitem__((slice(0, 2), slice(1, None)), INF)),
    "all_inf": ((3, 3), lambda a: a.fill(INF)),
    "rect_inf_row": ((2, 5), lambda a: a.__setitem__((0, slice(None)), INF)),
    "rect_inf_col": ((5, 2), lambda a: a.__setitem__((slice(None), 1), INF)),
    "rect_hall": ((3, 6), lambda a: a.__setitem__((slice(0, 2), slice(1, None)), INF)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", list(INFEASIBLE_CASES))
@pytest.mark.parametrize("maximize", [False, True])
def test_infeasible(kind, which, maximize):
    shape, spoil = INFEASIBLE_CASES[which]
    a = np.random.default_rng(7).random(shape)
    spoil(a)
    if maximize:
        a = -a
    x = make(a, kind)
    with pytest.raises(ValueError, match=f"^{INFEASIBLE}$"):
        lsa(x, maximize=maximize)
    like_scipy(x, maximize=maximize)
    like_scipy(make(a.T, kind), maximize=maximize)
    # check=False: -1 everywhere, in the input's array type.
    rows, cols = lsa(x, maximize=maximize, check=False)
    assert type(rows) is (torch.Tensor if kind == "torch" else np.ndarray)
    k = min(shape)
    assert as_numpy((rows,))[0].tolist() == [-1] * k and as_numpy((cols,))[0].tolist() == [-1] * k


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_takes_precedence_over_infeasible(kind):
    x = make([[INF, INF], [np.nan, 2.0]], kind)
    with pytest.raises(ValueError, match=f"^{INVALID}$"):
        lsa(x)
    like_scipy(x)
    rows, cols = lsa(x, check=False)
    assert as_numpy((rows,))[0].tolist() == [-1, -1] and as_numpy((cols,))[0].tolist() == [-1, -1]


@pytest.mark.parametrize("maximize", [0, 1, None, "yes", np.bool_(True), np.array([1, 2])], ids=repr)
def test_maximize_truthiness(maximize):
    x = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    like_scipy(x, maximize=maximize)


def test_batched_messages_start_with_scipy_text():
    cost = torch.rand(4, 3, 3)
    cost[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^{INVALID} \(cost\[1\] contains NaN or -inf\)"):
        lsa(cost)
    cost[1, 0, 0] = INF
    with pytest.raises(ValueError, match=rf"^{INVALID} \(cost\[1\] contains NaN or \+inf\)"):
        lsa(cost, maximize=True)
    cost = torch.rand(4, 3, 3)
    cost[2, :, 1] = INF
    cost[3, 0, :] = INF
    with pytest.raises(ValueError, match=rf"^{INFEASIBLE} \(cost\[2\].*2 of 4 matrices failed"):
        lsa(cost)
    # A 2-D tensor gets SciPy's text exactly (as does every 2-D input).
    with pytest.raises(ValueError, match=f"^{INFEASIBLE}$"):
        lsa(cost[2])


def test_float_inputs_are_not_copied():
    # The fast path: floating tensors go to the solver as they are, NumPy float arrays as views.
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.rand(3, 5, 5).to(dtype)
        assert A._check_input(t) is t and A._check_input(t.transpose(1, 2)).data_ptr() == t.data_ptr()
    for dtype in (np.float16, np.float32, np.float64):
        a = np.asfortranarray(np.random.default_rng(8).random((4, 6)).astype(dtype))
        v = A._numpy_to_tensor(A._as_numpy_cost(a))
        assert v.data_ptr() == a.ctypes.data and v.dtype == torch.from_numpy(a).dtype


@pytest.mark.gpu
def test_cuda_integer_tensor():
    x = torch.randint(-20, 20, (3, 9, 7))
    rows, cols = lsa(x.cuda())
    assert rows.device.type == cols.device.type == "cuda"
    r0, c0 = lsa(x)
    assert torch.equal(rows.cpu(), r0) and torch.equal(cols.cpu(), c0)
    r2, c2 = lsa(x[0].cuda(), maximize=True)
    assert r2.device.type == "cuda"
    like_scipy(x[0], maximize=True)
    r3, c3 = lsa(x[0], maximize=True)
    assert torch.equal(r2.cpu(), r3) and torch.equal(c2.cpu(), c3)
