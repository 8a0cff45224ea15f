"""atomic_dir / check_destination: commit, rollback, overwrite, stale cleanup, and SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resilient_tune.checkpoint import atomic_dir, check_destination
from resilient_tune.errors import UsageError


def _siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.rt-"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_success_commits_complete_folder(tmp_path: Path) -> None:
    dest = tmp_path / "deep" / "out"
    with atomic_dir(dest) as temp:
        assert temp.parent == dest.parent and temp.name.startswith(".out.rt-tmp-") and not dest.exists()
        (temp / "a.txt").write_text("a")
        (temp / "sub").mkdir()
        (temp / "sub" / "b.txt").write_text("b")
    assert (dest / "a.txt").read_text() == "a" and (dest / "sub" / "b.txt").read_text() == "b"
    assert _siblings(dest) == []


def test_exception_removes_temp_and_propagates(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(KeyError, match="boom"), atomic_dir(dest) as temp:
        (temp / "a.txt").write_text("a")
        raise KeyError("boom")
    assert not dest.exists() and _siblings(dest) == []


def test_existing_destination_is_refused_before_any_work(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    ran = False
    with pytest.raises(UsageError, match=r"already exists; pass overwrite=True \(--overwrite"):  # noqa: SIM117
        with atomic_dir(dest):
            ran = True
    assert not ran and (dest / "keep.txt").read_text() == "old" and _siblings(dest) == []


def test_overwrite_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_dir(dest, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"] and _siblings(dest) == []


def test_overwrite_a_symlinked_destination_replaces_the_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    dest = tmp_path / "out"
    dest.symlink_to(target)
    with atomic_dir(dest, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
    assert not dest.is_symlink() and sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert (target / "old.txt").read_text() == "old" and _siblings(dest) == []


def test_overwrite_then_exception_keeps_old(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
        raise RuntimeError
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"] and _siblings(dest) == []


def test_bad_destinations(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_destination(tmp_path / "file", overwrite=True)
    with pytest.raises(UsageError, match="already exists"):
        check_destination(tmp_path / "file", overwrite=False)
    with pytest.raises(UsageError, match=r"cannot create .*file is a file"):
        check_destination(tmp_path / "file" / "sub" / "out", overwrite=False)
    with pytest.raises(UsageError, match="cannot create"), atomic_dir(tmp_path / "file" / "out"):
        pass
    assert check_destination(tmp_path / "x" / ".." / "new", overwrite=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()


def test_stale_temp_of_dead_process_is_removed(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dead = tmp_path / f".out.rt-tmp-{_dead_pid()}-0badcafe"
    dead.mkdir()
    (dead / "partial").write_text("x")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".out.rt-tmp-{sleeper.pid}-00c0ffee"
        alive.mkdir()
        other = tmp_path / f".other.rt-tmp-{_dead_pid()}-00000000"
        other.mkdir()
        with atomic_dir(dest) as temp:
            (temp / "a").write_text("a")
        assert not dead.exists() and alive.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_old_folder_left_aside_is_restored(tmp_path: Path) -> None:
    """A kill between 'rename dest aside' and 'rename new in' leaves dest absent; the next call restores it."""
    dest = tmp_path / "out"
    aside = tmp_path / f".out.rt-old-{_dead_pid()}-12345678"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists"), atomic_dir(dest):
        pass
    assert (dest / "old.txt").read_text() == "old" and _siblings(dest) == []


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from resilient_tune.checkpoint import StreamingWriter, TensorInfo, atomic_dir

    plan = {f"t{i}": TensorInfo(torch.float32, (4096,)) for i in range(100)}
    with atomic_dir(sys.argv[1], overwrite=True) as temp:
        with StreamingWriter(temp, plan, max_shard_size="64KB") as writer:
            for i, key in enumerate(plan):
                writer.write(key, torch.full((4096,), float(i)))
                if i == 5:
                    print("writing", flush=True)
                time.sleep(0.05)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing"])
def test_sigkill_mid_write_leaves_no_partial_destination(tmp_path: Path, existing: bool) -> None:
    dest = tmp_path / "out"
    if existing:
        dest.mkdir()
        (dest / "old.txt").write_text("old")
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(dest)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "writing"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    if existing:
        assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    else:
        assert not dest.exists()
    (stale,) = _siblings(dest)
    assert stale.startswith(f".out.rt-tmp-{process.pid}-")
    assert any((tmp_path / stale).iterdir())  # it was mid-write: shards on disk
    with atomic_dir(dest, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
    assert _siblings(dest) == [] and sorted(p.name for p in dest.iterdir()) == ["new.txt"]
