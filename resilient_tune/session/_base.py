"""The base θ₀ over a run's life: taken at the start, kept on disk for a resume, found again by a resumed run.

:class:`BaseKeeper` drives the engine's snapshot and keeps the JSON-able description a checkpoint stores (where θ₀
lives and its fingerprint). With several processes each rank may keep its own folder
(``resilient_base/rank<r>-of-<n>/``: the shards of a sharded model, or ``snapshot_on_disk`` under DDP); the stored
description then lists every rank's (:data:`PER_RANK_FORMAT`) and a resume needs the same number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import agree_on_failure, gather_objects, on_rank_zero, rank, world_size
from ..engine import FORMAT as LORA_FORMAT
from ..engine import Engine, LoraEngine
from ..errors import IncompatibleModelsError, UsageError
from ..snapshot import Snapshot

__all__ = ["PER_RANK_FORMAT", "BaseKeeper", "check_same_peers", "is_sharded_snapshot", "rank_folder"]

PER_RANK_FORMAT = "resilient-tune-per-rank-snapshot"


def rank_folder() -> str:
    """This process's folder name in a per-rank snapshot: ``rank<r>-of-<n>``."""
    return f"rank{rank()}-of-{world_size()}"


class BaseKeeper:
    """Takes, persists and restores θ₀ through an engine; holds the description a checkpoint stores.

    Args:
        on_disk: Keep θ₀ on disk (``snapshot_on_disk``) rather than in memory.
    """

    def __init__(self, on_disk: bool) -> None:
        self.on_disk = on_disk
        self.state: dict[str, Any] | None = None  # what a checkpoint stores; None until θ₀ has a durable home

    def take(self, engine: Engine, model: torch.nn.Module, base_dir: Path | None) -> None:
        """Snapshot θ₀ of ``model`` (in memory, or on disk in ``base_dir``; every rank calls it).

        Raises:
            UsageError: ``snapshot_on_disk`` without a folder to keep θ₀ in.
        """
        self.state = None
        if not self.on_disk or isinstance(engine, LoraEngine):
            engine.snapshot_dir = None
            engine.begin(model)
            self._note(engine)
            return
        if base_dir is None:
            raise UsageError("snapshot_on_disk=True needs a folder for θ₀: pass base_dir= to begin()")
        if world_size() == 1:
            engine.snapshot_dir = base_dir
            engine.begin(model, overwrite=True)
            self._note(engine)
            return

        def write() -> None:  # several processes: each rank keeps its own folder
            base_dir.mkdir(parents=True, exist_ok=True)
            engine.snapshot_dir = base_dir / rank_folder()
            engine.begin(model, overwrite=True)

        self._on_every_rank(engine, write, f"writing the base snapshot to {base_dir}")

    def persist(self, engine: Engine, base_dir: Path, *, collective: bool = True) -> None:
        """Give an in-memory θ₀ an on-disk copy in ``base_dir`` so that a resumed run can reload it.

        A sharded model's snapshot: every rank writes its own shards (``collective`` must be true: every rank calls
        it). Otherwise rank 0 writes (``collective``: every rank calls it and learns the outcome; ``False``: only the
        calling process runs it, as from a hook that only rank 0 runs).
        """
        snapshot = engine.snapshot
        if is_sharded_snapshot(engine):

            def write_shards() -> None:
                if snapshot.storage == "memory":
                    base_dir.mkdir(parents=True, exist_ok=True)
                    snapshot.persist(base_dir / rank_folder(), overwrite=True)

            self._on_every_rank(engine, write_shards, f"writing the base snapshot shards to {base_dir}")
            return

        def write() -> None:
            if snapshot.storage == "memory":
                snapshot.persist(base_dir, overwrite=True)
            self._note(engine)

        if collective:
            on_rank_zero(write, f"writing the base snapshot to {base_dir}")
            if world_size() > 1:  # every rank's state names rank 0's copy (each rank may save its own state)
                self.state = gather_objects(self.state)[0]
        else:
            write()

    def reattach(self, engine: Engine, folder: Path, move: Callable[[], None]) -> None:
        """Close θ₀'s files, ``move()`` them, reopen θ₀ from ``folder`` (a per-rank parent folder with several
        processes; every rank calls it then) and refresh the stored description."""
        state = engine.snapshot.state()
        engine.snapshot.close()
        move()
        if world_size() > 1:
            state["folder"] = str((folder / Path(state["folder"]).name).resolve())
            engine.attach(Snapshot.load(state))
            self._gather(engine)
        else:
            state["folder"] = str(folder.resolve())
            engine.attach(Snapshot.load(state))
            self._note(engine)

    def restore(
        self,
        engine: Engine,
        stored: Mapping[str, Any] | None,
        model: torch.nn.Module,
        step: int,
        moved: Path | None,
    ) -> None:
        """Reload θ₀ from a stored description (a LoRA run has nothing to reload: the base is in the model).

        Raises:
            UsageError: Nothing stored, or the model changed between LoRA and full training, or another process
                count than a per-rank snapshot was kept with.
        """
        if not stored:
            raise UsageError(
                f"resuming at step {step}, but the checkpoint holds no CocktailCallback base snapshot; "
                "the resumed weights are not the base. Resume a run that used CocktailCallback from its start, or "
                "start a new run"
            )
        state = dict(stored)
        lora_run = state.get("format") == LORA_FORMAT
        if lora_run != isinstance(engine, LoraEngine):
            then, now = (
                ("a PEFT LoRA model", "a full model") if lora_run else ("a full model", "a PEFT model")
            )
            raise UsageError(
                f"the checkpoint's run trained {then} but the model is now {now}; resume with the model the run "
                "started with, or start a new run"
            )
        device = None if self.on_disk else getattr(engine, "snapshot_device", None)
        if lora_run:
            engine.begin(model)
        elif state.get("format") == PER_RANK_FORMAT:
            engine.attach(Snapshot.load(_rank_state(state, moved), device=device), model)
        else:
            _relocate(state, moved)
            engine.attach(Snapshot.load(state, device=device), model)
        self.state = state

    # ------------------------------------------------------------------ internals
    def _note(self, engine: Engine) -> None:
        snapshot = engine.snapshot
        if snapshot.folder is not None or snapshot.storage == "none":  # "none": LoRA, θ₀ stays in the model
            self.state = snapshot.state()

    def _gather(self, engine: Engine) -> None:
        """Every rank calls it: the stored description becomes every rank's, in rank order."""
        self.state = {"format": PER_RANK_FORMAT, "ranks": gather_objects(engine.snapshot.state())}

    def _on_every_rank(self, engine: Engine, write: Callable[[], None], what: str) -> None:
        """Every rank calls it: run this rank's ``write``, agree with the other ranks on whether any failed (raising
        on every rank if one did), then gather every rank's description."""
        failure: BaseException | None = None
        try:
            write()
        except Exception as exc:  # every rank must reach the agreement, whatever failed here
            failure = exc
        agree_on_failure(failure, what)
        self._gather(engine)


def check_same_peers(engine: Engine, stored: Any) -> None:
    """On resume: the peers must be the ones the run started with (same paths and contents).

    Raises:
        IncompatibleModelsError: They changed (names both lists).
    """
    peers = engine.peers
    now = peers.identities() if peers is not None else []
    if stored is not None and list(stored) != now:
        raise IncompatibleModelsError(
            f"the peers changed since the run started (then: {stored}; now: {now}); the α/weight history refers to "
            "the original peers: pass the same peer checkpoints, or start a new run"
        )


def is_sharded_snapshot(engine: Engine) -> bool:
    """The engine's θ₀ holds this rank's shards of a sharded model (FSDP2, ZeRO-3)."""
    return engine.has_snapshot and getattr(engine.snapshot, "shard", None) is not None


def _rank_state(state: Mapping[str, Any], moved: Path | None) -> dict[str, Any]:
    """This rank's snapshot state out of a per-rank description (``{"format", "ranks": [state, ...]}``).

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
