"""The decoder demo's pieces (synthetic tasks, tokenizer, collator, exact match) and a whole run on tiny settings."""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from resilient_tune.cli import main  # noqa: E402
from resilient_tune.demo import run_demo  # noqa: E402
from resilient_tune.demo.decoder import (  # noqa: E402
    DecoderConfig,
    LMCollator,
    answer,
    char_tokenizer,
    exact_match_hits,
    make_examples,
    run_decoder,
)
from resilient_tune.errors import UsageError  # noqa: E402

TINY = dict(
    steps=4,
    batch_size=8,
    pretrain_steps=6,
    pretrain_batch_size=16,
    decisions=2,
    probe_examples=6,
    test_examples=12,
    n_layer=1,
    n_embd=32,
    curve=(0.25,),
    eval_batch_size=16,
)


def test_answers_of_each_task():
    assert [answer(t, "dcab") for t in "CRS"] == ["dcab", "bacd", "abcd"]
    assert answer("H", "abp") == "bca"  # p wraps to a
    with pytest.raises(UsageError, match="unknown task 'X'"):
        answer("X", "ab")


def test_tokenizer_is_one_token_per_character_and_round_trips(tmp_path):
    tok = char_tokenizer()
    ids = tok("R:dcab=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "R:dcab="
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again("R:dcab=", add_special_tokens=False)["input_ids"] == ids


def test_examples_mask_the_prompt_and_end_with_eos():
    tok = char_tokenizer()
    cfg = DecoderConfig(min_length=3, max_length=5)
    examples = make_examples(["R", "S"], 10, random.Random(0), tok, cfg)
    assert [e["prompt"][0] for e in examples[:4]] == ["R", "S", "R", "S"]
    for e in examples:
        prompt, text = e["prompt"], e["prompt"][2:-1]
        n = len(prompt)
        assert e["labels"][:n] == [-100] * n
        assert tok.decode(e["labels"][n:-1]) == answer(prompt[0], text)
        assert e["labels"][-1] == tok.eos_token_id and e["input_ids"][n:] == e["labels"][n:]
    seen = {examples[0]["prompt"]}
    again = make_examples(["R", "S"], 10, random.Random(0), tok, cfg, exclude=seen)
    assert seen.isdisjoint(e["prompt"] for e in again)


def test_collator_pads_right():
    batch = LMCollator(pad_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


class _Oracle(torch.nn.Module):
    """Predicts token ``t + 1`` after token ``t`` (so only sequences counting up by one are exact matches)."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot((input_ids + 1) % 20, 20).float()
        return transformers.modeling_outputs.CausalLMOutput(logits=logits)


def test_exact_match_is_greedy_decoding_of_the_answer():
    examples = [
        {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]},  # every answer token is the predicted one
        {"input_ids": [3, 4, 5, 9], "labels": [-100, -100, 5, 9]},  # last token wrong
        {"input_ids": [3, 9, 10], "labels": [-100, -100, 10]},  # prompt tokens never count
    ]
    assert exact_match_hits(_Oracle(), examples, pad_id=0, batch_size=2) == [True, False, True]


def test_config_validation():
    with pytest.raises(UsageError, match="steps=0"):
        DecoderConfig(steps=0)
    with pytest.raises(UsageError, match="max_length=2"):
        DecoderConfig(min_length=3, max_length=2)
    with pytest.raises(UsageError, match="multiple of n_head"):
        DecoderConfig(n_embd=30, n_head=4)
    with pytest.raises(UsageError, match=r"alpha 1\.5"):
        DecoderConfig(curve=(1.5,))
    with pytest.raises(UsageError, match=r"drift_budget=nan must be a number >= 0"):
        DecoderConfig(drift_budget=float("nan"))
    with pytest.raises(UsageError, match=r"max_passes=1 must be an int >= 2"):
        DecoderConfig(max_passes=1)
    with pytest.raises(UsageError, match="unknown option"):
        run_demo("unused", "decoder", nonsense=1)


def test_whole_run_on_tiny_settings(tmp_path, capsys):
    out = tmp_path / "run"
    lines: list[str] = []
    report = run_decoder(out, DecoderConfig(**TINY), echo=lines.append)

    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["scenario"] == "decoder" and report["score_name"] == "exact match"
    assert report["data"]["synthetic"] is True and any("SYNTHETIC" in line for line in lines)
    models = report["models"]
    assert set(models) == {"base", "fine_tuned", "resilient", "static"}
    for row in models.values():
        assert 0.0 <= row["target"] <= 1.0 and 0.0 <= row["general"] <= 1.0
    alpha = report["alpha"]
    assert 0.0 <= alpha <= 1.0 and models["static"]["alpha"] == 0.5
    assert report["history"] and report["history"][-1]["alpha"] == alpha

    # the checkpoints load with from_pretrained; resilient = θ₀ + α·(θ − θ₀) of base/ and fine-tuned/
    resilient = transformers.AutoModelForCausalLM.from_pretrained(out / "resilient")
    assert isinstance(resilient, transformers.GPT2LMHeadModel)
    transformers.AutoTokenizer.from_pretrained(out / "resilient")
    base = load_file(str(out / "base" / "model.safetensors"))
    tuned = load_file(str(out / "fine-tuned" / "model.safetensors"))
    written = load_file(str(out / "resilient" / "model.safetensors"))
    for key, value in written.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    assert json.loads((out / "resilient" / "cocktail.json").read_text())["alpha"] == pytest.approx(alpha)

    # the base's scores are what the saved base gets on the same test sets
    fresh = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
    assert (fresh.config.n_layer, fresh.config.n_embd) == (1, 32)
    assert report["hits"]["base"]["general"].count("1") == round(models["base"]["general"] * 36)
    assert report["data"]["sizes"]["general_test"] == 36 and report["data"]["sizes"]["target_test"] == 12

    curve = {point["alpha"]: point for point in report["curve"]}
    assert {0.0, 0.25, 0.5, 1.0, alpha} <= set(curve)

    # a second run can start from the saved base (no pre-training): same base scores
    again = run_decoder(
        tmp_path / "again", DecoderConfig(**TINY), base_path=out / "base", echo=lambda _: None
    )
    assert again["models"]["base"] == {**models["base"]}
    assert not (tmp_path / "again" / "base").exists()

    pytest.importorskip("matplotlib")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "exact match in %" in table and "resilient (budget)" in table


@pytest.mark.slow
def test_default_demo_forgets_and_recovers(tmp_path):
    """The documented run (defaults, a few minutes): real forgetting, a clear target gain, and a resilient model
    that gets the general ability back (how much of the new skill it keeps is measured, not asserted)."""
    report = run_decoder(tmp_path / "run", echo=lambda _: None)
    m = report["models"]
    base, tuned, resilient = m["base"], m["fine_tuned"], m["resilient"]
    assert tuned["target"] - base["target"] >= 0.2  # a clear new skill
    assert tuned["general"] <= 0.98 * base["general"]  # forgetting: at least 2% relative
    assert report["significance"]["general: fine_tuned vs base"]["p"] < 0.01
    assert resilient["general"] > tuned["general"]  # recovery
    assert 0.0 <= report["alpha"] < 1.0
