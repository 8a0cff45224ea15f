"""CocktailCallback inside real transformers.Trainer runs on a tiny GPT-2 built from a config."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from resilient_tune.errors import UsageError  # noqa: E402
from resilient_tune.integrations.transformers import CocktailCallback  # noqa: E402
from resilient_tune.probes import probe_loss  # noqa: E402

from ._tiny import BAD_OPTIONS, state, tiny_gpt2, token_examples  # noqa: E402

_model, _state = tiny_gpt2, state
_examples = token_examples
TRAIN, EVAL, GENERAL = _examples(32, 0, True), _examples(8, 1, True), _examples(16, 2, False)


def _args(out: Path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        save_only_model=False,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _run(out: Path, callback=None, *, eval_dataset=None, model=None, resume=None, **kw):
    model = model or _model()
    trainer = transformers.Trainer(
        model=model,
        args=_args(out, **kw),
        train_dataset=TRAIN,
        eval_dataset=EVAL if eval_dataset is None else eval_dataset,
        callbacks=[callback] if callback is not None else None,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _assert_mix(folder: Path, base: dict, tuned: dict) -> float:
    """The weights in ``folder`` are θ₀ + α(θ − θ₀) with α from its cocktail.json; returns α."""
    alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
    written = load_file(str(folder / "model.safetensors"))
    assert written, folder
    for key, value in written.items():
        torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    return alpha


@pytest.fixture(scope="module")
def zero_config(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    base = _state(_model())
    callback = CocktailCallback()
    trainer = _run(out, callback)
    return out, base, trainer, callback


def test_zero_config_writes_resilient_checkpoints(zero_config):
    out, base, trainer, _ = zero_config
    final = _state(trainer.model)
    assert _assert_mix(out / "resilient", base, final) == 0.5
    step4 = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert _assert_mix(out / "checkpoint-4" / "resilient", base, {**final, **step4}) == 0.5
    step2 = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    step2["lm_head.weight"] = step2["transformer.wte.weight"]  # tied, saved once
    _assert_mix(out / "checkpoint-2" / "resilient", base, step2)
    doc = json.loads((out / "checkpoint-2" / "resilient" / "cocktail.json").read_text())
    assert doc["step"] == 2 and doc["recipe"]["weights"] == [0.5, 0.5]
    assert doc["probes"]["drift_norm"] > 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "resilient")
    mixed = {k: base[k] + 0.5 * (final[k] - base[k]) for k in base}
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, mixed[key], rtol=0, atol=1e-6)


def test_zero_config_logs_once_per_evaluation_and_reports(zero_config):
    out, _, trainer, _ = zero_config
    logged = [e for e in trainer.state.log_history if "cocktail/alpha" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert all(e["cocktail/alpha"] == 0.5 and e["cocktail/drift_norm"] > 0 for e in logged)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 2
    report = json.loads((out / "cocktail_report.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 4]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "cocktail_report.png").read_bytes()[:4] == b"\x89PNG"
    assert report["final"]["alpha"] == 0.5
    assert report["snapshot"]["resident_bytes"] == sum(p.numel() * 4 for p in trainer.model.parameters())
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    stored = saved["stateful_callbacks"]["CocktailCallback"]["attributes"]["_resume_state"]
    assert [h["step"] for h in stored["history"]] == [2, 4]  # the state already holds this save's decision
    assert Path(stored["snapshot"]["folder"]) == (out / "resilient_base").resolve()


def test_probing_leaves_training_bit_exact(tmp_path):
    plain = _run(tmp_path / "plain", None)
    callback = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL, target_data=EVAL)
    probed = _run(tmp_path / "probed", callback)
    assert sum(e["probe_passes"] for e in callback.history) > 2  # candidates were swapped in
    for key, value in _state(plain.model).items():
        assert torch.equal(value, probed.model.state_dict()[key]), key


def test_budget_keeps_the_written_model_within_budget(tmp_path):
    base_model = _model()
    batches = [transformers.default_data_collator(GENERAL[i : i + 8]) for i in range(0, len(GENERAL), 8)]
    base_loss = probe_loss(base_model, batches)
    callback = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL)
    trainer = _run(tmp_path, callback, metric_for_best_model="cocktail_general_loss", greater_is_better=False)
    final = callback.history[-1]
    # the fine-tuned model's figures: where a decision measured α = 1 (a warm budget search may skip it)
    tuned = [h for h in callback.history if "general_loss_finetuned" in h]
    assert final["general_loss_base"] == pytest.approx(base_loss, rel=1e-5)
    assert tuned[-1]["general_loss_finetuned"] > 1.02 * base_loss  # fine-tuning hurt the general data...
    assert 0 < final["alpha"] < 1  # ...so the budget bound bites
    assert final["probe_passes"] <= 6 and tuned[-1]["general_kl"] > 0 and final["general_kl_merged"] > 0
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resilient")
    assert probe_loss(written, batches) <= 1.02 * base_loss * (1 + 1e-6)
    alpha = json.loads((tmp_path / "resilient" / "cocktail.json").read_text())["alpha"]
    assert alpha == final["alpha"]
    # the metrics were offered to metric_for_best_model
    assert trainer.state.best_metric == pytest.approx(min(h["general_loss"] for h in callback.history))


def test_several_eval_datasets_decide_once_per_evaluation(tmp_path):
    callback = CocktailCallback(policy="budget", general_data={"random": GENERAL})
    trainer = _run(tmp_path, callback, eval_dataset={"a": EVAL, "b": EVAL[:4]}, save_strategy="no")
    assert [h["step"] for h in callback.history] == [2, 4]
    logged = [e for e in trainer.state.log_history if "cocktail/alpha" in e]
    assert len(logged) == 2
    assert not (tmp_path / "resilient_base").exists()  # no checkpoints: nothing to resume from


def test_resume_reloads_the_base_and_continues_the_history(tmp_path):
    full = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL)
    _run(tmp_path / "full", full)
    run = tmp_path / "resumed"
    (run).mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", run / "checkpoint-2")
    shutil.copytree(tmp_path / "full" / "resilient_base", run / "resilient_base")
    shutil.rmtree(tmp_path / "full" / "resilient_base")  # the state's path is gone: the moved copy is used
    resumed = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL)
    trainer = _run(run, resumed, resume=str(run / "checkpoint-2"))
    assert [h["step"] for h in resumed.history] == [2, 4]
    for a, b in zip(resumed.history, full.history):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
        assert a["general_loss_base"] == pytest.approx(b["general_loss_base"], rel=1e-6)
    base = _state(_model())
    _assert_mix(run / "resilient", base, _state(trainer.model))


def test_resume_without_callback_state_is_refused(tmp_path):
    _run(tmp_path, None)
    with pytest.raises(UsageError, match="not the base"):
        _run(tmp_path, CocktailCallback(), resume=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        *BAD_OPTIONS,
        ({"general_data": [1, 2, 3]}, UsageError, "dict of tokenized fields"),
        ({"general_data": "text"}, UsageError, "pass a dataset"),
    ],
)
def test_bad_input_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CocktailCallback(**kwargs)


@pytest.mark.parametrize(
    ("general", "match"),
    [
        ([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [1], "labels": [1]}], "cannot batch"),
        ([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}] * 4, "labels"),
    ],
)
def test_malformed_probe_data_fails_at_train_begin(tmp_path, general, match):
    """Probe data the Trainer's collator cannot batch, or that gives the model no loss, stops the run before its
    first step (the base's probe pass is made at train begin)."""
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path), train_dataset=TRAIN, eval_dataset=EVAL,
        callbacks=[CocktailCallback(policy="budget", general_data=general)],
    )  # fmt: skip
    with pytest.raises(UsageError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0


def test_restored_callback_objects_keep_their_configuration(tmp_path):
    full = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL)
    _run(tmp_path, full)
    user = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL)
    trainer = _run(
        tmp_path, user, resume=str(tmp_path / "checkpoint-2"), restore_callback_states_from_checkpoint=True
    )
    (restored,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CocktailCallback)]
    assert restored is not user  # the Trainer rebuilt it from the checkpoint's state...
    # ...with our configuration: the replaced callback's session (policy, probe data)
    assert restored.session is user.session
    assert (
        restored.session.policy is user.session.policy
        and restored.session.general_data is user.session.general_data
    )
    assert [h["alpha"] for h in restored.history] == pytest.approx(
        [h["alpha"] for h in full.history], abs=1e-6
    )


