"""What the training callbacks share, whatever the framework: the framework-free half of ``CocktailCallback``.

:class:`CocktailCore` is mixed into each framework's callback class (the Hugging Face ``Trainer`` adapter in
:mod:`resilient_tune.integrations.transformers`, Lightning in :mod:`resilient_tune.integrations.lightning`). It holds

- the validation of the options and the construction of the policy and of the engine (:meth:`_configure`);
- the base snapshot's life cycle: taken, persisted for resume, described in the resume state, reloaded
  (:meth:`_take_snapshot`, :meth:`_persist_snapshot`, :meth:`_run_state`, :meth:`_restore`);
- the probe runs and the α decision at an evaluation (:meth:`_set_probes`, :meth:`_decide`);
- the content of ``cocktail.json`` written with the resilient weights (:meth:`_write`) and of the report
  (:meth:`_write_report`).

The adapters supply the glue: when events fire, how probe data becomes batches, where metrics are logged
(:meth:`_log`), where files go and which process writes them. Nothing here imports a training framework.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from resilient_tune.engine import CocktailEngine, check_alpha
from resilient_tune.errors import UsageError
from resilient_tune.policy import Decision, Policy, get_policy
from resilient_tune.probes import BaseLogits, ProbeResult, base_log_probs, probe
from resilient_tune.snapshot import Snapshot

__all__ = [
    "BASE_FOLDER",
    "REPORT_FILE",
    "RESILIENT_FOLDER",
    "CocktailCore",
    "ScoreFn",
    "make_policy",
    "probe_sets",
    "scalars",
]

logger = logging.getLogger("resilient_tune.integrations")

BASE_FOLDER = "resilient_base"
RESILIENT_FOLDER = "resilient"
REPORT_FILE = "cocktail_report.json"
STATE_VERSION = 1

ScoreFn = Callable[[torch.nn.Module, Mapping[str, Any]], Any]
Batches = list[Any]


class CocktailCore:
    """Framework-free state and logic of a ``CocktailCallback``; see the module docs.

    Attributes set by :meth:`_configure` (the configuration, shared by a callback object and any copy a framework
    rebuilds from a checkpoint): ``_engine``, ``_policy``, ``_general``, ``_target``, ``_score_fn``,
    ``save_resilient``, ``kl_top_k``, ``snapshot_on_disk``, ``max_shard_size``. Attributes reset by
    :meth:`_reset_run` (one training run): ``_history``, ``_last_step``, ``_snapshot_state``, ``_base_result``,
    the probe batches and the base's KL references.
    """

    def _configure(
        self,
        alpha: float = 0.5,
        *,
        policy: str | Policy = "fixed",
        drift_budget: float | None = None,
        general_data: Any = None,
        target_data: Any = None,
        peers: Sequence[str | os.PathLike[str]] | None = None,
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
        loaders: bool = False,
        mapping_examples: bool = True,
    ) -> None:
        """Validate the options (the callbacks' constructor arguments) and build the policy and the engine.

        Args:
            loaders: Accept a ready ``DataLoader`` (batches used as they come) as probe data.
            mapping_examples: Require every probe example to be a dict of tokenized fields.

        Raises:
            UsageError: Bad arguments: α outside ``[0, 1]``, an unknown policy or method, ``budget`` without
                ``general_data``, empty or malformed probe data, ...
            NotImplementedError: ``peers`` (a later increment).
        """
        alpha = check_alpha(alpha)
        if peers:
            raise NotImplementedError(
                "peers are not supported yet by CocktailCallback (a later increment of the callback); merge with "
                "peers offline with resilient_tune.merge(...) after training"
            )
        self._policy = make_policy(policy, alpha, drift_budget)
        checks = {"loaders": loaders, "mapping_examples": mapping_examples}
        self._general = probe_sets(general_data, "general_data", **checks)
        self._target = probe_sets(target_data, "target_data", **checks)
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
        self._engine = CocktailEngine(
            alpha,
            method,
            method_options,
            seed=seed,
            snapshot_device=snapshot_device,
            snapshot_dtype=snapshot_dtype,
        )
        self._score_fn = score_fn
        self.snapshot_on_disk = bool(snapshot_on_disk)
        self.save_resilient = bool(save_resilient)
        self.kl_top_k = kl_top_k
        self.max_shard_size = max_shard_size
        self._reset_run()

    # ------------------------------------------------------------------ public helpers
    @property
    def engine(self) -> CocktailEngine:
        """The framework-agnostic engine (snapshot, swap, drift, write)."""
        return self._engine

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per decision: step, α, drift, probe losses, passes (JSON-able)."""
        return list(self._history)

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
        self._batches: dict[str, Batches] = {}
        self._target_batches: dict[str, Batches] = {}
        self._base_refs: dict[str, list[BaseLogits]] = {}
        self._probe_module: torch.nn.Module | None = None
        self._score: ScoreFn | None = None
        self._passes = 0

    def _take_snapshot(self, model: torch.nn.Module, base_dir: Path) -> None:
        """Snapshot θ₀ of ``model``: in memory, or on disk in ``base_dir`` with ``snapshot_on_disk``."""
        if self.snapshot_on_disk:
            self._engine.snapshot_dir = base_dir
            self._engine.begin(model, overwrite=True)
        else:
            self._engine.snapshot_dir = None
            self._engine.begin(model)
        self._note_snapshot()

    def _persist_snapshot(self, base_dir: Path) -> None:
        """Give an in-memory θ₀ an on-disk copy in ``base_dir`` so that a resumed run can reload it (one process)."""
        if self._engine.snapshot.storage == "memory":
            self._engine.snapshot.persist(base_dir, overwrite=True)
        self._note_snapshot()

    def _note_snapshot(self) -> None:
        if self._engine.snapshot.folder is not None:
            self._snapshot_state = self._engine.snapshot.state()

    def _run_state(self) -> dict[str, Any]:
        """The JSON-able state a checkpoint keeps: the snapshot's location and fingerprint, the α history, the
        base's general-probe loss."""
        return {
            "version": STATE_VERSION,
            "snapshot": self._snapshot_state,
            "history": self._history,
            "base_general_loss": None if self._base_result is None else self._base_result.loss,
        }

    def _restore(
        self,
        stored: Mapping[str, Any] | None,
        model: torch.nn.Module,
        step: int,
        moved: Path | None = None,
    ) -> None:
        """Continue a run from the :meth:`_run_state` a checkpoint kept: reload θ₀, keep the α history up to
        ``step``. Never treats the resumed weights as the base.

        Args:
            stored: The saved resume state (``None`` when the checkpoint holds none: refused).
            model: The live model (checked against the snapshot).
            step: The resumed global step.
            moved: Where the base folder is now if the run folder was moved (used when the recorded path is gone).

        Raises:
            UsageError: The checkpoint holds no base snapshot.
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
        recorded = snap_state.get("folder")
        if recorded and not Path(recorded).exists() and moved is not None and moved.is_dir():
            snap_state["folder"] = str(
                moved.resolve()
            )  # the run folder was moved; the fingerprint still checks it
        device = None if self.snapshot_on_disk else self._engine.snapshot_device
        snapshot = Snapshot.load(snap_state, device=device)
        self._engine.attach(snapshot, model)
        self._snapshot_state = snap_state
        self._history = [dict(e) for e in stored.get("history", []) if e.get("step", 0) <= step]
        base_loss = stored.get("base_general_loss")
        if base_loss is not None:
            self._base_result = ProbeResult(float(base_loss), None, 0)

    # ------------------------------------------------------------------ probes
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
                ``(B, T, V)`` logits). Default: only when the module's own loss scores the probes.
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
            with self._engine.swapped(model, 0.0):  # the base's own predictions: the KL reference
                self._base_refs = {
                    name: base_log_probs(scorer, batches, top_k=self.kl_top_k)
                    for name, batches in self._batches.items()
                }

    # ------------------------------------------------------------------ decisions
    def _decide(self, step: int, model: torch.nn.Module, *, log: bool = True) -> dict[str, Any]:
        """Run the policy (probing candidates) and record one history entry for ``step``; logs it via :meth:`_log`."""
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
        decision: Decision = self._policy.choose(evaluate)
        entry: dict[str, Any] = {"step": int(step), "alpha": decision.alpha}
        drift = self._engine.drift(model)
        entry.update(drift_norm=drift.total, drift_relative=drift.relative)
        if self._batches:
            chosen, tuned = measure(decision.alpha), measure(1.0)
            base = measure(0.0)
            entry.update(
                general_loss=chosen.loss, general_loss_base=base.loss, general_loss_finetuned=tuned.loss
            )
            if tuned.kl is not None:
                entry.update(general_kl=tuned.kl, general_kl_merged=chosen.kl)
        if self._target_batches:
            entry["target_loss"] = self._probe_target(model, decision.alpha)
            entry["target_loss_finetuned"] = self._probe_target(model, 1.0)
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

    def _probe_general(self, model: torch.nn.Module, alpha: float) -> ProbeResult:
        scorer = self._probe_module if self._probe_module is not None else model
        losses, kls = [], []
        with self._engine.swapped(model, alpha):
            for name, batches in self._batches.items():
                self._passes += 1
                result = probe(scorer, batches, score_fn=self._score, base=self._base_refs.get(name))
                losses.append(result.loss)
                kls.append(result.kl)
        kl = None if any(k is None for k in kls) else sum(kls) / len(kls)
        return ProbeResult(sum(losses) / len(losses), kl, sum(len(b) for b in self._batches.values()))

    def _probe_target(self, model: torch.nn.Module, alpha: float) -> float:
        scorer = self._probe_module if self._probe_module is not None else model
        losses = []
        with self._engine.swapped(model, alpha):
            for batches in self._target_batches.values():
                self._passes += 1
                losses.append(_loss(probe(scorer, batches, score_fn=self._score)))
        return sum(losses) / len(losses)

    def _log(self, entry: Mapping[str, Any]) -> None:
        """Send a decision's metrics to the framework's logger; adapters override it."""
        logger.info("cocktail metrics: %s", {f"cocktail/{k}": v for k, v in scalars(entry).items()})

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
    ) -> Path:
        """Write the resilient model at the α of ``entry`` (default: the last decision) to ``folder``, atomically."""
        entry = entry or self._current_entry()
        return self._engine.write(
            model,
            folder,
            entry["alpha"],
            metadata=self._metadata(step, entry),
            support_from=support_from,
            tokenizer=tokenizer,
            overwrite=True,
            max_shard_size=self.max_shard_size,
        )

    def _write_report(self, path: Path, final: Mapping[str, Any]) -> None:
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
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)


# ---------------------------------------------------------------------------- helpers
def make_policy(policy: str | Policy, alpha: float, drift_budget: float | None) -> Policy:
    """The policy object for the callbacks' ``policy`` / ``alpha`` / ``drift_budget`` arguments."""
    if isinstance(policy, str):
        if policy == "budget":
            return get_policy("budget", drift_budget=0.05 if drift_budget is None else drift_budget)
        if drift_budget is not None:
            raise UsageError(f"drift_budget applies to policy='budget' only; got policy={policy!r}")
        return get_policy(policy, **({"alpha": alpha} if policy == "fixed" else {}))
    if drift_budget is not None:
        raise UsageError(
            "drift_budget cannot be applied to a ready policy object; configure the object instead"
        )
    return get_policy(policy)


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
