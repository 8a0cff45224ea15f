"""Models and ingredients: where checkpoints come from, which class loads them, and copying an ingredient's
weights into the one shared model instance.

Only one model instance is built; ingredients are copied into it one at a time (one extra tensor in memory at a
time when read from disk). ``transformers`` and ``huggingface_hub`` are imported inside the functions that need
them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import IncompatibleModelsError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Ingredient = str | os.PathLike | Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None
"""One ingredient for :func:`example_losses`: ``None`` (the model's current weights), a checkpoint path (read
lazily, one tensor at a time), a state dict, or a zero-argument callable returning one (called when needed)."""

# --- models and ingredients --------------------------------------------------------------------------------------

_OTHER_FORMATS = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.ot",
    "*.tflite",
    "*.gguf",
    "onnx/*",
    "openvino/*",
    "coreml/*",
]
_PICKLES = ["*.bin", "*.pt", "*.pth"]


def _resolve_model_path(name: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hub name fetched with ``snapshot_download`` (cache first offline).

    Pickle weights (``*.bin``) are only downloaded when the repository has no safetensors.
    """
    local = Path(name).expanduser()
    if local.exists():
        return local
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        folder = Path(snapshot_download(os.fspath(name), ignore_patterns=_OTHER_FORMATS + _PICKLES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(os.fspath(name), ignore_patterns=_OTHER_FORMATS))
    except Exception as exc:  # huggingface_hub raises many types (validation, offline, HTTP, ...)
        where = (
            "in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            if offline
            else "on the Hugging Face Hub"
        )
        raise UsageError(
            f"model {os.fspath(name)!r} is not a local folder and was not found {where}: "
            f"{type(exc).__name__}: {exc}; pass an existing local path or download the model first"
        ) from exc
    return folder


def _auto_class(model_type: str) -> Any:
    import transformers

    return {
        "decoder": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
        "reranker": transformers.AutoModelForSequenceClassification,
    }[model_type]


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_auto_model(
    path: str | os.PathLike, model_type: str, *, trust_remote_code: bool = False, dtype: Any = "auto"
) -> PreTrainedModel:
    """The transformers model class LM_Cocktail uses for ``model_type``, loaded from ``path`` in eval mode."""
    model = _auto_class(model_type).from_pretrained(
        os.fspath(path), trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype)
    )
    return model.eval()


def _load_ingredient(model: torch.nn.Module, ingredient: Ingredient, label: str) -> None:
    if isinstance(ingredient, (str, os.PathLike)):
        from ..checkpoint import open_checkpoint

        with open_checkpoint(ingredient) as reader:
            _copy_weights_into(model, reader, label)
        return
    source = ingredient() if callable(ingredient) and not isinstance(ingredient, Mapping) else ingredient
    if not isinstance(source, Mapping):
        raise UsageError(
            f"{label} is a {type(source).__name__}; pass None, a checkpoint path, a state dict or a callable "
            "returning a state dict"
        )
    _copy_weights_into(model, source, label)


def _copy_weights_into(model: torch.nn.Module, source: Any, label: str = "the checkpoint") -> None:
    """Copy a whole state dict into ``model`` in place (``load_state_dict(strict=True)`` semantics, lazily).

    ``source`` has ``keys()`` and ``get(key) -> Tensor`` (a state dict or a lazy checkpoint reader); tensors are
    fetched and copied one at a time (cast to the parameter's dtype). Every parameter and persistent buffer of
    ``model`` must be provided — tied parameters (e.g. ``lm_head.weight`` tied to the input embeddings) once,
    under any of their names. Keys may carry or lack the model's ``base_model_prefix`` (as in
    ``from_pretrained``); keys outside the base model of a prefixed checkpoint (task heads) and keys
    transformers itself ignores on load are skipped, and so are non-floating tensors the model does not have
    (legacy buffers such as ``embeddings.position_ids`` that older transformers versions saved); any other
    unknown key is an error.

    Raises:
        IncompatibleModelsError: missing or unknown keys, or a shape mismatch (the message names them).
    """
    targets = model.state_dict(
        keep_vars=True
    )  # name -> the Parameter/buffer object itself (aliases share it)
    keys = list(source.keys())
    legacy = {key for key in keys if key not in targets and not _source_dtype(source, key).is_floating_point}
    mapping = _match_keys(model, targets, [key for key in keys if key not in legacy], label)
    with torch.no_grad():
        for src_key, dst_key in mapping.items():
            value, dst = source.get(src_key), targets[dst_key]
            if tuple(value.shape) != tuple(dst.shape):
                raise IncompatibleModelsError(
                    f"{label}: {src_key!r} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(dst.shape)}; all models must share one architecture and config"
                )
            dst.copy_(value)


def _source_dtype(source: Any, key: str) -> torch.dtype:
    info = getattr(source, "info", None)  # a lazy checkpoint reader knows dtypes without loading
    return info(key).dtype if info is not None else source[key].dtype


def _match_keys(
    model: torch.nn.Module, targets: Mapping[str, torch.Tensor], keys: list[str], label: str
) -> dict[str, str]:
    """Source key -> model key; raises on missing or unknown keys."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    is_base = getattr(model, "base_model", model) is model
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if key in targets:
            mapping[key] = key
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in targets:
            mapping[key] = key[len(prefix) + 1 :]
        elif prefix and f"{prefix}.{key}" in targets:
            mapping[key] = f"{prefix}.{key}"
        elif not any(p.search(key) for p in ignore):
            unknown.append(key)
    stripped = any(src != dst and src.startswith(prefix + ".") for src, dst in mapping.items())
    if is_base and stripped:  # a checkpoint of a model with a head, loaded as its base model
        unknown = [key for key in unknown if key.startswith(prefix + ".")]
    if unknown:
        raise IncompatibleModelsError(
            f"{label} has {len(unknown)} key(s) the model does not have, e.g. {unknown[:3]}; "
            "all models must share one architecture (check model_type and the checkpoints)"
        )
    provided = {id(targets[dst]) for dst in mapping.values()}
    missing = [name for name, tensor in targets.items() if id(tensor) not in provided]
    if missing:
        raise IncompatibleModelsError(
            f"{label} lacks {len(missing)} key(s) the model has, e.g. {missing[:3]}; "
            "all models must share one architecture (check model_type and the checkpoints)"
        )
    return mapping
