"""CocktailCallback inside real Lightning Trainer runs (one process, CPU) on tiny modules built in code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from resilient_tune.errors import UsageError  # noqa: E402
from resilient_tune.integrations.lightning import CocktailCallback  # noqa: E402

from ._tiny import BAD_OPTIONS, tiny_gpt2, token_examples  # noqa: E402

torch.set_num_threads(1)


class Regressor(L.LightningModule):
    """y = sum(x) with an MLP; tuple batches; ``training_step`` logs (muted while probing)."""

    def __init__(self, seed: int = 0, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n: int, seed: int, target: bool = True) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) if target else torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


TRAIN, VAL, GENERAL = _data(32, 0), _data(16, 1), _data(16, 2, target=False)


def _loader(data) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(root: Path, callbacks, **kw):
    options = dict(
        default_root_dir=str(root),
        max_steps=6,
        val_check_interval=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,
    )
    options.update(kw)
    return L.Trainer(callbacks=callbacks, **options)


def _fit(root: Path, callbacks, module=None, *, val=True, ckpt_path=None, **kw):
    module = module or Regressor()
    trainer = _trainer(root, callbacks, **kw)
    trainer.fit(module, _loader(TRAIN), _loader(VAL) if val else None, ckpt_path=ckpt_path)
    return trainer, module


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_mix(folder: Path, base: dict, tuned: dict) -> float:
    """``folder/model.safetensors`` is θ₀ + α(θ − θ₀), every key of the state dict, α from its cocktail.json."""
    alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
    written = load_file(str(folder / "model.safetensors"))
    assert sorted(written) == sorted(tuned)
    for key, value in written.items():
        expected = base[key] + alpha * (tuned[key] - base[key])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    return alpha


# ---------------------------------------------------------------------------- programmatic runs
@pytest.fixture(scope="module")
def zero_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    base = _state(Regressor())
    callback = CocktailCallback(alpha=0.3)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=2, save_top_k=-1)
    trainer, module = _fit(root, [callback, checkpoint], logger=CSVLogger(str(root)))
    return root, base, trainer, module, callback


def test_resilient_folder_is_the_mix_with_the_base(zero_config):
    root, base, _, module, _ = zero_config
    assert _assert_mix(root / "resilient", base, _state(module)) == 0.3
    doc = json.loads((root / "resilient" / "cocktail.json").read_text())
    assert doc["step"] == 6 and doc["recipe"]["weights"] == [0.3, 0.7]
    assert doc["probes"]["drift_norm"] > 0
    report = json.loads((root / "cocktail_report.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 4, 6]  # the sanity check is skipped
    assert report["final"]["alpha"] == 0.3
    assert not (root / "resilient" / "hf").exists()  # no transformers model inside


def test_each_checkpoint_has_its_resilient_companion(zero_config):
    root, base, *_ = zero_config
    for step in (2, 4, 6):
        stem = f"epoch={(step - 1) // 4}-step={step}"
        ckpt = torch.load(root / "ckpts" / f"{stem}.ckpt", weights_only=False)
        weights = {k: v for k, v in ckpt["state_dict"].items()}
        companion = root / "ckpts" / f"{stem}.resilient"
        assert _assert_mix(companion, base, weights) == 0.3
        assert json.loads((companion / "cocktail.json").read_text())["step"] == step
        stored = ckpt["callbacks"]["CocktailCallback"]
        assert [h["step"] for h in stored["history"]][-1] == step  # state and folder agree
        assert Path(stored["snapshot"]["folder"]) == (root / "resilient_base").resolve()


def test_metrics_reach_the_logger(zero_config):
    _, _, trainer, *_ = zero_config
    assert trainer.callback_metrics["cocktail/alpha"] == pytest.approx(0.3)
    assert trainer.callback_metrics["cocktail/drift_norm"] > 0
    header, *rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("cocktail/alpha")
    logged = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert logged == pytest.approx([0.3, 0.3, 0.3])  # once per validation (logged as float32)


def test_the_checkpoint_io_is_given_back(zero_config):
    _, _, trainer, *_ = zero_config
    assert type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


def test_probing_leaves_training_bit_exact(tmp_path):
    _, plain = _fit(tmp_path / "plain", [], enable_checkpointing=False)
    callback = CocktailCallback(policy="budget", drift_budget=0.02, general_data=GENERAL, target_data=VAL)
    _, probed = _fit(tmp_path / "probed", [callback], enable_checkpointing=False)
    assert sum(h["probe_passes"] for h in callback.history) > 3  # candidates were swapped in and out
    assert "target_loss" in callback.history[-1]
    for key, value in _state(plain).items():
        assert torch.equal(value, probed.state_dict()[key]), key


def test_budget_metrics_drive_model_checkpoint(tmp_path):
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=GENERAL)
    best = ModelCheckpoint(
        dirpath=tmp_path / "best", monitor="cocktail/general_loss", mode="min", save_top_k=1
    )
    _fit(tmp_path, [callback, best], Regressor(lr=0.3))
    losses = {h["step"]: h["general_loss"] for h in callback.history}
    assert best.best_model_score == pytest.approx(min(losses.values()), rel=1e-6)
    final = callback.history[-1]
    assert final["general_loss"] <= (1 + 0.05) * final["general_loss_base"] * (1 + 1e-6)
    first = callback.history[0]  # a run's first decision measures the fine-tuned model
    assert first["general_loss_finetuned"] > (1 + 0.05) * first["general_loss_base"]  # the bound bites
    assert all(h["alpha"] < 1 for h in callback.history)
    (kept,) = (tmp_path / "best").glob("*.ckpt")  # the rotated-out companions went with their files
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [kept.name, kept.stem + ".resilient"]


def test_a_confidence_bound_uses_the_probe_batches_of_a_lightning_module(tmp_path):
    from resilient_tune.policy import BudgetPolicy

    callback = CocktailCallback(policy=BudgetPolicy(0.05, confidence=0.95), general_data=GENERAL)
    _fit(tmp_path, [callback], Regressor(lr=0.3))
    for entry in callback.history:  # the module's own scalar loss: one unit per probe batch (16 examples / 8)
        assert entry["general_loss_units"] == 2
        assert entry["general_loss_bound"] >= entry["general_loss"]
        assert entry["decision"]["loss"] <= entry["decision"]["threshold"]
        assert entry["general_loss_bound"] <= entry["decision"]["threshold"] * (1 + 1e-9)
    assert callback.history[0]["general_loss_finetuned"] > (1 + 0.05) * callback.history[0]["general_loss_base"]


def test_rotation_removes_companions_with_their_checkpoints(tmp_path):
    latest = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=1, monitor="step", mode="max"
    )
    _fit(tmp_path, [CocktailCallback(), latest], val=False, max_steps=6)
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["epoch=1-step=6.ckpt", "epoch=1-step=6.resilient"]
    doc = json.loads((tmp_path / "ckpts" / "epoch=1-step=6.resilient" / "cocktail.json").read_text())
    assert doc["step"] == 6  # decided at the save (no validation in this run)


# ---------------------------------------------------------------------------- resume
def _resume_run(root: Path, *, ckpt=None, seed=0):
    callback = CocktailCallback(policy="budget", drift_budget=0.05, general_data=GENERAL)
    every = ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=2, save_top_k=-1)
    _, module = _fit(root, [callback, every], Regressor(seed=seed, lr=0.3), ckpt_path=ckpt, max_steps=8)
    return callback, module


def test_resume_reloads_the_base_and_continues_the_history(tmp_path):
    full, _ = _resume_run(tmp_path / "full")
    run = tmp_path / "moved"
    shutil.copytree(tmp_path / "full" / "resilient_base", run / "resilient_base")
    shutil.rmtree(tmp_path / "full" / "resilient_base")  # the recorded path is gone: the moved copy is used
    ckpt = tmp_path / "full" / "ckpts" / "epoch=0-step=4.ckpt"
    resumed, module = _resume_run(run, ckpt=str(ckpt), seed=7)  # other initial weights: never taken as θ₀
    assert [h["step"] for h in resumed.history] == [2, 4, 6, 8]
    for a, b in zip(resumed.history, full.history):
        assert a["alpha"] == pytest.approx(b["alpha"], abs=1e-6)
    assert 0 < resumed.history[-1]["alpha"] < 1
    _assert_mix(run / "resilient", _state(Regressor(seed=0)), _state(module))


def test_resume_without_callback_state_is_refused(tmp_path):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    _fit(tmp_path, [every], max_steps=2)
    ckpt = next((tmp_path / "ckpts").glob("*.ckpt"))
    with pytest.raises(UsageError, match="not the base"):
        _fit(tmp_path, [CocktailCallback()], ckpt_path=str(ckpt), max_steps=4)


# ---------------------------------------------------------------------------- transformers model inside
transformers = pytest.importorskip("transformers")


class TinyLM(L.LightningModule):
    """A tiny GPT-2 (tied embeddings) trained with its own loss on dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def _tokens(n: int, seed: int, narrow: bool) -> list[dict[str, torch.Tensor]]:
    return token_examples(n, seed, narrow, tensors=True)


