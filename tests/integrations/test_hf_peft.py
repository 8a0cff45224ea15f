"""PEFT LoRA: θ₀ + α·Δ as the adapter scaled by α (no snapshot), merged full model and scaled adapter on disk."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from resilient_tune.engine import CocktailEngine  # noqa: E402
from resilient_tune.errors import UsageError  # noqa: E402
from resilient_tune.integrations.peft import LoraEngine, engine_for  # noqa: E402

from ._tiny import LENGTH, VOCAB, lora, oracle, tiny_gpt2  # noqa: E402

_gpt2, _lora, _oracle = tiny_gpt2, lora, oracle


def _train_a_bit(model: torch.nn.Module) -> None:
    """Move the trainable weights (LoRA B starts at zero, so Δ = 0 before this)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _snapshot(model: torch.nn.Module) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer

    state: dict[str, object] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            state[name + "#scaling"] = dict(module.scaling)
    return state


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture
def trained():
    model = _lora(modules_to_save=["ln_f"])
    _train_a_bit(model)
    engine = LoraEngine(alpha=0.3)
    engine.begin(model)
    return model, engine


def test_no_snapshot_and_the_swap_is_the_scaled_adapter(trained):
    model, engine = trained
    assert engine.snapshot.nbytes == 0 and engine.snapshot.storage == "none"
    before = _snapshot(model)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    plain = _gpt2()
    plain.load_state_dict(_oracle(model, 0.3))
    with engine.swapped(model, 0.3):
        swapped = model(input_ids=ids).logits
    torch.testing.assert_close(swapped, plain(input_ids=ids).logits, rtol=0, atol=1e-5)
    _assert_same(_snapshot(model), before)  # scalings and every weight restored exactly
    with engine.swapped(model, 0.0):  # α = 0 is the base itself
        base_logits = model(input_ids=ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(base_logits[..., :], model(input_ids=ids).logits, rtol=0, atol=1e-6)
    _assert_same(_snapshot(model), before)


def test_restores_exactly_after_an_exception(trained):
    model, engine = trained
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), engine.swapped(model, 0.5):
        raise RuntimeError("boom")
    _assert_same(_snapshot(model), before)


def test_written_full_model_and_adapter_load_and_match(trained, tmp_path):
    model, engine = trained
    oracle = _oracle(model, 0.3)
    folder = engine.write(model, tmp_path / "resilient", 0.3, metadata={"step": 5})
    full = transformers.GPT2LMHeadModel.from_pretrained(folder)
    assert full.state_dict().keys() == oracle.keys()
    for key, value in full.state_dict().items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6)
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["lora_alpha"] == pytest.approx(8 * 0.3)
    scaled = peft.PeftModel.from_pretrained(_gpt2(), folder / "adapter")
    for key, value in scaled.merge_and_unload().state_dict().items():
        torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6)
    doc = json.loads((folder / "cocktail.json").read_text())
    assert doc["alpha"] == 0.3 and doc["step"] == 5 and doc["recipe"]["weights"] == [0.3, 0.7]
    assert doc["peft"]["adapter_folder"] == "adapter"
    assert not (folder / "adapter_config.json").exists()  # from_pretrained(folder) must not stack the adapter


def test_embedding_lora_and_lora_bias_merge_like_peft(tmp_path):
    model = _lora(target_modules=["wte", "c_proj"], lora_bias=False)
    _train_a_bit(model)
    engine = LoraEngine(alpha=0.6)
    engine.begin(model)
    oracle = _oracle(model, 0.6)
    merged = engine.merged_state_dict(model)
    for key, value in oracle.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    with_bias = _lora(target_modules=["c_fc"], lora_bias=True)
    _train_a_bit(with_bias)
    engine = LoraEngine(alpha=0.4)
    oracle = _oracle(with_bias, 0.4)
    merged = engine.merged_state_dict(with_bias)
    assert not torch.equal(oracle["transformer.h.0.mlp.c_fc.bias"], _gpt2().transformer.h[0].mlp.c_fc.bias)
    for key, value in oracle.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)


