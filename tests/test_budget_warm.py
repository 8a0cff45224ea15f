"""The budget policy's warm start: from a run's second decision on, the search starts at the previous α moved with the
fine-tune's displacement ``D``, skips ``α = 1`` while the fine-tuned model is known to be over budget, and lands where
a cold search lands, in fewer passes. Checked on two synthetic families that bracket the demos (the loss a function
of ``α·D``, and a curve whose bound stays at one α), on the edges that must fall back to a cold search, and in a
session on a tiny GPT-2."""

from __future__ import annotations

import math

import pytest

from resilient_tune.errors import UsageError
from resilient_tune.policy import BudgetPolicy
from resilient_tune.policy._warm import next_exponent, warm_start

BUDGET = 0.05
DISPLACEMENTS = (1.0, 1.3, 1.6, 2.0, 2.4)


def _by_displacement(d: float):
    """The general loss depends on how far the mix moved, ``α·D`` (the MiniLM demo): the bound at ``α = 0.5 / D``."""
    return lambda a: 1.0 + 0.2 * (a * d) ** 2


def _by_alpha(d: float):
    """The bound stays at ``α = 0.45`` while the fine-tuned model forgets more (the decoder demo)."""
    return lambda a: 1.0 + BUDGET * (a / 0.45) ** (2.0 * d)


def _run(policy: BudgetPolicy, family, displacements=DISPLACEMENTS) -> list:
    decisions, previous = [], None
    for d in displacements:
        decision = policy.choose(family(d), previous=previous, displacement=d)
        decisions.append(decision)
        previous = decision.to_dict()  # what the session hands on (and restores on resume)
    return decisions


def _within(decision, curve) -> None:
    threshold = 1.0 + BUDGET
    accept = threshold - 0.25 * BUDGET
    loss = curve(decision.alpha)
    assert loss <= threshold + 1e-12  # the budget holds on the probes
    assert decision.loss == pytest.approx(loss)
    assert loss >= accept or "largest alpha" in decision.reason


@pytest.mark.parametrize("family", [_by_displacement, _by_alpha], ids=["alpha-times-D", "fixed-alpha"])
def test_warm_decisions_skip_alpha_one_and_land_where_a_cold_search_does(family) -> None:
    warm = _run(BudgetPolicy(BUDGET), family)
    cold = _run(BudgetPolicy(BUDGET, warm=False), family)
    assert not warm[0].finetuned_skipped and (1.0, family(1.0)(1.0)) in warm[0].evaluated
    for d, w, c in zip(DISPLACEMENTS, warm, cold):
        _within(w, family(d))
        _within(c, family(d))
        assert abs(w.alpha - c.alpha) <= 0.05  # the search tolerance
    for w in warm[1:]:
        assert w.finetuned_skipped and all(a != 1.0 for a, _ in w.evaluated)
        assert w.reason.startswith("warm start")
        assert w.to_dict()["finetuned_skipped"] is True
    assert all(c.passes >= 3 for c in cold)  # base, α = 1 and at least one guess, every time
    new_points = [w.passes - 1 for w in warm[1:]]  # the base is cached by the session
    assert sum(new_points) / len(new_points) <= 2.0
    assert sum(w.passes for w in warm) < sum(c.passes for c in cold)


def test_the_exponent_is_learned_from_the_run() -> None:
    by_d = _run(BudgetPolicy(BUDGET), _by_displacement)
    by_a = _run(BudgetPolicy(BUDGET), _by_alpha)
    assert by_d[0].exponent is None and by_d[0].displacement == 1.0
    assert by_d[-1].exponent == pytest.approx(1.0, abs=0.35)  # α·D constant: k = 1
    assert by_a[-1].exponent == pytest.approx(0.0, abs=0.35)  # α constant: k = 0
    assert next_exponent({"alpha": 0.5, "displacement": 1.0}, 0.25, 2.0, None) == pytest.approx(1.0)
    assert next_exponent({"alpha": 0.5, "displacement": 1.0}, 0.9, 2.0, None) == 0.0  # clamped to [0, 2]
    # a small move blends the fresh estimate (1.0) with the carried one (0.0) by how far D moved
    blended = next_exponent({"alpha": 0.5, "displacement": 1.0}, 0.5 / 1.1, 1.1, 0.0)
    assert blended == pytest.approx(math.log(1.1) / math.log(1.3), rel=1e-6)


