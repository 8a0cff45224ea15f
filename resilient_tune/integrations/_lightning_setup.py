"""What the Lightning ``CocktailCallback`` checks and settles when a fit starts: the Trainer's package and strategy,
the same θ₀ on every rank, and the on-disk θ₀ moved to its final folder once the run is known to be a fresh one."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from resilient_tune.errors import UsageError
from resilient_tune.session import Cocktail

__all__ = ["align_ranks", "check_trainer", "is_collective", "promote"]

logger = logging.getLogger("resilient_tune.integrations.lightning")

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


def check_trainer(trainer: Any, package: str) -> None:
    """The Trainer comes from ``package`` and its strategy is supported.

    Raises:
        UsageError: A Trainer of the other Lightning package (names the right import).
        NotImplementedError: A refused strategy (names the one to use).
    """
    if not isinstance(trainer, importlib.import_module(package).Trainer):
        source = type(trainer).__module__.split(".")[0]
        used = "pytorch_lightning" if source == "pytorch_lightning" else "lightning.pytorch"
        right = _ADAPTERS.get(used, "lightning")
        raise UsageError(
            f"this CocktailCallback is built on {package}, but the Trainer comes from {used} (Lightning does "
            f"not mix the two packages); use: from resilient_tune.integrations.{right} import CocktailCallback"
        )
    refused = _strategy_named(trainer, package, tuple(_REFUSED))
    if refused is not None:
        raise NotImplementedError(
            f"the Lightning CocktailCallback: {_REFUSED[refused]} (see docs/lightning.md)"
        )


def is_collective(trainer: Any, package: str) -> bool:
    """The strategy saves checkpoints on every rank (``ModelParallelStrategy``, ``DeepSpeedStrategy``)."""
    return _strategy_named(trainer, package, _COLLECTIVE) is not None


def align_ranks(session: Cocktail, trainer: Any, module: Any, pending: Path) -> None:
    """Under DDP: if a rank's θ₀ differs from rank 0's, snapshot the live (already broadcast) weights again."""
    snapshot = session.engine.snapshot
    if trainer.world_size <= 1 or snapshot.storage == "none":
        return  # one process, or LoRA: nothing copied (the frozen base weights are rank 0's after DDP's broadcast)
    mine = _checksum(snapshot.items())
    reference = trainer.strategy.broadcast(mine, src=0)
    if trainer.strategy.reduce_boolean_decision(mine != reference, all=False):
        logger.info("CocktailCallback: ranks started from different weights; θ₀ is rank 0's (DDP broadcast)")
        session.begin(module, base_dir=pending, probes=False)


def promote(trainer: Any, pending: Path, base_dir: Path) -> None:
    """Move a fresh run's on-disk θ₀ from the pending folder to ``resilient_base/`` (its files are closed). Several
    processes (every rank calls it): rank 0 moves the folder holding every rank's ``rank<r>-of-<n>/`` between two
    barriers."""
    several = trainer.world_size > 1
    if several:
        trainer.strategy.barrier("resilient_base")  # every rank has closed its files
    if not several or trainer.is_global_zero:
        if base_dir.exists():
            shutil.rmtree(base_dir)
        os.replace(pending, base_dir)
    if several:
        trainer.strategy.barrier("resilient_base moved")


def _strategy_named(trainer: Any, package: str, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` (classes of ``<package>.strategies``) that ``trainer.strategy`` is an instance of."""
    strategies = importlib.import_module(f"{package}.strategies")
    for name in names:
        strategy_class = getattr(strategies, name, None)
        if strategy_class is not None and isinstance(trainer.strategy, strategy_class):
            return name
    return None


def _checksum(items: Iterator[tuple[str, torch.Tensor]]) -> tuple[float, float]:
    total = squares = 0.0
    for _, tensor in items:
        values = tensor.detach().to("cpu", torch.float64)
        total += float(values.sum())
        squares += float(values.pow(2).sum())
    return total, squares