def test_transformers_module_gets_an_hf_folder(tmp_path):
    base = _state(TinyLM())
    general = tmp_path / "general.jsonl"  # probe data from a file, as LightningCLI / the env flag give it
    general.write_text(
        "".join(json.dumps({k: v.tolist() for k, v in e.items()}) + "\n" for e in _tokens(8, 2, False))
    )
    callback = CocktailCallback(policy="budget", drift_budget=0.02, general_data=str(general))
    module = TinyLM()
    trainer = _trainer(tmp_path, [callback], max_steps=4)
    trainer.fit(module, _loader(_tokens(32, 0, True)), _loader(_tokens(8, 1, True)))
    tuned = _state(module)
    alpha = _assert_mix(tmp_path / "resilient", base, tuned)  # tied lm_head.weight included
    assert callback.history[0]["general_kl"] > 0  # KL measured on the transformers LM (at α = 1, first decision)
    assert callback.history[-1]["general_kl_merged"] > 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resilient" / "hf")
    for key, value in loaded.state_dict().items():
        expected = base[f"model.{key}"] + alpha * (tuned[f"model.{key}"] - base[f"model.{key}"])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    doc = json.loads((tmp_path / "resilient" / "hf" / "cocktail.json").read_text())
    assert doc["alpha"] == alpha
    companion = next((tmp_path / "checkpoints").glob("*.resilient"))
    assert (companion / "hf" / "config.json").is_file()


