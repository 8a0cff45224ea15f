"""``method="slerp"`` in the training engine: α is SLERP's ``t`` between θ₀ and θₜ. The probes' swap and the written
folder hold the same tensors bit for bit, the restore is bit-exact, ``cocktail.json`` records ``t``; a ``Trainer``
run searches α with the budget policy the same way; Model Stock and SLERP with peers are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_engine import _gpt2, _live, _train_a_bit

from resilient_tune import CocktailCallback
from resilient_tune.engine import CocktailEngine
from resilient_tune.errors import UsageError
from resilient_tune.merging import merge_tensor

transformers = pytest.importorskip("transformers")


def test_slerp_swap_write_and_restore_agree(tmp_path):
    model = _gpt2()
    engine = CocktailEngine(alpha=0.3, method="slerp")
    engine.begin(model)
    theta0 = _live(model)
    _train_a_bit(model)
    live = _live(model)
    with engine.swapped(model, 0.3):
        swapped = _live(model)
    assert all(torch.equal(live[k], v) for k, v in _live(model).items())  # restored bit-exactly
    folder = engine.write(model, tmp_path / "slerp", 0.3, form="module")
    written = load_file(str(folder / "model.safetensors"))
    for key, value in written.items():
        assert torch.equal(value, swapped[key]), key  # the probes scored exactly what was written
        expected = merge_tensor("slerp", [live[key]], [1.0], base=theta0[key], options={"t": 0.3})
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    doc = json.loads((folder / "cocktail.json").read_text())
    assert doc["recipe"]["method"] == "slerp" and doc["recipe"]["options"]["t"] == pytest.approx(0.3)
    assert doc["recipe"]["weights"] == [1.0]
    # not the linear mix: the arc bends away from the chord where θ₀ and θₜ are far apart
    chord = theta0["transformer.h.0.mlp.c_fc.weight"].lerp(live["transformer.h.0.mlp.c_fc.weight"], 0.3)
    assert not torch.allclose(written["transformer.h.0.mlp.c_fc.weight"], chord, atol=1e-7)


def test_model_stock_and_slerp_with_peers_are_refused(tmp_path):
    with pytest.raises(UsageError, match=r"merge offline.*method='model_stock'"):
        CocktailEngine(method="model_stock")
    _gpt2(1).save_pretrained(tmp_path / "peer")
    with pytest.raises(UsageError, match="drop the 1 peer"):
        CocktailEngine(method="slerp", peers=[tmp_path / "peer"])


def test_a_trainer_searches_alpha_along_the_arc(tmp_path):
    from integrations._tiny import tiny_gpt2, token_examples

    callback = CocktailCallback(
        policy="budget", drift_budget=0.01, method="slerp", general_data=token_examples(16, 2, False)
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=3e-2, eval_strategy="steps",
        eval_steps=2, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100,
    )  # fmt: skip
    transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=token_examples(32, 0, True), eval_dataset=token_examples(8, 1, True),
        callbacks=[callback],
    ).train()  # fmt: skip
    last = callback.history[-1]
    assert last["decision"]["policy"] == "budget" and 0.0 <= last["alpha"] <= 1.0
    assert last["general_loss"] <= last["general_loss_base"] * 1.01 + 1e-6
    doc = json.loads((tmp_path / "resilient" / "cocktail.json").read_text())
    assert doc["recipe"]["method"] == "slerp" and doc["recipe"]["options"]["t"] == pytest.approx(
        last["alpha"]
    )
