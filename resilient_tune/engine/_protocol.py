"""What the session asks of an engine: the :class:`Engine` protocol, and the small types engines share.

An engine holds the base θ₀ of one model (a copy of its trainable parameters, or nothing when the base stays in the
model, as with LoRA) and builds the resilient model θ(α) from it and the live weights θₜ: swapped into the live model
in place for the probes (and restored bit-exactly), measured as a weight-space drift, and written as a folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from ..recipe import Recipe

__all__ = ["BaseState", "Drift", "Engine", "FamilySaver", "WriteForm", "layer_of"]

WriteForm = Literal["pretrained", "module"]
"""``"pretrained"``: the ``from_pretrained`` form (tied tensors once; a LoRA model merged, its α-scaled adapter in
``adapter/``). ``"module"``: every key of ``model.state_dict()`` at θ(α), for ``load_state_dict`` of the same module
(a LoRA model keeps its adapter, scaled by α)."""

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")


def layer_of(name: str) -> str:
    """The numbered block a parameter belongs to (``transformer.h.3`` for ``transformer.h.3.attn.c_attn.weight``),
    or the name itself outside numbered blocks: the groups of :attr:`Drift.per_layer`."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


@dataclass(frozen=True)
class Drift:
    """Weight-space drift of the trainable parameters from the base.

    Attributes:
        total: ``‖θₜ − θ₀‖₂`` over all trainable parameters (float32 arithmetic).
        relative: ``total / ‖θ₀‖₂`` (0 when ``‖θ₀‖ = 0``).
        per_layer: ``‖θₜ − θ₀‖₂`` per layer (:func:`layer_of` groups), in model order.
    """

    total: float
    relative: float
    per_layer: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "relative": self.relative, "per_layer": dict(self.per_layer)}


@dataclass(frozen=True)
class FamilySaver:
    """A model family's own folder writer, for models whose ``state_dict`` keys are not their checkpoint's.

    Attributes:
        library: The library whose loader reads the folder (``"sentence-transformers"``).
        loader: How to load it, for the model card (``"SentenceTransformer(path)"``).
        save: ``save(folder)`` writes the live model's weights and files into ``folder``.
    """

    library: str
    loader: str
    save: Callable[[Path], None]


@runtime_checkable
class BaseState(Protocol):
    """Where an engine keeps θ₀: a :class:`~resilient_tune.snapshot.Snapshot`, or a LoRA engine's empty stand-in."""

    @property
    def storage(self) -> str: ...  # "memory", "disk" or "none" (θ₀ stays in the model)
    @property
    def folder(self) -> Path | None: ...
    @property
    def nbytes(self) -> int: ...  # resident bytes
    @property
    def stored_bytes(self) -> int: ...
    def state(self) -> dict[str, Any]: ...  # JSON-able: what a resumed run needs to find θ₀ again
    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """The merge side of a session: θ₀ of one model, and θ(α) built from it and the live weights.

    Implemented by :class:`~resilient_tune.engine.CocktailEngine` (full weights; peers; any merge method) and
    :class:`~resilient_tune.engine.LoraEngine` (PEFT LoRA: no copy, θ₀ + α·Δ is the adapter scaled by α).
    """

    alpha: float
    weights: tuple[float, ...]  # wᵢ of the base and each peer (base first, summing to 1)
    recipe: Recipe
    snapshot_dir: Path | None

    @property
    def num_peers(self) -> int: ...
    @property
    def ingredient_names(self) -> list[str]: ...
    @property
    def peers(self) -> Any: ...  # the opened peers (``identities()``), or None
    @property
    def snapshot(self) -> BaseState: ...
    @property
    def has_snapshot(self) -> bool: ...

    def begin(self, model: torch.nn.Module, *, overwrite: bool = False) -> BaseState:
        """Take θ₀ of ``model`` (before its first optimizer step)."""
        ...

    def attach(self, snapshot: Any, model: torch.nn.Module | None = None) -> None:
        """Use a θ₀ reloaded from a resume state (checked against ``model``)."""
        ...

    def set_weights(self, weights: Sequence[float]) -> tuple[float, ...]: ...
    def recipe_for(self, alpha: float, weights: Sequence[float] | None = None) -> Recipe: ...

    def swapped(
        self, model: torch.nn.Module, alpha: float, weights: Sequence[float] | None = None
    ) -> AbstractContextManager[torch.nn.Module]:
        """θ(α) in the live model for the block; restored bit-exactly on exit."""
        ...

    def swapped_ingredient(
        self, model: torch.nn.Module, index: int
    ) -> AbstractContextManager[torch.nn.Module]:
        """Ingredient ``index`` (0 = the base, ``i`` = peer ``i``) in the live model for the block."""
        ...

    def drift(self, model: torch.nn.Module) -> Drift: ...

    def merged_state_dict(
        self, model: torch.nn.Module, alpha: float | None = None, weights: Sequence[float] | None = None
    ) -> dict[str, torch.Tensor]: ...

    def write(
        self,
        model: torch.nn.Module,
        folder: str | Path,
        alpha: float | None = None,
        *,
        metadata: dict[str, Any] | None = None,
        weights: Sequence[float] | None = None,
        form: WriteForm = "pretrained",
        saver: FamilySaver | None = None,
        **files: Any,
    ) -> Path:
        """Write θ(α) as a folder, atomically (``files``: ``support_from``, ``tokenizer``, ``overwrite``,
        ``max_shard_size``, ``subfolders``)."""
        ...

    def close(self) -> None: ...
