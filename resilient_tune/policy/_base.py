"""What every policy shares: the :class:`Decision` it returns, the :class:`Policy` protocol, the ``fixed`` policy and
:func:`choose`, which calls a policy with the inputs it declares it needs.

A policy is a small object with one method, ``choose(evaluate) -> Decision``. ``evaluate(alpha)`` returns the
general-probe loss of the merged model ``θ₀ + α·(θₜ − θ₀)`` (one probe pass, which the caller may cache, e.g.
the base's loss at ``α = 0`` never changes during a run). Policies that need no measurement accept
``evaluate=None``. Policies that choose ``wᵢ`` return them in :attr:`Decision.weights`; the others leave it ``None``
and the merge keeps its current weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

from ..validation import check_alpha, check_weights

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
        quantity: What the policy bounded: ``"loss"`` (the general-probe loss; ``loss``, ``base_loss``, ``threshold``
            and ``evaluated`` hold losses) or ``"metric"`` (the user's higher-is-better metric; ``metric``,
            ``base_metric``, ``metric_floor`` and ``evaluated`` hold its values, the loss fields stay ``None``).
        metric: The metric at ``alpha`` (``quantity="metric"``).
        base_metric: The metric of the base.
        metric_floor: The lowest metric the budget allowed.
        slope: The budget search's ``dL/dα`` near ``alpha`` (search units: the loss, or minus the metric), handed to
            the next decision's warm start (``budget``).
        displacement: ``‖θ − θ₀‖`` of the fine-tuned model at the decision, when the caller passed it (``budget``).
        over_at: The smallest displacement ``α·‖θ − θ₀‖`` measured over the bound so far in the run (``budget``).
        exponent: The run's estimate of ``k`` in ``α* ∝ ‖θ − θ₀‖^−k``, handed to the next decision (``budget``).
        finetuned_skipped: The policy did not measure ``α = 1`` (the fine-tuned model is known to be over budget);
            the caller need not measure it for its report either.

    ``passes`` counts the points the policy evaluated, the base included even when the caller answered it from a
    cache; the probe passes a decision actually ran are the history entry's ``probe_passes``.
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
    quantity: str = "loss"
    metric: float | None = None
    base_metric: float | None = None
    metric_floor: float | None = None
    slope: float | None = None
    displacement: float | None = None
    over_at: float | None = None
    exponent: float | None = None
    finetuned_skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {
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
        for key in ("slope", "displacement", "over_at", "exponent"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.finetuned_skipped:
            out["finetuned_skipped"] = True
        if self.quantity != "loss":
            out.update(
                quantity=self.quantity,
                metric=self.metric,
                base_metric=self.base_metric,
                metric_floor=self.metric_floor,
            )
        return out


def decision_field(record: Decision | Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """``key`` of a decision or of its ``to_dict()`` (what a resumed run hands back), ``default`` when absent."""
    if record is None:
        return default
    if isinstance(record, Mapping):
        return record.get(key, default)
    return getattr(record, key, default)


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


def choose(
    policy: Policy,
    evaluate: Evaluate | None,
    *,
    ingredient_losses: IngredientLosses | None = None,
    previous: Decision | Mapping[str, Any] | None = None,
    displacement: float | None = None,
) -> Decision:
    """Ask ``policy`` for a decision, passing ``ingredient_losses`` only to the policies that declare
    ``needs_ingredient_losses`` and ``previous`` (the run's previous decision, or its ``to_dict()``) only to those
    that declare ``uses_previous`` and ``displacement`` (``‖θ − θ₀‖`` now) only to those that declare
    ``uses_displacement`` (so user policies with a plain ``choose(evaluate)`` keep working).

    The caller applies the decision: ``alpha``, and ``weights`` when not ``None`` (e.g.
    ``engine.set_weights(decision.weights)``) before it measures or writes the chosen mix.
    """
    options: dict[str, Any] = {}
    if getattr(policy, "needs_ingredient_losses", False):
        options["ingredient_losses"] = ingredient_losses
    if getattr(policy, "uses_previous", False):
        options["previous"] = previous
    if getattr(policy, "uses_displacement", False):
        options["displacement"] = displacement
    return policy.choose(evaluate, **options)  # type: ignore[call-arg]
