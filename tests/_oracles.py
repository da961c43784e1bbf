"""Independent references shared by several test files (float64 / SciPy / PyTorch's FLOP counter).

Importable from every test folder as ``from tests._oracles import ...`` (tests/ is a package; pytest puts
the repository root on ``sys.path``).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa
from torch.utils.flop_counter import FlopCounterMode


def cos64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, P, D), (B, Q, D) -> (B, P, Q) cosine similarity in float64, on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).transpose(1, 2)


def scipy_perm(sim: torch.Tensor) -> torch.Tensor:
    """perm[b, q] = prompt row assigned to query column q, maximising the total similarity (SciPy)."""
    out = []
    for s in sim.cpu().numpy():
        r, c = scipy_lsa(-s)
        perm = np.empty(s.shape[1], dtype=np.int64)
        perm[c] = r
        out.append(perm)
    return torch.from_numpy(np.stack(out))


def count_forward_flops(model, side: int) -> tuple[dict, dict]:
    """FLOPs of a Neuroverse3D forward on meta-device inputs (no compute), both paths, L in {1, 2}.

    The model must have been built under ``torch.device("meta")``. Returns
    ``({(fast, L): total FLOPs}, {(fast, L): per-module FLOP counts})``.
    """
    S = (side,) * 3
    model.check_finite = False
    totals, per_module = {}, {}
    with torch.device("meta"):
        t = torch.empty(1, 1, *S)
        for fast in (False, True):
            for L in (1, 2):
                ci = torch.empty(1, L, 1, *S)
                fc = FlopCounterMode(display=False)
                with fc, torch.no_grad():
                    model(t, ci, ci, fast=fast)
                totals[fast, L] = fc.get_total_flops()
                per_module[fast, L] = fc.get_flop_counts()
    return totals, per_module
