"""Distributed set-up: one process, or ``torchrun`` (single or multi-node) with DDP.

``torchrun --nproc-per-node N`` (``python -m torch.distributed.run``) sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them, picks NCCL when the process drives a
CUDA device and gloo otherwise, and binds each process to ``cuda:LOCAL_RANK``.
Without those variables it is a plain single process. The same config runs on
1 or N processes: ``train.batch_size`` is per process, episode ``(step, slot)``
has slot ``rank * batch_size + b``, so N processes see N x batch_size episodes
per step, and rank 0 alone logs and writes checkpoints.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "cleanup", "wrap_model", "unwrap", "all_reduce_sum", "barrier",
           "broadcast_flag"]

log = logging.getLogger("vicl_fast.training")


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (set by torchrun)") from None


def init_distributed(device: str = "auto") -> DistEnv:
    """Detect torchrun's environment, pick the device and start the process group.

    Args:
        device: "auto" (CUDA if available), "cpu" or "cuda".
    """
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local = _int_env("LOCAL_RANK", 0)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use device: auto or cpu")
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise ValueError(f"LOCAL_RANK={local} but only {n} CUDA device(s) are visible; start at most {n} "
                             "processes per node (--nproc-per-node)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank, local, world, dev, None)
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; run a single process")
        if not dist.is_initialized():
            kwargs = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
            if use_cuda:
                kwargs["device_id"] = dev
            try:
                dist.init_process_group(**kwargs)
            except TypeError:  # older torch without device_id
                kwargs.pop("device_id", None)
                dist.init_process_group(**kwargs)
        env.backend = backend
    return env


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP around ``model`` when distributed (parameters are broadcast from rank 0), else ``model``."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # device_ids=None: the module already lives on its device, and DDP then leaves the inputs
    # where they are, so APSP can stream contexts from (pinned) host memory one mini-context at a time.
    return DDP(model, device_ids=None, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module) \
        else model


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over processes (in place; a no-op on one process)."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """Rank 0's boolean on every process (e.g. 'stop now')."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=env.device if env.backend == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())
