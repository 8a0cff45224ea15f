"""A budget in the user's own metric: ``BudgetPolicy(metric=fn, metric_drop= | metric_floor=)`` searches the largest α
whose higher-is-better metric stays within the bound, on synthetic curves (hand-computed optima) and in a session and a
Trainer run on a tiny GPT-2 (the metric measured on the candidate mixes, the base's once, every refusal named)."""

from __future__ import annotations

import math

import pytest
import torch

from resilient_tune.errors import NonFiniteError, UsageError
from resilient_tune.policy import BudgetPolicy

transformers = pytest.importorskip("transformers")

from _counting import (  # noqa: E402  (tests/ on sys.path)
    COUNTING,
    PATTERN,
    pattern_trainer,
    pretrained_counter,
    tiny_gpt2,
    train_on,
)

from resilient_tune import Cocktail, CocktailCallback  # noqa: E402


def _recall(alpha: float) -> float:
    """A metric falling quadratically from 0.8 at the base to 0.5 at the fine-tuned model."""
    return 0.8 - 0.3 * alpha * alpha


def _unused(model: object) -> float:  # the policy never calls the metric itself: the session does
    raise AssertionError("called")


@pytest.mark.parametrize(
    ("options", "floor"),
    [
        ({"metric_drop": 0.05}, 0.75),  # absolute: 5 points of a metric in [0, 1]
        ({"metric_drop": 0.1, "relative": True}, 0.72),  # 10% of the base's 0.8
        ({"metric_floor": 0.77}, 0.77),
    ],
)
def test_the_largest_alpha_within_the_metric_bound(options: dict, floor: float) -> None:
    policy = BudgetPolicy(metric=_unused, **options)
    decision = policy.choose(_recall)
    best = math.sqrt((0.8 - floor) / 0.3)  # where the metric meets the bound
    assert decision.quantity == "metric" and decision.loss is None and decision.threshold is None
    assert decision.metric_floor == pytest.approx(floor)
    assert decision.base_metric == pytest.approx(0.8)
    assert decision.metric == pytest.approx(_recall(decision.alpha)) and decision.metric >= floor
    assert best - policy.tolerance <= decision.alpha <= best
    assert [m for _, m in decision.evaluated] == pytest.approx([_recall(a) for a, _ in decision.evaluated])
    record = decision.to_dict()
    assert record["quantity"] == "metric" and record["metric_floor"] == pytest.approx(floor)


def test_within_budget_at_the_fine_tuned_model_keeps_it_and_loss_decisions_keep_their_keys() -> None:
    decision = BudgetPolicy(metric=_unused, metric_drop=0.5).choose(_recall)
    assert decision.alpha == 1.0 and decision.passes == 2
    loss = BudgetPolicy(0.05).choose(lambda a: 1.0 + a * a)
    assert "quantity" not in loss.to_dict() and loss.quantity == "loss"


def test_a_previous_decision_on_the_metric_shapes_the_next_guess_and_a_loss_one_does_not() -> None:
    policy = BudgetPolicy(metric=_unused, metric_drop=0.05)
    first = policy.choose(_recall)
    again = policy.choose(_recall, previous=first.to_dict())
    assert again.alpha == pytest.approx(first.alpha, abs=policy.tolerance)
    assert again.passes <= first.passes  # the curve's shape is known: no more guesses than the first time
    from resilient_tune.policy._search import prior_shape

    assert prior_shape(BudgetPolicy(0.05).choose(lambda a: 1.0 + a * a).to_dict(), -1.0) == 0.0


