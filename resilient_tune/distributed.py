"""Rank helpers for the training callbacks: torch.distributed only, no training framework.

Every function works without a process group (a single process: world size 1, rank 0, nothing to agree on).

- :func:`world_size`, :func:`rank`, :func:`is_rank_zero`: of the default process group.
- :func:`on_rank_zero`: run a side effect (a write) on rank 0 only, then let every rank learn whether it worked,
  with one collective that every rank makes. A failure on rank 0 then raises on every rank (the other ranks get
  an error naming rank 0's) instead of leaving them blocked in the next collective of the training loop.
- :func:`mean_across_ranks`: the mean of a number over the ranks, so that decisions made from measured numbers
  (the budget policy's search) take the same path on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from . import errors

__all__ = ["RankZeroError", "is_rank_zero", "mean_across_ranks", "on_rank_zero", "rank", "world_size"]

T = TypeVar("T")


class RankZeroError(errors.ResilientTuneError, RuntimeError):
    """Raised on the other ranks when a side effect that :func:`on_rank_zero` ran on rank 0 failed there with an
    error that is not one of resilient-tune's own (those are raised with their own class)."""


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return torch.distributed.get_rank() if _active() else 0


def is_rank_zero() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def on_rank_zero(action: Callable[[], T], what: str) -> T | None:
    """Run ``action`` on rank 0 only; every rank then agrees on the outcome (one broadcast, every rank calls it).

    Args:
        action: The side effect (e.g. writing a resilient folder).
        what: What it does, for the other ranks' error message (``"writing /runs/a/resilient"``).

    Returns:
        ``action()``'s result on rank 0, ``None`` elsewhere.

    Raises:
        Exception: On rank 0, whatever ``action`` raised. On the other ranks the same resilient-tune error class
            (``UsageError``, ``CheckpointFormatError``, ...) or :class:`RankZeroError`, naming rank 0's error.
    """
    if not _active() or world_size() == 1:
        return action()
    result: T | None = None
    failure: BaseException | None = None
    if is_rank_zero():
        try:
            result = action()
        except Exception as exc:
            failure = exc
    outcome: list[object] = [
        None if failure is None else (type(failure).__name__, f"{type(failure).__name__}: {failure}")
    ]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        name, message = outcome[0]  # type: ignore[misc]
        error_class = getattr(errors, str(name), None)
        if not (isinstance(error_class, type) and issubclass(error_class, Exception)):
            error_class = RankZeroError
        raise error_class(f"rank 0 failed {what}: {message}")
    return result


def mean_across_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (``value`` itself without a process group); every rank must call it."""
    if not _active() or world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def _device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
