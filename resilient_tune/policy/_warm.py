"""The budget policy's warm start: a decision starts where the run's previous one ended, moved with the fine-tune,
and does not re-measure the fine-tuned model while it is known to be over budget.

Between two evaluations the fine-tune moves on and its displacement ``D = ‖θ − θ₀‖`` grows. How the α at the bound
moves with it differs between runs: on the MiniLM demo ``α·D`` stays nearly constant (α falls as the fine-tune goes
further: the general loss depends on how far the mix moved from the base), on the decoder demo α itself stays (the
loss's curve keeps its shape in α). The model ``α* ∝ D^−k`` covers both (``k ≈ 1.2`` and ``k ≈ 0.2`` there); each
decision estimates ``k`` from its own α and the previous one's and hands it on (:func:`next_exponent`).

The first guess is the previous α moved by that model; the next ones step along the local slope (the previous
decision's secant, moved the same way, then the secant of this decision's own points) until two measured points
bracket the bound, where the cold search's regula falsi takes over. ``α = 1`` is skipped only while the fine-tuned
model's displacement ``D`` is at least the smallest displacement ``α·D`` measured over the bound earlier in the run
(``over_at``): further along the same path than a point already over budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._base import decision_field

__all__ = [
    "DEFAULT_EXPONENT",
    "WarmStart",
    "comparable",
    "local_slope",
    "next_exponent",
    "over_budget_at",
    "warm_guess",
    "warm_start",
]

DEFAULT_EXPONENT = 0.5  # k before a run has two decisions to estimate it from: between the two demos' 0.2 and 1.2
_EXPONENT_RANGE = (0.0, 2.0)
_FULL_WEIGHT_RATIO = 1.3  # a displacement ratio from which a fresh estimate of k replaces the carried one


@dataclass(frozen=True)
class WarmStart:
    """Where a warm decision starts.

    Attributes:
        alpha: The first guess.
        slope: ``dL/dα`` near it (search units: the loss, or minus the metric), ``> 0``.
        exponent: The ``k`` of ``α* ∝ D^−k`` the guess used.
        over_at: The smallest displacement measured over the bound so far in the run.
    """

    alpha: float
    slope: float
    exponent: float
    over_at: float


def _finite_positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def comparable(previous: Any, *, quantity: str, base: float) -> bool:
    """Whether ``previous`` is a budget decision on the same quantity with the same base value (same probes, same mix
    of base and peers): only then does its curve say anything about this one. ``base`` is in the quantity's own
    units (a loss, or the metric)."""
    if previous is None:
        return False
    get = functools.partial(decision_field, previous)
    if get("policy") != "budget" or (get("quantity", "loss") or "loss") != quantity:
        return False
    try:
        previous_base = float(get("base_loss" if quantity == "loss" else "base_metric"))
    except (TypeError, ValueError):
        return False
    return math.isclose(previous_base, base, rel_tol=1e-9, abs_tol=1e-12)


def warm_start(previous: Any, *, sign: float, displacement: float | None) -> WarmStart | None:
    """The warm start from ``previous`` (a :func:`comparable` budget decision or its ``to_dict()``), or ``None`` when
    a cold search is needed: no measured displacement, a previous α at 0 or 1, no point measured over the bound at
    a displacement the fine-tune has reached, or no rising secant to step along. ``sign`` turns the recorded values
    into search units (``-1`` for a metric)."""
    now = _finite_positive(displacement)
    if previous is None or now is None:
        return None
    get = functools.partial(decision_field, previous)
    before = _finite_positive(get("displacement"))
    over_at = _finite_positive(get("over_at"))
    try:
        alpha = float(get("alpha"))
        points = sorted((float(a), sign * float(c)) for a, c in get("evaluated", ()) or ())
    except (TypeError, ValueError):
        return None
    if before is None or over_at is None or now < over_at or not 0.0 < alpha < 1.0:
        return None
    slope = _secant_at(points, alpha) or _finite_positive(get("slope"))
    if slope is None:
        return None
    k = get("exponent")
    k = DEFAULT_EXPONENT if not isinstance(k, (int, float)) or not math.isfinite(k) else float(k)
    scale = (before / now) ** k  # α* moves by this factor; the curve steepens by its inverse
    guess = min(max(alpha * scale, 0.02), 0.98)
    return WarmStart(guess, slope / scale, k, over_at)


def _secant_at(points: Sequence[tuple[float, float]], alpha: float) -> float | None:
    """The secant of the measured curve between ``alpha`` and the nearest measured point above it (else below it),
    when it rises; ``None`` otherwise."""
    cost = dict(points).get(alpha)
    if cost is None:
        return None
    above = [(a, c) for a, c in points if a > alpha]
    below = [(a, c) for a, c in points if 0.0 < a < alpha]
    for a, c in [*above[:1], *below[-1:]]:
        slope = (c - cost) / (a - alpha)
        if slope > 0 and math.isfinite(slope):
            return slope
    return None


def local_slope(
    measured: Sequence[tuple[float, float]], alpha: float, warm: WarmStart | None
) -> float | None:
    """``dL/dα`` near the chosen ``alpha`` (search units) for the next decision: the secant of this decision's
    points there, else the slope this warm decision started from (a first guess that hit measures no secant)."""
    return _secant_at(measured, alpha) or (None if warm is None else warm.slope)


def warm_guess(
    measured: Sequence[tuple[float, float]],
    lo: float,
    hi: float,
    aim: float,
    slope: float,
    *,
    reach: float | None = None,
) -> float:
    """The next α of a warm decision before the bound is bracketed: a step from the last measured point along the
    secant of this decision's two latest interior points (when it rises), else along ``slope``; kept 5% of the
    bracket away from its ends (a bound near α = 0 stays reachable). ``1.0`` when the step reaches ``reach`` or
    beyond (the caller then measures the fine-tuned model itself)."""
    interior = [(a, c) for a, c in measured if 0.0 < a < 1.0]
    a_last, c_last = interior[-1]
    if len(interior) >= 2:
        (a1, c1), (a2, c2) = interior[-2], interior[-1]
        if a1 != a2 and (c2 - c1) / (a2 - a1) > 0:
            slope = (c2 - c1) / (a2 - a1)
    width = hi - lo
    guess = a_last + (aim - c_last) / slope
    if reach is not None and guess >= reach:
        return 1.0
    return min(max(guess, lo + 0.05 * width), hi - 0.05 * width)


def over_budget_at(
    previous: Any, measured: Sequence[tuple[float, float]], threshold: float, displacement: float | None
) -> float | None:
    """The smallest displacement ``α·D`` measured over the bound in the run so far: this decision's points over
    ``threshold`` (search units) and the ``over_at`` of ``previous`` (pass it only when :func:`comparable`)."""
    now = _finite_positive(displacement)
    if now is None:
        return None
    found = [a * now for a, c in measured if c > threshold and a > 0.0]
    carried = _finite_positive(decision_field(previous, "over_at"))
    if carried is not None:
        found.append(carried)
    return min(found) if found else None


def next_exponent(previous: Any, alpha: float, displacement: float | None, carried: float | None) -> float | None:
    """``k`` of ``α* ∝ D^−k`` from this decision's α and the previous one's, blended with the carried estimate when
    the displacement moved little (a fresh estimate is noisy then: the accepted α may sit anywhere in the accept
    window); ``None`` without two usable decisions."""
    now = _finite_positive(displacement)
    if previous is None or now is None or not 0.0 < alpha < 1.0:
        return carried
    get = functools.partial(decision_field, previous)
    before = _finite_positive(get("displacement"))
    previous_alpha = _finite_positive(get("alpha"))
    if before is None or previous_alpha is None or previous_alpha >= 1.0 or math.isclose(now, before):
        return carried
    step = math.log(now / before)
    fresh = -math.log(alpha / previous_alpha) / step
    fresh = min(max(fresh, _EXPONENT_RANGE[0]), _EXPONENT_RANGE[1])
    if carried is None:
        return fresh
    weight = min(1.0, abs(step) / math.log(_FULL_WEIGHT_RATIO))
    return weight * fresh + (1.0 - weight) * carried
