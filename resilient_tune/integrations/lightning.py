"""``CocktailCallback`` for Lightning (``lightning.pytorch``): resilient checkpoints with one flag.

Three ways to switch it on (see ``docs/lightning.md``)::

    Trainer(callbacks=[CocktailCallback(alpha=0.3)])                                   # 1. in code
    python train.py fit --trainer.callbacks+=resilient_tune.integrations.lightning.CocktailCallback \\
        --trainer.callbacks.init_args.alpha=0.3                                        # 2. LightningCLI
    RESILIENT_TUNE=1 RESILIENT_TUNE_ALPHA=0.3 python train.py                          # 3. no code change

For the standalone ``pytorch_lightning`` package use :mod:`resilient_tune.integrations.pytorch_lightning` (the
same class over ``pytorch_lightning.Callback``: Lightning refuses to mix the two class trees).

What it does, by Lightning hook
-------------------------------
- ``setup(stage="fit")``: snapshots θ₀ (the trainable parameters of the ``LightningModule``) before a checkpoint
  is restored and before the strategy wraps the module; wraps the strategy's ``CheckpointIO`` so that every
  checkpoint file gets its resilient companion (below). Under ``ModelParallelStrategy`` (FSDP2) and
  ``DeepSpeedStrategy`` the snapshot waits for ``on_fit_start``: the module is built and sharded in
  ``configure_model`` / the strategy's setup, and restored from a checkpoint only after ``on_fit_start``; each rank
  then keeps its own shards of θ₀ (no gather).
- ``on_load_checkpoint`` / ``load_state_dict``: a resumed run takes back its own base snapshot and α history
  (the resumed weights are never taken as the base; resuming from a checkpoint without that state is refused).
- ``on_train_start``: fresh runs under DDP check that every rank holds rank 0's θ₀ (DDP broadcasts rank 0's
  weights when it wraps the module; ranks that started from other weights snapshot again).
- ``on_validation_epoch_end`` (never during the sanity check): probes and the policy choose α; the metrics
  ``cocktail/alpha``, ``cocktail/drift_norm``, ``cocktail/general_loss``, ... are logged with ``pl_module.log``, so
  ``ModelCheckpoint(monitor="cocktail/general_loss")`` and ``EarlyStopping`` can use them.
- ``state_dict``: the resume state (snapshot location and fingerprint, α history). A checkpoint saved without a
  validation at that step gets a decision first, so the state and the files agree.
- every checkpoint save, on global rank 0: ``<ckpt stem>.resilient/`` next to ``<ckpt stem>.ckpt``; removed when
  ``ModelCheckpoint`` removes the ``.ckpt`` (both go through the strategy's ``remove_checkpoint``).
  Under DDP a failed companion write is held on rank 0 and raised on every rank at the next batch or validation
  start (``on_train_batch_start`` / ``on_validation_start``), so no rank is left waiting.
- ``on_train_end``, written on global rank 0, the outcome agreed on every rank: ``<default_root_dir>/resilient/``,
  ``<default_root_dir>/cocktail_report.json`` and ``cocktail_report.png``.

Sharded strategies (``ModelParallelStrategy`` with ``fully_shard``; ``DeepSpeedStrategy``) save checkpoints on
every rank, so companions are written from a wrapper of ``strategy.save_checkpoint``: every rank merges its own
shards in place, the merged model is gathered once to rank 0's CPU, rank 0 writes, and every rank learns the outcome
(a failed write raises on every rank). ``FSDPStrategy`` (FSDP1) is refused with a pointer to ``ModelParallelStrategy``.
A sharded run keeps θ₀ in memory; at its first checkpoint every rank writes its own shards to
``resilient_base/rank<r>-of-<n>/``, and a resume (with the same number of processes) reloads them.

A resilient folder holds ``model.safetensors`` (the merged ``pl_module.state_dict()``, same keys, tied parameters
under every name), ``cocktail.json``, a model card ``README.md`` and, when the module holds a transformers model,
``hf/``: that model merged, loadable with ``from_pretrained`` (config, tokenizer when the module or datamodule
has one in ``tokenizer``, ``cocktail.json``).

Probes (``general_data``, ``target_data``) are datasets of examples batched with the validation dataloader's
``collate_fn`` and batch size (``default_collate`` and 8 without one), or ready ``DataLoader``\\ s. They are scored
with the module's own ``training_step`` loss (its ``self.log`` calls are muted meanwhile), or ``score_fn(pl_module,
batch) -> loss``. When the module holds a transformers language model and the batches are dicts, ``KL(base ‖
current)`` of its next-token distributions is measured too (one more forward per batch).

Peers, the ``cocktail`` policy and PEFT LoRA work as in the Hugging Face callback (the logic is shared in
:mod:`resilient_tune.integrations._common`). Peer checkpoints may be ``save_pretrained`` folders of the transformers
model inside the module. With a LoRA model inside the module no snapshot is taken; ``model.safetensors`` is the
module's state dict with the adapter scaled by α, and ``hf/`` the merged model plus the scaled adapter.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from resilient_tune.checkpoint import atomic_dir
from resilient_tune.distributed import on_rank_zero
from resilient_tune.engine import LoraEngine
from resilient_tune.errors import UsageError
from resilient_tune.folder import SubFolder
from resilient_tune.integrations._common import (
    BASE_FOLDER,
    REPORT_FILE,
    RESILIENT_FOLDER,
    CocktailCore,
    ScoreFn,
    metrics,
)

__all__ = ["CocktailCallback", "LightningCocktail", "load_examples"]

logger = logging.getLogger(__name__)

COMPANION_SUFFIX = ".resilient"
HF_FOLDER = "hf"
_PENDING = ".pending"
_RAW = "__resilient_tune_batch__"  # wraps a batch that is not a dict, so that the probes can carry it
_ADAPTERS = {"lightning.pytorch": "lightning", "pytorch_lightning": "pytorch_lightning"}
# strategies whose save_checkpoint runs on every rank (their parameters may be sharded): companions are written
# collectively from a wrapper of strategy.save_checkpoint, not from the rank-0 CheckpointIO
_COLLECTIVE = ("ModelParallelStrategy", "DeepSpeedStrategy")
_REFUSED = {
    "FSDPStrategy": (
        "FSDPStrategy (FSDP1: flattened parameters the merge cannot address) is not supported; use FSDP2 through "
        "ModelParallelStrategy (call torch.distributed.fsdp.fully_shard in configure_model), e.g. "
        "Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)), or strategy='ddp'"
    ),
}


def callback_bases(package: str) -> tuple[tuple[type, ...], ImportError | None]:
    """``(Callback,)`` of ``package`` (``lightning.pytorch`` or ``pytorch_lightning``) and no error, or
    ``(object,)`` and the ``ImportError`` when it is not installed (the callback then fails at construction)."""
    try:
        return (importlib.import_module(package).Callback,), None
    except ImportError as exc:
        return (object,), exc


class LightningCocktail(CocktailCore):
    """The Lightning glue of ``CocktailCallback``, for either Lightning package (a mixin; see the module docs).

    The arguments are :class:`~resilient_tune.integrations._common.CocktailCore`'s (the constructor every
    ``CocktailCallback`` shares). Here probe data may also be a ``DataLoader`` or a ``.json``/``.jsonl`` file of
    tokenized examples (lists of numbers become tensors; handy from LightningCLI or ``RESILIENT_TUNE_GENERAL_DATA``),
    examples need not be dicts, and the probes score ``training_step``'s loss (``score_fn(pl_module, batch)``
    replaces it; manual optimization needs it). With ``policy="cocktail"`` and no ``target_data`` the target
    examples are the first 64 of each validation dataset.

    Raises:
        ImportError: The Lightning package is not installed (``pip install 'resilient-tune[lightning]'``).
        UsageError: Bad arguments (see ``CocktailCore``).
    """

    _package = "lightning.pytorch"
    _import_error: ImportError | None = None
    _accepts_loaders = True
    _needs_mapping_examples = False
    _eval_data = "validation data"

    def _check_installed(self) -> None:
        if self._import_error is not None:
            extra = "lightning" if self._package == "lightning.pytorch" else "pytorch-lightning"
            raise ImportError(
                f"this CocktailCallback needs {self._package}; install it with: pip install 'resilient-tune[lightning]' "
                f"(or pip install {extra})"
            ) from self._import_error

    def _load_probe_data(self, data: Any) -> Any:
        return _from_files(data)

    def _init_framework(self) -> None:
        self.from_env = False
        self._active = False

    def _reset_run(self) -> None:
        super()._reset_run()
        self._trainer: Any = None
        self._module: Any = None
        self._stored: dict[str, Any] | None = None
        self._probes_ready = False
        self._in_epoch_end = False
        self._io: _ResilientCheckpointIO | None = None
        self._warned_remote = False
        # a rank-0 write that failed, not yet agreed on: (what, error, folder, step)
        self._deferred: tuple[str, Exception, Path, int] | None = None
        self._saves_to_agree = 0
        self._collective = False  # a strategy that saves on every rank (see _COLLECTIVE)
        self._saver: _CollectiveSave | None = None

    # ------------------------------------------------------------------ Lightning: state
    @property
    def state_key(self) -> str:
        """``CocktailCallback``; the instance added by ``RESILIENT_TUNE=1`` uses its own key."""
        name = type(self).__qualname__
        return f"{name}{{'source': 'env'}}" if self.from_env else name

    def state_dict(self) -> dict[str, Any]:
        """The resume state saved in the checkpoint (see :meth:`CocktailCore._run_state`)."""
        if not self._active or not self._engine.has_snapshot:
            return {}
        trainer = self._trainer
        if trainer is not None and not trainer.sanity_checking and self._last_step != trainer.global_step:
            # a save before (or without) a validation at this step: decide now so that state and files agree; the
            # metrics are logged by the validation that may follow at this step
            self._ensure_probes(trainer, self._module)
            self._decide(trainer.global_step, self._module, log=False)
        if self._snapshot_state is None and trainer is not None:
            base_dir = _root(trainer) / BASE_FOLDER  # the first checkpoint: keep θ₀ for a resume
            if self._sharded_snapshot:  # every rank writes its own shards (every rank runs this hook)
                self._guarded(lambda: self._persist_shards(base_dir), base_dir, trainer.global_step)
            elif trainer.is_global_zero:
                self._rank_zero(
                    lambda: self._persist_snapshot(base_dir),
                    f"writing the base snapshot to {base_dir}",
                    base_dir,
                )
        self._saves_to_agree += 1  # every rank: a checkpoint (and its companion on rank 0) is being saved
        return self._run_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._active:
            self._stored = dict(state_dict)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Find this callback's state even if it was saved under the other key (env flag vs. explicit)."""
        if not self._active:
            return
        states = checkpoint.get("callbacks") or {}
        name = type(self).__qualname__
        found = states.get(self.state_key) or next(
            (
                v
                for k, v in states.items()
                if isinstance(k, str) and k.startswith(name) and isinstance(v, Mapping) and "snapshot" in v
            ),
            None,
        )
        self._stored = dict(found) if found else None

    # ------------------------------------------------------------------ Lightning: run
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._check_framework(trainer)
        self._active = not (self.from_env and _has_explicit_callback(trainer, self))
        if not self._active:
            logger.warning(
                "RESILIENT_TUNE=1 ignored: the Trainer already has a CocktailCallback (its configuration wins)"
            )
            return
        self._reset_run()
        self._trainer, self._module = trainer, pl_module
        self._collective = _strategy_named(trainer, self._package, _COLLECTIVE) is not None
        if not self._collective:
            # a resume is only known after this hook: an on-disk θ₀ goes to a pending folder until on_train_start
            self._take_snapshot(pl_module, _root(trainer) / (BASE_FOLDER + _PENDING))
        self._io = _ResilientCheckpointIO.install(trainer.strategy, self)
        if self._collective:
            self._saver = _CollectiveSave.install(trainer.strategy, self)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Sharded strategies: snapshot θ₀ now, after ``configure_model`` and the strategy's setup built and sharded
        the module, and before a checkpoint is restored (these strategies restore after ``on_fit_start``)."""
        if self._active and self._collective:
            self._take_snapshot(pl_module, _root(trainer) / (BASE_FOLDER + _PENDING))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._active:
            return
        root = _root(trainer)
        pending = root / (BASE_FOLDER + _PENDING)
        if self._stored is not None or trainer.ckpt_path is not None:
            self._drop_pending(pending)
            self._restore(self._stored, pl_module, trainer.global_step, moved=root / BASE_FOLDER)
            return
        if not self._collective:  # sharded: each rank's θ₀ shards differ by design
            self._align_ranks(trainer, pl_module)
        if self._engine.snapshot.storage == "disk":
            self._promote_pending(pending, root / BASE_FOLDER)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active or trainer.sanity_checking or not self._engine.has_snapshot:
            return
        if trainer.state.fn != "fit":
            return  # a standalone trainer.validate()
        self._ensure_probes(trainer, pl_module)
        self._in_epoch_end = True
        try:
            if self._last_step == trainer.global_step and self._history:
                self._log(self._history[-1])  # decided at a save of this step already
            else:
                self._decide(trainer.global_step, pl_module)
        finally:
            self._in_epoch_end = False

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active or not self._engine.has_snapshot:
            return
        self._agree(force=True)
        self._ensure_probes(trainer, pl_module)
        entry = self._decision_at(trainer.global_step, pl_module)
        root = _root(trainer)

        step, folder, report = trainer.global_step, root / RESILIENT_FOLDER, root / REPORT_FILE
        # every rank takes part and learns the outcome; a failure raises (strict) or is logged and recorded
        if self.save_resilient:
            if self._collective:  # the gather needs every rank
                self._guarded(lambda: self._write_folder_collective(folder, step, entry), folder, step)
            else:
                write = lambda: self._write_folder(folder, step, entry)  # noqa: E731
                self._guarded(lambda: on_rank_zero(write, f"writing {folder}"), folder, step)
        self._guarded(
            lambda: on_rank_zero(lambda: self._write_report(report, entry), f"writing {report}"), report, step
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._agree()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._agree()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._io is not None:
            self._io.uninstall()
            self._io = None
        if self._saver is not None:
            self._saver.uninstall()
            self._saver = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ checks and snapshot
    def _check_framework(self, trainer: Any) -> None:
        package = importlib.import_module(self._package)
        if not isinstance(trainer, package.Trainer):
            source = type(trainer).__module__.split(".")[0]
            used = "pytorch_lightning" if source == "pytorch_lightning" else "lightning.pytorch"
            right = _ADAPTERS.get(used, "lightning")
            raise UsageError(
                f"this CocktailCallback is built on {self._package}, but the Trainer comes from {used} (Lightning does "
                f"not mix the two packages); use: from resilient_tune.integrations.{right} import CocktailCallback"
            )
        refused = _strategy_named(trainer, self._package, tuple(_REFUSED))
        if refused is not None:
            raise NotImplementedError(
                f"the Lightning CocktailCallback: {_REFUSED[refused]} (see docs/lightning.md)"
            )

    def _align_ranks(self, trainer: Any, pl_module: Any) -> None:
        """Under DDP: if a rank's θ₀ differs from rank 0's, snapshot the live (already broadcast) weights again."""
        if trainer.world_size <= 1 or self._engine.snapshot.storage == "none":
            return  # one process, or LoRA: nothing copied (the frozen base weights are rank 0's after DDP's broadcast)
        mine = _checksum(self._engine.snapshot.items())
        reference = trainer.strategy.broadcast(mine, src=0)
        if trainer.strategy.reduce_boolean_decision(mine != reference, all=False):
            logger.info(
                "CocktailCallback: ranks started from different weights; θ₀ is rank 0's (DDP broadcast)"
            )
            self._take_snapshot(pl_module, _root(trainer) / (BASE_FOLDER + _PENDING))

    def _drop_pending(self, pending: Path) -> None:
        if self._engine.has_snapshot and self._engine.snapshot.storage == "disk":
            self._engine.snapshot.close()
        if pending.is_dir():
            shutil.rmtree(pending, ignore_errors=True)

    def _promote_pending(self, pending: Path, base_dir: Path) -> None:
        """Move the on-disk θ₀ of a fresh run from the pending folder to ``resilient_base/`` and reopen it. Several
        processes (every rank calls it): rank 0 moves the folder holding every rank's ``rank<r>-of-<n>/`` between
        two barriers, and each rank reopens its own."""
        from resilient_tune.snapshot import Snapshot

        state = self._engine.snapshot.state()
        self._engine.snapshot.close()
        several = self._trainer is not None and self._trainer.world_size > 1
        if several:
            self._trainer.strategy.barrier("resilient_base")  # every rank has closed its files
        if not several or self._trainer.is_global_zero:
            if base_dir.exists():
                shutil.rmtree(base_dir)
            os.replace(pending, base_dir)
        if several:
            self._trainer.strategy.barrier("resilient_base moved")
            state["folder"] = str((base_dir / Path(state["folder"]).name).resolve())
            self._engine.attach(Snapshot.load(state))
            self._gather_snapshot_states()
        else:
            state["folder"] = str(base_dir.resolve())
            self._engine.attach(Snapshot.load(state))
            self._note_snapshot()

    # ------------------------------------------------------------------ probes
    def _ensure_probes(self, trainer: Any, pl_module: Any) -> None:
        if self._probes_ready:
            return
        self._probes_ready = True
        target_sets = self._target_sets()
        if not (self._general or target_sets):
            return
        if self._score_fn is None and not pl_module.automatic_optimization:
            raise UsageError(
                "the probes score the module with training_step, which runs the optimizer under manual "
                "optimization; pass score_fn(pl_module, batch) -> loss to CocktailCallback"
            )
        collate, batch_size = _validation_batching(trainer)
        general = {n: _batches(d, collate, batch_size, n) for n, d in self._general.items()}
        target = {n: _batches(d, collate, batch_size, n) for n, d in target_sets.items()}
        lm = _transformers_model(pl_module, language_model=True)
        dict_batches = all(_RAW not in b for batches in general.values() for b in batches)
        view = _ProbeModule(pl_module, lm if dict_batches else None)
        self._set_probes(
            pl_module,
            general,
            target,
            _Scorer(pl_module, self._score_fn, getattr(trainer, "precision_plugin", None)),
            probe_module=view,
            with_kl=view.lm is not None,
        )

    def _default_target(self) -> dict[str, Any]:
        """The datasets of the Trainer's validation dataloaders (``val``, or ``val_<i>`` / ``val_<name>``)."""
        loaders = getattr(self._trainer, "val_dataloaders", None)
        if isinstance(loaders, torch.utils.data.DataLoader):
            loaders = {"val": loaders}
        elif isinstance(loaders, (list, tuple)):
            loaders = {f"val_{i}": loader for i, loader in enumerate(loaders)}
        elif isinstance(loaders, Mapping):
            loaders = {f"val_{name}": loader for name, loader in loaders.items()}
        else:
            return {}
        return {
            name: loader.dataset
            for name, loader in loaders.items()
            if isinstance(loader, torch.utils.data.DataLoader) and hasattr(loader.dataset, "__len__")
        }

    def _log(self, entry: Mapping[str, Any]) -> None:
        logs = metrics(entry)
        trainer, module = self._trainer, self._module
        if self._in_epoch_end:
            sync = trainer.world_size > 1  # every rank holds the same numbers: the mean is each of them
            for key, value in logs.items():
                module.log(key, value, on_step=False, on_epoch=True, sync_dist=sync)
        elif trainer is not None and trainer.is_global_zero:
            for lightning_logger in trainer.loggers:
                lightning_logger.log_metrics(logs, step=trainer.global_step)

    # ------------------------------------------------------------------ output
    def _write_companion(self, checkpoint_path: Any, *, collective: bool = False) -> None:
        """Write ``<stem>.resilient/`` next to a checkpoint just saved: from the rank-0 ``CheckpointIO``, or, with
        ``collective``, from the sharded strategies' ``save_checkpoint``, which **every rank** runs (the path is rank
        0's). Each strategy writes through one of the two; the other call does nothing."""
        if not self._active or not self.save_resilient or not self._engine.has_snapshot:
            return
        if collective != self._collective:
            return
        if collective:
            checkpoint_path = self._trainer.strategy.broadcast(checkpoint_path, src=0)
        folder = _companion(checkpoint_path)
        if folder is None:
            if not self._warned_remote:
                logger.warning("CocktailCallback: %s is not a local path; no resilient copy", checkpoint_path)
                self._warned_remote = True
            return
        step = self._trainer.global_step
        if collective:
            self._guarded(lambda: self._write_folder_collective(folder, step, None), folder, step)
        else:
            self._rank_zero(lambda: self._write_folder(folder, step, None), f"writing {folder}", folder)

    def _rank_zero(self, action: Any, what: str, path: Path) -> None:
        """Run a write on rank 0 from a hook only rank 0 runs (checkpoint IO). One process: a failure raises
        (``strict``) or is logged and recorded. Several: a failure is held, not raised here (the other ranks wait in
        Lightning's barrier after the save), and every rank learns it in :meth:`_agree` at the next hook they all
        run."""
        step = self._trainer.global_step if self._trainer is not None else 0
        if self._trainer is None or self._trainer.world_size <= 1:
            self._guarded(action, path, step)
            return
        try:
            action()
        except Exception as exc:
            then = (
                "stopping every rank at the next step" if self.strict else "training goes on (strict=False)"
            )
            logger.error("CocktailCallback: %s failed on rank 0: %s (%s)", what, exc, then)
            self._deferred = self._deferred or (what, exc, path, step)

    def _agree(self, *, force: bool = False) -> None:
        """After a checkpoint save (or with ``force``), every rank learns whether rank 0's writes worked. A failure
        is raised on every rank with ``strict`` (rank 0 its own error, the others the same error class or
        ``RankZeroError``), else logged and recorded on every rank, and training goes on."""
        if not self._active or (not force and not self._saves_to_agree):
            return
        self._saves_to_agree = 0
        what, _, path, step = self._deferred or (
            "writing a checkpoint's resilient files",
            None,
            _root(self._trainer),
            0,
        )

        def held_error() -> None:
            if self._deferred is not None:
                error, self._deferred = self._deferred[1], None
                raise error

        self._guarded(lambda: on_rank_zero(held_error, what), path, step)

    def _on_save_failed(self, record: Mapping[str, Any]) -> None:
        """``cocktail/save_failed`` (the count so far) to the Trainer's loggers, on global rank 0 (no collective)."""
        trainer = self._trainer
        if trainer is not None and trainer.is_global_zero:
            for lightning_logger in trainer.loggers:
                lightning_logger.log_metrics(
                    {"cocktail/save_failed": float(len(self._save_failures))}, step=record["step"]
                )

    def _write_folder_collective(self, folder: Path, step: int, entry: Mapping[str, Any] | None) -> None:
        """The resilient folder of a sharded module, **every rank calls it**: the same layout as
        :meth:`_write_folder`. Each rank merges its own shards, one gather brings the merged module to rank 0's CPU,
        rank 0 writes ``model.safetensors`` and ``hf/`` from the same tensors, and a failure raises on every rank."""
        if isinstance(self._engine, LoraEngine):
            raise NotImplementedError(
                "PEFT LoRA under a sharded Lightning strategy is not supported; use strategy='ddp' for LoRA runs"
            )
        self._write(
            self._module,
            folder,
            step,
            entry=entry,
            collective=True,
            form="module",
            subfolders=self._hf_subfolder(),
        )

    def _hf_subfolder(self) -> list[SubFolder]:
        """``hf/``: the transformers model inside the module (its keys without the module prefix), with its config
        and the tokenizer when one is found; ``from_pretrained``-loadable. None without such a model."""
        hf_model = _transformers_model(self._module)
        if hf_model is None:
            return []
        prefix = next(name for name, sub in self._module.named_modules() if sub is hf_model)
        prefix = f"{prefix}." if prefix else ""
        keys = {k: k[len(prefix) :] for k in self._module.state_dict(keep_vars=True) if k.startswith(prefix)}
        return [
            SubFolder(
                HF_FOLDER, keys, config_from=hf_model, tokenizer=_tokenizer(self._module, self._trainer)
            )
        ]

    def _remove_companion(self, checkpoint_path: Any) -> None:
        folder = _companion(checkpoint_path)
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder)

    def _write_folder(self, folder: Path, step: int, entry: Mapping[str, Any] | None) -> Path:
        """The resilient folder: every ``state_dict`` key of the module at θ(α), ``cocktail.json``, and ``hf/`` when
        the module holds a transformers model (written from the same merged tensors). With a PEFT LoRA model the
        weights file is the module's state dict with the adapter scaled by α, and ``hf/`` the merged model plus the
        α-scaled adapter (``hf/adapter/``)."""
        module = self._module
        if not isinstance(self._engine, LoraEngine):
            written = self._write(
                module,
                folder,
                step,
                entry=entry,
                collective=False,
                form="module",
                subfolders=self._hf_subfolder(),
            )
            return Path(written or folder)
        tokenizer = _tokenizer(module, self._trainer)
        with atomic_dir(folder, overwrite=True) as tmp:
            inner = self._write(module, tmp / "engine", step, entry=entry, collective=False, form="module")
            for path in inner.iterdir():
                os.replace(path, tmp / path.name)
            inner.rmdir()
            self._write(module, tmp / HF_FOLDER, step, entry=entry, tokenizer=tokenizer, collective=False)
        return Path(os.path.abspath(folder))


