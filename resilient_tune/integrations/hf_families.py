"""Trainers built on ``transformers.Trainer``: what differs between the families the callback runs in.

A *family* is a kind of trainer and model whose probe data, probe objective and checkpoint layout differ from the
plain ``Trainer``'s. Each is recognised from the trainer's and the model's classes (no import of the family's package
is needed to tell). The callback asks this module three things:

- :func:`probe_objective`: what the probes measure. ``"lm"``: the token NLL of the general text under the model (and
  KL to the base on the same tokens), the default for language models whatever the trainer optimises (TRL's
  ``SFTTrainer``, ``DPOTrainer`` and other preference trainers, ``Seq2SeqTrainer``, a plain ``Trainer`` with the
  model's own loss). ``"training"``: the trainer's own loss (its ``compute_loss``), the default for
  sentence-transformers losses and for a ``Trainer`` with a custom objective. ``probe_loss=`` overrides it.
- :func:`probe_batches`: the user's probe data as batches. Pre-tokenized examples and the ``training`` objective go
  through the trainer's collator as its eval data do; text in any format a language-model trainer takes (strings,
  ``text``, prompt/completion, chat ``messages``, preference rows; :mod:`resilient_tune.probe_data`) is tokenized with
  the trainer's ``processing_class`` and padded; sentence-transformers rows go through its own collator.
- :func:`saver_for`: a resilient folder in the layout the family's own loader expects (``None``: the engine's
  ``from_pretrained`` writer).

Families:

- ``sentence-transformers`` (``SentenceTransformerTrainer``, ``CrossEncoderTrainer``, ``SparseEncoderTrainer``): the
  model is a ``SentenceTransformer`` (an ``nn.Sequential`` of modules whose ``state_dict`` keys carry the module
  prefix, ``0.model.embeddings...``) while the checkpoint stores each module in its own layout (the transformer's
  weights with bare keys in the root, ``1_Pooling/``, ``2_Normalize/``, ``modules.json``,
  ``config_sentence_transformers.json``). Its resilient folders are written by the model's own ``save`` while θ(α)
  is swapped into the live weights, so they load with ``SentenceTransformer(path)`` into the same module stack.
  Probe data are rows of text columns (``anchor``/``positive``/...), batched with the trainer's own collator (which
  tokenizes them) and scored with the trainer's loss; the trainer's column filter is not used.
- ``trl-sft`` (``SFTTrainer``) and ``trl`` (``DPOTrainer`` and TRL's other trainers): language models trained on
  text, chats or preferences; probed with the token NLL of general text. A preference trainer's loss (at step 0 the
  DPO loss is ln 2 whatever the data) measures preference fit, not forgetting.
- ``seq2seq`` (``Seq2SeqTrainer``, or any encoder-decoder model): the prompt is the encoder's input, the completion
  the decoder's labels; KL is taken over decoder positions.
- ``transformers`` (everything else).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from resilient_tune.engine import FamilySaver
from resilient_tune.errors import UsageError
from resilient_tune.probe_data import detect_format, lm_examples, pad_lm_batch
from resilient_tune.session import ScoreFn

from ._st_drift import INDEX

__all__ = [
    "PROBE_LOSSES",
    "SENTENCE_TRANSFORMERS",
    "SEQ2SEQ",
    "TRANSFORMERS",
    "TRL",
    "TRL_SFT",
    "check_probe_examples",
    "check_probe_loss",
    "family_of",
    "is_bare_sentences",
    "is_encoder_decoder",
    "is_sentence_transformer",
    "probe_batches",
    "probe_objective",
    "saver_for",
    "trainer_score_fn",
]

SENTENCE_TRANSFORMERS = "sentence-transformers"
TRL_SFT = "trl-sft"
TRL = "trl"
SEQ2SEQ = "seq2seq"
TRANSFORMERS = "transformers"
PROBE_LOSSES = ("auto", "lm", "training")
_ST_FORMATS = (
    "rows of text columns, as the train_dataset: {'anchor': str, 'positive': str} (pairs), with 'negative' "
    "(triplets), or {'sentence1', 'sentence2', 'score'} for a scored loss"
)


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


def is_encoder_decoder(model: Any) -> bool:
    """The model is an encoder-decoder (T5, BART, ...): its logits are over decoder positions."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def family_of(trainer: Any, model: Any = None) -> str:
    """The family of ``trainer`` (or of ``model`` when there is no trainer): one of the module's constants."""
    if (trainer is not None and _from_package(trainer, "sentence_transformers")) or is_sentence_transformer(
        model
    ):
        return SENTENCE_TRANSFORMERS
    if trainer is not None and _from_package(trainer, "trl"):
        return TRL_SFT if any(c.__name__ == "SFTTrainer" for c in type(trainer).__mro__) else TRL
    seq2seq = (
        any(c.__name__ == "Seq2SeqTrainer" for c in type(trainer).__mro__) if trainer is not None else False
    )
    if seq2seq or is_encoder_decoder(model):
        return SEQ2SEQ
    return TRANSFORMERS


def check_probe_loss(probe_loss: Any) -> str:
    """``probe_loss`` if it is one of :data:`PROBE_LOSSES`, else a :class:`UsageError` naming them."""
    if probe_loss not in PROBE_LOSSES:
        raise UsageError(
            f"probe_loss={probe_loss!r} is not one of {', '.join(map(repr, PROBE_LOSSES))}: 'lm' measures the token "
            "NLL of general text, 'training' the trainer's own loss, 'auto' picks by trainer family"
        )
    return probe_loss


