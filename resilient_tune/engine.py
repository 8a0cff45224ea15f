"""Framework-agnostic core of the training callbacks: snapshot -> measure -> choose -> merge -> write.

:class:`CocktailEngine` holds the base snapshot θ₀ of a model's trainable parameters and, given the live
weights θₜ and a mixing weight α, builds the resilient model ``θ = θ₀ + α·(θₜ − θ₀)`` (``method="linear"``:
``α·θₜ + (1 − α)·θ₀``, the LM-Cocktail / WiSE-FT mix of the fine-tuned model with its base) or, with a
task-vector method, ``θ₀ + λ·sparsify(α·(θₜ − θ₀))`` as the merge core defines it. It can

- swap θ(α) into the live model in place and restore θₜ bit-exactly afterwards (:meth:`swapped`), so that
  probes can score candidates without a second model instance;
- measure the weight-space drift ``‖θₜ − θ₀‖`` per layer (:meth:`drift`);
- return the merged state dict (:meth:`merged_state_dict`) or write a ``from_pretrained``-loadable folder with
  ``cocktail.json`` and a model card, atomically (:meth:`write`).

Frozen parameters and buffers are never merged: they still hold their base values. This module imports only
torch and resilient-tune's own modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .card import model_card
from .checkpoint import StreamingWriter, TensorInfo, atomic_dir, copy_support_files, parse_size
from .errors import UsageError
from .merging import get_method, merge_tensor, resolve_options
from .recipe import COCKTAIL_FILE, Recipe, cocktail_document
from .snapshot import Snapshot

__all__ = ["CocktailEngine", "Drift", "check_alpha"]

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)\.")


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float after checking it is a real number in ``[0, 1]``.

    Raises:
        UsageError: Not a number, NaN, or outside ``[0, 1]``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise UsageError(f"{name}={alpha!r} must be a number in [0, 1] (the weight of the fine-tuned model)")
    value = float(alpha)
    if not (0.0 <= value <= 1.0):
        raise UsageError(
            f"{name}={alpha!r} is outside [0, 1]; pass the weight of the fine-tuned model, e.g. 0.5 "
            "(0 = the base model, 1 = the fine-tuned model)"
        )
    return value


@dataclass(frozen=True)
class Drift:
    """Weight-space drift of the trainable parameters from the base.

    Attributes:
        total: ``‖θₜ − θ₀‖₂`` over all trainable parameters (float32 arithmetic).
        relative: ``total / ‖θ₀‖₂`` (0 when ``‖θ₀‖ = 0``).
        per_layer: ``‖θₜ − θ₀‖₂`` per layer (parameters grouped by their numbered block prefix such as
            ``transformer.h.3``; parameters outside numbered blocks are their own group), in model order.
    """

    total: float
    relative: float
    per_layer: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "relative": self.relative, "per_layer": dict(self.per_layer)}


class CocktailEngine:
    """Snapshot of θ₀ plus the merge of the live model with it.

    Args:
        alpha: Default weight α of the fine-tuned model, in ``[0, 1]``.
        method: A registered merge method (``resilient_tune.merging.method_names()``). ``linear`` gives
            ``α·θₜ + (1 − α)·θ₀``; task-vector methods (``ties``, ``dare_linear``, ...) merge the task vector
            ``θₜ − θ₀`` with weight α onto θ₀.
        options: Method options (``density``, ``lambda``, ...); checked here.
        seed: Seed of random methods (DARE).
        snapshot_device: Where the in-memory snapshot lives (``"cpu"`` default).
        snapshot_dtype: Storage dtype of the snapshot (``None`` = same as the parameters, ``"bf16"``, ``"fp16"``).
        snapshot_dir: Keep the snapshot on disk in this folder instead of in memory.

    Raises:
        UsageError: α out of range, unknown method (the message lists the valid ones), bad options or dtype.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        method: str = "linear",
        options: Mapping[str, float] | None = None,
        *,
        seed: int = 0,
        snapshot_device: str | torch.device = "cpu",
        snapshot_dtype: str | torch.dtype | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.recipe = Recipe(method=method, options=dict(options or {}), seed=seed, dtype=None)
        self._spec = get_method(method)
        self._options = resolve_options(self._spec, self.recipe.options)
        self.snapshot_device = torch.device(snapshot_device)
        self.snapshot_dtype = snapshot_dtype
        Recipe(dtype=snapshot_dtype)  # validates the dtype name early
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self._snapshot: Snapshot | None = None

    # ---------------------------------------------------------------- snapshot
    @property
    def snapshot(self) -> Snapshot:
        """The base snapshot; :meth:`begin` or :meth:`attach` must have run."""
        if self._snapshot is None:
            raise UsageError("the engine has no base snapshot yet; call begin(model) before training starts")
        return self._snapshot

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def begin(self, model: torch.nn.Module, *, overwrite: bool = False) -> Snapshot:
        """Snapshot θ₀ (the trainable parameters) of ``model``: call before its first optimizer step.

        Args:
            model: The live model.
            overwrite: Replace an existing ``snapshot_dir``.
        """
        if self._snapshot is not None:
            self._snapshot.close()
        self._snapshot = Snapshot.take(
            model,
            device=self.snapshot_device,
            dtype=self.snapshot_dtype,
            folder=self.snapshot_dir,
            overwrite=overwrite,
        )
        return self._snapshot

    def attach(self, snapshot: Snapshot, model: torch.nn.Module | None = None) -> None:
        """Use an existing snapshot (e.g. reloaded on resume); checked against ``model`` when given."""
        if model is not None:
            snapshot.check(model)
        if self._snapshot is not None and self._snapshot is not snapshot:
            self._snapshot.close()
        self._snapshot = snapshot

    # ---------------------------------------------------------------- merge
    def recipe_for(self, alpha: float) -> Recipe:
        """The :class:`Recipe` of the merge at ``alpha``: weights ``(α, 1 − α)`` (linear) or ``(α,)``."""
        alpha = check_alpha(alpha)
        weights = (alpha,) if self._spec.needs_base else (alpha, 1.0 - alpha)
        return Recipe(
            method=self.recipe.method, weights=weights, options=self.recipe.options, seed=self.recipe.seed
        )

    def merged_tensor(self, name: str, current: torch.Tensor, alpha: float) -> torch.Tensor:
        """θ(α) of parameter ``name`` given its live value ``current`` (returned on ``current``'s device and
        in its dtype; arithmetic in float32 on the CPU-side inputs). ``current`` is not modified."""
        base = self.snapshot.get(name).to(current.device)
        if self._spec.needs_base:
            inputs, weights, base_arg = [current], [alpha], base
        else:
            inputs, weights, base_arg = [current, base], [alpha, 1.0 - alpha], None
        return merge_tensor(
            self._spec,
            inputs,
            weights,
            base=base_arg,
            options=self._options,
            key=name,
            seed=self.recipe.seed,
            out_dtype=current.dtype,
        )

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module, alpha: float) -> Iterator[torch.nn.Module]:
        """Put θ(α) into the live trainable parameters of ``model`` for the duration of the block.

        Works in place under ``torch.no_grad()``: each live tensor θₜ is copied once to a CPU scratch (one
        transient copy of the trainable parameters), the merged tensor is written into the parameter, and on
        exit (also on an exception) every parameter is restored from the scratch, bit-exactly. ``alpha == 1``
        is θₜ itself: nothing is swapped.

        Yields:
            ``model`` itself.
        """
        alpha = check_alpha(alpha)
        params = self.snapshot.check(model)
        if alpha == 1.0 and not self._spec.needs_base:
            yield model
            return
        scratch: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, p in params:
                    live = p.detach().to("cpu", copy=True)
                    scratch[name] = live
                    p.copy_(self.merged_tensor(name, live, alpha))
            yield model
        finally:
            with torch.no_grad():
                for name, p in params:
                    if name in scratch:
                        p.copy_(scratch[name])
            scratch.clear()

    def merged_state_dict(
        self, model: torch.nn.Module, alpha: float | None = None
    ) -> dict[str, torch.Tensor]:
        """The full ``model.state_dict()`` with every trainable parameter replaced by θ(α).

        Non-trainable entries (frozen parameters, buffers) are the model's own tensors (detached, not copied);
        tied parameters appear under every name, merged once. ``model`` is not modified.
        """
        return dict(self._iter_state(model, self.alpha if alpha is None else alpha, dedupe=False))

    def drift(self, model: torch.nn.Module) -> Drift:
        """Weight-space drift ``‖θₜ − θ₀‖`` of the trainable parameters, total and per layer."""
        params = self.snapshot.check(model)
        per_layer: dict[str, float] = {}
        total_sq = base_sq = 0.0
        with torch.no_grad():
            for name, p in params:
                base = self.snapshot.get(name).to("cpu", torch.float32)
                delta_sq = float((p.detach().to("cpu", torch.float32) - base).pow(2).sum())
                total_sq += delta_sq
                base_sq += float(base.pow(2).sum())
                group = _layer_of(name)
                per_layer[group] = per_layer.get(group, 0.0) + delta_sq
        total = math.sqrt(total_sq)
        relative = total / math.sqrt(base_sq) if base_sq > 0 else 0.0
        return Drift(total, relative, {k: math.sqrt(v) for k, v in per_layer.items()})

    # ---------------------------------------------------------------- write
    def write(
        self,
        model: torch.nn.Module,
        folder: str | os.PathLike[str],
        alpha: float | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        support_from: str | os.PathLike[str] | None = None,
        tokenizer: Any = None,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write the resilient model θ(α) as a ``from_pretrained``-loadable folder, atomically.

        The folder holds the weights (``model.safetensors``, sharded with an index above ``max_shard_size``;
        parameters tied to another are written once, as ``save_pretrained`` does), the config and generation
        config (copied from ``support_from`` when given, else from ``model.config`` /
        ``model.generation_config``), the tokenizer (``support_from`` files, or ``tokenizer.save_pretrained``),
        ``cocktail.json`` (recipe, ingredients, α and ``metadata`` such as step and probe metrics) and a model
        card ``README.md``. Tensors are merged and written one at a time.

        Args:
            model: The live model (θₜ); not modified.
            folder: The destination folder.
            alpha: Weight of the fine-tuned model (default: the engine's ``alpha``).
            metadata: Extra JSON-able ``cocktail.json`` entries (``step``, ``probes``, ...).
            support_from: A model folder whose config/tokenizer files are copied (e.g. the Trainer's checkpoint).
            tokenizer: Anything with ``save_pretrained(folder)`` (used when ``support_from`` has no tokenizer).
            overwrite: Replace ``folder`` if it exists.
            max_shard_size: Shard size limit (bytes or ``"5GB"``-style string).

        Returns:
            The written folder.
        """
        alpha = self.alpha if alpha is None else check_alpha(alpha)
        shard_bytes = parse_size(max_shard_size)
        params = self.snapshot.check(model)
        plan = {
            key: TensorInfo(t.dtype, tuple(t.shape))
            for key, t in self._iter_state(model, alpha, dedupe=True, lazy=True)
        }
        recipe = self.recipe_for(alpha)
        doc = cocktail_document(
            recipe, self._ingredients(alpha), version=__version__, extra=self._extra(metadata, alpha, params)
        )
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            meta = {"resilient_tune": __version__, "alpha": repr(alpha)}
            with StreamingWriter(tmp, plan, max_shard_size=shard_bytes, metadata=meta) as writer:
                for key, tensor in self._iter_state(model, alpha, dedupe=True):
                    writer.write(key, tensor)
            _write_support(model, tmp, support_from, tokenizer)
            (tmp / COCKTAIL_FILE).write_text(json.dumps(doc, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(doc))
        return Path(os.path.abspath(folder))

    # ---------------------------------------------------------------- internals
    def _iter_state(
        self, model: torch.nn.Module, alpha: float, *, dedupe: bool, lazy: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` over ``model.state_dict()``, trainable parameters merged (or, ``lazy``, not merged:
        only shapes/dtypes are needed). ``dedupe`` skips keys whose storage another key already holds."""
        alpha = check_alpha(alpha)
        trainable = {id(p): name for name, p in self.snapshot.check(model)}
        seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                if dedupe and value.numel() > 0:
                    ident = (
                        value.untyped_storage().data_ptr(),
                        value.storage_offset(),
                        tuple(value.shape),
                        value.dtype,
                    )
                    if ident in seen:
                        continue
                    seen.add(ident)
                name = trainable.get(id(value))
                live = value.detach()
                if name is None or lazy:
                    yield key, live
                else:
                    yield key, self.merged_tensor(name, live.to("cpu"), alpha)

    def _ingredients(self, alpha: float) -> list[dict[str, Any]]:
        snap = self.snapshot
        base_name = str(snap.folder) if snap.folder is not None else "base snapshot (in memory)"
        fine = {"role": "model", "name": "fine-tuned (live training weights)"}
        base = {"role": "base", "name": base_name, "storage": snap.storage}
        if self._spec.needs_base:
            fine["weight"] = alpha
        else:
            fine["weight"], base["weight"] = alpha, 1.0 - alpha
        return [fine, base]

    def _extra(self, metadata: Mapping[str, Any] | None, alpha: float, params: list[Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"alpha": alpha, "merged_parameters": len(params)}
        for key, value in (metadata or {}).items():
            if key in extra:
                raise UsageError(f"metadata key {key!r} is set by the engine in cocktail.json; rename it")
            extra[key] = value
        return extra


def _layer_of(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(1) if match else name


def _write_support(model: torch.nn.Module, folder: Path, support_from: Any, tokenizer: Any) -> None:
    if support_from is not None:
        copy_support_files(support_from, folder)
    config = getattr(model, "config", None)
    if not (folder / "config.json").exists() and hasattr(config, "to_json_file"):
        config.to_json_file(str(folder / "config.json"))
    generation = getattr(model, "generation_config", None)
    if not (folder / "generation_config.json").exists() and hasattr(generation, "to_json_file"):
        generation.to_json_file(str(folder / "generation_config.json"))
    has_tokenizer = any(
        (folder / n).exists() for n in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")
    )
    if tokenizer is not None and not has_tokenizer and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
