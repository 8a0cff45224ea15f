"""Auto weights, the public API: ``softmax(−loss/τ)`` of each ingredient's loss on a few target examples.

:func:`compute_auto_weights` (and :func:`compute_weights`, the weights only) loads checkpoints and scores them,
:func:`example_losses` scores ingredients in a model already built, :func:`softmax_weights` turns losses into
weights. Every argument and example is checked here, up front, before any model is loaded. The example formats:

* ``decoder``: ``{"input": str, "output": str}``;
* ``encoder`` and ``reranker``: ``{"query": str, "pos": [str, ...], "neg": [str, ...]}``.

The losses themselves are defined in :mod:`resilient_tune.weights` (computed in
:mod:`~resilient_tune.weights._batches`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NonFiniteError, UsageError
from ._batches import _BUILDERS, _LOSSES
from ._models import Ingredient, _load_auto_model, _load_ingredient, _resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_TYPES = ("decoder", "encoder", "reranker")
"""The model types LM-Cocktail knows: causal LMs, embedders (``AutoModel``) and rerankers."""


@dataclass(frozen=True)
class AutoWeights:
    """Auto weights and the losses they come from, one entry per ingredient, in input order.

    Attributes:
        weights: ``softmax(−losses/temperature)``; they sum to 1.
        losses: Mean loss of each ingredient on the examples (nats).
        temperature: The softmax temperature τ used.
    """

    weights: tuple[float, ...]
    losses: tuple[float, ...]
    temperature: float


def softmax_weights(
    losses: Sequence[float], temperature: float = 5.0, *, names: Sequence[str] | None = None
) -> list[float]:
    """Turn per-ingredient losses into merge weights: ``softmax(−losses / temperature)`` in float32.

    Bit-identical to the reference ``torch.softmax(-torch.FloatTensor(losses) / temperature, -1)``.

    Args:
        losses: One loss per ingredient (lower is better).
        temperature: τ > 0. Large τ flattens the weights towards uniform; small τ concentrates them on the
            lowest loss. The reference default 5.0 gives nearly uniform weights for losses a few tenths apart.
        names: Optional ingredient names for error messages.

    Returns:
        The weights, in input order (they sum to 1 up to float32 rounding).

    Raises:
        UsageError: ``temperature`` is not a finite number > 0, or ``losses`` is empty.
        NonFiniteError: a loss is NaN or infinite (the message names the ingredient).
    """
    _check_temperature(temperature)
    values = [float(x) for x in losses]
    if not values:
        raise UsageError("losses is empty; pass one loss per model")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteError(
                f"loss of {_label(i, names)} is {value}; check that model's weights and the examples "
                "(a NaN loss usually means broken weights or examples with nothing to predict)"
            )
    return torch.softmax(-torch.tensor(values, dtype=torch.float32) / temperature, -1).tolist()


def example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state_dicts_or_loaders: Sequence[Ingredient],
    model_type: str,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> list[float]:
    """Mean loss of each ingredient on the examples, evaluated in one shared model instance.

    Each ingredient's weights are copied into ``model`` (every parameter and persistent buffer must be
    provided, tied parameters once; shapes must match), one ingredient at a time, so at most one extra
    state dict — one tensor when the ingredient is a path — is in memory. The model is put in eval mode and run
    under ``torch.no_grad()`` on its own device. Nothing is restored afterwards: ``model`` ends up holding the
    last ingredient's weights and stays in eval mode.

    Args:
        model: A transformers model matching ``model_type`` (causal LM / ``AutoModel`` / sequence classifier
            with one output) whose architecture all ingredients share.
        tokenizer: The tokenizer for the examples.
        state_dicts_or_loaders: One :data:`Ingredient` per model: ``None`` (use the weights ``model`` holds
            now), a checkpoint path, a ``Mapping[str, Tensor]`` or a zero-argument callable returning one.
        model_type: ``"decoder"``, ``"encoder"`` or ``"reranker"``.
        examples: Target-domain examples (see the module docstring for the formats).
        batch_size: Examples per forward pass.
        max_input_length: Truncation length in tokens.
        neg_number: Negatives per query (encoder, reranker).
        seed: Seed of the negative sampling.
        names: Optional ingredient names for error messages.

    Returns:
        One mean loss (nats) per ingredient, in input order.

    Raises:
        UsageError: bad ``model_type``, sizes or examples (the message names the example and the field).
        IncompatibleModelsError: an ingredient's keys or shapes do not match ``model``.
        NonFiniteError: an ingredient's loss is NaN or infinite.
    """
    _check_model_type(model_type)
    _check_sizes(batch_size, max_input_length, neg_number)
    ingredients = list(state_dicts_or_loaders)
    if not ingredients:
        raise UsageError("state_dicts_or_loaders is empty; pass at least one ingredient")
    rows = _validate_examples(examples, model_type, neg_number)
    device = next(model.parameters()).device
    batches = _BUILDERS[model_type](tokenizer, rows, batch_size, max_input_length, neg_number, seed, device)
    loss_fn = _LOSSES[model_type]
    model.eval()
    losses: list[float] = []
    with torch.no_grad():
        for i, ingredient in enumerate(ingredients):
            if ingredient is not None:
                _load_ingredient(model, ingredient, _label(i, names))
            loss = loss_fn(model, batches)
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"loss of {_label(i, names)} on the examples is {loss}; check that model's weights"
                )
            losses.append(loss)
    return losses


def compute_auto_weights(
    model_names_or_paths: Sequence[str | os.PathLike],
    model_type: str,
    example_data: Sequence[Mapping[str, Any]],
    *,
    temperature: float = 5.0,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    seed: int = 0,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> AutoWeights:
    """LM-Cocktail auto weights of checkpoints on a few examples, with the losses behind them.

    Builds one model from the first checkpoint (``AutoModelForCausalLM`` / ``AutoModel`` /
    ``AutoModelForSequenceClassification``, its stored dtype) and its tokenizer, then evaluates every checkpoint
    in it (see :func:`example_losses`); the others are read tensor by tensor from disk. Arguments are checked
    before any model is loaded.

    Args:
        model_names_or_paths: Local checkpoint folders or Hugging Face Hub names (downloaded with
            ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``).
        model_type: ``"decoder"``, ``"encoder"`` or ``"reranker"``.
        example_data: The examples (formats in the module docstring).
        temperature: Softmax temperature τ > 0.
        batch_size: Examples per forward pass.
        max_input_length: Truncation length in tokens.
        neg_number: Negatives per query (encoder, reranker).
        seed: Seed of the negative sampling.
        trust_remote_code: Allow custom model code from the checkpoint (off by default; the reference turns
            it on).
        device: Where to run the model; default CUDA when available, else CPU (as the reference).

    Returns:
        An :class:`AutoWeights` with the weights, the losses and the temperature.
    """
    _check_model_type(model_type)
    names = _check_names(model_names_or_paths)
    _check_temperature(temperature)
    _check_sizes(batch_size, max_input_length, neg_number)
    rows = _validate_examples(example_data, model_type, neg_number)
    paths = [_resolve_model_path(name) for name in names]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths[0], trust_remote_code=trust_remote_code)
    model = _load_auto_model(paths[0], model_type, trust_remote_code=trust_remote_code)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ingredients: list[Ingredient] = [None, *paths[1:]]
    losses = example_losses(
        model,
        tokenizer,
        ingredients,
        model_type,
        rows,
        batch_size=batch_size,
        max_input_length=max_input_length,
        neg_number=neg_number,
        seed=seed,
        names=names,
    )
    weights = softmax_weights(losses, temperature, names=names)
    return AutoWeights(tuple(weights), tuple(losses), float(temperature))


def compute_weights(
    model_names_or_paths: Sequence[str | os.PathLike],
    model_type: str,
    example_data: Sequence[Mapping[str, Any]],
    *,
    temperature: float = 5.0,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> list[float]:
    """Auto weights ``softmax(−loss/τ)`` of checkpoints on a few examples (same numbers as LM_Cocktail).

    The weights only; :func:`compute_auto_weights` also returns the losses. Arguments as there.
    """
    result = compute_auto_weights(
        model_names_or_paths,
        model_type,
        example_data,
        temperature=temperature,
        batch_size=batch_size,
        max_input_length=max_input_length,
        neg_number=neg_number,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    return list(result.weights)


# --- argument checks -------------------------------------------------------------------------------------------


def _label(i: int, names: Sequence[str] | None) -> str:
    if names is not None and i < len(names):
        return f"model {i} ({names[i]})"
    return f"model {i}"


def _check_model_type(model_type: object) -> None:
    if model_type not in MODEL_TYPES:
        raise UsageError(f"model_type is {model_type!r}; use one of {', '.join(map(repr, MODEL_TYPES))}")


def _check_names(model_names_or_paths: object) -> list[str]:
    if isinstance(model_names_or_paths, (str, os.PathLike)) or not isinstance(model_names_or_paths, Sequence):
        raise UsageError(
            f"model_names_or_paths is a {type(model_names_or_paths).__name__}; pass a list of model names or paths"
        )
    if not model_names_or_paths:
        raise UsageError("model_names_or_paths is empty; pass at least one model name or path")
    return [os.fspath(name) for name in model_names_or_paths]


def _check_temperature(temperature: object) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise UsageError(f"temperature is {temperature!r}; pass a finite number > 0 (the reference uses 5.0)")


def _check_sizes(batch_size: object, max_input_length: object, neg_number: object) -> None:
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("max_input_length", max_input_length, 1),
        ("neg_number", neg_number, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} is {value!r}; pass an integer >= {low}")


def _validate_examples(examples: object, model_type: str, neg_number: int) -> list[Mapping[str, Any]]:
    """Check every example up front; the error names the example index and the field."""
    if examples is None:
        raise UsageError("example_data is missing; pass a list of examples")
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, (Sequence, list, tuple)):
        raise UsageError(f"example_data is a {type(examples).__name__}; pass a list of example dicts")
    rows = list(examples)
    if not rows:
        raise UsageError("example_data is empty; pass a few examples of the target task (the paper uses 5)")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UsageError(f"example {i} is a {type(row).__name__}; each example must be a dict")
        if model_type == "decoder":
            for field in ("input", "output"):
                _require_str(row, field, i, 'decoder examples are {"input": str, "output": str}')
        else:
            _check_retrieval_example(row, i, neg_number)
    return rows


def _require_str(row: Mapping[str, Any], field: str, i: int, hint: str) -> None:
    if field not in row:
        raise UsageError(f"example {i} has no {field!r} field; {hint}")
    if not isinstance(row[field], str):
        raise UsageError(f"example {i} field {field!r} is a {type(row[field]).__name__}, not a str; {hint}")


def _check_retrieval_example(row: Mapping[str, Any], i: int, neg_number: int) -> None:
    hint = 'encoder and reranker examples are {"query": str, "pos": [str, ...], "neg": [str, ...]}'
    _require_str(row, "query", i, hint)
    for field in ("pos", "neg"):
        if field not in row:
            raise UsageError(f"example {i} has no {field!r} field; {hint}")
        value = row[field]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise UsageError(
                f"example {i} field {field!r} is a {type(value).__name__}, not a list of str; {hint}"
            )
        if not all(isinstance(text, str) for text in value):
            raise UsageError(f"example {i} field {field!r} holds a non-str entry; {hint}")
    if not row["pos"]:
        raise UsageError(f"example {i} field 'pos' is empty; give at least one positive passage")
    if len(row["neg"]) < neg_number:
        raise UsageError(
            f"example {i} has {len(row['neg'])} negatives but neg_number={neg_number}; "
            "give every example at least neg_number negatives or lower neg_number"
        )
