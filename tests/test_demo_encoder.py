"""The encoder demo's pieces (loss, embeddings, recall) and a whole run on a tiny BERT built from a config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from resilient_tune.cli import main  # noqa: E402
from resilient_tune.demo.data import DemoData, Pairs  # noqa: E402
from resilient_tune.demo.encoder import (  # noqa: E402
    ContrastiveTrainer,
    EncoderConfig,
    PairCollator,
    _score,
    contrastive_loss,
    encode,
    recall_hits,
    run_encoder,
)
from resilient_tune.errors import UsageError  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
WORDS += ["kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma"]


def _pairs(n: int, offset: int) -> Pairs:
    """Sentences of varied length -> short names (synthetic; this tests the pipeline, not the numbers)."""
    queries = [" ".join(WORDS[(offset + i + j) % len(WORDS)] for j in range(3 + (i % 5))) for i in range(n)]
    return Pairs(queries, [f"pkg{offset}.name_{WORDS[(offset + i) % len(WORDS)]}_{i}" for i in range(n)])


def _tiny_data() -> DemoData:
    return DemoData(
        target_train=_pairs(48, 0),
        target_probe=_pairs(8, 1),
        target_test=_pairs(12, 2),
        general_probe=_pairs(8, 3),
        general_test=_pairs(12, 4),
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dirs):
    return transformers.AutoTokenizer.from_pretrained(tiny_bert_dirs(1)[0])


@pytest.fixture
def tiny(tiny_bert_dirs):
    return tiny_bert_dirs(1)[0]


def test_compute_loss_is_in_batch_contrastive(tiny, tokenizer):
    model = transformers.AutoModel.from_pretrained(tiny).eval()
    pairs = _pairs(6, 0)
    batch = PairCollator(tokenizer)(
        [{"query": q, "passage": p} for q, p in zip(pairs.queries, pairs.passages)]
    )
    assert batch["q_input_ids"].shape[0] == 6 and batch["p_attention_mask"].shape[0] == 6
    trainer = ContrastiveTrainer.__new__(ContrastiveTrainer)  # compute_loss needs only the scale
    trainer.scale = 20.0
    loss = trainer.compute_loss(model, batch)
    q = encode(model, tokenizer, pairs.queries)
    p = encode(model, tokenizer, pairs.passages)
    expected = F.cross_entropy(20.0 * q @ p.T, torch.arange(6))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)


def test_held_out_contrastive_loss_uses_full_chunks_of_the_probe_batch():
    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(10, 4), dim=1), F.normalize(torch.randn(10, 4), dim=1)
    by_hand = [float(F.cross_entropy(20 * q[s : s + 4] @ p[s : s + 4].T, torch.arange(4))) for s in (0, 4)]
    assert contrastive_loss(q, p, 4, 20.0) == pytest.approx(
        sum(by_hand) / 2
    )  # the last 2 pairs: no full chunk
    whole = float(F.cross_entropy(5 * q @ p.T, torch.arange(10)))
    assert contrastive_loss(q, p, 64, 5.0) == pytest.approx(whole)  # fewer pairs than a batch: one chunk


def test_spread_chunks_draw_their_negatives_across_the_set():
    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(10, 4), dim=1), F.normalize(torch.randn(10, 4), dim=1)
    chunks = (
        [0, 2, 4, 6],
        [1, 3, 5, 7],
    )  # k = 10 // 4 = 2: pairs j, j+2, j+4, j+6; the last 2 pairs left out
    by_hand = [float(F.cross_entropy(20 * q[list(c)] @ p[list(c)].T, torch.arange(4))) for c in chunks]
    assert contrastive_loss(q, p, 4, 20.0, spread=True) == pytest.approx(sum(by_hand) / 2)
    assert contrastive_loss(q, p, 64, 5.0, spread=True) == pytest.approx(contrastive_loss(q, p, 64, 5.0))


def test_score_gives_hits_and_the_held_out_loss_in_both_chunk_layouts(tiny, tokenizer):
    model = transformers.AutoModel.from_pretrained(tiny).eval()
    sets = {"target": _pairs(10, 0), "general": _pairs(12, 100)}
    cfg = EncoderConfig(eval_batch_size=4)
    scored = _score(model, tokenizer, sets, "test", cfg)
    for name, pairs in sets.items():
        q = encode(model, tokenizer, pairs.queries, max_length=cfg.max_length)
        p = encode(model, tokenizer, pairs.passages, max_length=cfg.max_length)
        assert scored[name] == recall_hits(q, p)
        assert scored.losses[name] == pytest.approx(contrastive_loss(q, p, 4, cfg.scale), rel=1e-4)
        assert scored.spread_losses[name] == pytest.approx(
            contrastive_loss(q, p, 4, cfg.scale, spread=True), rel=1e-4
        )
    assert scored.spread_losses["general"] != pytest.approx(scored.losses["general"], rel=1e-6)


def test_encode_keeps_the_input_order(tiny, tokenizer):
    model = transformers.AutoModel.from_pretrained(tiny)
    texts = ["a much longer sentence than the others here", "short", "medium length text", "x y"]
    together = encode(model, tokenizer, texts, batch_size=2)  # length-sorted batches
    alone = torch.cat([encode(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(4))


def test_recall_hits():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert recall_hits(q, p) == [True, True, False]


def test_config_validation():
    with pytest.raises(UsageError, match="steps=0"):
        EncoderConfig(steps=0)
    with pytest.raises(UsageError, match="in-batch negatives"):
        EncoderConfig(batch_size=1)
    with pytest.raises(UsageError, match=r"alpha 1\.5"):
        EncoderConfig(curve=(1.5,))


def test_documented_recipe_is_the_default():
    """docs/demo.md and the README quote the default run: its step count must be the default."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = EncoderConfig()
    demo_page = (root / "docs" / "demo.md").read_text()
    assert f"resilient-tune demo --out runs/demo --steps {cfg.steps}\n" in demo_page
    assert f"The recipe: {cfg.steps} steps" in demo_page
    assert f"defaults: {cfg.steps} steps" in (root / "README.md").read_text()


