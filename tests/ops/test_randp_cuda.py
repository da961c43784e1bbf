"""RandP end to end on CUDA (issue 11 (d)): cosine cost -> solver -> gather/fuse, and gradients.

``retrieve_and_propagate`` on CUDA (fast impl: the compiled cosine/gather/scatter
kernels when built, and the solver with ``check=False``) against the literal
reference impl on CUDA and against a float64 CPU recomputation on the same
matching; hungarian and greedy, square and rectangular (P > Q); bf16 autocast;
a NaN token (failed matching) gives NaN rows, never a device-side assert.
Every test needs a GPU (module-level ``gpu`` marker: skipped without one).
"""
from __future__ import annotations

import pytest
import torch

import vicl_fast.ops.assignment as assignment_mod
from vicl_fast import _ext
from vicl_fast.ops import randp_kernels as rk
from vicl_fast.ops.assignment import matching_permutation
from vicl_fast.ops.retrieve import match_tokens, retrieve_and_propagate, retrieve_and_propagate_reference

from tests._oracles import cos64, scipy_perm

pytestmark = pytest.mark.gpu

B, D = 3, 48
SHAPES = [(64, 64), (96, 64)]  # (P, Q): square, and rectangular with more prompt tokens
MODES = ["hungarian", "greedy"]
COS_TOL = 3e-6  # |float32 cosine cost - float64 cosine| (see test_randp_kernels.py)
FP32_TOL = 2e-5  # max abs error / max(1, max abs value), fp32 maths against float64
BF16_TOL = 3e-2  # the same under bf16 autocast

_HAS_KERNELS = all(_ext.has_kernel(op, "CUDA")
                   for op in ("cosine_cost", "gather_rows_add", "scatter_rows_add"))


@pytest.fixture(autouse=True)
def _fp32_matmul():
    """Plain float32 GEMMs (no TF32) for the fp32 tolerances; restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _inputs(P, Q, seed=0):
    """(x_pi, x_pl, x_qi, x_ql, w, b) as float32 CUDA tensors and as their exact float64 CPU copies."""
    g = torch.Generator().manual_seed(seed)
    t32 = [torch.randn(B, n, D, generator=g) for n in (P, P, Q, Q)]
    t32.append(torch.randn(D, 4 * D, generator=g) / (4 * D) ** 0.5)
    t32.append(torch.randn(D, generator=g))
    return [t.cuda() for t in t32], [t.double() for t in t32]


def _total(sim, perm):
    """(B,) float64 total similarity of a matching."""
    return sim.gather(1, perm.cpu()[:, None, :]).sum((1, 2))


def _run(inputs, g_out, autocast_dtype=None, **kw):
    """Forward (under CUDA autocast if asked) and backward (outside it, as recommended) on fresh
    leaves; returns (out, perm, grads of the 6 inputs)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out, perm = retrieve_and_propagate(*leaves, return_perm=True, **kw)
    grads = torch.autograd.grad(out, leaves, g_out.to(out.dtype))
    return out.detach(), perm, grads