def test_drift_is_the_norm_of_the_lora_update(trained):
    model, engine = trained
    drift = engine.drift(model)
    base = _gpt2().state_dict()
    merged = _oracle(model, 1.0)
    sq = {k: float((merged[k] - base[k]).pow(2).sum()) for k in base if k in merged}
    assert drift.total == pytest.approx(sum(sq.values()) ** 0.5, rel=1e-4)
    layer0 = sum(v for k, v in sq.items() if k.startswith("transformer.h.0."))
    assert drift.per_layer["transformer.h.0"] == pytest.approx(layer0**0.5, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "neither a LoRA weight nor in modules_to_save"),
    ],
)
def test_unsupported_lora_setups_are_refused(kwargs, match):
    model = _lora(**kwargs)
    with pytest.raises(UsageError, match=match):
        LoraEngine().begin(model)


def test_engine_for_picks_lora_and_refuses_peers_and_other_methods(tmp_path):
    model = _lora()
    template = CocktailEngine(alpha=0.7)
    lora = engine_for(model, template)
    assert isinstance(lora, LoraEngine) and lora.alpha == 0.7 and lora.template is template
    assert engine_for(_gpt2(), lora) is template  # a later full fine-tune gets the template back
    with pytest.raises(UsageError, match="method='linear'"):
        engine_for(model, CocktailEngine(method="ties"))
    _gpt2().save_pretrained(tmp_path / "peer")
    with pytest.raises(NotImplementedError, match="peers with a PEFT LoRA model"):
        engine_for(model, CocktailEngine(peers=[tmp_path / "peer"]))


# ---------------------------------------------------------------------------- inside a real Trainer
def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from resilient_tune.integrations.transformers import CocktailCallback

    from .test_hf_callback import EVAL, GENERAL, _run

    out = tmp_path_factory.mktemp("lora")
    callback = CocktailCallback(0.3, general_data=GENERAL, target_data=EVAL)  # probes swap candidates in
    trainer = _run(out, callback, model=_lora(modules_to_save=["ln_f"]))
    return out, callback, trainer


def test_trainer_lora_run_needs_no_snapshot_and_writes_both_forms(lora_run):
    out, callback, trainer = lora_run
    assert [h["snapshot_bytes"] for h in callback.history] == [0, 0]
    assert not (out / "resilient_base").exists()
    assert callback.history[-1]["target_loss"] != callback.history[-1]["target_loss_finetuned"]
    assert callback.history[-1]["general_kl"] > 0
    for folder in (out / "resilient", out / "checkpoint-4" / "resilient"):
        alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
        assert alpha == 0.3
        oracle = _oracle(trainer.model, alpha)
        full = transformers.AutoModelForCausalLM.from_pretrained(folder)
        for key, value in full.state_dict().items():
            torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6)
        scaled = peft.PeftModel.from_pretrained(_gpt2(), folder / "adapter").merge_and_unload()
        for key, value in scaled.state_dict().items():
            torch.testing.assert_close(value, oracle[key], rtol=0, atol=1e-6)


def test_trainer_lora_probing_is_bit_exact(lora_run, tmp_path):
    from .test_hf_callback import _run

    _, _, probed = lora_run
    plain = _run(tmp_path / "plain", None, model=_lora(modules_to_save=["ln_f"]))
    _assert_same(_adapter_state(plain.model), _adapter_state(probed.model))


def test_trainer_lora_budget_run_resumes_without_a_snapshot(tmp_path):
    import shutil

    from resilient_tune.integrations.transformers import CocktailCallback

    from .test_hf_callback import GENERAL, _run

    def callback():
        return CocktailCallback(policy="budget", drift_budget=1e-4, general_data=GENERAL)

    full = callback()
    _run(tmp_path / "full", full, model=_lora())
    assert full.history[-1]["alpha"] < 1 and full.history[-1]["probe_passes"] >= 2
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = callback()
    _run(tmp_path / "resumed", resumed, model=_lora(), resume=str(tmp_path / "resumed" / "checkpoint-2"))
    assert [h["alpha"] for h in resumed.history] == pytest.approx(
        [h["alpha"] for h in full.history], abs=1e-6
    )
    assert [h["step"] for h in resumed.history] == [2, 4]


def test_trainer_refuses_dora_at_train_begin(tmp_path):
    from resilient_tune.integrations.transformers import CocktailCallback

    from .test_hf_callback import _run

    with pytest.raises(UsageError, match="DoRA"):
        _run(tmp_path, CocktailCallback(), model=_lora(use_dora=True))
