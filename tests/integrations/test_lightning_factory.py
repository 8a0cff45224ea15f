"""RESILIENT_TUNE=1: the callbacks_factory entry points add CocktailCallback to Lightning Trainers."""

from __future__ import annotations

import json
import logging

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from resilient_tune.errors import UsageError  # noqa: E402
from resilient_tune.integrations._lightning_factory import (  # noqa: E402
    ENV_OPTIONS,
    lightning_callbacks,
    options_from_env,
    pytorch_lightning_callbacks,
)
from resilient_tune.integrations.lightning import CocktailCallback  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in [k for k in os.environ if k.startswith("RESILIENT_TUNE")]:
        monkeypatch.delenv(name)


def test_off_does_nothing(caplog):
    assert options_from_env({}) is None
    assert options_from_env({"RESILIENT_TUNE": "0"}) is None
    with caplog.at_level(logging.WARNING):
        assert options_from_env({"RESILIENT_TUNE_ALPHA": "0.3", "RESILIENT_TUNE_TYPO": "1"}) is None
    assert "RESILIENT_TUNE is not 1" in caplog.text
    assert lightning_callbacks() == [] and pytorch_lightning_callbacks() == []


def test_options_are_parsed(tmp_path):
    general = tmp_path / "general.jsonl"
    general.write_text('{"input_ids": [1, 2], "labels": [1, 2]}\n')
    env = {
        "RESILIENT_TUNE": "true",
        "RESILIENT_TUNE_ALPHA": "0.3",
        "RESILIENT_TUNE_POLICY": "budget",
        "RESILIENT_TUNE_DRIFT_BUDGET": "0.1",
        "RESILIENT_TUNE_GENERAL_DATA": str(general),
        "RESILIENT_TUNE_METHOD": "dare_linear",
        "RESILIENT_TUNE_METHOD_OPTIONS": "density=0.5, lambda=1",
        "RESILIENT_TUNE_SNAPSHOT_DTYPE": "none",
        "RESILIENT_TUNE_SNAPSHOT_ON_DISK": "yes",
        "RESILIENT_TUNE_KL_TOP_K": "none",
        "RESILIENT_TUNE_MAX_SHARD_SIZE": "1000",
        "RESILIENT_TUNE_SEED": "3",
    }
    assert options_from_env(env) == {
        "alpha": 0.3,
        "policy": "budget",
        "drift_budget": 0.1,
        "general_data": str(general),
        "method": "dare_linear",
        "method_options": {"density": 0.5, "lambda": 1.0},
        "snapshot_dtype": None,
        "snapshot_on_disk": True,
        "kl_top_k": None,
        "max_shard_size": 1000,
        "seed": 3,
    }
    callback = CocktailCallback(**options_from_env(env))  # every option is a constructor argument
    assert callback.session.general_data["general_data"][0]["input_ids"].tolist() == [1, 2]
    assert {argument for argument, *_ in ENV_OPTIONS.values()} <= set(
        CocktailCallback.__init__.__code__.co_varnames
    )


