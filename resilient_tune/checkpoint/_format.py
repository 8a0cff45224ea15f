"""The safetensors file format, parsed and written by hand (torch and the standard library only).

Layout of a ``.safetensors`` file::

    [8 bytes: N, little-endian u64][N bytes: UTF-8 JSON header][data region]

The header maps each tensor name to ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}``
(offsets in bytes, relative to the start of the data region) plus an optional ``"__metadata__"``
object of string to string. Tensor bytes are stored little-endian, C-contiguous.

Everything here reads and writes tensor bytes through positioned file I/O into (or out of) memory that
torch owns: no memory-mapping (touched mmap pages count in the resident set), no numpy, no extra copies.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from resilient_tune.checkpoint._os_hints import advise_huge_pages
from resilient_tune.errors import CheckpointFormatError

#: The safetensors crate refuses headers larger than this (bytes); so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"
_LENGTH = struct.Struct("<Q")
_ZIP_MAGIC = b"PK\x03\x04"

# safetensors dtype code -> torch attribute name. Codes whose torch dtype this torch lacks are skipped.
_CODE_TO_NAME = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
CODE_TO_DTYPE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _CODE_TO_NAME.items() if hasattr(torch, name)
}
DTYPE_TO_CODE: dict[torch.dtype, str] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}


class TensorInfo(NamedTuple):
    """What a tensor will look like without holding its data.

    Attributes:
        dtype: The torch dtype.
        shape: The shape, a tuple of non-negative ints (``()`` for a 0-dim tensor).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (``numel * itemsize``; 0 for an empty tensor)."""
        return math.prod(self.shape) * self.dtype.itemsize


class HeaderEntry(NamedTuple):
    """One tensor as a safetensors header describes it: what it is and where its bytes sit in the file."""

    info: TensorInfo
    offset: int  # absolute byte offset of the tensor's data in the file


class Header(NamedTuple):
    """A parsed, validated safetensors header."""

    entries: dict[str, HeaderEntry]  # in data-offset order
    metadata: dict[str, str]
    raw: bytes  # the 8-byte length prefix and the JSON bytes, for fingerprints


def require_little_endian() -> None:
    """Refuse to run on a big-endian host: safetensors data is little-endian and we copy raw bytes."""
    if sys.byteorder != "little":
        raise CheckpointFormatError(
            f"this host is {sys.byteorder}-endian; safetensors stores little-endian bytes and resilient-tune "
            "copies them without byte-swapping; run on a little-endian machine (x86-64, ARM64)"
        )


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview over the bytes of a contiguous CPU tensor, without copying.

    The view does not keep the tensor alive: the caller must hold the tensor while using it.

    Args:
        tensor: A contiguous tensor on the CPU with at least one element.

    Returns:
        A ``"B"``-format memoryview of ``tensor.numel() * tensor.element_size()`` bytes.
    """
    size = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B")


def read_exact(file: BinaryIO, offset: int, out: memoryview, path: Path) -> None:
    """Fill ``out`` with the bytes of ``file`` starting at ``offset``, looping over short reads.

    Raises:
        CheckpointFormatError: The file ends before ``out`` is full (it was truncated).
    """
    file.seek(offset)
    done = 0
    while done < len(out):
        got = file.readinto(out[done:])
        if not got:
            raise CheckpointFormatError(
                f"{path} is truncated: expected {len(out)} bytes at offset {offset}, the file ended after "
                f"{done}; re-download or re-save the checkpoint"
            )
        done += got


def write_all(file: BinaryIO, data: memoryview) -> None:
    """Write every byte of ``data`` at the file's current position, looping over short writes."""
    done = 0
    while done < len(data):
        done += file.write(data[done:])


def read_tensor(file: BinaryIO, entry: HeaderEntry, path: Path) -> torch.Tensor:
    """Read one tensor into freshly allocated memory that torch owns (no mmap, no intermediate copy)."""
    info = entry.info
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        advise_huge_pages(raw)
        read_exact(file, entry.offset, byte_view(raw), path)
    return raw.view(info.dtype).reshape(info.shape)


