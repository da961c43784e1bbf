"""Thread-parallel map for NumPy/SciPy work that releases the GIL (``scipy.ndimage`` resampling,
filters, morphology): the volumes of one step are independent, and a 2-core CPU otherwise leaves a
core idle between the model's multi-threaded passes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["thread_map", "worker_count"]


def worker_count() -> int:
    """Threads to use: PyTorch's intra-op thread count (it follows ``OMP_NUM_THREADS`` and
    ``torch.set_num_threads``, so a run pinned to one thread stays on one)."""
    import torch

    return max(1, torch.get_num_threads())


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads (default :func:`worker_count`), in order.

    Results are the same as the serial loop's (each call is independent); the first exception
    raised by a call is re-raised here.
    """
    todo = list(items)
    n = min(len(todo), workers or worker_count())
    if n <= 1:
        return [fn(x) for x in todo]
    with ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(fn, todo))
