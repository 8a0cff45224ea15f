"""A confidence bound on the general-probe loss: ``BudgetPolicy(confidence=c)`` bounds ``L(α) + z·SE`` of the paired
per-unit increase over the base instead of the mean. Units: per-example losses a ``score_fn`` returns, per-sequence
losses of a language model's own loss, else the batches (hand-computed bounds, a tiny GPT-2 in a session, a resume,
the Trainer callback, every refusal named)."""

from __future__ import annotations

import logging
import math
from statistics import NormalDist

import pytest
import torch

from resilient_tune.errors import NonFiniteError, UsageError
from resilient_tune.policy import BudgetPolicy
from resilient_tune.probe_bound import bounded_loss, loss_value, sequence_losses, z_of

transformers = pytest.importorskip("transformers")

from _counting import (  # noqa: E402  (tests/ on sys.path)
    COUNTING,
    PATTERN,
    examples,
    pattern_trainer,
    pretrained_counter,
    tiny_gpt2,
    train_on,
)

from resilient_tune import Cocktail, CocktailCallback  # noqa: E402


# ---------------------------------------------------------------------------- units and the bound, by hand
def test_a_scalar_is_one_unit_and_a_vector_one_per_example() -> None:
    assert loss_value(torch.tensor(2.5), 0) == (2.5, [2.5])
    assert loss_value(1.5, 0) == (1.5, [1.5])
    loss, units = loss_value(torch.tensor([1.0, 2.0, 4.5]), 0)
    assert loss == pytest.approx(2.5) and units == [1.0, 2.0, 4.5]


@pytest.mark.parametrize(
    ("value", "error", "needle"),
    [
        (
            torch.ones(2, 2),
            UsageError,
            r"probe batch 3: the loss has shape \(2, 2\); return a scalar, or a 1-D",
        ),
        (torch.ones(0), UsageError, r"shape \(0,\)"),
        (torch.tensor([1.0, float("nan")]), NonFiniteError, "probe batch 3: the loss is nan"),
        (float("inf"), NonFiniteError, "the loss is inf"),
    ],
)
def test_bad_losses_are_refused_with_the_batch_named(value, error, needle: str) -> None:
    with pytest.raises(error, match=needle):
        loss_value(value, 3)


def test_the_bound_adds_z_standard_errors_of_the_paired_increase() -> None:
    # increases 0, 1, 2: mean 1, sample sd 1, SE 1/sqrt(3)
    bound, units = bounded_loss(5.0, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], z=1.645)
    assert units == 3
    assert bound == pytest.approx(5.0 + 1.645 / math.sqrt(3))
    # a constant shift has no spread: the bound is the loss itself
    assert bounded_loss(5.0, [2.0, 3.0], [1.0, 2.0], z=2.0)[0] == pytest.approx(5.0)
    assert z_of(0.95) == pytest.approx(NormalDist().inv_cdf(0.95)) == pytest.approx(1.6449, abs=1e-4)


def test_one_unit_bounds_the_mean_and_unpaired_units_are_refused() -> None:
    assert bounded_loss(3.0, [4.0], [1.0], z=1.645) == (3.0, 1)
    with pytest.raises(UsageError, match="scored 2 units but the base's scored 3; the probe batches must be"):
        bounded_loss(3.0, [1.0, 2.0], [1.0, 2.0, 3.0], z=1.645)


def test_per_sequence_losses_reproduce_the_models_own_loss() -> None:
    model = tiny_gpt2().eval().requires_grad_(False)
    ids = COUNTING[:4].clone()
    labels = ids.clone()
    labels[1, 5:] = -100  # a padded row: fewer tokens
    batch = {"input_ids": ids, "labels": labels}
    output = model(**batch)
    per = sequence_losses(model, output, batch, output.loss.item())
    assert per is not None and len(per) == 4
    tokens = torch.tensor([7.0, 4.0, 7.0, 7.0])  # shifted: 7 predicted tokens per row, 4 in the padded one
    assert float((torch.tensor(per) * tokens).sum() / tokens.sum()) == pytest.approx(
        float(output.loss), rel=1e-5
    )
    # a loss that is not the token cross-entropy (scaled): the batch stays one unit
    assert sequence_losses(model, output, batch, 2 * float(output.loss)) is None
    assert sequence_losses(model, output, {"input_ids": ids}, float(output.loss)) is None  # no labels
    half = tiny_gpt2().eval().requires_grad_(False).to(torch.bfloat16)  # the model upcasts its logits for the loss
    output = half(**batch)
    assert sequence_losses(half, output, batch, output.loss.item()) is not None


# ---------------------------------------------------------------------------- the policy's option
@pytest.mark.parametrize("confidence", [0.4, 1.0, True, "0.9", float("nan")])
def test_bad_confidence_is_refused(confidence) -> None:
    with pytest.raises(UsageError, match=r"confidence=.* must be a number in \[0\.5, 1\)"):
        BudgetPolicy(0.05, confidence=confidence)


def test_confidence_is_for_loss_budgets_and_is_recorded() -> None:
    with pytest.raises(UsageError, match="confidence bounds the probe loss; a metric budget"):
        BudgetPolicy(metric=lambda model: 0.5, metric_drop=0.01, confidence=0.9)
    policy = BudgetPolicy(0.05, confidence=0.95)
    assert policy.to_dict()["confidence"] == 0.95
    assert "confidence=0.95" in repr(policy)
    assert "confidence" not in BudgetPolicy(0.05).to_dict()


