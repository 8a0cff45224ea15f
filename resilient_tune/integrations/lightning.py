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
the :class:`~resilient_tune.Cocktail` session both callbacks hold). Peer checkpoints may be ``save_pretrained`` folders of the transformers
model inside the module. With a LoRA model inside the module no snapshot is taken; ``model.safetensors`` is the
module's state dict with the adapter scaled by α, and ``hf/`` the merged model plus the scaled adapter.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from resilient_tune.distributed import on_rank_zero
from resilient_tune.engine import Engine
from resilient_tune.policy import Policy
from resilient_tune.report import REPORT_FILE
from resilient_tune.session import BASE_FOLDER, RESILIENT_FOLDER, Cocktail, ScoreFn, metrics

from ._lightning_data import (
    build_probes,
    from_files,
    load_examples,
)
from ._lightning_io import COMPANION_SUFFIX, CollectiveSave, ResilientCheckpointIO
from ._lightning_output import HF_FOLDER, LightningWriter
from ._lightning_setup import align_ranks, check_trainer, is_collective, promote

__all__ = ["COMPANION_SUFFIX", "HF_FOLDER", "CocktailCallback", "LightningCocktail", "load_examples"]

logger = logging.getLogger(__name__)

_PENDING = ".pending"


def callback_bases(package: str) -> tuple[tuple[type, ...], ImportError | None]:
    """``(Callback,)`` of ``package`` (``lightning.pytorch`` or ``pytorch_lightning``) and no error, or
    ``(object,)`` and the ``ImportError`` when it is not installed (the callback then fails at construction)."""
    try:
        return (importlib.import_module(package).Callback,), None
    except ImportError as exc:
        return (object,), exc


