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
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..distributed import (
    full_state_dict,
    is_sharded,
    is_sharded_model,
    local_part,
    local_tensor,
    reshard,
)
from ..errors import UsageError
from ..folder import SubFolder
from ..merging import get_method, resolve_options
from ..peers import PeerCheckpoints
from ..recipe import Recipe
from ..snapshot import Snapshot
from ..sources import ModelLike
from ..validation import check_alpha, check_weights
from ._full_math import DriftMeter, TensorMixer, swapped_parameters
from ._full_write import iter_state, write_folder
from ._options import (
    check_peers,
    check_snapshot_device,
    check_snapshot_dtype,
    check_training_method,
    peer_label,
)
from ._protocol import Drift, FamilySaver, WriteForm

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
        check_training_method(self._spec, len(self._peer_specs))
        self.snapshot_device = check_snapshot_device(snapshot_device)
        self.snapshot_dtype = check_snapshot_dtype(snapshot_dtype)
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self._snapshot: Snapshot | None = None
        self._mixer = TensorMixer(self._spec, self._options, seed)
        self._drift = DriftMeter()
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

        with resharded_on_exit(model), self._swap(model, write) as swapped:
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
        if self._spec.combine == "slerp":  # α is SLERP's t between θ₀ and θₜ
            options = {**self.recipe.options, "t": mix[0]}
            return Recipe(method="slerp", weights=(1.0,), options=options, seed=self.recipe.seed)
        return Recipe(
            method=self.recipe.method, weights=mix, options=self.recipe.options, seed=self.recipe.seed
        )

    @property
    def base_rows(self) -> dict[str, int]:
        """Parameter -> rows of the pre-trained base, for a vocabulary grown before θ₀ was taken (set with
        :meth:`set_base_rows`); rows beyond them, and beyond θ₀'s own, take the fine-tuned values."""
        return dict(self._mixer.base_rows)

    def set_base_rows(self, rows: Mapping[str, int]) -> None:
        """Declare how many rows of a parameter (an embedding, an output head) the pre-trained base had."""
        self._mixer.base_rows = {str(k): int(v) for k, v in rows.items()}

    def grown_rows(self, model: torch.nn.Module) -> dict[str, dict[str, int]]:
        """``{name: {"base": rows the base had, "now": rows now}}`` of the parameters with appended rows."""
        out, specs = {}, self.snapshot.specs()
        for name, p in self._params(model):
            now, then = local_tensor(p).shape, specs[name].shape
            rows = min(then[0], self._mixer.base_rows.get(name, then[0])) if then else 0
            if then and now[0] > rows:
                out[name] = {"base": rows, "now": int(now[0])}
        return out

    def merged_tensor(
        self,
        name: str,
        current: torch.Tensor,
        alpha: float,
        weights: Sequence[float] | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """θ(α) of parameter ``name`` given its live value ``current`` (not modified), in ``current``'s dtype and on its
        device, or written into ``out``; see :meth:`TensorMixer.mix <resilient_tune.engine._full_math.TensorMixer.mix>`.
        """
        mix = self._mix_weights(alpha, weights)
        peers = [self._peer_loader(i, name) for i in range(self.num_peers)]
        return self._mixer.mix(name, current, self.snapshot, peers, mix, out=out)

    @contextlib.contextmanager
    def swapped(
        self, model: torch.nn.Module, alpha: float, weights: Sequence[float] | None = None
    ) -> Iterator[torch.nn.Module]:
        """Put θ(α) into the live trainable parameters of ``model`` for the duration of the block.

        Works in place under ``torch.no_grad()``: each live tensor θₜ is copied once to a CPU scratch (one
        transient copy of the trainable parameters), the merged tensor is written into the parameter, and on
        exit (also on an exception) every parameter is restored from the scratch, bit-exactly. ``alpha == 1``
        is θₜ itself: nothing is swapped. On exit FSDP2 modules are resharded, so that the registered parameters are
        the shards the optimizer holds even after a forward in the block left them unsharded.

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
            with resharded_on_exit(model):
                yield model
            return

        def write(name: str, live: torch.Tensor, param: torch.Tensor) -> None:
            self.merged_tensor(name, live, alpha, weights, out=param)

        with resharded_on_exit(model), self._swap(model, write) as swapped:
            yield swapped

    def _swap(
        self, model: torch.nn.Module, write: Callable[[str, torch.Tensor, torch.Tensor], None]
    ) -> contextlib.AbstractContextManager[torch.nn.Module]:
        return swapped_parameters(model, self._params(model), write)

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
        return dict(iter_state(self, model, alpha, dedupe=False, weights=weights))

    def drift(self, model: torch.nn.Module) -> Drift:
        """Weight-space drift ``‖θₜ − θ₀‖`` of the trainable parameters, total and per layer.

        With a sharded model each rank sums its shards and the sums are added over the ranks (a collective: every
        rank must call it)."""
        params = self._params(model)
        return self._drift.measure(self.snapshot, params, sharded=bool(self._sharded))

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
        """Write the resilient model θ(α) as a folder, atomically; the arguments are those of
        :func:`~resilient_tune.engine._full_write.write_folder` (``dedupe_tied=False`` is an older spelling of
        ``form="module"``). A sharded model (FSDP2, ZeRO-3) is written collectively: **every rank must call this**.

        Returns:
            The written folder.
        """
        if dedupe_tied is not None:
            form = "pretrained" if dedupe_tied else "module"
        return write_folder(
            self, model, folder, self.alpha if alpha is None else check_alpha(alpha), metadata=metadata,
            weights=weights, form=form, saver=saver, support_from=support_from, tokenizer=tokenizer,
            overwrite=overwrite, max_shard_size=max_shard_size, subfolders=subfolders,
        )  # fmt: skip

    # ---------------------------------------------------------------- internals
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


@contextlib.contextmanager
def resharded_on_exit(model: torch.nn.Module) -> Iterator[None]:
    """Reshard ``model``'s FSDP2 modules when the block ends (also on an exception): a forward in the block may leave
    them unsharded, and the optimizer and the checkpoint savers expect the registered parameters to be the shards."""
    try:
        yield
    finally:
        reshard(model)
