"""What the training callbacks share, whatever the framework: the framework-free half of ``CocktailCallback``.

:class:`CocktailCore` is the first base of each framework's callback class (the Hugging Face ``Trainer`` adapter in
:mod:`resilient_tune.integrations.transformers`, Lightning in :mod:`resilient_tune.integrations.lightning`). It
holds the one constructor (the options, validated, and the policy and engine built from them) and everything that
does not depend on the framework:

- the base's life cycle: the engine for the model (a :class:`~resilient_tune.integrations.peft.LoraEngine`, which
  copies nothing, for a PEFT LoRA model), the θ₀ snapshot, the peers opened and checked against the model, the
  snapshot persisted for a resume, the resume state and its restoration (:meth:`_take_snapshot`,
  :meth:`_persist_snapshot`, :meth:`_run_state`, :meth:`_restore`);
- the probe runs and the decision at an evaluation: policy (``fixed``, ``cocktail``, ``budget`` or an object), the
  ingredient losses ``Lᵢ`` of the base and the peers (once per run), the decision's weights applied to the engine
  before the chosen mix is measured, the KL reference taken from the base alone (:meth:`_set_probes`,
  :meth:`_decide`);
- ``cocktail.json`` with the resilient weights (:meth:`_write`) and the report with its PNG plot
  (:meth:`_write_report`).

The adapters supply the glue through a few hooks: :meth:`_check_installed` (the framework is installed),
:meth:`_load_probe_data`, :meth:`_init_framework`, :meth:`_default_target` (eval data for the ``cocktail``
policy), :meth:`_log` (where metrics go); and they decide when events fire, how probe data becomes batches, where
files go and which process writes them. Nothing here imports a training framework.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from resilient_tune.checkpoint import parse_size
from resilient_tune.distributed import (
    agree_on_failure,
    gather_objects,
    is_rank_zero,
    is_sharded_model,
    mean_across_ranks,
    on_rank_zero,
    rank,
    world_size,
)
from resilient_tune.engine import FORMAT as LORA_FORMAT
from resilient_tune.engine import CocktailEngine, LoraEngine, engine_for
from resilient_tune.errors import IncompatibleModelsError, UsageError
from resilient_tune.policy import Decision, Policy, choose, get_policy
from resilient_tune.probes import BaseLogits, ProbeResult, base_log_probs, ingredient_losses, probe
from resilient_tune.report import PLOT_FILE, REPORT_FILE, plot_history
from resilient_tune.snapshot import Snapshot
from resilient_tune.validation import check_alpha

__all__ = [
    "BASE_FOLDER",
    "CONFIG_FIELDS",
    "REPORT_FILE",
    "RESILIENT_FOLDER",
    "TARGET_DEFAULT_EXAMPLES",
    "CocktailCore",
    "ScoreFn",
    "check_writable",
    "head",
    "make_policy",
    "metrics",
    "probe_sets",
    "scalars",
]

logger = logging.getLogger("resilient_tune.integrations")

BASE_FOLDER = "resilient_base"
RESILIENT_FOLDER = "resilient"
STATE_VERSION = 1
# resume state of a snapshot kept per rank (a sharded model, or snapshot_on_disk with several processes)
PER_RANK_FORMAT = "resilient-tune-per-rank-snapshot"
TARGET_DEFAULT_EXAMPLES = 64  # target examples taken from each eval dataset when target_data is not given
CONFIG_FIELDS = (
    "_engine",
    "_policy",
    "_general",
    "_target",
    "_score_fn",
    "save_resilient",
    "kl_top_k",
    "snapshot_on_disk",
    "max_shard_size",
    "strict",
)
"""The attributes the constructor sets: a callback rebuilt by a framework copies them from the original."""

ScoreFn = Callable[[torch.nn.Module, Mapping[str, Any]], Any]
Batches = list[Any]
T = TypeVar("T")


class CocktailCore:
    """Framework-free state and logic of a ``CocktailCallback``; see the module docs.

    Args:
        alpha: Weight α of the fine-tuned model in ``[0, 1]`` (0.5 by default): the resilient model is
            ``θ₀ + α·(θₜ − θ₀)``, with peers ``α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ``. Used by the ``fixed`` and ``cocktail``
            policies; ``budget`` chooses α itself.
        policy: How α (and the peer weights) is chosen at each evaluation: ``"fixed"`` (default), ``"cocktail"``
            (the paper: ``wᵢ = softmax(−Lᵢ/temperature)`` from the loss ``Lᵢ`` of the base and each peer on
            target examples, α as given), ``"budget"`` (the largest α whose general-probe loss stays within
            ``(1 + drift_budget)`` × the base's; needs ``general_data``), or an object with
            ``choose(evaluate) -> Decision``.
        drift_budget: For ``budget``: allowed relative increase of the general-probe loss (default 0.05 = 5%).
        general_data: General probes (what the model must not forget): a dataset of examples in the format of
            the eval/validation data, or a dict ``name -> dataset``. Hugging Face: tokenized example dicts batched
            with the Trainer's collator and eval batch size. Lightning: also a ``DataLoader`` or a
            ``.json``/``.jsonl`` file of tokenized examples, batched with the validation dataloader's
            ``collate_fn``.
        target_data: Target probes (the new skill), same forms; logged as ``cocktail/target_loss``. With
            ``policy="cocktail"`` it defaults to the first 64 examples of each eval/validation dataset.
        peers: Checkpoints (folders or files) of peer models: the same architecture fine-tuned on other domains.
            Opened at train begin and checked against the model's trainable parameters (the first mismatching
            key is named); read one tensor at a time. Not with PEFT LoRA models.
        temperature: For ``cocktail``: the softmax temperature τ of the peer weights (5.0, the reference's).
        method: Merge method (any registered name; ``linear`` by default).
        method_options: Options of the merge method (``density``, ``lambda``, ...).
        score_fn: ``score_fn(model, batch) -> scalar loss`` for the probes. Default: the model's own loss (Hugging
            Face: the Trainer's ``compute_loss`` when the Trainer overrides it; Lightning: the loss
            ``training_step`` returns).
        snapshot_device: Where the in-memory snapshot θ₀ lives (``"cpu"``).
        snapshot_dtype: Storage dtype of θ₀: ``None`` (same as the parameters), ``"bf16"`` or ``"fp16"``.
        snapshot_on_disk: Keep θ₀ on disk in ``<output>/resilient_base/`` (about zero resident memory; with several
            processes each rank keeps its own folder ``resilient_base/rank<r>-of-<n>/``).
        save_resilient: Write the resilient folders (next to each checkpoint and ``<output>/resilient/``).
        kl_top_k: Keep the base's ``k`` most likely tokens per position for the KL probe (``None``: all).
        max_shard_size: Shard size of the written weights (bytes or ``"5GB"``).
        seed: Seed of random merge methods (DARE).
        strict: What a failed resilient save does (disk full, no permission, a non-finite merge result, ...).
            ``False`` (default): it is logged loudly (``logger.error`` with the folder and the cause, the metric
            ``cocktail/save_failed``, a record in the run state and the report) and training goes on; no
            half-written folder is left. ``True``: the error is raised and stops the run. Under DDP every rank
            takes the same path (rank 0's outcome is agreed by a collective), so no rank is left waiting.

    Raises:
        ImportError: The framework is not installed (the message names the extra to install).
        UsageError: Bad arguments: α outside ``[0, 1]``, an unknown policy or method, ``budget`` without
            ``general_data``, ``temperature`` without ``cocktail``, a missing peer path, empty or malformed probe
            data, a bad shard size, ...
    """

    _accepts_loaders = False  # probe data may be a ready DataLoader
    _needs_mapping_examples = True  # each probe example must be a dict of tokenized fields
    _eval_data = "an eval dataset"  # what _default_target reads, for messages

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
        self._check_installed()
        alpha = check_alpha(alpha)
        for name, flag in (
            ("strict", strict),
            ("snapshot_on_disk", snapshot_on_disk),
            ("save_resilient", save_resilient),
        ):
            if not isinstance(flag, bool):
                raise UsageError(
                    f"{name}={flag!r} must be True or False (a bool; a string such as 'no' is truthy)"
                )
        self._policy = make_policy(policy, alpha, drift_budget, temperature)
        checks = {"loaders": self._accepts_loaders, "mapping_examples": self._needs_mapping_examples}
        self._general = probe_sets(self._load_probe_data(general_data), "general_data", **checks)
        self._target = probe_sets(self._load_probe_data(target_data), "target_data", **checks)
        if self._policy.needs_general_data and not self._general:
            raise UsageError(
                f"policy {self._policy.name!r} measures the general-probe loss and needs general_data: pass a few "
                "dozen tokenized examples the model must not forget (general_data=dataset), or use policy='fixed'"
            )
        if score_fn is not None and not callable(score_fn):
            raise UsageError(f"score_fn={score_fn!r} must be callable as score_fn(model, batch) -> loss")
        if kl_top_k is not None and (
            isinstance(kl_top_k, bool) or not isinstance(kl_top_k, int) or kl_top_k < 1
        ):
            raise UsageError(f"kl_top_k={kl_top_k!r} must be a positive int or None (keep every token)")
        parse_size(max_shard_size)  # fail now, not at the first save
        self._engine: Any = CocktailEngine(
            alpha,
            method,
            method_options,
            seed=seed,
            snapshot_device=snapshot_device,
            snapshot_dtype=snapshot_dtype,
            peers=peers,
        )
        self._score_fn = score_fn
        self.snapshot_on_disk = bool(snapshot_on_disk)
        self.save_resilient = bool(save_resilient)
        self.kl_top_k = kl_top_k
        self.max_shard_size = max_shard_size
        self.strict = bool(strict)
        self._reset_run()
        self._init_framework()

    # ------------------------------------------------------------------ hooks for the adapters
    def _check_installed(self) -> None:
        """Raise ``ImportError`` naming the extra to install when the framework is missing."""

    def _load_probe_data(self, data: Any) -> Any:
        """Turn the user's probe data into datasets (e.g. Lightning reads ``.jsonl`` paths)."""
        return data

    def _init_framework(self) -> None:
        """Set the adapter's own attributes at the end of the constructor."""

    def _default_target(self) -> dict[str, Any]:
        """The eval datasets, ``name -> dataset``, for ``cocktail`` without ``target_data`` (``{}``: none)."""
        return {}

    def _log(self, entry: Mapping[str, Any]) -> None:
        """Send a decision's metrics to the framework's logger."""
        logger.info("cocktail metrics: %s", metrics(entry))

    # ------------------------------------------------------------------ public helpers
    @property
    def engine(self) -> Any:
        """The framework-agnostic engine (snapshot, swap, drift, write): a ``CocktailEngine``, or a ``LoraEngine``
        for a PEFT LoRA model once training has begun."""
        return self._engine

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per decision: step, α, drift, probe losses, passes, peer weights (JSON-able)."""
        return list(self._history)

    @property
    def save_failures(self) -> list[dict[str, Any]]:
        """The resilient saves that failed in this run (``strict=False``): ``{"step", "path", "error"}`` each."""
        return [dict(f) for f in self._save_failures]

    @property
    def alpha(self) -> float:
        """The current α (the last decision's, or the policy's before any decision)."""
        return self._history[-1]["alpha"] if self._history else self._engine.alpha

    # ------------------------------------------------------------------ run lifecycle
    def _reset_run(self) -> None:
        self._history: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._snapshot_state: dict[str, Any] | None = None
        self._base_result: ProbeResult | None = None
        self._ingredient_losses: list[float] | None = None
        self._batches: dict[str, Batches] = {}
        self._target_batches: dict[str, Batches] = {}
        self._base_refs: dict[str, list[BaseLogits]] = {}
        self._probe_module: torch.nn.Module | None = None
        self._score: ScoreFn | None = None
        self._passes = 0
        self._save_failures: list[dict[str, Any]] = []

    def _take_snapshot(self, model: torch.nn.Module, base_dir: Path) -> None:
        """Start a run on ``model``: pick the engine (a ``LoraEngine`` for a PEFT LoRA model, which copies nothing),
        snapshot θ₀ (in memory, or on disk in ``base_dir`` with ``snapshot_on_disk``) and open the peers.

        Raises:
            IncompatibleModelsError: A peer does not hold the model's trainable parameters (names the first key).
            UsageError: A PEFT model the LoRA path does not support (DoRA, several adapters, ...).
            NotImplementedError: Peers with a PEFT LoRA model.
        """
        self._engine = engine_for(model, self._engine)
        if not self.snapshot_on_disk or isinstance(self._engine, LoraEngine):
            self._engine.snapshot_dir = None
            self._engine.begin(model)
            self._note_snapshot()
        elif world_size() == 1:
            self._engine.snapshot_dir = base_dir
            self._engine.begin(model, overwrite=True)
            self._note_snapshot()
        else:  # several processes: each rank writes its own folder (its shards, or its copy under DDP)

            def write() -> None:
                base_dir.mkdir(parents=True, exist_ok=True)
                self._engine.snapshot_dir = base_dir / rank_folder()
                self._engine.begin(model, overwrite=True)

            self._on_every_rank(write, f"writing the base snapshot to {base_dir}")

    @property
    def _sharded_snapshot(self) -> bool:
        """The snapshot holds this rank's shards of a sharded model (FSDP2, ZeRO-3)."""
        return getattr(self._engine.snapshot, "shard", None) is not None

    def _persist_snapshot(self, base_dir: Path) -> None:
        """Give an in-memory θ₀ an on-disk copy in ``base_dir`` so that a resumed run can reload it (the process
        that writes checkpoints calls it; a sharded model's snapshot goes through :meth:`_persist_shards`)."""
        if self._sharded_snapshot:
            raise RuntimeError("a sharded snapshot is persisted by every rank: call _persist_shards")
        snapshot = self._engine.snapshot
        if snapshot.storage == "memory":
            snapshot.persist(base_dir, overwrite=True)
        self._note_snapshot()

    def _persist_shards(self, base_dir: Path) -> None:
        """Sharded model, **every rank calls it**: each rank writes its own θ₀ shards to
        ``base_dir/rank<r>-of-<n>/`` (:func:`rank_folder`) and the ranks exchange their snapshot states, so the
        resume state (saved by one rank) names every rank's folder and fingerprint.

        Raises:
            Exception: This rank's write error; :class:`~resilient_tune.distributed.RankError` on the other ranks.
        """
        snapshot = self._engine.snapshot

        def write() -> None:
            if snapshot.storage == "memory":
                base_dir.mkdir(parents=True, exist_ok=True)
                snapshot.persist(base_dir / rank_folder(), overwrite=True)

        self._on_every_rank(write, f"writing the base snapshot shards to {base_dir}")

    def _on_every_rank(self, write: Callable[[], None], what: str) -> None:
        """Every rank calls it: run this rank's snapshot ``write``, agree with the other ranks on whether any failed
        (raising on every rank if one did), then make the resume state every rank's snapshot state, in rank order.

        Raises:
            Exception: This rank's write error; :class:`~resilient_tune.distributed.RankError` on the other ranks.
        """
        failure: BaseException | None = None
        try:
            write()
        except Exception as exc:  # every rank must reach the agreement, whatever failed here
            failure = exc
        agree_on_failure(failure, what)
        self._gather_snapshot_states()

    def _gather_snapshot_states(self) -> None:
        """Every rank calls it: the resume state becomes every rank's snapshot state, in rank order."""
        self._snapshot_state = {
            "format": PER_RANK_FORMAT,
            "ranks": gather_objects(self._engine.snapshot.state()),
        }

    def _note_snapshot(self) -> None:
        snapshot = self._engine.snapshot
        if snapshot.folder is not None or snapshot.storage == "none":  # "none": LoRA, θ₀ stays in the model
            self._snapshot_state = snapshot.state()

    def _run_state(self) -> dict[str, Any]:
        """The JSON-able state a checkpoint keeps: the snapshot's location and fingerprint (or the LoRA adapter), the
        α history, the base's general-probe loss, the ingredient losses and the peers' identities."""
        peers = self._engine.peers
        return {
            "version": STATE_VERSION,
            "snapshot": self._snapshot_state,
            "history": self._history,
            "base_general_loss": None if self._base_result is None else self._base_result.loss,
            "save_failures": self._save_failures,
            "cocktail": {
                "ingredient_losses": self._ingredient_losses,
                "peers": peers.identities() if peers is not None else [],
            },
        }

    def _restore(
        self,
        stored: Mapping[str, Any] | None,
        model: torch.nn.Module,
        step: int,
        moved: Path | None = None,
    ) -> None:
        """Continue a run from the :meth:`_run_state` a checkpoint kept: reload θ₀ (a LoRA run has nothing to reload:
        the frozen base weights are in the model), keep the α history up to ``step``, the ingredient losses, and
        check that the peers are the run's. Never treats the resumed weights as the base.

        Args:
            stored: The saved resume state (``None`` when the checkpoint holds none: refused).
            model: The live model (checked against the snapshot).
            step: The resumed global step.
            moved: Where the base folder is now if the run folder was moved (used when the recorded path is gone).

        Raises:
            UsageError: The checkpoint holds no base snapshot, or the model changed between LoRA and full training.
            IncompatibleModelsError: The peers changed since the run started.
        """
        stored = stored or {}
        snap_state = stored.get("snapshot")
        if not snap_state:
            raise UsageError(
                f"resuming at step {step}, but the checkpoint holds no CocktailCallback base snapshot; "
                "the resumed weights are not the base. Resume a run that used CocktailCallback from its start, or "
                "start a new run"
            )
        snap_state = dict(snap_state)
        self._engine = engine_for(model, self._engine)
        lora_run = snap_state.get("format") == LORA_FORMAT
        if lora_run != isinstance(self._engine, LoraEngine):
            then, now = (
                ("a PEFT LoRA model", "a full model") if lora_run else ("a full model", "a PEFT model")
            )
            raise UsageError(
                f"the checkpoint's run trained {then} but the model is now {now}; resume with the model the run "
                "started with, or start a new run"
            )
        if lora_run:
            self._engine.begin(model)
        elif snap_state.get("format") == PER_RANK_FORMAT:
            device = None if self.snapshot_on_disk else self._engine.snapshot_device
            self._engine.attach(Snapshot.load(_rank_state(snap_state, moved), device=device), model)
        else:
            _relocate(snap_state, moved)
            device = None if self.snapshot_on_disk else self._engine.snapshot_device
            self._engine.attach(Snapshot.load(snap_state, device=device), model)
        self._snapshot_state = snap_state
        self._history = [dict(e) for e in stored.get("history", []) if e.get("step", 0) <= step]
        failures = stored.get("save_failures") or []
        self._save_failures = [dict(f) for f in failures if f.get("step", 0) <= step]
        base_loss = stored.get("base_general_loss")
        if base_loss is not None:
            self._base_result = ProbeResult(float(base_loss), None, 0)
        cocktail = stored.get("cocktail") or {}
        self._check_peers(cocktail.get("peers"))
        if cocktail.get("ingredient_losses") is not None:
            self._ingredient_losses = [float(x) for x in cocktail["ingredient_losses"]]

    def _check_peers(self, stored: Any) -> None:
        """On resume: the peers must be the ones the run started with (same paths and contents)."""
        peers = self._engine.peers
        now = peers.identities() if peers is not None else []
        if stored is not None and list(stored) != now:
            raise IncompatibleModelsError(
                f"the peers changed since the run started (then: {stored}; now: {now}); the α/weight history "
                "refers to the original peers: pass the same peer checkpoints, or start a new run"
            )

    # ------------------------------------------------------------------ probes
    def _target_sets(self) -> dict[str, Any]:
        """``target_data``, or (for a policy that weighs ingredients by their target loss) the first
        :data:`TARGET_DEFAULT_EXAMPLES` examples of each eval dataset.

        Raises:
            UsageError: The policy needs target examples and there are none.
        """
        if self._target or not getattr(self._policy, "needs_ingredient_losses", False):
            return dict(self._target)
        found = self._default_target()
        if not found:
            raise UsageError(
                f"policy {self._policy.name!r} weighs the base and the peers by their loss on target examples: "
                f"pass target_data (a few dozen tokenized examples of the new task) or give the Trainer "
                f"{self._eval_data} (its first {TARGET_DEFAULT_EXAMPLES} examples are used)"
            )
        return {name: head(data, TARGET_DEFAULT_EXAMPLES) for name, data in found.items()}

    def _set_probes(
        self,
        model: torch.nn.Module,
        general: Mapping[str, Batches],
        target: Mapping[str, Batches],
        score: ScoreFn | None,
        *,
        probe_module: torch.nn.Module | None = None,
        with_kl: bool | None = None,
    ) -> None:
        """Install the batched probe data and the scoring; collect the base's predictions for the KL probe.

        Args:
            model: The live model whose trainable parameters are swapped for candidates.
            general: Batched general probes, name -> batches.
            target: Batched target probes, name -> batches.
            score: ``score(module, batch) -> loss``, or ``None`` for the module's own loss.
            probe_module: The module the probes call (default ``model``); it must share ``model``'s parameters.
            with_kl: Measure ``KL(base ‖ current)`` on the general probes (needs ``probe_module`` to return
                ``(B, T, V)`` logits). Default: only when the module's own loss scores the probes. The reference is
                the base alone, not a base/peer mix.
        """
        self._batches = dict(general)
        self._target_batches = dict(target)
        self._score = score
        self._probe_module = probe_module
        self._base_refs = {}
        if with_kl is None:
            with_kl = score is None
        if self._batches and with_kl:
            scorer = probe_module if probe_module is not None else model
            with self._base_weights(), self._engine.swapped(model, 0.0):
                self._base_refs = {
                    name: base_log_probs(scorer, batches, top_k=self.kl_top_k)
                    for name, batches in self._batches.items()
                }
        if self._batches and self._base_result is None:
            # the α = 0 pass every decision needs, made once per run and before training: bad probe data (no
            # labels, a loss the model cannot compute) fails here rather than at the first evaluation
            self._base_result = self._probe_general(model, 0.0)

    @contextlib.contextmanager
    def _base_weights(self) -> Iterator[None]:
        """Within the block the engine's α = 0 mix is the base alone (weight 1 on the base, 0 on each peer)."""
        saved = self._engine.weights
        if self._engine.num_peers:
            self._engine.set_weights((1.0,) + (0.0,) * self._engine.num_peers)
        try:
            yield
        finally:
            self._engine.weights = saved

    # ------------------------------------------------------------------ decisions
    def _decide(self, step: int, model: torch.nn.Module, *, log: bool = True) -> dict[str, Any]:
        """Run the policy (probing candidates), apply its weights to the engine, and record one history entry for
        ``step``; logs it via :meth:`_log`."""
        results: dict[float, ProbeResult] = {}
        passes_before = self._passes

        def measure(alpha: float) -> ProbeResult:
            if alpha == 0.0 and self._base_result is not None:
                return self._base_result
            if alpha not in results:
                results[alpha] = self._probe_general(model, alpha)
                if alpha == 0.0:
                    self._base_result = results[alpha]
            return results[alpha]

        evaluate = (lambda a: _loss(measure(a))) if self._batches else None
        previous = self._history[-1].get("decision") if self._history else None  # restored on resume too
        decision: Decision = choose(
            self._policy,
            evaluate,
            ingredient_losses=lambda: self._losses_of_ingredients(model),
            previous=previous,
        )
        if decision.weights is not None and tuple(decision.weights) != tuple(self._engine.weights):
            self._engine.set_weights(decision.weights)  # before the chosen mix is measured (and written)
            results.clear()
            self._base_result = None
        entry: dict[str, Any] = {"step": int(step), "alpha": decision.alpha}
        drift = self._engine.drift(model)
        entry.update(drift_norm=drift.total, drift_relative=drift.relative)
        if self._batches:
            chosen, tuned, base = measure(decision.alpha), measure(1.0), measure(0.0)
            entry.update(
                general_loss=chosen.loss, general_loss_base=base.loss, general_loss_finetuned=tuned.loss
            )
            if tuned.kl is not None:
                entry.update(general_kl=tuned.kl, general_kl_merged=chosen.kl)
        if self._target_batches:
            entry["target_loss"] = self._probe_target(model, decision.alpha)
            entry["target_loss_finetuned"] = self._probe_target(model, 1.0)
        if self._engine.num_peers:
            labels = ["base", *(f"peer{i}" for i in range(1, self._engine.num_peers + 1))]
            entry.update({f"weight_{label}": w for label, w in zip(labels, self._engine.weights)})
            entry["weights"] = list(self._engine.weights)
        if self._save_failures:
            entry["save_failed"] = len(
                self._save_failures
            )  # so far in this run; logged as cocktail/save_failed
        entry["probe_passes"] = self._passes - passes_before
        entry["snapshot_bytes"] = self._engine.snapshot.nbytes
        entry["decision"] = decision.to_dict()
        entry["drift_per_layer"] = drift.per_layer
        self._history.append(entry)
        self._last_step = int(step)
        self._engine.alpha = decision.alpha
        if log:
            self._log(entry)
        return entry

    def _decision_at(self, step: int, model: torch.nn.Module, *, log: bool = True) -> dict[str, Any]:
        """The decision for ``step``: the one already made at this step, else a new one."""
        if self._last_step == step and self._history:
            return self._history[-1]
        return self._decide(step, model, log=log)

    def _losses_of_ingredients(self, model: torch.nn.Module) -> list[float]:
        """``Lᵢ`` of the base and each peer (as stored) on the target probes, measured once per run."""
        if self._ingredient_losses is None:
            losses = ingredient_losses(
                self._engine, model, self._target_batches, score_fn=self._score, scorer=self._probe_module
            )
            self._ingredient_losses = [mean_across_ranks(x) for x in losses]
            self._passes += len(self._ingredient_losses) * len(self._target_batches)
        return self._ingredient_losses

    def _probe_general(self, model: torch.nn.Module, alpha: float) -> ProbeResult:
        scorer = self._probe_module if self._probe_module is not None else model
        losses, kls = [], []
        with self._engine.swapped(model, alpha):
            for name, batches in self._batches.items():
                self._passes += 1
                result = probe(scorer, batches, score_fn=self._score, base=self._base_refs.get(name))
                losses.append(result.loss)
                kls.append(result.kl)
        kl = None if any(k is None for k in kls) else mean_across_ranks(sum(kls) / len(kls))
        loss = mean_across_ranks(sum(losses) / len(losses))  # every rank decides from the same numbers
        return ProbeResult(loss, kl, sum(len(b) for b in self._batches.values()))

    def _probe_target(self, model: torch.nn.Module, alpha: float) -> float:
        scorer = self._probe_module if self._probe_module is not None else model
        losses = []
        with self._engine.swapped(model, alpha):
            for batches in self._target_batches.values():
                self._passes += 1
                losses.append(_loss(probe(scorer, batches, score_fn=self._score)))
        return mean_across_ranks(sum(losses) / len(losses))

    # ------------------------------------------------------------------ output
    def _current_entry(self) -> Mapping[str, Any]:
        return self._history[-1] if self._history else {"alpha": self._engine.alpha}

    def _metadata(self, step: int, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The ``cocktail.json`` entries beyond the engine's own: step, policy, probe metrics."""
        return {
            "step": int(step),
            "policy": self._policy.to_dict(),
            "probes": {k: v for k, v in entry.items() if k not in ("alpha", "step")},
        }

    def _write(
        self,
        model: torch.nn.Module,
        folder: Path,
        step: int,
        *,
        entry: Mapping[str, Any] | None = None,
        support_from: Path | None = None,
        tokenizer: Any = None,
        collective: bool = True,
        **options: Any,
    ) -> Path | None:
        """Write the resilient model at the α of ``entry`` (default: the last decision) to ``folder``, atomically;
        ``options`` go to the engine's ``write`` (``dedupe_tied``, ``merged``).

        With ``collective`` (default) **every rank calls it**: rank 0 writes and every rank learns the outcome (a
        failure on rank 0 raises on every rank instead of leaving the others blocked); a sharded model is merged
        shard by shard and gathered once for rank 0 to write. ``collective=False``: only the calling process writes
        (a caller that runs on rank 0 alone, as Lightning's checkpoint IO; no sharded models).

        Returns:
            The folder on the process that wrote it, ``None`` elsewhere.
        """
        entry = entry or self._current_entry()

        def write() -> Path:
            support = support_from if support_from is None or support_from.is_dir() else None
            return self._engine.write(
                model,
                folder,
                entry["alpha"],
                metadata=self._metadata(step, entry),
                support_from=support,
                tokenizer=tokenizer,
                overwrite=True,
                max_shard_size=self.max_shard_size,
                **options,
            )

        if collective and is_sharded_model(model):
            return write()  # the engine gathers on every rank and writes on rank 0
        if collective:
            return on_rank_zero(write, f"writing {folder}")
        return write()

    def _guarded(self, action: Callable[[], T], path: Path, step: int) -> T | None:
        """Run a resilient save; what a failure does depends on ``strict``.

        ``strict=True``: the error propagates. ``strict=False``: it is logged loudly (``logger.error`` on rank 0 with
        ``path`` and the cause, a warning on the other ranks), recorded in :attr:`save_failures` (kept in the run
        state and the report), announced through :meth:`_on_save_failed`, and ``None`` is returned so that
        training goes on. ``action`` must fail alike on every rank that calls it (a collective write such as
        :meth:`_write` does: rank 0's outcome is agreed first), so that the ranks stay in step.
        """
        try:
            return action()
        except Exception as exc:
            if self.strict:
                raise
            record = {"step": int(step), "path": str(path), "error": f"{type(exc).__name__}: {exc}"}
            self._save_failures.append(record)
            if is_rank_zero():
                logger.error(
                    "CocktailCallback: the resilient save to %s at step %d FAILED: %s. Training continues without "
                    "it; fix the cause (free disk space, permissions, non-finite weights) or pass strict=True to "
                    "stop the run on such errors",
                    path,
                    step,
                    record["error"],
                    exc_info=exc,
                )
            else:
                logger.warning("CocktailCallback: the resilient save to %s failed: %s", path, record["error"])
            self._on_save_failed(record)
            return None

    def _on_save_failed(self, record: Mapping[str, Any]) -> None:
        """Hook: announce a failed save (the adapters log ``cocktail/save_failed``). Must not be a collective."""

    def _write_report(self, path: Path, final: Mapping[str, Any]) -> None:
        """``path`` (JSON: policy, recipe, final decision, snapshot size, history) and the PNG plot beside it; the
        calling process writes (rank 0)."""
        snap = self._engine.snapshot
        report = {
            "format": "resilient-tune/cocktail-report",
            "policy": self._policy.to_dict(),
            "recipe": self._engine.recipe_for(final["alpha"]).to_dict(),
            "final": dict(final),
            "snapshot": {
                "storage": snap.storage,
                "resident_bytes": snap.nbytes,
                "stored_bytes": snap.stored_bytes,
            },
            "history": self._history,
            "save_failures": self._save_failures,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
        try:
            plot_history(self._history, path.with_name(PLOT_FILE))  # warns (no error) without matplotlib
        except Exception as exc:  # a plot must never fail the run
            logger.warning("CocktailCallback: the report plot was not drawn: %s", exc)


# ---------------------------------------------------------------------------- helpers
def rank_folder() -> str:
    """This process's folder name in a per-rank snapshot: ``rank<r>-of-<n>``."""
    return f"rank{rank()}-of-{world_size()}"


def _rank_state(state: Mapping[str, Any], moved: Path | None) -> dict[str, Any]:
    """This rank's snapshot state out of a per-rank resume state (``{"format", "ranks": [state, ...]}``).

    Raises:
        UsageError: The run had another number of processes, or a rank's state is missing.
    """
    ranks = list(state.get("ranks") or [])
    if len(ranks) != world_size():
        raise UsageError(
            f"the checkpoint's run kept its base θ₀ in {len(ranks)} per-rank folders, but this run has {world_size()} "
            f"process(es); resume with {len(ranks)} processes (and the same sharding), or start a new run"
        )
    mine = ranks[rank()]
    if not isinstance(mine, Mapping):
        raise UsageError(
            f"the checkpoint holds no base snapshot for rank {rank()} (its save failed); start a new run"
        )
    mine = dict(mine)
    recorded = mine.get("folder")
    _relocate(mine, None if moved is None or not recorded else moved / Path(recorded).name)
    return mine


def _relocate(state: dict[str, Any], now: Path | None) -> None:
    """Point a snapshot ``state`` at ``now`` when its recorded folder is gone and ``now`` is a folder (the run
    folder was moved; the snapshot's fingerprint still checks the copy when it loads)."""
    recorded = state.get("folder")
    if recorded and not Path(recorded).exists() and now is not None and now.is_dir():
        state["folder"] = str(now.resolve())


def make_policy(
    policy: str | Policy, alpha: float, drift_budget: float | None, temperature: float | None = None
) -> Policy:
    """The policy object for the callbacks' ``policy`` / ``alpha`` / ``drift_budget`` / ``temperature`` arguments.

    Raises:
        UsageError: An unknown name, or an option given to a policy that does not use it.
    """
    if not isinstance(policy, str):
        if drift_budget is not None or temperature is not None:
            raise UsageError(
                "drift_budget/temperature cannot be applied to a ready policy object; configure the object instead"
            )
        return get_policy(policy)
    if temperature is not None and policy != "cocktail":
        raise UsageError(f"temperature applies to policy='cocktail' only; got policy={policy!r}")
    if drift_budget is not None and policy != "budget":
        raise UsageError(f"drift_budget applies to policy='budget' only; got policy={policy!r}")
    options: dict[str, dict[str, Any]] = {
        "fixed": {"alpha": alpha},
        "cocktail": {"alpha": alpha, "temperature": 5.0 if temperature is None else temperature},
        "budget": {"drift_budget": 0.05 if drift_budget is None else drift_budget},
    }
    return get_policy(policy, **options.get(policy, {}))


def probe_sets(
    data: Any, label: str, *, loaders: bool = False, mapping_examples: bool = True
) -> dict[str, Any]:
    """Validate probe data at construction: a non-empty dataset of examples, or a dict name -> dataset.

    Args:
        data: ``None``, a dataset (``__len__`` and ``__getitem__``), or a dict of them.
        label: The argument's name, for messages.
        loaders: Also accept a ``torch.utils.data.DataLoader`` (its batches are used as they come).
        mapping_examples: Require each example to be a dict of tokenized fields (HF Trainer collators need it).
    """
    if data is None:
        return {}
    sets = dict(data) if isinstance(data, Mapping) else {label: data}  # a mapping is name -> dataset
    if not sets:
        raise UsageError(f"{label} is an empty dict; pass a dataset or a dict name -> dataset")
    for name, dataset in sets.items():
        where = label if name == label else f"{label}[{name!r}]"
        if loaders and isinstance(dataset, torch.utils.data.DataLoader):
            continue
        if (
            isinstance(dataset, (str, bytes))
            or not hasattr(dataset, "__len__")
            or not hasattr(dataset, "__getitem__")
        ):
            also = ", a DataLoader" if loaders else ""
            raise UsageError(
                f"{where} is a {type(dataset).__name__}; pass a dataset (datasets.Dataset, a torch Dataset{also} or "
                "a list of tokenized example dicts such as {'input_ids': [...], 'labels': [...]})"
            )
        if len(dataset) == 0:
            raise UsageError(f"{where} is empty; pass a few dozen examples")
        first = dataset[0]
        if mapping_examples and not _is_example(first):
            raise UsageError(
                f"{where}[0] is a {type(first).__name__}; each example must be a dict of tokenized fields, e.g. "
                "{'input_ids': [...], 'attention_mask': [...], 'labels': [...]}"
            )
    return sets


def check_writable(folder: Path) -> None:
    """Check that files can be created in ``folder`` (created if missing), before any work starts.

    Raises:
        UsageError: It cannot be created or written to (names the folder, the cause and the fix).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe_file = tempfile.mkstemp(prefix=".resilient-write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe_file)
    except OSError as exc:
        raise UsageError(
            f"the output folder {folder} is not writable ({type(exc).__name__}: {exc}); CocktailCallback writes the "
            "resilient checkpoints there: fix its permissions or free space, pass a writable output folder, or "
            "set save_resilient=False"
        ) from exc


def head(dataset: Any, n: int) -> Any:
    """The first ``n`` examples of a dataset (``datasets.Dataset``, a list, or any torch dataset)."""
    count = min(n, len(dataset))
    if hasattr(dataset, "select"):
        return dataset.select(range(count))
    if isinstance(dataset, (list, tuple)):
        return dataset[:count]
    return torch.utils.data.Subset(dataset, range(count))


def _is_example(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)


def _loss(result: ProbeResult) -> float:
    if result.loss is None:
        raise UsageError("the probe produced no loss")
    return result.loss


def scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The loggable numbers of a history entry (no nested dicts, no step)."""
    return {
        k: float(v)
        for k, v in entry.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """A history entry's numbers as logged: ``cocktail/<name>`` (``cocktail/alpha``, ``cocktail/general_loss``, ...)."""
    return {f"cocktail/{k}": v for k, v in scalars(entry).items()}
