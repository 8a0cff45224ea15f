"""Copying the files that make a weights folder a loadable model: config, generation config, tokenizer.

Sentence-transformers models also carry ``modules.json`` and one sub-folder per module (``1_Pooling``,
``2_Normalize``, ...). Those are copied too when every module folder holds configuration only; a module with
weights of its own (e.g. ``2_Dense``) is not part of the merge, so then the sentence-transformers files are left
out (with a warning) and the folder loads as a plain transformers model.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

from resilient_tune.errors import UsageError

# Copied by exact name. Weight files, shard indexes and resilient-tune's own cocktail.json / README.md never are.
SUPPORT_FILE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
    }
)
# sentence-transformers: top-level files, and module folders such as 1_Pooling (copied when weight-free).
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_MODULE_FOLDER = re.compile(r"^\d+_\w+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
# Copied by suffix: sentencepiece models (tokenizer.model, spiece.model, sentencepiece.bpe.model) and tiktoken.
SUPPORT_FILE_SUFFIXES = (".model", ".tiktoken")


def copy_support_files(src_folder: str | os.PathLike[str], dst_folder: str | os.PathLike[str]) -> list[str]:
    """Copy config, generation config, tokenizer and preprocessor files from one model folder to another.

    Only regular files at the top of ``src_folder`` whose names are in :data:`SUPPORT_FILE_NAMES` or end in
    :data:`SUPPORT_FILE_SUFFIXES` are copied (symlinks are followed, as in a Hugging Face cache snapshot);
    existing files of the same name in ``dst_folder`` are replaced.

    Args:
        src_folder: The source model folder.
        dst_folder: The destination folder; created if missing.

    Returns:
        The names copied, sorted.

    Raises:
        UsageError: ``src_folder`` is not a folder.
    """
    src, dst = Path(src_folder), Path(dst_folder)
    if not src.is_dir():
        raise UsageError(f"cannot copy support files: {src} is not a folder")
    names = sorted(
        child.name
        for child in src.iterdir()
        if (child.name in SUPPORT_FILE_NAMES or child.name.endswith(SUPPORT_FILE_SUFFIXES))
        and child.is_file()
    )
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    if src.resolve() == dst.resolve():
        return names
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names + _copy_sentence_transformers(src, dst)


def _copy_sentence_transformers(src: Path, dst: Path) -> list[str]:
    if not (src / "modules.json").is_file():
        return []
    modules = sorted(p for p in src.iterdir() if p.is_dir() and _MODULE_FOLDER.match(p.name))
    with_weights = [
        p.name for p in modules if any(f.name.endswith(_WEIGHT_SUFFIXES) for f in p.rglob("*") if f.is_file())
    ]
    if with_weights:
        warnings.warn(
            f"sentence-transformers module(s) {with_weights} of {src} hold weights that are not merged; "
            "modules.json is not copied, so the output loads as a plain transformers model",
            UserWarning,
            stacklevel=3,
        )
        return []
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    for module in modules:
        shutil.copytree(module, dst / module.name, dirs_exist_ok=True)
        copied.append(module.name + "/")
    return copied
