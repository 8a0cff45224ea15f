"""Entry checks of the numbers every layer takes from users: the mixing weight α and ingredient weights.

One rule for weights, whatever the caller (the merge API, the engines, the policies, recipes):

- every weight is a finite real number (``bool`` is not a number here), one per ingredient;
- weights that *mix* models (``kind="mixture"``: a linear merge, the base/peer weights ``wᵢ`` of LM-Cocktail) must
  sum to 1 within :data:`SUM_TOLERANCE` (1e-3), unless ``normalize=True`` divides them by their sum (a sum of about
  0 cannot be normalised); weights that *scale* task vectors (``kind="scales"``: task arithmetic, TIES, DARE, ...)
  may sum to anything;
- ``nonnegative=True`` also refuses weights below 0 (the base/peer weights of a convex mix).

Imports only the standard library and torch (to accept one-element tensors).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch

from .errors import UsageError

__all__ = ["SUM_TOLERANCE", "as_floats", "check_alpha", "check_weights"]

SUM_TOLERANCE = 1e-3
"""How far from 1 the sum of mixing weights may be (float32 softmax outputs and hand-typed thirds pass)."""
_ZERO_SUM = 1e-8
_HINTS = {"ingredient": " (the base, then each peer)"}


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float after checking it is a real number in ``[0, 1]``.

    Raises:
        UsageError: Not a number, NaN, or outside ``[0, 1]``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise UsageError(f"{name}={alpha!r} must be a number in [0, 1] (the weight of the fine-tuned model)")
    value = float(alpha)
    if not (0.0 <= value <= 1.0):
        raise UsageError(
            f"{name}={alpha!r} is outside [0, 1]; pass the weight of the fine-tuned model, e.g. 0.5 "
            "(0 = the base model, 1 = the fine-tuned model)"
        )
    return value


def as_floats(weights: Sequence[float], what: str = "weights") -> list[float]:
    """``weights`` as a list of finite floats (one-element tensors accepted).

    Raises:
        UsageError: Not a sequence (a string is not one), a non-number, NaN or Inf (the message names the index).
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, torch.Tensor)):
        raise UsageError(f"{what}={weights!r} must be a sequence of numbers, one per model, e.g. [0.5, 0.5]")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, torch.Tensor) and w.numel() == 1:
            w = w.item()
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise UsageError(f"{what}[{i}]: weight {i} is {w!r}; pass a real number for every model")
        if not math.isfinite(w):
            raise UsageError(f"{what}[{i}]: weight {i} is {w}; pass a finite number (no NaN/Inf)")
        values.append(float(w))
    return values


def check_weights(
    weights: Sequence[float],
    count: int | None = None,
    *,
    kind: Literal["mixture", "scales"] = "mixture",
    normalize: bool = False,
    nonnegative: bool = False,
    what: str = "weights",
    per: str = "model",
) -> tuple[float, ...]:
    """Check ingredient weights by the module's one rule and return them as floats (normalised when asked).

    Args:
        weights: One weight per ingredient.
        count: The expected number of weights, when known.
        kind: ``"mixture"`` (must sum to 1 within :data:`SUM_TOLERANCE`) or ``"scales"`` (any sum).
        normalize: Divide the weights by their sum instead of requiring a sum of 1.
        nonnegative: Refuse negative weights.
        what: The argument's name, for messages.
        per: What one weight stands for, for messages: ``"model"`` or ``"ingredient"`` (the base, then each peer).

    Raises:
        UsageError: A wrong count, a non-number, NaN/Inf, a negative weight with ``nonnegative``, a mixture that does
            not sum to 1 without ``normalize``, or a sum of about 0 with ``normalize``.
    """
    values = as_floats(weights, what)
    if nonnegative and any(v < 0 for v in values):
        raise UsageError(
            f"{what}={values}: each weight must be a finite number >= 0 (a convex mix of the {per}s)"
        )
    if count is not None and len(values) != count:
        raise UsageError(
            f"got {len(values)} {what} for {count} {per}s; pass exactly one weight per {per}{_HINTS.get(per, '')}"
        )
    if not values:
        raise UsageError(f"{what} is empty; pass one weight per {per}{_HINTS.get(per, '')}")
    total = math.fsum(values)
    if normalize:
        if abs(total) < _ZERO_SUM:
            raise UsageError(
                f"{what} {values} sum to {total:g}, which cannot be normalised; pass weights with a nonzero sum"
            )
        return tuple(v / total for v in values)
    if kind == "mixture" and abs(total - 1.0) > SUM_TOLERANCE:
        raise UsageError(
            f"{what} {values} sum to {total:g}; pass weights that sum to 1 or set normalize=True"
        )
    return tuple(values)