# ---------------------------------------------------------------------------- other paths
def test_snapshot_on_disk_moves_to_the_base_folder(tmp_path):
    callback = CocktailCallback(snapshot_on_disk=True)
    _, module = _fit(tmp_path, [callback], max_steps=2)
    snapshot = callback.engine.snapshot
    assert snapshot.storage == "disk" and snapshot.nbytes == 0
    assert snapshot.folder == (tmp_path / "resilient_base").resolve()
    assert not (tmp_path / "resilient_base.pending").exists()
    _assert_mix(tmp_path / "resilient", _state(Regressor()), _state(module))


def test_custom_score_fn_and_manual_optimization(tmp_path):
    calls = []

    def score(module, batch):
        calls.append(module.training)
        x, y = batch
        return torch.nn.functional.l1_loss(module.net(x), y)

    callback = CocktailCallback(general_data=_loader(GENERAL), score_fn=score)
    _fit(tmp_path / "score", [callback], enable_checkpointing=False, max_steps=2)
    assert calls and not any(calls)  # probes ran in eval mode through the user's score
    assert callback.history[0]["general_loss_base"] > 0

    class Manual(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.optimizers().zero_grad()
            self.manual_backward(loss)
            self.optimizers().step()

    with pytest.raises(UsageError, match="score_fn"):
        _fit(
            tmp_path / "manual",
            [CocktailCallback(general_data=GENERAL)],
            Manual(),
            enable_checkpointing=False,
        )


def test_probes_follow_the_precision_plugin(tmp_path):
    callback = CocktailCallback(policy="budget", general_data=GENERAL)
    _, module = _fit(tmp_path, [callback], precision="bf16-true", max_steps=2, enable_checkpointing=False)
    assert next(module.parameters()).dtype == torch.bfloat16  # float32 probe inputs were cast like training's
    assert callback.history[-1]["general_loss_base"] > 0
    written = load_file(str(tmp_path / "resilient" / "model.safetensors"))
    assert (
        written["net.0.weight"].dtype == torch.bfloat16
    )  # merged in float32, written in the parameters' dtype


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        *BAD_OPTIONS,
        ({"general_data": 3}, UsageError, "DataLoader"),
        ({"general_data": "/no/such/file.jsonl"}, UsageError, "cannot read"),
    ],
)
def test_bad_input_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CocktailCallback(**kwargs)


