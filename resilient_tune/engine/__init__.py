"""Engines: the base θ₀ of one model and the resilient model θ(α) built from it and the live weights.

Every engine implements :class:`Engine` (snapshot, swap in place and restore, drift, write), which the session
(:class:`resilient_tune.Cocktail`) drives:

- :class:`CocktailEngine`: full weights. θ₀ is a copy of the trainable parameters (in memory, half precision or on
  disk); peers and every registered merge method; sharded models (FSDP2, ZeRO-3) merged shard by shard.
- :class:`LoraEngine`: a PEFT LoRA model. No copy: θ₀ + α·Δ is the adapter scaled by α.

:func:`engine_for` picks the one a model needs. This package imports torch and resilient-tune's lower layers only
(``peft`` when a PEFT model is met).
"""

from __future__ import annotations

from typing import Any

import torch

from ..folder import SubFolder, write_model_folder
from ..validation import check_alpha, check_weights
from ._full import CocktailEngine
from ._lora import ADAPTER_FOLDER, FORMAT, LoraBase, LoraEngine
from ._lora_layers import find_peft_model, is_peft_model
from ._protocol import BaseState, Drift, Engine, FamilySaver, WriteForm, layer_of

__all__ = [
    "ADAPTER_FOLDER",
    "FORMAT",
    "BaseState",
    "CocktailEngine",
    "Drift",
    "Engine",
    "FamilySaver",
    "LoraBase",
    "LoraEngine",
    "SubFolder",
    "WriteForm",
    "check_alpha",
    "check_weights",
    "engine_for",
    "find_peft_model",
    "is_peft_model",
    "layer_of",
    "write_model_folder",
]


def engine_for(model: torch.nn.Module, engine: Engine) -> Engine:
    """The engine to use for ``model``: a :class:`LoraEngine` configured like ``engine`` when ``model`` is or holds a
    PEFT model, else the :class:`CocktailEngine` ``engine`` was made from (``engine`` itself usually).

    Call it at train begin; ``engine`` may be a previous run's :class:`LoraEngine` (its template is reused).
    """
    template: Any = engine.template if isinstance(engine, LoraEngine) else engine
    if find_peft_model(model) is None:
        return template
    return LoraEngine.from_engine(template)
