"""How the registry-wide tests call a method within its contract: how many models it merges, whether it takes weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from resilient_tune.merging import METHODS


def fit(method: str, inputs: Sequence[Any], weights: Sequence[float]) -> tuple[list[Any], list[float]]:
    """``inputs`` cut to the most the method merges (SLERP: one besides the base), and weights of 1 for the methods
    that take none (SLERP, Model Stock); other methods get ``inputs`` and ``weights`` as given."""
    spec = METHODS[method]
    most = spec.inputs[1]
    kept = list(inputs[:most]) if most is not None else list(inputs)
    if spec.combine != "sum":
        return kept, [1.0] * len(kept)
    return kept, list(weights[: len(kept)])