def test_a_fine_tune_back_within_budget_is_measured_again_and_kept() -> None:
    policy = BudgetPolicy(BUDGET)
    first = policy.choose(_by_displacement(1.0), displacement=1.0)
    assert first.alpha < 1.0
    # the run's next stretch barely hurts the general skill: the fine-tuned model is within budget now
    gentle = lambda a: 1.0 + 0.01 * a  # noqa: E731
    second = policy.choose(gentle, previous=first.to_dict(), displacement=1.2)
    assert second.alpha == 1.0 and not second.finetuned_skipped
    assert "re-measured" in second.reason
    # as soon as a step would climb to α >= 0.9 the fine-tuned model itself is measured, not a point just below it
    assert second.passes <= 4 and all(a < 0.9 or a == 1.0 for a, _ in second.evaluated)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"displacement": 0.5}, "the fine-tune moved back, below the point measured over budget"),
        ({"base": 1.2}, "other probes or another mix: another base loss"),
        ({"displacement": None}, "no displacement passed"),
    ],
)
def test_a_cold_search_where_the_previous_curve_says_nothing(change: dict, why: str) -> None:
    policy = BudgetPolicy(BUDGET)
    first = policy.choose(_by_displacement(1.0), displacement=1.0)
    base = change.get("base", 1.0)
    curve = lambda a: base + 0.2 * base * (a * 1.3) ** 2  # noqa: E731
    second = policy.choose(curve, previous=first.to_dict(), displacement=change.get("displacement", 1.3))
    assert not second.finetuned_skipped, why
    assert 1.0 in [a for a, _ in second.evaluated]


def test_warm_start_needs_a_rising_previous_curve_and_a_policy_of_its_kind() -> None:
    record = BudgetPolicy(BUDGET).choose(_by_displacement(1.0), displacement=1.0).to_dict()
    assert warm_start(record, sign=1.0, displacement=1.3) is not None
    flat = {**record, "evaluated": [(0.0, 1.0), (record["alpha"], 1.01), (1.0, 1.01)]}
    moved = warm_start(flat, sign=1.0, displacement=1.3)  # the slope handed on, steepened as α* moves down
    assert moved.slope == pytest.approx(record["slope"] * 1.3**0.5)
    flat.pop("slope")
    assert warm_start(flat, sign=1.0, displacement=1.3) is None  # nothing rises: no slope to step along
    assert warm_start({**record, "alpha": 1.0}, sign=1.0, displacement=1.3) is None
    fixed = {"policy": "fixed", "alpha": 0.5}
    decision = BudgetPolicy(BUDGET).choose(_by_displacement(1.3), previous=fixed, displacement=1.3)
    assert not decision.finetuned_skipped


def test_warm_start_on_a_metric_budget() -> None:
    policy = BudgetPolicy(metric=lambda model: 0.0, metric_drop=0.05)
    previous = None
    for d in (1.0, 1.4, 1.8):
        recall = lambda a, d=d: 0.8 - 0.2 * (a * d) ** 2  # noqa: E731
        decision = policy.choose(recall, previous=previous, displacement=d)
        assert decision.metric >= 0.75 - 1e-12 and decision.quantity == "metric"
        previous = decision.to_dict()
    assert decision.finetuned_skipped and decision.reason.startswith("warm start")


def test_warm_must_be_a_bool_and_is_recorded() -> None:
    with pytest.raises(UsageError, match="warm='yes' must be True or False"):
        BudgetPolicy(warm="yes")  # type: ignore[arg-type]
    assert BudgetPolicy().to_dict()["warm"] is True and BudgetPolicy(warm=False).to_dict()["warm"] is False


