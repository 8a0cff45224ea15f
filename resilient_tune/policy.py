"""Policies: how α (the weight of the fine-tuned model) is chosen at each evaluation.

A policy is a small object with one method, ``choose(evaluate) -> Decision``. ``evaluate(alpha)`` returns the
general-probe loss of the merged model ``θ₀ + α·(θₜ − θ₀)`` (one probe pass, which the caller may cache, e.g.
the base's loss at ``α = 0`` never changes during a run). Policies that need no measurement accept
``evaluate=None``.

- :class:`FixedPolicy` (``"fixed"``, the zero-config default): α as given.
- :class:`BudgetPolicy` (``"budget"``): the largest α in ``[0, 1]`` whose general-probe loss stays within
  ``(1 + drift_budget)`` × the base's, found in a few probe passes.
- :class:`CocktailPolicy` (``"cocktail"``, the paper): α as given, and the weights ``wᵢ`` of the base and the
  peers in ``θ = α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ`` from their losses ``Lᵢ`` on target examples, ``wᵢ = softmax(−Lᵢ/τ)``.

Policies that choose ``wᵢ`` return them in :attr:`Decision.weights`; the others leave it ``None`` and the merge
keeps its current weights (uniform over base and peers unless set). Policies that need ingredient losses say so
with ``needs_ingredient_losses = True`` and take them as ``choose(evaluate, ingredient_losses=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

from .errors import NonFiniteError, UsageError
from .validation import check_alpha, check_weights
from .weights import softmax_weights

__all__ = [
    "POLICY_NAMES",
    "BudgetPolicy",
    "CocktailPolicy",
    "Decision",
    "FixedPolicy",
    "Policy",
    "choose",
    "get_policy",
]

POLICY_NAMES = ("fixed", "cocktail", "budget")

Evaluate = Callable[[float], float]
IngredientLosses = Union[Callable[[], Sequence[float]], Sequence[float]]  # noqa: UP007 (a runtime alias)
"""The losses ``Lᵢ`` of the base and each peer on target examples (base first), or a function computing them."""


@dataclass(frozen=True)
class Decision:
    """What a policy chose, and what it cost.

    Attributes:
        alpha: The chosen weight of the fine-tuned model, in ``[0, 1]``.
        passes: Calls the policy made to ``evaluate`` (probe passes, before any caching by the caller).
        policy: The policy's name.
        loss: General-probe loss at ``alpha`` when it was measured, else ``None``.
        base_loss: General-probe loss of the base (``α = 0``) when measured.
        threshold: The loss bound the policy enforced (``budget``), else ``None``.
        evaluated: ``(alpha, loss)`` pairs in the order measured.
        reason: One line on why this α.
        weights: Weights ``wᵢ`` of the base and the peers (base first, summing to 1) when the policy chooses them,
            else ``None`` (the merge keeps its weights).
        ingredient_losses: The losses ``Lᵢ`` the weights came from (``cocktail``), else ``None``.
    """

    alpha: float
    passes: int
    policy: str
    loss: float | None = None
    base_loss: float | None = None
    threshold: float | None = None
    evaluated: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    reason: str = ""
    weights: tuple[float, ...] | None = None
    ingredient_losses: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "passes": self.passes,
            "policy": self.policy,
            "loss": self.loss,
            "base_loss": self.base_loss,
            "threshold": self.threshold,
            "evaluated": [list(pair) for pair in self.evaluated],
            "reason": self.reason,
            "weights": None if self.weights is None else list(self.weights),
            "ingredient_losses": None if self.ingredient_losses is None else list(self.ingredient_losses),
        }


@runtime_checkable
class Policy(Protocol):
    """The interface every policy implements."""

    name: str
    needs_general_data: bool

    def choose(self, evaluate: Evaluate | None) -> Decision:
        """Decide α (and optionally the weights). Policies with ``needs_ingredient_losses = True`` also take
        ``ingredient_losses=``; every built-in policy accepts (and ignores) keyword arguments it does not use."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


