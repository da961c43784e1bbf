"""retrieve_and_propagate: fast form == literal form, matching semantics, precision, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vicl_fast.ops.retrieve as retrieve_mod
from vicl_fast.ops.retrieve import match_tokens, retrieve_and_propagate, retrieve_and_propagate_reference

from tests._oracles import cos64, scipy_perm


def _tokens(B=2, P=9, Q=9, D=8, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(1)
    mk = lambda n: torch.randn(B, n, D, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    w = (torch.randn(D, 4 * D, generator=g, dtype=dtype) / (2 * D) ** 0.5).requires_grad_(grad)
    b = torch.randn(D, generator=g, dtype=dtype).requires_grad_(grad)
    return mk(P), mk(P), mk(Q), mk(Q), w, b


@pytest.mark.parametrize("mode", ["hungarian", "greedy"])
@pytest.mark.parametrize("P", [9, 13])
def test_fast_equals_reference_values_and_grads(mode, P):
    inputs = _tokens(P=P)
    fast, perm = retrieve_and_propagate(*inputs, mode=mode, impl="fast", return_perm=True)
    g_out = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, inputs, g_out)
    ref = retrieve_and_propagate_reference(*inputs, perm=perm, mode=mode)
    grads_ref = torch.autograd.grad(ref, inputs, g_out)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for gf, gr in zip(grads_fast, grads_ref):
        torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-12)


def test_reference_matches_handwritten_concat():
    x_pi, x_pl, x_qi, x_ql, w, b = _tokens(B=1, P=5, Q=5, D=4)
    out, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, return_perm=True)
    # Per query token: concat of the matched prompt tokens and the query tokens, times W^T, plus b.
    for q in range(5):
        p = int(perm[0, q])
        v = torch.cat([x_pi[0, p], x_pl[0, p], x_qi[0, q], x_ql[0, q]])
        torch.testing.assert_close(out[0, q], w @ v + b)


def test_hungarian_is_one_to_one_and_optimal():
    x_pi, x_pl, x_qi, x_ql, w, b = _tokens(B=3, P=16, Q=16, D=8)
    _, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, mode="hungarian", return_perm=True)
    for row in perm:  # every prompt token used exactly once
        assert sorted(row.tolist()) == list(range(16))
    sim = cos64(x_pi, x_qi)
    ours = sim.gather(1, perm[:, None, :]).sum((1, 2))
    best = sim.gather(1, scipy_perm(sim)[:, None, :]).sum((1, 2))
    torch.testing.assert_close(ours, best, rtol=0, atol=1e-9)


def test_hungarian_rectangular_prompt_larger():
    x_pi, x_pl, x_qi, x_ql, w, b = _tokens(B=2, P=12, Q=7, D=8)
    out, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, return_perm=True)
    assert out.shape == (2, 7, 8)
    for row in perm:
        assert len(set(row.tolist())) == 7 and 0 <= int(row.min()) and int(row.max()) < 12


def test_greedy_is_argmax_and_may_repeat_while_hungarian_does_not():
    B, N, D = 2, 6, 8
    g = torch.Generator().manual_seed(3)
    x_qi = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    hub = x_qi.mean(1, keepdim=True)  # one prompt token close to every query token
    x_pi = torch.cat([hub * 10, -x_qi[:, 1:]], dim=1)
    x_pl, x_ql = torch.randn(B, N, D, generator=g, dtype=torch.float64), torch.zeros(B, N, D, dtype=torch.float64)
    w, b = torch.randn(D, 4 * D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    _, pg = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, mode="greedy", return_perm=True)
    assert torch.equal(pg, cos64(x_pi, x_qi).argmax(1))
    assert any(len(set(r.tolist())) < N for r in pg)  # repeats
    _, ph = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, mode="hungarian", return_perm=True)
    assert all(len(set(r.tolist())) == N for r in ph)


def test_greedy_repeated_index_accumulates_gradient():
    x_pi, x_pl, x_qi, x_ql, w, b = _tokens(B=1, P=4, Q=4, D=4)
    perm = torch.tensor([[2, 2, 2, 0]])
    out = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, mode="greedy", perm=perm)
    (gpi,) = torch.autograd.grad(out.sum(), x_pi)
    w1 = w.detach()[:, :4]
    col = w1.sum(0)  # d(sum_j out_j)/d x_pi[p] = W1^T 1 per use
    torch.testing.assert_close(gpi[0, 2], 3 * col)
    torch.testing.assert_close(gpi[0, 0], col)
    assert torch.all(gpi[0, [1, 3]] == 0)


def test_merge_mode_is_the_aligned_average():
    x_pi, x_pl, x_qi, x_ql, _, _ = _tokens()
    out, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, mode="merge", return_perm=True)
    assert perm is None
    torch.testing.assert_close(out, (x_pi + x_pl + x_qi + x_ql) / 4)


def test_matching_is_a_constant_and_match_on_is_used():
    x_pi, x_pl, x_qi, x_ql, w, b = _tokens(P=9, Q=9)
    g = torch.Generator().manual_seed(7)
    m_pi = torch.randn(2, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    m_qi = torch.randn(2, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, match_on=(m_pi, m_qi), return_perm=True)
    assert torch.equal(perm, scipy_perm(cos64(m_pi, m_qi)))
    out.sum().backward()
    assert m_pi.grad is None and m_qi.grad is None  # no gradient through the matching
    assert x_pi.grad is not None and x_pl.grad is not None


def test_similarity_in_float32_under_autocast(monkeypatch):
    # Tokens u + delta * a: every cosine is 1 - O(delta^2), so the optimum is decided by
    # differences ~1e-5, far below bfloat16 resolution (~8e-3) but easy for float32.
    import itertools
    B, N, D, delta = 1, 4, 64, 3e-3
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    x_pi = (u + delta * torch.randn(N, D, generator=g, dtype=torch.float64))[None].float()
    x_qi = (u + delta * torch.randn(N, D, generator=g, dtype=torch.float64))[None].float()
    sim = cos64(x_pi, x_qi)
    totals = sorted(float(sum(sim[0, p[q], q] for q in range(N))) for p in itertools.permutations(range(N)))
    assert totals[-1] - totals[-2] > 1e-6  # a unique optimum, by a float32-resolvable margin
    seen = {}
    real = retrieve_mod._matching_permutation

    def spy(cost):
        seen["cost"] = cost
        return real(cost)

    monkeypatch.setattr(retrieve_mod, "_matching_permutation", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        perm = match_tokens(x_pi, x_qi, "hungarian")
        perm_greedy = match_tokens(x_pi, x_qi, "greedy")
    cost = seen["cost"]
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost.double(), -sim, rtol=0, atol=1e-6)
    assert torch.equal(perm, scipy_perm(sim))
    assert torch.equal(perm_greedy, sim.argmax(1))
    # Sanity: a bfloat16 similarity errs by more than the optimality margin.
    sim_bf16 = F.normalize(x_pi.bfloat16(), dim=-1) @ F.normalize(x_qi.bfloat16(), dim=-1).transpose(1, 2)
    assert float((sim_bf16.double() - sim).abs().max()) > 10 * (totals[-1] - totals[-2])


def test_fused_output_under_autocast_is_bf16_and_close():
    x_pi, x_pl, x_qi, x_ql, w, b = (t.detach().float() for t in _tokens())
    ref, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, return_perm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, perm=perm)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_errors():
    x_pi, x_pl, x_qi, x_ql, w, b = _tokens(grad=False)
    with pytest.raises(ValueError, match="mode"):
        retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, mode="nearest")
    with pytest.raises(ValueError, match=r"\(D, 4D\)"):
        retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w[:, :-1], b)
    with pytest.raises(ValueError, match="weight"):
        retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, None, None)
    with pytest.raises(ValueError, match="P=3 < Q=9"):
        retrieve_and_propagate(x_pi[:, :3], x_pl[:, :3], x_qi, x_ql, w, b)
    with pytest.raises(ValueError, match="same token count"):
        retrieve_and_propagate(x_pi[:, :3], x_pl[:, :3], x_qi, x_ql, mode="merge")
    with pytest.raises(ValueError, match="width D"):
        retrieve_and_propagate(x_pi, x_pl, x_qi[..., :4], x_ql, w, b)
    with pytest.raises(ValueError, match="x_pl"):
        retrieve_and_propagate(x_pi, x_pl[:, :4], x_qi, x_ql, w, b)
    with pytest.raises(TypeError, match="floating"):
        retrieve_and_propagate(x_pi.long(), x_pl, x_qi, x_ql, w, b)
    with pytest.raises(ValueError, match="perm"):
        retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, perm=torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- failed matchings (perm = -1)
# On CUDA the matching runs with check=False (no host sync): a matrix the solver
# rejects (NaN tokens -> NaN costs) gets perm = -1. Both impls must turn that
# into NaN output rows, never a device-side assert (issue 11 (g)).

_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _alive(device):
    """The device context still works after the op (a device-side assert would poison it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        assert float(torch.ones(4, device=device).sum()) == 4.0


@pytest.mark.parametrize("device", _DEVICES)
def test_reference_failed_matching_gives_nan_rows(monkeypatch, device):
    from vicl_fast.ops.assignment import matching_permutation

    if device == "cpu":  # CPU checks by default and would raise: force the CUDA behaviour
        monkeypatch.setattr(retrieve_mod, "_matching_permutation",
                            lambda cost: matching_permutation(cost, check=False))
    x_pi, x_pl, x_qi, x_ql, w, b = (t.detach().float().to(device) for t in _tokens(B=3, P=9, Q=9, D=8))
    x_pi[1, 4] = float("nan")  # one NaN prompt token in batch item 1
    out, perm = retrieve_and_propagate(x_pi, x_pl, x_qi, x_ql, w, b, impl="reference", return_perm=True)
    _alive(device)
    assert out.shape == (3, 9, 8) and out.device.type == device
    assert (perm[1] == -1).all()
    assert torch.isnan(out[1]).all()
    good = [0, 2]
    assert torch.isfinite(out[good]).all()
    # The other items: as if batch item 1 did not exist (float64 CPU recomputation, scipy matching).
    args64 = [t[good].double().cpu() for t in (x_pi, x_pl, x_qi, x_ql)]
    want_perm = scipy_perm(cos64(args64[0], args64[2]))
    assert torch.equal(perm[good].cpu(), want_perm)
    want = retrieve_and_propagate_reference(*args64, w.double().cpu(), b.double().cpu(), want_perm)
    torch.testing.assert_close(out[good].double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", _DEVICES)
def test_reference_negative_index_rows_are_nan_with_finite_grads(device):
    tokens = _tokens(B=2, P=5, Q=4, D=4)
    x_pi, x_pl, x_qi, x_ql, w, b = (t.detach().to(device).requires_grad_() for t in tokens)
    perm = torch.tensor([[4, -1, 0, 2], [-1, -1, -1, -1]], device=device)
    out = retrieve_and_propagate_reference(x_pi, x_pl, x_qi, x_ql, w, b, perm)
    _alive(device)
    nan_rows = (perm < 0).cpu()
    assert torch.isnan(out.detach().cpu()[nan_rows]).all()
    assert torch.isfinite(out.detach().cpu()[~nan_rows]).all()
    # Valid rows: the literal concat form, by hand.
    for q in (0, 2, 3):
        p = int(perm[0, q])
        v = torch.cat([x_pi[0, p], x_pl[0, p], x_qi[0, q], x_ql[0, q]])
        torch.testing.assert_close(out[0, q], w @ v + b)
    # A loss over the valid rows back-propagates finite gradients (the NaN rows are constants).
    grads = torch.autograd.grad(out[~nan_rows.to(device)].sum(), (x_pi, x_pl, x_qi, x_ql, w, b))
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[2][1] == 0).all() and (grads[0][1] == 0).all()  # item 1 has no valid row
