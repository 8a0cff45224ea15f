"""Bare sentences as sentence-transformers probes: a label-free embedding drift against the base.

Given sentences with no pair to score a loss on, the probe measures how far the model's embeddings moved:
``1 − cos(e_θ(s), e_θ₀(s))`` averaged over the sentences, 0 at the base (α = 0). The base's embeddings are computed
once, when the probes are installed, with θ₀ swapped in. The trainer's loss still scores pairs (target probes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from resilient_tune.engine import Engine
from resilient_tune.errors import UsageError

__all__ = ["INDEX", "EmbeddingDrift", "is_sentence_batch", "use_drift"]

INDEX = "__cocktail_sentences__"  # marks a batch of bare sentences and its position in the set


def is_sentence_batch(batch: Mapping[str, Any]) -> bool:
    return INDEX in batch


class EmbeddingDrift:
    """``score(model, batch)``: the embedding drift of a bare-sentence batch, the trainer's loss on any other batch.

    Args:
        trainer: The sentence-transformers trainer (its ``collect_features`` and ``compute_loss``).
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer
        self._base: dict[tuple[str, int], torch.Tensor] = {}

    def prime(
        self, engine: Engine, model: torch.nn.Module, batches: Mapping[str, list[Mapping[str, Any]]]
    ) -> None:
        """The base's embeddings of every bare-sentence batch (θ₀ swapped in, restored afterwards)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), engine.swapped(model, 0.0):
                for sets in batches.values():
                    for batch in sets:
                        if is_sentence_batch(batch):
                            self._base[batch[INDEX]] = self._embed(model, batch).cpu()
        finally:
            model.train(was_training)

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if not is_sentence_batch(batch):
            return self._trainer.compute_loss(model, dict(batch))
        now = self._embed(model, batch)
        base = self._base[batch[INDEX]].to(now.device)
        return (1.0 - F.cosine_similarity(now.float(), base.float(), dim=-1)).mean()

    def _embed(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        features, _ = self._trainer.collect_features(dict(batch))
        device = next(model.parameters()).device
        feature = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features[0].items()}
        return model(feature)["sentence_embedding"]


def use_drift(
    session: Any, trainer: Any, model: torch.nn.Module, general: dict[str, Any], target: dict[str, Any]
) -> None:
    """Install bare-sentence general probes on ``session`` (a :class:`~resilient_tune.Cocktail`): the embedding drift
    from the base is the general "loss", 0 at α = 0; target pairs are still scored with the trainer's loss.

    Raises:
        UsageError: Bare sentences mixed with pairs, or a policy that bounds the general loss relative to the base's.
    """
    if not all(is_sentence_batch(b[0]) for b in general.values()):
        raise UsageError(
            "general_data mixes bare sentences (an embedding drift, 0 at the base) with pairs (a loss); the two "
            "cannot be averaged: pass one kind"
        )
    if session.policy.needs_general_data:
        raise UsageError(
            f"policy {session.policy.name!r} bounds the general loss relative to the base's, but bare sentences give "
            "a label-free embedding drift that is 0 at the base; pass pairs (e.g. {'anchor', 'positive'}) for "
            "policy='budget', or use policy='fixed' to log the drift (cocktail/general_loss)"
        )
    drift = EmbeddingDrift(trainer)
    drift.prime(session.engine, model, {**general, **target})
    session.use_probes(model, general, target, score_fn=drift, with_kl=False)
