"""Exact batched linear sum assignment (SciPy semantics) and RandP's matching permutation.

Backends, in order of preference (chosen by :mod:`vicl_fast.ops._dispatch`;
``VICL_FAST_LSA_BACKEND=auto|compiled|scipy`` forces one):

* ``compiled``: ``torch.ops.vicl_fast.linear_sum_assignment``, the C++ kernel
  (csrc/lsa/lsa_cpu.cpp, the batch spread over ``torch.get_num_threads()``
  threads) or the CUDA kernel (csrc/lsa/lsa_cuda.cu), picked by the
  dispatcher from the input's device. Both run the algorithm of
  docs/design.md ("Solver"), so their answers are identical. A CUDA input on
  a build without the CUDA kernel is solved on the CPU and copied back (a
  host round trip; the result is the same).
* ``scipy``: :func:`scipy.optimize.linear_sum_assignment` per matrix over a
  thread pool (SciPy releases the GIL), with the same validation and status
  codes. Its tie policy differs, so on ties it may pick another optimal
  matching (same total cost).

Costs are read as float32 (float16/bfloat16/float32 input) or float64
(float64 input; integer and bool input is converted to float64); the answer
is exactly optimal for those upcast costs (duals and path lengths in float64).
``+inf`` marks a forbidden pair; NaN and ``-inf`` are errors (with
``maximize=True`` the sign of the infinities flips).

:func:`linear_sum_assignment` is a drop-in for SciPy's: it takes what SciPy
takes (NumPy arrays, nested lists, any array-like, with SciPy's conversion
rules and NumPy arrays out) and raises SciPy's exceptions with SciPy's text
for a 2-D input (tests/ops/test_assignment_scipy.py holds it to that).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from vicl_fast import _ext
from vicl_fast.ops._dispatch import select

__all__ = ["linear_sum_assignment", "matching_permutation", "lsa_backend"]

_OP_NAME = "linear_sum_assignment"

# Status codes of the op (docs/design.md).
STATUS_OK, STATUS_INVALID, STATUS_INFEASIBLE = 0, 1, 2


if _ext.extension_loaded():
    try:
        @torch.library.register_fake(f"vicl_fast::{_OP_NAME}")
        def _lsa_fake(cost: torch.Tensor, maximize: bool):
            b, n, m = cost.shape
            k = torch.sym_min(n, m)
            rows = cost.new_empty((b, k), dtype=torch.int64)
            cols = cost.new_empty((b, k), dtype=torch.int64)
            status = cost.new_empty((b,), dtype=torch.int32)
            return rows, cols, status
    except RuntimeError:  # schema missing (stale build) or fake already registered
        pass


def lsa_backend(device: torch.device | str = "cpu") -> str:
    """Name of the backend that :func:`linear_sum_assignment` uses for ``device``.

    One of ``"compiled"`` (the op has a kernel for this device),
    ``"compiled-cpu-roundtrip"`` (CUDA input solved by the C++ CPU kernel),
    ``"scipy"`` (SciPy over a thread pool; on CUDA input, via the host): the
    first that fits, chosen by :func:`vicl_fast.ops._dispatch.select`.
    Honours ``VICL_FAST_LSA_BACKEND=auto|compiled|scipy`` (read at each call
    in eager mode; inside ``torch.compile`` the automatic choice is used;
    another value raises ``ValueError``). With ``compiled`` and no kernel,
    raises :class:`~vicl_fast.ops._dispatch.NoBackendError` (a ``RuntimeError``)
    giving each backend's reason.
    """
    dev = device if isinstance(device, torch.device) else torch.device(device)
    return select(_OP_NAME, device=dev).name


# --------------------------------------------------------------------------- SciPy fallback
@lru_cache(maxsize=8)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vicl_lsa")


def _scipy_one(x: np.ndarray, maximize: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """Solve one (N, M) matrix with SciPy; returns (status, row_ind, col_ind)."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    bad = np.isnan(x) | (np.isposinf(x) if maximize else np.isneginf(x))
    if bad.any():
        return STATUS_INVALID, None, None
    try:
        r, c = scipy_lsa(x, maximize=maximize)
    except ValueError:  # "cost matrix is infeasible"
        return STATUS_INFEASIBLE, None, None
    return STATUS_OK, r, c