def test_peers_and_temperature_from_the_environment(tmp_path):
    for name in ("a", "b"):  # peers must hold weights (checked at construction; read at fit start)
        (tmp_path / name).mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp_path / name / "model.safetensors"))
    env = {
        "RESILIENT_TUNE": "1",
        "RESILIENT_TUNE_POLICY": "cocktail",
        "RESILIENT_TUNE_PEERS": f"{tmp_path / 'a'}:{tmp_path / 'b'}",
        "RESILIENT_TUNE_TEMPERATURE": "0.5",
    }
    options = options_from_env(env)
    assert options["peers"] == [str(tmp_path / "a"), str(tmp_path / "b")] and options["temperature"] == 0.5
    assert options_from_env({**env, "RESILIENT_TUNE_PEERS": f"{tmp_path / 'a'},{tmp_path / 'b'}"}) == options
    callback = CocktailCallback(**options)
    assert callback.engine.num_peers == 2 and callback.session.policy.temperature == 0.5
    with pytest.raises(UsageError, match=r"RESILIENT_TUNE_PEERS=.*no such path"):
        options_from_env({**env, "RESILIENT_TUNE_PEERS": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (
            {"RESILIENT_TUNE": "1", "RESILIENT_TUNE_APLHA": "0.3"},
            r"RESILIENT_TUNE_APLHA.*RESILIENT_TUNE_ALPHA",
        ),
        ({"RESILIENT_TUNE": "1", "RESILIENT_TUNE_ALPHA": "half"}, r"RESILIENT_TUNE_ALPHA='half'.*\[0, 1\]"),
        ({"RESILIENT_TUNE": "1", "RESILIENT_TUNE_SAVE_RESILIENT": "maybe"}, "expected 1 | 0"),
        ({"RESILIENT_TUNE": "1", "RESILIENT_TUNE_GENERAL_DATA": "/no/such.jsonl"}, "no file"),
        ({"RESILIENT_TUNE": "2"}, "set it to 1"),
    ],
)
def test_bad_environment_is_a_clear_error(env, match):
    with pytest.raises(UsageError, match=match):
        options_from_env(env)


def _module() -> L.LightningModule:
    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Regressor()


def _loader() -> torch.utils.data.DataLoader:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8
    )


def _trainer(root, callbacks=None, **kw):
    options = dict(default_root_dir=str(root), max_steps=2, logger=False, enable_progress_bar=False)
    options.update(kw)
    return L.Trainer(callbacks=callbacks, **options)


def _cocktails(trainer) -> list[CocktailCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, CocktailCallback)]


def test_the_entry_point_adds_the_callback(tmp_path, monkeypatch):
    assert _cocktails(_trainer(tmp_path)) == []  # off: nothing added
    monkeypatch.setenv("RESILIENT_TUNE", "1")
    monkeypatch.setenv("RESILIENT_TUNE_ALPHA", "0.4")
    trainer = _trainer(tmp_path)
    (callback,) = _cocktails(trainer)
    assert callback.from_env and callback.alpha == 0.4
    trainer.fit(_module(), _loader())
    assert json.loads((tmp_path / "resilient" / "cocktail.json").read_text())["alpha"] == 0.4


def test_an_explicit_callback_wins_and_resumes_from_the_env_state(tmp_path, monkeypatch):
    monkeypatch.setenv("RESILIENT_TUNE", "1")
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1)
    _trainer(tmp_path, [every]).fit(_module(), _loader())  # saved under the env callback's state key
    ckpt = tmp_path / "ckpts" / "epoch=0-step=1.ckpt"
    assert list(torch.load(ckpt, weights_only=False)["callbacks"]) == [
        "CocktailCallback{'source': 'env'}",
        "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 1, 'every_n_epochs': 0, "
        "'train_time_interval': None}",
    ]
    explicit = CocktailCallback(alpha=0.2)
    trainer = _trainer(tmp_path / "resumed", [explicit], max_steps=3)  # no duplicate-state error
    trainer.fit(_module(), _loader(), ckpt_path=str(ckpt))
    (from_env,) = [cb for cb in _cocktails(trainer) if cb.from_env]
    assert not from_env.history and [h["step"] for h in explicit.history] == [1, 2, 3]  # history continued
    doc = json.loads((tmp_path / "resumed" / "resilient" / "cocktail.json").read_text())
    assert doc["alpha"] == 0.2 and doc["step"] == 3


def test_the_pytorch_lightning_entry_point(tmp_path, monkeypatch):
    pl = pytest.importorskip("pytorch_lightning")
    from resilient_tune.integrations.pytorch_lightning import CocktailCallback as PLCallback

    monkeypatch.setenv("RESILIENT_TUNE", "1")
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=False)
    (callback,) = [cb for cb in trainer.callbacks if isinstance(cb, PLCallback)]
    assert callback.from_env and isinstance(callback, pl.Callback)