class LightningCocktail:
    """The Lightning glue of ``CocktailCallback``, for either Lightning package; see the module docs.

    It holds a :class:`~resilient_tune.Cocktail` session (:attr:`session`) built from the arguments, which are the
    session's. Here probe data may also be a ``DataLoader`` or a ``.json``/``.jsonl`` file of tokenized examples
    (lists of numbers become tensors; handy from LightningCLI or ``RESILIENT_TUNE_GENERAL_DATA``), examples need not
    be dicts, and the probes score ``training_step``'s loss (``score_fn(pl_module, batch)`` replaces it; manual
    optimization needs it). With ``policy="cocktail"`` and no ``target_data`` the target examples are the first 64 of
    each validation dataset.

    Raises:
        ImportError: The Lightning package is not installed (``pip install 'resilient-tune[lightning]'``).
        UsageError: Bad arguments (see :class:`~resilient_tune.Cocktail`).
    """

    _package = "lightning.pytorch"
    _import_error: ImportError | None = None

    def __init__(
        self,
        alpha: float = 0.5,
        *,
        policy: str | Policy = "fixed",
        drift_budget: float | None = None,
        general_data: Any = None,
        target_data: Any = None,
        peers: Sequence[str | os.PathLike[str]] | None = None,
        temperature: float | None = None,
        method: str = "linear",
        method_options: Mapping[str, float] | None = None,
        score_fn: ScoreFn | None = None,
        snapshot_device: str | torch.device = "cpu",
        snapshot_dtype: str | torch.dtype | None = None,
        snapshot_on_disk: bool = False,
        save_resilient: bool = True,
        kl_top_k: int | None = 32,
        max_shard_size: int | str = "5GB",
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        if self._import_error is not None:
            extra = "lightning" if self._package == "lightning.pytorch" else "pytorch-lightning"
            raise ImportError(
                f"this CocktailCallback needs {self._package}; install it with: pip install 'resilient-tune[lightning]' "
                f"(or pip install {extra})"
            ) from self._import_error
        self._session = Cocktail(
            alpha, policy=policy, drift_budget=drift_budget, general_data=from_files(general_data),
            target_data=from_files(target_data), peers=peers, temperature=temperature, method=method,
            method_options=method_options, score_fn=score_fn, snapshot_device=snapshot_device,
            snapshot_dtype=snapshot_dtype, snapshot_on_disk=snapshot_on_disk, save_resilient=save_resilient,
            kl_top_k=kl_top_k, max_shard_size=max_shard_size, seed=seed, strict=strict,
        )  # fmt: skip
        self._session.on_save_failed = self._announce_failure
        self.from_env = False
        self._active = False
        self._reset_run()

    @property
    def session(self) -> Cocktail:
        """The :class:`~resilient_tune.Cocktail` session this callback drives."""
        return self._session

    @property
    def engine(self) -> Engine:
        """The session's engine (a ``LoraEngine`` for a PEFT LoRA model once training has begun)."""
        return self._session.engine

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per decision (see :attr:`Cocktail.history <resilient_tune.Cocktail.history>`)."""
        return self._session.history

    @property
    def save_failures(self) -> list[dict[str, Any]]:
        """The resilient saves that failed in this run (``strict=False``)."""
        return self._session.save_failures

    @property
    def alpha(self) -> float:
        """The current α."""
        return self._session.alpha

    def _reset_run(self) -> None:
        self._trainer: Any = None
        self._module: Any = None
        self._stored: dict[str, Any] | None = None
        self._in_epoch_end = False
        self._io: ResilientCheckpointIO | None = None
        self._saver: CollectiveSave | None = None
        self._collective = False  # a strategy that saves on every rank (see _COLLECTIVE)
        self._writer: LightningWriter | None = None

    # ------------------------------------------------------------------ Lightning: state
    @property
    def state_key(self) -> str:
        """``CocktailCallback``; the instance added by ``RESILIENT_TUNE=1`` uses its own key."""
        name = type(self).__qualname__
        return f"{name}{{'source': 'env'}}" if self.from_env else name

    def state_dict(self) -> dict[str, Any]:
        """The resume state saved in the checkpoint (the session's :meth:`~resilient_tune.Cocktail.state_dict`)."""
        session, trainer = self._session, self._trainer
        if not self._active or not session.started:
            return {}
        last = session.last_entry
        if (
            trainer is not None
            and not trainer.sanity_checking
            and (last is None or last["step"] != trainer.global_step)
        ):
            # a save before (or without) a validation at this step: decide now so that state and files agree; the
            # metrics are logged by the validation that may follow at this step
            build_probes(self._session, trainer, self._module)
            session.decide(trainer.global_step, self._module)
        if not session.base_kept and trainer is not None:
            base_dir = _root(trainer) / BASE_FOLDER  # the first checkpoint: keep θ₀ for a resume
            if session.sharded_base:  # every rank writes its own shards (every rank runs this hook)
                session.keep_base(base_dir)
            elif trainer.is_global_zero:
                keep = lambda: session.keep_base(base_dir, collective=False, guard=False)  # noqa: E731
                self._writer.rank_zero(keep, f"writing the base snapshot to {base_dir}", base_dir)
        self._writer.saves_to_agree += (
            1  # every rank: a checkpoint (and its companion on rank 0) is being saved
        )
        return session.state_dict()

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
        check_trainer(trainer, self._package)
        self._active = not (self.from_env and _has_explicit_callback(trainer, self))
        if not self._active:
            logger.warning(
                "RESILIENT_TUNE=1 ignored: the Trainer already has a CocktailCallback (its configuration wins)"
            )
            return
        self._reset_run()
        self._trainer, self._module = trainer, pl_module
        self._collective = is_collective(trainer, self._package)
        self._writer = LightningWriter(self._session, trainer, pl_module, self._collective)
        if not self._collective:
            # a resume is only known after this hook: an on-disk θ₀ goes to a pending folder until on_train_start
            self._session.begin(pl_module, base_dir=_root(trainer) / (BASE_FOLDER + _PENDING), probes=False)
        self._io = ResilientCheckpointIO.install(trainer.strategy, self)
        if self._collective:
            self._saver = CollectiveSave.install(trainer.strategy, self)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Sharded strategies: snapshot θ₀ now, after ``configure_model`` and the strategy's setup built and sharded
        the module, and before a checkpoint is restored (these strategies restore after ``on_fit_start``)."""
        if self._active and self._collective:
            self._session.begin(pl_module, base_dir=_root(trainer) / (BASE_FOLDER + _PENDING), probes=False)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._active:
            return
        session, root = self._session, _root(trainer)
        pending = root / (BASE_FOLDER + _PENDING)
        if self._stored is not None or trainer.ckpt_path is not None:
            if session.engine.snapshot.storage == "disk":
                session.engine.snapshot.close()
            shutil.rmtree(pending, ignore_errors=True)
            session.load_state_dict(self._stored or {})
            session.begin(pl_module, step=trainer.global_step, base_dir=root / BASE_FOLDER, probes=False)
            return
        if not self._collective:  # sharded: each rank's θ₀ shards differ by design
            align_ranks(self._session, trainer, pl_module, pending)
        if session.engine.snapshot.storage == "disk":
            session.move_base(root / BASE_FOLDER, move=lambda: promote(trainer, pending, root / BASE_FOLDER))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        session = self._session
        if not self._active or trainer.sanity_checking or not session.started:
            return
        if trainer.state.fn != "fit":
            return  # a standalone trainer.validate()
        build_probes(self._session, trainer, pl_module)
        self._in_epoch_end = True
        try:  # decided at a save of this step already: logged now
            session.decide(trainer.global_step, pl_module)
            self._log(session.last_entry or {})
        finally:
            self._in_epoch_end = False

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        session = self._session
        if not self._active or not session.started:
            return
        self._writer.agree(force=True)
        build_probes(self._session, trainer, pl_module)
        made = session.last_entry is not None and session.last_entry["step"] == trainer.global_step
        session.decide(trainer.global_step, pl_module)
        entry = session.last_entry or {}
        if not made:
            self._log(entry)
        step, root = trainer.global_step, _root(trainer)
        if session.save_resilient:  # every rank takes part and learns the outcome
            self._writer.final(root / RESILIENT_FOLDER, step, entry)
        report = root / REPORT_FILE
        session.guarded(
            lambda: on_rank_zero(lambda: session.report(report, entry), f"writing {report}"), report, step
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._active and self._writer is not None:
            self._writer.agree()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._active and self._writer is not None and not trainer.sanity_checking:
            self._writer.agree()

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

    # ------------------------------------------------------------------ checkpoint files (called by the IO wrappers)
    def write_companion(self, checkpoint_path: Any, *, collective: bool = False) -> None:
        if (
            self._active
            and self._session.save_resilient
            and self._session.started
            and self._writer is not None
        ):
            self._writer.companion(checkpoint_path, collective=collective)

    def remove_companion(self, checkpoint_path: Any) -> None:
        if self._writer is not None:
            self._writer.remove(checkpoint_path)

    # ------------------------------------------------------------------ glue
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

    def _announce_failure(self, record: Mapping[str, Any]) -> None:
        """``cocktail/save_failed`` (the count so far) to the Trainer's loggers, on global rank 0 (no collective)."""
        trainer = self._trainer
        if trainer is not None and trainer.is_global_zero:
            for lightning_logger in trainer.loggers:
                count = float(len(self._session.save_failures))
                lightning_logger.log_metrics({"cocktail/save_failed": count}, step=record["step"])


# ---------------------------------------------------------------------------- helpers
def _root(trainer: Any) -> Path:
    return Path(trainer.default_root_dir)


def _has_explicit_callback(trainer: Any, me: Any) -> bool:
    return any(
        cb is not me and isinstance(cb, LightningCocktail) and not cb.from_env for cb in trainer.callbacks
    )


_BASES, _IMPORT_ERROR = callback_bases("lightning.pytorch")


class CocktailCallback(LightningCocktail, *_BASES):  # type: ignore[misc]
    """Lightning (``lightning.pytorch``) callback writing resilient (LM-Cocktail) checkpoints.

    ``Trainer(callbacks=[CocktailCallback()])`` (α = 0.5), ``CocktailCallback(alpha=0.3)``,
    ``CocktailCallback(policy="budget", general_data=examples, drift_budget=0.05)`` or
    ``CocktailCallback(policy="cocktail", peers=[...])``. See the module docs for what is written where and
    :class:`~resilient_tune.Cocktail` for the arguments.
    """

    _package = "lightning.pytorch"
    _import_error = _IMPORT_ERROR