def test_pytorch_lightning_trainer_with_the_lightning_callback_names_the_import(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from resilient_tune.integrations.pytorch_lightning import CocktailCallback as PLCallback

    class PLRegressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    options = dict(default_root_dir=str(tmp_path), max_steps=2, logger=False, enable_progress_bar=False)
    wrong = pl.Trainer(callbacks=[CocktailCallback()], **options)
    with pytest.raises(UsageError, match=r"from resilient_tune\.integrations\.pytorch_lightning import"):
        wrong.fit(PLRegressor(), _loader(TRAIN))
    with pytest.raises(UsageError, match=r"from resilient_tune\.integrations\.lightning import"):
        _fit(tmp_path / "other", [PLCallback()])
    right = pl.Trainer(callbacks=[PLCallback(alpha=0.2)], **options)
    right.fit(PLRegressor(), _loader(TRAIN))
    assert json.loads((tmp_path / "resilient" / "cocktail.json").read_text())["alpha"] == 0.2


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setattr(CocktailCallback, "_import_error", ImportError("No module named 'lightning'"))
    with pytest.raises(ImportError, match=r"pip install 'resilient-tune\[lightning\]'"):
        CocktailCallback()


def test_fsdp1_strategy_is_refused_with_the_fsdp2_way(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy

    # Lightning builds FSDPStrategy only on GPUs: put one in a CPU Trainer to reach the callback's check
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False)
    monkeypatch.setattr(trainer._accelerator_connector, "strategy", FSDPStrategy())
    with pytest.raises(NotImplementedError, match=r"FSDPStrategy.*ModelParallelStrategy.*fully_shard"):
        CocktailCallback().setup(trainer, Regressor(), "fit")
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.fixture
def full_disk(monkeypatch):
    """Every resilient folder write fails as a full disk would (the engine's folder writer raises ENOSPC)."""
    import resilient_tune.engine._full_write as engine_full

    def write_model_folder(folder, *args, **kwargs):
        raise OSError(28, f"No space left on device: {folder}")

    monkeypatch.setattr(engine_full, "write_model_folder", write_model_folder)


def test_failed_save_is_logged_and_training_goes_on(tmp_path, caplog, full_disk):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    csv = CSVLogger(tmp_path, name="logs")
    callback = CocktailCallback(alpha=0.3)
    trainer, _ = _fit(tmp_path, [callback, every], logger=csv)
    assert trainer.global_step == 6  # the run reached its end (max_steps)
    failures = callback.save_failures
    assert [f["step"] for f in failures] == [2, 4, 6, 6]  # three companions, then the final folder
    assert all("No space left" in f["error"] for f in failures)
    assert "FAILED" in caplog.text and "strict=True" in caplog.text
    assert not list(tmp_path.rglob("*.resilient*")) and not (tmp_path / "resilient").exists()
    report = json.loads((tmp_path / "cocktail_report.json").read_text())
    assert len(report["save_failures"]) == 4
    logged = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert "cocktail/save_failed" in logged


def test_failed_save_stops_the_run_in_strict_mode(tmp_path, full_disk):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(OSError, match="No space left"):
        _fit(tmp_path, [CocktailCallback(alpha=0.3, strict=True), every])
