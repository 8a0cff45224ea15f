"""The general merge API: any registered method, optional base, streamed from disk to disk.

``merge`` reads every ingredient lazily, merges one tensor (key) at a time and, with ``out``, streams the result
into a safetensors checkpoint built in a temporary folder that is renamed into place only when complete. Memory
therefore grows with the largest tensor, not with the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, overload

import torch

from ._version import __version__
from .checkpoint import (
    TensorInfo,
    check_destination,
    parse_size,
)
from .errors import UsageError
from .folder import Item, write_model_folder
from .merging import (
    OwnedLoader,
    check_compatible,
    check_inputs,
    get_method,
    layer_depths,
    merge_tensor,
    raise_if_non_finite,
    validate_weights,
)
from .recipe import Recipe, cocktail_document
from .sources import (
    ModelLike,
    TensorSource,
    check_same_architecture,
    copy_buffer,
    open_source,
    partial_buffers,
)
from .vocab import grown_keys, merge_rows, same_shapes

__all__ = ["merge"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@overload
def merge(
    models: Sequence[ModelLike], weights: Sequence[float] | None = ..., *, out: None = ..., **kw: Any
) -> dict[str, torch.Tensor]: ...
@overload
def merge(
    models: Sequence[ModelLike], weights: Sequence[float] | None = ..., *, out: str | os.PathLike, **kw: Any
) -> Path: ...


def merge(
    models: Sequence[ModelLike],
    weights: Sequence[float] | None = None,
    *,
    method: str = "linear",
    base: ModelLike | None = None,
    out: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    normalize: bool = False,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    allow_grown_vocab: bool = False,
    seed: int = 0,
    progress: bool = False,
    options: Mapping[str, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    recipe: Recipe | None = None,
    **method_options: float,
) -> dict[str, torch.Tensor] | Path:
    """Merge checkpoints (or state dicts, or modules) with a registered method.

    Args:
        models: The ingredients to merge: checkpoint folders/files (read lazily, one tensor at a time), state
            dicts or modules. Keys and shapes must match.
        weights: One weight per model. ``linear`` needs weights summing to 1 (or ``normalize=True``);
            task-vector methods take per-task scales. ``None`` gives equal weights ``1/len(models)``.
        method: A registered method name (``resilient_tune.merging.method_names()``).
        base: The pre-trained model task vectors are taken against (required by task-vector methods,
            refused by ``linear``).
        out: Output folder. ``None`` returns the merged state dict instead of writing.
        dtype: Output dtype (``float32``/``float16``/``bfloat16``); ``None`` keeps each tensor's input dtype.
            Accumulation is always float32.
        normalize: Divide the weights by their sum.
        max_shard_size: Shard the output above this size (``"5GB"``, ``"500MB"`` or bytes).
        overwrite: Replace ``out`` if it exists (atomically).
        allow_pickle: Allow ``.bin`` pickle checkpoints (``torch.load(weights_only=True)``). Only for trusted files.
        allow_grown_vocab: Merge inputs whose embedding and head differ only by appended rows (tokens added before
            fine-tuning): the model with the most rows first, tokenizers agreeing on the shared ids, ``linear``;
            each row mixes the models that have it (:mod:`resilient_tune.vocab`).
        seed: Seed of the random methods (DARE).
        progress: Show a progress bar over tensors.
        options: Method options, e.g. ``{"density": 0.5, "lambda": 1.0}``; keyword arguments ``density=``,
            ``gamma=``, ``lambda_=``, ``lines_alpha=``, ``lines_beta=`` are merged into it.
        metadata: Extra JSON-able entries for ``cocktail.json`` (e.g. the auto-weight losses).
        extra_files: ``relative path -> content`` written into the output folder before it is committed.
        recipe: A complete :class:`Recipe` instead of ``method``/``weights``/``options``/``normalize``/``dtype``/``seed``.

    Returns:
        The merged state dict (``out=None``) or the path of the written folder.

    Raises:
        UsageError: bad arguments (weights, method, options, destination exists, ...), before any work starts.
        CheckpointFormatError: a missing, malformed or unsupported checkpoint.
        IncompatibleModelsError: keys or shapes differ between ingredients.
        NonFiniteError: NaN/Inf in an input or the result; nothing is written.
    """
    _check_flags(
        normalize=normalize, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
        allow_grown_vocab=allow_grown_vocab,
    )  # fmt: skip
    if recipe is None:
        if isinstance(weights, (str, bytes)):
            raise UsageError(
                f"weights={weights!r} is a string; pass a sequence of numbers, one per model, e.g. [0.5, 0.5]"
            )
        if options is not None and not isinstance(options, Mapping):
            raise UsageError(f"options={options!r} must be a mapping such as {{'density': 0.5}}")
        opts = dict(options or {})
        for name, value in method_options.items():
            opts["lambda" if name == "lambda_" else name] = value
        recipe = Recipe(
            method=method,
            weights=None if weights is None else tuple(weights),
            options=opts,
            normalize=normalize,
            dtype=None if dtype is None else str(dtype),
            seed=seed,
        )
    elif not isinstance(recipe, Recipe):
        raise UsageError(
            f"recipe is a {type(recipe).__name__}; pass a resilient_tune.Recipe (Recipe.from_dict(d) reads a dict)"
        )
    elif weights is not None or options or method_options:
        raise UsageError("pass either recipe= or method/weights/options, not both")
    models = _model_list(models)
    spec = get_method(recipe.method)
    if spec.needs_base and base is None:
        raise UsageError(
            f"method {spec.name!r} merges task vectors and needs a base model; pass base=PATH (--base)"
        )
    if not spec.needs_base and base is not None:
        raise UsageError(f"method {spec.name!r} takes no base model; drop base= or use a task-vector method")
    shard_bytes = parse_size(max_shard_size)
    dest = check_destination(out, overwrite=overwrite) if out is not None else None
    for rel in extra_files or {}:
        _extra_path(Path("."), rel)  # refuse paths outside the folder before any work
    if dest is not None:
        _check_not_an_input(dest, models, base)
        _check_json_metadata(metadata)
        cocktail_document(recipe, [], version=__version__, extra=metadata)  # reserved keys refused now

    check_inputs(
        spec, len(models), recipe.weights
    )  # counts and weights of SLERP / Model Stock, before any read
    even = 1.0 if spec.combine != "sum" else 1.0 / len(models)  # SLERP and Model Stock take no weights
    raw = recipe.weights if recipe.weights is not None else tuple(even for _ in models)
    final_weights = validate_weights(raw, len(models), method=spec, normalize=recipe.normalize)

    with _open_all(models, base, allow_pickle) as (sources, base_src):
        everyone = [*sources, base_src] if base_src is not None else list(sources)
        check_same_architecture(everyone)
        partial = partial_buffers(everyone)
        grown = grown_keys(everyone, spec.name) if allow_grown_vocab else {}
        specs = [{k: (i.shape, i.dtype) for k, i in s.specs().items() if k not in partial} for s in everyone]
        check_compatible([same_shapes(x, grown, specs[0]) for x in specs], [s.name for s in everyone])
        plan = _plan(sources[0].specs(), recipe.dtype)
        tensors = _merged_tensors(
            spec, recipe, sources, base_src, final_weights, plan, partial, progress, grown
        )
        if dest is None:
            return _collect(tensors)
        ingredients = [_identity(s, "model", w) for s, w in zip(sources, final_weights)]
        if base_src is not None:
            ingredients.append(_identity(base_src, "base", None))
        recipe_used = dataclasses.replace(recipe, weights=tuple(final_weights))
        doc = cocktail_document(recipe_used, ingredients, version=__version__, extra=metadata)

        def finish(tmp: Path) -> None:
            if sources[0].folder is not None and recipe.dtype is not None:
                _set_config_dtype(tmp / "config.json", recipe.dtype)
            for rel, content in (extra_files or {}).items():
                _write_extra(tmp, rel, content)

        write_model_folder(
            dest,
            plan,
            (Item(m.key, m.tensor, m.check) for m in tensors),
            doc,
            support_from=sources[0].folder,
            overwrite=overwrite,
            max_shard_size=shard_bytes,
            extra_files=finish,
            write_behind=True,
        )
        return dest


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UsageError(f"{name}={value!r} must be True or False (a bool, not {type(value).__name__})")


def _model_list(models: object) -> list[Any]:
    if isinstance(models, (str, os.PathLike, Mapping, torch.nn.Module)):
        return [models]
    if not isinstance(models, Sequence):
        raise UsageError(
            f"models is a {type(models).__name__}; pass a list of checkpoint paths, state dicts or modules"
        )
    if not models:
        raise UsageError("no models to merge; pass at least one checkpoint path, state dict or module")
    return list(models)


def _check_not_an_input(dest: Path, models: Sequence[Any], base: Any) -> None:
    """Refuse an output folder that is, or contains, a checkpoint being merged (``overwrite`` would delete it)."""
    labelled = [(f"models[{i}]", model) for i, model in enumerate(models)] + [("base", base)]
    for label, model in labelled:
        if not isinstance(model, (str, os.PathLike)):
            continue
        source = Path(os.path.abspath(os.path.expanduser(model)))
        if dest == source or dest in source.parents:
            raise UsageError(
                f"destination {dest} is or contains the input checkpoint {label} ({source}); replacing it would "
                "destroy an ingredient; choose an output folder outside every input"
            )


def _check_json_metadata(metadata: Mapping[str, Any] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise UsageError(f"metadata is a {type(metadata).__name__}; pass a dict of JSON-able values")
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"metadata is not JSON-serialisable ({exc}); pass str, number, list or dict values"
        ) from None


@contextlib.contextmanager
def _open_all(
    models: Sequence[ModelLike], base: ModelLike | None, allow_pickle: bool
) -> Iterator[tuple[list[TensorSource], TensorSource | None]]:
    opened: list[TensorSource] = []
    try:
        for i, model in enumerate(models):
            opened.append(open_source(model, name=f"models[{i}]", allow_pickle=allow_pickle))
        base_src = open_source(base, name="base", allow_pickle=allow_pickle) if base is not None else None
        if base_src is not None:
            opened.append(base_src)
        yield opened[: len(models)], base_src
    finally:
        for source in opened:
            source.close()


def _plan(specs: Mapping[str, TensorInfo], dtype_name: str | None) -> dict[str, TensorInfo]:
    """Output key -> (dtype, shape): model 0's layout, floating tensors cast to the requested dtype."""
    target = _TORCH_DTYPES.get(dtype_name) if dtype_name else None
    return {
        key: TensorInfo(
            target if target is not None and info.dtype.is_floating_point else info.dtype, info.shape
        )
        for key, info in specs.items()
    }


