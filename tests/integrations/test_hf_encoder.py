"""CocktailCallback on an encoder trained with a custom Trainer.compute_loss (in-batch contrastive, the demo's case).

The model is a tiny ``BertModel`` (no loss of its own); examples are raw text pairs that the Trainer's own collator
tokenizes. The probes and the ingredient losses must be scored with the Trainer's ``compute_loss``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from resilient_tune.integrations.transformers import CocktailCallback  # noqa: E402

VOCAB = 48
CALLS: list[bool] = []  # model.training at every compute_loss call


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(config)


class PairCollator:
    """Tokenize ``{"query", "passage"}`` pairs (words ``w<i>`` -> id ``i``) into padded q_/p_ tensors."""

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, field in (("q", "query"), ("p", "passage")):
            rows = [[int(w[1:]) for w in e[field].split()] for e in examples]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            out[f"{prefix}_input_ids"], out[f"{prefix}_attention_mask"] = ids, (ids != 0).long()
        return out


def _embed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)  # (B, H)


def contrastive_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    q = _embed(model, batch["q_input_ids"], batch["q_attention_mask"])
    p = _embed(model, batch["p_input_ids"], batch["p_attention_mask"])
    scores = 20.0 * q @ p.T  # (B, B): in-batch negatives
    return F.cross_entropy(scores, torch.arange(len(q)))


class ContrastiveTrainer(transformers.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        CALLS.append(model.training)
        loss = contrastive_loss(model, inputs)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None


def _pairs(n: int, seed: int, shift: int) -> list[dict[str, str]]:
    """Query words a, b -> passage (a + shift, b + shift, a): a toy retrieval task per ``shift``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(1, 20, (2,), generator=g))
        out.append({"query": f"w{a} w{b}", "passage": f"w{a + shift} w{b + shift} w{a}"})
    return out


TRAIN, TARGET, GENERAL = _pairs(64, 0, 20), _pairs(16, 1, 20), _pairs(16, 2, 5)


def _run(out: Path, callback: CocktailCallback, model: torch.nn.Module | None = None) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=16, per_device_eval_batch_size=8,
        learning_rate=1e-2, eval_strategy="steps", eval_steps=3, save_strategy="no", logging_steps=3,
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = ContrastiveTrainer(
        model=model or _encoder(), args=args, train_dataset=TRAIN, eval_dataset=TARGET,
        data_collator=PairCollator(), callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    return trainer


def _by_hand(model: torch.nn.Module, examples: list[dict[str, str]]) -> float:
    """Mean over batches of 8 of the contrastive loss (the probes' definition), in eval mode."""
    model.eval()
    with torch.no_grad():
        losses = [
            float(contrastive_loss(model, PairCollator()(examples[i : i + 8]))) for i in range(0, 16, 8)
        ]
    return sum(losses) / len(losses)


def test_probes_use_the_trainers_compute_loss(tmp_path):
    CALLS.clear()
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=GENERAL, target_data=TARGET)
    trainer = _run(tmp_path, callback)
    first, last = callback.history
    assert first["general_loss_base"] == pytest.approx(_by_hand(_encoder(), GENERAL), rel=1e-5)
    # the fine-tuned model's target loss where the decision measured α = 1 (a warm budget search may skip it)
    if "target_loss_finetuned" in last:
        assert last["target_loss_finetuned"] == pytest.approx(_by_hand(trainer.model, TARGET), rel=1e-5)
    assert first["target_loss_finetuned"] < _by_hand(_encoder(), TARGET)  # the encoder learned the task
    assert False in CALLS and True in CALLS  # probes (eval mode) and training both went through compute_loss
    assert "general_kl" not in last  # an encoder's custom objective has no next-token distribution
    alpha = json.loads((tmp_path / "resilient" / "cocktail.json").read_text())["alpha"]
    assert alpha == last["alpha"]
    base, tuned = _encoder().state_dict(), trainer.model.state_dict()
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "resilient")
    assert type(loaded).__name__ == "BertModel"
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)


def test_cocktail_weights_from_the_contrastive_loss(tmp_path):
    peer = _encoder(seed=7)
    peer.save_pretrained(tmp_path / "peer")
    callback = CocktailCallback(0.5, policy="cocktail", peers=[tmp_path / "peer"], temperature=0.2)
    trainer = _run(tmp_path / "run", callback)  # target examples default to the eval set's first 64
    losses = [
        _by_hand(_encoder(), TARGET),
        _by_hand(transformers.BertModel.from_pretrained(tmp_path / "peer"), TARGET),
    ]
    decision = callback.history[0]["decision"]
    assert decision["ingredient_losses"] == pytest.approx(losses, rel=1e-5)
    assert decision["weights"] == pytest.approx(
        torch.softmax(-torch.tensor(losses) / 0.2, -1).tolist(), rel=1e-5
    )
    w = decision["weights"]
    base, tuned, other = _encoder().state_dict(), trainer.model.state_dict(), peer.state_dict()
    written = load_file(str(tmp_path / "run" / "resilient" / "model.safetensors"))
    assert written
    for key, value in written.items():
        expected = 0.5 * tuned[key] + 0.5 * (w[0] * base[key] + w[1] * other[key])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
