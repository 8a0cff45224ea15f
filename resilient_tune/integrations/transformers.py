"""``CocktailCallback``: resilient checkpoints from a Hugging Face ``Trainer``, with zero configuration.

``Trainer(..., callbacks=[CocktailCallback()])`` snapshots the trainable weights θ₀ before the first optimizer
step and, next to every ``checkpoint-N/``, writes ``checkpoint-N/resilient/``: the model
``θ₀ + α·(θ_N − θ₀)`` (``α = 0.5`` by default), ``from_pretrained``-loadable, with the config/tokenizer copied
from the checkpoint, ``cocktail.json`` (step, α, recipe, probe metrics) and a model card. It rotates with its
checkpoint (``save_total_limit``) and is written by the world process zero only, atomically. At the end of
training it writes ``output_dir/resilient/`` and ``output_dir/cocktail_report.json`` (α and drift over steps).

With ``general_data`` (a few dozen examples the model must not forget, tokenized like the eval data) each
evaluation also runs probes: the general loss of candidate mixes (swapped into the live model in place and
restored bit-exactly), ``KL(base ‖ fine-tuned)`` on the general tokens, and the weight-space drift; the policy
(``fixed``, ``budget`` or ``cocktail``) chooses α.

Peers and the ``cocktail`` policy
---------------------------------
``peers=[path, ...]`` (checkpoints of the same architecture fine-tuned on other domains) make the resilient model
the paper's ``α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ`` over the base and the peers. The peers are opened at train begin, paired
with the model's trainable parameters (a peer of another architecture fails there, naming the first mismatching
key) and read one tensor at a time. ``policy="cocktail"`` sets ``wᵢ = softmax(−Lᵢ/temperature)`` from each
ingredient's loss ``Lᵢ`` on ``target_data`` (default: the first 64 examples of each eval dataset); the
ingredients never change, so the ``1 + len(peers)`` passes are made once per run (and kept in the resume state).
``fixed`` and ``budget`` use uniform ``wᵢ`` (or the ``weights`` of a ``FixedPolicy`` object); with peers the
budget's reference (α = 0) is the base/peer mix. The weights are logged as ``cocktail/weight_base``,
``cocktail/weight_peer1``, ... and recorded with the peers' paths and fingerprints in ``cocktail.json``.

PEFT LoRA
---------
With a ``peft`` LoRA model no snapshot is taken: θ₀ + α·Δ is the adapter scaled by α (see
:mod:`resilient_tune.integrations.peft`); ``resilient/`` then holds the merged full model and, in ``adapter/``,
the α-scaled adapter. DoRA is refused at train begin (scaling it is not exact).

At the end of training ``output_dir/cocktail_report.png`` plots the probe losses and α over steps (needs
matplotlib: ``pip install 'resilient-tune[demo]'``; without it a warning, never an error).

How the callback reaches the Trainer
------------------------------------
Transformers hands callbacks the model, the optimizer, the dataloaders and the processing class, but no
reference to the Trainer. ``CocktailCallback`` needs it for three things: the data collator and column
filtering that turn ``general_data`` into batches, the Trainer's ``compute_loss`` when the training objective is
custom, and ``Trainer.log`` so that the ``cocktail/*`` metrics reach ``report_to`` (TensorBoard, W&B, ...).
At ``on_train_begin`` it finds the ``Trainer`` instance that is running it by walking up the call stack (the
``self`` of the Trainer method that fired the event). If that ever fails (an unusual wrapper around the
training loop), call ``callback.bind(trainer)`` before ``trainer.train()``.

Metrics are logged once per evaluation, after the last eval dataset has reported (with a dict of eval datasets
``on_evaluate`` fires once per dataset), with ``trainer.log`` as ``cocktail/alpha``, ``cocktail/drift_norm``,
``cocktail/general_loss``, ... and are also added to the evaluation's metrics as ``eval_cocktail_alpha``,
``eval_cocktail_general_loss``, ... so that ``metric_for_best_model="cocktail_general_loss"`` works.

Resume
------
The callback's state (the snapshot's location and fingerprint, the α history, the base's probe loss) is saved
in every checkpoint's ``trainer_state.json`` (``stateful_callbacks``). θ₀ is persisted once per run in
``output_dir/resilient_base/`` (written at train begin when the run saves checkpoints). A resumed run reloads
that snapshot instead of treating the resumed weights as the base, and continues the α history; this works
with or without ``restore_callback_states_from_checkpoint``.
"""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from resilient_tune.distributed import on_rank_zero
from resilient_tune.engine import Engine, find_peft_model
from resilient_tune.errors import UsageError
from resilient_tune.integrations._hf_trainer import find_trainer, replaced_callback, stored_state
from resilient_tune.integrations._st_drift import is_sentence_batch, use_drift
from resilient_tune.integrations.hf_families import (
    check_probe_examples,
    check_probe_loss,
    is_sentence_transformer,
    probe_batches,
    probe_objective,
    saver_for,
    trainer_score_fn,
)
from resilient_tune.policy import Policy
from resilient_tune.report import REPORT_FILE
from resilient_tune.session import (
    BASE_FOLDER,
    RESILIENT_FOLDER,
    Cocktail,
    ScoreFn,
    check_writable,
    metrics,
    probe_sets,
    scalars,
)

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    _BASES: tuple[type, ...] = (TrainerCallback, ExportableState)
    _IMPORT_ERROR: ImportError | None = None