class _Merged(NamedTuple):
    """One merged tensor and how to check it: NaN/Inf detection may run later, on the writer thread."""

    key: str
    tensor: torch.Tensor
    inputs: list[Any]
    base: Any
    names: list[str]

    def check(self) -> None:
        raise_if_non_finite(self.tensor, key=self.key, inputs=self.inputs, base=self.base, names=self.names)


def _merged_tensors(
    spec: Any,
    recipe: Recipe,
    sources: Sequence[TensorSource],
    base_src: TensorSource | None,
    weights: Sequence[float],
    plan: Mapping[str, TensorInfo],
    partial: Mapping[str, Sequence[TensorSource]],
    progress: bool,
    grown: Mapping[str, Sequence[int]],
) -> Iterator[_Merged]:
    """Yield the merged tensors one key at a time, unchecked; inputs are loaded lazily inside ``merge_tensor``."""
    options = recipe.resolved_options()
    names = [f"{s.name} (models[{i}])" if s.folder is not None else s.name for i, s in enumerate(sources)]
    if base_src is not None:
        names.append(f"{base_src.name} (base)" if base_src.folder is not None else base_src.name)
    depths = layer_depths(plan) if spec.depth_scaling else {}
    keys: Any = plan
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(plan, desc=f"merging ({spec.name})", unit="tensor", total=len(plan))
    for key in keys:
        if key in partial:
            yield _Merged(key, copy_buffer(key, partial[key]), [], None, names)
            continue
        inputs = [_loader(source, key) for source in sources]
        if key in grown:  # rows appended in some inputs: each row block mixes the inputs that have it
            out_dtype = plan[key].dtype if plan[key].dtype.is_floating_point else None
            yield _Merged(key, merge_rows(key, inputs, weights, grown[key], out_dtype), inputs, None, names)
            continue
        base = _loader(base_src, key) if base_src is not None else None
        tensor = merge_tensor(
            spec,
            inputs,
            weights,
            base=base,
            options=options,
            key=key,
            depth=depths.get(key, 0.0),
            seed=recipe.seed,
            out_dtype=plan[key].dtype if plan[key].dtype.is_floating_point else None,
            check_finite=False,
            names=names,
        )
        yield _Merged(key, tensor, inputs, base, names)


def _collect(merged: Iterator[_Merged]) -> dict[str, torch.Tensor]:
    state = {}
    for item in merged:
        item.check()
        state[item.key] = item.tensor
    return state


def _loader(source: TensorSource, key: str) -> Any:
    load = lambda: source.get(key)  # noqa: E731
    return OwnedLoader(load) if source.owned else load


def _identity(source: TensorSource, role: str, weight: float | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": role, "name": source.name, "fingerprint": source.fingerprint()}
    if weight is not None:
        entry["weight"] = weight
    return entry


def _set_config_dtype(config: Path, dtype_name: str) -> None:
    """Make a copied ``config.json`` state the dtype the weights were written in (``from_pretrained`` reads it)."""
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    keys = [key for key in ("dtype", "torch_dtype") if key in data] or ["dtype"]
    for key in keys:
        data[key] = dtype_name
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _extra_path(folder: Path, rel: str) -> Path:
    path = (folder / rel).resolve()
    if folder.resolve() not in path.parents:
        raise UsageError(
            f"extra file {rel!r} would be written outside the output folder; use a relative path inside it"
        )
    return path


def _write_extra(folder: Path, rel: str, content: str | bytes) -> None:
    path = _extra_path(folder, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
