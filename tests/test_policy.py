"""Policies: fixed alpha, the budget search (few passes, always within budget), the name registry."""

from __future__ import annotations

import math

import pytest

from resilient_tune.errors import NonFiniteError, UsageError
from resilient_tune.policy import BudgetPolicy, CocktailPolicy, Decision, FixedPolicy, get_policy


class _Curve:
    """A general-probe loss curve L(alpha), counting the passes spent on it."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[float] = []

    def __call__(self, alpha: float) -> float:
        self.calls.append(alpha)
        return self.fn(alpha)


def test_fixed_policy_spends_no_pass():
    decision = FixedPolicy(0.7).choose(None)
    assert decision == Decision(0.7, 0, "fixed", reason="fixed alpha")


def test_budget_takes_the_fine_tuned_model_when_it_is_within_budget():
    curve = _Curve(lambda a: 2.0 + 0.05 * a)  # +2.5% at alpha = 1
    decision = BudgetPolicy(0.05).choose(curve)
    assert decision.alpha == 1.0 and decision.passes == 2 and curve.calls == [0.0, 1.0]


@pytest.mark.parametrize(
    "shape",
    [
        lambda a: 2.0 + 1.0 * a * a,  # quadratic: the model the search assumes
        lambda a: 2.0 + 0.6 * a,  # linear
        lambda a: 2.0 + 3.0 * a**4,  # sharper than assumed
        lambda a: 2.0 + 0.3 * math.sqrt(a),  # concave
        lambda a: 2.0 - 0.8 * a + 1.4 * a * a,  # dips below the base first (seen on real models)
    ],
)
@pytest.mark.parametrize("budget", [0.02, 0.1])
def test_budget_search_is_feasible_near_optimal_and_cheap(shape, budget):
    curve = _Curve(shape)
    policy = BudgetPolicy(budget)
    decision = policy.choose(curve)
    threshold = 2.0 * (1 + budget)
    assert decision.threshold == pytest.approx(threshold)
    assert shape(decision.alpha) <= threshold + 1e-12  # the chosen alpha was measured within budget
    assert decision.loss == pytest.approx(shape(decision.alpha))
    assert decision.passes == len(curve.calls) <= policy.max_passes
    # the true largest feasible alpha, by a fine scan (the test's oracle, not the policy's method)
    best = max(i / 10000 for i in range(10001) if shape(i / 10000) <= threshold)
    # near-optimal: within the stopping rules (bracket tolerance, or using >= 1 - slack of the allowed increase)
    assert decision.alpha >= best - policy.tolerance or shape(decision.alpha) >= threshold - policy.slack * (
        threshold - 2.0
    )


def test_budget_on_a_cliff_still_halves_the_bracket_within_the_cap():
    def shape(a: float) -> float:  # flat, then a cliff: no power law fits, the search falls back to bisection
        return 2.0 + (0.0 if a < 0.6 else 5.0 * (a - 0.6))

    curve = _Curve(shape)
    decision = BudgetPolicy(0.1, max_passes=6).choose(curve)
    assert shape(decision.alpha) <= 2.2 and decision.passes == len(curve.calls) <= 6
    assert 0.5 <= decision.alpha <= 0.64


def test_budget_on_the_assumed_shape_needs_three_passes():
    curve = _Curve(lambda a: 1.0 + 0.5 * a * a)
    policy = BudgetPolicy(0.1)
    decision = policy.choose(curve)
    assert decision.passes == 3
    aim = 1.1 - 0.5 * policy.slack * 0.1  # halfway into the accepted band below the bound
    assert decision.alpha == pytest.approx(math.sqrt((aim - 1.0) / 0.5), rel=1e-6)


def test_budget_takes_the_curve_shape_from_the_previous_decision():
    def shape(a: float) -> float:  # a dip below the base, then a rise: a plain quadratic guess misses it
        return 2.0 - 0.8 * a + 1.4 * a * a

    policy = BudgetPolicy(0.05)
    first = policy.choose(_Curve(shape))
    cold = _Curve(shape)
    assert policy.choose(cold).passes == first.passes  # no prior: the same search again
    warm = _Curve(shape)
    again = policy.choose(warm, previous=first.to_dict())
    assert again.passes == 3 < first.passes  # base, alpha = 1, one fitted guess accepted
    assert shape(again.alpha) <= again.threshold
    assert again.alpha == pytest.approx(max(first.alpha, again.alpha), abs=policy.tolerance)


def test_budget_zero_keeps_the_base_when_every_step_hurts():
    curve = _Curve(lambda a: 1.0 + a)
    decision = BudgetPolicy(0.0).choose(curve)
    assert decision.alpha == 0.0 and decision.loss == 1.0 and decision.passes <= 6


def test_budget_refuses_non_finite_losses_and_missing_evaluate():
    with pytest.raises(NonFiniteError, match="alpha=1"):
        BudgetPolicy(0.1).choose(lambda a: float("nan") if a == 1.0 else 1.0)
    with pytest.raises(UsageError, match="evaluate"):
        BudgetPolicy(0.1).choose(None)


@pytest.mark.parametrize(
    "kwargs", [{"drift_budget": -0.1}, {"drift_budget": float("inf")}, {"tolerance": 0}, {"max_passes": 1}]
)
def test_budget_options_are_validated(kwargs):
    with pytest.raises(UsageError):
        BudgetPolicy(**{"drift_budget": 0.1, **kwargs})


def test_get_policy_by_name_and_errors():
    assert isinstance(get_policy("fixed", alpha=0.2), FixedPolicy)
    budget = get_policy("budget", drift_budget=0.03)
    assert isinstance(budget, BudgetPolicy) and budget.drift_budget == 0.03
    assert get_policy(budget) is budget
    with pytest.raises(UsageError, match="fixed, cocktail, budget"):
        get_policy("greedy")
    cocktail = get_policy("cocktail", alpha=0.7, temperature=2.0)
    assert isinstance(cocktail, CocktailPolicy) and cocktail.to_dict() == {
        "name": "cocktail",
        "alpha": 0.7,
        "temperature": 2.0,
    }
    with pytest.raises(UsageError, match="alpha"):
        get_policy("fixed", alpha=2)
    with pytest.raises(UsageError, match="bad options"):
        get_policy("fixed", drift_budget=0.1)


def test_cocktail_weights_are_the_reference_softmax_of_the_ingredient_losses():
    import torch

    losses = [2.0, 1.5, 3.0]  # base, peer 1, peer 2
    calls = []

    def ingredient_losses():
        calls.append(1)
        return losses

    decision = CocktailPolicy(0.6, temperature=0.5).choose(None, ingredient_losses=ingredient_losses)
    reference = torch.softmax(-torch.FloatTensor(losses) / 0.5, -1).tolist()  # LM_Cocktail's formula
    assert decision.weights == tuple(reference) and decision.alpha == 0.6
    assert decision.weights[1] > decision.weights[0] > decision.weights[2]  # lowest loss, largest weight
    assert decision.ingredient_losses == (2.0, 1.5, 3.0) and decision.passes == 0 and len(calls) == 1
    assert decision.to_dict()["weights"] == pytest.approx(reference)
    default = CocktailPolicy().choose(None, ingredient_losses=losses)
    assert max(default.weights) - min(default.weights) < 0.2  # tau = 5 flattens them, as in the reference


def test_cocktail_needs_losses_and_a_positive_temperature():
    with pytest.raises(UsageError, match="ingredient_losses"):
        CocktailPolicy().choose(None)
    with pytest.raises(UsageError, match="temperature"):
        CocktailPolicy(temperature=0.0)
    with pytest.raises(NonFiniteError, match="peer 1"):
        CocktailPolicy().choose(None, ingredient_losses=[1.0, float("nan")])
    with pytest.raises(UsageError, match="alpha"):
        CocktailPolicy(alpha=-1)


def test_fixed_weights_are_checked_and_returned():
    decision = FixedPolicy(0.5, weights=[0.25, 0.75]).choose(None)
    assert decision.weights == (0.25, 0.75)
    assert FixedPolicy(0.5).choose(None).weights is None
    with pytest.raises(UsageError, match="sum to"):
        FixedPolicy(weights=[0.5, 0.6])
    assert BudgetPolicy(0.1).choose(lambda a: 1.0, ingredient_losses=[1.0]).weights is None  # ignored
