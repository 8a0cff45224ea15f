"""Probes on encoder-decoder models (T5, BART built from configs): the forward keeps the labels that build the
decoder's inputs, and KL(base ‖ current) is averaged over the decoder positions the labels mark, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resilient_tune.probes import base_log_probs, probe

transformers = pytest.importorskip("transformers")


def _t5(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def _bart(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config).eval()


def _batch(encoder_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, encoder_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # the second example's encoder input is padded
    labels = torch.randint(3, 64, (2, 4), generator=g)
    labels[0, -1] = -100  # and the first's target is one token shorter
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _kl_by_hand(base: torch.nn.Module, current: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        logp = F.log_softmax(base(**batch).logits.float(), -1)
        logq = F.log_softmax(current(**batch).logits.float(), -1)
    per_position = (logp.exp() * (logp - logq)).sum(-1)  # (B, T_decoder)
    keep = batch["labels"] != -100
    return float(per_position[keep].sum() / keep.sum())


@pytest.mark.parametrize("build", [_t5, _bart], ids=["t5", "bart"])
@pytest.mark.parametrize("encoder_len", [6, 4], ids=["lengths-differ", "lengths-agree"])
def test_kl_is_taken_over_the_decoder_positions(build, encoder_len):
    base, current = build(0), build(1)
    batches = [_batch(encoder_len)]  # encoder_len 4 = the decoder's length: a wrong mask would not crash
    refs = base_log_probs(
        base, batches
    )  # the reference pass needs the labels (they build the decoder's inputs)
    result = probe(current, batches, base=refs)
    assert result.kl == pytest.approx(_kl_by_hand(base, current, batches[0]), rel=1e-4)
    assert result.loss == pytest.approx(float(current(**batches[0]).loss), rel=1e-5)
    assert probe(base, batches, base=refs).kl == pytest.approx(0.0, abs=1e-6)


def test_top_k_references_match_on_the_decoder_positions():
    base, current = _t5(0), _t5(1)
    batches = [_batch(6)]
    full = probe(current, batches, base=base_log_probs(base, batches)).kl
    top = probe(
        current, batches, base=base_log_probs(base, batches, top_k=64)
    ).kl  # k = vocab: no "rest" bucket
    assert top == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("build", [_t5, _bart], ids=["t5", "bart"])
def test_per_sequence_units_of_an_encoder_decoder_take_the_labels_unshifted(build):
    model, batch = build(0), _batch(6)
    result = probe(model, [batch], with_units=True)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    token = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="none")
    token = token.view(batch["labels"].shape)
    keep = batch["labels"] != -100
    by_hand = [float(token[i][keep[i]].mean()) for i in range(len(token))]
    assert result.units == pytest.approx(by_hand, rel=1e-5)  # one unit per sequence, not one per batch
    assert probe(model, [batch]).units is None  # only when asked for
