"""Ingredients as lazy tensor sources: a checkpoint on disk, an in-memory state dict, or a module.

A source answers three questions without loading the model: which keys, which shape and dtype each has, and
(on demand, one key at a time) the tensor itself. That is all the streaming merge needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from .checkpoint import CheckpointReader, TensorInfo
from .errors import IncompatibleModelsError, UsageError

__all__ = [
    "ModelLike",
    "TensorSource",
    "check_same_architecture",
    "copy_buffer",
    "open_source",
    "partial_buffers",
]

ModelLike = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


class TensorSource(Protocol):
    """What the merge engine reads from an ingredient."""

    name: str
    folder: Path | None  # where config/tokenizer files live (None for in-memory ingredients)
    owned: bool  # get() returns a new tensor each call that nothing else holds (merges may reuse its memory)

    def architecture(self) -> tuple[str, ...] | None: ...

    def specs(self) -> dict[str, TensorInfo]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...

    def close(self) -> None: ...


class _CheckpointSource:
    def __init__(self, path: str | os.PathLike, allow_pickle: bool) -> None:
        self._reader = CheckpointReader(path, allow_pickle=allow_pickle)
        self.name = str(path)
        self.folder: Path | None = self._reader.folder
        self.owned = True  # the reader returns a fresh tensor per call (positioned read, or a copy)
        self._specs = self._reader.specs()

    def specs(self) -> dict[str, TensorInfo]:
        return self._specs

    def get(self, key: str) -> torch.Tensor:
        return self._reader.get(key)

    def fingerprint(self) -> str:
        return self._reader.fingerprint()

    def architecture(self) -> tuple[str, ...] | None:
        """``(model_type, *architectures)`` from ``config.json`` beside the weights, if there is one."""
        config = self.folder / "config.json" if self.folder is not None else None
        if config is None or not config.is_file():
            return None
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return None  # an unreadable config does not stop a merge; keys and shapes are still checked
        if not isinstance(data, dict):
            return None
        return (str(data.get("model_type")), *map(str, data.get("architectures") or ()))

    def close(self) -> None:
        self._reader.close()


class _MemorySource:
    def __init__(self, state: Mapping[str, torch.Tensor], name: str) -> None:
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise UsageError(
                    f"{name}: value of {key!r} is a {type(value).__name__}, not a torch.Tensor; pass a state dict of "
                    "tensors such as model.state_dict()"
                )
        self._state = state
        self.name = name
        self.folder: Path | None = None
        self.owned = False  # get() returns the caller's own tensors

    def specs(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self._state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._state[key].detach()

    def architecture(self) -> tuple[str, ...] | None:
        return None

    def fingerprint(self) -> str:
        """SHA-256 over every key, dtype, shape and up to 64 leading values (cheap; tells fine-tunes apart)."""
        digest = hashlib.sha256()
        for key, value in self._state.items():
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
            head = value.detach().reshape(-1)[:64].to("cpu", copy=True).contiguous()
            digest.update(bytes(head.view(torch.uint8).tolist()))
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


def check_same_architecture(sources: list[TensorSource]) -> None:
    """Refuse ingredients whose ``config.json`` names another model type or architecture than the first one's.

    Sources without a config (state dicts, bare files) are not compared; their keys and shapes still are.
    """
    known = [(s, s.architecture()) for s in sources]
    known = [(s, arch) for s, arch in known if arch is not None]
    if not known:
        return
    first, first_arch = known[0]
    for source, arch in known[1:]:
        if arch != first_arch:
            raise IncompatibleModelsError(
                f"{source.name} is a {_describe(arch)} but {first.name} is a {_describe(first_arch)}; "
                "merge checkpoints of the same architecture"
            )


def _describe(arch: tuple[str, ...]) -> str:
    kind = f"{arch[0]!r} model"
    return f"{kind} ({', '.join(arch[1:])})" if len(arch) > 1 else kind


def partial_buffers(sources: Sequence[TensorSource]) -> dict[str, list[TensorSource]]:
    """Non-floating buffers that only some ingredients have: key -> the sources that have it.

    Checkpoints saved by different transformers versions differ in legacy buffers such as
    ``embeddings.position_ids`` (int64). Such tensors are copied, never merged, so their absence from some
    ingredients is harmless: the output keeps them when ``models[0]`` has them (identical in every holder) and
    leaves them out, with a warning, when it does not. A floating tensor missing anywhere is still an error.
    """
    specs = [s.specs() for s in sources]
    every_key = {key for spec in specs for key in spec}
    partial: dict[str, list[TensorSource]] = {}
    for key in every_key:
        holders = [(s, spec[key]) for s, spec in zip(sources, specs) if key in spec]
        if len(holders) < len(sources) and not any(info.dtype.is_floating_point for _, info in holders):
            partial[key] = [s for s, _ in holders]
    dropped = sorted(key for key in partial if key not in specs[0])
    if dropped:
        warnings.warn(
            f"{len(dropped)} non-floating buffer(s) present in some ingredients but not in {sources[0].name} are "
            f"left out of the output, which follows {sources[0].name}'s layout: {', '.join(dropped)}",
            UserWarning,
            stacklevel=4,
        )
    return partial


def copy_buffer(key: str, holders: Sequence[TensorSource]) -> torch.Tensor:
    first = holders[0].get(key)
    for other in holders[1:]:
        if not torch.equal(first, other.get(key)):
            raise IncompatibleModelsError(
                f"non-floating tensor {key!r} differs between {holders[0].name} and {other.name}; such tensors "
                "are copied, not averaged, so they must be identical: merge checkpoints of the same architecture"
            )
    return first
