"""Rank helpers for the training callbacks: torch.distributed only, no training framework.

Every function works without a process group (a single process: world size 1, rank 0, nothing to agree on).

- :func:`world_size`, :func:`rank`, :func:`is_rank_zero`: of the default process group.
- :func:`on_rank_zero`: run a side effect (a write) on rank 0 only, then let every rank learn whether it worked,
  with one collective that every rank makes. A failure on rank 0 then raises on every rank (the other ranks get
  an error naming rank 0's) instead of leaving them blocked in the next collective of the training loop.
- :func:`close_process_group`: the end of a run's distributed part (a barrier, then the default group destroyed;
  optionally the process's exit, past a teardown where gloo can abort).
- :func:`mean_across_ranks`, :func:`sum_across_ranks`: numbers agreed over the ranks, so that decisions made from
  measured numbers (the budget policy's search) take the same path on every rank, and norms of sharded
  parameters add up.

Sharded parameters (merging is elementwise, so every rank merges its own shard and nothing is gathered until a
checkpoint is written):

- FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` objects; :func:`local_tensor` is
  ``p.to_local()``, a view of the rank's shard (an in-place write reaches the next forward's all-gather).
- DeepSpeed ZeRO-3: parameters are empty placeholders; :func:`local_tensor` is ``p.ds_tensor``, the rank's flat
  partition of the flattened (zero-padded) parameter.

:func:`local_part` cuts the same shard out of a full tensor (a peer's), :func:`global_shape` is the parameter's
full shape, and :func:`full_state_dict` gathers a merged model for writing: every rank must call it (it is a
collective); rank 0 gets the full ``state_dict`` on the CPU, the others ``{}``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from . import errors

__all__ = [
    "RankError",
    "RankZeroError",
    "agree_on_failure",
    "close_process_group",
    "full_state_dict",
    "global_shape",
    "is_rank_zero",
    "is_sharded",
    "is_sharded_model",
    "local_part",
    "local_tensor",
    "mean_across_ranks",
    "on_rank_zero",
    "rank",
    "reshard",
    "sum_across_ranks",
    "world_size",
]

T = TypeVar("T")


class RankError(errors.ResilientTuneError, RuntimeError):
    """Raised on the ranks that did not fail when another rank failed a step all of them make
    (:func:`agree_on_failure`)."""


class RankZeroError(RankError):
    """Raised on the other ranks when a side effect that :func:`on_rank_zero` ran on rank 0 failed there with an
    error that is not one of resilient-tune's own (those are raised with their own class)."""


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def close_process_group(exit_code: int | None = None) -> None:
    """Wait for every rank, then destroy the default process group (nothing without one).

    Call it at the end of a multi-process script, on every rank. Left to the interpreter's exit, gloo's threads can
    abort a rank after all its work is done ("terminate called without an active exception", SIGABRT); Lightning
    destroys the group at exit only for NCCL.

    Destroying the group only drops torch.distributed's own references: under FSDP2, DTensor's sharding caches keep
    the device mesh, and with it the gloo group, alive until the interpreter tears down, and gloo (which has no
    shutdown of its own) joins its threads there, where they can no longer take the GIL: the same abort, rarely
    (once in this project's CI, on an FSDP2 script that had written everything). With ``exit_code`` the process then
    leaves at once with that status (``os._exit`` after flushing stdout and stderr), skipping that teardown; atexit
    handlers do not run, so call it last, once everything is saved and logged.
    """
    if exit_code is not None and (
        not isinstance(exit_code, int) or isinstance(exit_code, bool) or not 0 <= exit_code <= 255
    ):
        raise errors.UsageError(
            f"close_process_group(exit_code={exit_code!r}): an exit status is an int from 0 to 255; pass 0 for "
            "success, or leave exit_code out to return normally"
        )
    if _active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


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


def agree_on_failure(failure: BaseException | None, what: str) -> None:
    """After a step every rank makes and any rank may fail (e.g. merging its own shard), make every rank learn
    whether one failed, before the next collective (one ``all_reduce``; every rank must call it).

    Args:
        failure: This rank's error, or ``None``.
        what: The step, for the other ranks' message (``"merging /runs/a/resilient"``).

    Raises:
        Exception: ``failure`` on the ranks that failed; :class:`RankError` on the others when any rank failed.
    """
    if not _active() or world_size() == 1:
        if failure is not None:
            raise failure
        return
    flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if flag.item() > 0:
        raise RankError(f"another rank failed {what} (see its log); every rank stops this step together")


