"""Streaming safetensors writer: headers computed from a plan up front, tensors written one at a time."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from resilient_tune.checkpoint._format import (
    DTYPE_TO_CODE,
    TensorInfo,
    build_header,
    byte_view,
    require_little_endian,
    write_all,
)
from resilient_tune.checkpoint._os_hints import DROP_EVERY, drop_written_pages
from resilient_tune.errors import CheckpointFormatError, UsageError

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str, *, name: str = "max_shard_size") -> int:
    """Parse a byte size: an int, or a string such as ``"5GB"`` (10**9), ``"500MB"``, ``"2GiB"`` (2**30), ``"1.5GB"``.

    Units (case-insensitive): B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024); a bare
    number is bytes. Fractions round down to whole bytes.

    Args:
        size: The size to parse.
        name: The argument's name, for messages.

    Returns:
        The size in bytes, at least 1.

    Raises:
        UsageError: Not a positive size in one of those forms.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif (
        isinstance(size, str) and (match := _SIZE_PATTERN.fullmatch(size)) and match[2].upper() in _SIZE_UNITS
    ):
        value = int(Fraction(match[1]) * _SIZE_UNITS[match[2].upper()])
    else:
        raise UsageError(
            f"{name}={size!r} is an invalid size; pass a number of bytes or a string like '5GB', '500MB', "
            "'2GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    if value < 1:
        raise UsageError(f"{name}={size!r} is {value} bytes; pass a size of at least 1 byte, e.g. '5GB'")
    return value


class StreamingWriter:
    """Write a safetensors checkpoint tensor by tensor, never holding the model in memory.

    The plan (name -> :class:`TensorInfo`, in output order) fixes every file's header before any data is
    written; :meth:`write` then puts each tensor at its planned offset, in any order. When the plan's total
    size exceeds ``max_shard_size`` the tensors are split greedily in plan order, as transformers does (a
    tensor larger than the limit gets a shard of its own), into ``model-00001-of-0000N.safetensors`` files plus
    ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``);
    otherwise one ``model.safetensors`` is written. Each file's ``__metadata__`` is
    ``{"format": "pt", **metadata}`` (transformers requires ``format`` = ``pt``).

    A shard file is flushed, fsynced and closed as soon as its last tensor is written. On an exception inside
    ``with``, or when :meth:`close` finds tensors never written, the files written so far are deleted and no
    index is written. Write into a fresh folder (:func:`atomic_dir` gives one); the writer refuses a folder
    that already holds files of the same checkpoint name.

    Args:
        folder: Output folder; created if missing.
        plan: Tensor name -> dtype and shape, in output order.
        max_shard_size: Largest shard in bytes (int, or a string for :func:`parse_size`).
        metadata: Extra ``__metadata__`` string entries.
        filename: Name of the unsharded file; shards and index are named after it.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        plan: Mapping[str, TensorInfo],
        *,
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        filename: str = "model.safetensors",
    ) -> None:
        require_little_endian()
        limit = parse_size(max_shard_size)
        self._plan = _checked_plan(plan)
        header_metadata = {"format": "pt", **_checked_metadata(metadata)}
        stem = _checked_stem(filename)
        self.folder = Path(folder)
        groups = _split(self._plan, limit)
        if len(groups) == 1:
            names = [filename]
            self._index_path: Path | None = None
        else:
            names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
            self._index_path = self.folder / f"{filename}.index.json"
        self.files = [self.folder / name for name in names]
        _prepare_folder(self.folder, stem, filename)
        self._headers: list[bytes] = []
        self._offsets: dict[str, tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self._remaining: list[set[str]] = []  # per shard: planned tensors not yet written
        for shard, group in enumerate(groups):
            header, offsets = build_header(((key, self._plan[key]) for key in group), header_metadata)
            self._headers.append(header)
            self._offsets.update((key, (shard, offset)) for key, offset in offsets.items())
            self._remaining.append(set(group))
        self._handles: list[BinaryIO | None] = [None] * len(groups)
        self._started: set[int] = set()  # shards whose file was created
        self._undropped = [0] * len(groups)  # per shard: bytes written since its pages were last dropped
        self._closed = False

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write tensor ``key`` at its planned place (any order; each key exactly once).

        The tensor is detached, moved to the CPU and made contiguous if needed (a copy only then); the input is
        never modified.

        Raises:
            UsageError: The writer is closed, ``key`` is not in the plan or was already written, or ``tensor``
                is not a dense tensor.
            CheckpointFormatError: Its dtype or shape differs from the plan (the message gives both).
        """
        if self._closed:
            raise UsageError(f"the writer of {self.folder} is closed; cannot write {key!r}")
        if key not in self._plan:
            raise UsageError(
                f"tensor {key!r} is not in the plan of {self.folder} ({len(self._plan)} tensors)"
            )
        shard, offset = self._offsets[key]
        if key not in self._remaining[shard]:
            raise UsageError(f"tensor {key!r} was already written to {self.folder}; write each tensor once")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            raise UsageError(f"tensor {key!r}: expected a dense torch.Tensor, got {_describe(tensor)}")
        planned = self._plan[key]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise CheckpointFormatError(
                f"tensor {key!r}: planned {planned.dtype} {list(planned.shape)}, given {tensor.dtype} "
                f"{list(tensor.shape)}; convert it or fix the plan"
            )
        data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        with _disk_errors(self.files[shard]):
            handle = self._handle(shard)
            if planned.nbytes:
                handle.seek(offset)
                write_all(handle, byte_view(data))
                self._undropped[shard] += planned.nbytes
                if self._undropped[shard] >= DROP_EVERY:
                    drop_written_pages(handle.fileno())
                    self._undropped[shard] = 0
            self._remaining[shard].discard(key)
            if not self._remaining[shard]:
                self._finish(shard)

    def close(self) -> list[Path]:
        """Finish: check every planned tensor was written, fsync the files and write the index if sharded.

        Returns:
            The weight files written, in shard order (without the index).

        Raises:
            UsageError: Some planned tensor was never written (the message names the first); the partial files
                are deleted.
        """
        if self._closed:
            return list(self.files)
        missing = [key for key in self._plan if key in self._remaining[self._offsets[key][0]]]
        if missing:
            self._abort()
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UsageError(
                f"tensor {missing[0]!r}{more} of the plan was never written to {self.folder}; write every "
                "planned tensor before close() (the partial files were deleted)"
            )
        for shard, remaining in enumerate(self._remaining):
            if not remaining and shard not in self._started:  # only for an empty plan
                with _disk_errors(self.files[shard]):
                    self._handle(shard)
                    self._finish(shard)
        if self._index_path is not None:
            with _disk_errors(self._index_path):
                self._write_index(self._index_path)
        self._closed = True
        return list(self.files)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._abort()

    def _handle(self, shard: int) -> BinaryIO:
        handle = self._handles[shard]
        if handle is None:
            handle = open(self.files[shard], "wb", buffering=0)  # noqa: SIM115 -- closed in _finish/_abort
            self._handles[shard] = handle
            self._started.add(shard)
            write_all(handle, memoryview(self._headers[shard]))
        return handle

    def _finish(self, shard: int) -> None:
        handle = self._handles[shard]
        if handle is not None:
            os.fsync(handle.fileno())
            handle.close()
            self._handles[shard] = None

    def _abort(self) -> None:
        self._closed = True
        for shard, handle in enumerate(self._handles):
            if handle is not None:
                handle.close()
                self._handles[shard] = None
        for shard in self._started:
            self.files[shard].unlink(missing_ok=True)

    def _write_index(self, path: Path) -> None:
        weight_map = {key: self.files[shard].name for key, (shard, _) in self._offsets.items()}
        total = sum(info.nbytes for info in self._plan.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` while writing ``path`` (a full disk, a file-size limit, ...) naming the file and the fix.

    The new error has the same ``errno`` (so the same ``OSError`` subclass) and chains the original.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            hint = "free disk space (or raise the file-size limit / quota) and run again"
        else:
            hint = "check that the folder is writable and has free space, then run again"
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; {hint}") from exc


def _split(plan: Mapping[str, TensorInfo], limit: int) -> list[list[str]]:
    """Greedy split in plan order; a tensor over the limit gets its own shard. Never returns no shard."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, info in plan.items():
        if groups[-1] and size + info.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += info.nbytes
    return groups


def _checked_plan(plan: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    if not isinstance(plan, Mapping):
        raise UsageError(f"plan must be a mapping of tensor name -> TensorInfo, got {type(plan).__name__}")
    checked: dict[str, TensorInfo] = {}
    for key, info in plan.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise UsageError(
                f"invalid tensor name {key!r} in the plan; use a non-empty string other than __metadata__"
            )
        if not isinstance(info, tuple) or len(info) != 2 or not isinstance(info[1], (tuple, list)):
            raise UsageError(f"tensor {key!r}: plan entries must be TensorInfo(dtype, shape), got {info!r}")
        dtype, shape = info
        if dtype not in DTYPE_TO_CODE:
            supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in DTYPE_TO_CODE))
            raise UsageError(f"tensor {key!r}: safetensors cannot store {dtype}; use one of {supported}")
        if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
            raise UsageError(f"tensor {key!r}: shape {shape!r} must be non-negative integers")
        checked[key] = TensorInfo(dtype, tuple(shape))
    return checked


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    items = dict(metadata or {})
    bad = [key for key, value in items.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise UsageError(
            f"metadata entry {bad[0]!r} is not str -> str; safetensors metadata holds strings only"
        )
    return items


def _checked_stem(filename: str) -> str:
    if (
        not isinstance(filename, str)
        or not filename.endswith(".safetensors")
        or "/" in filename
        or "\\" in filename
    ):
        raise UsageError(f"filename {filename!r} must be a plain file name ending in .safetensors")
    stem = filename.removesuffix(".safetensors")
    if not stem:
        raise UsageError(f"filename {filename!r} needs a name before .safetensors, e.g. 'model.safetensors'")
    return stem


def _prepare_folder(folder: Path, stem: str, filename: str) -> None:
    """Create the folder; refuse one that already holds files of this checkpoint name (stale shards mislead)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output folder {folder} is a file; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    shard = re.compile(re.escape(stem) + r"-\d+-of-\d+\.safetensors")
    clash = sorted(
        p.name
        for p in folder.iterdir()
        if p.name in (filename, f"{filename}.index.json") or shard.fullmatch(p.name)
    )
    if clash:
        raise UsageError(
            f"output folder {folder} already holds {', '.join(clash)}; write into an empty folder (atomic_dir "
            "gives one) or remove them"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {'meta' if value.is_meta else value.layout} tensor"
    return type(value).__name__
