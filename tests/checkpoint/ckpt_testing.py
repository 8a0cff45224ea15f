"""Helpers for the checkpoint tests (imported by name: tests/checkpoint is on sys.path under pytest)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from resilient_tune.checkpoint import StreamingWriter, TensorInfo


def plan_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {key: TensorInfo(value.dtype, tuple(value.shape)) for key, value in state.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, works for float8 and bool)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype`` (every bit pattern, NaNs included; bool stays 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def write_state(folder: Path, state: Mapping[str, torch.Tensor], **kwargs: Any) -> list[Path]:
    """Write a state dict through StreamingWriter in plan order; returns the weight files."""
    with StreamingWriter(folder, plan_of(state), **kwargs) as writer:
        for key, value in state.items():
            writer.write(key, value)
    return writer.files


def craft(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A raw safetensors file from a header (dict, or raw bytes) and data; ``length`` overrides the prefix."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + text + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
