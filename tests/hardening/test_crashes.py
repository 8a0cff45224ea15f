"""Crashes (issue 6): SIGKILL during a CLI merge or a resilient save, a full disk, stale temp folders.

The guarantees under test: the destination is always absent, the previous version or the complete new version,
never partial; a killed run's temp folder is recognised (its pid is dead) and removed by the next run; a write that
hits a full disk (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, so ``write`` fails with ``EFBIG``) ends with one clean
line naming the file and the fix, and leaves nothing behind. The unit-level SIGKILL test of ``atomic_dir`` lives
in ``tests/checkpoint/test_checkpoint_atomic.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from resilient_tune.cli import main

_SHAPES = {f"layers.{i}.w": (256, 256) for i in range(24)}  # 24 x 256 KiB: 6 MiB of output


def _write_model(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(*shape, generator=g) for key, shape in _SHAPES.items()}
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return state


def _digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder``."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _temps(dest: Path) -> list[Path]:
    return sorted(p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.rt-"))


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a file renamed or removed while we look
            total += path.stat().st_size
    return total


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("crash-inputs")
    states = [_write_model(root / f"m{i}", i) for i in range(2)]
    return [str(root / "m0"), str(root / "m1")], states


# --- SIGKILL during a CLI merge that replaces an existing destination ---------------------------------------------

# The child slows each tensor write down (a wrapper in this test, not a library hook) so that kills land mid-write.
_SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    import resilient_tune.checkpoint as checkpoint
    real_write = checkpoint.StreamingWriter.write
    def slow_write(self, key, tensor):
        real_write(self, key, tensor)
        time.sleep(0.03)
    checkpoint.StreamingWriter.write = slow_write
    from resilient_tune.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _kill_cli_merge(paths: list[str], out: Path, *, after_bytes: int | None, delay: float | None) -> int:
    """Start ``resilient-tune merge --overwrite`` in a child, SIGKILL it at the given moment; return its pid."""
    argv = ["merge", *paths, "--weights", "0.25", "0.75", "--out", str(out), "--overwrite", "-q"]
    process = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *argv])
    try:
        deadline = time.monotonic() + 120
        if delay is not None:
            time.sleep(delay)
        else:
            while time.monotonic() < deadline and process.poll() is None:
                temps = [t for t in _temps(out) if ".rt-tmp-" in t.name]
                if temps and _folder_bytes(temps[0]) >= (after_bytes or 0):
                    break
                time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it already finished
    finally:
        process.kill()
        process.wait()
    return process.pid


def _check_after_kill(out: Path, old: dict[str, str], expected: dict[str, torch.Tensor]) -> None:
    """``out`` is exactly the old folder or a complete new merge; never partial."""
    assert out.is_dir(), "the previous destination vanished"
    now = _digest(out)
    if now != old:
        merged = load_file(out / "model.safetensors")
        assert merged.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
        assert json.loads((out / "cocktail.json").read_text())["recipe"]["weights"] == [0.25, 0.75]


_KILL_POINTS = [
    pytest.param(1, None, id="first-byte"),
    pytest.param(2_000_000, None, id="after-2MB", marks=pytest.mark.slow),
    pytest.param(5_000_000, None, id="after-5MB", marks=pytest.mark.slow),
    *(
        pytest.param(
            None, random.Random(seed).uniform(0.5, 3.0), id=f"random-delay-{seed}", marks=pytest.mark.slow
        )
        for seed in range(3)
    ),
]


@pytest.mark.parametrize(("after_bytes", "delay"), _KILL_POINTS)
def test_sigkill_during_cli_merge_keeps_previous_destination(
    inputs: tuple[list[str], list[dict[str, torch.Tensor]]],
    tmp_path: Path,
    after_bytes: int | None,
    delay: float | None,
) -> None:
    paths, states = inputs
    out = tmp_path / "out"
    assert main(["merge", *paths, "--out", str(out), "-q"]) == 0  # the previous version: equal weights
    old = _digest(out)
    pid = _kill_cli_merge(paths, out, after_bytes=after_bytes, delay=delay)
    expected = {key: 0.25 * states[0][key] + 0.75 * states[1][key] for key in _SHAPES}
    _check_after_kill(out, old, expected)
    if after_bytes is not None:  # killed mid-write for sure: its temp folder is left, named by its pid
        assert [t.name.split("-")[2] for t in _temps(out)] == [str(pid)]
    # the next run recognises the dead process's temp folder, removes it, and commits
    assert main(["merge", *paths, "--weights", "0.25", "0.75", "--out", str(out), "--overwrite", "-q"]) == 0
    assert _temps(out) == []
    _check_after_kill(out, {}, expected)


# --- a full disk --------------------------------------------------------------------------------------------------

_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if sys.argv[2] == "cli":
        from resilient_tune.cli import main
        sys.exit(main(sys.argv[3:]))
    from resilient_tune import merge
    merge(sys.argv[3:5], out=sys.argv[5], overwrite=True)
    """
)


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "replacing"])
def test_full_disk_cli_merge_fails_cleanly(
    inputs: tuple[list[str], list[dict[str, torch.Tensor]]], tmp_path: Path, previous: bool
) -> None:
    paths, _ = inputs
    out = tmp_path / "out"
    if previous:
        assert main(["merge", *paths, "--out", str(out), "-q"]) == 0
    old = _digest(out) if previous else None
    argv = ["merge", *paths, "--out", str(out), "--overwrite", "-q"]
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, "1000000", "cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in (
        "resilient-tune: error:",
        "cannot write",
        "model.safetensors",
        "File too large",
        "free disk space",
    ):
        assert needle in done.stderr, done.stderr
    assert (_digest(out) if previous else out.exists()) == (old if previous else False)
    assert _temps(out) == []  # the failed run removed its own temp folder


