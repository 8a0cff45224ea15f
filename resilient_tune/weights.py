"""Auto weights (LM-Cocktail): score every ingredient on a few target examples, weight by softmax(−loss/τ).

The loss of ingredient ``i`` on the examples ``E`` is ``Lᵢ``; its weight is ``wᵢ = softmax(−L/τ)ᵢ``, computed in
float32 exactly as the reference implementation (LM_Cocktail 0.0.4) does. Three losses are defined, matching the
reference where it has one:

* ``decoder`` (examples ``{"input": str, "output": str}``): causal-LM mean token cross-entropy of ``output`` given
  ``input``. Tokens are ``encode(input + " " + output) + [eos]``; the first ``len(encode(input))`` positions are
  masked out of the labels (−100); sequences are truncated to ``max_input_length`` tokens and padded to the
  longest sequence of their batch (the reference pads to ``max_input_length``: same per-batch losses, less work);
  the attention mask is ``ids != pad_id``. A tokenizer without a pad token pads with its eos token (the reference
  crashes). The loss is the mean of the per-batch means.
* ``encoder`` (examples ``{"query": str, "pos": [str, ...], "neg": [str, ...]}``): contrastive loss with in-batch
  negatives. Embeddings are the L2-normalised CLS vectors (``last_hidden_state[:, 0]``); each query brings
  ``pos[0]`` followed by ``neg_number`` negatives sampled with ``random.Random(seed)`` (the reference samples with
  the global ``random`` module: seeding it with the same seed gives the same negatives); scores are
  ``q · pᵀ / 0.05`` over every passage of the batch, the target of query ``i`` is passage ``i · (1 + neg_number)``;
  cross-entropy mean per batch, mean over batches.
* ``reranker`` (same example format; not in the reference): a sequence-classification model with one output
  scores the pairs ``(query, passage)`` for ``[pos[0]] + negatives`` of each query; cross-entropy over each group
  with target 0 (the FlagEmbedding reranker loss), mean per batch, mean over batches.

Only one model instance is built; ingredients are copied into it one at a time (one extra tensor in memory at a
time when read from disk). ``transformers`` is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import IncompatibleModelsError, NonFiniteError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MODEL_TYPES",
    "AutoWeights",
    "compute_auto_weights",
    "compute_weights",
    "example_losses",
    "softmax_weights",
]

MODEL_TYPES = ("decoder", "encoder", "reranker")
"""The model types LM-Cocktail knows: causal LMs, embedders (``AutoModel``) and rerankers."""

_ENCODER_SCALE = 0.05  # the reference's temperature of the contrastive scores (q·p / 0.05)

Ingredient = str | os.PathLike | Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None
"""One ingredient for :func:`example_losses`: ``None`` (the model's current weights), a checkpoint path (read
lazily, one tensor at a time), a state dict, or a zero-argument callable returning one (called when needed)."""


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


# --- models and ingredients --------------------------------------------------------------------------------------

_OTHER_FORMATS = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.ot",
    "*.tflite",
    "*.gguf",
    "onnx/*",
    "openvino/*",
    "coreml/*",
]
_PICKLES = ["*.bin", "*.pt", "*.pth"]


def _resolve_model_path(name: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hub name fetched with ``snapshot_download`` (cache first offline).

    Pickle weights (``*.bin``) are only downloaded when the repository has no safetensors.
    """
    local = Path(name).expanduser()
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        folder = Path(snapshot_download(os.fspath(name), ignore_patterns=_OTHER_FORMATS + _PICKLES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(os.fspath(name), ignore_patterns=_OTHER_FORMATS))
    except Exception as exc:  # huggingface_hub raises many types (validation, offline, HTTP, ...)
        where = (
            "in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            if offline
            else "on the Hugging Face Hub"
        )
        raise UsageError(
            f"model {os.fspath(name)!r} is not a local folder and was not found {where}: "
            f"{type(exc).__name__}: {exc}; pass an existing local path or download the model first"
        ) from exc
    return folder


def _auto_class(model_type: str) -> Any:
    import transformers

    return {
        "decoder": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
        "reranker": transformers.AutoModelForSequenceClassification,
    }[model_type]


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_auto_model(
    path: str | os.PathLike, model_type: str, *, trust_remote_code: bool = False, dtype: Any = "auto"
) -> PreTrainedModel:
    """The transformers model class LM_Cocktail uses for ``model_type``, loaded from ``path`` in eval mode."""
    model = _auto_class(model_type).from_pretrained(
        os.fspath(path), trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype)
    )
    return model.eval()