def test_custom_compute_loss_scores_the_probes(tmp_path):
    calls = []

    class ScaledLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(model.training)
            outputs = model(**inputs)
            loss = outputs.loss * 10.0
            return (loss, outputs) if return_outputs else loss

    callback = CocktailCallback(general_data=GENERAL)
    trainer = ScaledLossTrainer(
        model=_model(), args=_args(tmp_path, save_strategy="no"), train_dataset=TRAIN, eval_dataset=EVAL,
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    batches = [transformers.default_data_collator(GENERAL[i : i + 8]) for i in range(0, len(GENERAL), 8)]
    base_loss = probe_loss(_model(), batches)
    assert callback.history[0]["general_loss_base"] == pytest.approx(10.0 * base_loss, rel=1e-5)
    assert False in calls  # probes ran in eval mode through the Trainer's own compute_loss
    assert "general_kl" not in callback.history[0]  # a custom objective has no logits to compare


def test_resilient_folders_rotate_with_their_checkpoints(tmp_path):
    _run(tmp_path, CocktailCallback(), max_steps=6, save_total_limit=1, eval_strategy="no")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (tmp_path / "checkpoint-6" / "resilient" / "model.safetensors").is_file()
    doc = json.loads((tmp_path / "checkpoint-6" / "resilient" / "cocktail.json").read_text())
    assert doc["step"] == 6  # decided at the save itself (no evaluation in this run)


def test_snapshot_on_disk_and_half_precision(tmp_path):
    disk = CocktailCallback(snapshot_on_disk=True)
    trainer = _run(tmp_path / "disk", disk, save_strategy="no")
    assert disk.engine.snapshot.storage == "disk" and disk.engine.snapshot.nbytes == 0
    base = _state(_model())
    _assert_mix(tmp_path / "disk" / "resilient", base, _state(trainer.model))
    half = CocktailCallback(snapshot_dtype="bf16")
    _run(tmp_path / "half", half, save_strategy="no")
    assert half.history[-1]["snapshot_bytes"] * 2 == disk.engine.snapshot.stored_bytes


def test_missing_matplotlib_only_warns(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.warns(UserWarning, match=r"resilient-tune\[demo\]"):
        _run(tmp_path, CocktailCallback(), save_strategy="no", max_steps=2)
    assert (tmp_path / "cocktail_report.json").is_file() and not (tmp_path / "cocktail_report.png").exists()


def test_missing_transformers_names_the_extra(monkeypatch):
    import resilient_tune.integrations.transformers as module

    monkeypatch.setattr(module, "_IMPORT_ERROR", ImportError("No module named 'transformers'"))
    with pytest.raises(ImportError, match=r"pip install 'resilient-tune\[hf\]'"):
        CocktailCallback()
