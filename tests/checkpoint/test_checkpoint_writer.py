"""StreamingWriter: sharding as transformers does it, any write order, plan checks, clean failure; parse_size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_testing import plan_of, same_bits, write_state

from resilient_tune.checkpoint import StreamingWriter, TensorInfo, open_checkpoint, parse_size
from resilient_tune.errors import CheckpointFormatError, UsageError

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [30, 10, 45, 5, 60, 20, 0, 25]  # float32 elements: 120, 40, 180, 20, 240, 80, 0, 100 bytes
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


def test_single_file_when_under_the_limit(tmp_path: Path) -> None:
    files = write_state(tmp_path, _state())
    assert files == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_sharded_layout_matches_huggingface_hub(tmp_path: Path) -> None:
    split = pytest.importorskip("huggingface_hub").split_torch_state_dict_into_shards
    state = _state()
    files = write_state(tmp_path, state, max_shard_size=250)
    expected = split(state, max_shard_size=250)
    assert [f.name for f in files] == list(expected.filename_to_tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": expected.metadata["total_size"]},
        "weight_map": expected.tensor_to_filename,
    }
    assert (tmp_path / "model.safetensors.index.json").read_text() == json.dumps(
        index, indent=2, sort_keys=True
    ) + "\n"
    for name, keys in expected.filename_to_tensors.items():
        with safe_open(tmp_path / name, framework="pt") as handle:
            assert list(handle.keys()) == sorted(keys)
            assert handle.metadata() == {"format": "pt"}
            for key in keys:
                assert same_bits(handle.get_tensor(key), state[key])
    with open_checkpoint(tmp_path) as reader:
        assert reader.keys() == list(state)


def test_tensor_over_the_limit_gets_its_own_shard(tmp_path: Path) -> None:
    state = {"a": torch.ones(10), "big": torch.ones(100), "b": torch.ones(10), "c": torch.ones(10)}
    files = write_state(tmp_path, state, max_shard_size="100B", filename="adapter.safetensors")
    assert [f.name for f in files] == [f"adapter-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    weight_map = json.loads((tmp_path / "adapter.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {
        "a": "adapter-00001-of-00003.safetensors",
        "big": "adapter-00002-of-00003.safetensors",
        "b": "adapter-00003-of-00003.safetensors",
        "c": "adapter-00003-of-00003.safetensors",
    }


def test_write_order_does_not_matter(tmp_path: Path) -> None:
    state = _state()
    write_state(tmp_path / "forward", state, max_shard_size=250)
    with StreamingWriter(tmp_path / "backward", plan_of(state), max_shard_size=250) as writer:
        for key in reversed(state):
            writer.write(key, state[key])
    forward = sorted((tmp_path / "forward").iterdir())
    backward = sorted((tmp_path / "backward").iterdir())
    assert [p.name for p in forward] == [p.name for p in backward]
    for a, b in zip(forward, backward):
        assert a.read_bytes() == b.read_bytes()


def test_inputs_are_converted_not_mutated(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    parameter = torch.nn.Parameter(torch.ones(2, 2))
    state = {"transposed": base.t(), "sliced": base[:, 1], "param": parameter}
    snapshot = {k: v.detach().clone() for k, v in state.items()}
    write_state(tmp_path, state)
    loaded = safetensors_torch.load_file(tmp_path / "model.safetensors")
    for key in state:
        assert torch.equal(loaded[key], snapshot[key])
        assert torch.equal(state[key].detach(), snapshot[key])
    assert torch.equal(base, torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_empty_plan(tmp_path: Path) -> None:
    files = StreamingWriter(tmp_path, {}).close()
    assert safetensors_torch.load_file(files[0]) == {}
    with safe_open(files[0], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_write_errors_name_the_key(tmp_path: Path) -> None:
    plan = {"w": TensorInfo(torch.float32, (2, 3)), "b": TensorInfo(torch.float16, (3,))}
    writer = StreamingWriter(tmp_path, plan)
    with pytest.raises(UsageError, match="'nope' is not in the plan"):
        writer.write("nope", torch.zeros(1))
    with pytest.raises(
        CheckpointFormatError, match=r"'w': planned torch.float32 \[2, 3\], given torch.float32 \[3, 2\]"
    ):
        writer.write("w", torch.zeros(3, 2))
    with pytest.raises(
        CheckpointFormatError, match=r"'b': planned torch.float16 \[3\], given torch.float32 \[3\]"
    ):
        writer.write("b", torch.zeros(3))
    with pytest.raises(UsageError, match=r"'w': expected a dense torch\.Tensor"):
        writer.write("w", [[0.0] * 3] * 2)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="got a meta tensor"):
        writer.write("w", torch.zeros(2, 3, device="meta"))
    writer.write("w", torch.zeros(2, 3))
    with pytest.raises(UsageError, match="'w' was already written"):
        writer.write("w", torch.zeros(2, 3))
    writer.write("b", torch.zeros(3, dtype=torch.float16))
    assert writer.close() == [tmp_path / "model.safetensors"]
    with pytest.raises(UsageError, match="closed"):
        writer.write("b", torch.zeros(3, dtype=torch.float16))


def test_close_with_unwritten_tensor_deletes_partial_files(tmp_path: Path) -> None:
    state = _state()
    writer = StreamingWriter(tmp_path, plan_of(state), max_shard_size=250)
    for key in list(state)[:3]:
        writer.write(key, state[key])
    with pytest.raises(UsageError, match="'t3' and 4 more of the plan was never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_with_writes_no_index(tmp_path: Path) -> None:
    state = _state()
    with (
        pytest.raises(RuntimeError, match="boom"),
        StreamingWriter(tmp_path, plan_of(state), max_shard_size=250) as w,
    ):
        w.write("t0", state["t0"])
        w.write("t1", state["t1"])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"plan": {"x": TensorInfo(torch.complex128, (2,))}}, "cannot store torch.complex128"),
        ({"plan": {"x": TensorInfo(torch.float32, (-1,))}}, "non-negative"),
        ({"plan": {"x": "float32"}}, "TensorInfo"),
        ({"plan": {"__metadata__": TensorInfo(torch.float32, (1,))}}, "invalid tensor name"),
        ({"plan": {"": TensorInfo(torch.float32, (1,))}}, "invalid tensor name"),
        ({"metadata": {"k": 1}}, "not str -> str"),
        ({"filename": "model.bin"}, "ending in .safetensors"),
        ({"filename": "sub/model.safetensors"}, "plain file name"),
        ({"filename": ".safetensors"}, "needs a name"),
        ({"max_shard_size": "5 parsecs"}, "an invalid size"),
        ({"max_shard_size": 0}, "at least 1 byte"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, needle: str) -> None:
    arguments = {"plan": {"x": TensorInfo(torch.float32, (1,))}, **kwargs}
    with pytest.raises(UsageError, match=needle):
        StreamingWriter(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_refuses_folder_with_existing_weights(tmp_path: Path) -> None:
    write_state(tmp_path, _state(), max_shard_size=250)
    with pytest.raises(UsageError, match=r"already holds .*model-00001-of-0000\d\.safetensors"):
        StreamingWriter(tmp_path, {"x": TensorInfo(torch.float32, (1,))})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("10kib", 10 * 1024),
        (" 7 B ", 7),
        ("123", 123),
        (".5KB", 500),
        (4096, 4096),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "5 GBs", "-1MB", "1e9", "5G", 0, -3, True, 2.5, None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(UsageError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_written_pages_are_dropped_as_the_file_grows_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every DROP_EVERY bytes the writer hands the file's pages back (writeback starts, clean pages leave the cache);
    the file still holds every tensor bit for bit, in any write order and across shards."""
    import resilient_tune.checkpoint._writer as writer_module

    calls: list[int] = []
    real = writer_module.drop_written_pages
    monkeypatch.setattr(writer_module, "DROP_EVERY", 200)
    monkeypatch.setattr(writer_module, "drop_written_pages", lambda fd: (calls.append(fd), real(fd)))
    state = _state()  # 780 bytes of tensors
    with StreamingWriter(tmp_path, plan_of(state), max_shard_size=400) as writer:
        for key in reversed(list(state)):
            writer.write(key, state[key])
    assert len(calls) >= 2
    with open_checkpoint(tmp_path) as reader:
        for key, tensor in state.items():
            assert same_bits(reader.get(key), tensor)


def test_drop_written_pages_is_a_harmless_hint(tmp_path: Path) -> None:
    """Dirty pages are only queued for writeback, never discarded; a descriptor that refuses the hint is ignored."""
    import os

    from resilient_tune.checkpoint._os_hints import drop_written_pages

    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    with open(path, "wb", buffering=0) as f:
        f.write(data)
        drop_written_pages(f.fileno())  # before any fsync: the bytes must survive
        f.write(data)
        drop_written_pages(f.fileno())
    assert path.read_bytes() == data + data
    read_end, write_end = os.pipe()
    try:
        drop_written_pages(write_end)  # ESPIPE: ignored
    finally:
        os.close(read_end)
        os.close(write_end)