except ImportError as _exc:  # pragma: no cover - exercised only without transformers
    _BASES = (object,)
    _IMPORT_ERROR = _exc

__all__ = ["CocktailCallback"]

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class CocktailCallback(*_BASES):  # type: ignore[misc]
    """Hugging Face ``Trainer`` callback writing resilient (LM-Cocktail) checkpoints; see the module docs.

    It holds a :class:`~resilient_tune.Cocktail` session (:attr:`session`) built from the arguments, which are the
    session's (``alpha``, ``policy``, ``general_data``, ``peers``, ...). Here ``general_data`` / ``target_data`` are
    batched as the Trainer batches its eval data (once, at train begin), and the probes use the Trainer's
    ``compute_loss`` when the Trainer overrides it (custom objectives, label smoothing, sentence-transformers losses).

    Raises:
        ImportError: transformers is not installed (``pip install 'resilient-tune[hf]'``).
        UsageError: Bad arguments (see :class:`~resilient_tune.Cocktail`).
    """

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
        probe_loss: str = "auto",
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(
                "CocktailCallback needs transformers; install it with: pip install 'resilient-tune[hf]'"
            ) from _IMPORT_ERROR
        self._probe_loss = check_probe_loss(probe_loss)
        for label, data in (("general_data", general_data), ("target_data", target_data)):
            check_probe_examples(probe_sets(data, label, loaders=False), label)  # batched here, as eval data
        self._session = Cocktail(
            alpha, policy=policy, drift_budget=drift_budget, general_data=general_data, target_data=target_data,
            peers=peers, temperature=temperature, method=method, method_options=method_options, score_fn=score_fn,
            snapshot_device=snapshot_device, snapshot_dtype=snapshot_dtype, snapshot_on_disk=snapshot_on_disk,
            save_resilient=save_resilient, kl_top_k=kl_top_k, max_shard_size=max_shard_size, seed=seed, strict=strict,
        )  # fmt: skip
        self._session.on_save_failed = self._announce_failure
        self._trainer: Any = None
        self._token = uuid.uuid4().hex
        _LIVE[self._token] = self

    # ------------------------------------------------------------------ public helpers
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

    def bind(self, trainer: Any) -> CocktailCallback:
        """Give the callback its Trainer explicitly (only needed when the call-stack lookup fails)."""
        self._trainer = trainer
        return self

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict[str, Any]:
        """JSON-able state saved in ``trainer_state.json``: the session's :meth:`~resilient_tune.Cocktail.state_dict`.

        ``args`` is empty on purpose: when the Trainer rebuilds callbacks from checkpoints
        (``restore_callback_states_from_checkpoint=True``) it calls ``CocktailCallback()`` and then sets the
        attributes; setting ``_origin`` takes the session (probe data, policy, ...) of the callback being replaced,
        which cannot be stored as JSON.
        """
        return {
            "args": {},
            "attributes": {"_origin": self._token, "_resume_state": self._session.state_dict()},
        }

    @property
    def _origin(self) -> str:
        return self._token

    @_origin.setter
    def _origin(self, token: str) -> None:
        """Take the session of the callback this one replaces (see :meth:`state`).

        The source is the ``CocktailCallback`` still registered in the Trainer that is restoring callbacks (found
        on the call stack, as in ``on_train_begin``), else the live callback that saved the state, else the most
        recently created live one.
        """
        source = replaced_callback(self, CocktailCallback) or _LIVE.get(token)
        if source is None or source is self:
            others = [cb for cb in list(_LIVE.values()) if cb is not self]
            source = others[-1] if others else None
        if source is None:
            logger.warning(
                "CocktailCallback restored from a checkpoint without a live original: default options"
            )
            return
        source._config_taken = True
        self._session, self._probe_loss = source._session, source._probe_loss
        self._session.on_save_failed = self._announce_failure

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        session = self._session
        self._trainer = self._trainer or find_trainer()
        if model is None:
            raise UsageError("the Trainer passed no model to CocktailCallback.on_train_begin")
        if is_sentence_transformer(model) and find_peft_model(model) is not None:
            raise UsageError(
                "CocktailCallback does not support a SentenceTransformer with a PEFT adapter (model.add_adapter) yet: "
                "its checkpoints hold the adapter alone, and a resilient folder would need the α-scaled adapter in "
                "sentence-transformers' layout. Train the full model (the resilient folders then load with "
                "SentenceTransformer(path)), or merge offline: model.merge_and_unload() on the transformer module, "
                "then resilient_tune.merge([fine_tuned_dir, base_dir], [alpha, 1 - alpha])"
            )
        output = Path(args.output_dir)
        if session.save_resilient:  # before any work: a run must not train for hours and then fail to save
            on_rank_zero(lambda: check_writable(output), f"checking that {output} is writable")
        if state.global_step > 0:
            session.load_state_dict(stored_state(state, CocktailCallback.__name__) or {})
        session.begin(model, step=state.global_step, base_dir=output / BASE_FOLDER, probes=False)
        strategy = getattr(args, "save_strategy", "steps")
        if (
            state.global_step == 0
            and not session.snapshot_on_disk
            and getattr(strategy, "value", strategy) != "no"
        ):
            session.keep_base(output / BASE_FOLDER)  # θ₀ for a resume in a new process
        self._build_probes(args, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._decide_before_save(state, control, model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._decide_before_save(state, control, model)

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        model: Any = None,
        **kw: Any,
    ) -> None:
        if model is None or not self._session.started:
            return
        prefix = self._root_prefix(metrics or {})
        if prefix is None:
            return  # not the last of several eval datasets
        entry = self._decide(state.global_step, model)
        evaluated = {f"{prefix}_cocktail_{k}": v for k, v in scalars(entry).items()}
        if (
            metrics is not None
        ):  # for metric_for_best_model; the Trainer logged its metrics before this event...
            metrics.update(evaluated)
        if self._trainer is not None and hasattr(self._trainer, "log"):
            self._trainer.log(
                evaluated
            )  # ...so they reach report_to here: eval/cocktail_* in TensorBoard and W&B

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        session = self._session
        if not session.save_resilient or model is None or not session.started:
            return
        # a save without an evaluation: decide now (the state saved before on_save lands one save late)
        self._decide(state.global_step, model, log=False)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        saver = saver_for(model)
        session.write(  # every rank: rank 0 writes (a sharded model is gathered first), all agree on the outcome
            model,
            checkpoint / RESILIENT_FOLDER,
            state.global_step,
            support_from=None if saver or not checkpoint.is_dir() else checkpoint,
            tokenizer=kwargs.get("processing_class"),
            saver=saver,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        session = self._session
        if model is None or not session.started:
            return
        entry = self._final_entry(args, state, model)
        output = Path(args.output_dir)
        if session.save_resilient:
            session.write(
                model,
                output / RESILIENT_FOLDER,
                state.global_step,
                entry=entry,
                tokenizer=kwargs.get("processing_class"),
                saver=saver_for(model),
            )
        report = output / REPORT_FILE
        session.guarded(
            lambda: on_rank_zero(lambda: session.report(report, entry), f"writing {report}"),
            report,
            state.global_step,
        )

    # ------------------------------------------------------------------ glue
    def _build_probes(self, args: Any, model: torch.nn.Module) -> None:
        session = self._session
        target_sets = session.target_sets(self._eval_datasets())
        if (session.general_data or target_sets) and self._trainer is None:
            raise UsageError(
                "CocktailCallback could not find the Trainer running it (needed to batch general_data/target_data); "
                "call callback.bind(trainer) before trainer.train()"
            )
        objective = probe_objective(self._trainer, model, self._probe_loss)
        options = {"objective": objective, "model": model}
        general = {
            n: probe_batches(self._trainer, args, d, n, **options) for n, d in session.general_data.items()
        }
        target = {n: probe_batches(self._trainer, args, d, n, **options) for n, d in target_sets.items()}
        if any(is_sentence_batch(b[0]) for b in general.values()):  # bare sentences: a label-free drift
            use_drift(self._session, self._trainer, model, general, target)
            return
        score = session.score_fn or (trainer_score_fn(self._trainer) if objective == "training" else None)
        session.use_probes(model, general, target, score_fn=score)

    def _eval_datasets(self) -> dict[str, Any]:
        """The Trainer's eval datasets (``eval`` or ``eval_<name>``): the default target probes of ``cocktail``."""
        datasets = getattr(self._trainer, "eval_dataset", None)
        if datasets is None:
            return {}
        if isinstance(datasets, Mapping):
            return {f"eval_{name}": d for name, d in datasets.items()}
        return {"eval": datasets}

    def _decide(self, step: int, model: torch.nn.Module, *, log: bool = True) -> dict[str, Any]:
        """The decision of ``step`` (made once), logged through the Trainer when new and ``log``."""
        session = self._session
        made = session.last_entry is not None and session.last_entry["step"] == step
        session.decide(step, model)
        entry = session.last_entry or {}
        if log and not made:
            self._log(entry)
        return entry

    def _decide_before_save(self, state: Any, control: Any, model: Any) -> None:
        """A save coming without an evaluation: decide now, so that the saved state already holds this α."""
        if model is None or not self._session.started or not control.should_save or control.should_evaluate:
            return
        self._decide(state.global_step, model)

    def _final_entry(self, args: Any, state: Any, model: torch.nn.Module) -> dict[str, Any]:
        best = getattr(state, "best_global_step", None)
        if getattr(args, "load_best_model_at_end", False) and best:
            entry = self._session.select(best)  # the Trainer reloaded the best checkpoint: its α
            if entry is not None:
                return entry
        return self._decide(state.global_step, model)

    def _root_prefix(self, metrics: Mapping[str, Any]) -> str | None:
        """The metric prefix to add keys under, or ``None`` when this is not the last of several eval datasets."""
        runtime = next((k for k in metrics if k.endswith("_runtime")), None)
        prefix = runtime[: -len("_runtime")] if runtime else "eval"
        datasets = getattr(self._trainer, "eval_dataset", None)
        if isinstance(datasets, Mapping) and datasets:
            last = str(list(datasets)[-1])
            if not prefix.endswith(f"_{last}"):
                return None
            prefix = prefix[: -len(last) - 1] or "eval"
        return prefix

    def _announce_failure(self, record: Mapping[str, Any]) -> None:
        self._log({"step": record["step"], "save_failed": len(self._session.save_failures)})

    def _log(self, entry: Mapping[str, Any]) -> None:
        logs = metrics(entry)
        if self._trainer is not None and hasattr(self._trainer, "log"):
            self._trainer.log(logs)
        else:
            logger.info("cocktail metrics: %s", logs)