def read_header(file: BinaryIO, path: Path, file_size: int) -> Header:
    """Read and validate a safetensors header before anything is allocated for the tensors.

    Args:
        file: The open file, in binary mode.
        path: Its path, for messages.
        file_size: Its size in bytes.

    Returns:
        The entries in data-offset order, the ``__metadata__`` and the raw header bytes.

    Raises:
        CheckpointFormatError: Anything about the header is wrong; the message names the file and the fault.
    """
    if file_size < _LENGTH.size:
        raise CheckpointFormatError(
            f"{path} is truncated: {file_size} bytes, shorter than the 8-byte safetensors header length"
        )
    prefix = _read_bytes(file, 0, _LENGTH.size, path)
    if prefix[:4] == _ZIP_MAGIC:
        raise CheckpointFormatError(
            f"{path} is a zip archive (a PyTorch pickle), not safetensors; rename it to .bin and pass "
            "allow_pickle=True (--allow-pickle) if you trust it"
        )
    (length,) = _LENGTH.unpack(prefix)
    if length > file_size - _LENGTH.size:
        raise CheckpointFormatError(
            f"{path} is truncated or not safetensors: the header claims {length} bytes but the file has only "
            f"{file_size - _LENGTH.size} after the length prefix"
        )
    if length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{path}: the safetensors header claims {length} bytes, over the {MAX_HEADER_BYTES}-byte limit; "
            "the file is corrupt or not safetensors"
        )
    text = _read_bytes(file, _LENGTH.size, length, path)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(
            f"{path}: the safetensors header is not valid UTF-8 JSON ({exc})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object"
        )
    metadata = _check_metadata(header.pop(_METADATA_KEY, {}), path)
    data_start = _LENGTH.size + length
    entries = _check_entries(header, path, data_start, file_size - data_start)
    return Header(entries, metadata, prefix + text)


def build_header(
    plan: Iterable[tuple[str, TensorInfo]], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, int]]:
    """Lay out a safetensors file: the header bytes and where each tensor's data goes.

    Tensors are laid out contiguously in the order given. The JSON is padded with spaces so the data region
    starts at a multiple of 8 bytes, as the safetensors crate does.

    Args:
        plan: ``(name, info)`` pairs in file order; every dtype must have a safetensors code.
        metadata: The ``__metadata__`` object (omitted when empty).

    Returns:
        The bytes to write first (length prefix + JSON) and each tensor's absolute file offset.
    """
    header: dict[str, object] = {_METADATA_KEY: dict(metadata)} if metadata else {}
    relative: dict[str, int] = {}
    position = 0
    for name, info in plan:
        end = position + info.nbytes
        header[name] = {
            "dtype": DTYPE_TO_CODE[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [position, end],
        }
        relative[name] = position
        position = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    data_start = _LENGTH.size + len(text)
    return _LENGTH.pack(len(text)) + text, {name: data_start + begin for name, begin in relative.items()}


def _read_bytes(file: BinaryIO, offset: int, size: int, path: Path) -> bytes:
    buffer = bytearray(size)
    read_exact(file, offset, memoryview(buffer), path)
    return bytes(buffer)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_metadata(metadata: object, path: Path) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise CheckpointFormatError(
            f"{path}: __metadata__ must be an object of string to string, got {json.dumps(metadata)[:200]}"
        )
    return metadata


def _check_entries(
    header: dict[str, object], path: Path, data_start: int, data_size: int
) -> dict[str, HeaderEntry]:
    spans: list[tuple[int, int, str, TensorInfo]] = []
    for name, entry in header.items():
        info, begin, end = _check_entry(name, entry, path, data_size)
        spans.append((begin, end, name, info))
    spans.sort(key=lambda span: (span[0], span[1]))
    previous_end, previous_name = 0, ""
    for begin, end, name, _ in spans:
        if begin == end:
            continue
        if begin < previous_end:
            raise CheckpointFormatError(
                f"{path}: tensors {previous_name!r} and {name!r} overlap (bytes {begin} to {previous_end} of the "
                "data region); the header is corrupt"
            )
        previous_end, previous_name = end, name
    return {name: HeaderEntry(info, data_start + begin) for begin, _, name, info in spans}


def _check_entry(name: str, entry: object, path: Path, data_size: int) -> tuple[TensorInfo, int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointFormatError(
            f"{where}: expected an object with dtype, shape and data_offsets, got {entry!r}"
        )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in CODE_TO_DTYPE:
        raise CheckpointFormatError(
            f"{where}: unknown dtype {code!r}; this torch supports {', '.join(sorted(CODE_TO_DTYPE))}"
        )
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise CheckpointFormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointFormatError(
            f"{where}: data_offsets must be two integers [begin, end], got {offsets!r}"
        )
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointFormatError(f"{where}: data_offsets {offsets} must satisfy 0 <= begin <= end")
    if end > data_size:
        raise CheckpointFormatError(
            f"{path} is truncated or its header is corrupt: tensor {name!r} ends at byte {end} of the data region "
            f"but the file holds only {data_size} data bytes"
        )
    info = TensorInfo(CODE_TO_DTYPE[code], tuple(shape))
    if end - begin != info.nbytes:
        raise CheckpointFormatError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but {code} of shape {shape} needs {info.nbytes}"
        )
    return info, begin, end
