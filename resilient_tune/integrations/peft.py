"""PEFT LoRA support: the names of :mod:`resilient_tune.engine` under their former home (kept for compatibility).

The LoRA engine lives below the adapters, in :mod:`resilient_tune.engine` (``LoraEngine``: θ₀ + α·Δ is the adapter
scaled by α, so no copy of θ₀ is needed); import it from there.
"""

from __future__ import annotations

from resilient_tune.engine import (
    ADAPTER_FOLDER,
    FORMAT,
    LoraBase,
    LoraEngine,
    engine_for,
    find_peft_model,
    is_peft_model,
)

__all__ = [
    "ADAPTER_FOLDER",
    "FORMAT",
    "LoraBase",
    "LoraEngine",
    "engine_for",
    "find_peft_model",
    "is_peft_model",
]
