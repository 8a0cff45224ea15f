"""The tags users see: with ``report_to=["tensorboard"]`` the decision metrics appear as ``train/cocktail/<name>`` (the
Trainer prefixes keys that are not eval metrics with ``train/``) and the evaluation-time ones as
``eval/cocktail_<name>``; both read back from the event files TensorBoard wrote (transformers 5 takes the folder from
``TENSORBOARD_LOGGING_DIR``)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from resilient_tune import CocktailCallback  # noqa: E402

from ._tiny import token_examples  # noqa: E402
from .test_hf_callback import _args, _model  # noqa: E402


def test_tensorboard_tags(tmp_path, monkeypatch):
    logs = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logs))
    callback = CocktailCallback(policy="budget", general_data=token_examples(16, 2, False))
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path / "run", report_to=["tensorboard"]), train_dataset=token_examples(32, 0, True),
        eval_dataset=token_examples(8, 1, True), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    tags = set()
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = event_accumulator.EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for name in ("alpha", "general_loss", "general_loss_base", "general_kl", "drift_norm", "probe_passes"):
        assert f"train/cocktail/{name}" in tags, sorted(tags)
        assert f"eval/cocktail_{name}" in tags, sorted(tags)
    assert [h["step"] for h in callback.history] == [2, 4]
