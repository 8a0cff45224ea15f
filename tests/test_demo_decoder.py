"""The decoder demo's pieces (tokenizer, windows, collator, next-character hits) and a whole run on tiny settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from resilient_tune.cli import main  # noqa: E402
from resilient_tune.demo import run_demo  # noqa: E402
from resilient_tune.demo.decoder import (  # noqa: E402
    DecoderConfig,
    LMCollator,
    char_tokenizer,
    encode,
    next_char_hits,
    next_char_scores,
    run_decoder,
    windows,
)
from resilient_tune.errors import UsageError  # noqa: E402

TINY = dict(
    steps=4,
    batch_size=8,
    pretrain_steps=6,
    pretrain_batch_size=16,
    decisions=2,
    probe_windows=6,
    test_windows=12,
    context=16,
    n_layer=1,
    n_embd=32,
    curve=(0.25,),
    eval_batch_size=16,
)


def test_tokenizer_is_one_token_per_character_and_round_trips(tmp_path):
    tok = char_tokenizer("def f(x):\n    return x  # rare: é", min_count=1)
    text = "def f(x):\n    return x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert encode(tok, text).tolist() == ids  # the direct encoding is the tokenizer's
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_rare_characters_become_unk():
    tok = char_tokenizer("aaab", min_count=2)
    assert set(tok.get_vocab()) == {"<pad>", "<unk>", "<eos>", "a"}
    assert encode(tok, "abz").tolist() == [tok.convert_tokens_to_ids("a"), tok.unk_token_id, tok.unk_token_id]
    assert tok("abz", add_special_tokens=False)["input_ids"] == encode(tok, "abz").tolist()


def test_windows_are_consecutive_tokens_inside_the_text():
    ids = torch.arange(100)
    w = windows(ids, 50, 8, torch.Generator().manual_seed(0))
    assert w.shape == (50, 8)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(50, 7, dtype=torch.long))  # consecutive
    assert int(w.min()) >= 0 and int(w.max()) <= 99
    assert torch.equal(w, windows(ids, 50, 8, torch.Generator().manual_seed(0)))  # seeded
    assert (
        int(windows(torch.arange(9), 200, 8, torch.Generator().manual_seed(1))[:, -1].max()) == 8
    )  # reaches the end
    with pytest.raises(UsageError, match="fewer than one window of 8"):
        windows(torch.arange(8), 1, 8, torch.Generator())


def test_collator_pads_right():
    batch = LMCollator(pad_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


class _Oracle(torch.nn.Module):
    """Predicts token ``t + 1`` after token ``t``."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot((input_ids + 1) % 20, 20).float()
        return transformers.modeling_outputs.CausalLMOutput(logits=logits)


def test_next_char_hits_score_every_predicted_position():
    w = torch.tensor([[3, 4, 5, 6], [3, 4, 9, 10], [1, 7, 8, 2]])
    # window 1: all right; window 2: 4->9 wrong, then 9->10 right; window 3: 1->7 wrong, 7->8 right, 8->2 wrong
    expected = [True, True, True, True, False, True, False, True, False]
    assert next_char_hits(_Oracle(), w, batch_size=2) == expected


def test_next_char_scores_give_the_hits_and_the_mean_loss_of_the_same_forwards():
    w = torch.tensor([[3, 4, 5, 6], [3, 4, 9, 10], [1, 7, 8, 2]])
    hits, loss = next_char_scores(_Oracle(), w, batch_size=2)
    assert hits == next_char_hits(_Oracle(), w, batch_size=2)
    # one-hot logits over 20 tokens: a right guess costs log(e + 19) - 1, a wrong one log(e + 19)
    right, wrong = math.log(math.e + 19) - 1, math.log(math.e + 19)
    assert loss == pytest.approx((6 * right + 3 * wrong) / 9)


