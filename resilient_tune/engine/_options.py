"""Checks of the full-weight engine's options, and its small helpers (kept apart so the engine reads in one go)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import locate
from ..errors import CheckpointFormatError, UsageError
from ..recipe import normalize_dtype_name
from ..sources import ModelLike

__all__ = [
    "check_peers",
    "check_snapshot_device",
    "check_snapshot_dtype",
    "check_training_method",
    "into",
    "peer_label",
    "state_keys",
]


def state_keys(model: torch.nn.Module, *, dedupe: bool) -> set[str]:
    """The ``state_dict`` keys to write: all, or (``dedupe``) one per parameter/buffer object (tied ones once)."""
    keys, seen = set(), set()
    for key, value in model.state_dict(keep_vars=True).items():
        if dedupe and id(value) in seen:
            continue
        seen.add(id(value))
        keys.add(key)
    return keys


def check_peers(peers: Sequence[ModelLike] | None, *, allow_pickle: bool = False) -> list[ModelLike]:
    """Validate the peers early: types, and that each path is a checkpoint (its weight files are found; nothing is
    read). They are opened later, against the model."""
    if peers is None:
        return []
    if isinstance(peers, (str, bytes, os.PathLike, Mapping)):
        raise UsageError(f"peers={peers!r} must be a list of checkpoint paths, e.g. peers=['/models/peer-a']")
    out = list(peers)
    for i, peer in enumerate(out, start=1):
        if isinstance(peer, (str, os.PathLike)):
            path = Path(peer)
            if not path.exists():
                raise UsageError(
                    f"peer {i} ({os.fspath(peer)!r}) does not exist; pass checkpoint folders or files"
                )
            try:
                locate(path.resolve(), allow_pickle=allow_pickle)
            except CheckpointFormatError as exc:
                raise UsageError(
                    f"peers: peer {i} ({os.fspath(peer)!r}) is not a checkpoint: {exc}; pass a folder saved with "
                    "save_pretrained or a .safetensors file"
                ) from exc
        elif not isinstance(peer, Mapping):
            raise UsageError(
                f"peer {i} is a {type(peer).__name__}; pass checkpoint paths (or state dicts Mapping[str, Tensor])"
            )
    return out


def check_snapshot_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a ``torch.device`` or refuse it naming the option."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(
            f"snapshot_device={device!r} is not a torch device; pass 'cpu' (the default, keeps GPU memory free) or "
            "an accelerator such as 'cuda' / 'cuda:0'"
        ) from exc


def check_snapshot_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    """Return ``dtype`` after checking it names a floating storage dtype, or refuse it naming the option."""
    try:
        normalize_dtype_name(dtype)
    except UsageError as exc:
        raise UsageError(
            f"snapshot_dtype={dtype!r} is not a snapshot storage dtype; pass None (the parameters' own dtype), "
            "'bf16' or 'fp16' (half the memory)"
        ) from exc
    return dtype


def into(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into ``out`` (then ``out``), or ``value`` itself without ``out``."""
    if out is None:
        return value
    return out.copy_(value)


def peer_label(peer: ModelLike, index: int) -> str:
    return str(peer) if isinstance(peer, (str, os.PathLike)) else f"peer {index}"


def check_training_method(spec: Any, peers: int) -> None:
    """A merge method a training run can use: every registered one but Model Stock, and SLERP without peers.

    Raises:
        UsageError: Model Stock (names the offline call), or SLERP with peers.
    """
    if spec.combine == "model_stock":
        raise UsageError(
            "method='model_stock' chooses its own ratio per tensor from the angle between two or more fine-tuned "
            "models; a training run has one, and α would not mean anything: merge offline, "
            "resilient_tune.merge([fine_tuned, peer, ...], method='model_stock', base=base)"
        )
    if spec.combine == "slerp" and peers:
        raise UsageError(
            f"method='slerp' interpolates between the base and the fine-tuned model only; drop the {peers} peer(s) "
            "or use method='linear'"
        )