def _scipy_solve(cost: torch.Tensor, maximize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SciPy fallback with the op's contract: cost (B, N, M) -> rows, cols (B, K) int64, status (B,) int32."""
    b, n, m = cost.shape
    k = min(n, m)
    # float64 stays float64; every other float dtype is computed on its exact float32 value,
    # like the compiled kernels (SciPy then widens to float64, also exactly).
    host = cost.detach().to("cpu", torch.float64 if cost.dtype == torch.float64 else torch.float32)
    arr = host.numpy()
    rows = np.full((b, k), -1, dtype=np.int64)
    cols = np.full((b, k), -1, dtype=np.int64)
    status = np.zeros((b,), dtype=np.int32)

    def work(i: int) -> None:
        st, r, c = _scipy_one(arr[i], maximize)
        status[i] = st
        if st == STATUS_OK:
            rows[i], cols[i] = r, c

    workers = max(1, min(b, torch.get_num_threads()))
    if workers == 1:
        for i in range(b):
            work(i)
    else:
        list(_pool(workers).map(work, range(b)))
    out = (torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(status))
    return tuple(t.to(cost.device) for t in out)  # type: ignore[return-value]


# --------------------------------------------------------------------------- dispatch
def _solve(cost: torch.Tensor, maximize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cost (B, N, M) -> (row_ind (B, K), col_ind (B, K), status (B,)) on cost's device."""
    backend = lsa_backend(cost.device)
    cost = cost.detach()  # the matching is piecewise constant: no gradient flows through it
    if backend == "compiled":
        return torch.ops.vicl_fast.linear_sum_assignment(cost, bool(maximize))
    if backend == "compiled-cpu-roundtrip":
        rows, cols, status = torch.ops.vicl_fast.linear_sum_assignment(cost.cpu(), bool(maximize))
        return rows.to(cost.device), cols.to(cost.device), status.to(cost.device)
    return _scipy_solve(cost, maximize)


# SciPy's messages (scipy/optimize/_lsap.c), kept verbatim so that code matching on them keeps working.
_MSG_NOT_A_MATRIX = "expected a matrix (2-D array), got a {} array"
_MSG_INVALID = "matrix contains invalid numeric entries"
_MSG_INFEASIBLE = "cost matrix is infeasible"
_MSG_CAST = "Cannot cast array data from {!r} to dtype('float64') according to the rule 'safe'"


def _check_input(cost: torch.Tensor, name: str = "cost") -> torch.Tensor:
    """Validate a cost tensor; returns it as a floating-point tensor (the same tensor if it is one)."""
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cost).__name__}")
    if not cost.dtype.is_floating_point:
        if cost.dtype.is_complex:  # SciPy refuses complex arrays the same way
            np_name = str(cost.dtype).removeprefix("torch.")
            raise TypeError(_MSG_CAST.format(np.dtype(np_name)) + f"; {name} must be real")
        cost = cost.to(torch.float64)  # integers and bools, as SciPy: exact up to 2**53
    if cost.dim() not in (2, 3):
        msg = _MSG_NOT_A_MATRIX.format(cost.dim())
        if cost.dim() > 3:
            msg += f" (a torch {name} may also be a (B, N, M) batch of them; got shape {tuple(cost.shape)})"
        raise ValueError(msg)
    return cost