def test_config_validation():
    with pytest.raises(UsageError, match="steps=0"):
        DecoderConfig(steps=0)
    with pytest.raises(UsageError, match="context=0"):
        DecoderConfig(context=0)
    with pytest.raises(UsageError, match="pretrain_steps=-1"):
        DecoderConfig(pretrain_steps=-1)
    with pytest.raises(UsageError, match="learning_rate=0"):
        DecoderConfig(learning_rate=0)
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
    assert report["scenario"] == "decoder" and report["score_name"] == "next-char accuracy"
    assert report["data"]["synthetic"] is False and any("real text" in line for line in lines)
    assert report["data"]["sizes"]["code_train_chars"] > 100_000 and report["data"]["fingerprint"]
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
    chars = 12 * 16  # test windows x predicted characters per window
    assert len(report["hits"]["base"]["general"]) == chars == len(report["hits"]["resilient"]["target"])
    assert report["hits"]["base"]["general"].count("1") == round(models["base"]["general"] * chars)
    assert report["data"]["sizes"]["general_test"] == 12 and report["data"]["sizes"]["pretrain"] == 6 * 16

    curve = {point["alpha"]: point for point in report["curve"]}
    assert {0.0, 0.25, 0.5, 1.0, alpha} <= set(curve)
    # the held-out losses: the probes' LM loss on the test windows, for every scored model and curve point
    assert curve[0.0]["test_loss"] == models["base"]["test_loss"]
    assert all(set(p["test_loss"]) == {"target", "general"} for p in report["curve"])
    assert models["fine_tuned"]["test_loss"]["target"] < models["base"]["test_loss"]["target"]

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
    assert "next-char accuracy in %" in table and "resilient (budget)" in table


@pytest.mark.slow
def test_default_demo_forgets_and_recovers(tmp_path):
    """The documented run (defaults, a few minutes): real forgetting, a clear target gain, and a resilient model
    that gets the general ability back (how much of the new skill it keeps is measured, not asserted)."""
    report = run_decoder(tmp_path / "run", echo=lambda _: None)
    m = report["models"]
    base, tuned, resilient = m["base"], m["fine_tuned"], m["resilient"]
    assert tuned["target"] - base["target"] >= 0.03  # a clear new skill: 3 points of next-character accuracy
    assert tuned["general"] <= 0.98 * base["general"]  # forgetting: at least 2% relative
    assert report["significance"]["general: fine_tuned vs base"]["p"] < 0.01
    assert resilient["general"] > tuned["general"]  # recovery
    assert 0.0 <= report["alpha"] < 1.0


def test_lora_run_writes_the_merged_models(tmp_path):
    """With ``lora_rank`` the adapter is trained; fine-tuned/ holds the merged model, and the resilient checkpoint
    is θ₀ + α·(θ − θ₀) of the merged weights (the adapter scaled by α)."""
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    report = run_decoder(out, DecoderConfig(**TINY, lora_rank=2, learning_rate=1e-2), echo=lambda _: None)
    assert report["config"]["lora_rank"] == 2
    assert not (out / "fine-tuned" / "adapter_config.json").exists()
    base = load_file(str(out / "base" / "model.safetensors"))
    tuned = load_file(str(out / "fine-tuned" / "model.safetensors"))
    written = load_file(str(out / "resilient" / "model.safetensors"))
    assert set(tuned) == set(base)  # a plain model, no adapter keys
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # the adapter changed the merged weights
    # LoRA leaves the embeddings alone
    assert torch.equal(tuned["transformer.wte.weight"], base["transformer.wte.weight"])
    alpha = report["alpha"]
    for key, value in written.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-5)
    assert (out / "resilient" / "adapter" / "adapter_config.json").exists()
    transformers.AutoModelForCausalLM.from_pretrained(out / "fine-tuned")

    # from the saved base the adapter starts from the same seed: the same fine-tune, the same scores
    again = run_decoder(
        tmp_path / "again",
        DecoderConfig(**TINY, lora_rank=2, learning_rate=1e-2),
        base_path=out / "base",
        echo=lambda _: None,
    )
    assert again["models"] == report["models"]


def test_lora_rank_is_validated():
    with pytest.raises(UsageError, match=r"lora_rank=-1 must be an int >= 0"):
        DecoderConfig(lora_rank=-1)


def test_a_metric_budget_bounds_the_probes_next_character_accuracy(tmp_path):
    report = run_decoder(
        tmp_path / "run", DecoderConfig(**{**TINY, "metric_drop": 0.02}), echo=lambda line: None
    )
    assert report["policy"]["quantity"] == "metric" and report["policy"]["metric_drop"] == 0.02
    for entry in report["history"]:
        assert entry["decision"]["quantity"] == "metric"
        assert 0.0 <= entry["general_metric_base"] <= 1.0
        assert entry["general_metric"] >= entry["general_metric_base"] - 0.02 - 1e-12
    with pytest.raises(UsageError, match=r"metric_drop=-0\.1 must be >= 0"):
        DecoderConfig(metric_drop=-0.1)
