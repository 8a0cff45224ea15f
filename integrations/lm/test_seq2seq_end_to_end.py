"""End to end: ``CocktailCallback`` in a ``Seq2SeqTrainer`` on T5 and BART built from configs.

What must hold: general text given as prompt/completion (or plain text) is tokenized for the encoder and the decoder,
the KL probe runs over decoder positions (the reference pass keeps the labels that build the decoder's inputs), the
budget policy decides, and every resilient folder loads with ``AutoModelForSeq2SeqLM.from_pretrained`` and holds
θ₀ + α·(θ − θ₀).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _lm import bart, code_lines, sentences, t5, tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from resilient_tune import CocktailCallback  # noqa: E402

TOK = tokenizer()


def _pairs(prompts: list[str], targets: list[str]) -> list[dict[str, list[int]]]:
    return [
        {"input_ids": TOK(p)["input_ids"], "labels": TOK(t)["input_ids"] + [TOK.eos_token_id]}
        for p, t in zip(prompts, targets)
    ]


def _train(out: Path, model: torch.nn.Module, general: list, **kw) -> CocktailCallback:
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=general)
    code = code_lines(32)
    train = _pairs([" ".join(c.split()[:4]) for c in code], code)  # complete a code line from its start
    args = transformers.Seq2SeqTrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        save_steps=2, eval_strategy="steps", eval_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=100, seed=0, **kw,
    )  # fmt: skip
    trainer = transformers.Seq2SeqTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=train[:8], processing_class=TOK,
        data_collator=transformers.DataCollatorForSeq2Seq(TOK, model=model), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    return callback


def _assert_mix(folder: Path, base: dict, tuned: dict) -> float:
    alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
    written = load_file(str(folder / "model.safetensors"))
    for key, value in written.items():
        torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    transformers.AutoModelForSeq2SeqLM.from_pretrained(folder)
    return alpha


@pytest.mark.parametrize("build", [t5, bart], ids=["t5", "bart"])
@pytest.mark.parametrize("fmt", ["prompt-completion", "text"])
def test_seq2seq_probes_with_decoder_masks(tmp_path, build, fmt):
    model = build(TOK)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    text = sentences(16, offset=50)
    general = (
        [{"prompt": " ".join(s.split()[:2]), "completion": s} for s in text]
        if fmt == "prompt-completion"
        else text
    )
    callback = _train(tmp_path, model, general)
    history = callback.history
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["general_kl"] >= 0.0 and all(h["general_kl_merged"] >= 0.0 for h in history)
    assert all(h["general_loss"] <= h["general_loss_base"] * 1.05 + 1e-6 for h in history)
    tuned = {k: v.detach() for k, v in model.state_dict().items()}
    assert _assert_mix(tmp_path / "resilient", theta0, tuned) == pytest.approx(history[-1]["alpha"])