def test_full_disk_api_merge_raises_oserror_and_writes_nothing(
    inputs: tuple[list[str], list[dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    paths, _ = inputs
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, "1000000", "api", *paths, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "OSError: [Errno 27] cannot write" in done.stderr and "free disk space" in done.stderr
    assert not out.exists() and _temps(out) == []


# --- SIGKILL during a resilient save inside a transformers Trainer --------------------------------------------------

# A GPT-2 of ~7M parameters (28 MB in float32): big enough that the resilient folder takes a while to write and
# fsync, so the parent can see its temp folder and kill the run there. Saves at steps 2 and 4; a callback placed
# after CocktailCallback prints "saved N" once checkpoint-N/resilient is committed.
_TRAINER_RUN = textwrap.dedent(
    """
    import os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, transformers
    sys.path.insert(0, sys.argv[2])
    from _tiny import token_examples
    from resilient_tune import CocktailCallback

    class Announce(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            print("saved", state.global_step, flush=True)

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=384, n_layer=4, n_head=4, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    args = transformers.TrainingArguments(
        output_dir=sys.argv[1], max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, save_steps=2,
        eval_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        save_only_model=True)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                   train_dataset=token_examples(32, 0, True),
                                   callbacks=[CocktailCallback(), Announce()])
    trainer.train(resume_from_checkpoint=sys.argv[3] if len(sys.argv) > 3 else None)
    print("done", flush=True)
    """
)
_TINY_DIR = str(Path(__file__).resolve().parents[1] / "integrations")


def _lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.slow
def test_sigkill_during_resilient_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", _TRAINER_RUN, str(run), _TINY_DIR],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = _lines(process)
    previous = run / "checkpoint-2" / "resilient"
    target = run / "checkpoint-4" / "resilient"
    try:
        while (line := lines.get(timeout=300)) != "saved 2":  # the Trainer also logs to stdout
            assert not line.startswith("saved"), line
        before = _digest(previous)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if target.parent.is_dir() and _temps(target):
                break
            time.sleep(0.0005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert _temps(target), "the kill did not land during the resilient save"
    assert _digest(previous) == before  # the previous resilient checkpoint is untouched
    assert json.loads((previous / "cocktail.json").read_text())["step"] == 2
    load_file(previous / "model.safetensors")
    if target.exists():  # the rename won the race with the kill: then the folder is complete
        assert json.loads((target / "cocktail.json").read_text())["step"] == 4
        load_file(target / "model.safetensors")
    # resuming from checkpoint-2 rewrites checkpoint-4/resilient and cleans the killed run's temp folder
    resumed = subprocess.run(
        [sys.executable, "-c", _TRAINER_RUN, str(run), _TINY_DIR, str(run / "checkpoint-2")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _temps(target) == []
    assert json.loads((target / "cocktail.json").read_text())["step"] == 4
    assert set(load_file(target / "model.safetensors")) >= {"transformer.wte.weight"}
