"""Copying the files that make a weights folder a loadable model: config, generation config, tokenizer."""

from __future__ import annotations

import os
import shutil
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
    return names
