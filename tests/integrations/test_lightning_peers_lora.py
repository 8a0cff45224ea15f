"""Lightning CocktailCallback with peers and policy='cocktail', and with a PEFT LoRA model inside the
LightningModule: the same behaviour as the Hugging Face callback (tests/integrations/test_hf_peers.py and
test_hf_peft.py), checked in real Lightning runs on a tiny GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from resilient_tune.checkpoint import CheckpointReader  # noqa: E402
from resilient_tune.errors import IncompatibleModelsError, UsageError  # noqa: E402
from resilient_tune.integrations.lightning import CocktailCallback  # noqa: E402
from resilient_tune.probes import probe_loss  # noqa: E402

from ._tiny import lora, oracle, save_peers, state, tiny_gpt2, token_examples  # noqa: E402

torch.set_num_threads(1)

TRAIN, VAL, GENERAL = (
    token_examples(n, s, narrow, tensors=True) for n, s, narrow in [(32, 0, 1), (8, 1, 1), (16, 2, 0)]
)


class LM(L.LightningModule):
    """A LightningModule around a transformers model (plain or PEFT-wrapped), trained with the model's loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-2)


def _loader(data) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(root: Path, callback, module: L.LightningModule, *, ckpt_path=None, max_steps: int = 4) -> L.Trainer:
    every = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        default_root_dir=str(root),
        max_steps=max_steps,
        val_check_interval=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[c for c in (callback, every) if c is not None],
    )
    trainer.fit(module, _loader(TRAIN), _loader(VAL), ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------------- peers and policy="cocktail"
@pytest.fixture(scope="module")
def peers(tmp_path_factory) -> list[Path]:
    return save_peers(tmp_path_factory.mktemp("peers"))


@pytest.fixture(scope="module")
def cocktail_run(tmp_path_factory, peers):
    root = tmp_path_factory.mktemp("cocktail")
    base = state(LM(tiny_gpt2()))
    callback = CocktailCallback(0.6, policy="cocktail", peers=peers, temperature=0.5)
    module = LM(tiny_gpt2())
    trainer = _fit(root, callback, module)
    return root, base, callback, module, trainer


def test_cocktail_weights_are_softmax_of_the_ingredient_losses(cocktail_run, peers):
    _, _, callback, _, trainer = cocktail_run
    batches = list(_loader(VAL))  # the default target: the validation data, batched like it
    models = [tiny_gpt2()] + [transformers.GPT2LMHeadModel.from_pretrained(f) for f in peers]
    losses = [probe_loss(m, batches) for m in models]
    expected = torch.softmax(-torch.tensor(losses) / 0.5, -1).tolist()
    first, second = callback.history
    assert first["decision"]["ingredient_losses"] == pytest.approx(losses, rel=1e-5)
    assert first["weights"] == pytest.approx(expected, rel=1e-5) and second["weights"] == first["weights"]
    assert expected[1] > 0.9 and first["alpha"] == second["alpha"] == 0.6
    assert first["probe_passes"] == 3 + 2 and second["probe_passes"] == 2  # ingredient passes once per run
    assert float(trainer.callback_metrics["cocktail/weight_peer1"]) == pytest.approx(expected[1], rel=1e-5)


def test_written_model_is_the_paper_mixture(cocktail_run, peers):
    root, base, callback, module, _ = cocktail_run
    doc = json.loads((root / "resilient" / "cocktail.json").read_text())
    alpha, weights = doc["alpha"], [i["mix_weight"] for i in doc["ingredients"][1:]]
    assert weights == pytest.approx(callback.history[-1]["weights"])
    tuned = state(module)
    peer_states = [load_file(str(f / "model.safetensors")) for f in peers]
    written = load_file(str(root / "resilient" / "model.safetensors"))
    assert sorted(written) == sorted(tuned)  # every state-dict key, lm_head.weight (tied) included

    def expected(key: str) -> torch.Tensor:
        inner = key.removeprefix("model.").replace("lm_head.weight", "transformer.wte.weight")
        mix = weights[0] * base[key] + sum(w * p[inner] for w, p in zip(weights[1:], peer_states))
        return alpha * tuned[key] + (1 - alpha) * mix

    for key, value in written.items():
        torch.testing.assert_close(value, expected(key), rtol=0, atol=1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "resilient" / "hf")
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(value, written[f"model.{key}"], rtol=0, atol=0)
    for entry, folder in zip(doc["ingredients"][2:], peers):
        with CheckpointReader(folder) as reader:
            assert entry["name"] == str(folder) and entry["fingerprint"] == reader.fingerprint()
    companion = json.loads((root / "ckpts" / "epoch=0-step=2.resilient" / "cocktail.json").read_text())
    assert companion["ingredient_weights"]["base"] == pytest.approx(weights[0])


def test_cocktail_resume_reuses_the_ingredient_losses(cocktail_run, peers, tmp_path):
    root, _, full, _, _ = cocktail_run
    resumed = CocktailCallback(0.6, policy="cocktail", peers=peers, temperature=0.5)
    _fit(tmp_path, resumed, LM(tiny_gpt2()), ckpt_path=str(root / "ckpts" / "epoch=0-step=2.ckpt"))
    assert [h["step"] for h in resumed.history] == [2, 4]
    assert resumed.history[-1]["weights"] == pytest.approx(full.history[-1]["weights"], abs=1e-7)
    assert resumed.history[-1]["probe_passes"] == 2  # no ingredient pass after the resume
    changed = CocktailCallback(0.6, policy="cocktail", peers=list(reversed(peers)), temperature=0.5)
    with pytest.raises(IncompatibleModelsError, match="peers changed"):
        _fit(
            tmp_path / "changed",
            changed,
            LM(tiny_gpt2()),
            ckpt_path=str(root / "ckpts" / "epoch=0-step=2.ckpt"),
        )


def test_peers_of_another_architecture_fail_at_setup(tmp_path):
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    callback = CocktailCallback(policy="cocktail", peers=[tmp_path / "bert"])
    with pytest.raises(IncompatibleModelsError, match=r"'model\.transformer\.wte\.weight'"):
        _fit(tmp_path / "out", callback, LM(tiny_gpt2()))
    assert not (tmp_path / "out" / "ckpts").exists()


def test_cocktail_without_target_or_validation_data_is_refused(tmp_path, peers):
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        callbacks=[CocktailCallback(policy="cocktail", peers=peers)],
    )
    with pytest.raises(UsageError, match="target_data"):
        trainer.fit(LM(tiny_gpt2()), _loader(TRAIN))  # no validation data: no target examples to weigh by


