"""How the full-weight engine writes a folder: θ(α) streamed under the model's own keys into the one folder writer, or
the family's own ``save`` while θ(α) is swapped in; the ``cocktail.json`` document with the ingredients."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..checkpoint import TensorInfo, atomic_dir
from ..distributed import agree_on_failure, full_state_dict, on_rank_zero
from ..errors import UsageError
from ..folder import SubFolder, write_model_folder, write_recipe_files
from ..recipe import cocktail_document
from ..validation import check_alpha
from ._options import state_keys
from ._protocol import FamilySaver, WriteForm

if TYPE_CHECKING:
    from ._full import CocktailEngine

__all__ = ["check_form", "iter_state", "write_folder"]


def write_folder(
    engine: CocktailEngine,
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    alpha: float,
    *,
    metadata: Mapping[str, Any] | None,
    weights: Sequence[float] | None,
    form: WriteForm,
    saver: FamilySaver | None,
    support_from: str | os.PathLike[str] | None,
    tokenizer: Any,
    overwrite: bool,
    max_shard_size: int | str,
    subfolders: Sequence[SubFolder],
) -> Path:
    """Write the resilient model θ(α) of ``engine`` as a folder, atomically (through
    :func:`resilient_tune.folder.write_model_folder`); what :meth:`CocktailEngine.write
    <resilient_tune.engine.CocktailEngine.write>` does.

    The folder holds the weights (``model.safetensors``, sharded with an index above ``max_shard_size``), the
    config and generation config (copied from ``support_from`` when given, else from ``model.config`` /
    ``model.generation_config``), the tokenizer (``support_from`` files, or ``tokenizer.save_pretrained``),
    ``cocktail.json`` (recipe, ingredients, α and ``metadata`` such as step and probe metrics) and a model
    card ``README.md``. Tensors are merged and written one at a time (peers read one tensor at a time).
    ``cocktail.json`` lists the ingredients: the fine-tuned model, the base and each peer (path and content
    fingerprint) with its weight in the recipe and, with peers, its mixing weight ``wᵢ``.

    Args:
        model: The live model (θₜ); not modified.
        folder: The destination folder.
        alpha: Weight of the fine-tuned model.
        metadata: Extra JSON-able ``cocktail.json`` entries (``step``, ``probes``, ...).
        weights: Weights of the base and the peers (default :attr:`weights`).
        form: ``"pretrained"`` writes tied tensors once, as ``save_pretrained`` does; ``"module"`` writes every
            key of ``model.state_dict()`` (what ``load_state_dict`` of the same module expects, e.g. Lightning's).
        saver: The model family's own writer (e.g. a ``SentenceTransformer``'s ``save``): ``saver.save(folder)``
            is called while θ(α) is swapped into the live weights (restored bit-exactly afterwards), so the
            folder has the family's layout; ``cocktail.json`` (with ``layout``: the library and its loader) and
            the model card are added. Not for sharded models.
        support_from: A model folder whose config/tokenizer files are copied (e.g. the Trainer's checkpoint).
        tokenizer: Anything with ``save_pretrained(folder)`` (used when ``support_from`` has no tokenizer).
        overwrite: Replace ``folder`` if it exists.
        max_shard_size: Shard size limit (bytes or ``"5GB"``-style string).
        subfolders: Further folders written from the same merged tensors (e.g. Lightning's ``hf/``).

    A sharded model (FSDP2, ZeRO-3) is written collectively: **every rank must call this**. Each rank swaps
    θ(α) into its own shards (no gather to merge), the merged model is gathered once to rank 0's CPU
    (:func:`resilient_tune.distributed.full_state_dict`), rank 0 writes, and every rank learns whether the
    write worked (a failure on rank 0 raises on every rank). ``support_from`` is read on rank 0 only.

    Returns:
        The written folder.
    """
    dedupe = check_form(form) == "pretrained"
    mix = engine._ingredient_weights(weights)
    params = engine._params(model)
    engine._open_peers(model)
    doc = cocktail_document(
        engine.recipe_for(alpha, mix),
        ingredients(engine, alpha, mix),
        version=__version__,
        extra=extra(engine, model, metadata, alpha, params, mix),
    )
    files: dict[str, Any] = {
        "config_from": model,
        "support_from": support_from,
        "tokenizer": tokenizer,
        "overwrite": overwrite,
        "max_shard_size": max_shard_size,
        "subfolders": subfolders,
    }
    if saver is not None:
        return write_with_saver(engine, saver, model, folder, alpha, mix, doc, overwrite=overwrite)
    if not engine._sharded:
        plan = _plan(iter_state(engine, model, alpha, dedupe=dedupe, lazy=True, weights=mix))
        tensors = iter_state(engine, model, alpha, dedupe=dedupe, weights=mix)
        return write_model_folder(folder, plan, tensors, doc, **files)
    with contextlib.ExitStack() as stack:  # every rank: θ(α) in its shards, then one gather
        failure: Exception | None = None
        try:
            stack.enter_context(engine.swapped(model, alpha, mix))
        except Exception as exc:  # e.g. a non-finite merge on this rank's shard: the swap restored itself
            failure = exc
        agree_on_failure(failure, f"merging {folder}")  # no rank enters the gather alone
        gathered = full_state_dict(model)
    keys = state_keys(model, dedupe=dedupe)
    state = {k: v for k, v in gathered.items() if k in keys}
    on_rank_zero(
        lambda: write_model_folder(folder, _plan(state.items()), state.items(), doc, **files),
        f"writing {folder}",
    )
    return Path(os.path.abspath(folder))


def write_with_saver(
    engine: CocktailEngine,
    saver: FamilySaver,
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    alpha: float,
    mix: Sequence[float],
    doc: dict[str, Any],
    *,
    overwrite: bool,
) -> Path:
    """The folder written by the family's own ``saver`` while θ(α) is in the live weights, plus the recipe files."""
    if engine._sharded:
        raise UsageError(
            f"a {saver.library} model is written by its own save method, which cannot write a sharded "
            "(FSDP2/ZeRO-3) model; train it with DDP or on one process"
        )
    doc["layout"] = {"library": saver.library, "loader": saver.loader}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with engine.swapped(model, alpha, mix):
            saver.save(tmp)
        write_recipe_files(tmp, doc)
    return Path(os.path.abspath(folder))


def iter_state(
    engine: CocktailEngine,
    model: torch.nn.Module,
    alpha: float,
    *,
    dedupe: bool,
    lazy: bool = False,
    weights: Sequence[float] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` over ``model.state_dict()``, trainable parameters merged (or, ``lazy``, not merged:
    only shapes/dtypes are needed). ``dedupe`` skips keys whose storage another key already holds."""
    alpha = check_alpha(alpha)
    engine._mix_weights(alpha, weights)
    engine._open_peers(model)
    trainable = {id(p): name for name, p in engine.snapshot.check(model)}
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
                yield key, engine.merged_tensor(name, live.to("cpu"), alpha, weights)


def ingredients(engine: CocktailEngine, alpha: float, weights: Sequence[float]) -> list[dict[str, Any]]:
    snap = engine.snapshot
    base_name = str(snap.folder) if snap.folder is not None else "base snapshot (in memory)"
    fine: dict[str, Any] = {"role": "model", "name": "fine-tuned (live training weights)"}
    base: dict[str, Any] = {"role": "base", "name": base_name, "storage": snap.storage}
    rest = 1.0 - alpha
    fine["weight"] = alpha
    if not engine._spec.needs_base:
        base["weight"] = rest * weights[0]
    out = [fine, base]
    if engine.num_peers:
        assert engine._peers is not None
        base["mix_weight"] = weights[0]
        for identity, w in zip(engine._peers.identities(), weights[1:]):
            out.append({"role": "peer", **identity, "weight": rest * w, "mix_weight": w})
    return out


def extra(
    engine: CocktailEngine,
    model: torch.nn.Module,
    metadata: Mapping[str, Any] | None,
    alpha: float,
    params: list[Any],
    weights: Sequence[float],
) -> dict[str, Any]:
    """The ``cocktail.json`` entries beyond the recipe: α, the merged parameters, the peer weights, ``metadata``."""
    extra: dict[str, Any] = {"alpha": alpha, "merged_parameters": len(params)}
    grown = engine.grown_rows(model)
    if grown:  # rows the base never had: the fine-tuned values (documented in docs/concepts.md)
        extra["grown_rows"] = grown
    if engine.num_peers:
        extra["ingredient_weights"] = dict(zip(engine.ingredient_names, weights))
    for key, value in (metadata or {}).items():
        if key in extra:
            raise UsageError(f"metadata key {key!r} is set by the engine in cocktail.json; rename it")
        extra[key] = value
    return extra


def _plan(items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, TensorInfo]:
    """Key -> dtype and shape of the tensors to write, in order."""
    return {key: TensorInfo(t.dtype, tuple(t.shape)) for key, t in items}


def check_form(form: str) -> str:
    if form not in ("pretrained", "module"):
        raise UsageError(
            f"form={form!r} must be 'pretrained' (from_pretrained layout) or 'module' (every state_dict key)"
        )
    return form