def _load_ingredient(model: torch.nn.Module, ingredient: Ingredient, label: str) -> None:
    if isinstance(ingredient, (str, os.PathLike)):
        from .checkpoint import open_checkpoint

        with open_checkpoint(ingredient) as reader:
            _copy_weights_into(model, reader, label)
        return
    source = ingredient() if callable(ingredient) and not isinstance(ingredient, Mapping) else ingredient
    if not isinstance(source, Mapping):
        raise UsageError(
            f"{label} is a {type(source).__name__}; pass None, a checkpoint path, a state dict or a callable "
            "returning a state dict"
        )
    _copy_weights_into(model, source, label)


def _copy_weights_into(model: torch.nn.Module, source: Any, label: str = "the checkpoint") -> None:
    """Copy a whole state dict into ``model`` in place (``load_state_dict(strict=True)`` semantics, lazily).

    ``source`` has ``keys()`` and ``get(key) -> Tensor`` (a state dict or a lazy checkpoint reader); tensors are
    fetched and copied one at a time (cast to the parameter's dtype). Every parameter and persistent buffer of
    ``model`` must be provided — tied parameters (e.g. ``lm_head.weight`` tied to the input embeddings) once,
    under any of their names. Keys may carry or lack the model's ``base_model_prefix`` (as in
    ``from_pretrained``); keys outside the base model of a prefixed checkpoint (task heads) and keys
    transformers itself ignores on load are skipped, and so are non-floating tensors the model does not have
    (legacy buffers such as ``embeddings.position_ids`` that older transformers versions saved); any other
    unknown key is an error.

    Raises:
        IncompatibleModelsError: missing or unknown keys, or a shape mismatch (the message names them).
    """
    targets = model.state_dict(
        keep_vars=True
    )  # name -> the Parameter/buffer object itself (aliases share it)
    keys = list(source.keys())
    legacy = {key for key in keys if key not in targets and not _source_dtype(source, key).is_floating_point}
    mapping = _match_keys(model, targets, [key for key in keys if key not in legacy], label)
    with torch.no_grad():
        for src_key, dst_key in mapping.items():
            value, dst = source.get(src_key), targets[dst_key]
            if tuple(value.shape) != tuple(dst.shape):
                raise IncompatibleModelsError(
                    f"{label}: {src_key!r} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(dst.shape)}; all models must share one architecture and config"
                )
            dst.copy_(value)


def _source_dtype(source: Any, key: str) -> torch.dtype:
    info = getattr(source, "info", None)  # a lazy checkpoint reader knows dtypes without loading
    return info(key).dtype if info is not None else source[key].dtype


def _match_keys(
    model: torch.nn.Module, targets: Mapping[str, torch.Tensor], keys: list[str], label: str
) -> dict[str, str]:
    """Source key -> model key; raises on missing or unknown keys."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_base = getattr(model, "base_model", model) is model
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if key in targets:
            mapping[key] = key
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in targets:
            mapping[key] = key[len(prefix) + 1 :]
        elif prefix and f"{prefix}.{key}" in targets:
            mapping[key] = f"{prefix}.{key}"
        elif not any(p.search(key) for p in ignore):
            unknown.append(key)
    stripped = any(src != dst and src.startswith(prefix + ".") for src, dst in mapping.items())
    if is_base and stripped:  # a checkpoint of a model with a head, loaded as its base model
        unknown = [key for key in unknown if key.startswith(prefix + ".")]
    if unknown:
        raise IncompatibleModelsError(
            f"{label} has {len(unknown)} key(s) the model does not have, e.g. {unknown[:3]}; "
            "all models must share one architecture (check model_type and the checkpoints)"
        )
    provided = {id(targets[dst]) for dst in mapping.values()}
    missing = [name for name, tensor in targets.items() if id(tensor) not in provided]
    if missing:
        raise IncompatibleModelsError(
            f"{label} lacks {len(missing)} key(s) the model has, e.g. {missing[:3]}; "
            "all models must share one architecture (check model_type and the checkpoints)"
        )
    return mapping
