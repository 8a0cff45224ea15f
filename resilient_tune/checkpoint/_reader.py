"""Lazy, one-tensor-at-a-time checkpoint reading: safetensors (single or sharded) and opt-in PyTorch pickles."""

from __future__ import annotations

import difflib
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from resilient_tune.checkpoint._format import (
    Header,
    HeaderEntry,
    TensorInfo,
    read_exact,
    read_header,
    read_tensor,
    require_little_endian,
)
from resilient_tune.checkpoint._layout import SAFETENSORS, Layout, locate
from resilient_tune.errors import CheckpointFormatError, UsageError

# fingerprint(): besides headers and sizes, hash this many evenly spaced blocks of each file's data, so two
# fine-tunes of one architecture (identical headers) get different fingerprints at the cost of a few reads.
_SAMPLES = 32
_SAMPLE_BYTES = 4096


class CheckpointReader:
    """Lazy reader over a checkpoint; one tensor in memory at a time.

    ``path`` may be a folder (``model.safetensors``, a sharded ``model.safetensors.index.json``, or with
    ``allow_pickle=True`` ``pytorch_model.bin`` / its index) or a single ``.safetensors`` / ``.bin`` file.

    Safetensors headers are read and validated up front (nothing is allocated for a tensor before its header
    entry is known to be consistent with the file); each :meth:`get` then reads that tensor with positioned
    reads into freshly allocated memory: no memory-mapping, so the resident set grows by one tensor only.

    A sharded index must list exactly the tensors its shards hold, each in the shard it names, and may name
    only files in its own folder (no ``..``, absolute paths or symlinks out of it; the blob store of a Hugging
    Face cache snapshot is the one allowed symlink target).

    Pickles are read with ``torch.load(weights_only=True, map_location="cpu")``, which loads a whole file at
    once: the reader keeps one loaded shard in memory and returns copies from it.

    Attributes:
        path: The path given, resolved.
        folder: The folder holding the weights (support files such as the config are copied from here).
        files: The weight files in use, in shard order.
        format: ``"safetensors"`` or ``"pickle"``.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        given = Path(path).expanduser()
        if not given.exists():
            raise CheckpointFormatError(
                f"no such file or folder: {given}; pass an existing checkpoint folder or .safetensors file"
            )
        self.path = given.resolve()
        layout = locate(self.path, allow_pickle=allow_pickle)
        self.folder, self.files, self.format = layout.folder, layout.files, layout.format
        self._source = _SafetensorsSource(layout) if layout.format == SAFETENSORS else _PickleSource(layout)
        self._closed = False

    def keys(self) -> list[str]:
        """Tensor names in file order: shard order, then data-offset order within a shard."""
        return self._source.keys()

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of tensor ``key``, without reading its data (pickles: loads its shard).

        Raises:
            CheckpointFormatError: There is no tensor ``key``; the message names it and suggests close names.
        """
        self._check(key)
        return self._source.info(key)

    def specs(self) -> dict[str, TensorInfo]:
        """Every tensor's :class:`TensorInfo`, in :meth:`keys` order."""
        return {key: self._source.info(key) for key in self.keys()}

    def get(self, key: str) -> torch.Tensor:
        """Read tensor ``key`` into a fresh, owned, contiguous CPU tensor (not memory-mapped, not shared).

        Raises:
            CheckpointFormatError: No tensor ``key``, or its file was truncated since the reader opened it.
            UsageError: The reader is closed.
        """
        if self._closed:
            raise UsageError(
                f"the reader of {self.path} is closed; open the checkpoint again to read {key!r}"
            )
        self._check(key)
        return self._source.get(key)

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the first file (``{}`` for pickles or when absent)."""
        return self._source.metadata()

    def fingerprint(self) -> str:
        """A cheap identity of the weights: sha256 hex over each file's size, header and sampled data blocks.

        Reads the headers and ``32 x 4 KiB`` evenly spaced blocks per file (the whole data if smaller), not the
        whole checkpoint: equal weights always give equal fingerprints, and two checkpoints of one
        architecture whose weights differ almost surely differ in the sampled blocks.
        """
        hasher = hashlib.sha256()
        for index, path in enumerate(self.files):
            prefix, data_start = self._source.identity(index)
            with open(path, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                hasher.update(size.to_bytes(8, "little") + prefix)
                for offset, length in _sample_spans(data_start, size):
                    block = bytearray(length)
                    read_exact(file, offset, memoryview(block), path)
                    hasher.update(block)
        return hasher.hexdigest()

    def close(self) -> None:
        """Close the open files (and drop a loaded pickle shard). Idempotent."""
        self._closed = True
        self._source.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return self._source.has(key)

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, format={self.format!r}, files={len(self.files)})"

    def _check(self, key: str) -> None:
        if self._source.has(key):
            return
        keys = self.keys()
        close = difflib.get_close_matches(str(key), keys, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise CheckpointFormatError(
            f"no tensor {key!r} in checkpoint {self.path} ({len(keys)} tensors){hint}"
        )


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint for lazy reading; see :class:`CheckpointReader` (use it as a context manager)."""
    return CheckpointReader(path, allow_pickle=allow_pickle)