transformers = pytest.importorskip("transformers")

from _counting import COUNTING, PATTERN, examples, pretrained_counter, train_on  # noqa: E402  (tests/ on sys.path)


def _fine_tune_deciding(session, steps: int) -> None:
    """Begin ``session`` on the counting base, train towards the pattern, decide every 3 steps."""
    model = pretrained_counter()
    session.begin(model)
    train_on(model, PATTERN, steps, 1e-2, every=3, on_step=lambda step: session.decide(step, model))


def _session_history(warm: bool) -> list[dict]:
    from resilient_tune import Cocktail

    session = Cocktail(
        policy=BudgetPolicy(BUDGET, warm=warm),
        general_data=examples(COUNTING),
        target_data=examples(PATTERN),
        batch_size=8,
    )
    _fine_tune_deciding(session, 12)
    return session.history


def test_a_session_reports_what_it_measured_and_counts_fewer_passes() -> None:
    warm, cold = _session_history(True), _session_history(False)
    assert [e["step"] for e in warm] == [3, 6, 9, 12]
    assert all(e["alpha"] < 1.0 for e in cold)  # the fine-tune forgets: every decision searches
    for w, c in zip(warm, cold):
        assert w["drift_norm"] == pytest.approx(c["drift_norm"])  # probing leaves training untouched
        assert w["decision"]["displacement"] == pytest.approx(w["drift_norm"])
        skipped = w["decision"].get("finetuned_skipped", False)
        # the fine-tuned model's figures appear exactly where α = 1 was measured
        for key in ("general_loss_finetuned", "target_loss_finetuned", "general_kl"):
            assert (key in w) != skipped, key
        # passes: the policy's new points (the base is cached since begin), target at α (and at 1 unless skipped)
        assert w["probe_passes"] == w["decision"]["passes"] - 1 + (1 if skipped else 2)
        assert w["general_loss"] <= (1 + BUDGET) * w["general_loss_base"] * (1 + 1e-9)
        assert "general_loss_finetuned" in c and c["probe_passes"] == c["decision"]["passes"] - 1 + 2
    assert not warm[0]["decision"].get("finetuned_skipped", False)
    assert any(e["decision"].get("finetuned_skipped") for e in warm[1:])
    assert sum(e["probe_passes"] for e in warm) < sum(e["probe_passes"] for e in cold)


def test_a_loss_budget_that_keeps_little_of_the_fine_tune_says_so_once(caplog) -> None:
    from resilient_tune import Cocktail

    session = Cocktail(policy=BudgetPolicy(0.002), general_data=examples(COUNTING), batch_size=8)
    with caplog.at_level("WARNING", logger="resilient_tune.session"):
        _fine_tune_deciding(session, 9)
    noted = [e for e in session.history if "note" in e]
    assert noted and all(e["alpha"] < 0.2 for e in noted)
    assert "BudgetPolicy(metric=fn, metric_drop=...)" in noted[0]["note"]
    assert "of the fine-tuned model's increase" in noted[0]["note"]
    warnings = [r for r in caplog.records if "the loss budget kept alpha=" in r.getMessage()]
    assert len(warnings) == 1  # once per run, however many decisions repeat it


def test_no_note_where_the_budget_keeps_a_fair_share_or_another_policy_decided() -> None:
    from resilient_tune.policy import Decision
    from resilient_tune.session._decide import strict_budget_note

    entry = {"general_loss_finetuned": 3.0}
    kept = Decision(0.45, 3, "budget", 1.04, 1.0, 1.05, ((0.0, 1.0),), "")
    assert strict_budget_note(kept, entry) is None
    assert strict_budget_note(Decision(0.1, 0, "fixed"), entry) is None
    strict = Decision(0.08, 4, "budget", 1.04, 1.0, 1.06, ((0.0, 1.0),), "")
    note = strict_budget_note(strict, entry)
    assert note is not None and "1 -> 1.06 (3% of the fine-tuned model's increase)" in note
