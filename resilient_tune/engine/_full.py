"""Framework-agnostic core of the training callbacks: snapshot -> measure -> choose -> merge -> write.

:class:`CocktailEngine` holds the base snapshot θ₀ of a model's trainable parameters and, given the live
weights θₜ and a mixing weight α, builds the resilient model ``θ = θ₀ + α·(θₜ − θ₀)`` (``method="linear"``:
``α·θₜ + (1 − α)·θ₀``, the LM-Cocktail / WiSE-FT mix of the fine-tuned model with its base) or, with a
task-vector method, ``θ₀ + λ·sparsify(α·(θₜ − θ₀))`` as the merge core defines it.

With peers (checkpoints of the same architecture fine-tuned on other domains) it builds the paper's
``θ = α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ`` over the base and the peers (``Σ wᵢ = 1``; :attr:`CocktailEngine.weights`,
uniform unless set, e.g. by the ``cocktail`` policy). Peers are read lazily, one tensor at a time.
Task-vector methods take the same mixture in task-vector form: base θ₀, inputs ``[θₜ, peer₁, ...]`` with
weights ``[α, (1 − α)·w₁, ...]`` (the base's own task vector is zero, so ``w₀`` drops out). For
``task_arithmetic`` with ``lambda = 1`` this is exactly the linear mixture (``θ₀·(1 − α − (1 − α)Σ_{i≥1} wᵢ) =
(1 − α)·w₀·θ₀``); TIES / DARE / breadcrumbs then sparsify and elect signs over the fine-tuned and the peer task
vectors with those weights (TIES divides by the sum of the agreeing weights, so with one input α cancels out:
use ``linear`` or ``task_arithmetic`` when α should scale the update). The engine can

- swap θ(α) into the live model in place and restore θₜ bit-exactly afterwards (:meth:`swapped`), so that
  probes can score candidates without a second model instance (:meth:`swapped_ingredient` swaps in the base
  or a peer as stored, e.g. to measure its loss for auto weights);
- measure the weight-space drift ``‖θₜ − θ₀‖`` per layer (:meth:`drift`);
- return the merged state dict (:meth:`merged_state_dict`) or write a ``from_pretrained``-loadable folder with
  ``cocktail.json`` and a model card, atomically (:meth:`write`).

Frozen parameters and buffers are never merged: they still hold their base values (also with peers: only the
trainable parameters are mixed). This module imports only torch and resilient-tune's own modules.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..checkpoint import TensorInfo, atomic_dir
from ..distributed import (
    agree_on_failure,
    full_state_dict,
    is_sharded,
    is_sharded_model,
    local_part,
    local_tensor,
    on_rank_zero,
    reshard,
    sum_across_ranks,
)
from ..errors import UsageError
from ..folder import SubFolder, write_model_folder, write_recipe_files
from ..merging import get_method, layer_depths, merge_tensor, raise_if_non_finite, resolve_options
from ..peers import PeerCheckpoints
from ..recipe import Recipe, cocktail_document
from ..snapshot import Snapshot
from ..sources import ModelLike
from ..validation import check_alpha, check_weights
from ._options import check_peers, check_snapshot_device, check_snapshot_dtype, into, peer_label, state_keys
from ._protocol import Drift, FamilySaver, WriteForm, layer_of

__all__ = ["CocktailEngine"]


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
        peers: Peer checkpoints (folders or files, read lazily; or state dicts) of the model's architecture.
            They are opened and checked against the model's trainable parameters by :meth:`begin` /
            :meth:`attach` (or the first merge).
        weights: Weights ``wᵢ`` of the base and the peers (base first; non-negative, summing to 1). Default:
            uniform, ``1 / (1 + len(peers))`` each (``(1.0,)`` without peers).
        allow_pickle: Allow ``.bin`` pickle peer checkpoints (loaded with ``torch.load(weights_only=True)``).

    Raises:
        UsageError: α out of range, unknown method (the message lists the valid ones), bad options, dtype,
            peers or weights.
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
        peers: Sequence[ModelLike] | None = None,
        weights: Sequence[float] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self._peer_specs = check_peers(peers, allow_pickle=allow_pickle)
        count = 1 + len(self._peer_specs)
        self.weights = (
            (1.0 / count,) * count
            if weights is None
            else check_weights(weights, count, nonnegative=True, per="ingredient")
        )
        self._allow_pickle = allow_pickle
        self._peers: PeerCheckpoints | None = None
        self.recipe = Recipe(method=method, options=dict(options or {}), seed=seed, dtype=None)
        self._spec = get_method(method)
        self._options = resolve_options(self._spec, self.recipe.options)
        self.snapshot_device = check_snapshot_device(snapshot_device)
        self.snapshot_dtype = check_snapshot_dtype(snapshot_dtype)
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self._snapshot: Snapshot | None = None
        self._depths: dict[str, float] = {}  # LiNeS depths of the snapshot's parameters, computed once
        self._depths_of: Snapshot | None = None
        self._norms: dict[str, float] = {}  # ‖θ₀‖² per parameter, computed once per snapshot
        self._norms_of: Snapshot | None = None
        self._sharded: dict[
            str, torch.nn.Parameter
        ] = {}  # sharded parameters, to cut peers' tensors to the shard

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
        self._open_peers(model)
        return self._snapshot

    def attach(self, snapshot: Snapshot, model: torch.nn.Module | None = None) -> None:
        """Use an existing snapshot (e.g. reloaded on resume); checked against ``model`` when given (and the
        peers, if any, are opened and checked against it)."""
        if model is not None:
            snapshot.check(model)
        if self._snapshot is not None and self._snapshot is not snapshot:
            self._snapshot.close()
        self._snapshot = snapshot
        if model is not None:
            self._open_peers(model)

    # ---------------------------------------------------------------- peers
    @property
    def num_peers(self) -> int:
        """How many peers the engine mixes (0 without peers)."""
        return len(self._peer_specs)

    @property
    def ingredient_names(self) -> list[str]:
        """``["base", <peer 1>, ...]``: the ingredients :attr:`weights` refers to, in order."""
        peers = (
            self._peers.names
            if self._peers is not None
            else [peer_label(p, i) for i, p in enumerate(self._peer_specs, 1)]
        )
        return ["base", *peers]

    @property
    def peers(self) -> PeerCheckpoints | None:
        """The opened peers (``None`` before :meth:`begin` / :meth:`attach` or without peers)."""
        return self._peers

    def set_weights(self, weights: Sequence[float]) -> tuple[float, ...]:
        """Set :attr:`weights` (base first, one per peer; non-negative, summing to 1) and return them."""
        self.weights = check_weights(weights, 1 + self.num_peers, nonnegative=True, per="ingredient")
        return self.weights

    @contextlib.contextmanager
    def swapped_ingredient(self, model: torch.nn.Module, index: int) -> Iterator[torch.nn.Module]:
        """Put ingredient ``index`` (0 = the base θ₀, ``i`` = peer ``i``), as stored, into the live trainable
        parameters for the duration of the block; restored bit-exactly as in :meth:`swapped`. Used to measure
        each ingredient's loss for auto weights. Frozen parameters keep their (base) values."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= self.num_peers:
            raise UsageError(
                f"ingredient index {index!r} must be an int in [0, {self.num_peers}] (0 = the base)"
            )
        self._open_peers(model)

        def write(name: str, live: torch.Tensor, param: torch.Tensor) -> None:
            param.copy_(self.snapshot.get(name) if index == 0 else self._peer_loader(index - 1, name)())

        with self._swap(model, write) as swapped:
            yield swapped

    def close(self) -> None:
        """Release the peers' readers and the snapshot. Idempotent."""
        if self._peers is not None:
            self._peers.close()
            self._peers = None
        if self._snapshot is not None:
            self._snapshot.close()

    # ---------------------------------------------------------------- merge
    def recipe_for(self, alpha: float, weights: Sequence[float] | None = None) -> Recipe:
        """The :class:`Recipe` of the merge at ``alpha``: weights ``(α, (1 − α)·w₀, (1 − α)·w₁, ...)`` over
        fine-tuned, base and peers (linear; ``(α, 1 − α)`` without peers) or ``(α, (1 − α)·w₁, ...)`` over
        fine-tuned and peers (task-vector methods, base θ₀; ``(α,)`` without peers)."""
        mix = self._mix_weights(check_alpha(alpha), weights)
        return Recipe(
            method=self.recipe.method, weights=mix, options=self.recipe.options, seed=self.recipe.seed
        )

    def merged_tensor(
        self,
        name: str,
        current: torch.Tensor,
        alpha: float,
        weights: Sequence[float] | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """θ(α) of parameter ``name`` given its live value ``current`` (returned on ``current``'s device and
        in its dtype; arithmetic in float32 on the CPU-side inputs). ``current`` is not modified.

        ``out`` (a tensor of ``current``'s shape, not sharing its memory) receives the result, which is then
        ``out`` itself; for ``linear`` without peers on float32 tensors of one device the merge is computed in it
        (no allocation; the probes' swaps write the live parameters this way). On a non-finite result ``out``
        holds it when the error is raised.

        Peers are read one at a time. For ``linear``, ingredients of weight 0 are not read at all (the sum is
        the same); task-vector methods read every input (DARE masks depend on the input's position)."""
        mix = self._mix_weights(alpha, weights)
        base = self.snapshot.get(name).to(current.device)
        if self.recipe.method == "linear" and not self.num_peers and current.is_floating_point():
            # θ₀ + α(θₜ − θ₀) in one fused pass (a third of the general sum's cost; probes swap it in at every
            # candidate α); half precision is mixed in float32 and rounded once, as the merge core does
            in_place = (
                out is not None
                and out.device == current.device
                and {out.dtype, current.dtype, base.dtype} == {torch.float32}
            )
            mixed = (
                torch.lerp(base, current, mix[0], out=out)
                if in_place
                else torch.lerp(base.float(), current.float(), mix[0])
            )
            raise_if_non_finite(
                mixed, key=name, inputs=[current, base], names=["the fine-tuned model", "the base"]
            )
            return mixed if in_place else into(out, mixed.to(current.dtype))
        peers = [self._peer_loader(i, name) for i in range(self.num_peers)]
        base_arg: torch.Tensor | None
        if self._spec.needs_base:
            inputs, base_arg = [current, *peers], base
        else:
            pairs = [(x, w) for x, w in zip([current, base, *peers], mix) if w != 0.0]
            inputs, base_arg = [x for x, _ in pairs], None
            mix = tuple(w for _, w in pairs)
        merged = merge_tensor(
            self._spec,
            inputs,
            mix,
            base=base_arg,
            options=self._options,
            key=name,
            depth=self._depth(name),
            seed=self.recipe.seed,
            out_dtype=current.dtype,
        )
        return into(out, merged)

    def _depth(self, name: str) -> float:
        """LiNeS depth of parameter ``name`` among the snapshot's parameters (0 for methods without depth)."""
        if not self._spec.depth_scaling:
            return 0.0
        snapshot = self.snapshot
        if self._depths_of is not snapshot:
            self._depths, self._depths_of = layer_depths(snapshot.names), snapshot
        return self._depths[name]

    @contextlib.contextmanager
    def swapped(
        self, model: torch.nn.Module, alpha: float, weights: Sequence[float] | None = None
    ) -> Iterator[torch.nn.Module]:
        """Put θ(α) into the live trainable parameters of ``model`` for the duration of the block.

        Works in place under ``torch.no_grad()``: each live tensor θₜ is copied once to a CPU scratch (one
        transient copy of the trainable parameters), the merged tensor is written into the parameter, and on
        exit (also on an exception) every parameter is restored from the scratch, bit-exactly. ``alpha == 1``
        is θₜ itself: nothing is swapped.

        Args:
            model: The live model.
            alpha: Weight of the fine-tuned model.
            weights: Weights of the base and the peers (default :attr:`weights`).

        Yields:
            ``model`` itself.
        """
        alpha = check_alpha(alpha)
        self._mix_weights(alpha, weights)  # validate before touching the model
        self._open_peers(model)
        if alpha == 1.0 and not self._spec.needs_base:
            self._params(model)
            yield model
            return

        def write(name: str, live: torch.Tensor, param: torch.Tensor) -> None:
            self.merged_tensor(name, live, alpha, weights, out=param)

        with self._swap(model, write) as swapped:
            yield swapped

    @contextlib.contextmanager
    def _swap(
        self, model: torch.nn.Module, write: Callable[[str, torch.Tensor, torch.Tensor], None]
    ) -> Iterator[torch.nn.Module]:
        """Call ``write(name, live_cpu_copy, param)`` for each trainable parameter (it writes the swapped-in value
        into ``param``); restore every parameter from the scratch on exit."""
        params = [(name, local_tensor(p)) for name, p in self._params(model)]  # shards of sharded parameters
        scratch: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, p in params:
                    live = p.detach().to("cpu", copy=True)
                    scratch[name] = live  # before the write: a failed write is restored too
                    write(name, live, p)
            yield model
        finally:
            reshard(model)  # FSDP2: drop parameters a forward left unsharded (they hold the swapped values)
            with torch.no_grad():
                for name, p in params:
                    if name in scratch:
                        p.copy_(scratch[name])
            scratch.clear()

    def merged_state_dict(
        self, model: torch.nn.Module, alpha: float | None = None, weights: Sequence[float] | None = None
    ) -> dict[str, torch.Tensor]:
        """The full ``model.state_dict()`` with every trainable parameter replaced by θ(α).

        Non-trainable entries (frozen parameters, buffers) are the model's own tensors (detached, not copied);
        tied parameters appear under every name, merged once. ``model`` is not modified. ``weights``: of the
        base and the peers (default :attr:`weights`). A sharded model is gathered (every rank must call it): the
        full dict on rank 0's CPU, ``{}`` elsewhere.
        """
        alpha = self.alpha if alpha is None else alpha
        if is_sharded_model(model):
            with self.swapped(model, alpha, weights):
                return full_state_dict(model)
        return dict(self._iter_state(model, alpha, dedupe=False, weights=weights))

    def drift(self, model: torch.nn.Module) -> Drift:
        """Weight-space drift ``‖θₜ − θ₀‖`` of the trainable parameters, total and per layer.

        With a sharded model each rank sums its shards and the sums are added over the ranks (a collective: every
        rank must call it)."""
        params = self._params(model)
        per_layer: dict[str, float] = {}
        total_sq = 0.0
        base_norms = self._base_norms()
        with torch.no_grad():
            for name, p in params:
                base = self.snapshot.get(name).to("cpu", torch.float32)
                live = local_tensor(p).detach().to("cpu", torch.float32)
                delta_sq = float(torch.linalg.vector_norm(live - base, dtype=torch.float64)) ** 2
                total_sq += delta_sq
                group = layer_of(name)
                per_layer[group] = per_layer.get(group, 0.0) + delta_sq
        base_sq = sum(base_norms.values())
        if self._sharded:
            total_sq, base_sq, *layers = sum_across_ranks([total_sq, base_sq, *per_layer.values()])
            per_layer = dict(zip(per_layer, layers))
        total = math.sqrt(total_sq)
        relative = total / math.sqrt(base_sq) if base_sq > 0 else 0.0
        return Drift(total, relative, {k: math.sqrt(v) for k, v in per_layer.items()})

    def _base_norms(self) -> dict[str, float]:
        """``‖θ₀‖²`` per parameter (of this rank's shard), computed once per snapshot (θ₀ never changes)."""
        snapshot = self.snapshot
        if self._norms_of is not snapshot:
            with torch.no_grad():
                self._norms = {
                    name: float(torch.linalg.vector_norm(t.to("cpu", torch.float32), dtype=torch.float64))
                    ** 2
                    for name, t in snapshot.items()
                }
            self._norms_of = snapshot
        return self._norms

    # ---------------------------------------------------------------- write
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
        dedupe_tied: bool | None = None,
    ) -> Path:
        """Write the resilient model θ(α) as a folder, atomically (through :func:`resilient_tune.folder.write_model_folder`).

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
            alpha: Weight of the fine-tuned model (default: the engine's ``alpha``).
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
            dedupe_tied: Older spelling of ``form``: ``False`` is ``form="module"``.

        A sharded model (FSDP2, ZeRO-3) is written collectively: **every rank must call this**. Each rank swaps
        θ(α) into its own shards (no gather to merge), the merged model is gathered once to rank 0's CPU
        (:func:`resilient_tune.distributed.full_state_dict`), rank 0 writes, and every rank learns whether the
        write worked (a failure on rank 0 raises on every rank). ``support_from`` is read on rank 0 only.

        Returns:
            The written folder.
        """
        if dedupe_tied is not None:
            form = "pretrained" if dedupe_tied else "module"
        dedupe = _check_form(form) == "pretrained"
        alpha = self.alpha if alpha is None else check_alpha(alpha)
        mix = self._ingredient_weights(weights)
        params = self._params(model)
        self._open_peers(model)
        doc = cocktail_document(
            self.recipe_for(alpha, mix),
            self._ingredients(alpha, mix),
            version=__version__,
            extra=self._extra(metadata, alpha, params, mix),
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
            return self._write_with(saver, model, folder, alpha, mix, doc, overwrite=overwrite)
        if not self._sharded:
            plan = _plan(self._iter_state(model, alpha, dedupe=dedupe, lazy=True, weights=mix))
            tensors = self._iter_state(model, alpha, dedupe=dedupe, weights=mix)
            return write_model_folder(folder, plan, tensors, doc, **files)
        with contextlib.ExitStack() as stack:  # every rank: θ(α) in its shards, then one gather
            failure: Exception | None = None
            try:
                stack.enter_context(self.swapped(model, alpha, mix))
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

    def _write_with(
        self,
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
        if self._sharded:
            raise UsageError(
                f"a {saver.library} model is written by its own save method, which cannot write a sharded "
                "(FSDP2/ZeRO-3) model; train it with DDP or on one process"
            )
        doc["layout"] = {"library": saver.library, "loader": saver.loader}
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            with self.swapped(model, alpha, mix):
                saver.save(tmp)
            write_recipe_files(tmp, doc)
        return Path(os.path.abspath(folder))

    # ---------------------------------------------------------------- internals
    def _iter_state(
        self,
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
        self._mix_weights(alpha, weights)
        self._open_peers(model)
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
                    yield key, self.merged_tensor(name, live.to("cpu"), alpha, weights)

    def _ingredient_weights(self, weights: Sequence[float] | None) -> tuple[float, ...]:
        return (
            self.weights
            if weights is None
            else check_weights(weights, 1 + self.num_peers, nonnegative=True, per="ingredient")
        )

    def _mix_weights(self, alpha: float, weights: Sequence[float] | None) -> tuple[float, ...]:
        """Recipe weights: ``[α, (1−α)·w₀, (1−α)·w₁, ...]`` (linear) or ``[α, (1−α)·w₁, ...]`` (task vectors)."""
        w = self._ingredient_weights(weights)
        rest = 1.0 - alpha
        others = w[1:] if self._spec.needs_base else w
        return (alpha, *(rest * x for x in others))

    def _params(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's trainable parameters paired with the snapshot (sharded ones noted, FSDP2 modules resharded
        first so that their registered parameters are the shards)."""
        reshard(model)
        params = self.snapshot.check(model)
        self._sharded = {name: p for name, p in params if is_sharded(p)}
        return params

    def _open_peers(self, model: torch.nn.Module) -> None:
        if self._peer_specs and self._peers is None:
            self._peers = PeerCheckpoints.open(self._peer_specs, model, allow_pickle=self._allow_pickle)

    def _peer_loader(self, index: int, name: str) -> Callable[[], torch.Tensor]:
        if self._peers is None:
            raise UsageError("the peers are not open yet; call begin(model) or attach(snapshot, model) first")
        loader = self._peers.loader(index, name)
        param = self._sharded.get(name)
        if param is None:
            return loader
        return lambda: local_part(param, loader())  # the peer's piece matching this rank's shard

    def _ingredients(self, alpha: float, weights: Sequence[float]) -> list[dict[str, Any]]:
        snap = self.snapshot
        base_name = str(snap.folder) if snap.folder is not None else "base snapshot (in memory)"
        fine: dict[str, Any] = {"role": "model", "name": "fine-tuned (live training weights)"}
        base: dict[str, Any] = {"role": "base", "name": base_name, "storage": snap.storage}
        rest = 1.0 - alpha
        fine["weight"] = alpha
        if not self._spec.needs_base:
            base["weight"] = rest * weights[0]
        out = [fine, base]
        if self.num_peers:
            assert self._peers is not None
            base["mix_weight"] = weights[0]
            for identity, w in zip(self._peers.identities(), weights[1:]):
                out.append({"role": "peer", **identity, "weight": rest * w, "mix_weight": w})
        return out

    def _extra(
        self, metadata: Mapping[str, Any] | None, alpha: float, params: list[Any], weights: Sequence[float]
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {"alpha": alpha, "merged_parameters": len(params)}
        if self.num_peers:
            extra["ingredient_weights"] = dict(zip(self.ingredient_names, weights))
        for key, value in (metadata or {}).items():
            if key in extra:
                raise UsageError(f"metadata key {key!r} is set by the engine in cocktail.json; rename it")
            extra[key] = value
        return extra


def _plan(items: Iterable[tuple[str, torch.Tensor]]) -> dict[str, TensorInfo]:
    """Key -> dtype and shape of the tensors to write, in order."""
    return {key: TensorInfo(t.dtype, tuple(t.shape)) for key, t in items}


def _check_form(form: str) -> str:
    if form not in ("pretrained", "module"):
        raise UsageError(
            f"form={form!r} must be 'pretrained' (from_pretrained layout) or 'module' (every state_dict key)"
        )
    return form