def _oracle64(inputs64, perm, g_out):
    """Literal concat form in float64 on the CPU with the given matching: (out, grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs64]
    out = retrieve_and_propagate_reference(*leaves, perm=perm.cpu())
    grads = torch.autograd.grad(out, leaves, g_out.detach().double().cpu())
    return out.detach(), grads


def _assert_close(actual, expected, tol, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), what
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = max(1.0, float(expected.abs().max()) if expected.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def _alive():
    """A device-side assert poisons the context: prove it still runs work."""
    torch.cuda.synchronize()
    x = torch.arange(8, device="cuda", dtype=torch.float32)
    assert float((x * 2).sum()) == 56.0


def _check_matching(mode, perm, x_pi, x_qi):
    """The CUDA matching is valid and optimal (hungarian) / the per-column best (greedy)."""
    P, Q = x_pi.shape[1], x_qi.shape[1]
    assert perm.device.type == "cuda" and perm.dtype == torch.int64 and perm.shape == (B, Q)
    assert int(perm.min()) >= 0 and int(perm.max()) < P
    sim = cos64(x_pi, x_qi)
    if mode == "hungarian":
        for row in perm.cpu():
            assert len(set(row.tolist())) == Q  # one-to-one
        # Same answer as the CPU solver on the very same float32 costs (CPU/CUDA contract).
        cost = rk.cosine_cost(x_pi, x_qi)
        assert cost.device.type == "cuda" and cost.dtype == torch.float32
        _assert_close(cost, -sim, COS_TOL, "cosine cost")
        assert torch.equal(perm.cpu(), matching_permutation(cost.cpu()))
        # Optimal for the float64 similarity up to the float32 cost error, and the same total as
        # the whole CPU pipeline (cost and solver on the CPU).
        bound = 2 * Q * COS_TOL
        ours = _total(sim, perm)
        torch.testing.assert_close(ours, _total(sim, scipy_perm(sim)), rtol=0, atol=bound)
        torch.testing.assert_close(ours, _total(sim, match_tokens(x_pi.cpu(), x_qi.cpu(), "hungarian")),
                                   rtol=0, atol=bound)
    else:
        chosen = sim.gather(1, perm.cpu()[:, None, :])[:, 0]  # (B, Q)
        assert (chosen >= sim.max(1).values - 2 * COS_TOL).all()
        assert torch.equal(perm, rk.cosine_cost(x_pi, x_qi).argmin(1))


# ----------------------------------------------------------------------------- float32

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("P,Q", SHAPES)
def test_cuda_randp_fp32_matches_reference_and_cpu_float64(mode, P, Q):
    inputs, inputs64 = _inputs(P, Q, seed=1)
    g_out = torch.randn(B, Q, D, device="cuda")
    out, perm, grads = _run(inputs, g_out, mode=mode, impl="fast")
    assert out.shape == (B, Q, D) and out.dtype == torch.float32 and out.device.type == "cuda"
    _check_matching(mode, perm, inputs[0], inputs[2])
    # The reference impl on CUDA finds the same matching and, fused the literal way, the same values.
    out_r, perm_r, grads_r = _run(inputs, g_out, mode=mode, impl="reference")
    assert torch.equal(perm_r, perm)
    # Both against float64 maths on the CPU with that matching.
    want, want_grads = _oracle64(inputs64, perm, g_out)
    names = ("x_pi", "x_pl", "x_qi", "x_ql", "weight", "bias")
    for impl, (o, gs) in {"fast": (out, grads), "reference": (out_r, grads_r)}.items():
        _assert_close(o, want, FP32_TOL, f"{impl} output")
        for name, g, wg in zip(names, gs, want_grads):
            assert g.dtype == torch.float32 and g.device.type == "cuda"
            _assert_close(g, wg, FP32_TOL, f"{impl} grad {name}")
    _alive()


@pytest.mark.parametrize("mode", MODES)
def test_cuda_matching_uses_solver_without_check_and_cuda_kernels(mode, monkeypatch):
    calls = []
    real = assignment_mod.matching_permutation

    def spy(cost, *args, **kwargs):
        calls.append((cost.device.type, kwargs.get("check", True)))
        return real(cost, *args, **kwargs)

    monkeypatch.setattr(assignment_mod, "matching_permutation", spy)  # retrieve imports it at call time
    inputs, _ = _inputs(64, 64, seed=2)
    retrieve_and_propagate(*inputs, mode=mode)
    torch.cuda.synchronize()
    assert calls == ([("cuda", False)] if mode == "hungarian" else [])  # no host sync on CUDA
    if _HAS_KERNELS:  # the fast path runs the compiled ops on CUDA tensors
        assert all(rk._use_cuda_kernel(op, inputs[0]) for op in ("cosine_cost", "gather_rows_add"))


# ----------------------------------------------------------------------------- bfloat16 autocast

@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("P,Q", SHAPES)
def test_cuda_randp_bf16_autocast(impl, mode, P, Q):
    inputs, inputs64 = _inputs(P, Q, seed=3)
    g_out = torch.randn(B, Q, D, device="cuda")
    _, perm32, _ = _run(inputs, g_out, mode=mode, impl=impl)
    out, perm, grads = _run(inputs, g_out, autocast_dtype=torch.bfloat16, mode=mode, impl=impl)
    assert out.dtype == torch.bfloat16 and out.shape == (B, Q, D)
    # The matching is computed in float32 under autocast: exactly the float32 run's.
    assert torch.equal(perm, perm32)
    want, want_grads = _oracle64(inputs64, perm, g_out.bfloat16().float())
    _assert_close(out, want, BF16_TOL, f"{impl} bf16 output")
    for name, g, wg in zip(("x_pi", "x_pl", "x_qi", "x_ql", "weight", "bias"), grads, want_grads):
        assert g.dtype == torch.float32  # gradients of float32 leaves stay float32
        _assert_close(g, wg, BF16_TOL, f"{impl} bf16 grad {name}")
    _alive()


# ----------------------------------------------------------------------------- NaN token

@pytest.mark.parametrize("kernels", ["compiled", "fallback"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_nan_token_gives_nan_rows_without_device_assert(mode, impl, kernels, monkeypatch):
    """A NaN prompt token in batch item 1: that item's rows are NaN, items 0 and 2 are right.

    Hungarian: the item's cost matrix holds NaN, the solver (``check=False`` on
    CUDA, see ``retrieve._matching_permutation``) marks it failed with perm = -1
    and both impls turn -1 into NaN rows. Greedy: ``argmin`` propagates NaN, so
    every query token picks the NaN token and its rows are NaN.
    """
    if kernels == "fallback":  # no compiled kernels: the PyTorch paths on CUDA
        monkeypatch.setattr(rk, "_use_cuda_kernel", lambda op, t: False)
    elif not _HAS_KERNELS:
        pytest.skip("vicl_fast._C built without the RandP CUDA kernels")
    P = Q = 64
    bad_item, bad_token, good = 1, 5, [0, 2]
    inputs, inputs64 = _inputs(P, Q, seed=4)
    inputs[0][bad_item, bad_token] = float("nan")
    g_out = torch.randn(B, Q, D, device="cuda")
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, perm = retrieve_and_propagate(*leaves, mode=mode, impl=impl, return_perm=True)
    # Backward through a loss on the healthy items only (the NaN rows are constants).
    grads = torch.autograd.grad((out[good] * g_out[good]).sum(), leaves[:4])
    _alive()  # no exception above and no device-side assert
    if mode == "hungarian":
        assert (perm[bad_item] == -1).all()
    else:
        assert (perm[bad_item] == bad_token).all()
    assert torch.isnan(out[bad_item]).all()
    # The healthy items: as if item 1 did not exist, float64 on the CPU with the CPU's matching.
    sub64 = [t[good] for t in inputs64[:4]] + inputs64[4:]
    sim = cos64(sub64[0], sub64[2])
    if mode == "hungarian":
        cost = rk.cosine_cost(inputs[0], inputs[2])[good]  # the costs the solver saw (item 1's hold NaN)
        assert torch.isfinite(cost).all()
        assert torch.equal(perm[good].cpu(), matching_permutation(cost.cpu()))
        torch.testing.assert_close(_total(sim, perm[good]), _total(sim, scipy_perm(sim)),
                                   rtol=0, atol=2 * Q * COS_TOL)
    else:
        chosen = sim.gather(1, perm[good].cpu()[:, None, :])[:, 0]
        assert (chosen >= sim.max(1).values - 2 * COS_TOL).all()
    want, want_grads = _oracle64(sub64, perm[good], g_out[good])
    _assert_close(out[good], want, FP32_TOL, "healthy items' output")
    for name, g, wg in zip(("x_pi", "x_pl", "x_qi", "x_ql"), grads, want_grads[:4]):
        _assert_close(g[good], wg, FP32_TOL, f"healthy items' grad {name}")