class _ResilientCheckpointIO:
    """Wraps the strategy's ``CheckpointIO``: after a checkpoint file is saved, its resilient companion is written;
    when it is removed (``ModelCheckpoint`` rotation), the companion goes too. Everything else is delegated.

    The strategy calls its ``CheckpointIO`` on global rank 0 only, so companions are written once.
    """

    def __init__(self, inner: Any, callback: LightningCocktail) -> None:
        self._inner = inner
        self._callback = callback

    @classmethod
    def install(cls, strategy: Any, callback: LightningCocktail) -> _ResilientCheckpointIO:
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
        self._callback._write_companion(path)

    def remove_checkpoint(self, path: Any) -> None:
        self._inner.remove_checkpoint(path)
        self._callback._remove_companion(path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._inner.load_checkpoint(path, *args, **kwargs)

    def teardown(self) -> None:
        self._inner.teardown()

    def __getattr__(self, name: str) -> Any:  # any other plugin API (e.g. AsyncCheckpointIO's)
        if name.startswith("__") or name in ("_inner", "_callback", "_strategy"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class _CollectiveSave:
    """Wraps ``strategy.save_checkpoint`` of a strategy that saves on every rank (``ModelParallelStrategy``,
    ``DeepSpeedStrategy``): after the checkpoint is saved, every rank writes its resilient companion together."""

    def __init__(self, strategy: Any, callback: LightningCocktail) -> None:
        self._strategy = strategy
        self._callback = callback
        self._inner = strategy.save_checkpoint

    @classmethod
    def install(cls, strategy: Any, callback: LightningCocktail) -> _CollectiveSave:
        saver = cls(strategy, callback)
        strategy.save_checkpoint = saver  # an instance attribute: the class method stays untouched
        return saver

    def uninstall(self) -> None:
        if self._strategy.__dict__.get("save_checkpoint") is self:
            del self._strategy.save_checkpoint

    def __call__(self, checkpoint: dict[str, Any], filepath: Any, *args: Any, **kwargs: Any) -> None:
        self._inner(checkpoint, filepath, *args, **kwargs)
        self._callback._write_companion(filepath, collective=True)


class _ProbeModule(torch.nn.Module):
    """What the probes call: the ``LightningModule`` (a child, so that eval mode covers it) and, for the KL probe,
    its transformers language model, fed the batch keys its ``forward`` accepts."""

    def __init__(self, module: torch.nn.Module, lm: torch.nn.Module | None) -> None:
        super().__init__()
        self.module = module
        self.lm = lm
        params = inspect.signature(lm.forward).parameters if lm is not None else {}
        self._any_key = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._keys = set(params)

    def forward(self, **batch: Any) -> Any:
        if self.lm is None:
            raise UsageError("internal: the probe module has no language model to compute logits with")
        return self.lm(**{k: v for k, v in batch.items() if self._any_key or k in self._keys})


class _Scorer:
    """``score(view, batch) -> loss``: the user's ``score_fn(pl_module, batch)`` or ``training_step``'s loss, with
    the batch converted and the forward run as the Trainer's precision plugin does for a training step."""

    def __init__(self, module: Any, score_fn: ScoreFn | None, precision: Any = None) -> None:
        self._module = module
        self._score_fn = score_fn
        self._precision = precision

    def __call__(self, view: torch.nn.Module, batch: Mapping[str, Any]) -> Any:
        module = self._module
        raw: Any = dict(batch)
        if _RAW in batch:  # not a dict: moved here, the probes move only a dict's tensors
            raw = module.transfer_batch_to_device(batch[_RAW], module.device, 0)
        context: Any = contextlib.nullcontext()
        if self._precision is not None:  # e.g. bf16-true: float inputs cast like the training batches
            raw = self._precision.convert_input(raw)
            context = self._precision.forward_context()
        with context:
            if self._score_fn is not None:
                return self._score_fn(module, raw)
            with _muted_logging(module):
                output = module.training_step(raw, 0)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, (torch.Tensor, float, int)) or isinstance(loss, bool):
            raise UsageError(
                f"training_step returned {type(output).__name__} on a probe batch, not a loss; return the loss "
                "(or {'loss': loss}), or pass score_fn(pl_module, batch) -> loss to CocktailCallback"
            )
        return loss


@contextlib.contextmanager
def _muted_logging(module: Any) -> Iterator[None]:
    """``module.log`` / ``module.log_dict`` do nothing in this block (training_step's logging during probes)."""
    module.log = _ignore
    module.log_dict = _ignore
    try:
        yield
    finally:
        del module.log
        del module.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


# ---------------------------------------------------------------------------- helpers
def load_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Tokenized examples from a ``.json`` list or a ``.jsonl`` file (one object per line); every list becomes a
    tensor, so that ``default_collate`` stacks equal-length examples.

    Raises:
        UsageError: The file is missing, is not JSON, or does not hold example objects.
    """
    file = Path(path).expanduser()
    try:
        text = file.read_text()
        rows = (
            json.loads(text)
            if file.suffix == ".json"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read probe examples from {file}: {exc}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(
            f'{file} must hold example objects such as {{"input_ids": [...], "labels": [...]}}: a JSON list, or '
            "one object per line (.jsonl)"
        )
    return [{k: torch.tensor(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]


def _from_files(data: Any) -> Any:
    """Probe data given as file paths (or a dict of them) loaded with :func:`load_examples`."""
    if isinstance(data, (str, os.PathLike)):
        return load_examples(data)
    if isinstance(data, Mapping):
        return {k: load_examples(v) if isinstance(v, (str, os.PathLike)) else v for k, v in data.items()}
    return data


def _strategy_named(trainer: Any, package: str, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` (classes of ``<package>.strategies``) that ``trainer.strategy`` is an instance of."""
    strategies = importlib.import_module(f"{package}.strategies")
    for name in names:
        strategy_class = getattr(strategies, name, None)
        if strategy_class is not None and isinstance(trainer.strategy, strategy_class):
            return name
    return None


def _root(trainer: Any) -> Path:
    return Path(trainer.default_root_dir)


def _has_explicit_callback(trainer: Any, me: Any) -> bool:
    return any(
        cb is not me and isinstance(cb, LightningCocktail) and not cb.from_env for cb in trainer.callbacks
    )


def _checksum(items: Iterator[tuple[str, torch.Tensor]]) -> tuple[float, float]:
    total = squares = 0.0
    for _, tensor in items:
        values = tensor.detach().to("cpu", torch.float64)
        total += float(values.sum())
        squares += float(values.pow(2).sum())
    return total, squares


def _companion(checkpoint_path: Any) -> Path | None:
    """``<stem>.resilient`` next to ``<stem>.ckpt``; ``None`` for a remote (non-local) path."""
    text = os.fspath(checkpoint_path)
    if "://" in text and not text.startswith("file://"):
        return None
    path = Path(text.removeprefix("file://"))
    stem = path.name[: -len(".ckpt")] if path.name.endswith(".ckpt") else path.name
    return path.with_name(stem + COMPANION_SUFFIX)


def _validation_batching(trainer: Any) -> tuple[Any, int]:
    """The first validation dataloader's ``collate_fn`` and batch size, else ``default_collate`` and 8."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if isinstance(loaders, torch.utils.data.DataLoader):
        return loaders.collate_fn, loaders.batch_size or 8
    return torch.utils.data.default_collate, 8


def _batches(data: Any, collate: Any, batch_size: int, name: str) -> list[Any]:
    """The probe batches, once; batches that are not dicts are wrapped in ``{_RAW: batch}``."""
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate, shuffle=False)
    try:
        batches = list(loader)
    except Exception as exc:
        raise UsageError(
            f"cannot batch the probe data {name!r}: {exc}; give examples in the validation data's format (batched "
            "with its collate_fn), tensors of equal length, or a ready DataLoader"
        ) from exc
    if not batches:
        raise UsageError(f"the probe data {name!r} gave no batches; pass a few dozen examples")
    return [b if isinstance(b, Mapping) else {_RAW: b} for b in batches]


def _transformers_model(module: torch.nn.Module, *, language_model: bool = False) -> Any | None:
    """The outermost transformers ``PreTrainedModel`` inside ``module`` (the first in module order), or ``None``.

    With ``language_model``: only one with an output embedding (an LM head returning ``(B, T, V)`` logits).
    transformers is not imported here: a module holding its models has imported it already.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    base = transformers.PreTrainedModel
    for _, sub in module.named_modules():
        if isinstance(sub, base):
            if language_model and sub.get_output_embeddings() is None:
                return None
            return sub
    return None


def _tokenizer(module: Any, trainer: Any) -> Any | None:
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (module, datamodule):
        tokenizer = getattr(owner, "tokenizer", None)
        if hasattr(tokenizer, "save_pretrained"):
            return tokenizer
    return None


_BASES, _IMPORT_ERROR = callback_bases("lightning.pytorch")


class CocktailCallback(LightningCocktail, *_BASES):  # type: ignore[misc]
    """Lightning (``lightning.pytorch``) callback writing resilient (LM-Cocktail) checkpoints.

    ``Trainer(callbacks=[CocktailCallback()])`` (α = 0.5), ``CocktailCallback(alpha=0.3)``,
    ``CocktailCallback(policy="budget", general_data=examples, drift_budget=0.05)`` or
    ``CocktailCallback(policy="cocktail", peers=[...])``. See the module docs for what is written where and
    :class:`~resilient_tune.integrations._common.CocktailCore` for the arguments.
    """

    _package = "lightning.pytorch"
    _import_error = _IMPORT_ERROR
