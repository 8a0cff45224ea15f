"""CheckpointReader: locating weights, sharded indexes and their escapes, pickles on opt-in, fingerprints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from ckpt_testing import same_bits, write_state

from resilient_tune.checkpoint import CheckpointReader, TensorInfo, open_checkpoint
from resilient_tune.errors import CheckpointFormatError, UsageError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(40, 8, generator=generator),
        "layer.0.weight": torch.randn(8, 8, generator=generator),
        "layer.0.bias": torch.randn(8, generator=generator),
        "layer.1.weight": torch.randn(8, 8, generator=generator).to(torch.bfloat16),
        "steps": torch.tensor(7),
    }


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    files = write_state(folder, _state(), max_shard_size=300)
    assert len(files) > 2
    return folder


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _save_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_single_file_and_folder(tmp_path: Path) -> None:
    state = _state()
    (file,) = write_state(tmp_path, state)
    for path in (tmp_path, file):
        with open_checkpoint(path) as reader:
            assert reader.path == Path(path).resolve()
            assert reader.folder == tmp_path.resolve()
            assert reader.files == [file.resolve()]
            assert reader.format == "safetensors"
            assert reader.keys() == list(state)
            assert reader.specs() == {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in state.items()}
            assert len(reader) == len(state) and list(reader) == list(state)
            assert "steps" in reader and "nope" not in reader
            for key, value in state.items():
                assert same_bits(reader.get(key), value)


def test_get_returns_fresh_owned_tensors(tmp_path: Path) -> None:
    write_state(tmp_path, _state())
    with open_checkpoint(tmp_path) as reader:
        first = reader.get("layer.0.weight")
        first.zero_()
        second = reader.get("layer.0.weight")
        assert second.abs().sum() > 0
        assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


def test_sharded_folder(sharded: Path) -> None:
    state = _state()
    index = _index(sharded)
    with open_checkpoint(sharded) as reader:
        assert reader.keys() == list(state)
        assert [f.name for f in reader.files] == sorted(set(index["weight_map"].values()))
        for key, value in state.items():
            assert same_bits(reader.get(key), value)
    with open_checkpoint(sharded / "model.safetensors.index.json") as reader:
        assert reader.keys() == list(state)


def test_missing_path() -> None:
    with pytest.raises(CheckpointFormatError, match=r"no such file or folder: .*nowhere"):
        CheckpointReader("/nonexistent/nowhere")


def test_folder_without_weights_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tf_model.h5").write_bytes(b"")
    with pytest.raises(CheckpointFormatError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tf_model.h5"):
        assert name in message


@pytest.mark.parametrize(
    "name", ["model.gguf", "model.pt", "model.ckpt", "model.h5", "model.msgpack", "weights"]
)
def test_unsupported_formats(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointFormatError, match="unsupported checkpoint format"):
        open_checkpoint(tmp_path / name)


# --- pickles ----------------------------------------------------------------------------------------------


def test_pickle_needs_opt_in(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "pytorch_model.bin")
    for path in (tmp_path, tmp_path / "pytorch_model.bin"):
        with pytest.raises(CheckpointFormatError) as info:
            open_checkpoint(path)
        message = str(info.value)
        assert "pickle" in message and "allow_pickle=True" in message and "--allow-pickle" in message


def test_pickle_with_opt_in(tmp_path: Path) -> None:
    state = _state()
    state["tied"] = state["embed.weight"]  # shares storage, as tied weights do
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path, allow_pickle=True) as reader:
        assert reader.format == "pickle" and reader.metadata() == {}
        assert reader.keys() == list(state)
        assert reader.info("layer.1.weight") == TensorInfo(torch.bfloat16, (8, 8))
        tied = reader.get("tied")
        tied.zero_()
        assert same_bits(reader.get("embed.weight"), state["embed.weight"])
        for key, value in state.items():
            assert same_bits(reader.get(key), value)


def test_safetensors_preferred_over_pickle(tmp_path: Path) -> None:
    write_state(tmp_path, {"a": torch.ones(2)})
    torch.save({"b": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as reader:
        assert reader.keys() == ["a"]


def test_sharded_pickle(tmp_path: Path) -> None:
    state = _state()
    keys = list(state)
    torch.save({k: state[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if i < 2 else 2}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointFormatError, match="allow_pickle=True"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as reader:
        assert sorted(reader.keys()) == sorted(keys)
        for key, value in state.items():
            assert same_bits(reader.get(key), value)
    weight_map["ghost"] = "pytorch_model-00001-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with (
        open_checkpoint(tmp_path, allow_pickle=True) as reader,
        pytest.raises(CheckpointFormatError, match="ghost"),
    ):
        reader.get("embed.weight")


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"a": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="weights_only=True"):
        open_checkpoint(tmp_path, allow_pickle=True).keys()
    assert "must never run" not in capsys.readouterr().out


def test_pickle_that_is_not_a_flat_state_dict(tmp_path: Path) -> None:
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="flat state dict"):
        open_checkpoint(tmp_path, allow_pickle=True).keys()


# --- sharded index validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_index_entries_must_be_plain_names(sharded: Path, bad: str) -> None:
    index = _index(sharded)
    index["weight_map"]["layer.0.bias"] = bad
    _save_index(sharded, index)
    with pytest.raises(CheckpointFormatError, match=r"weight_map entry 'layer\.0\.bias'.*plain file name"):
        open_checkpoint(sharded)


def test_index_symlink_escaping_the_folder_is_refused(sharded: Path, tmp_path: Path) -> None:
    index = _index(sharded)
    shard = index["weight_map"]["layer.0.bias"]
    outside = tmp_path / "outside.safetensors"
    shutil.move(sharded / shard, outside)
    os.symlink(outside, sharded / shard)
    with pytest.raises(CheckpointFormatError, match=r"'layer\.0\.bias'.*outside the checkpoint folder"):
        open_checkpoint(sharded)


def test_hugging_face_cache_layout_is_allowed(sharded: Path, tmp_path: Path) -> None:
    """snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub stores downloads."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(sharded.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / file.name)
    with open_checkpoint(snapshot) as reader:
        assert reader.keys() == list(_state())


