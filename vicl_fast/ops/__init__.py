"""Public ops of vicl_fast (compiled kernels with reference fallbacks)."""
from __future__ import annotations

from vicl_fast.ops.assignment import linear_sum_assignment, lsa_backend, matching_permutation

__all__: list[str] = ["linear_sum_assignment", "matching_permutation", "lsa_backend"]