# ---------------------------------------------------------------------------- PEFT LoRA inside the module
def _lora_lm() -> LM:
    return LM(lora(modules_to_save=["ln_f"]))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    callback = CocktailCallback(0.3, general_data=GENERAL, target_data=VAL)  # probes swap candidates in
    module = _lora_lm()
    trainer = _fit(root, callback, module)
    return root, callback, module, trainer


def test_lora_needs_no_snapshot_and_writes_the_module_and_hf_forms(lora_run):
    root, callback, module, _ = lora_run
    assert [h["snapshot_bytes"] for h in callback.history] == [0, 0]
    assert not (root / "resilient_base").exists()
    assert callback.history[-1]["general_kl"] > 0  # KL on the LM inside the PEFT wrapper
    merged = oracle(module.model, 0.3)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    plain = tiny_gpt2()
    plain.load_state_dict(merged)
    for folder in (root / "resilient", root / "ckpts" / "epoch=0-step=4.resilient"):
        assert json.loads((folder / "cocktail.json").read_text())["alpha"] == 0.3
        written = load_file(str(folder / "model.safetensors"))
        assert sorted(written) == sorted(module.state_dict())  # the module's own keys, the adapter scaled
        fresh = _lora_lm()
        fresh.load_state_dict(written)
        torch.testing.assert_close(
            fresh.model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-5
        )
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf")
        for key, value in hf.state_dict().items():
            torch.testing.assert_close(value, merged[key], rtol=0, atol=1e-6)
        scaled = peft.PeftModel.from_pretrained(tiny_gpt2(), folder / "hf" / "adapter").merge_and_unload()
        for key, value in scaled.state_dict().items():
            torch.testing.assert_close(value, merged[key], rtol=0, atol=1e-6)


def test_lora_probing_is_bit_exact(lora_run, tmp_path):
    _, _, probed, _ = lora_run
    plain = _lora_lm()
    _fit(tmp_path, None, plain)
    trained = {k: v for k, v in probed.state_dict().items()}
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_lora_budget_run_resumes_without_a_snapshot(tmp_path):
    def callback():
        return CocktailCallback(policy="budget", drift_budget=1e-4, general_data=GENERAL)

    full = callback()
    _fit(tmp_path / "full", full, LM(lora()), max_steps=6)
    assert full.history[0]["alpha"] < 1 and full.history[0]["probe_passes"] >= 3  # the budget bit at step 2
    resumed = callback()
    ckpt = tmp_path / "full" / "ckpts" / "epoch=0-step=4.ckpt"  # an epoch's end: the data resumes exactly
    _fit(tmp_path / "resumed", resumed, LM(lora()), ckpt_path=str(ckpt), max_steps=6)
    assert [h["step"] for h in resumed.history] == [2, 4, 6]
    assert [h["alpha"] for h in resumed.history] == pytest.approx(
        [h["alpha"] for h in full.history], abs=1e-6
    )


def test_lora_module_with_other_trainable_parameters_is_refused(tmp_path):
    class WithHead(LM):
        def __init__(self) -> None:
            super().__init__(lora())
            self.extra = torch.nn.Linear(
                2, 2
            )  # trainable, outside the adapter: the LoRA path cannot merge it

    with pytest.raises(UsageError, match=r"'extra\.weight'"):
        _fit(tmp_path, CocktailCallback(), WithHead())
