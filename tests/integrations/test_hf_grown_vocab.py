"""Tokens added before (or during) training: rows the pre-trained base never had take the fine-tuned values in every
resilient checkpoint, recorded in ``cocktail.json``; the rows the base had are mixed as usual."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from resilient_tune import CocktailCallback  # noqa: E402
from resilient_tune.engine import CocktailEngine  # noqa: E402

from .test_hf_callback import _args  # noqa: E402

NEW = ["<tool>", "<result>", "<end_tool>"]


def _examples(tok, n: int) -> list[dict[str, list[int]]]:
    text = "question: what is two plus two? answer: <tool> add 2 2 <result> four <end_tool>"
    ids = tok(text)["input_ids"][:16]
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for _ in range(n)]


def test_rows_added_before_training_take_the_fine_tuned_values(tiny_gpt2_dirs, tmp_path):
    source = tmp_path / "pretrained"
    shutil.copytree(tiny_gpt2_dirs(1)[0], source)
    tok = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    base_rows = model.get_input_embeddings().weight.shape[0]
    tok.add_tokens(NEW)
    model.resize_token_embeddings(len(tok))  # rows for the new tokens, randomly initialised
    grown = model.get_input_embeddings().weight.shape[0]
    assert grown == base_rows + len(NEW)
    theta0 = model.get_input_embeddings().weight.detach().clone()
    callback = CocktailCallback(alpha=0.5)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path / "run", eval_strategy="no", learning_rate=5e-2), train_dataset=_examples(tok, 32),
        processing_class=tok, callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    tuned = model.get_input_embeddings().weight.detach()
    assert not torch.equal(tuned[base_rows:], theta0[base_rows:])  # the new rows were trained
    for folder in (tmp_path / "run" / "checkpoint-4" / "resilient", tmp_path / "run" / "resilient"):
        written = load_file(str(folder / "model.safetensors"))["transformer.wte.weight"]
        if folder.parent.name == "checkpoint-4":
            step = load_file(str(folder.parent / "model.safetensors"))["transformer.wte.weight"]
        else:
            step = tuned
        torch.testing.assert_close(written[:base_rows], 0.5 * theta0[:base_rows] + 0.5 * step[:base_rows])
        torch.testing.assert_close(
            written[base_rows:], step[base_rows:], rtol=0, atol=0
        )  # not half their init
        doc = json.loads((folder / "cocktail.json").read_text())
        assert doc["grown_rows"]["transformer.wte.weight"] == {"base": base_rows, "now": grown}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert (
            loaded.get_input_embeddings().weight.shape[0] == grown
            and len(transformers.AutoTokenizer.from_pretrained(folder)) == grown
        )


def test_rows_added_after_the_snapshot_take_the_fine_tuned_values(tiny_gpt2_dirs, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dirs(1)[0])
    engine = CocktailEngine(0.25)
    engine.begin(model)
    theta0 = model.get_input_embeddings().weight.detach().clone()
    rows = theta0.shape[0]
    model.resize_token_embeddings(rows + 2)  # during training: θ₀ has fewer rows than the live model
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    live = model.get_input_embeddings().weight.detach().clone()
    merged = engine.merged_state_dict(model)["transformer.wte.weight"]
    torch.testing.assert_close(merged[:rows], theta0 + 0.25 * (live[:rows] - theta0))
    assert torch.equal(merged[rows:], live[rows:])
    with engine.swapped(model, 0.25):  # the probes' swap agrees, and the restore is exact
        assert torch.equal(model.get_input_embeddings().weight, merged)
    assert torch.equal(model.get_input_embeddings().weight, live)
    assert engine.grown_rows(model) == {"transformer.wte.weight": {"base": rows, "now": rows + 2}}
