"""Finding the weight files of a checkpoint: a folder, a single file, or a sharded index; and validating the index."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from resilient_tune.errors import CheckpointFormatError

SAFETENSORS = "safetensors"
PICKLE = "pickle"

# Looked for in a folder, in this order (transformers' own preference: safetensors first, unsharded first).
_FOLDER_NAMES = (
    ("model.safetensors", SAFETENSORS),
    ("model.safetensors.index.json", SAFETENSORS),
    ("pytorch_model.bin", PICKLE),
    ("pytorch_model.bin.index.json", PICKLE),
)


class Layout(NamedTuple):
    """Where a checkpoint's weights are."""

    folder: Path  # the folder holding the weights (resolved)
    files: list[Path]  # weight files, in shard order
    format: str  # SAFETENSORS or PICKLE
    weight_map: dict[str, Path] | None  # tensor name -> shard file, when an index was given


def locate(path: Path, *, allow_pickle: bool) -> Layout:
    """Find the weight files of the checkpoint at ``path`` (an existing, resolved file or folder).

    Raises:
        CheckpointFormatError: No weights, an unsupported format, a pickle without the opt-in, or a bad index.
    """
    if not path.is_dir():
        return _layout_of_file(path, allow_pickle=allow_pickle)
    for name, _ in _FOLDER_NAMES:
        if (path / name).is_file():
            return _layout_of_file(path / name, allow_pickle=allow_pickle)
    found = sorted(child.name for child in path.iterdir())
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} entries)" if len(found) > 12 else "")
    raise CheckpointFormatError(
        f"no weights in folder {path}: looked for {', '.join(name for name, _ in _FOLDER_NAMES)}; "
        f"found {shown or 'nothing'}; pass the weight file itself if it has another name"
    )


def _layout_of_file(file: Path, *, allow_pickle: bool) -> Layout:
    name = file.name
    if name.endswith(".safetensors.index.json"):
        return _layout_of_index(file, SAFETENSORS)
    if name.endswith(".safetensors"):
        return Layout(file.parent, [file], SAFETENSORS, None)
    if name.endswith((".bin", ".bin.index.json")):
        if not allow_pickle:
            raise CheckpointFormatError(
                f"{file} is a pickle (PyTorch .bin), which can run code when loaded; pass allow_pickle=True "
                "(--allow-pickle on the command line) only if you trust it, or convert it to safetensors"
            )
        if name.endswith(".bin"):
            return Layout(file.parent, [file], PICKLE, None)
        return _layout_of_index(file, PICKLE)
    raise CheckpointFormatError(
        f"unsupported checkpoint format {file.suffix or name!r}: {file}; resilient-tune reads safetensors "
        "(model.safetensors, model.safetensors.index.json) and, with allow_pickle=True, PyTorch state-dict "
        "pickles (pytorch_model.bin); convert the checkpoint to safetensors first"
    )


def _layout_of_index(index: Path, fmt: str) -> Layout:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(f"cannot read the shard index {index}: {exc}") from exc
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(
            f"{index}: expected a JSON object with a non-empty 'weight_map' of tensor name -> shard file"
        )
    folder = index.parent
    roots = _allowed_roots(folder)
    shards: dict[str, Path] = {}
    for key, name in weight_map.items():
        if not (isinstance(name, str) and name in shards):
            shards[name] = _shard_path(index, key, name, roots)  # raises unless name is a safe file name
    files = [shards[name] for name in sorted(shards, key=_natural_key)]
    return Layout(folder, files, fmt, {key: shards[name] for key, name in weight_map.items()})


def _allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where shard files may really live: the folder, and the blob store of a Hugging Face cache snapshot.

    In the hub cache, ``<repo>/snapshots/<revision>/model-00001-of-00002.safetensors`` is a symlink to
    ``<repo>/blobs/<sha256>``; that one escape is allowed, every other symlink out of the folder is not.
    """
    real = folder.resolve()
    if real.parent.name == "snapshots":
        return real, real.parent.parent / "blobs"
    return (real,)


def _shard_path(index: Path, key: str, name: object, roots: tuple[Path, ...]) -> Path:
    entry = f"{index}: weight_map entry {key!r} -> {name!r}"
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\:\0"):
        raise CheckpointFormatError(
            f"{entry} is not a plain file name; an index may only name shard files in its own folder"
        )
    path = index.parent / name
    if not path.is_file():
        raise CheckpointFormatError(f"{entry}: the shard file {path} does not exist (incomplete download?)")
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        raise CheckpointFormatError(
            f"{entry}: {path} is a symlink to {real}, outside the checkpoint folder; refusing to follow it"
        )
    return path


def _natural_key(name: str) -> list[object]:
    """Sort ``model-2-of-10`` before ``model-10-of-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
