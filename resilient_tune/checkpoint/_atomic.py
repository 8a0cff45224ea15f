"""Atomic folder commit: build a checkpoint in a temporary sibling folder, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from resilient_tune.errors import UsageError

_TEMP = "tmp"  # a folder being built
_ASIDE = "old"  # an existing destination moved aside while being replaced


def check_destination(dest: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Check that ``dest`` can become a checkpoint folder, without touching anything.

    Args:
        dest: The folder to create or replace.
        overwrite: Whether an existing ``dest`` folder may be replaced.

    Returns:
        ``dest`` as an absolute, normalised path.

    Raises:
        UsageError: ``dest`` exists and ``overwrite`` is false, ``dest`` is a file, or its parent is a file
            or cannot be created or written.
    """
    path = Path(os.path.abspath(os.path.expanduser(dest)))
    if path.name in ("", ".", ".."):
        raise UsageError(f"destination {str(dest)!r} does not name a folder; pass a path such as ./merged")
    if os.path.lexists(path):
        if not overwrite:
            raise UsageError(
                f"destination {path} already exists; pass overwrite=True (--overwrite on the command line) to "
                "replace it, or choose another path"
            )
        if not path.is_dir():
            raise UsageError(f"destination {path} is a file, not a folder; remove it or choose another path")
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot create {path}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create {path}: {ancestor} is not writable; choose another path")
    return path


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dest``; on success, fsync it and rename it to ``dest``.

    The temporary folder is ``.{dest.name}.rt-tmp-{pid}-{random}`` in ``dest``'s parent (same filesystem, so
    the final rename is atomic). On an exception inside the ``with`` block it is removed and the exception
    propagates. With ``overwrite=True`` an existing ``dest`` is renamed aside (``.{name}.rt-old-...``), the new
    folder renamed in, and the old one deleted. The destination checks run before the block, so a bad
    destination fails before any work.

    A SIGKILL at any moment leaves ``dest`` absent, old or complete, never partial. Leftovers of killed runs
    (folders whose pid is no longer alive) are cleaned up by the next ``atomic_dir`` for the same ``dest``; an
    old folder left aside mid-replacement is renamed back to ``dest`` if ``dest`` is missing.

    Args:
        dest: The folder to create or replace.
        overwrite: Whether an existing ``dest`` folder may be replaced.

    Yields:
        The temporary folder to write into.

    Raises:
        UsageError: See :func:`check_destination`; also if ``dest`` appears while the block runs and
            ``overwrite`` is false.
    """
    path = Path(os.path.abspath(os.path.expanduser(dest)))
    _recover_stale(path)
    path = check_destination(path, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = _sibling(path, _TEMP)
        temp.mkdir()
    except OSError as exc:
        raise UsageError(f"cannot create a folder beside {path}: {exc}; choose another path") from exc
    try:
        yield temp
        _fsync_tree(temp)
        _commit(temp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _commit(temp: Path, dest: Path, *, overwrite: bool) -> None:
    if not os.path.lexists(dest):
        os.rename(temp, dest)
        _fsync_dir(dest.parent)
        return
    if not overwrite:
        raise UsageError(f"destination {dest} appeared while writing; pass overwrite=True to replace it")
    aside = _sibling(dest, _ASIDE)
    os.rename(dest, aside)
    try:
        os.rename(temp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    _fsync_dir(dest.parent)  # the new folder is durable in place before the old one goes
    _remove(aside)


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.rt-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _recover_stale(dest: Path) -> None:
    """Remove temp folders of ``dest`` left by dead processes; restore an old ``dest`` left aside if needed."""
    if not dest.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.rt-({_TEMP}|{_ASIDE})-(\d+)-[0-9a-f]+")
    for entry in sorted(dest.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match[2])):
            continue
        if match[1] == _ASIDE and not os.path.lexists(dest):
            os.rename(entry, dest)
        else:
            _remove(entry)


def _remove(path: Path) -> None:
    """Delete a folder tree, or just the link if ``path`` is a symlink (the old ``dest`` may have been one)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (conservatively true when it cannot be told)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but belongs to someone else
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
