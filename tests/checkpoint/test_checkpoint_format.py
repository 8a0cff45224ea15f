"""The safetensors format as we write and parse it: round trips against the safetensors package, bad headers."""

from __future__ import annotations

import json
import resource
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_testing import craft, entry, random_tensor, same_bits, write_state

from resilient_tune.checkpoint import StreamingWriter, TensorInfo, open_checkpoint
from resilient_tune.errors import CheckpointFormatError

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

# dtypes the safetensors Python package maps to torch; F8_E8M0 is written by the crate but not mapped back.
_ORACLE_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    *(
        getattr(torch, name)
        for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, name)
    ),
]
_SHAPES = [(3, 5), (), (0,), (2, 0, 4), (7,)]


def _zoo(dtypes: list[torch.dtype]) -> dict[str, torch.Tensor]:
    return {
        f"{str(dtype).removeprefix('torch.')}.{i}": random_tensor(dtype, shape, seed=i)
        for dtype in dtypes
        for i, shape in enumerate(_SHAPES)
    }


def test_our_files_load_in_safetensors(tmp_path: Path) -> None:
    state = _zoo(_ORACLE_DTYPES)
    write_state(tmp_path, state, metadata={"source": "test"})
    loaded = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert same_bits(loaded[key], value), key
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "source": "test"}
        assert same_bits(handle.get_tensor("float32.0"), state["float32.0"])


def test_we_read_safetensors_files(tmp_path: Path) -> None:
    state = _zoo(_ORACLE_DTYPES)
    safetensors_torch.save_file(state, tmp_path / "x.safetensors", metadata={"k": "v"})
    with open_checkpoint(tmp_path / "x.safetensors") as reader:
        assert sorted(reader.keys()) == sorted(state)
        assert reader.metadata() == {"k": "v"}
        for key, value in state.items():
            assert reader.info(key) == TensorInfo(value.dtype, tuple(value.shape))
            got = reader.get(key)
            assert same_bits(got, value), key
            assert got.is_contiguous() and got.device.type == "cpu"


def test_keys_follow_data_offsets(tmp_path: Path) -> None:
    state = {name: torch.zeros(n) for name, n in (("zeta", 3), ("alpha", 5), ("mid", 0), ("beta", 2))}
    path = tmp_path / "x.safetensors"
    safetensors_torch.save_file(state, path)
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + length])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
    with open_checkpoint(path) as reader:
        assert reader.keys() == by_offset


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch without float8_e8m0fnu")
def test_every_supported_dtype_round_trips_through_us(tmp_path: Path) -> None:
    extra = [
        getattr(torch, n)
        for n in ("float8_e8m0fnu", "uint16", "uint32", "uint64", "complex64")
        if hasattr(torch, n)
    ]
    state = _zoo(extra)
    write_state(tmp_path, state)
    with open_checkpoint(tmp_path) as reader:
        for key, value in state.items():
            assert same_bits(reader.get(key), value), key


def test_header_layout(tmp_path: Path) -> None:
    """Plan order, __metadata__ first, contiguous offsets, JSON padded with spaces to 8 bytes."""
    state = {
        "b": torch.ones(3, dtype=torch.float16),
        "a": torch.ones(2, 2),
        "e": torch.ones(0),
        "c": torch.ones(1),
    }
    write_state(tmp_path, state, metadata={"x": "1"})
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    text = raw[8 : 8 + length]
    assert (
        text.rstrip(b" ").endswith(b"}") and len(text) - len(text.rstrip(b" ")) < 8
    )  # minimal space padding
    header = json.loads(text)
    assert list(header) == ["__metadata__", "b", "a", "e", "c"]
    assert header["__metadata__"] == {"format": "pt", "x": "1"}
    offsets = [header[k]["data_offsets"] for k in ("b", "a", "e", "c")]
    assert offsets == [[0, 6], [6, 22], [22, 22], [22, 26]]
    assert len(raw) == 8 + length + 26


# --- malformed files ------------------------------------------------------------------------------------


def _bad(path: Path, *needles: str) -> None:
    with pytest.raises(CheckpointFormatError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


def test_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    _bad(path, "truncated")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    _bad(craft(tmp_path / "x.safetensors", {}, length=10_000), "10000", "truncated")


def test_header_length_over_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 150_000_000))
        file.truncate(200_000_000)  # sparse: no disk, no memory
    _bad(path, "150000000", "limit")


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (b"\xff\xfe{}", "UTF-8 JSON"),
        (b"{not json", "UTF-8 JSON"),
        (b"[1, 2]", "expected an object"),
        (b'{"a": ' + json.dumps(entry("F32", [1], 0, 4)).encode() + b', "a": {}}', "duplicate key 'a'"),
        ({"__metadata__": {"k": 1}}, "__metadata__"),
        ({"__metadata__": ["k"]}, "__metadata__"),
        ({"w": [1, 2]}, "expected an object with dtype"),
        ({"w": {"dtype": "F32", "shape": [1]}}, "expected an object with dtype"),
        ({"w": entry("F4", [1], 0, 4)}, "unknown dtype 'F4'"),
        ({"w": entry("F32", [-1], 0, 4)}, "non-negative integers"),
        ({"w": entry("F32", [1.0], 0, 4)}, "non-negative integers"),
        ({"w": entry("F32", [True], 0, 4)}, "non-negative integers"),
        ({"w": entry("F32", "1", 0, 4)}, "non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "two integers"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, "two integers"),
        ({"w": entry("F32", [1], 4, 0)}, "begin <= end"),
        ({"w": entry("F32", [1], 0, 8)}, "needs 4"),
        ({"w": entry("F32", [2], 0, 8), "v": entry("F32", [1], 4, 8)}, "overlap"),
        ({"w": entry("F32", [3], 0, 12)}, "truncated"),
    ],
)
def test_malformed_header(tmp_path: Path, header: object, needle: str) -> None:
    _bad(craft(tmp_path / "x.safetensors", header, data=bytes(8)), needle)


def test_absurd_size_claim_fails_fast_without_allocating(tmp_path: Path) -> None:
    huge = 10**15
    cases = [
        {"w": entry("U8", [huge], 0, huge)},  # offsets past the file
        {"w": entry("F32", [huge, huge], 0, 4)},  # shape disagrees with offsets
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for i, header in enumerate(cases):
        _bad(craft(tmp_path / f"x{i}.safetensors", header, data=bytes(16)))
    assert time.perf_counter() - start < 1.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50 * 1024


def test_truncated_file_names_file(tmp_path: Path) -> None:
    (path,) = write_state(tmp_path, {"a": torch.ones(100), "b": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-10])
    _bad(path, "truncated", "'b'")


def test_file_truncated_after_open(tmp_path: Path) -> None:
    (path,) = write_state(tmp_path, {"a": torch.ones(100), "b": torch.ones(100)})
    with open_checkpoint(path) as reader:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 200])
        with pytest.raises(CheckpointFormatError, match="truncated") as info:
            reader.get("b")
        assert str(path) in str(info.value)


def test_zip_named_safetensors_is_called_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    torch.save({"a": torch.ones(2)}, path)
    _bad(path, "pickle", "allow_pickle=True")


def test_big_endian_host_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_state(tmp_path / "m", {"a": torch.ones(2)})
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(CheckpointFormatError, match="little-endian"):
        open_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointFormatError, match="little-endian"):
        StreamingWriter(tmp_path / "n", {"a": TensorInfo(torch.float32, (2,))})
