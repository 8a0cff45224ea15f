"""End to end: ``CocktailCallback`` in TRL's ``SFTTrainer`` (full fine-tuning and ``peft_config``) and ``DPOTrainer``,
on a tiny GPT-2 pre-trained in the test on general sentences, fine-tuned on code lines or preferences.

What must hold: ``general_data`` in any format ``SFTTrainer`` takes (``{"text"}``, prompt/completion, chat
``messages``) is tokenized with the trainer's tokenizer and scored as the token NLL of the text; every resilient folder
loads with ``from_pretrained`` and holds θ₀ + α·(θ − θ₀); under ``DPOTrainer`` the probe is the general text's NLL,
not the DPO loss (ln 2 for any data at step 0), so the budget policy reacts to real forgetting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from _lm import code_lines, gpt2, pretrain, sentences, tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from resilient_tune import CocktailCallback  # noqa: E402
from resilient_tune.errors import UsageError  # noqa: E402
from resilient_tune.probe_data import lm_examples, pad_lm_batch  # noqa: E402

TOK = tokenizer()
GENERAL_TEXT = sentences(16, offset=100)  # held out from the pre-training sentences' order


def _general(fmt: str) -> list:
    if fmt == "text":
        return [{"text": s} for s in GENERAL_TEXT]
    if fmt == "strings":
        return list(GENERAL_TEXT)
    if fmt == "prompt-completion":
        return [{"prompt": "question :", "completion": " " + s} for s in GENERAL_TEXT]
    return [
        {"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": s}]}
        for s in GENERAL_TEXT
    ]


def _base() -> torch.nn.Module:
    return pretrain(gpt2(TOK), TOK)


def _sft_args(out: Path, **kw) -> trl.SFTConfig:
    options = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=8, save_steps=2,
        eval_strategy="steps", eval_steps=2, bf16=False, use_cpu=True, report_to=[], learning_rate=1e-2,
        max_length=32, logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    options.update(kw)
    return trl.SFTConfig(**options)


def _nll_by_hand(model: torch.nn.Module, texts: list[str]) -> float:
    """Mean over batches of 8 of the token NLL of ``text + eos`` (every token scored)."""
    losses = []
    with torch.no_grad():
        for i in range(0, len(texts), 8):
            ids = [TOK(t)["input_ids"] + [TOK.eos_token_id] for t in texts[i : i + 8]]
            width = max(map(len, ids))
            input_ids = torch.tensor([r + [TOK.pad_token_id] * (width - len(r)) for r in ids])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
            labels = input_ids.masked_fill(mask == 0, -100)
            losses.append(float(model.eval()(input_ids=input_ids, attention_mask=mask, labels=labels).loss))
    return sum(losses) / len(losses)


def _assert_mix(folder: Path, base: dict, tuned: dict) -> float:
    alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
    written = load_file(str(folder / "model.safetensors"))
    for key, value in written.items():
        if key in base:
            torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.n_layer == 2
    return alpha


@pytest.mark.parametrize("fmt", ["text", "strings", "prompt-completion", "messages"])
def test_sft_probes_general_text_in_the_trainers_formats(tmp_path, fmt):
    model = _base()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_nll = _nll_by_hand(model, GENERAL_TEXT)
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=_general(fmt))
    train = datasets.Dataset.from_dict({"text": code_lines(32)})
    trainer = trl.SFTTrainer(
        model=model, args=_sft_args(tmp_path), train_dataset=train, eval_dataset=train.select(range(8)),
        processing_class=TOK, callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    history = callback.history
    assert [h["step"] for h in history] == [2, 4]
    if fmt in ("text", "strings"):  # the probe is the NLL of the text under the model, every token scored
        assert history[0]["general_loss_base"] == pytest.approx(base_nll, rel=1e-5)
    assert "general_kl" in history[0]  # KL to the base on the same tokens (at α = 1: where it was measured)
    assert all("general_kl_merged" in h for h in history)
    assert all(h["general_loss"] <= h["general_loss_base"] * 1.05 + 1e-6 for h in history)
    tuned = {k: v.detach() for k, v in model.state_dict().items()}
    assert _assert_mix(tmp_path / "resilient", theta0, tuned) == pytest.approx(history[-1]["alpha"])
    step2 = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    _assert_mix(tmp_path / "checkpoint-2" / "resilient", theta0, {**tuned, **step2})


def test_sft_with_a_peft_config_writes_the_merged_model_and_the_scaled_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0
    )
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=_general("text"))
    train = datasets.Dataset.from_dict({"text": code_lines(32)})
    trainer = trl.SFTTrainer(
        model=_base(), args=_sft_args(tmp_path), train_dataset=train, eval_dataset=train.select(range(8)),
        processing_class=TOK, peft_config=lora, callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    assert [h["snapshot_bytes"] for h in callback.history] == [0, 0]  # LoRA: no copy of θ₀
    folder = tmp_path / "resilient"
    doc = json.loads((folder / "cocktail.json").read_text())
    assert doc["peft"]["lora_alpha_scaled"] == pytest.approx(8 * doc["alpha"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(folder)
    scaled = peft.PeftModel.from_pretrained(_base(), folder / "adapter").merge_and_unload()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, scaled.state_dict()[key], rtol=0, atol=1e-5)


def _preferences(n: int) -> datasets.Dataset:
    """Prefer code lines to English answers: what DPO pushes the model towards (and away from general text)."""
    code = code_lines(n)
    return datasets.Dataset.from_dict(
        {"prompt": [f"q{i % 8}" for i in range(n)], "chosen": [" " + c for c in code],
         "rejected": [" " + s for s in sentences(n, offset=3)]}
    )  # fmt: skip


def _dpo(out: Path, make_callback) -> CocktailCallback:
    args = trl.DPOConfig(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        eval_strategy="steps", eval_steps=3, save_strategy="no", bf16=False, use_cpu=True, report_to=[],
        learning_rate=5e-3, beta=0.1, max_length=32, logging_steps=100, disable_tqdm=True, seed=0,
    )  # fmt: skip
    prefs = _preferences(48)
    trainer = trl.DPOTrainer(
        model=_base(), ref_model=_base(), args=args, train_dataset=prefs, eval_dataset=prefs.select(range(8)),
        processing_class=TOK,
    )  # fmt: skip
    callback = make_callback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    return callback


def test_dpo_probes_measure_forgetting_not_preference_fit(tmp_path):
    callback = _dpo(
        tmp_path / "lm",
        lambda _: CocktailCallback(policy="budget", drift_budget=0.05, general_data=_general("text")),
    )
    first, last = callback.history[0], callback.history[-1]
    assert last["general_loss_base"] == pytest.approx(_nll_by_hand(_base(), GENERAL_TEXT), rel=1e-5)
    # DPO made general text less likely (the first decision measures the fine-tuned model; a warm one may skip it)
    assert first["general_loss_finetuned"] > 1.05 * first["general_loss_base"]
    assert last["alpha"] < 1.0  # ...so the budget policy pulls back towards the base
    assert last["general_loss"] <= 1.05 * last["general_loss_base"] + 1e-6
    # the trainer's own loss as the probe (what the callback did before, with preference data prepared by the trainer):
    # the DPO loss of the base is ln 2 on any data, and preference progress "improves" it: the policy keeps α = 1
    dpo_loss = _dpo(
        tmp_path / "training",
        lambda trainer: CocktailCallback(
            policy="budget", drift_budget=0.05, general_data=trainer.eval_dataset, probe_loss="training"
        ),
    )
    assert dpo_loss.history[0]["general_loss_base"] == pytest.approx(math.log(2), abs=1e-4)
    assert dpo_loss.history[-1]["alpha"] == 1.0


def test_probe_data_errors_name_the_formats(tmp_path):
    with pytest.raises(UsageError, match="probe_loss="):
        CocktailCallback(probe_loss="nll")
    with pytest.raises(UsageError, match="dict of tokenized fields"):
        CocktailCallback(general_data=[1, 2, 3])
    callback = CocktailCallback(policy="budget", general_data=[{"question": "x", "answer": "y"}])
    train = datasets.Dataset.from_dict({"text": code_lines(16)})
    trainer = trl.SFTTrainer(
        model=gpt2(TOK), args=_sft_args(tmp_path, max_steps=1, eval_strategy="no"), train_dataset=train, processing_class=TOK,
        callbacks=[callback],
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"'prompt', 'completion'.*'messages'"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before the first step


def test_the_probe_batches_are_the_ones_lm_examples_builds():
    """The same tokenization as :func:`resilient_tune.probe_data.lm_examples` documents (a unit-level anchor)."""
    rows = lm_examples(GENERAL_TEXT[:2], TOK)
    batch = pad_lm_batch(rows, TOK.pad_token_id)
    assert batch["input_ids"][0].tolist()[: len(rows[0]["input_ids"])] == TOK(GENERAL_TEXT[0])[
        "input_ids"
    ] + [TOK.eos_token_id]
