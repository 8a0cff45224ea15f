"""CocktailCallback with peers and policy='cocktail' inside real transformers.Trainer runs (tiny GPT-2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from resilient_tune.checkpoint import CheckpointReader  # noqa: E402
from resilient_tune.errors import IncompatibleModelsError  # noqa: E402
from resilient_tune.integrations.transformers import CocktailCallback  # noqa: E402
from resilient_tune.probes import probe_loss  # noqa: E402

from ._tiny import save_peers  # noqa: E402
from .test_hf_callback import EVAL, GENERAL, _model, _run, _state  # noqa: E402


@pytest.fixture(scope="module")
def peers(tmp_path_factory) -> list[Path]:
    return save_peers(tmp_path_factory.mktemp("peers"))


def _losses_by_hand(folders: list[Path]) -> list[float]:
    """The test's oracle: each ingredient loaded on its own, scored on the default target slice (EVAL)."""
    batches = [transformers.default_data_collator(EVAL[i : i + 8]) for i in range(0, len(EVAL), 8)]
    models = [_model()] + [transformers.GPT2LMHeadModel.from_pretrained(f) for f in folders]
    return [probe_loss(m, batches) for m in models]


@pytest.fixture(scope="module")
def cocktail_run(tmp_path_factory, peers):
    out = tmp_path_factory.mktemp("cocktail")
    callback = CocktailCallback(0.6, policy="cocktail", peers=peers, temperature=0.5)
    trainer = _run(out, callback)
    return out, callback, trainer


def test_cocktail_weights_are_softmax_of_the_ingredient_losses(cocktail_run, peers):
    _, callback, trainer = cocktail_run
    losses = _losses_by_hand(peers)
    expected = torch.softmax(-torch.tensor(losses) / 0.5, -1).tolist()
    first, second = callback.history
    assert first["decision"]["ingredient_losses"] == pytest.approx(losses, rel=1e-5)
    assert first["weights"] == pytest.approx(expected, rel=1e-5) and second["weights"] == first["weights"]
    assert expected[1] > 0.9  # the expert peer (lowest target loss) dominates at tau = 0.5
    assert first["alpha"] == second["alpha"] == 0.6
    # the three ingredient passes are made once, at the first decision (target at alpha and at 1 each time)
    assert first["probe_passes"] == 3 + 2 and second["probe_passes"] == 2
    logged = [e for e in trainer.state.log_history if "cocktail/weight_peer2" in e]
    assert len(logged) == 2 and logged[0]["cocktail/weight_base"] == pytest.approx(expected[0], rel=1e-5)


def test_written_model_is_the_paper_mixture(cocktail_run, peers):
    out, callback, trainer = cocktail_run
    doc = json.loads((out / "resilient" / "cocktail.json").read_text())
    alpha, weights = doc["alpha"], [i["mix_weight"] for i in doc["ingredients"][1:]]
    assert weights == pytest.approx(callback.history[-1]["weights"])
    base, tuned = _state(_model()), _state(trainer.model)
    peer_states = [load_file(str(f / "model.safetensors")) for f in peers]
    written = load_file(str(out / "resilient" / "model.safetensors"))
    for key, value in written.items():
        mix = weights[0] * base[key] + sum(w * p[key] for w, p in zip(weights[1:], peer_states))
        torch.testing.assert_close(value, alpha * tuned[key] + (1 - alpha) * mix, rtol=0, atol=1e-6)
    for entry, folder in zip(doc["ingredients"][2:], peers):
        assert entry["role"] == "peer" and entry["name"] == str(folder)
        with CheckpointReader(folder) as reader:
            assert entry["fingerprint"] == reader.fingerprint()
    checkpoint_doc = json.loads((out / "checkpoint-2" / "resilient" / "cocktail.json").read_text())
    assert checkpoint_doc["ingredient_weights"]["base"] == pytest.approx(weights[0])


def test_probing_with_peers_leaves_training_bit_exact(cocktail_run, tmp_path):
    _, _, probed = cocktail_run
    plain = _run(tmp_path, None)
    for key, value in _state(plain.model).items():
        assert torch.equal(value, probed.model.state_dict()[key]), key


def test_budget_with_peers_and_resume(tmp_path, peers):
    full = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL, peers=peers)
    _run(tmp_path / "full", full)
    assert full.history[-1]["weights"] == pytest.approx([1 / 3] * 3)  # budget keeps uniform peer weights
    run = tmp_path / "resumed"
    run.mkdir()
    for name in ("checkpoint-2", "resilient_base"):
        shutil.copytree(tmp_path / "full" / name, run / name)
    resumed = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL, peers=peers)
    _run(run, resumed, resume=str(run / "checkpoint-2"))
    assert [h["alpha"] for h in resumed.history] == pytest.approx(
        [h["alpha"] for h in full.history], abs=1e-6
    )
    moved = tmp_path / "moved_peer"
    shutil.copytree(peers[0], moved)
    with torch.no_grad():  # a different peer at the same place must be noticed
        other = transformers.GPT2LMHeadModel.from_pretrained(moved)
        other.transformer.h[0].mlp.c_fc.weight.add_(1.0)
        other.save_pretrained(moved)
    changed = CocktailCallback(policy="budget", general_data=GENERAL, peers=[moved, peers[1]])
    with pytest.raises(IncompatibleModelsError, match="peers changed"):
        _run(run, changed, resume=str(run / "checkpoint-2"))


def test_cocktail_resume_reuses_the_ingredient_losses(cocktail_run, peers, tmp_path):
    out, full, _ = cocktail_run
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    shutil.copytree(out / "resilient_base", tmp_path / "resilient_base")
    resumed = CocktailCallback(0.6, policy="cocktail", peers=peers, temperature=0.5)
    _run(tmp_path, resumed, resume=str(tmp_path / "checkpoint-2"))
    assert resumed.history[-1]["weights"] == pytest.approx(full.history[-1]["weights"], abs=1e-7)
    assert resumed.history[-1]["probe_passes"] == 2  # no ingredient pass after the resume


def test_peers_of_another_architecture_fail_at_train_begin(tmp_path):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    callback = CocktailCallback(policy="cocktail", peers=[tmp_path / "bert"])  # constructs fine...
    with pytest.raises(IncompatibleModelsError, match=r"'transformer\.wte\.weight'"):
        _run(tmp_path / "out", callback)  # ...and names the first mismatching key at train begin
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_cocktail_without_target_or_eval_data_is_refused(tmp_path, peers):
    from resilient_tune.errors import UsageError

    callback = CocktailCallback(policy="cocktail", peers=peers)
    with pytest.raises(UsageError, match="target_data"):
        trainer = transformers.Trainer(
            model=_model(),
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True
            ),
            train_dataset=EVAL,
            callbacks=[callback],
        )
        trainer.train()
