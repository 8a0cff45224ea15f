"""The budget policy's cold search: the curve fitted through the measured points of one decision (normalised by the
losses at ``α = 0`` and ``α = 1``) and the next guess it gives, with the previous decision's shape as a prior."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._base import decision_field

__all__ = ["next_guess", "prior_shape"]


def _normalised(measured: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Interior points ``(α, g)`` with ``g = (L(α) − L(0)) / (L(1) − L(0))``; ``[]`` when the ends are missing or
    ``L(1) <= L(0)``."""
    ends = {a: f for a, f in measured if a in (0.0, 1.0)}
    if len(ends) < 2 or ends[1.0] <= ends[0.0]:
        return []
    rise = ends[1.0] - ends[0.0]
    return [(a, (f - ends[0.0]) / rise) for a, f in measured if 0.0 < a < 1.0]


def _fit_b(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares ``b`` of ``g(α) = b·α + (1 − b)·α²`` through ``points`` (``None`` without any)."""
    num = sum((a - a * a) * (g - a * a) for a, g in points)
    den = sum((a - a * a) ** 2 for a, g in points)
    return num / den if den > 0 else None


def prior_shape(previous: Any, sign: float = 1.0) -> float:
    """``b`` fitted to the previous decision's measured points (0.0, a pure quadratic, without them); ``sign`` turns
    them into search units (``-1`` for a metric). A previous decision on the other quantity gives no prior."""
    if previous is None:
        return 0.0
    if (decision_field(previous, "quantity") or "loss") != ("loss" if sign > 0 else "metric"):
        return 0.0
    evaluated = decision_field(previous, "evaluated", ())
    try:
        points = _normalised([(float(a), sign * float(f)) for a, f in evaluated or ()])
    except (TypeError, ValueError):
        return 0.0
    b = _fit_b(points)
    return 0.0 if b is None or not math.isfinite(b) else b


def next_guess(
    measured: list[tuple[float, float]],
    lo: float,
    hi: float,
    aim: float,
    *,
    bisect: bool = False,
    prior: float = 0.0,
) -> float:
    """Next α to measure, solving a fitted curve for ``L(α) = aim`` in normalised form ``g``, kept 10% of the
    bracket away from its ends; the midpoint when ``bisect`` or when the fit has no root in the bracket. Once both
    ends of the bracket are measured interior points, the chord between them (regula falsi) replaces the fit.

    The curve: before any interior point, ``g(α) = b·α + (1 − b)·α²`` with ``b = prior``; once interior points
    are measured and all lie above the base, a power law ``g = c·α^p`` through the two points nearest the
    bracket (``α = 1`` included), which follows curves flatter or sharper than a quadratic; when one dips below
    the base, the quadratic with ``b`` fitted to the two interior points nearest the bracket."""
    width = hi - lo
    guess = lo + 0.5 * width
    ends = {a: f for a, f in measured if a in (0.0, 1.0)}
    points = _normalised(measured)
    losses = dict(measured)
    if not bisect and lo > 0.0 and hi < 1.0 and losses[hi] > losses[lo]:
        # measured on both sides inside (0, 1): the chord between them (regula falsi); on a convex stretch it
        # lands on the feasible side of the bound
        guess = lo + (aim - losses[lo]) / (losses[hi] - losses[lo]) * width
    elif not bisect and len(ends) == 2 and ends[1.0] > ends[0.0]:
        target = (aim - ends[0.0]) / (ends[1.0] - ends[0.0])
        closeness = lambda p: min(abs(p[0] - lo), abs(p[0] - hi))  # noqa: E731
        if points and all(g > 0 for _, g in points):
            (a1, g1), (a2, g2) = sorted(sorted([*points, (1.0, 1.0)], key=closeness)[:2])
            power = math.log(g2 / g1) / math.log(a2 / a1) if g1 != g2 else 0.0
            roots = [a2 * (target / g2) ** (1.0 / power)] if power > 0 and target > 0 else []
        else:
            fitted = _fit_b(sorted(points, key=closeness)[:2])
            b = prior if fitted is None else fitted
            roots = _roots(1.0 - b, b, -target)
        inside = [r for r in roots if lo < r < hi]
        if inside:
            guess = max(inside)
    return min(max(guess, lo + 0.1 * width), hi - 0.1 * width)


def _roots(a: float, b: float, c: float) -> list[float]:
    """Real roots of ``a·x² + b·x + c`` (linear when ``a`` is ~0)."""
    if abs(a) < 1e-12:
        return [] if abs(b) < 1e-12 else [-c / b]
    disc = b * b - 4.0 * a * c
    if disc < 0:
        return []
    root = math.sqrt(disc)
    return [(-b - root) / (2.0 * a), (-b + root) / (2.0 * a)]