class FixedPolicy:
    """α (and, with peers, the weights ``wᵢ``) as given, every time (no probe pass).

    Args:
        alpha: Weight of the fine-tuned model in ``[0, 1]`` (0.5 by default, as the paper's examples).
        weights: Optional weights ``wᵢ`` of the base and the peers (base first): non-negative, summing to 1.
            ``None`` keeps the merge's weights (uniform over base and peers).
    """

    name = "fixed"
    needs_general_data = False

    def __init__(self, alpha: float = 0.5, *, weights: Sequence[float] | None = None) -> None:
        self.alpha = check_alpha(alpha)
        self.weights = None if weights is None else check_weights(weights, nonnegative=True, per="ingredient")

    def choose(self, evaluate: Evaluate | None = None, **_: Any) -> Decision:
        return Decision(self.alpha, 0, self.name, reason="fixed alpha", weights=self.weights)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "alpha": self.alpha}
        if self.weights is not None:
            out["weights"] = list(self.weights)
        return out

    def __repr__(self) -> str:
        return f"FixedPolicy(alpha={self.alpha})"


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

    Args:
        drift_budget: Allowed relative increase of the general-probe loss, ``>= 0`` (``0.05`` = 5%).
        tolerance: Bracket width in α at which the search stops, in ``(0, 1)``.
        slack: Accept a measured α whose loss increase is within this fraction below the bound, in ``(0, 1)``
            (0.25: any α using 75–100% of the allowed increase).
        max_passes: Cap on probe passes per decision (base and ``α = 1`` included), ``>= 2``. The default 5 leaves a
            callback, which measures the base once per run, at most 4 passes per evaluation (``α = 1`` and 3 guesses).
    """

    name = "budget"
    needs_general_data = True
    uses_previous = True

    def __init__(
        self, drift_budget: float = 0.05, *, tolerance: float = 0.05, slack: float = 0.25, max_passes: int = 5
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
        measured: list[tuple[float, float]] = []

        def measure(alpha: float) -> float:
            loss = float(evaluate(alpha))
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"the general-probe loss at alpha={alpha:.4g} is {loss}; check the probe data and the model"
                )
            measured.append((alpha, loss))
            return loss

        base = measure(0.0)
        threshold = base + self.drift_budget * abs(base)
        aim = threshold - 0.5 * self.slack * (threshold - base)
        accept = threshold - self.slack * (threshold - base)
        top = measure(1.0)

        def decide(alpha: float, loss: float, reason: str) -> Decision:
            return Decision(alpha, len(measured), self.name, loss, base, threshold, tuple(measured), reason)

        if top <= threshold:
            return decide(1.0, top, "the fine-tuned model is within the budget")
        prior = _prior_shape(previous)
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
        return {
            "name": self.name,
            "drift_budget": self.drift_budget,
            "tolerance": self.tolerance,
            "slack": self.slack,
            "max_passes": self.max_passes,
        }

    def __repr__(self) -> str:
        return f"BudgetPolicy(drift_budget={self.drift_budget}, tolerance={self.tolerance})"


class CocktailPolicy:
    """LM-Cocktail (paper arXiv 2311.13534): α as given, ``wᵢ = softmax(−Lᵢ/τ)`` over the base and the peers.

    ``Lᵢ`` is the loss of ingredient ``i`` (the base, then each peer, as stored — not mixed with the fine-tuned
    model) on a few target examples. The ingredients never change during a run, so the caller may compute the
    losses once and pass the same numbers at every decision. Without peers the only weight is the base's (1.0)
    and the policy is ``fixed``.

    Args:
        alpha: Weight of the fine-tuned model in ``[0, 1]`` (0.5 by default, as the paper's examples).
        temperature: Softmax temperature τ > 0 (5.0, the reference default; smaller τ favours the lowest loss).
    """

    name = "cocktail"
    needs_general_data = False
    needs_ingredient_losses = True

    def __init__(self, alpha: float = 0.5, *, temperature: float = 5.0) -> None:
        self.alpha = check_alpha(alpha)
        softmax_weights([0.0], temperature)  # validates the temperature with the reference's message
        self.temperature = float(temperature)

    def choose(
        self, evaluate: Evaluate | None = None, *, ingredient_losses: IngredientLosses | None = None, **_: Any
    ) -> Decision:
        """Weights from ``ingredient_losses`` (base first, or a function returning them); no general pass.

        Raises:
            UsageError: ``ingredient_losses`` missing or empty.
            NonFiniteError: A loss is NaN/Inf.
        """
        if ingredient_losses is None:
            raise UsageError(
                "the cocktail policy weighs the base and the peers by their loss on target examples; pass "
                "ingredient_losses=[loss of the base, loss of peer 1, ...]"
            )
        losses = tuple(
            float(x) for x in (ingredient_losses() if callable(ingredient_losses) else ingredient_losses)
        )
        names = ["the base", *(f"peer {i}" for i in range(1, len(losses)))]
        weights = tuple(softmax_weights(losses, self.temperature, names=names))
        reason = f"fixed alpha; weights softmax(-loss/{self.temperature:g}) over base and {len(losses) - 1} peer(s)"
        return Decision(self.alpha, 0, self.name, reason=reason, weights=weights, ingredient_losses=losses)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "temperature": self.temperature}

    def __repr__(self) -> str:
        return f"CocktailPolicy(alpha={self.alpha}, temperature={self.temperature})"


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


def _prior_shape(previous: Any) -> float:
    """``b`` fitted to the previous decision's measured points (0.0, a pure quadratic, without them)."""
    if previous is None:
        return 0.0
    evaluated = (
        previous.get("evaluated") if isinstance(previous, Mapping) else getattr(previous, "evaluated", ())
    )
    try:
        points = _normalised([(float(a), float(f)) for a, f in evaluated or ()])
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


def choose(
    policy: Policy,
    evaluate: Evaluate | None,
    *,
    ingredient_losses: IngredientLosses | None = None,
    previous: Decision | Mapping[str, Any] | None = None,
) -> Decision:
    """Ask ``policy`` for a decision, passing ``ingredient_losses`` only to the policies that declare
    ``needs_ingredient_losses`` and ``previous`` (the run's previous decision, or its ``to_dict()``) only to those
    that declare ``uses_previous`` (so user policies with a plain ``choose(evaluate)`` keep working).

    The caller applies the decision: ``alpha``, and ``weights`` when not ``None`` (e.g.
    ``engine.set_weights(decision.weights)``) before it measures or writes the chosen mix.
    """
    options: dict[str, Any] = {}
    if getattr(policy, "needs_ingredient_losses", False):
        options["ingredient_losses"] = ingredient_losses
    if getattr(policy, "uses_previous", False):
        options["previous"] = previous
    return policy.choose(evaluate, **options)  # type: ignore[call-arg]


def get_policy(name: str | Policy, **options: Any) -> Policy:
    """A policy by name (``fixed`` | ``cocktail`` | ``budget``), or ``name`` itself if it is a policy object.

    Args:
        name: The policy name, or a ready policy (returned as is; ``options`` must then be empty).
        **options: Constructor arguments: ``alpha``, ``weights`` (fixed), ``alpha``, ``temperature`` (cocktail),
            ``drift_budget``, ``tolerance``, ``slack``, ``max_passes`` (budget).

    Raises:
        UsageError: Unknown name (the message lists the valid ones) or bad options.
    """
    if not isinstance(name, str):
        if isinstance(name, Policy):
            if options:
                raise UsageError(
                    f"options {sorted(options)} cannot be applied to a ready policy object {name!r}"
                )
            return name
        raise UsageError(f"policy={name!r} must be a name ({' | '.join(POLICY_NAMES)}) or a policy object")
    factories: dict[str, Callable[..., Policy]] = {
        "fixed": FixedPolicy,
        "cocktail": CocktailPolicy,
        "budget": BudgetPolicy,
    }
    if name not in factories:
        raise UsageError(f"policy {name!r} is unknown; use one of: {', '.join(POLICY_NAMES)}")
    try:
        return factories[name](**options)
    except TypeError as exc:
        raise UsageError(f"bad options for policy {name!r}: {exc}") from None
