"""What the LoRA engine writes: the merged full model under the base model's keys, the module's own keys with the
adapter scaled by α, the α-scaled adapter folder, and the ``cocktail.json`` document."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..checkpoint import StreamingWriter, TensorInfo
from ..errors import UsageError
from ..recipe import cocktail_document
from ._lora_layers import base_model, ident, mix, params_of, walk

if TYPE_CHECKING:
    from ._lora import LoraEngine

__all__ = ["ADAPTER_FOLDER", "document", "merged_items", "scaled_items", "write_adapter"]

ADAPTER_FOLDER = "adapter"


def merged_items(
    engine: LoraEngine, model: torch.nn.Module, alpha: float, *, dedupe: bool = True, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of the merged full model, one tensor at a time (``lazy``: the live base tensors, for
    shapes and dtypes only). ``dedupe`` writes tied tensors once, as ``save_pretrained`` does; without it every
    alias of a merged tensor (a head tied to a LoRA'd embedding) gets the merged value, as in
    ``merge_and_unload``."""
    items = list(walk(base_model(model), "", engine.snapshot.adapter))
    kinds = {ident(source): kind for _, source, kind in items if kind is not None}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    with torch.no_grad():
        for key, source, _ in items:
            key_id = ident(source)
            if dedupe and source.numel() > 0:
                if key_id in seen:
                    continue
                seen.add(key_id)
            kind = kinds.get(key_id)
            value = source.detach()
            if lazy or kind is None:
                yield key, value
            elif kind[0] == "weight":
                merged = value.float() + alpha * engine._delta(kind[1])
                yield key, merged.to(value.dtype)
            elif kind[0] == "bias":
                merged = value.float() + alpha * engine._bias_deltas(kind[1])[0]
                yield key, merged.to(value.dtype)
            else:  # a modules_to_save copy, mixed with its frozen original
                yield key, mix(value.to("cpu"), kind[1].detach(), alpha, key)


def scaled_items(
    engine: LoraEngine, model: torch.nn.Module, alpha: float, *, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of ``model.state_dict()`` (every key) with the adapter scaled by α: each ``lora_B``
    weight (and bias) × α, since ``scaling·(α·B)@A = α·Δ``, and ``modules_to_save`` copies mixed with their
    frozen originals. Everything else is the live (frozen base) tensor. ``lazy``: no arithmetic."""
    adapter = engine.snapshot.adapter
    scaled: set[int] = set()
    for _, layer in engine._layers:
        for key in ("lora_B", "lora_embedding_B"):
            scaled.update(id(p) for p in params_of(getattr(layer, key, None), adapter))
    originals = {
        id(p): original.get_parameter(name)
        for trained, original in engine._copy_pairs()
        for name, p in trained.named_parameters()
        if p.is_floating_point()
    }
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            tensor = value.detach()
            if lazy or (id(value) not in scaled and id(value) not in originals):
                yield key, tensor
            elif id(value) in scaled:
                yield key, (tensor.float() * alpha).to(tensor.dtype)
            else:
                yield key, mix(tensor.to("cpu"), originals[id(value)].detach(), alpha, key)


def write_adapter(engine: LoraEngine, model: torch.nn.Module, folder: Path, alpha: float) -> None:
    """``adapter_model.safetensors`` (``modules_to_save`` mixed) and ``adapter_config.json`` with
    ``lora_alpha`` × α."""
    from peft.utils import get_peft_model_state_dict

    adapter = engine.snapshot.adapter
    folder.mkdir()
    with engine._mixed_copies(model, alpha):
        state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
        plan = {k: TensorInfo(t.dtype, tuple(t.shape)) for k, t in state.items()}
        with StreamingWriter(folder, plan, filename="adapter_model.safetensors") as writer:
            for key, tensor in state.items():
                writer.write(key, tensor.detach())
    config = copy.deepcopy(model.peft_config[adapter])
    config.lora_alpha = config.lora_alpha * alpha
    config.alpha_pattern = {k: v * alpha for k, v in (config.alpha_pattern or {}).items()}
    config.save_pretrained(str(folder))


def document(
    engine: LoraEngine,
    model: torch.nn.Module,
    alpha: float,
    metadata: Mapping[str, Any] | None,
    *,
    merged: bool = True,
) -> dict[str, Any]:
    base = engine.snapshot
    ingredients = [
        {"role": "model", "name": f"fine-tuned LoRA adapter {base.adapter!r} (live)", "weight": alpha},
        {
            "role": "base",
            "name": base.base_model or "frozen base weights of the PEFT model",
            "weight": 1.0 - alpha,
        },
    ]
    config = model.peft_config[base.adapter]
    extra: dict[str, Any] = {
        "alpha": alpha,
        "merged_parameters": len(engine._layers) + len(engine._wrappers),
        "peft": {
            "type": "LORA",
            "adapter": base.adapter,
            "adapter_folder": ADAPTER_FOLDER if merged else None,
            "lora_alpha": config.lora_alpha,
            "lora_alpha_scaled": config.lora_alpha * alpha,
            "note": (
                "adapter/ is the adapter scaled by alpha (lora_alpha x alpha); model.safetensors is merged"
                if merged
                else "model.safetensors is the PEFT-wrapped module's state dict with each lora_B x alpha"
            ),
        },
    }
    for key, value in (metadata or {}).items():
        if key in extra:
            raise UsageError(f"metadata key {key!r} is set by the engine in cocktail.json; rename it")
        extra[key] = value
    return cocktail_document(engine.recipe_for(alpha), ingredients, version=__version__, extra=extra)
