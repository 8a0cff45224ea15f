"""Ingredients as lazy tensor sources: a checkpoint on disk, an in-memory state dict, or a module.

A source answers three questions without loading the model: which keys, which shape and dtype each has, and
(on demand, one key at a time) the tensor itself. That is all the streaming merge needs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from .checkpoint import CheckpointReader, TensorInfo
from .errors import UsageError

__all__ = ["ModelLike", "TensorSource", "open_source"]

ModelLike = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


class TensorSource(Protocol):
    """What the merge engine reads from an ingredient."""

    name: str
    folder: Path | None  # where config/tokenizer files live (None for in-memory ingredients)

    def specs(self) -> dict[str, TensorInfo]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...

    def close(self) -> None: ...


class _CheckpointSource:
    def __init__(self, path: str | os.PathLike, allow_pickle: bool) -> None:
        self._reader = CheckpointReader(path, allow_pickle=allow_pickle)
        self.name = str(path)
        self.folder: Path | None = self._reader.folder
        self._specs = self._reader.specs()

    def specs(self) -> dict[str, TensorInfo]:
        return self._specs

    def get(self, key: str) -> torch.Tensor:
        return self._reader.get(key)

    def fingerprint(self) -> str:
        return self._reader.fingerprint()

    def close(self) -> None:
        self._reader.close()


class _MemorySource:
    def __init__(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise UsageError(f"{name}: value of {key!r} is a {type(value).__name__}, not a torch.Tensor")
        self._state = state
        self.name = name
        self.folder: Path | None = None

    def specs(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self._state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._state[key].detach()

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for key, value in self._state.items():
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        return digest.hexdigest()

    def close(self) -> None:
        pass


def open_source(model: ModelLike, *, name: str, allow_pickle: bool = False) -> TensorSource:
    """Wrap a path, a state dict or a module as a :class:`TensorSource`.

    Args:
        model: A checkpoint folder or file (read lazily), a ``Mapping[str, Tensor]`` or a ``torch.nn.Module``
            (its ``state_dict()``; tied parameters appear under every name, as in the module).
        name: Label used in error messages and ``cocktail.json`` for in-memory ingredients.
        allow_pickle: Allow ``.bin`` pickle checkpoints (loaded with ``torch.load(weights_only=True)``).
    """
    if isinstance(model, (str, os.PathLike)):
        return _CheckpointSource(model, allow_pickle)
    if isinstance(model, torch.nn.Module):
        return _MemorySource(model.state_dict(), name)
    if isinstance(model, Mapping):
        return _MemorySource(model, name)
    raise UsageError(
        f"{name} is a {type(model).__name__}; pass a checkpoint path, a state dict (Mapping[str, Tensor]) "
        "or a torch.nn.Module"
    )
