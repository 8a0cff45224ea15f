"""Trainers built on ``transformers.Trainer``: what differs between the families the callback runs in.

A *family* is a kind of trainer and model whose probe data, probe objective and checkpoint layout differ from the
plain ``Trainer``'s. Each is recognised from the trainer's and the model's classes (no import of the family's
package is needed to tell), and supplies:

- ``batches``: turn the user's probe data into batches the way the trainer turns its eval data into batches;
- ``saver``: write a resilient folder in the layout the family's own loader expects (``None``: the generic
  ``from_pretrained`` writer of the engine).

Families:

- ``sentence-transformers`` (``SentenceTransformerTrainer``, ``CrossEncoderTrainer``, ``SparseEncoderTrainer``): the
  model is a ``SentenceTransformer`` (an ``nn.Sequential`` of modules whose ``state_dict`` keys carry the module
  prefix, ``0.model.embeddings...``) while the checkpoint stores each module in its own layout (the transformer's
  weights with bare keys in the root, ``1_Pooling/``, ``2_Normalize/``, ``modules.json``,
  ``config_sentence_transformers.json``). Its resilient folders are written by the model's own ``save`` while
  θ(α) is swapped into the live weights, so they load with ``SentenceTransformer(path)`` into the same module
  stack. Probe data are rows of text columns (``anchor``/``positive``/...), batched with the trainer's own data
  collator (which tokenizes them) and scored with the trainer's loss; the trainer's column filter is not used.
- ``transformers`` (everything else): tokenized example dicts batched with the trainer's collator, unused columns
  removed as the trainer removes them for eval data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resilient_tune.engine import FamilySaver
from resilient_tune.errors import UsageError
from resilient_tune.session import ScoreFn

__all__ = [
    "SENTENCE_TRANSFORMERS",
    "TRANSFORMERS",
    "family_of",
    "is_sentence_transformer",
    "probe_batches",
    "saver_for",
    "trainer_score_fn",
]

SENTENCE_TRANSFORMERS = "sentence-transformers"
TRANSFORMERS = "transformers"


def _from_package(obj: Any, package: str) -> bool:
    """``obj``'s class (or one of its bases) is defined in ``package``."""
    return any(cls.__module__.split(".")[0] == package for cls in type(obj).__mro__)


def is_sentence_transformer(model: Any) -> bool:
    """True for a sentence-transformers model (``SentenceTransformer``, ``CrossEncoder``, ``SparseEncoder``)."""
    return (
        isinstance(model, torch.nn.Module)
        and _from_package(model, "sentence_transformers")
        and hasattr(model, "save")
    )


def family_of(trainer: Any, model: Any = None) -> str:
    """The family of ``trainer`` (or of ``model`` when there is no trainer): one of the module's constants."""
    if (trainer is not None and _from_package(trainer, "sentence_transformers")) or is_sentence_transformer(
        model
    ):
        return SENTENCE_TRANSFORMERS
    return TRANSFORMERS


def saver_for(model: Any) -> FamilySaver | None:
    """The family's own writer for ``model`` (called with a folder while θ(α) is in the live weights), or ``None``
    for the engine's generic ``from_pretrained`` writer."""
    if is_sentence_transformer(model):
        return FamilySaver(
            library=SENTENCE_TRANSFORMERS,
            loader=f"{type(model).__name__}(path)",
            save=lambda folder: model.save(str(folder), create_model_card=False),
        )
    return None


def probe_batches(trainer: Any, args: Any, dataset: Any, name: str) -> list[Mapping[str, Any]]:
    """Batch a probe dataset once, as ``trainer`` batches its eval data, with the eval batch size.

    Raises:
        UsageError: The data cannot be batched (names the set, the cause and the expected form).
    """
    if family_of(trainer) == SENTENCE_TRANSFORMERS:
        return _sentence_batches(trainer, args, dataset, name)
    return _token_batches(trainer, args, dataset, name)


def _token_batches(trainer: Any, args: Any, dataset: Any, name: str) -> list[Mapping[str, Any]]:
    collator = trainer.data_collator
    description = f"cocktail probes {name!r}"
    if hasattr(dataset, "column_names") and hasattr(trainer, "_remove_unused_columns"):
        dataset = trainer._remove_unused_columns(dataset, description=description)
    elif hasattr(trainer, "_get_collator_with_removed_columns"):
        collator = trainer._get_collator_with_removed_columns(collator, description=description)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collator, shuffle=False
    )
    try:
        return list(loader)
    except Exception as exc:
        raise UsageError(
            f"cannot batch the probe data {name!r} with the Trainer's data collator: {exc}; tokenize it like the "
            "eval data (same fields, lengths the collator can pad or stack)"
        ) from exc


def _sentence_batches(trainer: Any, args: Any, dataset: Any, name: str) -> list[Mapping[str, Any]]:
    """Rows of text columns, collated (tokenized) by the sentence-transformers collator, as its eval loader does."""
    rows = [dict(dataset[i]) for i in range(len(dataset))]
    columns = list(rows[0])
    if any(
        not isinstance(v, str) for k, v in rows[0].items() if k not in ("label", "labels", "score", "scores")
    ):
        raise UsageError(
            f"the probe data {name!r} has columns {columns} but a sentence-transformers trainer takes rows of text "
            "columns, as its train_dataset: e.g. {'anchor': str, 'positive': str} (pairs), with 'negative' "
            "(triplets), or {'sentence1', 'sentence2', 'score'} for a scored loss"
        )
    loss = getattr(trainer, "loss", None)
    if isinstance(
        loss, Mapping
    ):  # one loss per dataset name: the probe set's name picks it, as for eval data
        if name not in loss:
            raise UsageError(
                f"the trainer has one loss per dataset ({sorted(loss)}) but the probe set is named {name!r}; pass the "
                "probe data as a dict whose keys are those dataset names, e.g. general_data={"
                f"{next(iter(loss))!r}: dataset}}"
            )
        rows = [{**row, "dataset_name": name} for row in rows]
    size = args.per_device_eval_batch_size
    try:
        return [trainer.data_collator(rows[i : i + size]) for i in range(0, len(rows), size)]
    except Exception as exc:
        raise UsageError(
            f"cannot batch the probe data {name!r} with the sentence-transformers data collator: {exc}; pass rows "
            "of text columns like the train_dataset's (e.g. {'anchor': str, 'positive': str})"
        ) from exc


def trainer_score_fn(trainer: Any) -> ScoreFn | None:
    """The Trainer's ``compute_loss`` when it differs from the model's own loss, else ``None``."""
    if trainer is None:
        return None
    from transformers import Trainer

    custom = (
        type(trainer).compute_loss is not Trainer.compute_loss
        or getattr(trainer, "compute_loss_func", None) is not None
        or getattr(trainer, "label_smoother", None) is not None
    )
    if not custom:
        return None
    return lambda model, batch: trainer.compute_loss(model, dict(batch))
