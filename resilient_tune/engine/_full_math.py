"""The arithmetic of the full-weight engine: θ(α) of one tensor, and the weight-space drift ``‖θₜ − θ₀‖``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..distributed import local_tensor, reshard, sum_across_ranks
from ..errors import IncompatibleModelsError
from ..merging import layer_depths, merge_tensor, raise_if_non_finite
from ..snapshot import Snapshot
from ._options import into
from ._protocol import Drift, layer_of

__all__ = ["DriftMeter", "TensorMixer", "swapped_parameters"]


class TensorMixer:
    """θ(α) of one parameter from its live value, its θ₀ and the peers', by a registered merge method.

    Args:
        spec: The merge method (a registry row).
        options: Its resolved options.
        seed: Seed of random methods (DARE).
    """

    def __init__(self, spec: Any, options: dict[str, float], seed: int) -> None:
        self.spec, self.options, self.seed = spec, options, seed
        self.base_rows: dict[str, int] = {}  # parameter -> rows the pre-trained base had (a grown vocabulary)
        self._depths: dict[str, float] = {}  # LiNeS depths of the snapshot's parameters, computed once
        self._depths_of: Snapshot | None = None

    def mix(
        self,
        name: str,
        current: torch.Tensor,
        snapshot: Snapshot,
        peers: Sequence[Callable[[], torch.Tensor]],
        mix: Sequence[float],
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The merge of ``current`` (weight ``mix[0]``) with θ₀ and the ``peers`` (loaders, read one at a time), returned
        on ``current``'s device and in its dtype (arithmetic in float32 on the CPU-side inputs); ``current`` is not
        modified.

        ``out`` (a tensor of ``current``'s shape, not sharing its memory) receives the result, which is then ``out``
        itself; for ``linear`` without peers on float32 tensors of one device the merge is computed in it (no
        allocation; the probes' swaps write the live parameters this way). On a non-finite result ``out`` holds it
        when the error is raised. For ``linear``, ingredients of weight 0 are not read at all (the sum is the same);
        task-vector methods read every input (DARE masks depend on the input's position).

        Rows the base does not have (a vocabulary grown by ``resize_token_embeddings``: rows beyond θ₀'s, or beyond
        :attr:`base_rows`) take the fine-tuned values: the base has none to mix."""
        base = snapshot.get(name).to(current.device)
        depth = self._depth(snapshot, name)
        rows = min(base.shape[0], self.base_rows.get(name, base.shape[0])) if base.dim() else 0
        if base.dim() and rows < current.shape[0]:  # a grown vocabulary
            if peers:
                raise IncompatibleModelsError(
                    f"parameter {name!r} has {current.shape[0]} rows but the base had {rows} (a grown vocabulary); "
                    "peers cannot be mixed into rows they do not have: train without peers, or merge offline"
                )
            head = self._mix(name, current[:rows], base[:rows], [], mix, depth, None)
            return into(out, torch.cat([head, current[rows:].to(head.dtype)], dim=0))
        return self._mix(name, current, base, peers, mix, depth, out)

    def _mix(
        self,
        name: str,
        current: torch.Tensor,
        base: torch.Tensor,
        peers: Sequence[Callable[[], torch.Tensor]],
        mix: Sequence[float],
        depth: float,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.spec.name == "linear" and not peers and current.is_floating_point():
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
        if self.spec.combine == "slerp":  # α is t: θ₀ at 0, θₜ at 1, along the arc between them
            options = {**self.options, "t": mix[0]}
            slerped = merge_tensor(
                self.spec, [current], [1.0], base=base, options=options, key=name, out_dtype=current.dtype
            )
            return into(out, slerped)
        base_arg: torch.Tensor | None
        if self.spec.needs_base:
            inputs, base_arg = [current, *peers], base
        else:
            pairs = [(x, w) for x, w in zip([current, base, *peers], mix) if w != 0.0]
            inputs, base_arg = [x for x, _ in pairs], None
            mix = tuple(w for _, w in pairs)
        merged = merge_tensor(
            self.spec,
            inputs,
            mix,
            base=base_arg,
            options=self.options,
            key=name,
            depth=depth,
            seed=self.seed,
            out_dtype=current.dtype,
        )
        return into(out, merged)

    def _depth(self, snapshot: Snapshot, name: str) -> float:
        """LiNeS depth of parameter ``name`` among the snapshot's parameters (0 for methods without depth)."""
        if not self.spec.depth_scaling:
            return 0.0
        if self._depths_of is not snapshot:
            self._depths, self._depths_of = layer_depths(snapshot.names), snapshot
        return self._depths[name]


class DriftMeter:
    """``‖θₜ − θ₀‖`` of the trainable parameters, total, relative to ``‖θ₀‖`` and per layer."""

    def __init__(self) -> None:
        self._norms: dict[str, float] = {}  # ‖θ₀‖² per parameter, computed once per snapshot
        self._norms_of: Snapshot | None = None

    def measure(
        self, snapshot: Snapshot, params: Sequence[tuple[str, torch.nn.Parameter]], *, sharded: bool
    ) -> Drift:
        """The drift of ``params`` (of this rank's shards) from ``snapshot``; ``sharded``: the sums are added over the
        ranks (a collective: every rank must call it)."""
        per_layer: dict[str, float] = {}
        total_sq = 0.0
        base_norms = self._base_norms(snapshot)
        with torch.no_grad():
            for name, p in params:
                base = snapshot.get(name).to("cpu", torch.float32)
                live = local_tensor(p).detach().to("cpu", torch.float32)
                if base.dim() and live.shape[0] > base.shape[0]:  # a grown vocabulary: the rows both have
                    live = live[: base.shape[0]]
                delta_sq = float(torch.linalg.vector_norm(live - base, dtype=torch.float64)) ** 2
                total_sq += delta_sq
                group = layer_of(name)
                per_layer[group] = per_layer.get(group, 0.0) + delta_sq
        base_sq = sum(base_norms.values())
        if sharded:
            total_sq, base_sq, *layers = sum_across_ranks([total_sq, base_sq, *per_layer.values()])
            per_layer = dict(zip(per_layer, layers))
        total = math.sqrt(total_sq)
        relative = total / math.sqrt(base_sq) if base_sq > 0 else 0.0
        return Drift(total, relative, {k: math.sqrt(v) for k, v in per_layer.items()})

    def _base_norms(self, snapshot: Snapshot) -> dict[str, float]:
        """``‖θ₀‖²`` per parameter (of this rank's shard), computed once per snapshot (θ₀ never changes)."""
        if self._norms_of is not snapshot:
            with torch.no_grad():
                self._norms = {
                    name: float(torch.linalg.vector_norm(t.to("cpu", torch.float32), dtype=torch.float64))
                    ** 2
                    for name, t in snapshot.items()
                }
            self._norms_of = snapshot
        return self._norms


@contextlib.contextmanager
def swapped_parameters(
    model: torch.nn.Module,
    params: Sequence[tuple[str, torch.nn.Parameter]],
    write: Callable[[str, torch.Tensor, torch.Tensor], None],
) -> Iterator[torch.nn.Module]:
    """Call ``write(name, live_cpu_copy, param)`` for each of ``params`` (it writes the swapped-in value into
    ``param``, this rank's shard of a sharded one); restore every parameter from the CPU scratch on exit, bit-exactly,
    also on an exception."""
    local = [(name, local_tensor(p)) for name, p in params]
    scratch: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, p in local:
                live = p.detach().to("cpu", copy=True)
                scratch[name] = live  # before the write: a failed write is restored too
                write(name, live, p)
        yield model
    finally:
        reshard(model)  # FSDP2: drop parameters a forward left unsharded (they hold the swapped values)
        with torch.no_grad():
            for name, p in local:
                if name in scratch:
                    p.copy_(scratch[name])
        scratch.clear()