def gather_objects(value: T) -> list[T]:
    """``value`` of every rank, in rank order (``[value]`` without a process group); every rank must call it with a
    picklable, small ``value`` (e.g. a JSON-able state)."""
    if not _active() or world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def mean_across_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (``value`` itself without a process group); every rank must call it."""
    if not _active() or world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def sum_across_ranks(values: list[float]) -> list[float]:
    """Elementwise sums of ``values`` over the ranks (``values`` itself without a process group); every rank must
    call it with a list of the same length."""
    if not _active() or world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor)
    return [float(x) for x in tensor.tolist()]


# ---------------------------------------------------------------------------- sharded parameters
def _is_dtensor(p: Any) -> bool:
    return type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor")


def _is_zero3(p: Any) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_shape")


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` holds only this rank's shard (an FSDP2 ``DTensor`` or a ZeRO-3 partitioned parameter)."""
    return _is_dtensor(p) or _is_zero3(p)


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded (then writing it is a collective: see :func:`full_state_dict`)."""
    return any(is_sharded(p) for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Reshard every FSDP2 module of ``model`` (a no-op for others), so that its registered parameters are the
    ``DTensor`` shards even right after a forward that left them unsharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 has no FSDP2 modules
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds for parameter ``p``: its shard (a view: in-place writes change the parameter), or
    ``p`` itself when it is not sharded."""
    if _is_dtensor(p):
        return p.to_local()  # type: ignore[attr-defined]
    if _is_zero3(p):
        return p.ds_tensor  # type: ignore[attr-defined]
    return p


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape of parameter ``p`` (a ZeRO-3 placeholder's own shape is empty)."""
    if _is_zero3(p):
        return tuple(p.ds_shape)  # type: ignore[attr-defined]
    return tuple(p.shape)


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The piece of ``full`` (a full-size tensor of ``p``'s shape, e.g. a peer's) that this rank's shard of ``p``
    holds, in the layout of :func:`local_tensor`.

    FSDP2 / DTensor: for each ``Shard(dim)`` placement, ``torch.chunk(full, mesh size, dim)`` and this rank's
    coordinate (an empty slice past the last chunk), as ``DTensor`` shards; ``Replicate`` keeps the whole.
    ZeRO-3: the flattened tensor, zero-padded to ``world_size × partition size``, sliced at this rank's partition.

    Raises:
        UsageError: ``full`` has another shape, a placement other than ``Shard``/``Replicate`` (a partial sum), or
            the cut does not have the shard's shape.
    """
    if not is_sharded(p):
        return full
    if tuple(full.shape) != global_shape(p):
        raise errors.UsageError(
            f"a full tensor of shape {tuple(full.shape)} cannot be cut into a shard of a {global_shape(p)} parameter"
        )
    local = local_tensor(p)
    if _is_zero3(p):
        size = local.numel()
        flat = full.reshape(-1)
        padded = torch.cat([flat, flat.new_zeros(max(0, size * world_size() - flat.numel()))])
        part = padded[rank() * size : (rank() + 1) * size]
    else:
        part = full
        coordinate = p.device_mesh.get_coordinate() or []  # type: ignore[attr-defined]
        for mesh_dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
            if placement.is_replicate():
                continue
            if not placement.is_shard():
                raise errors.UsageError(
                    f"parameter placement {placement} (a partial sum) has no local slice; shard or replicate it"
                )
            chunks = torch.chunk(part, p.device_mesh.size(mesh_dim), dim=placement.dim)  # type: ignore[attr-defined]
            index = coordinate[mesh_dim]
            part = chunks[index] if index < len(chunks) else part.narrow(placement.dim, 0, 0)
    if tuple(part.shape) != tuple(local.shape):
        raise errors.UsageError(
            f"the cut of a {global_shape(p)} tensor has shape {tuple(part.shape)} but this rank's shard is "
            f"{tuple(local.shape)}; the sharding layout is not one resilient-tune knows (FSDP2 Shard/Replicate, ZeRO-3)"
        )
    return part


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather ``model``'s full ``state_dict`` on rank 0's CPU (``{}`` on the other ranks). Every rank must call it.

    FSDP2: ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))``.
    ZeRO-3: each partitioned parameter is gathered in turn with ``deepspeed.zero.GatheredParameters([p])`` (all
    ranks, the same order) and copied to rank 0's CPU, so at most one full parameter is materialised at a time.
    Neither: ``model.state_dict()`` on rank 0 (detached CPU copies).
    """
    params = list(model.parameters())
    if any(_is_dtensor(p) for p in params):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_model_state_dict(model, options=options))
    if any(_is_zero3(p) for p in params):
        return _zero3_state_dict(model)
    if not is_rank_zero():
        return {}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _zero3_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed  # only reached with ZeRO-3 parameters, i.e. with deepspeed installed

    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if _is_zero3(value):
            with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                if is_rank_zero():
                    out[key] = value.detach().to("cpu", copy=True)
        elif is_rank_zero():
            out[key] = value.detach().to("cpu", copy=True)
    return out


def _device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