def _sample_spans(start: int, end: int) -> list[tuple[int, int]]:
    """Evenly spaced ``(offset, length)`` blocks covering ``[start, end)`` sparsely, or whole when small."""
    span = end - start
    if span <= _SAMPLES * _SAMPLE_BYTES:
        return [(start, span)] if span else []
    last = span - _SAMPLE_BYTES  # the first block starts the data, the last one ends it
    return [(start + i * last // (_SAMPLES - 1), _SAMPLE_BYTES) for i in range(_SAMPLES)]


class _SafetensorsSource:
    """Safetensors files: all headers parsed at open, tensors read on demand with positioned reads."""

    def __init__(self, layout: Layout) -> None:
        require_little_endian()
        self._files = layout.files
        self._headers = [_read_header(path) for path in layout.files]
        self._where: dict[str, tuple[int, HeaderEntry]] = {}  # name -> (file index, header entry)
        for index, header in enumerate(self._headers):
            for key, entry in header.entries.items():
                if key in self._where:
                    other = self._files[self._where[key][0]]
                    raise CheckpointFormatError(
                        f"tensor {key!r} is stored twice, in {other} and {self._files[index]}; remove one copy"
                    )
                self._where[key] = (index, entry)
        if layout.weight_map is not None:
            _check_index(layout.weight_map, {key: self._files[i] for key, (i, _) in self._where.items()})
        self._handles: list[BinaryIO | None] = [None] * len(self._files)
        self._locks = [threading.Lock() for _ in self._files]

    def keys(self) -> list[str]:
        return list(self._where)

    def has(self, key: object) -> bool:
        return key in self._where

    def info(self, key: str) -> TensorInfo:
        return self._where[key][1].info

    def get(self, key: str) -> torch.Tensor:
        index, entry = self._where[key]
        with self._locks[index]:
            handle = self._handles[index]
            if handle is None:
                handle = self._handles[index] = open(self._files[index], "rb", buffering=0)  # noqa: SIM115
            return read_tensor(handle, entry, self._files[index])

    def metadata(self) -> dict[str, str]:
        return dict(self._headers[0].metadata)

    def identity(self, index: int) -> tuple[bytes, int]:
        raw = self._headers[index].raw
        return raw, len(raw)

    def close(self) -> None:
        for index, handle in enumerate(self._handles):
            if handle is not None:
                handle.close()
                self._handles[index] = None


def _read_header(path: Path) -> Header:
    with open(path, "rb", buffering=0) as file:
        return read_header(file, path, os.fstat(file.fileno()).st_size)


def _check_index(weight_map: Mapping[str, Path], found: Mapping[str, Path]) -> None:
    """The index must list exactly the tensors the shards hold, each in the shard that holds it."""
    for key, shard in weight_map.items():
        if found.get(key) != shard:
            raise CheckpointFormatError(
                f"the shard index lists tensor {key!r} in {shard}, but that file has no such tensor; "
                "the index and the shards do not match (re-download or re-save the checkpoint)"
            )
    for key, shard in found.items():
        if key not in weight_map:
            raise CheckpointFormatError(
                f"{shard} holds tensor {key!r}, which the shard index does not list; the index is out of date "
                "(re-save the checkpoint or add the tensor to weight_map)"
            )


class _PickleSource:
    """PyTorch pickles, loaded whole with weights_only=True; one loaded shard kept at a time."""

    def __init__(self, layout: Layout) -> None:
        self._files = layout.files
        self._weight_map = layout.weight_map
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None
        self._keys: list[str] | None = None
        weight_map = layout.weight_map
        if weight_map is not None:  # keys in shard order without loading the shards
            order = {path: i for i, path in enumerate(self._files)}
            self._keys = sorted(weight_map, key=lambda key: order[weight_map[key]])

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = list(self._state(0))
        return list(self._keys)

    def has(self, key: object) -> bool:
        return key in (self._weight_map if self._weight_map is not None else self._state(0))

    def info(self, key: str) -> TensorInfo:
        tensor = self._tensor(key)
        return TensorInfo(tensor.dtype, tuple(tensor.shape))

    def get(self, key: str) -> torch.Tensor:
        return self._tensor(key).detach().clone(memory_format=torch.contiguous_format)

    def metadata(self) -> dict[str, str]:
        return {}

    def identity(self, index: int) -> tuple[bytes, int]:
        return b"", 0

    def close(self) -> None:
        self._loaded = None

    def _tensor(self, key: str) -> torch.Tensor:
        index = 0 if self._weight_map is None else self._files.index(self._weight_map[key])
        return self._state(index)[key]

    def _state(self, index: int) -> dict[str, torch.Tensor]:
        if self._loaded is not None and self._loaded[0] == index:
            return self._loaded[1]
        self._loaded = None  # free the previous shard before loading the next
        path = self._files[index]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFormatError(
                f"cannot load {path} with torch.load(weights_only=True): {exc}; only plain state dicts of "
                "tensors are supported"
            ) from exc
        if not isinstance(state, Mapping) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
        ):
            raise CheckpointFormatError(
                f"{path} is not a flat state dict of name -> tensor (got {type(state).__name__}); save "
                "model.state_dict() itself"
            )
        state = dict(state)
        if self._weight_map is not None:
            _check_index(
                {key: shard for key, shard in self._weight_map.items() if shard == path},
                dict.fromkeys(state, path),
            )
        self._loaded = (index, state)
        return state
