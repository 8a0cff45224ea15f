"""The ``budget`` policy: the largest α in ``[0, 1]`` whose general-probe loss stays within ``(1 + drift_budget)`` ×
the base's, found in a few probe passes by a bracket narrowed with fitted curves (the helpers below the class).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import NonFiniteError, UsageError
from ._base import Decision, Evaluate


class BudgetPolicy:
    """The largest α whose general-probe loss is at most ``base_loss + drift_budget · |base_loss|``.

    For a positive base loss the bound is ``(1 + drift_budget) × base_loss``. Search, counting every pass:

    1. ``α = 0`` (the base's loss; the caller may cache it, it never changes) and ``α = 1`` (the fine-tuned
       model). If ``α = 1`` is within budget it is chosen.
    2. Otherwise the bracket ``[lo, hi]`` (``lo`` within budget, ``hi`` over it) is narrowed by a fitted curve.
       In normalised form ``g(α) = (L(α) − L(0)) / (L(1) − L(0))`` the loss is modelled as the quadratic
       ``g(α) = b·α + (1 − b)·α²`` through both ends; ``b`` is fitted (least squares) to the measured points nearest
       the bracket; before any interior point it comes from the previous decision's measurements (``previous``:
       the curve moves little between two evaluations), else ``b = 0`` (a pure quadratic: the loss of
       ``θ₀ + α·Δ`` grows roughly quadratically near the base). ``b < 0`` models the common dip of the general
       loss below the base's at moderate α. The guess solves ``L(α) = aim``, just inside the bound, and is kept
       at least 10% of the bracket away from its ends; when the same end of the bracket moves twice in a row, or
       the fit has no root in the bracket, the next guess bisects. It stops when a measured α is within budget and
       uses at least ``1 − slack`` of the allowed increase, when the bracket is narrower than ``tolerance``, or
       after ``max_passes`` passes in all.

    The chosen α is always one that was *measured* within budget (or 0, the base itself), so the written model
    honours the budget on the probe data.

    **A budget in the user's own metric.** With ``metric`` (a higher-is-better number such as recall or accuracy,
    computed by ``metric(model)`` on the user's own general data with the candidate mix swapped in), the bound is on
    that metric instead of the loss: at most ``metric_drop`` below the base's (in the metric's own units, or a
    fraction of the base's with ``relative=True``), or at least ``metric_floor``. The search is the same, on
    ``−metric``; ``evaluate(alpha)`` then returns the metric (the session arranges it). The loss budget stays the
    default: it needs no labels beyond the probes and moves smoothly with α; a metric budget says what users
    mean when the loss's scale says little (an easy contrastive probe set, a loss that depends on the batch size).

    Args:
        drift_budget: Allowed relative increase of the general-probe loss, ``>= 0`` (``0.05`` = 5%). Unused with
            ``metric``.
        tolerance: Bracket width in α at which the search stops, in ``(0, 1)``.
        slack: Accept a measured α whose loss increase is within this fraction below the bound, in ``(0, 1)``
            (0.25: any α using 75–100% of the allowed increase).
        max_passes: Cap on probe passes per decision (base and ``α = 1`` included), ``>= 2``. The default 5 leaves a
            callback, which measures the base once per run, at most 4 passes per evaluation (``α = 1`` and 3 guesses).
        metric: ``metric(model) -> float``, higher is better, called with the candidate mix in the model (eval mode,
            no gradients; every rank calls it and the values are averaged across ranks).
        metric_drop: With ``metric``: how much the metric may fall below the base's, ``>= 0`` (e.g. ``0.01`` = one
            point of a recall in [0, 1]).
        relative: ``metric_drop`` is a fraction of the base's metric (``0.02`` = 2% of it) instead of absolute.
        metric_floor: With ``metric``, instead of ``metric_drop``: the lowest metric allowed (the base must reach it).

    Raises:
        UsageError: A value out of range, a metric budget without ``metric``, ``metric`` without a budget, or both
            ``metric_drop`` and ``metric_floor``.
    """

    name = "budget"
    needs_general_data = True
    uses_previous = True

    def __init__(
        self,
        drift_budget: float = 0.05,
        *,
        tolerance: float = 0.05,
        slack: float = 0.25,
        max_passes: int = 5,
        metric: Callable[[Any], float] | None = None,
        metric_drop: float | None = None,
        relative: bool = False,
        metric_floor: float | None = None,
    ) -> None:
        if (
            isinstance(drift_budget, bool)
            or not isinstance(drift_budget, (int, float))
            or not drift_budget >= 0
        ):
            raise UsageError(
                f"drift_budget={drift_budget!r} must be a number >= 0: the allowed relative increase of the "
                "general-probe loss over the base's (e.g. 0.05 for 5%)"
            )
        if not math.isfinite(drift_budget):
            raise UsageError(f"drift_budget={drift_budget!r} must be finite, e.g. 0.05")
        for label, value in (("tolerance", tolerance), ("slack", slack)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise UsageError(f"{label}={value!r} must be a number in (0, 1)")
        if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 2:
            raise UsageError(f"max_passes={max_passes!r} must be an int >= 2 (the base and alpha=1 take two)")
        self.drift_budget = float(drift_budget)
        self.tolerance = float(tolerance)
        self.slack = float(slack)
        self.max_passes = max_passes
        _check_metric_budget(metric, metric_drop, relative, metric_floor)
        self.metric = metric
        self.metric_drop = None if metric_drop is None else float(metric_drop)
        self.relative = relative
        self.metric_floor = None if metric_floor is None else float(metric_floor)
        self.needs_general_data = metric is None  # a metric brings its own data

    @property
    def quantity(self) -> str:
        """``"metric"`` when the budget is on the user's metric, else ``"loss"``."""
        return "loss" if self.metric is None else "metric"

    def check_base(self, base: float) -> None:
        """Refuse a metric budget the base itself fails (``metric_floor`` above the base's metric).

        Raises:
            UsageError: Names both values and the fix.
        """
        if self.metric_floor is not None and base < self.metric_floor:
            raise UsageError(
                f"the base scores {base:.6g} on the metric, below metric_floor={self.metric_floor:g}: no alpha can "
                "meet the budget; lower metric_floor, use metric_drop=, or check the metric"
            )

    def _bound(self, base: float) -> float:
        """The worst allowed value of the budgeted quantity in search units (loss, or −metric)."""
        if self.metric is None:
            return base + self.drift_budget * abs(base)
        if self.metric_floor is not None:
            return -self.metric_floor
        assert self.metric_drop is not None  # checked at construction
        return base + self.metric_drop * (abs(base) if self.relative else 1.0)

    def choose(self, evaluate: Evaluate | None, *, previous: Any = None, **_: Any) -> Decision:
        """Search α (see the class docs).

        Args:
            evaluate: ``evaluate(alpha) -> general-probe loss`` (one probe pass).
            previous: The previous decision of the run (a :class:`Decision` or its ``to_dict()``), whose measured
                points give the curve's shape before this decision has measured any; ``None``: no prior.
        """
        if evaluate is None:
            raise UsageError(
                "the budget policy measures general-probe losses; pass an evaluate(alpha) function"
            )
        measured: list[tuple[float, float]] = []  # (alpha, cost): the loss, or minus the metric
        sign = 1.0 if self.metric is None else -1.0
        what = "general-probe loss" if self.metric is None else "metric"

        def measure(alpha: float) -> float:
            value = float(evaluate(alpha))
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"the {what} at alpha={alpha:.4g} is {value}; check the probe data, the metric and the model"
                )
            measured.append((alpha, sign * value))
            return sign * value

        base = measure(0.0)
        if self.metric is not None:
            self.check_base(-base)
        threshold = self._bound(base)
        aim = threshold - 0.5 * self.slack * (threshold - base)
        accept = threshold - self.slack * (threshold - base)
        top = measure(1.0)

        def decide(alpha: float, cost: float, reason: str) -> Decision:
            shown = tuple((a, sign * c) for a, c in measured)
            if self.metric is None:
                return Decision(alpha, len(measured), self.name, cost, base, threshold, shown, reason)
            return Decision(
                alpha, len(measured), self.name, evaluated=shown, reason=reason, quantity="metric",
                metric=-cost, base_metric=-base, metric_floor=-threshold,
            )  # fmt: skip

        if top <= threshold:
            return decide(1.0, top, "the fine-tuned model is within the budget")
        prior = _prior_shape(previous, sign)
        (lo, f_lo), hi = (0.0, base), 1.0
        last_side = ""
        while len(measured) < self.max_passes and hi - lo > self.tolerance:
            alpha = _next_guess(measured, lo, hi, aim, bisect=last_side == "repeat", prior=prior)
            loss = measure(alpha)
            side = "lo" if loss <= threshold else "hi"
            # the same end moved twice in a row: the fit is off there, so bisect next
            last_side = "repeat" if side == last_side else side
            if side == "lo":
                lo, f_lo = alpha, loss
                if loss >= accept:
                    return decide(lo, f_lo, "within budget and close to the bound")
            else:
                hi = alpha
        why = "bracket narrower than the tolerance" if hi - lo <= self.tolerance else "pass cap reached"
        return decide(lo, f_lo, f"largest alpha measured within budget ({why})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "drift_budget": self.drift_budget,
            "tolerance": self.tolerance,
            "slack": self.slack,
            "max_passes": self.max_passes,
        }
        if self.metric is not None:
            out.update(
                quantity="metric",
                metric=getattr(self.metric, "__qualname__", type(self.metric).__name__),
                metric_drop=self.metric_drop,
                relative=self.relative,
                metric_floor=self.metric_floor,
            )
        return out

    def __repr__(self) -> str:
        if self.metric is not None:
            bound = (
                f"metric_floor={self.metric_floor}"
                if self.metric_floor is not None
                else f"metric_drop={self.metric_drop}, relative={self.relative}"
            )
            return f"BudgetPolicy(metric={self.to_dict()['metric']}, {bound})"
        return f"BudgetPolicy(drift_budget={self.drift_budget}, tolerance={self.tolerance})"


