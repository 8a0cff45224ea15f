"""Probes: mean model loss, user score functions, KL(base ‖ current) on general tokens (full and top-k)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resilient_tune.errors import UsageError
from resilient_tune.probes import TopKLogProbs, base_log_probs, probe, probe_kl, probe_loss

transformers = pytest.importorskip("transformers")
VOCAB = 40


def _gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0  # padding at the end of the second row
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _manual_kl(base: torch.nn.Module, current: torch.nn.Module, batches) -> float:
    total, tokens = 0.0, 0
    base.eval()
    current.eval()
    with torch.no_grad():
        for b in batches:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            logp = F.log_softmax(base(**inputs).logits, -1)
            logq = F.log_softmax(current(**inputs).logits, -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            total += float(kl[b["attention_mask"].bool()].sum())
            tokens += int(b["attention_mask"].sum())
    return total / tokens


def test_probe_loss_is_the_mean_of_batch_losses_in_eval_mode():
    model = _gpt2(0)
    model.train()
    model.transformer.h[0].eval()  # a module the user put in eval mode on purpose
    batches = _batches()
    model.eval()
    with torch.no_grad():
        expected = sum(float(model(**b).loss) for b in batches) / len(batches)
    model.train()
    model.transformer.h[0].eval()
    assert probe_loss(model, batches) == pytest.approx(expected, rel=1e-6)
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training


def test_score_fn_replaces_the_model_loss():
    model = _gpt2(0)
    seen = []

    def score(m, batch):
        seen.append(batch["input_ids"].shape)
        return torch.tensor(float(batch["input_ids"].sum()))

    batches = _batches(2)
    expected = sum(float(b["input_ids"].sum()) for b in batches) / 2
    assert probe_loss(model, batches, score_fn=score) == pytest.approx(expected)
    assert len(seen) == 2


def test_kl_is_zero_against_itself_and_matches_the_formula():
    base, current = _gpt2(0), _gpt2(1)
    batches = _batches()
    assert probe_kl(base, base_log_probs(base, batches), batches) == pytest.approx(0.0, abs=1e-6)
    expected = _manual_kl(base, current, batches)
    assert expected > 0
    assert probe_kl(current, base_log_probs(base, batches), batches) == pytest.approx(expected, rel=1e-5)

    def base_fn(batch):
        with torch.no_grad():
            return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    assert probe_kl(current, base_fn, batches) == pytest.approx(expected, rel=1e-5)


def test_top_k_kl_is_a_lower_bound_that_becomes_exact():
    base, current = _gpt2(0), _gpt2(1)
    batches = _batches()
    full = probe_kl(current, base_log_probs(base, batches), batches)
    small = base_log_probs(base, batches, top_k=4)
    assert isinstance(small[0], TopKLogProbs) and small[0].values.shape == (2, 6, 4)
    coarse = probe_kl(current, small, batches)
    assert 0 < coarse <= full + 1e-7
    nearly_all = probe_kl(current, base_log_probs(base, batches, top_k=VOCAB - 1), batches)
    assert nearly_all == pytest.approx(full, rel=1e-4)


def test_one_pass_gives_loss_and_kl():
    base, current = _gpt2(0), _gpt2(1)
    batches = _batches()
    result = probe(current, batches, base=base_log_probs(base, batches))
    assert result.batches == 3
    assert result.loss == pytest.approx(probe_loss(current, batches), rel=1e-6)
    assert result.kl == pytest.approx(_manual_kl(base, current, batches), rel=1e-5)


def test_bad_probe_data():
    model = _gpt2(0)
    with pytest.raises(UsageError, match="no batches"):
        probe_loss(model, [])
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in _batches(1)]
    with pytest.raises(UsageError, match="labels"):
        probe_loss(model, unlabeled)
    with pytest.raises(UsageError, match="mappings of tensors"):
        probe_loss(model, [torch.zeros(2, 3)])
    batches = _batches(2)
    with pytest.raises(UsageError, match="1 batches"):
        probe_kl(model, base_log_probs(model, batches[:1]), batches)


def test_ingredient_losses_score_the_base_and_each_peer_as_stored():
    from resilient_tune.engine import CocktailEngine
    from resilient_tune.probes import ingredient_losses

    model, peer = _gpt2(0), _gpt2(1)
    engine = CocktailEngine(peers=[peer.state_dict()])
    engine.begin(model)
    base_loss = probe_loss(_gpt2(0), _batches())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # "training" moved the live weights
    live = {k: v.clone() for k, v in model.state_dict().items()}
    losses = ingredient_losses(engine, model, {"a": _batches(), "b": _batches(2)})
    expected_peer = (probe_loss(peer, _batches()) + probe_loss(peer, _batches(2))) / 2
    expected_base = (base_loss + probe_loss(_gpt2(0), _batches(2))) / 2
    assert losses == pytest.approx([expected_base, expected_peer], rel=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key])
    with pytest.raises(UsageError, match="target_data"):
        ingredient_losses(engine, model, {})
