"""What the LoRA engine reads of a PEFT model: finding it, checking what is supported, and walking its tensors under
the base model's own keys. ``peft`` is imported only when a PEFT model is met."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import UsageError
from ..merging import merge_tensor

__all__ = [
    "LORA_KEYS",
    "adapter_keys",
    "base_model",
    "clean_name",
    "find_peft_model",
    "ident",
    "inspect_lora",
    "is_peft_model",
    "mix",
    "params_of",
    "walk",
]

LORA_KEYS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def is_peft_model(model: Any) -> bool:
    """True for a PEFT model (``peft.PeftModel`` or a model with PEFT adapters injected), without importing peft."""
    return hasattr(model, "peft_config") and isinstance(getattr(model, "peft_config", None), Mapping)


def find_peft_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model`` if it is a PEFT model, else the outermost PEFT model inside it (e.g. in a ``LightningModule``), else
    ``None``."""
    for _, module in model.named_modules():
        if is_peft_model(module):
            return module
    return None


def inspect_lora(model: torch.nn.Module) -> tuple[str, list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Check that ``model`` is a supported LoRA model; return its adapter, LoRA layers and modules_to_save wrappers.

    Raises:
        UsageError: Not a LoRA model, DoRA or another variant, several active adapters, merged layers, trainable
            parameters the LoRA path cannot merge.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.other import AuxiliaryTrainingWrapper

    outer = model
    found = find_peft_model(model)
    if found is None:
        raise UsageError(
            f"{type(model).__name__} is not (and holds no) PEFT model; use CocktailEngine for full fine-tuning"
        )
    model = found
    active = getattr(model, "active_adapters", None)
    active = list((active() if callable(active) else active) or [])  # a method on transformers' adapter mixin
    if len(active) != 1:
        raise UsageError(
            f"the PEFT model has {len(active)} active adapters {active}; activate exactly one (set_adapter(name))"
        )
    adapter = active[0]
    config = model.peft_config[adapter]
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
    if kind != "LORA":
        raise UsageError(
            f"adapter {adapter!r} is a {kind} adapter; only LoRA adapters can be scaled into θ₀ + α·Δ. "
            "merge_and_unload it and train the merged model, or use LoRA"
        )
    if getattr(config, "use_dora", False):
        raise UsageError(
            f"adapter {adapter!r} uses DoRA (use_dora=True): scaling a DoRA adapter by α is not θ₀ + α·Δ (the "
            "magnitude vector renormalises the update), so resilient checkpoints would not be exact. Train with "
            "plain LoRA (use_dora=False), or merge_and_unload after training and merge offline"
        )
    layers, wrappers, owned = [], [], set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in adapter_keys(module):
            if getattr(module, "merged", False):
                raise UsageError(
                    f"LoRA layer {name!r} is merged into its base weights; call unmerge_adapter() first"
                )
            if adapter in getattr(module, "lora_variant", {}):
                variant = type(module.lora_variant[adapter]).__name__
                raise UsageError(
                    f"LoRA layer {name!r} uses the variant {variant}: scaling it by α is not θ₀ + α·Δ; "
                    "train with plain LoRA"
                )
            layers.append((name, module))
            owned.update(id(p) for key in LORA_KEYS for p in params_of(getattr(module, key, None), adapter))
        elif isinstance(module, ModulesToSaveWrapper):
            if adapter in module.modules_to_save:
                wrappers.append((name, module))
                owned.update(id(p) for p in module.modules_to_save[adapter].parameters())
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise UsageError(
                f"{name!r} is a {type(module).__name__} (e.g. trainable_token_indices): not supported by the LoRA "
                "path; use modules_to_save for the embedding instead"
            )
    for name, p in outer.named_parameters():
        if p.requires_grad and id(p) not in owned:
            raise UsageError(
                f"trainable parameter {name!r} is neither a LoRA weight nor in modules_to_save (bias='all' or "
                "'lora_only', or an unfrozen base weight): the LoRA path needs no copy of θ₀ and cannot merge it. "
                "Use bias='none' and list whole modules in modules_to_save"
            )
    if not layers and not wrappers:
        raise UsageError(f"adapter {adapter!r} has no LoRA layer in the model; nothing to merge")
    return adapter, layers, wrappers


def ident(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], torch.dtype]:
    """Identity of a tensor's data (tied parameters share it)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)


def adapter_keys(module: Any) -> set[str]:
    keys: set[str] = set()
    for attr in ("lora_A", "lora_embedding_A"):
        keys.update(getattr(module, attr, {}).keys())
    return keys


def params_of(container: Any, adapter: str) -> list[torch.nn.Parameter]:
    if container is None or adapter not in container:
        return []
    item = container[adapter]
    return [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())


def walk(module: torch.nn.Module, prefix: str, adapter: str) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """``(key, source tensor, kind)`` in ``state_dict`` order with the PEFT wrappers removed.

    ``kind``: ``None`` (copied), ``("weight", lora_layer)`` / ``("bias", lora_layer)`` (merged with the adapter),
    or ``("copy", original)`` (a ``modules_to_save`` copy mixed with its frozen original).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, LoraLayer) and adapter in adapter_keys(module):
        lora_bias = getattr(module, "lora_bias", {}).get(adapter, False)
        for key, value in module.get_base_layer().state_dict(keep_vars=True).items():
            kind = (
                ("weight", module)
                if key == "weight"
                else ("bias", module)
                if key == "bias" and lora_bias
                else None
            )
            yield prefix + key, value, kind
        return
    if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
        original = module.original_module.state_dict(keep_vars=True)
        for key, value in module.modules_to_save[adapter].state_dict(keep_vars=True).items():
            kind = ("copy", original[key]) if value.is_floating_point() else None
            yield prefix + key, value, kind
        return
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    for key, value in module._parameters.items():
        if value is not None:
            yield prefix + key, value, None
    for key, value in module._buffers.items():
        if value is not None and key not in module._non_persistent_buffers_set:
            yield prefix + key, value, None
    for key, child in module._modules.items():
        if child is not None:
            yield from walk(child, f"{prefix}{key}.", adapter)


def mix(trained: torch.Tensor, original: torch.Tensor, alpha: float, key: str) -> torch.Tensor:
    """``α·trained + (1 − α)·original`` with the merge core's ``linear`` rule (float32, in ``trained``'s dtype)."""
    return merge_tensor("linear", [trained, original.to(trained.device)], [alpha, 1.0 - alpha], key=key)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without the ``PeftModel`` wrapper (adapters injected with transformers' ``add_adapter`` have none)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def clean_name(name: str) -> str:
    """A PEFT module name as the base model calls it (``base_model.model.`` prefix removed)."""
    return name.removeprefix("base_model.model.")
