"""Our reader and writer against transformers: re-written checkpoints load with from_pretrained, and back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ckpt_testing import same_bits

from resilient_tune.checkpoint import StreamingWriter, atomic_dir, copy_support_files, open_checkpoint

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny_gpt2(folder: Path) -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def _tiny_bert(folder: Path) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    return model


def _rewrite(src: Path, dest: Path, max_shard_size: int | str) -> list[Path]:
    with open_checkpoint(src) as reader, atomic_dir(dest) as temp:
        with StreamingWriter(temp, reader.specs(), max_shard_size=max_shard_size) as writer:
            for key in reversed(reader.keys()):
                writer.write(key, reader.get(key))
        copy_support_files(reader.folder, temp)
    return writer.files


@pytest.mark.parametrize(
    ("build", "auto"),
    [(_tiny_gpt2, "AutoModelForCausalLM"), (_tiny_bert, "AutoModel")],
    ids=["gpt2", "bert"],
)
def test_sharded_rewrite_loads_in_transformers(
    tmp_path: Path, build: Callable[[Path], torch.nn.Module], auto: str
) -> None:
    original = build(tmp_path / "src")
    files = _rewrite(tmp_path / "src", tmp_path / "out", max_shard_size="8KB")
    assert len(files) > 3 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "out").eval()
    expected, got = original.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert same_bits(got[key], expected[key]), key
    ids = torch.tensor([[5, 17, 42, 3, 88]])
    with torch.no_grad():
        first, second = original(input_ids=ids), loaded(input_ids=ids)
    assert torch.equal(first[0], second[0])


def test_we_read_transformers_shards(tmp_path: Path) -> None:
    model = _tiny_gpt2(tmp_path / "unsharded")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with open_checkpoint(tmp_path / "unsharded") as one, open_checkpoint(tmp_path / "sharded") as many:
        assert len(many.files) > 1
        assert sorted(one.keys()) == sorted(many.keys())
        for key in one:
            assert same_bits(one.get(key), many.get(key)), key
        state = model.state_dict()
        for key in one:
            assert same_bits(one.get(key), state[key]), key
