"""resilient-tune: keep fine-tuned language models good at everything they knew before.

Public names are imported lazily (PEP 562) so that ``import resilient_tune`` and the ``resilient-tune merge``
command stay light: nothing here imports transformers until a function that needs it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = [
    "CheckpointFormatError",
    "Cocktail",
    "CocktailCallback",
    "IncompatibleModelsError",
    "NonFiniteError",
    "Recipe",
    "ResilientTuneError",
    "UsageError",
    "__version__",
    "compute_auto_weights",
    "merge",
    "method_names",
    "mix_models",
    "mix_models_with_data",
]

# public name -> module that defines it
_LAZY = {
    "Cocktail": ".session",
    "CocktailCallback": ".integrations.transformers",
    "CheckpointFormatError": ".errors",
    "IncompatibleModelsError": ".errors",
    "NonFiniteError": ".errors",
    "ResilientTuneError": ".errors",
    "UsageError": ".errors",
    "Recipe": ".recipe",
    "merge": ".api",
    "method_names": ".merging",
    "compute_auto_weights": ".weights",
    "mix_models": ".lm_cocktail",
    "mix_models_with_data": ".lm_cocktail",
}

if TYPE_CHECKING:
    from .api import merge
    from .errors import (
        CheckpointFormatError,
        IncompatibleModelsError,
        NonFiniteError,
        ResilientTuneError,
        UsageError,
    )
    from .integrations.transformers import CocktailCallback
    from .lm_cocktail import mix_models, mix_models_with_data
    from .merging import method_names
    from .recipe import Recipe
    from .session import Cocktail
    from .weights import compute_auto_weights


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resilient_tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