def test_the_base_failing_the_floor_and_a_nan_metric_are_refused() -> None:
    with pytest.raises(UsageError, match=r"base scores 0\.8 on the metric, below metric_floor=0\.9"):
        BudgetPolicy(metric=_unused, metric_floor=0.9).choose(_recall)
    with pytest.raises(NonFiniteError, match="metric at alpha=1 is nan"):
        BudgetPolicy(metric=_unused, metric_drop=0.01).choose(lambda a: 0.8 if a == 0 else float("nan"))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"metric_drop": 0.01}, "no metric was given; pass metric=fn"),
        ({"metric_floor": 0.5}, "no metric was given"),
        ({"relative": True}, "relative=True applies to metric_drop"),
        ({"metric": _unused}, "needs exactly one bound"),
        ({"metric": _unused, "metric_drop": 0.01, "metric_floor": 0.5}, "needs exactly one bound"),
        ({"metric": _unused, "metric_drop": -0.01}, "metric_drop=-0.01 must be >= 0"),
        ({"metric": _unused, "metric_drop": float("nan")}, "metric_drop=nan must be a finite number"),
        ({"metric": _unused, "metric_floor": 0.5, "relative": True}, "not metric_floor"),
        ({"metric": "recall", "metric_drop": 0.01}, "metric='recall' must be callable"),
        ({"metric": _unused, "metric_drop": 0.01, "relative": "yes"}, "relative='yes' must be True or False"),
    ],
)
def test_bad_metric_budgets_name_the_value_and_the_fix(options: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        BudgetPolicy(**options)


# --- in a session and a Trainer ---------------------------------------------------------------------------------

GENERAL = COUNTING  # the general skill the base learned


class Accuracy:
    """Next-token accuracy on general text, counting its calls and checking it runs in eval mode without gradients."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> float:
        assert not model.training and not torch.is_grad_enabled()
        self.calls += 1
        logits = model(input_ids=GENERAL).logits[:, :-1]
        return float((logits.argmax(-1) == GENERAL[:, 1:]).float().mean())


def _train_towards_a_pattern(model: torch.nn.Module, steps: int = 6) -> None:
    train_on(model, PATTERN, steps, 3e-2)


def test_a_session_bounds_the_metric_without_general_data(tmp_path) -> None:
    metric = Accuracy()
    session = Cocktail(policy=BudgetPolicy(metric=metric, metric_drop=0.0))
    model = pretrained_counter()
    session.begin(model)
    assert metric.calls == 1  # the base, measured at begin
    _train_towards_a_pattern(model)
    logged = session.decide(6, model)
    entry = session.last_entry
    decision = entry["decision"]
    assert decision["quantity"] == "metric"
    assert entry["general_metric_base"] == pytest.approx(decision["base_metric"])
    assert entry["general_metric"] >= entry["general_metric_base"]  # a drop of 0 allowed
    assert logged["cocktail/general_metric"] == entry["general_metric"]
    assert entry["general_metric_finetuned"] < entry["general_metric_base"]  # training did forget
    assert decision["alpha"] < 1.0
    # every point the policy evaluated cost one metric pass, except the base (cached since begin)
    assert entry["probe_passes"] == decision["passes"] - 1 == metric.calls - 1
    folder = session.write(model, tmp_path / "resilient")
    assert (folder / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("metric", "needle"),
    [
        (lambda model: float("nan"), "the metric returned nan; return a finite number"),
        (lambda model: "0.5", r"the metric returned '0\.5' \(str\); return one number"),
        (lambda model: torch.ones(2), r"returned tensor\(\[1\., 1\.\]\)"),
    ],
)
def test_a_metric_that_returns_no_number_is_refused_at_begin(metric, needle: str) -> None:
    session = Cocktail(policy=BudgetPolicy(metric=metric, metric_drop=0.01))
    with pytest.raises(UsageError, match=needle):
        session.begin(tiny_gpt2())


def test_a_floor_the_base_fails_is_refused_at_begin() -> None:
    session = Cocktail(policy=BudgetPolicy(metric=lambda model: 0.25, metric_floor=0.3))
    with pytest.raises(UsageError, match=r"base scores 0\.25 on the metric, below metric_floor=0\.3"):
        session.begin(tiny_gpt2())


def test_the_trainer_callback_takes_a_metric_budget(tmp_path) -> None:
    metric = Accuracy()
    callback = CocktailCallback(policy=BudgetPolicy(metric=metric, metric_drop=0.0))
    trainer = pattern_trainer(tmp_path, callback)
    trainer.train()
    history = callback.history
    assert [e["step"] for e in history] == [3, 6]
    assert all(e["decision"]["quantity"] == "metric" for e in history)
    assert all(e["general_metric"] >= e["general_metric_base"] for e in history)
    assert (
        history[0]["general_metric_finetuned"] < history[0]["general_metric_base"]
    )  # first decision: measured
    last = history[-1]  # a warm decision measures α = 1 only where its search needs it
    assert last["decision"].get("finetuned_skipped") != ("general_metric_finetuned" in last)
    assert (tmp_path / "resilient" / "model.safetensors").is_file()
