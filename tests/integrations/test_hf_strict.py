"""A failed resilient save never stops training unless ``strict=True``; an unwritable output folder is refused at
train begin. Real ``transformers.Trainer`` runs on the tiny GPT-2; the failure is a real ``OSError`` raised in the
middle of writing a shard (no space left on the device), so the tests also see that nothing half-written stays."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from resilient_tune.checkpoint import StreamingWriter  # noqa: E402
from resilient_tune.errors import UsageError  # noqa: E402
from resilient_tune.integrations.transformers import CocktailCallback  # noqa: E402
from resilient_tune.session import Cocktail  # noqa: E402

from ._tiny import tiny_gpt2, token_examples  # noqa: E402
from .test_hf_callback import TRAIN, _args, _run  # noqa: E402


@pytest.fixture
def disk_full_at_step_2(monkeypatch):
    """Writing a shard into ``checkpoint-2/resilient`` fails after its first tensor: ENOSPC."""
    original = StreamingWriter.write
    calls = {"n": 0}

    def write(self, key, tensor):
        if Path(self.folder).parent.name == "checkpoint-2":
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.folder))
        return original(self, key, tensor)

    monkeypatch.setattr(StreamingWriter, "write", write)
    return calls


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*rt-tmp*")]


def test_failed_save_is_logged_and_training_continues(tmp_path, disk_full_at_step_2, caplog):
    callback = CocktailCallback()
    with caplog.at_level(logging.ERROR, logger="resilient_tune"):
        trainer = _run(tmp_path, callback)
    assert trainer.state.global_step == 4  # the run went on
    assert disk_full_at_step_2["n"] > 1  # the failure did happen, mid-write
    folder = tmp_path / "checkpoint-2" / "resilient"
    assert not folder.exists() and not _leftovers(tmp_path)  # nothing half-written
    assert (tmp_path / "checkpoint-4" / "resilient" / "model.safetensors").is_file()
    assert (tmp_path / "resilient" / "model.safetensors").is_file()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert str(folder) in message and "No space left on device" in message and "strict=True" in message
    logged = [e for e in trainer.state.log_history if "cocktail/save_failed" in e]
    assert logged and logged[0]["cocktail/save_failed"] == 1 and logged[0]["step"] == 2
    assert callback.save_failures == [
        {"step": 2, "path": str(folder), "error": callback.save_failures[0]["error"]}
    ]
    assert "OSError" in callback.save_failures[0]["error"]
    assert callback.history[-1]["save_failed"] == 1  # later decisions carry the count (cocktail/save_failed)
    report = json.loads((tmp_path / "cocktail_report.json").read_text())
    assert report["save_failures"] == callback.save_failures
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    stored = saved["stateful_callbacks"]["CocktailCallback"]["attributes"]["_resume_state"]
    assert stored["save_failures"] == callback.save_failures  # kept for a resumed run


def test_strict_mode_raises_and_leaves_nothing_half_written(tmp_path, disk_full_at_step_2):
    with pytest.raises(OSError, match="No space left on device"):
        _run(tmp_path, CocktailCallback(strict=True))
    assert not (tmp_path / "checkpoint-2" / "resilient").exists() and not _leftovers(tmp_path)
    assert not (tmp_path / "checkpoint-4").exists()  # the run stopped at the failed save


def test_a_non_finite_merge_result_is_a_failed_save(tmp_path, monkeypatch, caplog):
    """A NaN reaching the merged weights (here: a corrupted base snapshot) is refused before anything is written."""
    callback = CocktailCallback()
    original = Cocktail.begin

    def corrupt(self, model, **kwargs):
        original(self, model, **kwargs)
        name = self.engine.snapshot.names[0]
        self.engine.snapshot.get(name).fill_(float("nan"))

    monkeypatch.setattr(Cocktail, "begin", corrupt)
    with caplog.at_level(logging.ERROR, logger="resilient_tune"):
        trainer = _run(tmp_path, callback, save_strategy="no")
    assert trainer.state.global_step == 4
    assert not (tmp_path / "resilient").exists() and not _leftovers(tmp_path)
    assert [f["path"] for f in callback.save_failures] == [str(tmp_path / "resilient")]
    assert "NonFiniteError" in callback.save_failures[0]["error"]
    with pytest.raises(Exception, match=r"(?i)nan|non-finite"):
        _run(tmp_path / "strict", CocktailCallback(strict=True), save_strategy="no")


def test_output_folder_not_writable_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    trainer = transformers.Trainer(  # the Trainer creates output_dir here...
        model=tiny_gpt2(),
        args=_args(out, save_strategy="no", eval_strategy="no"),
        train_dataset=TRAIN,
        callbacks=[CocktailCallback()],
    )
    shutil.rmtree(out)
    out.write_text("not a folder")  # ...and then it cannot hold files (a real failure, also as root)
    with pytest.raises(UsageError, match="not writable") as caught:
        trainer.train()
    message = str(caught.value)
    assert str(out) in message and "save_resilient=False" in message and "permissions" in message
    assert trainer.state.global_step == 0  # refused before the first step
    assert out.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="not writable"):
            _run(out, CocktailCallback(), save_strategy="no")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_save_resilient_false_skips_the_check_and_a_failed_report_only_logs(tmp_path, caplog):
    out = tmp_path / "run"
    callback = CocktailCallback(save_resilient=False)
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=_args(out, save_strategy="no", eval_strategy="no", max_steps=2),
        train_dataset=token_examples(8, 0, True),
        callbacks=[callback],
    )
    shutil.rmtree(out)
    out.write_text("not a folder")
    with caplog.at_level(logging.ERROR, logger="resilient_tune"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert [f["path"] for f in callback.save_failures] == [str(out / "cocktail_report.json")]
    assert any(str(out / "cocktail_report.json") in r.getMessage() for r in caplog.records)