def test_missing_shard_is_named(sharded: Path) -> None:
    shard = _index(sharded)["weight_map"]["layer.0.bias"]
    (sharded / shard).unlink()
    with pytest.raises(CheckpointFormatError, match=f"{shard}.*does not exist"):
        open_checkpoint(sharded)


def test_key_in_index_but_not_in_its_shard(sharded: Path) -> None:
    index = _index(sharded)
    index["weight_map"]["ghost.weight"] = index["weight_map"]["layer.0.bias"]
    _save_index(sharded, index)
    with pytest.raises(CheckpointFormatError, match=r"'ghost\.weight'.*no such tensor"):
        open_checkpoint(sharded)


def test_key_in_wrong_shard(sharded: Path) -> None:
    index = _index(sharded)
    first, last = sorted(set(index["weight_map"].values()))[0], sorted(set(index["weight_map"].values()))[-1]
    moved = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][moved] = last
    _save_index(sharded, index)
    with pytest.raises(CheckpointFormatError, match=f"'{moved}'"):
        open_checkpoint(sharded)


def test_key_in_shard_but_not_in_index(sharded: Path) -> None:
    index = _index(sharded)
    del index["weight_map"]["layer.0.bias"]
    _save_index(sharded, index)
    with pytest.raises(CheckpointFormatError, match=r"'layer\.0\.bias'.*does not list"):
        open_checkpoint(sharded)


def test_tensor_stored_in_two_shards(tmp_path: Path) -> None:
    write_state(tmp_path / "a", {"x": torch.ones(2)})
    write_state(tmp_path / "b", {"x": torch.ones(2), "y": torch.ones(1)})
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tmp_path / "a" / "model.safetensors", folder / "s1.safetensors")
    shutil.copy(tmp_path / "b" / "model.safetensors", folder / "s2.safetensors")
    _save_index(folder, {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}})
    with pytest.raises(CheckpointFormatError, match="stored twice"):
        open_checkpoint(folder)


@pytest.mark.parametrize("content", ["not json", "[]", '{"weight_map": {}}', '{"weight_map": ["a"]}'])
def test_malformed_index(tmp_path: Path, content: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointFormatError, match="index"):
        open_checkpoint(tmp_path)


# --- lookups, lifecycle, identity -------------------------------------------------------------------------------


def test_unknown_key_is_named_with_suggestions(tmp_path: Path) -> None:
    write_state(tmp_path, _state())
    with open_checkpoint(tmp_path) as reader:
        with pytest.raises(
            CheckpointFormatError, match=r"'layer\.0\.wieght'.*did you mean 'layer\.0\.weight'"
        ):
            reader.info("layer.0.wieght")
        with pytest.raises(CheckpointFormatError, match="'nothing'"):
            reader.get("nothing")


def test_get_after_close(tmp_path: Path) -> None:
    write_state(tmp_path, _state())
    reader = open_checkpoint(tmp_path)
    reader.get("steps")
    reader.close()
    reader.close()
    with pytest.raises(UsageError, match="closed"):
        reader.get("steps")


def test_fingerprint(tmp_path: Path) -> None:
    write_state(tmp_path / "a", _state(0))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    changed = _state(0)
    changed["layer.0.bias"][3] += 1  # same header, one value differs
    write_state(tmp_path / "b", changed)
    write_state(tmp_path / "c", _state(0), metadata={"note": "x"})
    prints = {name: open_checkpoint(tmp_path / name).fingerprint() for name in ("a", "copy", "b", "c")}
    assert prints["a"] == prints["copy"] == open_checkpoint(tmp_path / "a").fingerprint()
    assert len({prints["a"], prints["b"], prints["c"]}) == 3
    assert len(prints["a"]) == 64 and int(prints["a"], 16) >= 0


def test_fingerprint_samples_large_files(tmp_path: Path) -> None:
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB of data: sampled, not read whole
    write_state(tmp_path / "a", big)
    changed = {"w": torch.zeros(1 << 20)}
    changed["w"][-1] = 1.0  # the last sample block covers the end of the data
    write_state(tmp_path / "b", changed)
    assert open_checkpoint(tmp_path / "a").fingerprint() != open_checkpoint(tmp_path / "b").fingerprint()
