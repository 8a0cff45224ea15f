"""Batches and losses per model type (``decoder``, ``encoder``, ``reranker``), as :mod:`resilient_tune.weights`
defines them: the batches are built once from the checked examples, then each ingredient's loss is the mean over the
batches of the per-batch mean, accumulated as the reference does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import UsageError

_ENCODER_SCALE = 0.05  # the reference's temperature of the contrastive scores (q·p / 0.05)


# --- batches -----------------------------------------------------------------------------------------------------


def _decoder_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_input_length: int,
    neg_number: int,
    seed: int,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``input_ids``/``labels``/``attention_mask``, each (B, T) with T = the batch's longest."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UsageError(
            "the tokenizer has no eos token; decoder examples end with eos; set tokenizer.eos_token"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    sequences: list[tuple[list[int], list[int]]] = []
    for row in rows:
        ids = [*tokenizer.encode(row["input"] + " " + row["output"]), eos_id]
        n_prompt = len(tokenizer.encode(row["input"]))
        labels = [-100] * n_prompt + ids[n_prompt:]
        sequences.append((ids[:max_input_length], labels[:max_input_length]))
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        if all(label == -100 for _, labels in chunk for label in labels):
            raise UsageError(
                f"examples {start}..{start + len(chunk) - 1} have no output tokens left after truncation to "
                f"max_input_length={max_input_length}; raise max_input_length or shorten the inputs"
            )
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in chunk], dtype=torch.long)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk], dtype=torch.long)
        batches.append(
            {
                "input_ids": input_ids.to(device),
                "labels": labels.to(device),
                "attention_mask": input_ids.ne(pad_id).to(device),
            }
        )
    return batches


def _sampled_groups(rows: Sequence[Mapping[str, Any]], neg_number: int, seed: int) -> list[list[str]]:
    """``[pos[0], neg_1, ..., neg_n]`` per example, negatives drawn in example order from ``Random(seed)``."""
    rng = random.Random(seed)
    return [[row["pos"][0], *rng.sample(list(row["neg"]), neg_number)] for row in rows]


def _encoder_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_input_length: int,
    neg_number: int,
    seed: int,
    device: torch.device,
) -> list[tuple[Any, Any]]:
    """``(queries, passages)`` tokenised pairs: B queries and B·(1 + neg_number) passages per batch."""
    groups = _sampled_groups(rows, neg_number, seed)
    kw = {"padding": True, "truncation": True, "max_length": max_input_length, "return_tensors": "pt"}
    batches = []
    for start in range(0, len(rows), batch_size):
        queries = [row["query"] for row in rows[start : start + batch_size]]
        passages = [text for group in groups[start : start + batch_size] for text in group]
        batches.append((tokenizer(queries, **kw).to(device), tokenizer(passages, **kw).to(device)))
    return batches


def _reranker_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_input_length: int,
    neg_number: int,
    seed: int,
    device: torch.device,
) -> list[tuple[Any, int]]:
    """``(pairs, B)``: B·G tokenised ``(query, passage)`` pairs per batch, G = 1 + neg_number, positive first."""
    groups = _sampled_groups(rows, neg_number, seed)
    kw = {"padding": True, "truncation": True, "max_length": max_input_length, "return_tensors": "pt"}
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = list(zip(rows[start : start + batch_size], groups[start : start + batch_size]))
        queries = [row["query"] for row, group in chunk for _ in group]
        passages = [text for _, group in chunk for text in group]
        batches.append((tokenizer(queries, passages, **kw).to(device), len(chunk)))
    return batches


# --- losses (mean over batches of the per-batch mean, accumulated as the reference does) -----------------------


def _decoder_loss(model: Any, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    total = torch.zeros(())
    for batch in batches:
        total = total + model(**batch).loss.float().cpu()
    return float(total / len(batches))


def _cls_embeddings(model: Any, inputs: Any) -> torch.Tensor:
    hidden = model(**inputs, return_dict=True).last_hidden_state[:, 0]  # (N, H)
    return torch.nn.functional.normalize(hidden, dim=-1)


def _encoder_loss(model: Any, batches: Sequence[tuple[Any, Any]]) -> float:
    total = torch.zeros(())
    for q_inputs, p_inputs in batches:
        q = _cls_embeddings(model, q_inputs)  # (B, H)
        p = _cls_embeddings(model, p_inputs)  # (B·G, H), G = 1 + neg_number
        scores = q @ p.T / _ENCODER_SCALE  # (B, B·G)
        target = torch.arange(q.size(0), device=scores.device) * (p.size(0) // q.size(0))
        total = total + torch.nn.functional.cross_entropy(scores.float(), target).cpu()
    return float(total / len(batches))


def _reranker_loss(model: Any, batches: Sequence[tuple[Any, int]]) -> float:
    total = torch.zeros(())
    for pairs, n_queries in batches:
        logits = model(**pairs, return_dict=True).logits  # (B·G, num_labels)
        if logits.size(-1) != 1:
            raise UsageError(
                f"the reranker has {logits.size(-1)} outputs per pair; reranker models score each "
                "(query, passage) pair with one logit (num_labels=1)"
            )
        scores = logits.view(n_queries, -1).float()  # (B, G), the positive in column 0
        target = torch.zeros(n_queries, dtype=torch.long, device=scores.device)
        total = total + torch.nn.functional.cross_entropy(scores, target).cpu()
    return float(total / len(batches))


_BUILDERS: dict[str, Callable[..., list[Any]]] = {
    "decoder": _decoder_batches,
    "encoder": _encoder_batches,
    "reranker": _reranker_batches,
}
_LOSSES: dict[str, Callable[[Any, Any], float]] = {
    "decoder": _decoder_loss,
    "encoder": _encoder_loss,
    "reranker": _reranker_loss,
}