def test_whole_run_on_a_tiny_encoder(tiny, tokenizer, tmp_path, capsys):
    data = _tiny_data()
    config = EncoderConfig(
        steps=4,
        batch_size=8,
        learning_rate=5e-3,
        decisions=2,
        probe_pairs=8,
        curve=(0.25,),
        eval_batch_size=8,
    )
    out = tmp_path / "run"
    report = run_encoder(out, config, model_path=tiny, data=data, echo=lambda line: None)

    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    models = report["models"]
    alpha = report["alpha"]
    assert report["history"] and report["history"][-1]["alpha"] == alpha
    assert models["resilient"]["alpha"] == alpha and models["static"]["alpha"] == 0.5
    # held-out losses beside the hits: the probes' contrastive loss on the test pairs (chunks of the probe batch)
    assert all(set(models[m]["test_loss"]) == {"target", "general"} for m in models)
    assert {p["alpha"]: p["test_loss"] for p in report["curve"]}[0.0] == models["base"]["test_loss"]
    # and in chunks drawn across the set, as the probe batch is drawn
    assert all(set(models[m]["test_loss_spread"]) == {"target", "general"} for m in models)
    assert {p["alpha"]: p["test_loss_spread"] for p in report["curve"]}[0.0] == models["base"][
        "test_loss_spread"
    ]

    # the resilient checkpoint is θ₀ + α·(θ − θ₀) of the base and the saved fine-tuned weights
    base = load_file(str(tiny / "model.safetensors"))
    tuned = load_file(str(out / "fine-tuned" / "model.safetensors"))
    written = load_file(str(out / "resilient" / "model.safetensors"))
    for key, value in written.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    assert json.loads((out / "resilient" / "cocktail.json").read_text())["alpha"] == pytest.approx(alpha)

    # base scores are what an independently loaded base model gets
    fresh = transformers.AutoModel.from_pretrained(tiny)
    for task, pairs in (("target", data.target_test), ("general", data.general_test)):
        hits = recall_hits(encode(fresh, tokenizer, pairs.queries), encode(fresh, tokenizer, pairs.passages))
        assert models["base"][task] == sum(hits) / len(hits)

    curve = {point["alpha"]: point for point in report["curve"]}
    assert {0.0, 0.25, 0.5, 1.0, alpha} <= set(curve)
    for name in ("base", "fine_tuned", "static"):
        point = curve[models[name]["alpha"]]
        assert (point["target"], point["general"]) == (models[name]["target"], models[name]["general"])
    assert report["data"]["sizes"]["target_train"] == 48
    assert report["environment"]["python"] and report["timing"]["train"] > 0
    assert (out / "cocktail_report.json").is_file()

    pytest.importorskip("matplotlib")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "resilient (budget)" in capsys.readouterr().out


def test_a_metric_budget_bounds_the_probes_recall(tiny, tokenizer, tmp_path):
    data = _tiny_data()
    config = EncoderConfig(
        steps=4, batch_size=8, learning_rate=5e-3, decisions=2, probe_pairs=8, curve=(), eval_batch_size=8,
        metric_drop=0.0,
    )  # fmt: skip
    report = run_encoder(tmp_path / "run", config, model_path=tiny, data=data, echo=lambda line: None)
    assert report["policy"]["quantity"] == "metric"
    base = transformers.AutoModel.from_pretrained(tiny)
    probe = data.general_probe
    by_hand = recall_hits(encode(base, tokenizer, probe.queries), encode(base, tokenizer, probe.passages))
    for entry in report["history"]:
        assert entry["general_metric_base"] == pytest.approx(sum(by_hand) / len(by_hand))
        assert entry["general_metric"] >= entry["general_metric_base"] - 1e-12  # a drop of 0 allowed
