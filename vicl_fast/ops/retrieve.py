"""RandP retrieve-and-propagate: normalise, similarity, match, gather, fuse.

The prompt-query fusion of RandP (seeds/000_*.txt, Eq. 3-4 and Algorithm 1):

    S = Norm(M_pi) Norm(M_qi)^T                      cosine similarity (B, P, Q)
    perm = Hungarian(-S)  (or greedy argmax)         perm[b, q] = prompt token for query token q
    X = Linear(Concat[X_pi[perm], X_pl[perm], X_qi, X_ql])     (B, Q, D)

where ``M`` are the tokens matched on (the shallow-ViT outputs X, Algorithm 1,
or the patch embeddings Z, Eq. 3; chosen by the caller).

Fast form (``impl="fast"``). The fusion Linear ``W = [W1 | W2 | W3 | W4]`` (D x 4D)
splits into four D x D blocks, and a row gather commutes with a right matrix
product: ``X_pi[perm] W1^T = (X_pi W1^T)[perm]``. So

    P = X_pi W1^T + X_pl W2^T            on the unpermuted prompt tokens
    fused = gather_rows_add(P, perm, X_qi W3^T + X_ql W4^T + b)

which never materialises the two gathered (B, Q, D) copies nor the (B, Q, 4D)
concat; the FLOPs are those of the literal form. ``gather_rows_add`` has a CUDA
kernel (deterministic scatter backward) behind it. ``impl="reference"`` is the
literal concat form (the test oracle).

Gradients flow through the gathered tokens and the fusion weights; the
matching is a constant (computed under ``no_grad`` from detached tokens).
The similarity is computed in float32 even under ``torch.autocast``.

Third mode, ``"merge"`` (Table 6, "Patch Merge", the Painter/MVG mechanism):
spatially aligned tokens are averaged, ``(X_pi + X_pl + X_qi + X_ql) / 4``,
no matching and no Linear (Painter averages its two streams, ``(x + y) / 2``;
averaging rather than summing keeps the scale of a single stream, which only
matters up to the next block's LayerNorm).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vicl_fast.ops.randp_kernels import clamp_row_index, cosine_cost, gather_rows_add

__all__ = ["retrieve_and_propagate", "retrieve_and_propagate_reference", "match_tokens", "MODES"]

MODES = ("hungarian", "greedy", "merge")
Mode = Literal["hungarian", "greedy", "merge"]


def _matching_permutation(cost: torch.Tensor) -> torch.Tensor:
    # Imported lazily: the solver module loads the compiled extension.
    from vicl_fast.ops.assignment import matching_permutation
    # Check the solver's status only on real CPU data. On CUDA the check is a
    # device-to-host sync per forward: costs are finite unless the tokens hold
    # NaN/inf, and then a failed matrix gets perm = -1, which the CUDA gather
    # turns into NaN rows (visible, no crash). Meta / fake tensors (shape-only
    # MAC counting, torch.compile tracing) have no values to check. The
    # reference (literal concat) form gives the same NaN rows.
    return matching_permutation(cost, check=cost.device.type == "cpu" and not _is_fake(cost))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _check_tokens(**tensors: torch.Tensor) -> None:
    ref_name, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be (B, N, D) tokens, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.shape[0] != ref.shape[0] or t.shape[2] != ref.shape[2]:
            raise ValueError(f"{name} {tuple(t.shape)} and {ref_name} {tuple(ref.shape)} must agree "
                             "in batch B and width D")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} on {ref.device}: move both to one device")


def match_tokens(m_pi: torch.Tensor, m_qi: torch.Tensor, mode: Mode = "hungarian") -> torch.Tensor:
    """Match prompt tokens to query tokens by cosine similarity.

    Args:
        m_pi: (B, P, D') prompt-image tokens to match on.
        m_qi: (B, Q, D') query-image tokens to match on.
        mode: ``"hungarian"``: exact one-to-one assignment maximising the total
            cosine similarity (needs P >= Q; every prompt token used once when
            P == Q), batched, on the input's device. ``"greedy"``: the most
            similar prompt token per query token (repeats allowed).
    Returns:
        perm (B, Q) int64: ``perm[b, q]`` = prompt token matched to query token q.
        A constant (no gradient).
    """
    _check_tokens(m_pi=m_pi, m_qi=m_qi)
    cost = cosine_cost(m_pi, m_qi)  # (B, P, Q) float32, detached, autocast off
    if mode == "hungarian":
        if m_pi.shape[1] < m_qi.shape[1]:
            raise ValueError(f"hungarian matching needs at least as many prompt tokens as query tokens, got "
                             f"P={m_pi.shape[1]} < Q={m_qi.shape[1]}; use mode='greedy' or a larger prompt")
        return _matching_permutation(cost)
    if mode == "greedy":
        return cost.argmin(dim=1)  # lowest cost = highest similarity; ties -> lowest index
    raise ValueError(f"mode must be 'hungarian' or 'greedy' for matching, got {mode!r}")


def _check_fusion(x_pi, x_pl, x_qi, x_ql, weight, bias, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_tokens(x_pi=x_pi, x_pl=x_pl, x_qi=x_qi, x_ql=x_ql)
    if x_pl.shape[1] != x_pi.shape[1]:
        raise ValueError(f"x_pl must have as many tokens as x_pi ({x_pi.shape[1]}), got {x_pl.shape[1]}")
    if x_ql.shape[1] != x_qi.shape[1]:
        raise ValueError(f"x_ql must have as many tokens as x_qi ({x_qi.shape[1]}), got {x_ql.shape[1]}")
    if mode == "merge":
        if x_pi.shape[1] != x_qi.shape[1]:
            raise ValueError(f"merge mode averages spatially aligned tokens: prompt and query need the same "
                             f"token count, got {x_pi.shape[1]} and {x_qi.shape[1]}")
        return
    D = x_pi.shape[2]
    if weight is None:
        raise ValueError(f"mode {mode!r} needs the fusion weight (D, 4D); only mode='merge' runs without it")
    if weight.shape != (D, 4 * D):
        raise ValueError(f"weight must be (D, 4D) = ({D}, {4 * D}) for Linear(4D -> D), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be (D,) = ({D},), got {tuple(bias.shape)}")


def retrieve_and_propagate_reference(x_pi: torch.Tensor, x_pl: torch.Tensor, x_qi: torch.Tensor,
                                     x_ql: torch.Tensor, weight: torch.Tensor | None,
                                     bias: torch.Tensor | None, perm: torch.Tensor | None,
                                     mode: Mode = "hungarian") -> torch.Tensor:
    """Literal form of Eq. 4: ``Linear(Concat[X_pi[perm], X_pl[perm], X_qi, X_ql])``.

    Args:
        x_pi, x_pl: (B, P, D) prompt image / label tokens.
        x_qi, x_ql: (B, Q, D) query image / label ([MASK]) tokens.
        weight: (D, 4D), bias: (D,) or None (unused for ``mode="merge"``).
        perm: (B, Q) int64 matching (unused for ``mode="merge"``). An index
            outside [0, P) (-1 marks a failed matching, see
            :func:`_matching_permutation`) gives a NaN output row, as the
            fast path's CUDA gather does.
    Returns:
        (B, Q, D).
    """
    _check_fusion(x_pi, x_pl, x_qi, x_ql, weight, bias, mode)
    if mode == "merge":
        return (x_pi + x_pl + x_qi + x_ql) * 0.25
    # No host sync (the matching runs with check=False on CUDA): out-of-range indices (-1: a failed
    # matching) gather row 0 and their output rows are blanked below.
    idx, valid = clamp_row_index(perm, x_pi.shape[1])
    idx = idx[..., None].expand(-1, -1, x_pi.shape[2])
    cat = torch.cat([x_pi.gather(1, idx), x_pl.gather(1, idx), x_qi, x_ql], dim=-1)
    out = F.linear(cat, weight, bias)
    return torch.where(valid[..., None], out, float("nan"))


def _fast_fuse(x_pi, x_pl, x_qi, x_ql, weight, bias, perm) -> torch.Tensor:
    D = x_pi.shape[2]
    w1, w2, w3, w4 = weight.split(D, dim=1)  # each (D, D): views, gradients land in `weight`
    # Prompt side on the unpermuted tokens, query side with the bias; two GEMMs
    # each, accumulated in place of a concat (no (B, N, 2D) copy).
    p = F.linear(x_pi, w1)
    p = p + F.linear(x_pl, w2)
    q = F.linear(x_qi, w3, bias)
    q = q + F.linear(x_ql, w4)
    return gather_rows_add(p, perm, q)


def retrieve_and_propagate(x_pi: torch.Tensor, x_pl: torch.Tensor, x_qi: torch.Tensor, x_ql: torch.Tensor,
                           fuse_weight: torch.Tensor | None = None, fuse_bias: torch.Tensor | None = None,
                           mode: Mode = "hungarian", match_on: tuple[torch.Tensor, torch.Tensor] | None = None,
                           impl: Literal["fast", "reference"] = "fast",
                           perm: torch.Tensor | None = None, return_perm: bool = False):
    """RandP prompt-query fusion (see the module docstring).

    Args:
        x_pi: (B, P, D) prompt-image tokens (X_pi).
        x_pl: (B, P, D) prompt-label tokens (X_pl), aligned with ``x_pi``.
        x_qi: (B, Q, D) query-image tokens (X_qi).
        x_ql: (B, Q, D) query-label tokens (the [MASK] token after the shallow ViT).
        fuse_weight: (D, 4D) weight of the fusion ``Linear(4D -> D)``, input
            order ``[pi, pl, qi, ql]``; None only for ``mode="merge"``.
        fuse_bias: (D,) or None.
        mode: ``"hungarian"`` (one-to-one, P >= Q), ``"greedy"`` (argmax per
            query token, repeats allowed) or ``"merge"`` (aligned average, P == Q).
        match_on: None to match on ``(x_pi, x_qi)``; else a pair
            ``(m_pi (B, P, D'), m_qi (B, Q, D'))`` to compute the similarity on
            (e.g. the patch embeddings Z of Eq. 3).
        impl: ``"fast"`` (factorised GEMMs + ``gather_rows_add``) or
            ``"reference"`` (literal concat + Linear).
        perm: a precomputed matching (B, Q) (e.g. from :func:`match_tokens`
            issued earlier); then ``match_on`` is ignored.
        return_perm: also return the matching.
    Returns:
        fused (B, Q, D), or ``(fused, perm (B, Q) int64 | None)`` with ``return_perm``.
    """
    _check_fusion(x_pi, x_pl, x_qi, x_ql, fuse_weight, fuse_bias, mode)
    if impl not in ("fast", "reference"):
        raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
    if mode == "merge":
        out = retrieve_and_propagate_reference(x_pi, x_pl, x_qi, x_ql, None, None, None, mode)
        return (out, None) if return_perm else out
    if perm is None:
        m_pi, m_qi = (x_pi, x_qi) if match_on is None else match_on
        if m_pi.shape[:2] != x_pi.shape[:2] or m_qi.shape[:2] != x_qi.shape[:2]:
            raise ValueError(f"match_on tokens {tuple(m_pi.shape)} / {tuple(m_qi.shape)} must have the batch "
                             f"and token counts of x_pi {tuple(x_pi.shape)} / x_qi {tuple(x_qi.shape)}")
        perm = match_tokens(m_pi, m_qi, mode)
    elif perm.shape != x_qi.shape[:2]:
        raise ValueError(f"perm must be (B, Q) = {tuple(x_qi.shape[:2])}, got {tuple(perm.shape)}")
    if impl == "reference":
        out = retrieve_and_propagate_reference(x_pi, x_pl, x_qi, x_ql, fuse_weight, fuse_bias, perm, mode)
    else:
        out = _fast_fuse(x_pi, x_pl, x_qi, x_ql, fuse_weight, fuse_bias, perm)
    return (out, perm) if return_perm else out
