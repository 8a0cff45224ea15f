"""Offline merges of checkpoints whose vocabularies differ by appended rows (``merge(..., allow_grown_vocab=True)``).

A model fine-tuned after ``tokenizer.add_tokens`` + ``resize_token_embeddings`` has more rows in its input embedding
and output head than its base. Such inputs merge when every tensor that differs differs only by rows appended at the
end (dimension 0), the first model has the most rows (its config and tokenizer are the output's), the tokenizers agree
on every id the models share, and the method is ``linear``. Each row is then the weighted mix of the models that have
it, the weights renormalised over them: rows only the fine-tuned model has keep its values (the base has none to mix).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleModelsError, UsageError
from .merging import merge_tensor
from .sources import TensorSource

__all__ = ["grown_keys", "merge_rows", "same_shapes"]


def grown_keys(sources: Sequence[TensorSource], method: str) -> dict[str, list[int]]:
    """``{key: rows per source}`` for the tensors whose row counts differ, after checking the module's conditions.

    Raises:
        UsageError: A method other than ``linear``, or the first model not the one with the most rows.
        IncompatibleModelsError: A tensor differs in more than its row count, or the tokenizers disagree on a shared id.
    """
    specs = [s.specs() for s in sources]
    grown: dict[str, list[int]] = {}
    for key, info in specs[0].items():
        shapes = [spec[key].shape for spec in specs if key in spec]
        if len(shapes) < len(specs) or all(shape == info.shape for shape in shapes):
            continue  # missing keys are reported by the compatibility check
        if any(len(s) != len(info.shape) or not s or s[1:] != info.shape[1:] for s in shapes):
            raise IncompatibleModelsError(
                f"tensor {key!r} has shapes {[tuple(s) for s in shapes]}: allow_grown_vocab merges tensors that differ "
                "only by rows appended at the end (an embedding or head resized for new tokens)"
            )
        grown[key] = [s[0] for s in shapes]
    if not grown:
        return grown
    if method != "linear":
        raise UsageError(
            f"allow_grown_vocab works with method='linear' (got {method!r}): rows a model lacks have no task vector"
        )
    first = next((k for k, rows in grown.items() if rows[0] != max(rows)), None)
    if first is not None:
        raise UsageError(
            f"tensor {first!r} has {grown[first][0]} rows in {sources[0].name} but {max(grown[first])} in another input; "
            "put the model with the grown vocabulary first (its config and tokenizer are the output's)"
        )
    _check_tokenizers(sources, min(min(rows) for rows in grown.values()))
    return grown


def same_shapes(
    specs: Mapping[str, Any], grown: Mapping[str, Sequence[int]], reference: Mapping[str, Any]
) -> dict:
    """``specs`` (key -> (shape, dtype)) with the grown keys given the reference's shape, for the compatibility check."""
    return {k: (reference[k][0], v[1]) if k in grown else v for k, v in specs.items()}


def merge_rows(
    key: str,
    inputs: Sequence[Callable[[], torch.Tensor]],
    weights: Sequence[float],
    rows: Sequence[int],
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The linear mix of one grown tensor, row block by row block: each block mixes the inputs that have it, their
    weights renormalised to sum to 1 (a block only one input has is that input's)."""
    tensors = [load() for load in inputs]
    edges = sorted(set(rows))
    parts, start = [], 0
    for end in edges:
        holders = [(t[start:end], w) for t, w, r in zip(tensors, weights, rows) if r >= end]
        total = sum(w for _, w in holders)
        if abs(total) < 1e-12:
            raise UsageError(
                f"rows {start}-{end} of {key!r} belong to inputs whose weights sum to 0; nothing to mix"
            )
        parts.append(
            merge_tensor(
                "linear",
                [t for t, _ in holders],
                [w / total for _, w in holders],
                key=key,
                out_dtype=out_dtype,
            )
        )
        start = end
    return torch.cat(parts, dim=0)


def _check_tokenizers(sources: Sequence[TensorSource], shared: int) -> None:
    """The inputs' tokenizers map every id below ``shared`` to the same token.

    Raises:
        UsageError: An input has no tokenizer files to compare.
        IncompatibleModelsError: Two tokenizers disagree (names the first id and both tokens).
    """
    vocabs = []
    for source in sources:
        vocab = _vocabulary(source.folder) if source.folder is not None else None
        if vocab is None:
            raise UsageError(
                f"allow_grown_vocab checks that the tokenizers agree on the shared ids, but {source.name} has no "
                "tokenizer.json or vocab.txt; merge checkpoint folders saved with their tokenizer"
            )
        vocabs.append(vocab)
    reference = vocabs[0]
    for source, vocab in zip(sources[1:], vocabs[1:]):
        for i in range(shared):
            if reference.get(i) != vocab.get(i):
                raise IncompatibleModelsError(
                    f"the tokenizers disagree on id {i}: {reference.get(i)!r} in {sources[0].name}, {vocab.get(i)!r} "
                    f"in {source.name}; rows of a shared id must mean the same token to be mixed"
                )


def _vocabulary(folder: Path) -> dict[int, str] | None:
    """id -> token of the tokenizer saved in ``folder`` (``tokenizer.json``, else ``vocab.txt``), or ``None``."""
    fast = folder / "tokenizer.json"
    if fast.is_file():
        data = json.loads(fast.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        table = {int(i): str(t) for t, i in vocab.items()} if isinstance(vocab, Mapping) else {}
        if isinstance(vocab, list):  # unigram models list [token, score] pairs
            table = {i: str(entry[0]) for i, entry in enumerate(vocab)}
        table.update({int(t["id"]): str(t["content"]) for t in data.get("added_tokens") or []})
        return table
    plain = folder / "vocab.txt"
    if plain.is_file():
        return dict(enumerate(plain.read_text(encoding="utf-8").splitlines()))
    return None