# ---------------------------------------------------------------------------- in a session
def _decide(confidence: float | None, *, batch_size: int = 4, score_fn=None) -> tuple[Cocktail, dict]:
    session = Cocktail(
        policy=BudgetPolicy(0.05, confidence=confidence, warm=False),
        general_data=examples(COUNTING),
        batch_size=batch_size,
        score_fn=score_fn,
    )
    model = pretrained_counter()
    session.begin(model)
    train_on(model, PATTERN, 6, 3e-2)
    logged = session.decide(6, model)
    if confidence is not None:  # logged beside the mean
        assert logged["cocktail/general_loss_bound"] == session.last_entry["general_loss_bound"]
    return session, session.last_entry


def test_a_bound_keeps_less_than_the_mean_and_honours_the_budget_on_its_bound() -> None:
    _, plain = _decide(None)
    _, bounded = _decide(0.95)
    assert "general_loss_bound" not in plain
    assert bounded["general_loss_units"] == len(COUNTING)  # one unit per probe sequence (the LM's own loss)
    assert bounded["general_loss_bound"] > bounded["general_loss"]
    decision = bounded["decision"]
    # the policy searched on the bound
    assert bounded["general_loss_bound"] == pytest.approx(decision["loss"])
    assert decision["loss"] <= decision["threshold"]
    assert 0.0 < decision["alpha"] < plain["alpha"] < 1.0
    # the bound at the chosen α is above the loss there: a mean-based search could have gone further
    assert bounded["general_loss"] < decision["threshold"]


def test_a_score_fn_returning_per_example_losses_gives_one_unit_per_example() -> None:
    def per_example(model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none"
        )
        return token.view(len(logits), -1).mean(dim=1)

    _, entry = _decide(0.9, batch_size=8, score_fn=per_example)
    assert entry["general_loss_units"] == len(COUNTING)
    assert entry["general_loss_bound"] >= entry["general_loss"]


def test_one_batch_and_a_scalar_score_bound_the_mean_and_say_so(caplog) -> None:
    scalar = lambda model, batch: model(**batch).loss  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="resilient_tune"):
        _, entry = _decide(0.95, batch_size=len(COUNTING), score_fn=scalar)
    assert entry["general_loss_units"] == 1
    assert entry["general_loss_bound"] == pytest.approx(entry["general_loss"])
    assert "probes gave 1 unit: the mean is bounded instead" in entry["note"]
    assert "Let score_fn return per-example losses" in caplog.text


def test_a_resumed_run_measures_the_bases_units_again(tmp_path) -> None:
    def session() -> Cocktail:
        policy = BudgetPolicy(0.05, confidence=0.95, warm=False)
        return Cocktail(policy=policy, general_data=examples(COUNTING), batch_size=4)

    first_run, model = session(), pretrained_counter()
    first_run.begin(model, base_dir=tmp_path)
    first_run.keep_base(tmp_path)  # the base kept beside the checkpoint, as a custom loop does
    train_on(model, PATTERN, 6, 3e-2)
    first_run.decide(6, model)
    first = first_run.last_entry
    resumed = session()
    resumed.load_state_dict(first_run.state_dict())
    resumed.begin(model, step=6, base_dir=tmp_path)  # the checkpoint kept the base's loss, not its units
    assert len(resumed._probes.base_result.units) == first["general_loss_units"]  # measured again at begin
    resumed.decide(7, model)
    again = resumed.last_entry
    assert again["general_loss_units"] == first["general_loss_units"]
    assert again["alpha"] == pytest.approx(first["alpha"])


def test_the_trainer_callback_takes_a_confidence_bound(tmp_path) -> None:
    callback = CocktailCallback(policy=BudgetPolicy(0.05, confidence=0.95), general_data=examples(COUNTING))
    trainer = pattern_trainer(tmp_path, callback, per_device_eval_batch_size=4)
    trainer.train()
    for entry in callback.history:
        assert entry["general_loss_units"] == len(COUNTING)
        assert entry["general_loss_bound"] <= entry["decision"]["threshold"] + 1e-9
    assert (tmp_path / "resilient" / "model.safetensors").is_file()


_TWO_RANKS = """
import json, sys
import torch.distributed as dist
from resilient_tune.probe_bound import bounded_loss

rank, root = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
units, base = ([1.0, 2.0], [1.0, 1.0]) if rank == 0 else ([3.0], [1.0])  # increases 0, 1 | 2
print(json.dumps(bounded_loss(5.0, units, base, z=1.645)), flush=True)
dist.barrier()
from resilient_tune.distributed import close_process_group
close_process_group(exit_code=0)  # past the teardown where gloo can abort
"""


def test_ranks_pool_their_units_into_one_bound(tmp_path) -> None:
    """2 processes over gloo, each with its own probe units: both compute the bound of the pooled increases."""
    from _ranks import run_two_ranks

    for bound, units in run_two_ranks(tmp_path, _TWO_RANKS):
        assert units == 3
        assert bound == pytest.approx(5.0 + 1.645 / math.sqrt(3))
