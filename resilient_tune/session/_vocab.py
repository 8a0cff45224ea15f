"""A vocabulary grown before training: which rows of the embedding and the output head the pre-trained base had.

``resize_token_embeddings`` after ``from_pretrained`` appends rows for new tokens, randomly initialised; θ₀ taken at
train begin holds them, but the pre-trained base never had them, so a resilient model must not mix them with their
random start. The number of rows the base had is read from the pre-trained model's own ``config.json`` (the folder
``model.config._name_or_path`` names, or its copy in the Hugging Face cache); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["base_vocab_rows"]


def base_vocab_rows(model: torch.nn.Module) -> dict[str, int]:
    """``{trainable parameter name: rows the pre-trained base had}`` for the input embedding and the output head of the
    first transformers-style model in ``model`` whose rows outnumber its pre-trained config's ``vocab_size``; ``{}``
    when nothing grew or the pre-trained config cannot be found."""
    inner = next((m for m in model.modules() if callable(getattr(m, "get_input_embeddings", None))), None)
    config = getattr(inner, "config", None)
    if inner is None or config is None:
        return {}
    embedding = inner.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    rows = _pretrained_vocab_size(getattr(config, "_name_or_path", "") or "")
    if not isinstance(weight, torch.Tensor) or rows is None or rows >= weight.shape[0]:
        return {}
    grown = {id(weight)}
    head = inner.get_output_embeddings() if callable(getattr(inner, "get_output_embeddings", None)) else None
    for tensor in (getattr(head, "weight", None), getattr(head, "bias", None)):
        if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[0] == weight.shape[0]:
            grown.add(id(tensor))
    return {name: rows for name, p in model.named_parameters() if p.requires_grad and id(p) in grown}


def _pretrained_vocab_size(name: str) -> int | None:
    """``vocab_size`` of the pre-trained config ``name`` refers to (a local folder, or a cached Hub model)."""
    path = Path(name) / "config.json" if name and os.path.isdir(name) else None
    if path is None and name:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # no huggingface_hub, or not a Hub id: nothing to read
            path = None
    if path is None or not path.is_file():
        return None
    try:
        value: Any = json.loads(path.read_text()).get("vocab_size")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None
