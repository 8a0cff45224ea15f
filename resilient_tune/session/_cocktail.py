"""``Cocktail``: the framework-free session every training integration drives, and custom training loops too."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..checkpoint import parse_size
from ..distributed import is_sharded_model, on_rank_zero
from ..engine import CocktailEngine, Engine, engine_for
from ..errors import UsageError
from ..policy import Policy
from ..validation import check_alpha
from ._base import BaseKeeper, check_same_peers, is_sharded_snapshot
from ._decide import decide_entry
from ._guard import SaveGuard
from ._options import (
    batch_examples,
    check_flag,
    make_policy,
    metrics,
    probe_metadata,
    probe_sets,
    target_sets,
)
from ._probing import Batches, ProbeRunner, ScoreFn
from ._report import write_report
from ._vocab import base_vocab_rows

__all__ = ["Cocktail"]

logger = logging.getLogger("resilient_tune.session")
STATE_VERSION = 1
T = TypeVar("T")


class Cocktail:
    """One resilient fine-tuning run: the base θ₀, the probes, the policy, the α history and the writer.

    Lifecycle: :meth:`begin` (snapshot θ₀ of the model before its first optimizer step, or resume from a state given
    to :meth:`load_state_dict`), :meth:`decide` at an evaluation (probes on candidate mixes, the policy's α; returns
    the metrics to log), :meth:`write` a resilient folder, :meth:`state_dict` for a checkpoint, :meth:`report` at the
    end. The Hugging Face and Lightning ``CocktailCallback`` hold one and translate their events into these calls; a
    custom training loop calls them itself (``docs/custom-loops.md``).

    Args:
        alpha: Weight α of the fine-tuned model in ``[0, 1]`` (0.5 by default): the resilient model is
            ``θ₀ + α·(θₜ − θ₀)``, with peers ``α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ``. Used by ``fixed`` and ``cocktail``.
        policy: ``"fixed"`` (default), ``"cocktail"`` (``wᵢ = softmax(−Lᵢ/temperature)`` from each ingredient's loss
            ``Lᵢ`` on target examples, α as given), ``"budget"`` (the largest α whose general-probe loss stays within
            ``(1 + drift_budget)`` × the base's; needs ``general_data``), or an object with
            ``choose(evaluate) -> Decision``. A budget on the user's own metric is the object
            ``BudgetPolicy(metric=fn, metric_drop=0.01)`` (``fn(model) -> float``, higher is better).
        drift_budget: For ``budget``: allowed relative increase of the general-probe loss (default 0.05 = 5%).
        general_data: General probes (what the model must not forget): a dataset of examples, a ``DataLoader``, or a
            dict ``name -> dataset``. :meth:`begin` batches them with ``batch_size`` and ``collate_fn`` (the
            integrations batch them as their framework batches eval data instead).
        target_data: Target probes (the new skill), same forms; logged as ``cocktail/target_loss``.
        peers: Checkpoints (folders or files) of the same architecture fine-tuned on other domains; read one tensor
            at a time. Not with PEFT LoRA models.
        temperature: For ``cocktail``: the softmax temperature τ (5.0, the reference's).
        method: Merge method (any registered name; ``linear`` by default).
        method_options: Options of the merge method (``density``, ``lambda``, ...).
        score_fn: ``score_fn(model, batch) -> scalar loss`` for the probes (default: ``model(**batch).loss``).
        snapshot_device: Where the in-memory θ₀ lives (``"cpu"``).
        snapshot_dtype: Storage dtype of θ₀: ``None`` (the parameters' own), ``"bf16"`` or ``"fp16"``.
        snapshot_on_disk: Keep θ₀ on disk in the ``base_dir`` given to :meth:`begin` (about zero resident memory).
        save_resilient: Write resilient folders (integrations skip their writes when ``False``).
        kl_top_k: Keep the base's ``k`` most likely tokens per position for the KL probe (``None``: all).
        max_shard_size: Shard size of the written weights (bytes or ``"5GB"``).
        seed: Seed of random merge methods (DARE).
        strict: What a failed resilient save does: ``False`` (default) logs it loudly, records it (``save_failures``,
            the state, the report) and goes on; ``True`` raises. Nothing half-written is left either way.
        batch_size: Examples per probe batch when :meth:`begin` batches the probe data (8).
        collate_fn: How :meth:`begin` makes a batch of examples (``torch.utils.data.default_collate``).

    Raises:
        UsageError: Bad arguments, named with the valid range or the fix.
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
        batch_size: int = 8,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        alpha = check_alpha(alpha)
        self.strict = check_flag("strict", strict)
        self.snapshot_on_disk = check_flag("snapshot_on_disk", snapshot_on_disk)
        self.save_resilient = check_flag("save_resilient", save_resilient)
        self.policy = make_policy(policy, alpha, drift_budget, temperature)
        self.general_data = probe_sets(general_data, "general_data")
        self.target_data = probe_sets(target_data, "target_data")
        if self.policy.needs_general_data and not self.general_data:
            raise UsageError(
                f"policy {self.policy.name!r} measures the general-probe loss and needs general_data: pass a few "
                "dozen examples the model must not forget (general_data=dataset), or use policy='fixed'"
            )
        if score_fn is not None and not callable(score_fn):
            raise UsageError(f"score_fn={score_fn!r} must be callable as score_fn(model, batch) -> loss")
        if kl_top_k is not None and (
            isinstance(kl_top_k, bool) or not isinstance(kl_top_k, int) or kl_top_k < 1
        ):
            raise UsageError(f"kl_top_k={kl_top_k!r} must be a positive int or None (keep every token)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size={batch_size!r} must be a positive int (examples per probe batch)")
        if collate_fn is not None and not callable(collate_fn):
            raise UsageError(
                f"collate_fn={collate_fn!r} must be callable as collate_fn(list_of_examples) -> batch"
            )
        parse_size(max_shard_size)  # fail now, not at the first save
        self._template: Engine = CocktailEngine(
            alpha, method, method_options, seed=seed, snapshot_device=snapshot_device,
            snapshot_dtype=snapshot_dtype, peers=peers,
        )  # fmt: skip
        self.engine: Engine = self._template
        self.score_fn, self.kl_top_k, self.max_shard_size = score_fn, kl_top_k, max_shard_size
        self.batch_size, self.collate_fn = batch_size, collate_fn
        self.on_save_failed: Callable[[Mapping[str, Any]], None] | None = (
            None  # an integration's announcement
        )
        self._loaded: dict[str, Any] | None = None
        self._reset()

    # ------------------------------------------------------------------ state of the run
    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per decision: step, α, drift, probe losses, passes, peer weights (JSON-able)."""
        return list(self._history)

    @property
    def last_entry(self) -> dict[str, Any] | None:
        """The last decision's history entry (``None`` before any)."""
        return self._history[-1] if self._history else None

    @property
    def save_failures(self) -> list[dict[str, Any]]:
        """The resilient saves that failed in this run (``strict=False``): ``{"step", "path", "error"}`` each."""
        return [dict(f) for f in self._guard.failures]

    @property
    def alpha(self) -> float:
        """The current α (the last decision's, or the policy's before any decision)."""
        return self._history[-1]["alpha"] if self._history else self.engine.alpha

    @property
    def started(self) -> bool:
        """:meth:`begin` has run (θ₀ is held)."""
        return self.engine.has_snapshot

    @property
    def probes_ready(self) -> bool:
        """The probe sets are batched and installed (by :meth:`begin` or :meth:`use_probes`)."""
        return self._probes.installed

    def _reset(self) -> None:
        self._history: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._guard = SaveGuard(self.strict)
        self._probes = ProbeRunner()
        self._keeper = BaseKeeper(self.snapshot_on_disk)

    # ------------------------------------------------------------------ lifecycle
    def begin(
        self, model: torch.nn.Module, *, step: int = 0, base_dir: str | os.PathLike[str] | None = None,
        probes: bool = True,
    ) -> None:  # fmt: skip
        """Start a run on ``model``: snapshot θ₀ (every rank calls it), or, after :meth:`load_state_dict`, resume.

        Picks the engine (no copy for a PEFT LoRA model), takes θ₀ (in memory, or in ``base_dir`` with
        ``snapshot_on_disk``), opens the peers; a resume reloads θ₀ instead (``base_dir`` is also where a moved run's
        base folder is looked for) and keeps the history up to ``step``. With ``probes`` it batches ``general_data``
        and ``target_data`` (``batch_size``, ``collate_fn``) and measures the base once; integrations pass
        ``probes=False`` and call :meth:`use_probes` with their own batches.

        Raises:
            UsageError: ``step > 0`` without a loaded state (the live weights are not the base), a state without a
                snapshot, a LoRA/full mismatch, a PEFT model the LoRA path does not support; with a metric budget, a
                metric that returns no finite number or a ``metric_floor`` the base itself fails.
            IncompatibleModelsError: A peer does not fit the model, or the peers changed since the run started.
        """
        self._reset()
        folder = None if base_dir is None else Path(base_dir)
        self.engine = engine_for(model, self._template)
        stored, self._loaded = self._loaded, None
        if stored is not None:
            self._restore(stored, model, int(step), folder)
        elif step > 0:
            self._keeper.restore(self.engine, None, model, int(step), folder)  # refused: nothing stored
        else:
            self._keeper.take(self.engine, model, folder)
        if isinstance(self.engine, CocktailEngine):  # tokens added before training: rows the base never had
            self.engine.set_base_rows(base_vocab_rows(model))
        metric = getattr(self.policy, "metric", None)
        if metric is not None:
            # a budget on the user's metric: measure the base now, so a bad metric fails here
            base_metric = self._probes.run_metric(self.engine, model, 0.0, metric)
            getattr(self.policy, "check_base", lambda value: None)(base_metric)
        target = self.target_sets() if probes else {}
        if probes and (self.general_data or target):
            size, collate = self.batch_size, self.collate_fn
            general = {n: batch_examples(d, n, size, collate) for n, d in self.general_data.items()}
            self.use_probes(
                model, general, {n: batch_examples(d, n, size, collate) for n, d in target.items()}
            )

    def use_probes(
        self,
        model: torch.nn.Module,
        general: Mapping[str, Batches] | None = None,
        target: Mapping[str, Batches] | None = None,
        *,
        score_fn: ScoreFn | None = None,
        probe_module: torch.nn.Module | None = None,
        with_kl: bool | None = None,
    ) -> None:
        """Install batched probe sets (``name -> batches``) and their scoring; collect the base's predictions for the
        KL probe and its general loss now.

        Args:
            model: The live model whose trainable parameters are swapped for candidates.
            general: Batched general probes.
            target: Batched target probes.
            score_fn: ``score(module, batch) -> loss`` (default: the session's ``score_fn``, else the module's own
                ``loss``).
            probe_module: The module the probes call (default ``model``; it must share ``model``'s parameters).
            with_kl: Measure ``KL(base ‖ current)`` on the general probes (needs ``(B, T, V)`` logits). Default: when
                the module's own loss scores the probes.
        """
        score = score_fn or self.score_fn
        self._probes.with_units = getattr(self.policy, "confidence", None) is not None
        self._probes.install(
            self.engine, model, general or {}, target or {}, score,
            probe_module=probe_module, with_kl=with_kl, kl_top_k=self.kl_top_k,
        )  # fmt: skip

    def decide(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        """The decision for ``step`` (made once per step; every rank calls it): probes, the policy's α, drift.

        Returns:
            The numbers to log, ``cocktail/alpha``, ``cocktail/general_loss``, ... (the full entry, with the
            policy's reasons and per-layer drift, is :attr:`last_entry`).
        """
        if self._last_step != step or not self._history:
            previous = self._history[-1].get("decision") if self._history else None  # restored on resume too
            entry = decide_entry(self.engine, self.policy, self._probes, int(step), model, previous=previous)
            if entry.get("note") and not any("note" in e for e in self._history):  # once per run
                logger.warning("resilient-tune: %s", entry["note"])
            if self._guard.failures:  # so far in this run; logged as cocktail/save_failed
                entry["save_failed"] = len(self._guard.failures)
            self._history.append(entry)
            self._last_step = int(step)
        return metrics(self._history[-1])

    def select(self, step: int) -> dict[str, Any] | None:
        """Make the decision of ``step`` current (e.g. the best checkpoint reloaded at the end); its entry, or
        ``None`` when no decision was made at that step."""
        for entry in reversed(self._history):
            if entry["step"] == step:
                self.engine.alpha = entry["alpha"]
                return entry
        return None

    def write(
        self, model: torch.nn.Module, folder: str | os.PathLike[str], step: int | None = None, *,
        entry: Mapping[str, Any] | None = None, collective: bool = True, guard: bool = True, **options: Any,
    ) -> Path | None:  # fmt: skip
        """Write the resilient model at the current α (or ``entry``'s) to ``folder``, atomically.

        ``options`` go to the engine's ``write`` (``tokenizer``, ``support_from``, ``saver``, ``form``,
        ``subfolders``). With ``collective`` (default) **every rank calls it**: rank 0 writes (a sharded model is
        merged shard by shard and gathered once) and every rank learns the outcome. ``collective=False``: only the
        calling process writes. With ``guard`` a failure follows ``strict`` (see :meth:`guarded`).

        Returns:
            The folder on the process that wrote it; ``None`` elsewhere, or after a failure with ``strict=False``.
        """
        entry = entry or self._current()
        target = Path(folder)
        at = int(step if step is not None else entry.get("step", 0))
        metadata = {"step": at, "policy": self.policy.to_dict(), "probes": probe_metadata(entry)}

        def write() -> Path | None:
            run = lambda: self.engine.write(  # noqa: E731
                model, target, entry["alpha"], metadata=metadata, overwrite=True,
                max_shard_size=self.max_shard_size, **options,
            )  # fmt: skip
            if collective and not is_sharded_model(model):
                return on_rank_zero(run, f"writing {target}")
            return run()  # a sharded model: the engine gathers on every rank and writes on rank 0

        return self.guarded(write, target, at) if guard else write()

    @property
    def base_kept(self) -> bool:
        """θ₀ has a durable home a resumed run can find (on disk, or, for LoRA, in the model itself)."""
        return self._keeper.state is not None

    @property
    def sharded_base(self) -> bool:
        """θ₀ holds this rank's shards of a sharded model (FSDP2, ZeRO-3): every rank keeps its own."""
        return is_sharded_snapshot(self.engine)

    def keep_base(
        self, base_dir: str | os.PathLike[str], *, collective: bool = True, guard: bool = True
    ) -> None:
        """Give an in-memory θ₀ an on-disk copy in ``base_dir`` for a resume in a new process (LoRA: nothing to copy).
        Every rank calls it (``collective=False``: only the calling process, never for sharded models). With ``guard``
        a failure follows ``strict``."""
        folder = Path(base_dir)
        keep = lambda: self._keeper.persist(self.engine, folder, collective=collective)  # noqa: E731
        self.guarded(keep, folder, 0) if guard else keep()

    def move_base(self, folder: str | os.PathLike[str], move: Callable[[], None]) -> None:
        """Move θ₀ kept on disk: its files are closed, ``move()`` moves them (an integration's own rename, with
        barriers when several processes share the folder) and θ₀ is reopened in ``folder`` (every rank calls it)."""
        self._keeper.reattach(self.engine, Path(folder), move)

    def guarded(self, action: Callable[[], T], path: str | os.PathLike[str], step: int) -> T | None:
        """Run a save; a failure follows ``strict``: raised, or (``strict=False``) logged loudly, recorded in
        :attr:`save_failures`, announced to ``on_save_failed`` and ``None`` returned, so that training goes on.
        ``action`` must fail alike on every rank that runs it."""
        return self._guard.run(action, path, step, announce=self.on_save_failed)

    def report(self, path: str | os.PathLike[str], entry: Mapping[str, Any] | None = None) -> Path:
        """Write the run report (JSON: policy, recipe, final decision, snapshot size, history, failures) to ``path``
        and its PNG plot beside it; the calling process writes (rank 0)."""
        return write_report(Path(path), self, entry or self._current())

    def _current(self) -> Mapping[str, Any]:
        return self._history[-1] if self._history else {"alpha": self.engine.alpha}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The JSON-able state a checkpoint keeps: θ₀'s location and fingerprint (or the LoRA adapter), the α history,
        the base's general-probe loss, the ingredient losses, the peers' identities and the failed saves."""
        peers = self.engine.peers
        return {
            "version": STATE_VERSION,
            "snapshot": self._keeper.state,
            "history": self._history,
            "base_general_loss": None if self._probes.base_result is None else self._probes.base_result.loss,
            "save_failures": self._guard.failures,
            "cocktail": {
                "ingredient_losses": self._probes.ingredient_losses,
                "peers": peers.identities() if peers is not None else [],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Keep a :meth:`state_dict` for the next :meth:`begin`, which then resumes from it instead of taking the
        live weights as θ₀ (an empty or ``None`` state is refused there)."""
        self._loaded = dict(state or {})

    def _restore(
        self, stored: Mapping[str, Any], model: torch.nn.Module, step: int, moved: Path | None
    ) -> None:
        self._keeper.restore(self.engine, stored.get("snapshot"), model, step, moved)
        self._history = [dict(e) for e in stored.get("history", []) if e.get("step", 0) <= step]
        self._guard.failures = [
            dict(f) for f in stored.get("save_failures") or [] if f.get("step", 0) <= step
        ]
        cocktail = stored.get("cocktail") or {}
        check_same_peers(self.engine, cocktail.get("peers"))
        self._probes.restore(stored.get("base_general_loss"), cocktail.get("ingredient_losses"))

    # ------------------------------------------------------------------ probes
    def target_sets(self, default: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``target_data``, or, for a policy that weighs ingredients by their target loss, the first
        :data:`TARGET_DEFAULT_EXAMPLES` examples of each of ``default``'s sets (an integration's eval data).

        Raises:
            UsageError: The policy needs target examples and there are none.
        """
        return target_sets(self.policy, self.target_data, default)
