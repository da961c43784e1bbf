"""Small, checked runs of vicl_fast's CUDA kernels, for compute-sanitizer (GPU pass stage 5).

    compute-sanitizer --tool memcheck python tools/gpu_sanitize_case.py all
    python tools/gpu_sanitize_case.py all --device cpu      # the same cases on the CPU paths

Cases (small: every kernel launch runs under the sanitizer's instrumentation):

- ``solver``: the batched assignment kernel on odd rectangular shapes both ways, forbidden
  (+inf) pairs, one infeasible matrix (status != 0, no crash), a 64 x 64 cosine batch; answers
  equal to the CPU kernel's (or to SciPy's totals without the extension).
- ``randp``: the fused cosine cost, the gather-add forward and its scatter backward, with a
  repeated index (greedy matching), a misaligned (storage offset 1) source, bf16, and the
  out-of-range index (-1) that must give NaN rows, not a fault.

Exit status 0 when every check holds; an assertion names the first that does not.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def case_solver(device: str) -> None:
    from vicl_fast import _ext
    from vicl_fast.ops.assignment import linear_sum_assignment

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 17, 23), (2, 23, 17), (4, 64, 64), (1, 1, 5)]
    for B, N, M in shapes:
        cost = torch.rand(B, N, M, generator=g)
        if N == 17:
            cost[0, 2, ::3] = float("inf")  # forbidden pairs, still feasible
        rows, cols = linear_sum_assignment(cost.to(device), check=False)
        _sync(device)
        for b in range(B):
            x = cost[b].double().numpy()
            r, c = scipy_lsa(x)
            got = x[rows[b].cpu().numpy(), cols[b].cpu().numpy()].sum()
            assert abs(got - x[r, c].sum()) < 1e-9, f"solver {B}x{N}x{M}[{b}]: total {got} != SciPy {x[r, c].sum()}"
        if device == "cuda" and _ext.has_kernel("linear_sum_assignment", "CPU"):
            r_cpu, c_cpu = linear_sum_assignment(cost, check=False)
            assert torch.equal(cols.cpu(), c_cpu) and torch.equal(rows.cpu(), r_cpu), \
                f"solver {B}x{N}x{M}: CUDA answer differs from the CPU kernel's"
    # An infeasible matrix (a row of +inf) among feasible ones: flagged, never a fault.
    cost = torch.rand(3, 9, 9, generator=g)
    cost[1, 4, :] = float("inf")
    op = torch.ops.vicl_fast.linear_sum_assignment if _ext.has_kernel("linear_sum_assignment", "CPU") else None
    if op is not None:
        _, c, status = op(cost.to(device), False)
        _sync(device)
        assert int(status[1]) != 0 and int(status[0]) == 0 and int(status[2]) == 0, \
            f"solver: infeasible matrix status {status.tolist()}"
    # The cosine costs RandP solves.
    a = torch.nn.functional.normalize(torch.randn(4, 64, 48, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 64, 48, generator=g), dim=-1)
    cost = -(a @ b.transpose(1, 2))
    rows, cols = linear_sum_assignment(cost.to(device), check=False)
    _sync(device)
    for i in range(4):
        x = cost[i].double().numpy()
        r, c = scipy_lsa(x)
        assert abs(x[rows[i].cpu().numpy(), cols[i].cpu().numpy()].sum() - x[r, c].sum()) < 1e-9, "solver cosine"
    print(f"solver ({device}): ok")


def case_randp(device: str) -> None:
    from vicl_fast.ops.randp_kernels import cosine_cost, cosine_cost_reference, gather_rows_add, \
        gather_rows_add_reference

    g = torch.Generator().manual_seed(1)
    B, P, Q, D = 2, 33, 40, 24
    a = torch.randn(B, P, D, generator=g)
    b = torch.randn(B, Q, D, generator=g)
    got = cosine_cost(a.to(device), b.to(device)).cpu()
    want = cosine_cost_reference(a.double(), b.double())
    assert (got.double() - want).abs().max() < 1e-5, "cosine_cost"
    got16 = cosine_cost(a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)).cpu()
    assert (got16.double() - want).abs().max() < 3e-2, "cosine_cost bf16"

    index = torch.randint(0, P, (B, Q), generator=g)
    index[:, 1] = index[:, 0]  # a repeated row: the backward must accumulate it
    for offset in (0, 1):  # offset 1: a source not aligned to 16 bytes
        buf = torch.randn(B * P * D + offset, generator=g)
        src = buf[offset:].view(B, P, D)
        assert src.storage_offset() == offset
        add = torch.randn(B, Q, D, generator=g)
        src_d = src.to(device) if device == "cpu" else buf.to(device)[offset:].view(B, P, D)
        assert src_d.storage_offset() == offset
        s1 = src_d.detach().requires_grad_()
        a1 = add.to(device).detach().requires_grad_()
        out = gather_rows_add(s1, index.to(device), a1)
        go = torch.randn(B, Q, D, generator=g)
        out.backward(go.to(device))
        _sync(device)
        s2 = src.detach().double().requires_grad_()
        a2 = add.detach().double().requires_grad_()
        ref = gather_rows_add_reference(s2, index, a2)
        ref.backward(go.double())
        assert (out.detach().cpu().double() - ref.detach()).abs().max() < 1e-5, f"gather offset {offset}"
        assert (s1.grad.cpu().double() - s2.grad).abs().max() < 1e-5, f"scatter offset {offset}"
        assert (a1.grad.cpu().double() - a2.grad).abs().max() < 1e-6, f"grad add offset {offset}"
    out16 = gather_rows_add(src.to(device, torch.bfloat16), index.to(device), None)
    _sync(device)
    assert torch.equal(out16.cpu(), gather_rows_add_reference(src.bfloat16(), index)), "gather bf16"
    if device == "cuda":  # a failed matching (-1) gives NaN rows on CUDA, never an out-of-bounds read
        bad = index.clone()
        bad[1] = -1
        out = gather_rows_add(src.to(device), bad.to(device), None)
        torch.cuda.synchronize()
        assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all(), "index -1 -> NaN rows"
    print(f"randp kernels ({device}): ok")


CASES = {"solver": case_solver, "randp": case_randp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("case", choices=[*CASES, "all"])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_case: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    np.random.seed(0)
    if a.device == "cuda":  # sanitize OUR kernels: without them the cases would check torch fallbacks
        from vicl_fast import _ext
        missing = [op for op in ("linear_sum_assignment", "cosine_cost", "gather_rows_add", "scatter_rows_add")
                   if not _ext.has_kernel(op, "CUDA")]
        if missing:
            print(f"gpu_sanitize_case: vicl_fast._C has no CUDA kernel for {', '.join(missing)}", file=sys.stderr)
            return 3
    for name in (CASES if a.case == "all" else [a.case]):
        CASES[name](a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