def _check_metric_budget(
    metric: Any, metric_drop: float | None, relative: bool, metric_floor: float | None
) -> None:
    """The metric-budget arguments of :class:`BudgetPolicy`, each refusal naming the value and the fix."""
    if not isinstance(relative, bool):
        raise UsageError(f"relative={relative!r} must be True or False")
    for label, value in (("metric_drop", metric_drop), ("metric_floor", metric_floor)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{label}={value!r} must be a finite number")
        if metric is None:
            raise UsageError(
                f"{label}={value!r} bounds a metric, but no metric was given; pass metric=fn (fn(model) -> a "
                "higher-is-better number) or use drift_budget= for a loss budget"
            )
    if metric is None:
        if relative:
            raise UsageError("relative=True applies to metric_drop; pass metric= and metric_drop=")
        return
    if not callable(metric):
        raise UsageError(f"metric={metric!r} must be callable as metric(model) -> float (higher is better)")
    if (metric_drop is None) == (metric_floor is None):
        raise UsageError(
            "a metric budget needs exactly one bound: metric_drop= (how much the metric may fall below the base's) "
            "or metric_floor= (the lowest value allowed)"
        )
    if metric_drop is not None and metric_drop < 0:
        raise UsageError(
            f"metric_drop={metric_drop!r} must be >= 0: how much the metric may fall below the base's (e.g. 0.01)"
        )
    if relative and metric_floor is not None:
        raise UsageError("relative=True applies to metric_drop, not metric_floor; drop one of them")


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


def _prior_shape(previous: Any, sign: float = 1.0) -> float:
    """``b`` fitted to the previous decision's measured points (0.0, a pure quadratic, without them); ``sign`` turns
    them into search units (``-1`` for a metric). A previous decision on the other quantity gives no prior."""
    if previous is None:
        return 0.0
    get = previous.get if isinstance(previous, Mapping) else lambda k, d=None: getattr(previous, k, d)
    if (get("quantity", "loss") or "loss") != ("loss" if sign > 0 else "metric"):
        return 0.0
    evaluated = get("evaluated", ())
    try:
        points = _normalised([(float(a), sign * float(f)) for a, f in evaluated or ()])
    except (TypeError, ValueError):
        return 0.0
    b = _fit_b(points)
    return 0.0 if b is None or not math.isfinite(b) else b


def _next_guess(
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
