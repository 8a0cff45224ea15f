"""The folders a Lightning run writes, and how the ranks agree on their failures.

:class:`LightningWriter` writes ``<ckpt stem>.resilient/`` next to each checkpoint file and the final
``<default_root_dir>/resilient/`` through the session: every ``state_dict`` key of the ``LightningModule`` at θ(α),
``cocktail.json``, a model card and, when the module holds a transformers model, ``hf/`` (that model,
``from_pretrained``-loadable, written from the same merged tensors). A checkpoint's companion is written from the
rank-0 ``CheckpointIO``, or, under strategies that save on every rank, collectively; a failure on rank 0 alone is held
and every rank learns it at the next hook they all run (:meth:`LightningWriter.agree`), so no rank is left waiting.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from resilient_tune.checkpoint import atomic_dir
from resilient_tune.distributed import on_rank_zero
from resilient_tune.engine import LoraEngine
from resilient_tune.folder import SubFolder
from resilient_tune.session import Cocktail

from ._lightning_data import find_tokenizer, transformers_model
from ._lightning_io import companion_folder

__all__ = ["HF_FOLDER", "LightningWriter"]

logger = logging.getLogger("resilient_tune.integrations.lightning")

HF_FOLDER = "hf"


class LightningWriter:
    """Resilient folders of one Lightning run (see the module docs).

    Args:
        session: The callback's session.
        trainer: The Lightning ``Trainer``.
        module: The ``LightningModule``.
        collective: The strategy saves checkpoints on every rank (its parameters may be sharded).
    """

    def __init__(self, session: Cocktail, trainer: Any, module: Any, collective: bool) -> None:
        self.session, self.trainer, self.module, self.collective = session, trainer, module, collective
        self.deferred: tuple[str, Exception, Path, int] | None = None  # a rank-0 failure not yet agreed on
        self.saves_to_agree = 0
        self._warned_remote = False

    # ------------------------------------------------------------------ companions
    def companion(self, checkpoint_path: Any, *, collective: bool = False) -> None:
        """Write ``<stem>.resilient/`` next to a checkpoint just saved: from the rank-0 ``CheckpointIO``, or, with
        ``collective``, from the sharded strategies' ``save_checkpoint``, which **every rank** runs (the path is rank
        0's). Each strategy writes through one of the two; the other call does nothing."""
        if collective != self.collective:
            return
        if collective:
            checkpoint_path = self.trainer.strategy.broadcast(checkpoint_path, src=0)
        folder = companion_folder(checkpoint_path)
        if folder is None:
            if not self._warned_remote:
                logger.warning("CocktailCallback: %s is not a local path; no resilient copy", checkpoint_path)
                self._warned_remote = True
            return
        step = self.trainer.global_step
        if collective:
            self.session.write(self.module, folder, step, collective=True, **self._full_options())
        else:
            self.rank_zero(lambda: self.folder(folder, step, None), f"writing {folder}", folder)

    def remove(self, checkpoint_path: Any) -> None:
        folder = companion_folder(checkpoint_path)
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder)

    def final(self, folder: Path, step: int, entry: Mapping[str, Any]) -> None:
        """The run's final folder; every rank calls it and learns the outcome (a failure follows ``strict``)."""
        if self.collective:  # the gather needs every rank
            self.session.write(
                self.module, folder, step, entry=entry, collective=True, **self._full_options()
            )
        else:
            write = lambda: self.folder(folder, step, entry)  # noqa: E731
            self.session.guarded(lambda: on_rank_zero(write, f"writing {folder}"), folder, step)

    def folder(self, folder: Path, step: int, entry: Mapping[str, Any] | None) -> Path:
        """Write one folder on the calling process (no collective). With a PEFT LoRA model the weights file is the
        module's state dict with the adapter scaled by α, and ``hf/`` the merged model plus the α-scaled adapter."""
        session, module = self.session, self.module
        if not isinstance(session.engine, LoraEngine):
            options = self._full_options()
            session.write(module, folder, step, entry=entry, collective=False, guard=False, **options)
            return Path(os.path.abspath(folder))
        tokenizer = find_tokenizer(module, self.trainer)
        with atomic_dir(folder, overwrite=True) as tmp:
            inner = tmp / "engine"
            session.write(module, inner, step, entry=entry, collective=False, guard=False, form="module")
            for path in inner.iterdir():
                os.replace(path, tmp / path.name)
            inner.rmdir()
            session.write(
                module, tmp / HF_FOLDER, step, entry=entry, tokenizer=tokenizer, collective=False, guard=False
            )
        return Path(os.path.abspath(folder))

    def _full_options(self) -> dict[str, Any]:
        """Full weights: every key of the module's state dict, and ``hf/`` cut from the same stream."""
        if isinstance(self.session.engine, LoraEngine) and self.collective:
            raise NotImplementedError(
                "PEFT LoRA under a sharded Lightning strategy is not supported; use strategy='ddp' for LoRA runs"
            )
        return {"form": "module", "subfolders": self._hf_subfolder()}

    def _hf_subfolder(self) -> list[SubFolder]:
        """``hf/``: the transformers model inside the module (its keys without the module prefix), its config and the
        tokenizer when one is found; none without such a model."""
        hf_model = transformers_model(self.module)
        if hf_model is None:
            return []
        prefix = next(name for name, sub in self.module.named_modules() if sub is hf_model)
        prefix = f"{prefix}." if prefix else ""
        keys = {k: k[len(prefix) :] for k in self.module.state_dict(keep_vars=True) if k.startswith(prefix)}
        tokenizer = find_tokenizer(self.module, self.trainer)
        return [SubFolder(HF_FOLDER, keys, config_from=hf_model, tokenizer=tokenizer)]

    # ------------------------------------------------------------------ failures across ranks
    def rank_zero(self, action: Callable[[], Any], what: str, path: Path) -> None:
        """Run a write on rank 0 from a hook only rank 0 runs (checkpoint IO). One process: a failure follows
        ``strict`` at once. Several: a failure is held, not raised here (the other ranks wait in Lightning's barrier
        after the save), and every rank learns it in :meth:`agree` at the next hook they all run."""
        step = self.trainer.global_step
        if self.trainer.world_size <= 1:
            self.session.guarded(action, path, step)
            return
        try:
            action()
        except Exception as exc:
            then = (
                "stopping every rank at the next step"
                if self.session.strict
                else "training goes on (strict=False)"
            )
            logger.error("CocktailCallback: %s failed on rank 0: %s (%s)", what, exc, then)
            self.deferred = self.deferred or (what, exc, path, step)

    def agree(self, *, force: bool = False) -> None:
        """After a checkpoint save (or with ``force``), every rank learns whether rank 0's writes worked: raised on
        every rank with ``strict`` (rank 0 its own error, the others the same error class or ``RankZeroError``), else
        logged and recorded on every rank, and training goes on."""
        if not force and not self.saves_to_agree:
            return
        self.saves_to_agree = 0
        root = Path(self.trainer.default_root_dir)
        what, _, path, step = self.deferred or ("writing a checkpoint's resilient files", None, root, 0)

        def held_error() -> None:
            if self.deferred is not None:
                error, self.deferred = self.deferred[1], None
                raise error

        self.session.guarded(lambda: on_rank_zero(held_error, what), path, step)
