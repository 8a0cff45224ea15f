"""How the Lightning ``CocktailCallback`` follows checkpoint files: a wrapper of the strategy's ``CheckpointIO`` (rank 0
saves) and of ``strategy.save_checkpoint`` (strategies that save on every rank), and the companion folder's name."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

__all__ = ["COMPANION_SUFFIX", "CollectiveSave", "ResilientCheckpointIO", "companion_folder"]

COMPANION_SUFFIX = ".resilient"


class ResilientCheckpointIO:
    """Wraps the strategy's ``CheckpointIO``: after a checkpoint file is saved, its resilient companion is written;
    when it is removed (``ModelCheckpoint`` rotation), the companion goes too. Everything else is delegated.

    The strategy calls its ``CheckpointIO`` on global rank 0 only, so companions are written once.
    """

    def __init__(self, inner: Any, callback: Any) -> None:
        self._inner = inner
        self._callback = callback

    @classmethod
    def install(cls, strategy: Any, callback: Any) -> ResilientCheckpointIO:
        io_base = importlib.import_module(f"{callback._package}.plugins.io").CheckpointIO
        wrapper_class = type("ResilientCheckpointIO", (cls, io_base), {})
        wrapper = wrapper_class(strategy.checkpoint_io, callback)  # the getter configures wrapped plugins
        wrapper._strategy = strategy
        strategy.checkpoint_io = wrapper
        return wrapper

    def uninstall(self) -> None:
        strategy = getattr(self, "_strategy", None)
        if strategy is not None and strategy.checkpoint_io is self:
            strategy.checkpoint_io = self._inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self._callback.write_companion(path)

    def remove_checkpoint(self, path: Any) -> None:
        self._inner.remove_checkpoint(path)
        self._callback.remove_companion(path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._inner.load_checkpoint(path, *args, **kwargs)

    def teardown(self) -> None:
        self._inner.teardown()

    def __getattr__(self, name: str) -> Any:  # any other plugin API (e.g. AsyncCheckpointIO's)
        if name.startswith("__") or name in ("_inner", "_callback", "_strategy"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class CollectiveSave:
    """Wraps ``strategy.save_checkpoint`` of a strategy that saves on every rank (``ModelParallelStrategy``,
    ``DeepSpeedStrategy``): after the checkpoint is saved, every rank writes its resilient companion together."""

    def __init__(self, strategy: Any, callback: Any) -> None:
        self._strategy = strategy
        self._callback = callback
        self._inner = strategy.save_checkpoint

    @classmethod
    def install(cls, strategy: Any, callback: Any) -> CollectiveSave:
        saver = cls(strategy, callback)
        strategy.save_checkpoint = saver  # an instance attribute: the class method stays untouched
        return saver

    def uninstall(self) -> None:
        if self._strategy.__dict__.get("save_checkpoint") is self:
            del self._strategy.save_checkpoint

    def __call__(self, checkpoint: dict[str, Any], filepath: Any, *args: Any, **kwargs: Any) -> None:
        self._inner(checkpoint, filepath, *args, **kwargs)
        self._callback.write_companion(filepath, collective=True)


def companion_folder(checkpoint_path: Any) -> Path | None:
    """``<stem>.resilient`` next to ``<stem>.ckpt``; ``None`` for a remote (non-local) path."""
    text = os.fspath(checkpoint_path)
    if "://" in text and not text.startswith("file://"):
        return None
    path = Path(text.removeprefix("file://"))
    stem = path.name[: -len(".ckpt")] if path.name.endswith(".ckpt") else path.name
    return path.with_name(stem + COMPANION_SUFFIX)