def _as_numpy_cost(obj) -> np.ndarray:
    """SciPy's conversion of a non-tensor cost (``PyArray_ContiguousFromAny(obj, NPY_DOUBLE, 0, 0)``).

    An array (or an object with the array protocol) must cast to float64 under
    NumPy's "safe" rule (bool, integers, float16/32/64; not complex, object,
    str, datetime or longdouble); anything else (nested sequences, scalars) is
    converted element by element to float64. Returns the array, not yet
    float64 where the solver can read its dtype exactly (float16/32).
    """
    if isinstance(obj, np.ndarray) or (not isinstance(obj, np.generic) and (
            isinstance(obj, memoryview) or hasattr(obj, "__array__") or hasattr(obj, "__array_interface__")
            or hasattr(obj, "__array_struct__"))):
        a = np.asarray(obj)
        if not np.can_cast(a.dtype, np.float64, "safe"):
            raise TypeError(_MSG_CAST.format(a.dtype))
    else:
        a = np.asarray(obj, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(_MSG_NOT_A_MATRIX.format(a.ndim))
    return a


def _numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor of ``a``'s values: a view where torch can share the array, else a float64 copy."""
    if (a.dtype.type in (np.float16, np.float32, np.float64) and a.dtype.isnative and a.flags.aligned
            and a.flags.writeable and all(s >= 0 for s in a.strides)):
        return torch.from_numpy(np.asarray(a))  # the op reads any strides; np.asarray drops np.matrix
    return torch.from_numpy(np.array(a, dtype=np.float64, order="C"))


def _raise_on_status(status: torch.Tensor, batched: bool, maximize: bool) -> None:
    bad = torch.nonzero(status.cpu()).flatten()  # the one host sync of check=True
    if bad.numel() == 0:
        return
    b = int(bad[0])
    st = int(status[b])
    if not batched:  # a single matrix: SciPy's exception, word for word
        if st == STATUS_INVALID:
            raise ValueError(_MSG_INVALID)
        if st == STATUS_INFEASIBLE:
            raise ValueError(_MSG_INFEASIBLE)
        raise ValueError(f"solver returned unknown status {st}")
    where = f"cost[{b}]"
    more = f" ({bad.numel()} of {status.numel()} matrices failed)" if bad.numel() > 1 else ""
    if st == STATUS_INVALID:
        what = "NaN or +inf" if maximize else "NaN or -inf"
        raise ValueError(f"{_MSG_INVALID} ({where} contains {what}){more}; use +inf (-inf with "
                         "maximize=True) only for forbidden pairs and replace NaN")
    if st == STATUS_INFEASIBLE:
        raise ValueError(f"{_MSG_INFEASIBLE} ({where}: no complete matching avoids its forbidden "
                         f"({'-inf' if maximize else '+inf'}) entries){more}")
    raise ValueError(f"{where}: solver returned unknown status {st}")


def linear_sum_assignment(cost, maximize: bool = False, *, check: bool = True):
    """Exact minimum (or maximum) weight matching of every matrix of a batch.

    Same answer as :func:`scipy.optimize.linear_sum_assignment` applied to each
    matrix (equal total cost; on ties the indices may differ from SciPy's but
    are deterministic and identical on CPU and CUDA), and a drop-in for it:
    it accepts what SciPy accepts and raises what SciPy raises.

    Args:
        cost: a torch tensor (B, N, M) or (N, M), any dtype but complex
            (float16/bfloat16/float32/float64 are read as they are; integer
            and bool tensors are converted to float64, exact for integers up
            to 2**53 in magnitude; int64 beyond that is rounded), any strides,
            CPU or CUDA. Or, as for SciPy, a NumPy array, a nested list or
            any array-like that is an (N, M) matrix, with SciPy's conversion
            (bool, integer and float16/32/64 arrays are accepted; complex,
            object, string and longdouble arrays raise ``TypeError``; lists
            are converted element by element to float64). ``+inf``
            (``-inf`` when ``maximize``) forbids a pair.
        maximize: maximise the total instead of minimising it (any truthy value).
        check: raise ``ValueError`` for a failed matrix. For a single matrix
            (a 2-D tensor, or any non-tensor input) the message is SciPy's:
            ``"matrix contains invalid numeric entries"`` (NaN, or the wrong
            infinity: ``-inf``, ``+inf`` with ``maximize``) or
            ``"cost matrix is infeasible"``; for a batch it starts with the
            same text and names the first failed matrix, e.g.
            ``"cost matrix is infeasible (cost[3]: ...)"``. An input that is
            not a matrix raises SciPy's ``"expected a matrix (2-D array), got
            a 1 array"`` (a tensor may also be 3-D: a batch). ``check=False``
            skips that host sync (useful on CUDA and under ``torch.compile``):
            failed matrices then get -1 in both outputs.

    Returns:
        ``(row_ind, col_ind)``. For a tensor: int64 tensors on ``cost``'s
        device, each (B, K) (or (K,) for a 2-D ``cost``), K = min(N, M). For
        any other input: int64 NumPy arrays (K,), as SciPy returns.
        ``row_ind`` is ascending and ``cost[b, row_ind[b], col_ind[b]]`` is
        the optimal assignment.

    Example:
        >>> c = torch.tensor([[4., 1., 3.], [2., 0., 5.], [3., 2., 2.]])
        >>> linear_sum_assignment(c)
        (tensor([0, 1, 2]), tensor([1, 0, 2]))
        >>> linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
        (array([0, 1, 2]), array([1, 0, 2]))
    """
    maximize = bool(maximize)  # SciPy's "p" argument: truthiness (an ambiguous array raises)
    if not isinstance(cost, torch.Tensor):  # NumPy, lists, array-likes: SciPy's conversion and return type
        rows, cols = linear_sum_assignment(_numpy_to_tensor(_as_numpy_cost(cost)), maximize, check=check)
        return rows.numpy(), cols.numpy()
    cost = _check_input(cost)
    batched = cost.dim() == 3
    c3 = cost if batched else cost.unsqueeze(0)
    rows, cols, status = _solve(c3, maximize)
    if check:
        _raise_on_status(status, batched, maximize)
    if not batched:
        rows, cols = rows[0], cols[0]
    return rows, cols


def matching_permutation(cost: torch.Tensor, maximize: bool = False, *, check: bool = True) -> torch.Tensor:
    """Permutation aligning prompt tokens (rows) to query tokens (columns), RandP's form.

    Args:
        cost: (B, P, Q) with P >= Q (or (P, Q)), e.g. ``-cos(prompt_i, query_j)``
            (or the similarity itself with ``maximize=True``).
        maximize: maximise the total instead of minimising it.
        check: as in :func:`linear_sum_assignment`; with ``check=False`` a
            failed matrix gets -1 everywhere.

    Returns:
        perm: (B, Q) int64 (or (Q,)), ``perm[b, q]`` = the row (prompt token)
        matched to column (query token) q; the rows are distinct.

    Example (RandP, tokens (B, P, D) matched to the query's (B, Q, D)):
        >>> prompt, query = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
        >>> pn, qn = torch.nn.functional.normalize(prompt, dim=-1), torch.nn.functional.normalize(query, dim=-1)
        >>> perm = matching_permutation(-(pn @ qn.transpose(1, 2)))  # cost (B, P, Q) = -cosine
        >>> aligned = prompt.gather(1, perm[..., None].expand(-1, -1, prompt.shape[-1]))  # (B, Q, D)
        >>> aligned.shape
        torch.Size([2, 6, 8])
    """
    cost = _check_input(cost)
    batched = cost.dim() == 3
    c3 = cost if batched else cost.unsqueeze(0)
    b, p, q = c3.shape
    if p < q:
        raise ValueError(f"matching_permutation needs cost (B, P, Q) with P >= Q (every query token gets a "
                         f"prompt token), got P={p} < Q={q}; transpose the cost or use linear_sum_assignment")
    rows, cols, status = _solve(c3, maximize)
    if check:
        _raise_on_status(status, batched, maximize)
    perm = torch.empty((b, q), dtype=torch.int64, device=c3.device)
    # Failed matrices have -1 in both outputs: scatter them harmlessly, then blank them.
    perm.scatter_(1, cols.clamp_min(0), rows)
    if not check:
        perm.masked_fill_((status != STATUS_OK)[:, None], -1)
    return perm if batched else perm[0]
