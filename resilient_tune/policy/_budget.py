"""The ``budget`` policy: the largest α in ``[0, 1]`` whose general-probe loss stays within ``(1 + drift_budget)`` ×
the base's, found in a few probe passes by a bracket narrowed with fitted curves (:mod:`._search`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import NonFiniteError, UsageError
from ._base import Decision, Evaluate, decision_field
from ._search import next_guess, prior_shape
from ._warm import comparable, local_slope, next_exponent, over_budget_at, warm_guess, warm_start

_RECHECK_FINETUNED = 0.9  # a warm search whose bracket's low end reaches this α measures α = 1 again


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

    **Warm start** (``warm=True``, the default). From the second decision of a run on, the search starts where the
    previous one ended, moved with the fine-tune's displacement ``D = ‖θ − θ₀‖`` (passed by the session as
    ``displacement``): the first guess is the previous α times ``(D_prev / D)^k``, with ``k`` estimated from the
    run's own decisions (:mod:`._warm`), the next ones step along the local slope until the bound is bracketed. While
    the fine-tuned model lies further along than a point already measured over the bound, ``α = 1`` is not
    re-measured (the decision's ``finetuned_skipped``); it is measured again as soon as the search climbs to
    ``α ≥ 0.9``. On the demos a decision after the first then costs 1–3 general-probe passes instead of 2–4.

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
        warm: Start each decision from the previous one (see above); ``False`` searches every decision from
            scratch and measures ``α = 1`` every time.
        confidence: Bound the probe loss with this one-sided confidence instead of its mean (e.g. ``0.95``), in
            ``[0.5, 1)``: a candidate's loss counts as ``L(α) + z·SE`` where ``SE`` is the standard error of the
            paired per-unit increase over the base (units: the examples of a ``score_fn`` that returns per-example
            losses, the sequences of a language model's own loss, else the probe batches) and ``z`` the normal
            quantile. A few dozen probes estimate the held-out loss with noise; the bound keeps that noise from
            spending the budget (``benchmarks/resilience_grid.py --confidence``). ``None`` (default): the mean.
            Loss budgets only.

    Raises:
        UsageError: A value out of range, a metric budget without ``metric``, ``metric`` without a budget, or both
            ``metric_drop`` and ``metric_floor``.
    """

    name = "budget"
    needs_general_data = True
    uses_previous = True
    uses_displacement = True

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
        warm: bool = True,
        confidence: float | None = None,
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
        if not isinstance(warm, bool):
            raise UsageError(f"warm={warm!r} must be True or False")
        self.warm = warm
        self.confidence = _check_confidence(confidence, metric)

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

    def choose(
        self,
        evaluate: Evaluate | None,
        *,
        previous: Any = None,
        displacement: float | None = None,
        **_: Any,
    ) -> Decision:
        """Search α (see the class docs).

        Args:
            evaluate: ``evaluate(alpha) -> general-probe loss`` (one probe pass), or the metric with ``metric``.
            previous: The previous decision of the run (a :class:`Decision` or its ``to_dict()``), whose measured
                points give the curve's shape before this decision has measured any; ``None``: no prior.
            displacement: ``‖θ − θ₀‖`` of the fine-tuned model now (the session's drift); with ``previous`` it
                allows the warm start. ``None``: a cold search.
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
        # the previous decision's curve says something about this one only on the same probes and the same mix
        before = previous if comparable(previous, quantity=self.quantity, base=sign * base) else None
        warm = warm_start(before, sign=sign, displacement=displacement) if self.warm else None
        carried = decision_field(before, "exponent")

        def decide(alpha: float, cost: float, reason: str) -> Decision:
            shown = tuple((a, sign * c) for a, c in measured)
            run = {
                "slope": local_slope(sorted(measured), alpha, warm),
                "displacement": displacement,
                "over_at": over_budget_at(before, measured, threshold, displacement),
                "exponent": next_exponent(before, alpha, displacement, carried),
                "finetuned_skipped": all(a != 1.0 for a, _ in measured),
            }
            if self.metric is None:
                return Decision(alpha, len(measured), self.name, cost, base, threshold, shown, reason, **run)
            return Decision(
                alpha, len(measured), self.name, evaluated=shown, reason=reason, quantity="metric",
                metric=-cost, base_metric=-base, metric_floor=-threshold, **run,
            )  # fmt: skip

        top: float | None = None
        if warm is None:
            top = measure(1.0)
            if top <= threshold:
                return decide(1.0, top, "the fine-tuned model is within the budget")
        prior = prior_shape(previous, sign)
        (lo, f_lo), hi = (0.0, base), 1.0
        last_side = ""
        start = "warm start; " if warm is not None else ""
        while len(measured) < self.max_passes and hi - lo > self.tolerance:
            if warm is None or (lo > 0.0 and hi < 1.0):
                alpha = next_guess(measured, lo, hi, aim, bisect=last_side == "repeat", prior=prior)
            elif len(measured) == 1:
                alpha = warm.alpha
            else:
                reach = _RECHECK_FINETUNED if top is None else None
                alpha = warm_guess(measured, lo, hi, aim, warm.slope, reach=reach)
            if top is None and (lo >= _RECHECK_FINETUNED or alpha >= 1.0):
                # the warm search climbed near the top, or its next step would: the fine-tuned model may be within
                # budget after all
                top = measure(1.0)
                if top <= threshold:
                    return decide(1.0, top, "the fine-tuned model is within the budget (re-measured)")
                continue
            loss = measure(alpha)
            side = "lo" if loss <= threshold else "hi"
            # the same end moved twice in a row: the fit is off there, so bisect next
            last_side = "repeat" if side == last_side else side
            if side == "lo":
                lo, f_lo = alpha, loss
                if loss >= accept:
                    return decide(lo, f_lo, start + "within budget and close to the bound")
            else:
                hi = alpha
        if top is None and lo >= _RECHECK_FINETUNED and len(measured) < self.max_passes:
            # the bracket closed near the top: is the fine-tuned model itself within budget?
            top = measure(1.0)
            if top <= threshold:
                return decide(1.0, top, "the fine-tuned model is within the budget (re-measured)")
        why = "bracket narrower than the tolerance" if hi - lo <= self.tolerance else "pass cap reached"
        return decide(lo, f_lo, f"{start}largest alpha measured within budget ({why})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "drift_budget": self.drift_budget,
            "tolerance": self.tolerance,
            "slack": self.slack,
            "max_passes": self.max_passes,
            "warm": self.warm,
        }
        if self.confidence is not None:
            out["confidence"] = self.confidence
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
        bound = "" if self.confidence is None else f", confidence={self.confidence}"
        return f"BudgetPolicy(drift_budget={self.drift_budget}, tolerance={self.tolerance}{bound})"


def _check_confidence(confidence: Any, metric: Any) -> float | None:
    """``confidence`` as a float in ``[0.5, 1)`` (or ``None``); refused with a metric budget."""
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise UsageError(
            f"confidence={confidence!r} must be a number in [0.5, 1) (e.g. 0.95: the loss bound holds with 95% "
            "confidence), or None to bound the probe loss's mean"
        )
    if metric is not None:
        raise UsageError(
            "confidence bounds the probe loss; a metric budget bounds the metric's own value: drop confidence, or "
            "drop metric to budget the loss"
        )
    return float(confidence)


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
