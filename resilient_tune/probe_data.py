"""Probe data in the user's own format, turned into language-model batches with the model's tokenizer.

General (and target) probes are given the way trainers take their train data; :func:`detect_format` names the form of
one example and :func:`lm_examples` tokenizes a set for a causal or a sequence-to-sequence language model:

========================  =======================================================================================
format                    examples
========================  =======================================================================================
``tokenized``             ``{"input_ids": [...], "labels": [...], ...}`` (used as they are)
``text``                  a string, or ``{"text": str}``: the loss covers every token
``prompt-completion``     ``{"prompt": str, "completion": str}`` (also LM_Cocktail's ``{"input", "output"}``,
                          joined with a space as LM_Cocktail does): the loss covers the completion
``preference``            ``{"prompt", "chosen", "rejected"}`` (DPO data): the prompt and its chosen answer
``messages``              ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat
                          template; conversational ``prompt``/``completion`` (lists of messages) too
========================  =======================================================================================

Sentence-embedding trainers take rows of text columns instead (``anchor``/``positive``, ``sentence1``/``sentence2``/
``score``, ...); their integration batches those with the trainer's own collator.

The tokenizer is used through its public calls only (``tokenizer(text)``, ``apply_chat_template``, ``pad_token_id``,
``eos_token_id``), so this module imports no framework. A loss over the completion masks the tokens of the prompt
(the longest common prefix of the prompt's and the whole example's tokens) with ``-100``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from .errors import UsageError

__all__ = ["FORMATS", "IGNORE", "detect_format", "lm_examples", "pad_lm_batch"]

FORMATS = ("tokenized", "text", "prompt-completion", "preference", "messages")
IGNORE = -100  # label of a token the loss skips
Kind = Literal["causal", "seq2seq"]


def detect_format(example: Any) -> str | None:
    """The format of one probe example (one of :data:`FORMATS`), or ``None`` when it is none of them."""
    if isinstance(example, str):
        return "text"
    if not isinstance(example, Mapping):
        return None
    keys = set(example)
    if "input_ids" in keys:
        return "tokenized"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"prompt", "chosen"} <= keys:
        return "preference"
    if {"prompt", "completion"} <= keys or {"input", "output"} <= keys:
        return "prompt-completion"
    if "text" in keys and isinstance(example["text"], str):
        return "text"
    return None


def lm_examples(
    data: Any, tokenizer: Any, *, kind: Kind = "causal", max_length: int = 512, name: str = "general_data"
) -> list[dict[str, list[int]]]:
    """Tokenize a probe set (any one format of :data:`FORMATS`) into ``input_ids`` / ``labels`` examples.

    Args:
        data: A sequence of examples (a list, a ``datasets.Dataset``, any ``__len__``/``__getitem__`` dataset).
        tokenizer: The model's tokenizer (a processor's ``tokenizer`` attribute is used when it has one).
        kind: ``"causal"`` (labels are the input's own tokens, the prompt masked) or ``"seq2seq"`` (the prompt is the
            encoder's input, the completion the decoder's labels; a ``text`` example is both).
        max_length: Tokens kept per example (the end is cut).
        name: The set's name, for messages.

    Raises:
        UsageError: An example of no known format, formats mixed in one set, a chat format without a chat template,
            chat data for a sequence-to-sequence model, no tokenizer, or an example with nothing to score.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    rows = [data[i] for i in range(len(data))]
    fmt = detect_format(rows[0]) if rows else None
    if fmt is None:
        shown = (
            list(rows[0])
            if rows and isinstance(rows[0], Mapping)
            else type(rows[0]).__name__
            if rows
            else "empty"
        )
        raise UsageError(
            f"{name}: the examples ({shown}) are in no format a language model's probes take; pass strings or "
            "{'text': ...}, {'prompt', 'completion'}, {'messages': [...]} (chat), {'prompt', 'chosen', 'rejected'} "
            "(preference), or tokenized {'input_ids', 'labels'}"
        )
    if fmt == "tokenized":
        return [dict(row) for row in rows]
    if tokenizer is None or not callable(tokenizer):
        raise UsageError(
            f"{name} holds {fmt} examples, which need the model's tokenizer: give the trainer its tokenizer "
            "(processing_class=tokenizer) or tokenize the probe data yourself (input_ids, labels)"
        )
    out = []
    for i, row in enumerate(rows):
        if detect_format(row) != fmt:
            raise UsageError(
                f"{name}[{i}] is not a {fmt} example like {name}[0]; use one format per probe set"
            )
        prompt, completion = _parts(row, fmt)
        ids, labels = _tokens(tokenizer, prompt, completion, kind, f"{name}[{i}]")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            raise UsageError(
                f"{name}[{i}] leaves no token to score (an empty completion, or cut at {max_length})"
            )
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad_lm_batch(
    examples: Sequence[Mapping[str, Any]], pad_id: int, *, kind: Kind = "causal"
) -> dict[str, Any]:
    """One batch of tokenized examples, padded on the right: ``input_ids`` with ``pad_id``, ``labels`` with ``-100``,
    an ``attention_mask`` (and, for ``seq2seq``, labels padded on their own length). Other fields are stacked when they
    are tensors of one shape, else dropped."""

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    ids = [list(map(int, e["input_ids"])) for e in examples]
    batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(r) for r in ids], 0)}
    if all("labels" in e for e in examples):
        labels = [list(map(int, e["labels"])) for e in examples]
        batch["labels"] = pad(labels, IGNORE)
    elif kind == "causal":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    return batch


def _parts(row: Any, fmt: str) -> tuple[Any, Any]:
    """``(prompt, completion)`` of an example: ``prompt`` is ``None`` for a plain text (every token scored)."""
    if fmt == "text":
        return None, row if isinstance(row, str) else row["text"]
    if fmt == "messages":
        return None, row.get("messages", row.get("conversations"))
    if fmt == "preference":
        return row["prompt"], row["chosen"]
    if "prompt" in row:
        return row["prompt"], row["completion"]
    return row["input"], " " + row["output"]  # LM_Cocktail's join: input + ' ' + output


def _tokens(
    tokenizer: Any, prompt: Any, completion: Any, kind: Kind, where: str
) -> tuple[list[int], list[int]]:
    chat = isinstance(completion, list) or isinstance(prompt, list)
    if chat and kind == "seq2seq":
        raise UsageError(
            f"{where} is a chat example; a sequence-to-sequence model takes text or prompt/completion"
        )
    if kind == "seq2seq":
        source = completion if prompt is None else prompt
        ids = _encode(tokenizer, source)
        labels = _encode(tokenizer, completion)
        return ids, labels
    if chat:
        full = _chat(tokenizer, (prompt or []) + completion, where)
        head = _chat(tokenizer, prompt, where, generation=True) if prompt else []
    else:
        full = _encode(tokenizer, (prompt or "") + completion)
        head = _encode(tokenizer, prompt) if prompt else []
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and (not full or full[-1] != eos):
            full = [*full, eos]
    cut = _common_prefix(head, full)
    return full, [IGNORE] * cut + full[cut:]


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _chat(tokenizer: Any, messages: list[Any], where: str, *, generation: bool = False) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"{where} is a chat example but the tokenizer has no chat template; set tokenizer.chat_template, or pass "
            "the probes as text or prompt/completion"
        )
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return list(ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
