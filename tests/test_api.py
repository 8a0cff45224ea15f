"""The general merge API: in-memory and streamed-to-disk merges, recipes, validation before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import resilient_tune as rt
from resilient_tune.errors import CheckpointFormatError, IncompatibleModelsError, NonFiniteError, UsageError


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(11, 4, generator=g).to(dtype),
        "layers.0.w": torch.randn(4, 4, generator=g).to(dtype),
        "layers.1.w": torch.randn(4, 4, generator=g).to(dtype),
        "head.bias": torch.randn(3, generator=g).to(dtype),
        "position_ids": torch.arange(5),
    }


def _write(folder, state, config: dict | None = None):
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return folder


@pytest.fixture
def three(tmp_path):
    states = [_state(i) for i in range(3)]
    paths = [_write(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    return states, paths


def test_in_memory_linear_matches_hand_computed():
    a, b = _state(0), _state(1)
    out = rt.merge([a, b], [0.25, 0.75])
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(out[key], 0.25 * a[key] + 0.75 * b[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(out[key], a[key])


def test_default_weights_are_equal():
    a, b = _state(0), _state(1)
    out = rt.merge([a, b])
    torch.testing.assert_close(out["layers.0.w"], (a["layers.0.w"] + b["layers.0.w"]) / 2)


def test_written_folder_equals_in_memory_and_carries_recipe(three, tmp_path):
    states, paths = three
    dest = rt.merge(paths, [0.5, 0.3, 0.2], out=tmp_path / "out")
    assert dest == tmp_path / "out"
    written = load_file(str(dest / "model.safetensors"))
    expected = rt.merge(states, [0.5, 0.3, 0.2])
    assert written.keys() == expected.keys()
    for key in expected:
        assert torch.equal(written[key], expected[key]), key
    doc = json.loads((dest / "cocktail.json").read_text())
    assert doc["recipe"]["method"] == "linear"
    assert doc["recipe"]["weights"] == [0.5, 0.3, 0.2]
    assert [i["name"] for i in doc["ingredients"]] == [str(p) for p in paths]
    assert all(len(i["fingerprint"]) == 64 for i in doc["ingredients"])
    assert (dest / "config.json").is_file()
    assert "linear" in (dest / "README.md").read_text()
    assert rt.Recipe.from_dict(doc).weights == (0.5, 0.3, 0.2)


def test_modules_are_ingredients():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    out = rt.merge([a, b], [0.5, 0.5])
    torch.testing.assert_close(out["weight"], (a.weight + b.weight).detach() / 2)


def test_task_arithmetic_with_base_and_lambda():
    base, a, b = _state(0), _state(1), _state(2)
    out = rt.merge([a, b], [1.0, 1.0], method="task_arithmetic", base=base, lambda_=0.5)
    key = "layers.1.w"
    expected = base[key] + 0.5 * ((a[key] - base[key]) + (b[key] - base[key]))
    torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)


def test_dtype_override_and_preservation(three, tmp_path):
    states = [_state(i, torch.float16) for i in range(2)]
    out = rt.merge(states, [0.5, 0.5])
    assert out["layers.0.w"].dtype == torch.float16
    assert out["position_ids"].dtype == torch.int64
    out32 = rt.merge(states, [0.5, 0.5], dtype="float32")
    assert out32["layers.0.w"].dtype == torch.float32
    assert out32["position_ids"].dtype == torch.int64
    bf = rt.merge(states, [0.5, 0.5], dtype="bf16")
    assert bf["head.bias"].dtype == torch.bfloat16


def test_sharded_output_round_trip(three, tmp_path):
    states, paths = three
    dest = rt.merge(paths, [0.2, 0.3, 0.5], out=tmp_path / "sharded", max_shard_size=200)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    merged = {}
    for shard in shards:
        merged.update(load_file(str(dest / shard)))
    expected = rt.merge(states, [0.2, 0.3, 0.5])
    assert merged.keys() == expected.keys()
    # the sharded output is itself a valid merge input
    again = rt.merge([dest], [1.0])
    for key in expected:
        assert torch.equal(again[key], expected[key])


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"weights": [0.5]}, UsageError, "weight"),
        ({"weights": [0.5, 0.6, 0.2]}, UsageError, "normalize"),
        ({"weights": [0.5, float("nan"), 0.5]}, UsageError, "nan"),
        ({"weights": [0.5, float("inf"), 0.5]}, UsageError, "inf"),
        ({"method": "nope"}, UsageError, "linear"),
        ({"method": "ties"}, UsageError, "base"),
        ({"method": "ties", "base": "BASE", "density": 0.0}, UsageError, "(0, 1]"),
        ({"method": "ties", "base": "BASE", "density": 1.5}, UsageError, "(0, 1]"),
        ({"dtype": "int8"}, UsageError, "float32"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(three, tmp_path, kwargs, error, fragment):
    _, paths = three
    kwargs = dict(kwargs)
    if kwargs.get("base") == "BASE":
        kwargs["base"] = paths[0]
    kwargs.setdefault("weights", [0.5, 0.3, 0.2])
    with pytest.raises(error) as info:
        rt.merge(paths, out=tmp_path / "out", **kwargs)
    assert fragment.lower() in str(info.value).lower()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_normalize_rescales_weights(three, tmp_path):
    states, paths = three
    out = rt.merge(paths, [1, 1, 2], normalize=True)
    torch.testing.assert_close(
        out["head.bias"], (states[0]["head.bias"] + states[1]["head.bias"] + 2 * states[2]["head.bias"]) / 4
    )


def test_missing_path(tmp_path, three):
    _, paths = three
    with pytest.raises(CheckpointFormatError, match="nope"):
        rt.merge([paths[0], tmp_path / "nope"], [0.5, 0.5], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_keys_and_shapes_name_the_key(tmp_path):
    a, b = _state(0), _state(1)
    b.pop("head.bias")
    with pytest.raises(IncompatibleModelsError, match=r"head\.bias"):
        rt.merge([a, b], [0.5, 0.5])
    c = _state(2)
    c["layers.0.w"] = torch.zeros(4, 5)
    with pytest.raises(IncompatibleModelsError, match=r"layers\.0\.w") as info:
        rt.merge([_state(0), c], [0.5, 0.5])
    assert "(4, 4)" in str(info.value) or "[4, 4]" in str(info.value)


def test_non_finite_tensor_writes_nothing(tmp_path):
    a, b = _state(0), _state(1)
    b["layers.1.w"][0, 0] = float("nan")
    pa, pb = _write(tmp_path / "a", a), _write(tmp_path / "b", b)
    with pytest.raises(NonFiniteError, match=r"layers\.1\.w"):
        rt.merge([pa, pb], [0.5, 0.5], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_destination_exists_needs_overwrite(three, tmp_path):
    _, paths = three
    dest = rt.merge(paths, [0.5, 0.3, 0.2], out=tmp_path / "out")
    marker = dest / "keep.txt"
    marker.write_text("old")
    with pytest.raises(UsageError, match="overwrite"):
        rt.merge(paths, [0.5, 0.3, 0.2], out=dest)
    assert marker.exists()
    rt.merge(paths, [0.2, 0.3, 0.5], out=dest, overwrite=True)
    assert not marker.exists()
    assert json.loads((dest / "cocktail.json").read_text())["recipe"]["weights"] == [0.2, 0.3, 0.5]


def test_destination_parent_is_a_file(three, tmp_path):
    _, paths = three
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        rt.merge(paths, [0.5, 0.3, 0.2], out=tmp_path / "file" / "out")


def test_extra_files_and_metadata(three, tmp_path):
    _, paths = three
    dest = rt.merge(
        paths,
        [0.5, 0.3, 0.2],
        out=tmp_path / "out",
        metadata={"auto_weights": {"losses": [1.0, 2.0, 3.0]}},
        extra_files={"1_Pooling/config.json": "{}"},
    )
    assert (dest / "1_Pooling" / "config.json").read_text() == "{}"
    assert json.loads((dest / "cocktail.json").read_text())["auto_weights"]["losses"] == [1.0, 2.0, 3.0]
    with pytest.raises(UsageError, match="outside"):
        rt.merge(paths, [0.5, 0.3, 0.2], out=tmp_path / "o2", extra_files={"../evil": "x"})
    assert not (tmp_path / "o2").exists()


def test_recipe_round_trip_and_validation():
    recipe = rt.Recipe(method="ties", weights=(1, 1), options={"density": 0.3}, dtype="fp16", seed=3)
    assert recipe.dtype == "float16"
    again = rt.Recipe.from_json(recipe.to_json())
    assert again == rt.Recipe(
        method="ties", weights=(1.0, 1.0), options=recipe.resolved_options(), dtype="float16", seed=3
    )
    with pytest.raises(UsageError, match="unknown recipe fields"):
        rt.Recipe.from_dict({"method": "linear", "wieghts": [1]})
    with pytest.raises(UsageError):
        rt.Recipe(method="linear", weights=(float("nan"),))


def test_merge_with_recipe_object(three):
    states, _ = three
    recipe = rt.Recipe(method="linear", weights=(0.5, 0.5, 0.0))
    out = rt.merge(states, recipe=recipe)
    torch.testing.assert_close(out["head.bias"], 0.5 * states[0]["head.bias"] + 0.5 * states[1]["head.bias"])
    with pytest.raises(UsageError, match="either"):
        rt.merge(states, [1, 0, 0], recipe=recipe)


def test_inputs_not_mutated(three):
    states, _ = three
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    rt.merge(states, [0.5, 0.3, 0.2])
    rt.merge(states[:2], [1, 1], method="ties", base=states[2], density=0.5)
    for s, b in zip(states, before):
        for key in s:
            assert torch.equal(s[key], b[key])


def test_different_architectures_are_named(tmp_path):
    a = _write(tmp_path / "gpt", _state(0), {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    b = _write(tmp_path / "bert", _state(1), {"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(IncompatibleModelsError, match="'bert' model") as info:
        rt.merge([a, b], [0.5, 0.5], out=tmp_path / "out")
    assert "GPT2LMHeadModel" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_legacy_int_buffer_missing_from_some_models(tmp_path):
    """A base saved by an older transformers has `position_ids`; the fine-tuned copy saved by a newer one does not."""
    with_ids, without = _state(0), _state(1)
    without.pop("position_ids")
    out = rt.merge([with_ids, without], [0.5, 0.5])
    assert torch.equal(out["position_ids"], with_ids["position_ids"])
    with pytest.warns(UserWarning, match="position_ids"):
        out = rt.merge([without, with_ids], [0.5, 0.5])
    assert "position_ids" not in out
    # a floating tensor missing from one model is still an error
    without.pop("head.bias")
    with pytest.raises(IncompatibleModelsError, match=r"head\.bias"):
        rt.merge([with_ids, without], [0.5, 0.5])
    # holders that disagree are an error too
    other = _state(2)
    other["position_ids"] = torch.arange(5) + 1
    with pytest.raises(IncompatibleModelsError, match="position_ids"):
        rt.merge([with_ids, other], [0.5, 0.5])


def test_dtype_override_updates_copied_config(tmp_path):
    a = _write(tmp_path / "a", _state(0), {"model_type": "toy", "dtype": "float32"})
    b = _write(tmp_path / "b", _state(1), {"model_type": "toy", "dtype": "float32"})
    dest = rt.merge([a, b], [0.5, 0.5], out=tmp_path / "out", dtype="bf16")
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(dest / "model.safetensors"))["head.bias"].dtype == torch.bfloat16


def test_in_memory_fingerprints_tell_models_apart(tmp_path):
    dest_a = rt.merge([_state(0), _state(1)], [0.5, 0.5], out=tmp_path / "a")
    prints = [i["fingerprint"] for i in json.loads((dest_a / "cocktail.json").read_text())["ingredients"]]
    assert prints[0] != prints[1]


def test_writer_thread_failure_stops_the_merge_and_writes_nothing(three, tmp_path, monkeypatch):
    """A failure on the writer thread (here a full disk) surfaces on the caller's thread; nothing is committed."""
    from resilient_tune.checkpoint import StreamingWriter

    def full_disk(self, key, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StreamingWriter, "write", full_disk)
    _, paths = three
    with pytest.raises(OSError, match="No space"):
        rt.merge(paths, [0.5, 0.3, 0.2], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
