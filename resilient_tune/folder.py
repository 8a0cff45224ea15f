"""The one writer of model folders: every folder resilient-tune writes (``merge``, the engines, the callbacks) goes
through :func:`write_model_folder`.

A folder holds ``model.safetensors`` (sharded with an index above ``max_shard_size``), the config / generation config
and tokenizer, ``cocktail.json`` (the recipe document) and a model card ``README.md``; it is built in a temporary
folder and renamed into place only when complete (:func:`~resilient_tune.checkpoint.atomic_dir`), so a failure never
leaves a half-written folder. Tensors are streamed one at a time; with ``write_behind`` the writes (and each tensor's
own check) run on a second thread while the caller computes the next tensor. :class:`SubFolder` s receive a subset
of the same tensors under other keys from the same stream (e.g. Lightning's ``hf/``: the transformers model inside a
``LightningModule``), so nothing is read back.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ._version import __version__
from .card import model_card
from .checkpoint import StreamingWriter, TensorInfo, atomic_dir, copy_support_files, parse_size
from .recipe import COCKTAIL_FILE

__all__ = ["Item", "SubFolder", "write_model_folder", "write_recipe_files"]


class Item(NamedTuple):
    """One tensor to write, and an optional ``check()`` run just before it is written (on the writer thread with
    ``write_behind``), e.g. a NaN/Inf check of a merge result."""

    key: str
    tensor: torch.Tensor
    check: Callable[[], None] | None = None


@dataclass(frozen=True)
class SubFolder:
    """A second model folder inside the written one, fed from the same tensor stream.

    Attributes:
        name: Its name inside the folder (``"hf"``).
        keys: Source key -> key written in the sub-folder; tensors of other keys are not written there.
        config_from: A model whose ``config`` / ``generation_config`` are saved.
        tokenizer: Anything with ``save_pretrained(folder)``.
        doc: Its ``cocktail.json`` document (default: the folder's).
    """

    name: str
    keys: Mapping[str, str]
    config_from: Any = None
    tokenizer: Any = None
    doc: Mapping[str, Any] | None = field(default=None)


def write_model_folder(
    folder: str | os.PathLike[str],
    plan: Mapping[str, TensorInfo],
    tensors: Iterable[Item | tuple[str, torch.Tensor]],
    doc: Mapping[str, Any],
    *,
    config_from: Any = None,
    support_from: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    extra_files: Callable[[Path], None] | None = None,
    subfolders: Sequence[SubFolder] = (),
    write_behind: bool = False,
) -> Path:
    """Write a model folder atomically; see the module docs.

    Args:
        folder: The destination folder.
        plan: Key -> dtype and shape of every tensor, in the order they come (the writer plans its header from it).
        tensors: ``(key, tensor)`` pairs or :class:`Item` s, one per key of ``plan``, consumed one at a time.
        doc: The ``cocktail.json`` document (also the source of the model card).
        config_from: A model whose ``config`` / ``generation_config`` are saved when ``support_from`` has none.
        support_from: A model folder whose config/tokenizer files are copied.
        tokenizer: Anything with ``save_pretrained(folder)`` (used when no tokenizer file was copied).
        overwrite: Replace ``folder`` if it exists.
        max_shard_size: Shard size limit (bytes or ``"5GB"``-style string).
        extra_files: ``extra_files(tmp)`` adds or edits files last (after the weights, the support files and the recipe
            files), before the folder is committed.
        subfolders: Further folders fed from the same tensors (see :class:`SubFolder`).
        write_behind: Write on a second thread while the next tensor is computed (at most one tensor waits).

    Returns:
        The written folder (absolute).
    """
    shard_bytes = parse_size(max_shard_size)
    meta = {"resilient_tune": __version__}
    if doc.get("alpha") is not None:
        meta["alpha"] = repr(doc["alpha"])
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with (
            contextlib.ExitStack() as stack
        ):  # each writer closes (or, on an error, deletes its files) on exit
            writers = [
                stack.enter_context(StreamingWriter(tmp, plan, max_shard_size=shard_bytes, metadata=meta))
            ]
            routes: list[Mapping[str, str] | None] = [None]
            for sub in subfolders:
                sub_plan = {sub.keys[k]: info for k, info in plan.items() if k in sub.keys}
                writer = StreamingWriter(tmp / sub.name, sub_plan, max_shard_size=shard_bytes, metadata=meta)
                writers.append(stack.enter_context(writer))
                routes.append(sub.keys)

            def write(item: Item | tuple[str, torch.Tensor]) -> None:
                key, tensor, *rest = item
                if rest and rest[0] is not None:
                    rest[0]()
                for writer, route in zip(writers, routes):
                    if route is None:
                        writer.write(key, tensor)
                    elif key in route:
                        writer.write(route[key], tensor)

            try:
                (_behind if write_behind else _inline)(write, tensors)
            finally:  # a generator left half-way (a failed write) must leave its own context (e.g. no_grad) now
                close = getattr(tensors, "close", None)
                if callable(close):
                    close()
        _write_support(config_from, tmp, support_from, tokenizer)
        for sub in subfolders:
            _write_support(sub.config_from, tmp / sub.name, None, sub.tokenizer)
            write_recipe_files(tmp / sub.name, sub.doc or doc)
        write_recipe_files(tmp, doc)
        if extra_files is not None:
            extra_files(tmp)
    return Path(os.path.abspath(folder))


def write_recipe_files(folder: Path, doc: Mapping[str, Any]) -> None:
    """``cocktail.json`` (``doc``) and the model card ``README.md`` made from it, into ``folder``."""
    (folder / COCKTAIL_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(doc))


def _inline(write: Callable[[Any], None], tensors: Iterable[Any]) -> None:
    for item in tensors:
        write(item)


def _behind(write: Callable[[Any], None], tensors: Iterable[Any]) -> None:
    """Check and write each tensor on a second thread while the next one is computed.

    File writes and the NaN/Inf check release the GIL, so they overlap the merge arithmetic and the reads. At most one
    tensor waits in the hand-off queue and one is being written, so memory stays a small multiple of the largest
    tensor. The first failure on either side stops both and is raised here (nothing is committed).
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=1)
    failures: list[BaseException] = []

    def work() -> None:
        while (item := handoff.get()) is not None:
            if failures:
                continue  # drain after a failure so the producer never blocks
            try:
                write(item)
            except BaseException as exc:  # re-raised on the calling thread
                failures.append(exc)
            del item

    thread = threading.Thread(target=work, name="resilient-tune-writer", daemon=True)
    thread.start()
    try:
        for item in tensors:
            if failures:
                break
            handoff.put(item)
            del item
    finally:
        handoff.put(None)
        thread.join()
    if failures:
        raise failures[0]


def _write_support(model: Any, folder: Path, support_from: Any, tokenizer: Any) -> None:
    if support_from is not None:
        copy_support_files(support_from, folder)
    config = getattr(model, "config", None)
    if not (folder / "config.json").exists() and hasattr(config, "to_json_file"):
        config.to_json_file(str(folder / "config.json"))
    generation = getattr(model, "generation_config", None)
    if not (folder / "generation_config.json").exists() and hasattr(generation, "to_json_file"):
        generation.to_json_file(str(folder / "generation_config.json"))
    has_tokenizer = any(
        (folder / n).exists() for n in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")
    )
    if tokenizer is not None and not has_tokenizer and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
