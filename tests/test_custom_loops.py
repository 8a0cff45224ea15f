"""Custom training loops drive the ``Cocktail`` session and reach what the callbacks reach: a plain PyTorch loop, an
accelerate loop and a Lightning Fabric loop, trained like a Hugging Face ``Trainer`` run with ``CocktailCallback``
(sequential batches, constant learning rate, AdamW without weight decay, no clipping, no dropout), make the same
decisions and write the same resilient weights; a plain loop resumed from its checkpoint in a new session continues
the α history exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _counting import LENGTH, VOCAB, tiny_gpt2  # noqa: E402  (tests/ on sys.path)
from safetensors.torch import load_file  # noqa: E402

from resilient_tune import Cocktail, CocktailCallback  # noqa: E402
from resilient_tune.errors import UsageError  # noqa: E402

STEPS, EVERY, LR = 8, 4, 1e-2


def _examples(n: int, seed: int, narrow: bool) -> list[dict[str, torch.Tensor]]:
    """The new task: one repeated pattern over tokens 0-11 (``narrow``); general text: random tokens 12-63."""
    g = torch.Generator().manual_seed(seed)
    if narrow:
        starts = torch.randint(0, 4, (n, 1), generator=g)
        ids = (starts + 3 * torch.arange(LENGTH)) % 12
    else:
        ids = torch.randint(12, VOCAB, (n, LENGTH), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


TRAIN, GENERAL = _examples(64, 0, True), _examples(16, 1, False)


def _session() -> Cocktail:
    return Cocktail(policy="budget", drift_budget=0.01, general_data=GENERAL, batch_size=8)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)


def _plain(out: Path, *, stop: int = STEPS, resume: Path | None = None) -> Cocktail:
    model, session, start = tiny_gpt2(), _session(), 0
    optimizer = _optimizer(model)
    if resume is not None:
        saved = torch.load(resume / "state.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        session.load_state_dict(saved["cocktail"])
        start = saved["step"]
    session.begin(model, step=start, base_dir=out / "resilient_base")
    if resume is None:
        session.keep_base(out / "resilient_base")
    for step, batch in enumerate(torch.utils.data.DataLoader(TRAIN, batch_size=8), start=1):
        if step <= start or step > stop:
            continue
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % EVERY == 0:
            session.decide(step, model)
            session.write(model, out / f"checkpoint-{step}" / "resilient", step)
            (out / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save({**state, "cocktail": session.state_dict()}, out / f"checkpoint-{step}" / "state.pt")
    session.write(model, out / "resilient")
    session.report(out / "cocktail_report.json")
    return session


def _accelerate(out: Path) -> Cocktail:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, session = tiny_gpt2(), _session()
    optimizer = _optimizer(model)
    session.begin(model, base_dir=out / "resilient_base")
    loader = torch.utils.data.DataLoader(TRAIN, batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for step, batch in enumerate(loader, start=1):
        model.train()
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % EVERY == 0:
            session.decide(step, accelerator.unwrap_model(model))
            session.write(accelerator.unwrap_model(model), out / f"checkpoint-{step}" / "resilient", step)
    return session


def _fabric(out: Path) -> Cocktail:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model, session = tiny_gpt2(), _session()
    optimizer = _optimizer(model)
    session.begin(model, base_dir=out / "resilient_base")
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(TRAIN, batch_size=8))
    for step, batch in enumerate(loader, start=1):
        model.train()
        fabric.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % EVERY == 0:
            session.decide(step, model.module)
            session.write(model.module, out / f"checkpoint-{step}" / "resilient", step)
    return session


def _trainer(out: Path) -> CocktailCallback:
    callback = CocktailCallback(policy="budget", drift_budget=0.01, general_data=GENERAL)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", eval_strategy="steps", eval_steps=EVERY, save_steps=EVERY,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=100,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=TRAIN, eval_dataset=GENERAL[:8], callbacks=[callback]
    )
    trainer.model_accepts_loss_kwargs = (
        False  # the loss a plain loop computes: the model's mean over its tokens
    )
    trainer.train()
    return callback


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, Cocktail]:
    out = tmp_path_factory.mktemp("plain")
    return out, _plain(out)


def _alphas(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["alpha"]) for h in history]


def _assert_same_folder(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(x) == sorted(y)
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0)


def test_plain_loop_decides_writes_and_reports(plain):
    out, session = plain
    history = session.history
    assert [h["step"] for h in history] == [4, 8]
    assert all(0.0 < h["alpha"] < 1.0 for h in history)  # the budget bit: a real search, not an end point
    assert all(h["general_loss"] <= h["general_loss_base"] * 1.01 + 1e-9 for h in history)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "resilient")
    assert loaded.config.n_layer == 2
    doc = json.loads((out / "checkpoint-4" / "resilient" / "cocktail.json").read_text())
    assert doc["step"] == 4 and doc["alpha"] == history[0]["alpha"]
    report = json.loads((out / "cocktail_report.json").read_text())
    assert _alphas(report["history"]) == _alphas(history)
    assert (out / "cocktail_report.png").is_file()


def test_a_trainer_with_the_callback_makes_the_same_decisions(plain, tmp_path):
    out, session = plain
    callback = _trainer(tmp_path)
    assert _alphas(callback.history) == _alphas(session.history)
    for step in (4, 8):
        _assert_same_folder(
            out / f"checkpoint-{step}" / "resilient", tmp_path / f"checkpoint-{step}" / "resilient"
        )


@pytest.mark.parametrize("loop", [_accelerate, _fabric], ids=["accelerate", "fabric"])
def test_accelerate_and_fabric_loops_make_the_same_decisions(plain, tmp_path, loop):
    out, session = plain
    other = loop(tmp_path)
    assert _alphas(other.history) == _alphas(session.history)
    for step in (4, 8):
        _assert_same_folder(
            out / f"checkpoint-{step}" / "resilient", tmp_path / f"checkpoint-{step}" / "resilient"
        )


def test_a_resumed_loop_continues_the_history(plain, tmp_path):
    out, session = plain
    resumed = _plain(tmp_path, resume=out / "checkpoint-4")
    assert _alphas(resumed.history) == _alphas(session.history)  # the same decisions, bit for bit
    assert (
        resumed.engine.snapshot.folder == (out / "resilient_base").resolve()
    )  # θ₀ reloaded, not the live weights
    _assert_same_folder(out / "resilient", tmp_path / "resilient")


def test_resuming_without_a_state_is_refused(tmp_path):
    session = _session()
    with pytest.raises(UsageError, match="not the base"):
        session.begin(tiny_gpt2(), step=4)
    session.load_state_dict({})
    with pytest.raises(UsageError, match="holds no CocktailCallback base snapshot"):
        session.begin(tiny_gpt2(), step=4)
