"""RandP dense kernels: cosine cost and reorder-gather (vicl_fast/ops/randp_kernels.py).

CPU tests check the references and the dispatcher against independent maths
(float64 NumPy); GPU tests (skipped without CUDA) check the compiled CUDA ops
(csrc/randp/retrieve_cuda.cu) against the references, values and gradients.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vicl_fast import _ext
from vicl_fast.ops import randp_kernels as rk


def _np_cosine_cost(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> np.ndarray:
    a64 = a.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    an = a64 / np.maximum(np.linalg.norm(a64, axis=-1, keepdims=True), eps)
    bn = b64 / np.maximum(np.linalg.norm(b64, axis=-1, keepdims=True), eps)
    return -np.einsum("bpd,bqd->bpq", an, bn)


def _np_gather_add(src, index, add):
    s = src.detach().double().cpu().numpy()
    i = index.cpu().numpy()
    out = np.take_along_axis(s, i[..., None], axis=1)
    if add is not None:
        out = out + add.detach().double().cpu().numpy()
    return out


# ----------------------------------------------------------------------------- CPU: cosine cost

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 2e-6),
                                       (torch.float16, 2e-6), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 17, 9, 64), (3, 1, 1, 1)])
def test_cosine_cost_reference_matches_float64(dtype, tol, shape):
    B, P, Q, D = shape
    a = torch.randn(B, P, D).to(dtype)
    b = torch.randn(B, Q, D).to(dtype)
    out = rk.cosine_cost_reference(a, b)
    assert out.dtype == torch.float32 and out.shape == (B, P, Q)
    # The oracle sees the same (rounded) inputs, so the only error is float32 maths.
    np.testing.assert_allclose(out.numpy(), _np_cosine_cost(a, b), atol=tol, rtol=0)


def test_cosine_cost_dispatcher_cpu_equals_reference_and_is_detached():
    a = torch.randn(2, 6, 5, requires_grad=True)
    b = torch.randn(2, 4, 5, requires_grad=True)
    out = rk.cosine_cost(a, b)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, rk.cosine_cost_reference(a, b), rtol=0, atol=0)
    # Range of a cosine and its sign convention (cost = -similarity).
    assert out.abs().max() <= 1 + 1e-6
    same = rk.cosine_cost(a[:, :1], a[:, :1])
    torch.testing.assert_close(same, -torch.ones(2, 1, 1), rtol=0, atol=1e-6)


def test_cosine_cost_eps_zero_rows():
    a = torch.zeros(1, 2, 4)
    a[0, 1] = torch.tensor([3.0, 0, 4.0, 0])
    b = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1e-8, 0]]])
    out = rk.cosine_cost(a, b, eps=1e-6)
    # zero row -> 0 cost; tiny row (norm 1e-8 < eps) is divided by eps, not by its norm.
    np.testing.assert_allclose(out.numpy(), _np_cosine_cost(a, b, 1e-6), atol=1e-7, rtol=0)
    assert out[0, 0].abs().max() == 0


def test_cosine_cost_float32_under_autocast():
    a = torch.randn(2, 8, 16)
    b = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rk.cosine_cost(a, b)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _np_cosine_cost(a, b), atol=2e-6, rtol=0)


@pytest.mark.parametrize("a,b,err", [
    (torch.randn(5, 3), torch.randn(5, 3), ValueError),
    (torch.randn(1, 5, 3), torch.randn(1, 5, 4), ValueError),
    (torch.randn(2, 5, 3), torch.randn(1, 5, 3), ValueError),
    (torch.ones(1, 5, 3, dtype=torch.int64), torch.ones(1, 5, 3, dtype=torch.int64), TypeError),
])
def test_cosine_cost_bad_inputs(a, b, err):
    with pytest.raises(err, match="a|b"):
        rk.cosine_cost(a, b)


# ----------------------------------------------------------------------------- CPU: gather / scatter

@pytest.mark.parametrize("with_add", [True, False])
def test_gather_rows_add_values(with_add):
    src = torch.randn(3, 7, 5)
    index = torch.randint(0, 7, (3, 4))
    add = torch.randn(3, 4, 5) if with_add else None
    out = rk.gather_rows_add(src, index, add)
    assert out.shape == (3, 4, 5)
    np.testing.assert_allclose(out.double().numpy(), _np_gather_add(src, index, add), atol=1e-6, rtol=0)


def test_gather_rows_add_gradcheck_repeated_indices():
    src = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    add = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 0, 4, 2, 0, 4], [1, 2, 3, 4, 0, 1]])  # greedy-style repeats
    assert torch.autograd.gradcheck(lambda s, a: rk.gather_rows_add(s, index, a), (src, add))
    assert torch.autograd.gradcheck(lambda s: rk.gather_rows_add(s, index, None), (src,))


def test_gather_rows_add_gradient_accumulates_repeats():
    src = torch.randn(2, 5, 3, requires_grad=True)
    index = torch.tensor([[0, 0, 4, 2, 0, 4], [1, 2, 3, 4, 0, 1]])
    g = torch.randn(2, 6, 3)
    rk.gather_rows_add(src, index, None).backward(g)
    want = np.zeros((2, 5, 3))
    for b in range(2):
        np.add.at(want[b], index[b].numpy(), g[b].double().numpy())
    np.testing.assert_allclose(src.grad.double().numpy(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(rk.scatter_rows_add_reference(g, index, 5), torch.from_numpy(want).float())


def test_gather_rows_add_permutation_grad_is_inverse_gather():
    src = torch.randn(1, 6, 4, requires_grad=True)
    perm = torch.randperm(6)[None]
    g = torch.randn(1, 6, 4)
    rk.gather_rows_add(src, perm, None).backward(g)
    inv = torch.argsort(perm[0])
    torch.testing.assert_close(src.grad[0], g[0, inv], rtol=0, atol=0)


def test_gather_rows_add_dtype_promotion_and_int32_index():
    src = torch.randn(1, 4, 3, dtype=torch.float16)
    add = torch.randn(1, 2, 3)
    out = rk.gather_rows_add(src, torch.tensor([[3, 1]], dtype=torch.int32), add)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), _np_gather_add(src, torch.tensor([[3, 1]]), add), atol=1e-6)


@pytest.mark.parametrize("index,err,match", [
    (torch.tensor([[0, 5]]), ValueError, "index holds values"),
    (torch.tensor([[-1, 0]]), ValueError, "index holds values"),
    (torch.tensor([[True, False]]), TypeError, "integer"),
    (torch.tensor([0, 1]), ValueError, r"\(B, Q\)"),
])
def test_gather_rows_add_bad_index(index, err, match):
    with pytest.raises(err, match=match):
        rk.gather_rows_add(torch.randn(1, 5, 3), index, None)


def test_gather_rows_add_bad_add_shape():
    with pytest.raises(ValueError, match="add must be"):
        rk.gather_rows_add(torch.randn(1, 5, 3), torch.tensor([[0, 1]]), torch.randn(1, 3, 3))


def test_gather_rows_add_empty():
    out = rk.gather_rows_add(torch.randn(2, 0, 3), torch.zeros(2, 0, dtype=torch.long), None)
    assert out.shape == (2, 0, 3)


# ----------------------------------------------------------------------------- CPU: op wiring
# The compiled ops have CUDA kernels only. Registering plain-PyTorch CPU
# stand-ins for the test's duration checks, on CPU, the Python side that the
# CUDA path relies on: fake impls (torch.compile), the autograd formula
# (gather -> scatter_rows_add) and its double backward.

def _ops_defined() -> bool:
    return all(rk._op_exists(n) for n in ("cosine_cost", "gather_rows_add", "scatter_rows_add"))


@pytest.fixture
def cpu_standins():
    if not _ops_defined():
        pytest.skip("vicl_fast._C does not define the RandP ops")
    lib = torch.library.Library("vicl_fast", "IMPL")
    lib.impl("gather_rows_add", lambda src, index, add: rk.gather_rows_add_reference(src, index, add), "CPU")
    lib.impl("scatter_rows_add", lambda g, index, P: rk.scatter_rows_add_reference(g, index, P), "CPU")
    lib.impl("cosine_cost", lambda a, b, eps: rk.cosine_cost_reference(a, b, eps), "CPU")
    yield
    lib._destroy()


def test_op_autograd_and_fake_registrations(cpu_standins):
    src = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    add = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 0, 4, 2, 0, 4], [1, 2, 3, 4, 0, 1]])
    f = lambda s, a: torch.ops.vicl_fast.gather_rows_add(s, idx, a)  # noqa: E731
    assert torch.autograd.gradcheck(f, (src, add))
    assert torch.autograd.gradgradcheck(f, (src, add))
    assert torch.autograd.gradcheck(lambda s: torch.ops.vicl_fast.gather_rows_add(s, idx, None), (src,))
    s32, a32 = src.detach().float().requires_grad_(), add.detach().float().requires_grad_()
    torch.library.opcheck(torch.ops.vicl_fast.gather_rows_add.default, (s32, idx, a32))
    torch.library.opcheck(torch.ops.vicl_fast.scatter_rows_add.default, (a32.detach(), idx, 5))
    torch.library.opcheck(torch.ops.vicl_fast.cosine_cost.default, (torch.randn(2, 4, 8), torch.randn(2, 3, 8), 1e-6))


# ----------------------------------------------------------------------------- GPU

cuda_kernels = pytest.mark.skipif(
    not (_ext.has_kernel("cosine_cost", "CUDA") and _ext.has_kernel("gather_rows_add", "CUDA")),
    reason="vicl_fast._C built without the RandP CUDA kernels")

# (input dtype, tolerance on |cost - float64 cost of the same rounded inputs|)
_COS_TOL = {torch.float32: 3e-6, torch.float64: 3e-6, torch.float16: 3e-6, torch.bfloat16: 3e-6}


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("dtype", list(_COS_TOL))
@pytest.mark.parametrize("shape", [(2, 5, 123, 37), (3, 64, 64, 768), (1, 130, 70, 16), (2, 1, 1, 1)])
def test_cuda_cosine_cost_matches_float64(dtype, shape):
    B, P, Q, D = shape
    a = torch.randn(B, P, D, device="cuda").to(dtype)
    b = torch.randn(B, Q, D, device="cuda").to(dtype)
    out = torch.ops.vicl_fast.cosine_cost(a, b, 1e-6)
    assert out.dtype == torch.float32 and out.shape == (B, P, Q) and out.device == a.device
    ref64 = _np_cosine_cost(a, b)
    err = np.abs(out.cpu().double().numpy() - ref64).max()
    ref_err = np.abs(rk.cosine_cost_reference(a, b).cpu().double().numpy() - ref64).max()
    # float32 maths either way: within 3e-6, and within 4x the reference's own error.
    assert err <= max(_COS_TOL[dtype], 4 * ref_err), (err, ref_err)
    torch.testing.assert_close(rk.cosine_cost(a, b), out, rtol=0, atol=0)


@pytest.mark.gpu
@cuda_kernels
def test_cuda_cosine_cost_noncontiguous_autocast_empty_and_zero_rows():
    base = torch.randn(2, 9, 40, device="cuda")
    a = base[:, ::2, :33]  # strided rows, odd D
    b = torch.randn(2, 33, 7, device="cuda").transpose(1, 2)
    with torch.autocast("cuda", dtype=torch.float16):
        out = rk.cosine_cost(a, b)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), _np_cosine_cost(a, b), atol=3e-6, rtol=0)
    z = torch.zeros(1, 3, 8, device="cuda")
    assert (rk.cosine_cost(z, torch.randn(1, 2, 8, device="cuda")) == 0).all()
    for shp_a, shp_b in [((0, 3, 4), (0, 2, 4)), ((2, 0, 4), (2, 3, 4)), ((2, 3, 0), (2, 5, 0))]:
        got = rk.cosine_cost(torch.randn(*shp_a, device="cuda"), torch.randn(*shp_b, device="cuda"))
        assert got.shape == (shp_a[0], shp_a[1], shp_b[1])
        if got.numel():
            assert (got == 0).all()


def _grads(fn, src, index, add, g):
    s = src.detach().clone().requires_grad_(True)
    a = None if add is None else add.detach().clone().requires_grad_(True)
    out = fn(s, index, a)
    out.backward(g)
    return out.detach(), s.grad, (None if a is None else a.grad)


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("D", [768, 37, 8])
@pytest.mark.parametrize("kind", ["perm", "repeats"])
@pytest.mark.parametrize("with_add", [True, False])
def test_cuda_gather_rows_add_values_and_grads(dtype, tol, D, kind, with_add):
    B, P, Q = 3, 50, 40
    src = torch.randn(B, P, D, device="cuda", dtype=dtype)
    if kind == "perm":
        index = torch.stack([torch.randperm(P, device="cuda")[:Q] for _ in range(B)])
    else:
        index = torch.randint(0, 6, (B, Q), device="cuda")  # heavy repeats, as greedy matching gives
    add = torch.randn(B, Q, D, device="cuda", dtype=dtype) if with_add else None
    g = torch.randn(B, Q, D, device="cuda", dtype=dtype)
    out, gs, ga = _grads(rk.gather_rows_add, src, index, add, g)
    # Forward: one rounding of the float sum, as PyTorch's own add in that dtype: bitwise equal.
    same = rk.gather_rows_add_reference(src, index, add)
    torch.testing.assert_close(out, same, rtol=0, atol=0)
    # Backward against float32 maths on the same values: one rounding to dtype.
    _, rgs, rga = _grads(rk.gather_rows_add_reference, src.float(), index,
                         None if add is None else add.float(), g.float())
    torch.testing.assert_close(gs.float(), rgs, rtol=tol, atol=tol)
    if kind == "perm":  # no sum at all: the gradient is a pure move of g
        assert (gs.float() == rgs).all()
    if with_add:
        assert torch.equal(ga, g)


def _offset_one(shape, dtype=torch.float32):
    """A contiguous CUDA tensor that starts one element into its storage: its data pointer is
    not 16-byte aligned, and ``.contiguous()`` (which the ops call) keeps it as it is."""
    n = int(np.prod(shape))
    buf = torch.randn(n + 1, device="cuda").to(dtype)
    x = buf[1:].view(shape)
    assert x.is_contiguous() and x.storage_offset() == 1
    assert x.data_ptr() % 16 != 0 and x.contiguous().data_ptr() == x.data_ptr()
    return x


def _aligned_copy(x):
    y = x.clone()
    assert y.is_contiguous() and y.data_ptr() % 16 == 0
    return y


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.float16, 1e-2)])
def test_cuda_scatter_rows_add_deterministic_and_misaligned(dtype, tol):
    B, P, Q, D = 2, 7, 300, 24  # D % 8 == 0: an aligned input takes the 16-byte vector path
    grad = _offset_one((B, Q, D), dtype)  # misaligned: the scalar path
    index = torch.randint(0, P, (B, Q), device="cuda")
    r1 = torch.ops.vicl_fast.scatter_rows_add(grad, index, P)
    r2 = torch.ops.vicl_fast.scatter_rows_add(_aligned_copy(grad), index, P)
    # Same summation order on both paths: bitwise equal.
    assert torch.equal(r1, r2)
    want = np.zeros((B, P, D))
    for b in range(B):
        np.add.at(want[b], index[b].cpu().numpy(), grad[b].double().cpu().numpy())
    np.testing.assert_allclose(r1.double().cpu().numpy(), want, atol=tol, rtol=0)
    # Rows that no index hits get exact zeros; out-of-range indices are ignored.
    idx = torch.tensor([[0, 0, 9]], device="cuda")
    out = torch.ops.vicl_fast.scatter_rows_add(torch.ones(1, 3, 4, device="cuda"), idx, 3)
    torch.testing.assert_close(out.cpu(), torch.tensor([[[2.0] * 4, [0.0] * 4, [0.0] * 4]]))


@pytest.mark.gpu
@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_gather_and_cosine_misaligned(dtype):
    B, P, Q, D = 2, 9, 6, 24  # D allows the vector paths; the offset pointers must fall back
    src, add = _offset_one((B, P, D), dtype), _offset_one((B, Q, D), dtype)
    index = torch.randint(0, P, (B, Q), device="cuda")
    out = rk.gather_rows_add(src, index, add)
    assert torch.equal(out, rk.gather_rows_add(_aligned_copy(src), index, _aligned_copy(add)))
    assert torch.equal(out, rk.gather_rows_add_reference(src, index, add))
    src_g = src.detach().requires_grad_(True)
    g = _offset_one((B, Q, D), dtype)
    rk.gather_rows_add(src_g, index, None).backward(g)  # g is misaligned too
    torch.testing.assert_close(src_g.grad.double(), rk.scatter_rows_add_reference(g.double(), index, P),
                               **({"rtol": 4e-3, "atol": 1e-3} if dtype in (torch.float16, torch.bfloat16)
                                  else {"rtol": 1e-6, "atol": 1e-6}))
    cost = rk.cosine_cost(src, add)
    assert torch.equal(cost, rk.cosine_cost(_aligned_copy(src), _aligned_copy(add)))
    np.testing.assert_allclose(cost.cpu().numpy(), _np_cosine_cost(src, add), atol=3e-6, rtol=0)


@pytest.mark.gpu
@cuda_kernels
def test_cuda_gather_out_of_range_nan_or_error():
    src = torch.randn(1, 4, 8, device="cuda")
    index = torch.tensor([[1, 4]], device="cuda")
    out = rk.gather_rows_add(src, index, None)  # no check by default: NaN row, no crash
    assert torch.isnan(out[0, 1]).all() and torch.equal(out[0, 0], src[0, 1])
    for idx in (index, torch.tensor([[-1, 1]], device="cuda")):  # the reference too: no device-side assert
        ref = rk.gather_rows_add_reference(src, idx, None)
        torch.cuda.synchronize()
        bad = (idx[0] < 0) | (idx[0] >= 4)
        assert torch.isnan(ref[0, bad]).all() and torch.equal(ref[0, ~bad], src[0, idx[0, ~bad]])
    assert float(torch.ones(3, device="cuda").sum()) == 3.0  # the context is alive
    rk.set_index_checks(True)
    try:
        with pytest.raises(ValueError, match="index holds values"):
            rk.gather_rows_add(src, index, None)
    finally:
        rk.set_index_checks(False)


@pytest.mark.gpu
@cuda_kernels
def test_cuda_randp_opcheck():
    a = torch.randn(2, 5, 12, device="cuda")
    b = torch.randn(2, 6, 12, device="cuda")
    torch.library.opcheck(torch.ops.vicl_fast.cosine_cost.default, (a, b, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    src = torch.randn(2, 6, 12, device="cuda", requires_grad=True)
    add = torch.randn(2, 5, 12, device="cuda", requires_grad=True)
    index = torch.randint(0, 6, (2, 5), device="cuda")
    torch.library.opcheck(torch.ops.vicl_fast.gather_rows_add.default, (src, index, add))
    torch.library.opcheck(torch.ops.vicl_fast.gather_rows_add.default, (src, index, None))
    torch.library.opcheck(torch.ops.vicl_fast.scatter_rows_add.default, (add.detach(), index, 6))
