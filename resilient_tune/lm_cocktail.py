"""Drop-in replacements for LM_Cocktail 0.0.4's ``mix_models`` and ``mix_models_with_data``.

Same argument names, positions and defaults as the reference, same merged parameters (θ[k] = Σᵢ wᵢ·θᵢ[k]) and
the same auto weights, but the merge streams one tensor at a time through :func:`resilient_tune.api.merge`
instead of holding every model in memory. Deliberate differences from the reference:

* ``trust_remote_code`` is ``False`` by default (the reference always trusts remote code).
* The dtype of the inputs is preserved (the reference saves fp16 inputs as fp32 on transformers 4.x and sums
  them in fp16/bf16 on 5.x); accumulation is float32. ``dtype=`` picks another output dtype.
* Integer tensors are copied only when identical in every model (the reference keeps the last model's copy).
* Weights are checked on both sides (sum within 1e-3 of 1) and NaN/Inf are rejected; errors are
  :class:`~resilient_tune.errors.UsageError` instead of ``AssertionError``.
* ``output_path`` is written atomically and must not exist unless ``overwrite=True`` (the reference writes into
  an existing folder); it also holds ``cocktail.json`` (recipe, weights, losses) and a model card.
* The weights are returned with ``return_weights=True`` and attached to the model as ``model.cocktail_weights``.
* ``mix_models_with_data`` also takes ``model_type="reranker"``, samples negatives with ``random.Random(seed)``,
  and pads a tokenizer without a pad token with its eos token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import check_destination
from .errors import UsageError
from .merging import validate_weights
from .recipe import normalize_dtype_name
from .weights import (
    check_model_type,
    check_names,
    compute_auto_weights,
    copy_weights_into,
    load_auto_model,
    resolve_model_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["mix_models", "mix_models_with_data"]


def mix_models(
    model_names_or_paths: Sequence[str | os.PathLike],
    model_type: str,
    weights: Sequence[float],
    output_path: str | os.PathLike | None = None,
    *,
    return_weights: bool = False,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PreTrainedModel | tuple[PreTrainedModel, list[float]]:
    """Mix models with given weights: θ[k] = Σᵢ wᵢ·θᵢ[k] for every tensor (LM_Cocktail ``mix_models``).

    Args:
        model_names_or_paths: Local checkpoint folders or Hugging Face Hub names (fetched with
            ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``). Config and tokenizer come
            from the first one.
        model_type: ``"decoder"`` (``AutoModelForCausalLM``), ``"encoder"`` (``AutoModel``) or ``"reranker"``
            (``AutoModelForSequenceClassification``).
        weights: One mixing weight per model; they must sum to 1 (within 1e-3).
        output_path: Folder to write the mixed model to (with tokenizer, ``cocktail.json`` and, for encoders,
            the sentence-transformers files: CLS pooling + normalisation). ``None`` keeps it in memory.
        return_weights: Return ``(model, weights)`` instead of the model.
        trust_remote_code: Allow custom model code from the checkpoints.
        dtype: Output dtype (``"float32"``, ``"float16"``, ``"bfloat16"``); ``None`` keeps the inputs' dtypes.
        progress: Print the weights (as the reference does) and show a progress bar.
        overwrite: Replace an existing ``output_path``.

    Returns:
        The mixed model (in eval mode, ``model.cocktail_weights`` set), or ``(model, weights)``.

    Raises:
        UsageError: bad ``model_type``, weights (count, sum, NaN), model names or destination.
        IncompatibleModelsError: the models differ in keys or shapes.
    """
    check_model_type(model_type)
    names = check_names(model_names_or_paths)
    mix_weights = validate_weights(weights, len(names))
    _check_output(output_path, dtype=dtype, overwrite=overwrite)
    options = {
        "trust_remote_code": trust_remote_code,
        "dtype": dtype,
        "progress": progress,
        "overwrite": overwrite,
    }
    model = _mix(names, model_type, mix_weights, output_path, record={}, **options)
    return (model, mix_weights) if return_weights else model


def mix_models_with_data(
    model_names_or_paths: Sequence[str | os.PathLike],
    model_type: str,
    example_data: Sequence[Mapping[str, Any]] | None = None,
    temperature: float = 5.0,
    batch_size: int = 2,
    max_input_length: int = 2048,
    neg_number: int = 7,
    output_path: str | os.PathLike | None = None,
    *,
    example_ata: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    return_weights: bool = False,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PreTrainedModel | tuple[PreTrainedModel, list[float]]:
    """Mix models with auto weights ``softmax(−loss/temperature)`` from a few examples (LM_Cocktail).

    The losses are defined in :mod:`resilient_tune.weights`; then the models are mixed as :func:`mix_models`.

    Args:
        model_names_or_paths: Local checkpoint folders or Hub names (as :func:`mix_models`).
        model_type: ``"decoder"``, ``"encoder"`` or ``"reranker"`` (the reference supports the first two).
        example_data: The examples: ``{"input", "output"}`` strings for decoders, ``{"query": str,
            "pos": [str, ...], "neg": [str, ...]}`` for encoders and rerankers.
        temperature: Softmax temperature τ > 0 (lower → weights more peaked on the best model).
        batch_size: Examples per forward pass.
        max_input_length: Truncation length in tokens.
        neg_number: Negatives sampled per query (encoder, reranker).
        output_path: As :func:`mix_models`.
        example_ata: The reference's (misspelt) name of ``example_data``; pass one of the two.
        seed: Seed of the negative sampling (``random.Random(seed)``).
        return_weights: Return ``(model, weights)`` instead of the model.
        trust_remote_code: Allow custom model code from the checkpoints.
        dtype: Output dtype; ``None`` keeps the inputs' dtypes.
        progress: Print the weights and show a progress bar.
        overwrite: Replace an existing ``output_path``.

    Returns:
        The mixed model (``model.cocktail_weights`` set), or ``(model, weights)``. ``cocktail.json`` in
        ``output_path`` also records the losses and the temperature.
    """
    if example_data is not None and example_ata is not None:
        raise UsageError("both example_data and example_ata are given; pass the examples once (example_data)")
    examples = example_data if example_data is not None else example_ata
    check_model_type(model_type)
    names = check_names(model_names_or_paths)
    _check_output(output_path, dtype=dtype, overwrite=overwrite)  # before the (slow) auto weights
    auto = compute_auto_weights(
        names,
        model_type,
        examples,  # type: ignore[arg-type]  # None is rejected there with a clear message
        temperature=temperature,
        batch_size=batch_size,
        max_input_length=max_input_length,
        neg_number=neg_number,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    record = {
        "losses": list(auto.losses),
        "temperature": auto.temperature,
        "examples": len(list(examples or [])),
        "seed": seed,
        "neg_number": neg_number,
        "max_input_length": max_input_length,
    }
    weights = list(auto.weights)
    options = {
        "trust_remote_code": trust_remote_code,
        "dtype": dtype,
        "progress": progress,
        "overwrite": overwrite,
    }
    model = _mix(names, model_type, weights, output_path, record=record, **options)
    return (model, weights) if return_weights else model


def _mix(
    names: Sequence[str],
    model_type: str,
    weights: Sequence[float],
    output_path: str | os.PathLike | None,
    *,
    record: Mapping[str, Any],
    trust_remote_code: bool,
    dtype: str | torch.dtype | None,
    progress: bool,
    overwrite: bool,
) -> PreTrainedModel:
    """Merge with :func:`resilient_tune.api.merge` and return the transformers model (``record`` → cocktail.json)."""
    from .api import merge

    paths = [resolve_model_path(name) for name in names]
    if progress:
        print("***weight for each model***: ")
        for w, name in zip(weights, names):
            print(name, w)
    if output_path is None:
        merged = merge(paths, list(weights), dtype=dtype, progress=progress)
        model = load_auto_model(
            paths[0], model_type, trust_remote_code=trust_remote_code, dtype=_dtype_of(merged)
        )
        copy_weights_into(model, merged, "the merged state dict")
        del merged
    else:
        metadata = {"lm_cocktail": {"model_type": model_type, "models": list(names), **record}}
        extra = _sentence_transformers_files(paths[0], trust_remote_code) if model_type == "encoder" else None
        if progress:
            print(f"Saving the new model to {output_path}")
        folder = merge(
            paths,
            list(weights),
            out=output_path,
            dtype=dtype,
            progress=progress,
            overwrite=overwrite,
            metadata=metadata,
            extra_files=extra,
        )
        model = load_auto_model(
            folder, model_type, trust_remote_code=trust_remote_code, dtype=dtype or "auto"
        )
    model.cocktail_weights = list(weights)
    return model


def _check_output(output_path: str | os.PathLike | None, *, dtype: object, overwrite: bool) -> None:
    """Refuse a bad dtype or an unusable ``output_path`` before any model is loaded or scored."""
    normalize_dtype_name(dtype)
    if output_path is not None:
        check_destination(output_path, overwrite=overwrite)


def _dtype_of(state: Mapping[str, torch.Tensor]) -> torch.dtype | str:
    """The one floating dtype of a state dict, or ``"auto"`` (the config's) when mixed or absent."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else "auto"


def _sentence_transformers_files(path: Path, trust_remote_code: bool) -> dict[str, str]:
    """The files ``SentenceTransformer.save`` writes for Transformer → CLS Pooling → Normalize (classic layout).

    Written without importing sentence-transformers; the classic module names load in every release.
    ``max_seq_length`` is ``min(max_position_embeddings, tokenizer.model_max_length)`` as
    ``sentence_transformers.models.Transformer`` computes it.
    """
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        raise UsageError(
            f"the config of {path} has no hidden_size; cannot write the sentence-transformers pooling config "
            "(use model_type='reranker' or 'decoder' if this is not an embedding model)"
        )
    lengths = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length) if n]
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    st_config = {"__version__": {"pytorch": torch.__version__}, "prompts": {}, "default_prompt_name": None}
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {
            "max_seq_length": min(lengths) if lengths else None,
            "do_lower_case": False,
        },
        "config_sentence_transformers.json": {**st_config, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": pooling,
        "2_Normalize/config.json": {},
    }
    return {name: json.dumps(content, indent=2) + "\n" for name, content in files.items()}
