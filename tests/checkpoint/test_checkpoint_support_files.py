"""copy_support_files: config and tokenizer files travel with the weights; weights and our own files do not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from resilient_tune.checkpoint import copy_support_files
from resilient_tune.errors import UsageError

_SUPPORT = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "spiece.model",
    "tokenizer.model",
]
_NEVER = [
    "model.safetensors",
    "model-00001-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "cocktail.json",
    "README.md",
    "training_args.bin",
    "optimizer.pt",
    "modeling_custom.py",
]


def test_copies_support_files_only(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in _SUPPORT + _NEVER:
        (src / name).write_text(f"content of {name}")
    (src / "tokenizer").mkdir()  # a folder named like nothing we copy is ignored
    copied = copy_support_files(src, dst)
    assert copied == sorted(_SUPPORT)
    assert sorted(p.name for p in dst.iterdir()) == sorted(_SUPPORT)
    for name in _SUPPORT:
        assert (dst / name).read_text() == f"content of {name}"


def test_follows_symlinks_like_a_hub_cache(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (tmp_path / "blob").write_text("{}")
    os.symlink(tmp_path / "blob", src / "config.json")
    assert copy_support_files(src, dst) == ["config.json"]
    assert not (dst / "config.json").is_symlink() and (dst / "config.json").read_text() == "{}"


def test_source_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a folder"):
        copy_support_files(tmp_path / "missing", tmp_path / "dst")


def test_same_folder_is_a_no_op(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert copy_support_files(tmp_path, tmp_path) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "{}"
