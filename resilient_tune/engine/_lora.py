"""PEFT LoRA models: the resilient model θ₀ + α·Δ is the adapter scaled by α, so no copy of θ₀ is needed.

With LoRA the base weights θ₀ are frozen inside the model and the update is the adapter, ``Δ = scaling·B@A`` per
adapted layer. Scaling the adapter by α (``scaling → α·scaling``, what ``peft.helpers.rescale_adapter_scale``
does) gives exactly ``θ₀ + α·Δ`` (WiSE-FT), the linear mix of the fine-tuned model with its base.
:class:`LoraEngine` has the surface of :class:`~resilient_tune.engine.CocktailEngine` that the training callbacks
use, built on that fact:

- no snapshot: :attr:`LoraEngine.snapshot` is a :class:`LoraBase` holding zero bytes;
- :meth:`LoraEngine.swapped` scales the adapter by α in place (and mixes ``modules_to_save`` copies with their
  frozen originals, ``orig + α·(trained − orig)``), restoring the scalings and weights exactly on exit;
- :meth:`LoraEngine.drift` measures ``‖Δ‖`` per layer;
- :meth:`LoraEngine.write` writes a folder holding both forms of the resilient model:

  * ``model.safetensors`` (+ ``config.json``, tokenizer, ``cocktail.json``, ``README.md``): the merged full model
    ``W₀ + α·scaling·B@A`` per LoRA layer (computed while streaming, one layer at a time, in float32), loadable
    with ``from_pretrained`` of the base architecture. Keys are the base model's own (``base_layer.`` and the
    ``lora_*`` tensors gone, ``modules_to_save`` copies under the original name), as ``merge_and_unload`` gives;
    a LoRA'd embedding tied to the output head is written once, merged, so the head follows it (as in
    ``merge_and_unload``).
  * ``adapter/``: the α-scaled adapter, ``adapter_model.safetensors`` (the LoRA ``A``/``B`` weights unchanged,
    ``modules_to_save`` mixed) and ``adapter_config.json`` with ``lora_alpha`` (and every ``alpha_pattern``
    value) multiplied by α, which multiplies the scaling by α (plain and rsLoRA scalings are both linear in
    ``lora_alpha``). Load it with ``PeftModel.from_pretrained(base_model, "<folder>/adapter")``. It lives in a
    sub-folder because ``from_pretrained`` of a folder holding ``adapter_config.json`` would load the adapter on
    top of the merged weights.

``model`` may be the PEFT model itself (the Hugging Face ``Trainer``'s case) or a module holding one (a
``LightningModule`` with ``self.model = get_peft_model(...)``); every trainable parameter of ``model`` must belong to
the adapter. :meth:`LoraEngine.write` with ``merged=False`` writes the third form, ``model``'s own
``state_dict()`` keys with the adapter scaled by α (each ``lora_B`` weight × α, ``modules_to_save`` mixed): loaded
into the same PEFT-wrapped module with ``load_state_dict`` it computes ``θ₀ + α·Δ``.

Supported: one active LoRA adapter on ``Linear`` / ``Conv1D`` / ``Embedding`` / ``Conv`` layers (``lora_bias``
included), plus ``modules_to_save``. Refused with a message: DoRA and other LoRA variants (scaling the adapter is
not θ₀ + α·Δ for them), several active adapters, merged adapters, other PEFT methods, trainable parameters that
are neither LoRA weights nor ``modules_to_save`` (``bias="all"``, unfrozen base weights), peers, and merge
methods other than ``linear``. ``peft`` is imported when a PEFT model is met, never at import time.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import TensorInfo
from ..errors import UsageError
from ..folder import SubFolder, write_model_folder
from ..recipe import Recipe
from ..validation import check_alpha, check_weights
from ._full import CocktailEngine
from ._lora_layers import (
    base_model,
    clean_name,
    find_peft_model,
    inspect_lora,
    mix,
)
from ._lora_write import ADAPTER_FOLDER, document, merged_items, scaled_items, write_adapter
from ._protocol import Drift, FamilySaver, WriteForm, layer_of

__all__ = ["ADAPTER_FOLDER", "FORMAT", "LoraBase", "LoraEngine"]

FORMAT = "resilient-tune/peft-lora"


class LoraBase:
    """The "snapshot" of a LoRA model: nothing is copied, θ₀ is the frozen base weights inside the model.

    Has the read-only surface of :class:`~resilient_tune.snapshot.Snapshot` the callbacks use.
    """

    storage = "none"
    folder = None
    nbytes = 0
    stored_bytes = 0

    def __init__(self, adapter: str, names: Sequence[str], base_model: str | None) -> None:
        self.adapter = adapter
        self.names = list(names)
        self.base_model = base_model

    def state(self) -> dict[str, Any]:
        """JSON-able description: a LoRA run needs no snapshot to resume (the base weights are in the model)."""
        return {
            "format": FORMAT,
            "storage": self.storage,
            "folder": None,
            "adapter": self.adapter,
            "names": self.names,
            "base_model": self.base_model,
            "stored_bytes": 0,
        }

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"LoraBase(adapter={self.adapter!r}, {len(self.names)} trainable tensors, no copy)"


class LoraEngine:
    """θ₀ + α·Δ for a PEFT LoRA model without a copy of θ₀; the callbacks' engine for PEFT models.

    Args:
        alpha: Default weight α of the fine-tuned model, in ``[0, 1]``.
        method: Must be ``"linear"`` (``θ₀ + α·Δ``); task-vector methods need dense task vectors.
        seed: Kept for the recipe.

    Raises:
        UsageError: α out of range or another method.
    """

    def __init__(self, alpha: float = 0.5, method: str = "linear", *, seed: int = 0) -> None:
        self.alpha = check_alpha(alpha)
        if method != "linear":
            raise UsageError(
                f"method={method!r} cannot merge a PEFT LoRA model during training: the resilient model is the "
                "adapter scaled by alpha (method='linear'); for TIES/DARE merge_and_unload the adapter and merge "
                "offline with resilient_tune.merge(...)"
            )
        self.recipe = Recipe(method="linear", seed=seed)
        self.weights: tuple[float, ...] = (1.0,)
        self.num_peers = 0
        self.peers = None
        self.template: CocktailEngine | None = None
        self.snapshot_device = torch.device("cpu")
        self.snapshot_dtype = None
        self.snapshot_dir: Path | None = None
        self._base: LoraBase | None = None

    @classmethod
    def from_engine(cls, engine: CocktailEngine) -> LoraEngine:
        """A LoRA engine with ``engine``'s α, method and seed (``engine`` is kept as :attr:`template`).

        Raises:
            NotImplementedError: ``engine`` has peers.
            UsageError: ``engine``'s method is not ``linear``.
        """
        if engine.num_peers:
            raise NotImplementedError(
                "peers with a PEFT LoRA model are not supported: peers are full checkpoints while the run trains an "
                "adapter. Train without peers (the resilient model is then θ₀ + α·Δ), or merge_and_unload the "
                "adapter after training and mix it with the peers offline (resilient_tune.merge)"
            )
        lora = cls(engine.alpha, engine.recipe.method, seed=engine.recipe.seed)
        lora.template = engine
        return lora

    # ---------------------------------------------------------------- base
    @property
    def snapshot(self) -> LoraBase:
        if self._base is None:
            raise UsageError(
                "the engine has not seen the model yet; call begin(model) before training starts"
            )
        return self._base

    @property
    def has_snapshot(self) -> bool:
        return self._base is not None

    @property
    def ingredient_names(self) -> list[str]:
        return ["base"]

    def begin(self, model: torch.nn.Module, *, overwrite: bool = False) -> LoraBase:
        """Check ``model`` (see the module docs for what is refused) and note its adapter; copies nothing."""
        adapter, layers, wrappers = inspect_lora(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        config = self._peft(model).peft_config[adapter]
        self._base = LoraBase(adapter, names, getattr(config, "base_model_name_or_path", None))
        self._layers, self._wrappers = layers, wrappers
        return self._base

    def attach(self, snapshot: Any, model: torch.nn.Module | None = None) -> None:
        """Resume: the base weights are in the model, so this re-inspects ``model``."""
        if model is None:
            raise UsageError("attach(snapshot, model) needs the model for a LoRA run")
        self.begin(model)

    def close(self) -> None:
        """Nothing to release."""

    def set_weights(self, weights: Sequence[float]) -> tuple[float, ...]:
        self.weights = check_weights(weights, 1, nonnegative=True, per="ingredient")
        return self.weights

    def recipe_for(self, alpha: float, weights: Sequence[float] | None = None) -> Recipe:
        """``linear`` with weights ``(α, 1 − α)`` over fine-tuned and base."""
        alpha = check_alpha(alpha)
        return Recipe(method="linear", weights=(alpha, 1.0 - alpha), seed=self.recipe.seed)

    # ---------------------------------------------------------------- swap
    @contextlib.contextmanager
    def swapped(
        self, model: torch.nn.Module, alpha: float, weights: Sequence[float] | None = None
    ) -> Iterator[torch.nn.Module]:
        """Scale the adapter by α (and mix ``modules_to_save`` copies) for the duration of the block.

        The scalings are restored from copies and the ``modules_to_save`` weights from a CPU scratch, exactly, also
        on an exception. ``alpha == 1`` changes nothing.
        """
        from peft.helpers import rescale_adapter_scale

        alpha = check_alpha(alpha)
        if weights is not None:
            check_weights(weights, 1, nonnegative=True, per="ingredient")
        self._check(model)
        if alpha == 1.0:
            yield model
            return
        with rescale_adapter_scale(model, alpha), self._mixed_copies(model, alpha):
            yield model

    @contextlib.contextmanager
    def swapped_ingredient(self, model: torch.nn.Module, index: int) -> Iterator[torch.nn.Module]:
        """Ingredient 0 (the base): the adapter scaled by 0."""
        if index != 0:
            raise UsageError(f"ingredient index {index!r}: a LoRA run has one ingredient, the base (0)")
        with self.swapped(model, 0.0) as swapped:
            yield swapped

    @contextlib.contextmanager
    def _mixed_copies(self, model: torch.nn.Module, alpha: float) -> Iterator[None]:
        scratch: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for trained, original in self._copy_pairs():
                    for name, p in trained.named_parameters():
                        if not p.is_floating_point():
                            continue
                        live = p.detach().to("cpu", copy=True)
                        scratch.append((p, live))
                        p.copy_(mix(live, original.get_parameter(name).detach(), alpha, name))
            yield
        finally:
            with torch.no_grad():
                for p, live in scratch:
                    p.copy_(live)

    # ---------------------------------------------------------------- drift
    def drift(self, model: torch.nn.Module) -> Drift:
        """``‖Δ‖`` of the trainable update (LoRA ``scaling·B@A`` per layer, ``modules_to_save`` changes), total,
        relative to ``‖W₀‖`` of the adapted tensors, and per layer (base-model names)."""
        self._check(model)
        per_layer: dict[str, float] = {}
        total_sq = base_sq = 0.0
        with torch.no_grad():
            for name, module in self._layers:
                weight = module.get_base_layer().weight.detach().float()
                delta_sq = float(self._delta(module).pow(2).sum())
                for bias_delta in self._bias_deltas(module):
                    delta_sq += float(bias_delta.pow(2).sum())
                total_sq += delta_sq
                base_sq += float(weight.pow(2).sum())
                group = layer_of(clean_name(name) + ".weight")
                per_layer[group] = per_layer.get(group, 0.0) + delta_sq
            for (name, _), (trained, original) in zip(self._wrappers, self._copy_pairs()):
                for pname, p in trained.named_parameters():
                    base = original.get_parameter(pname).detach().float()
                    delta_sq = float((p.detach().float() - base).pow(2).sum())
                    total_sq += delta_sq
                    base_sq += float(base.pow(2).sum())
                    group = layer_of(f"{clean_name(name)}.{pname}")
                    per_layer[group] = per_layer.get(group, 0.0) + delta_sq
        total = math.sqrt(total_sq)
        relative = total / math.sqrt(base_sq) if base_sq > 0 else 0.0
        return Drift(total, relative, {k: math.sqrt(v) for k, v in per_layer.items()})

    # ---------------------------------------------------------------- merged model
    def merged_state_dict(
        self, model: torch.nn.Module, alpha: float | None = None, weights: Sequence[float] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged full model ``θ₀ + α·Δ`` under the base model's own keys (tied tensors under every name)."""
        alpha = self.alpha if alpha is None else check_alpha(alpha)
        self._check(model)
        return dict(merged_items(self, model, alpha, dedupe=False))

    def write(
        self,
        model: torch.nn.Module,
        folder: str | os.PathLike[str],
        alpha: float | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        weights: Sequence[float] | None = None,
        form: WriteForm = "pretrained",
        saver: FamilySaver | None = None,
        support_from: str | os.PathLike[str] | None = None,
        tokenizer: Any = None,
        overwrite: bool = False,
        max_shard_size: int | str = "5GB",
        subfolders: Sequence[SubFolder] = (),
    ) -> Path:
        """Write the resilient model to ``folder``, atomically.

        ``form="pretrained"`` (default): the merged full model (the base model's keys, ``from_pretrained``-loadable;
        tied tensors once) and the α-scaled adapter in ``adapter/``. ``form="module"``: ``model.state_dict()`` under
        its own keys with the adapter scaled by α (every key; for ``load_state_dict`` of the same PEFT-wrapped
        module), no ``adapter/``.

        Args: as :meth:`CocktailEngine.write <resilient_tune.engine.CocktailEngine.write>`. ``support_from`` is a
        folder whose config/tokenizer files are copied (the Trainer's checkpoint holds the tokenizer; the base
        model's ``config.json`` comes from ``model.config`` when the folder has none). A family ``saver`` and
        ``subfolders`` are refused (the adapter's two forms are not cut from one stream).
        """
        alpha = self.alpha if alpha is None else check_alpha(alpha)
        if weights is not None:
            check_weights(weights, 1, nonnegative=True, per="ingredient")
        if saver is not None or subfolders:
            what = f"the {saver.library} layout" if saver is not None else "sub-folders"
            raise UsageError(
                f"a PEFT LoRA model is written as a merged model plus its α-scaled adapter; {what} are not supported "
                "for it"
            )
        if form not in ("pretrained", "module"):
            raise UsageError(f"form={form!r} must be 'pretrained' or 'module'")
        self._check(model)
        peft_model = self._peft(model)
        merged = form == "pretrained"
        if merged:
            items = lambda lazy: merged_items(self, peft_model, alpha, lazy=lazy)  # noqa: E731
            adapter = lambda tmp: write_adapter(self, peft_model, tmp / ADAPTER_FOLDER, alpha)  # noqa: E731
        else:
            items, adapter = lambda lazy: scaled_items(self, model, alpha, lazy=lazy), None
        plan = {key: TensorInfo(t.dtype, tuple(t.shape)) for key, t in items(True)}
        return write_model_folder(
            folder,
            plan,
            items(False),
            document(self, peft_model, alpha, metadata, merged=merged),
            config_from=base_model(peft_model),
            extra_files=adapter,
            support_from=support_from,
            tokenizer=tokenizer,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
        )

    # ---------------------------------------------------------------- internals
    def _check(self, model: torch.nn.Module) -> None:
        if self._base is None:
            self.begin(model)
            return
        adapter, layers, wrappers = inspect_lora(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if adapter != self._base.adapter or names != self._base.names:
            raise UsageError(
                "the model's active adapter or trainable parameters changed since train begin "
                f"({self._base.adapter!r} -> {adapter!r}); switching adapters mid-run is not supported"
            )
        self._layers, self._wrappers = layers, wrappers

    @staticmethod
    def _peft(model: torch.nn.Module) -> torch.nn.Module:
        """The PEFT model that is or is inside ``model`` (checked by :func:`inspect_lora` already)."""
        found = find_peft_model(model)
        if found is None:
            raise UsageError(
                f"{type(model).__name__} holds no PEFT model; use CocktailEngine for full fine-tuning"
            )
        return found

    def _copy_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        adapter = self.snapshot.adapter
        return [(w.modules_to_save[adapter], w.original_module) for _, w in self._wrappers]

    def _delta(self, module: Any) -> torch.Tensor:
        """``scaling·B@A`` of the active adapter in float32, the shape of the base weight (peft's own formula)."""
        return module.get_delta_weight(self.snapshot.adapter).detach().float()

    def _bias_deltas(self, module: Any) -> list[torch.Tensor]:
        adapter = self.snapshot.adapter
        if not getattr(module, "lora_bias", {}).get(adapter, False):
            return []
        bias = module.lora_B[adapter].bias.detach().float()
        return [bias * module.scaling[adapter]]