def check_probe_examples(sets: Mapping[str, Any], label: str) -> None:
    """Each probe set's first example is a dict (tokenized fields, or columns of text) or a string.

    Raises:
        UsageError: Another kind of example (names the set and the forms accepted).
    """
    for name, data in sets.items():
        first = data[0]
        if not isinstance(first, (str, Mapping)):
            where = label if name == label else f"{label}[{name!r}]"
            raise UsageError(
                f"{where}[0] is a {type(first).__name__}; each example must be a dict of tokenized fields, e.g. "
                "{'input_ids': [...], 'labels': [...]}, or text: a string, {'text'}, {'prompt', 'completion'}, chat "
                "{'messages'}, preference {'prompt', 'chosen', 'rejected'}, or sentence-transformers columns"
            )


def probe_objective(trainer: Any, model: Any, probe_loss: str = "auto") -> str:
    """What the probes measure for this trainer and model: ``"lm"`` or ``"training"`` (see the module docs).

    Raises:
        UsageError: ``probe_loss="lm"`` for a model without token logits (a sentence-embedding model).
    """
    family = family_of(trainer, model)
    if family == SENTENCE_TRANSFORMERS:
        if probe_loss == "lm":
            raise UsageError(
                "probe_loss='lm' does not fit a sentence-embedding model (it has no token logits to score text "
                "with); use probe_loss='training' (the trainer's loss on pairs, the default) or pass score_fn"
            )
        return "training"
    if probe_loss != "auto":
        return probe_loss
    if family in (TRL_SFT, TRL, SEQ2SEQ):
        return "lm"
    return "training" if trainer_score_fn(trainer) is not None else "lm"


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


def probe_batches(
    trainer: Any, args: Any, dataset: Any, name: str, *, objective: str = "training", model: Any = None
) -> list[Mapping[str, Any]]:
    """Batch a probe set once, with the eval batch size: as ``trainer`` batches its eval data (pre-tokenized
    examples, the ``training`` objective, sentence-transformers rows), or, for text in a language-model format, by
    tokenizing it with the trainer's ``processing_class`` (:func:`resilient_tune.probe_data.lm_examples`).

    Raises:
        UsageError: The data cannot be batched (names the set, the cause and the formats this trainer takes).
    """
    family = family_of(trainer, model)
    if family == SENTENCE_TRANSFORMERS:
        return _sentence_batches(trainer, args, dataset, name)
    tokenized = detect_format(dataset[0]) == "tokenized"
    if objective == "training" or (
        tokenized and family != TRL
    ):  # a preference trainer's collator takes pairs
        return _token_batches(trainer, args, dataset, name)
    kind = "seq2seq" if is_encoder_decoder(model) or family == SEQ2SEQ else "causal"
    tokenizer = getattr(trainer, "processing_class", None)
    examples = lm_examples(dataset, tokenizer, kind=kind, name=name)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    pad = next(
        (
            t
            for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
            if isinstance(t, int)
        ),
        0,
    )
    size = args.per_device_eval_batch_size
    return [pad_lm_batch(examples[i : i + size], pad, kind=kind) for i in range(0, len(examples), size)]


def _token_batches(trainer: Any, args: Any, dataset: Any, name: str) -> list[Mapping[str, Any]]:
    """As the Trainer batches eval data: unused columns removed (when the Trainer removes them), its collator."""
    try:
        collator = trainer.data_collator
        description = f"cocktail probes {name!r}"
        if hasattr(dataset, "column_names") and hasattr(trainer, "_remove_unused_columns"):
            dataset = trainer._remove_unused_columns(dataset, description=description)
        elif hasattr(trainer, "_get_collator_with_removed_columns"):
            collator = trainer._get_collator_with_removed_columns(collator, description=description)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collator, shuffle=False
        )
        return list(loader)
    except Exception as exc:
        raise UsageError(
            f"cannot batch the probe data {name!r} with the Trainer's data collator: {exc}; pass it like the eval "
            "data (same fields, lengths the collator can pad or stack; a preference trainer's probes with "
            "probe_loss='training' must be prepared by the trainer, e.g. general_data=trainer.eval_dataset), or as "
            "text a language model is probed with: strings, {'text'}, {'prompt', 'completion'}, chat {'messages'} "
            "(probe_loss='lm')"
        ) from exc


def _sentence_batches(trainer: Any, args: Any, dataset: Any, name: str) -> list[Mapping[str, Any]]:
    """Rows of text columns, collated (tokenized) by the sentence-transformers collator, as its eval loader does."""
    rows = [dataset[i] for i in range(len(dataset))]
    if is_bare_sentences(rows):  # a label-free embedding drift against the base (see _st_drift)
        texts = [r if isinstance(r, str) else next(iter(r.values())) for r in rows]
        size = args.per_device_eval_batch_size
        batches = [
            trainer.data_collator([{"sentence": t} for t in texts[i : i + size]])
            for i in range(0, len(texts), size)
        ]
        return [{**b, INDEX: (name, i)} for i, b in enumerate(batches)]
    if not isinstance(rows[0], Mapping):
        raise UsageError(
            f"the probe data {name!r} holds {type(rows[0]).__name__}s; a sentence-transformers trainer scores "
            f"{_ST_FORMATS}, or bare sentences (strings)"
        )
    rows = [dict(row) for row in rows]
    columns = list(rows[0])
    if any(
        not isinstance(v, str) for k, v in rows[0].items() if k not in ("label", "labels", "score", "scores")
    ):
        raise UsageError(
            f"the probe data {name!r} has columns {columns} but a sentence-transformers trainer takes {_ST_FORMATS}"
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


def is_bare_sentences(rows: list[Any]) -> bool:
    """Sentences with nothing to pair them with: strings, or rows of one text column (``{"text": ...}``)."""
    first = rows[0] if rows else None
    return isinstance(first, str) or (
        isinstance(first, Mapping) and len(first) == 1 and isinstance(next(iter(first.values())), str)
    )


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
